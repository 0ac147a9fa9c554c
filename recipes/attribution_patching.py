"""Attribution patching: the gradient estimate of activation patching, for every node at once.

Nanda 2023; Syed et al. 2023. For clean/corrupted pairs and a metric ``m`` (default: logit of
``answer`` minus ``distractor`` at the last position), the effect of patching node ``a`` from
the clean run into the corrupted run is estimated as
``grad_a m(corrupted) . (a_clean - a_corrupted)``: a forward of the clean prompts without
gradients, then a forward and one backward of the corrupted prompts score every node of every
pair. ``method="ig"`` averages the gradient over ``steps`` points between the corrupted and
clean input embeddings instead (EAP-IG, Hanna et al. 2024): ``steps`` rows per pair.

Node types (``nodes=``) and result dimensions: see `nnattr.pairs`. Values are in metric units;
``per_prompt`` holds each pair's clean and corrupted metric. Pairs of unequal length are
compared on the positions both prompts have, aligned at the last token; per-position node
types refuse them unless ``align="right"``. Works on frozen (hosted) models. Wire: only scores and metrics return.

    python recipes/attribution_patching.py --clean "..." --corrupted "..." --answer " Mary" --distractor " John"
"""

from __future__ import annotations

from typing import Literal, Sequence

import nnsight
import torch

from nnattr import runner
from nnattr.kernels import (  # kernels by name: they travel to NDIF
    attribution_scores, first, gradients, head_attribution_scores, interpolate, logit_diff, pair_delta, path_gradient)
from nnattr.pairs import DEFAULT_NODES, Node, Pairs, count, pairs
from nnattr.result import Attribution

TITLE, UNITS = "Attribution patching", "estimated effect (metric)"


def trace(model, p: Pairs, *, steps: int, remote=False, backend=None) -> dict:
    """One session: the clean rows (IG: and the corrupted) without gradients, then the rows the
    gradient is taken at (AtP: corrupted; IG: ``steps`` copies on the path) and one backward."""
    n, sites, n_heads, metric, mask = len(p), p.sites(), p.arch.n_heads, p.metric, p.overlap()
    answer, other, alphas = p.clean.answer("target"), p.clean.answer("distractor"), (torch.arange(steps) + 0.5) / steps
    last = {} if metric else {"logits_to_keep": 1}  # the default metric reads the last position only
    plain, path = p.inputs_of(range(n), range(n) if steps else []), p.inputs_of([], list(range(n)) * max(steps, 1))
    copy = p.arch.writes_in_place  # Falcon adds attention into its MLP's output in place: keep copies of writes
    with model.session(remote=remote, backend=backend):
        value = lambda logits, k: metric(logits).float() if metric else logit_diff(  # noqa: E731 [rows]
            logits, answer.repeat(k), None if other is None else other.repeat(k))
        with torch.no_grad(), model.trace(plain, **last):
            emb = model.embed.output if steps else None  # IG: [clean, corrupted, pos, d_model]
            base = {site: [] for site in sites}  # [clean (, corrupted), pos, width] per layer, in forward order
            for layer in model.layers:
                if "resid" in sites:
                    base["resid"].append(layer.input)
                if "head" in sites:
                    base["head"].append(layer.attn.o_proj.input)
                for site, write in (("attn", layer.attn_out), ("mlp", layer.mlp_out)):
                    if site in sites:  # [rows, pos, d_model] (OPT's MLP write comes flattened: first unflattens it)
                        w = first(write.output, len(plain["input_ids"]))
                        base[site].append(w.clone() if copy else w)
            base_metric = value(model.output.logits, 1 + (steps > 0))  # [clean (, corrupted)]
        with model.trace(path, **last):
            if steps:  # the path from corrupted to clean, in the input embeddings
                model.embed.output = interpolate(emb[:n], emb[n:], mask, alphas).requires_grad_(True)  # midpoints
            else:
                model.embed.output.requires_grad_(True)  # frozen hosted weights: start the graph here
            acts, now = {site: [] for site in sites}, {"attn": [], "mlp": []}  # now: attn / mlp values as read
            for layer in model.layers:
                if "resid" in sites:
                    acts["resid"].append(layer.input)
                if "head" in sites:
                    acts["head"].append(layer.attn.o_proj.input)
                for site, write in (("attn", layer.attn_out), ("mlp", layer.mlp_out)):
                    if site in sites:  # the write for the gradient, and its value as read (a copy: Falcon)
                        acts[site].append(first(write.output))
                        w = acts[site][-1].detach()
                        now[site].append(first(w.clone() if copy else w, len(path["input_ids"])))
            values = value(model.output.logits, max(steps, 1))  # [rows]
            grads = iter(gradients(values.sum(), [a for site in sites for a in acts[site]]))
            corrupted = base_metric[n:] if steps else values.detach()  # the corrupted rows' metric
            out = {"metric": torch.stack([base_metric[:n], corrupted], 1).cpu()}  # [pair, clean / corrupted]
            for site, keep in sites.items():
                scores = []
                for plain_act, act in zip(base[site], now.get(site, acts[site])):  # no-grad pass's, this pass's
                    delta = pair_delta(plain_act[:n], plain_act[n:] if steps else act, mask)
                    grad = path_gradient(next(grads).view_as(act), steps=steps)  # shaped as the write was read
                    s = head_attribution_scores(grad, delta, n_heads=n_heads) if site == "head" else \
                        attribution_scores(grad, delta)  # [pair, (head,) pos]
                    scores.append(s if keep else s.sum(-1))
                out[site] = torch.stack(scores, dim=1).detach().cpu()  # [pair, layer, (head,) (pos)]
            out = nnsight.save(out)
    return out


def run(model, clean, corrupted, answer=None, distractor=None, *, metric=None,
        nodes: Sequence[Node] = DEFAULT_NODES, method: Literal["atp", "ig"] = "atp", steps: int | None = None,
        align: Literal["right"] | None = None, batch_size: int | None = None, remote=False,
        backend=None) -> dict[str, Attribution]:
    """Estimated effect of patching each node, per pair: ``{node type: Attribution}``.

    answer: the clean prompt's answer token; distractor: subtract its logit.
    metric: a function of the logits [batch, pos, vocab] -> [batch], replacing the logit difference.
    nodes: node types to score.
    method: plain gradient (atp) or integrated gradients (ig).
    steps: interpolation steps for method=ig (default 5).
    align: "right" compares pairs of unequal length per position, aligned at the last token.
    """
    if method not in ("atp", "ig") or (method == "atp" and steps is not None):
        raise ValueError(f"method={method!r}, steps={steps}: expected 'atp' (no steps), or 'ig' with steps >= 1")
    m = count(steps, "steps", default=5) if method == "ig" else 0
    p = pairs(model, clean, corrupted, answer, distractor, metric=metric, nodes=nodes, align=align)
    out = runner.run(trace, model, p, steps=m, batch_size=batch_size, remote=remote, backend=backend)
    title = f"{TITLE} (EAP-IG, {m} steps)" if m else f"{TITLE} (AtP)"
    return p.results(out, out["metric"].T, method="attribution_patching", title=title, units=UNITS,
                     meta={"method": method, **({"steps": m} if m else {}), **({"align": align} if align else {})})


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
