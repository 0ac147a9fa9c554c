"""AtP*: attribution patching of heads with the QK fix (and GradDrop), fewer false negatives from saturated attention.

Kramár et al. 2024. A head's effect is estimated as the sum of patching its queries, keys and values from the clean
run into the corrupted one, each at each position: the values linearly (AtP), the queries and keys with the
attention softmax recomputed exactly (the QK fix): ``g . (A_patched - A)`` with ``g = d m / d A`` at the corrupted
run (`nnattr.kernels.qk_fix`). ``grad_drop=True`` repeats the estimate with the gradient through each layer's
residual-stream contribution dropped in turn and returns ``sum_l |estimate_l| / (L - 1)`` (magnitudes), which
exposes effects that cancel along different paths. Queries and keys are read after rotary embeddings and QK-norms,
where Hugging Face's attention interface receives them. Wire: only scores and metrics return.

    python recipes/atp_star.py --clean "..." --corrupted "..." --answer " Mary" --distractor " John"
"""

from __future__ import annotations

import dataclasses

import nnsight
import torch

from nnattr import runner
from nnattr.kernels import (  # kernels by name: they travel to NDIF
    dropped_gradients, first, head_attribution_scores, logit_diff, pair_delta, qk_fix)
from nnattr.pairs import Pairs, pairs

TITLE, UNITS = "AtP*", "estimated effect (metric)"
PARTS = ("query", "key", "value")


def trace(model, p: Pairs, *, grad_drop: bool, remote=False, backend=None) -> dict:
    """One session: the clean rows without gradients (their q, k, v), the corrupted rows with one backward
    (GradDrop: and one partial backward per layer); the QK fix per layer from the saved q, k, v."""
    n, n_heads, metric, mask = len(p), p.arch.n_heads, p.metric, p.overlap()
    answer, other = p.clean.answer("target"), p.clean.answer("distractor")
    last = {} if metric else {"logits_to_keep": 1}  # the default metric reads the last position only
    clean_in, corrupted_in = p.inputs_of(range(n), []), p.inputs_of([], range(n))
    with model.session(remote=remote, backend=backend):
        value = lambda logits: metric(logits).float() if metric else logit_diff(  # noqa: E731 [rows]
            logits, answer, other)
        with torch.no_grad(), model.trace(clean_in, **last):
            clean, z_clean = [], []  # per layer: (q, k, v) as attention reads them; the output projection's input
            for layer in model.layers:
                clean.append(layer.attn.source.attention_interface_1.inputs[0][1:4])
                z_clean.append(layer.attn.o_proj.input)
            clean_metric = value(model.output.logits)
        with model.trace(corrupted_in, **last):
            model.embed.output.requires_grad_(True)  # frozen hosted weights: start the graph here
            seen, z, writes, outs = [], [], [], []  # per layer: (q, k, v, mask, scaling); z; block write; output
            for layer in model.layers:
                start = layer.input
                args, kwargs = layer.attn.source.attention_interface_1.inputs
                seen.append([t.detach() for t in args[1:4]] + [args[4], kwargs.get("scaling")])
                z.append(layer.attn.o_proj.input)
                outs.append(first(layer.output))
                writes.append(outs[-1] - start)  # the layer's contribution to the residual stream
            values = value(model.output.logits)
            out = {"metric": torch.stack([clean_metric, values.detach()], 1).cpu()}  # [pair, clean / corrupted]
            runs = dropped_gradients(values.sum(), z, writes, outs, grad_drop=grad_drop)  # plain, then per layer
            parts, atp = [], []  # [run][layer]: [3, pair, head, pos]; plain AtP on each head's output
            for g_run in runs:
                parts.append([qk_fix(*s[:3], *c, g, s[3], scaling=s[4] if s[4] is not None else s[0].shape[-1] ** -0.5,
                                     overlap=mask) for s, c, g in zip(seen, clean, g_run)])
            for zc, zz, g in zip(z_clean, z, runs[0]):
                atp.append(head_attribution_scores(g, pair_delta(zc, zz.detach(), mask), n_heads=n_heads).sum(-1))
            out["parts"] = torch.stack(parts[0], 2).detach().cpu()  # [3, pair, layer, head, pos]
            out["atp"] = torch.stack(atp, 1).detach().cpu()  # [pair, layer, head]
            if grad_drop:  # [dropped layer, pair, layer, head]
                out["dropped"] = torch.stack([torch.stack(r, 2).sum((0, -1)) for r in parts[1:]]).detach().cpu()
            out = nnsight.save(out)
    return out


def run(model, clean, corrupted, answer=None, distractor=None, *, metric=None, grad_drop: bool = False,
        batch_size: int | None = None, remote=False, backend=None) -> dict:
    """AtP* per head, per pair: ``{"head", "query", "key", "value", "atp"}`` (see the module doc).

    answer: the clean prompt's answer token; distractor: subtract its logit.
    metric: a function of the logits [batch, pos, vocab] -> [batch], replacing the logit difference.
    grad_drop: GradDrop: average over layers the magnitude of the estimate with that layer's gradient dropped.
    """
    p = pairs(model, clean, corrupted, answer, distractor, metric=metric, nodes=("head", "head_pos"), align=None)
    p.arch.require_softmax(TITLE, instead="attribution_patching (plain AtP)")
    if not isinstance(grad_drop, bool) or grad_drop and p.arch.n_layers < 2:
        raise ValueError(f"grad_drop={grad_drop!r}: True or False (True needs 2 layers or more: it averages over them)")
    out = runner.run(trace, model, p, grad_drop=bool(grad_drop), batch_size=batch_size, remote=remote, backend=backend)
    parts, n = out["parts"], p.arch.n_layers
    total = out["dropped"].abs().sum(0) / (n - 1) if grad_drop else parts.sum((0, -1))
    meta = {"method": "atp*", "grad_drop": bool(grad_drop)}
    title = f"{TITLE} ({'QK fix + GradDrop, magnitudes' if grad_drop else 'QK fix'})"
    result = {}
    for i, name in enumerate(PARTS):  # each head's query / key / value, patched at each position
        r = p.results({"head": total, "head_pos": parts[i]}, out["metric"].T, method="atp_star", units=UNITS,
                      meta=meta, title=title)
        result["head"], result[name] = r["head"], dataclasses.replace(r["head_pos"], by=name, title=f"{TITLE}: {name}")
    plain = p.results({"head": out["atp"], "head_pos": parts[0]}, out["metric"].T, method="attribution_patching",
                      units=UNITS, title="Attribution patching (AtP), for comparison", meta={"method": "atp"})
    return {**result, "atp": plain["head"]}


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
