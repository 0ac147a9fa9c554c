"""Direct logit attribution: each residual write's share of the logit (or logit difference).

Elhage et al. 2021. Read at the last token or at ``position``; the final norm is exact: its scale is measured on
that pass and frozen, so the components plus ``bias`` sum to the logit (pre-soft-cap on Gemma-2). Wire: scores only.

by="component": embeddings, each layer's attention and MLP output, bias.     [prompt, component]
by="layer":     embeddings, each layer's attention + MLP, bias.               [prompt, layer]
by="head":      each head of ``layers`` (default all; the o_proj bias is left out).  [prompt, layer, head]
by="head_position": those heads split by the source position they read. [prompt, layer, head, position]
by="all":  embeddings, every head, each attention bias and MLP, bias: one list.    [prompt, component]

    python recipes/direct_logit_attribution.py --prompt "..." --target " Mary" --distractor " John" --by head
"""

from __future__ import annotations

from typing import Literal, Sequence

import nnsight
import torch

from nnattr import runner
from nnattr.batch import Batch
from nnattr.kernels import (  # kernels by name: they travel to NDIF
    bias_term, direct_logit, expand_kv, first, head_direct_logit, head_position_direct_logit, inverse_softcap,
    logit_diff, logit_direction, norm_scale, o_proj_per_head, read_at, residual_direction, split_heads, split_values)
from nnattr.result import Attribution, sum_error

TITLE, UNITS, ALIASES = "Direct logit attribution", "direct effect (logits)", ("dla",)


def trace(model, batch: Batch, *, by: str, layers: list, remote=False, backend=None) -> dict:
    """One forward: residual writes at the read position, through the frozen final norm; the heads of ``layers``."""
    a, target, other, at = batch.arch, batch.answer("target"), batch.answer("distractor"), batch.columns
    embeds, norm, offset, eps, cap = a.embeddings, a.norm, a.norm_weight_offset, a.eps, a.logit_softcap
    n_heads, n_kv, d_head, conv1d, layout = a.n_heads, a.n_kv_heads, a.d_head, a.o_proj_conv1d, a.value_layout
    inputs = batch.inputs
    with model.session(remote=remote, backend=backend):  # no_grad inside the session: it runs where the model does
        with torch.no_grad(), model.trace(inputs):
            z, W_O, rows, values = [], [], [], []
            writes = [read_at(first(getattr(model, name).output), at) for name in embeds]  # [batch, d_model] each
            for i, layer in enumerate(model.layers):
                if i in layers and by == "head_position":  # [batch, key, kv_head, d_head]
                    values.append(split_values(layer.attn.v_proj.output, layout=layout, n_heads=n_heads,
                                               n_kv_heads=n_kv, d_head=d_head))
                if i in layers and by in ("head", "head_position", "all"):  # z: [batch, head, d_head]
                    z.append(split_heads(read_at(layer.attn.o_proj.input, at), n_heads=n_heads))
                    W_O.append(o_proj_per_head(layer.attn.o_proj.weight, n_heads=n_heads, conv1d=conv1d))
                if i in layers and by == "head_position":
                    rows.append(read_at(layer.attn.output[1].transpose(1, 2), at))  # [batch, head, key]
                writes.append(read_at(first(layer.attn_out.output), at))
                writes.append(read_at(first(layer.mlp_out.output, len(at)), at))  # OPT's comes flattened
            scale = norm_scale(read_at(model.ln_f.input, at), norm=norm, eps=eps)  # measured on this pass, then frozen
            final = inverse_softcap(read_at(model.output.logits, at).float(), cap)  # [batch, vocab]
            answer = final.argmax(-1) if target is None else target.to(final.device)
            out = {"target": answer.cpu(), "logit": logit_diff(final[:, None], answer, other).cpu()}  # [batch] each
            direction, bias = logit_direction(model.lm_head.weight, answer, other, unembed_bias=model.lm_head.bias)
            u = residual_direction(direction, model.ln_f.weight, norm=norm, weight_offset=offset)
            if by == "head_position":  # [batch, kept layer, head, key]
                out["heads"] = torch.stack([head_position_direct_logit(r, expand_kv(v, n_heads=n_heads), w, u, scale)
                                            for r, v, w in zip(rows, values, W_O)], dim=1).cpu()
            elif by in ("head", "all"):  # [batch, kept layer, head]
                out["heads"] = torch.stack([head_direct_logit(h, w, u, scale) for h, w in zip(z, W_O)], dim=1).cpu()
            constant = bias_term(direction, bias, getattr(model.ln_f, "bias", None))  # [batch]
            out["scores"] = torch.cat([direct_logit(torch.stack(writes), u, scale), constant[None]]).T.cpu()
            out = nnsight.save(out)
    return out


def run(model, prompts, target=None, distractor=None, *,
        by: Literal["component", "layer", "head", "head_position", "all"] = "component",
        layers: Sequence[int] | None = None, position: int | Sequence[int] = -1, batch_size: int | None = None,
        remote=False, backend=None) -> Attribution:
    """DLA of the logit for ``target`` minus ``distractor``'s at one position (see the module doc).

    target: the answer token (default: the model's top prediction).
    distractor: subtract this token's logit (a logit difference).
    by: component, layer, head, head and source position, or all of them in one list.
    layers: by head or head_position: only these layers' heads (default all; -1 the last).
    position: the token whose logit is read: -1 the last, 0 the first; one per prompt, or one for all.
    """
    if by not in ("component", "layer", "head", "head_position", "all"):
        raise ValueError(f"by={by!r}; expected 'component', 'layer', 'head', 'head_position' or 'all'")
    if layers is not None and by not in ("head", "head_position"):  # the other results add up to the logit
        raise ValueError(f"layers= is for by='head' or 'head_position'; by={by!r} sums every layer (and is small)")
    batch, per_head = Batch.of(model, prompts, target, distractor).at(position), by in ("head", "head_position", "all")
    a, n, e, kept = batch.arch, batch.arch.n_layers, len(batch.arch.embeddings), batch.arch.pick(layers)
    a.require(f"DLA by {by.replace('_', ' and ')}", exact_heads=per_head, probabilities=by == "head_position")
    out = runner.run(trace, model, batch, by=by, layers=kept, batch_size=batch_size, remote=remote, backend=backend)
    batch.check_answers(out["target"])  # the model's own top prediction may be the distractor
    error = sum_error(out["scores"], out["logit"], what="DLA's components")  # the identity, measured on this run
    names, heads, labels = [f"L{i}" for i in kept], [f"H{h}" for h in range(a.n_heads)], {"prompt": batch.labels}
    if by in ("head", "head_position"):  # [prompt, layer, head(, position)]: the kept layers
        scores, positions = out["heads"], [str(p - batch.width) for p in range(batch.width)]
        labels.update(layer=names, head=heads, **({"position": positions} if by == "head_position" else {}))
    else:
        writes = out["scores"][:, e:-1].unflatten(1, (n, 2))  # [prompt, layer, attention | MLP]
        writes = writes.sum(-1) if by == "layer" else writes
        if by == "all":  # each layer: its heads, the rest of its attention write (the bias), its MLP
            writes = torch.cat([out["heads"], writes[..., :1] - out["heads"].sum(-1)[..., None], writes[..., 1:]], -1)
        scores = torch.cat([out["scores"][:, :e], writes.flatten(1), out["scores"][:, -1:]], 1)
        labels["layer" if by == "layer" else "component"] = [*a.embeddings, *{
            "component": [f"{i}_{p}_out" for i in range(n) for p in ("attn", "mlp")], "layer": names,
            "all": [f"L{i}{x}" for i in range(n) for x in [*heads, " attn bias", " MLP"]]}[by], "bias"]
    meta = {"logit_kind": "pre-softcap logit" if a.logit_softcap else "logit", "read_at": batch.read_at,
            "sum_error": max(error), **({} if layers is None else {"layers": kept})}
    per_prompt = {"target": batch.decode(out["target"]), "logit": out["logit"].tolist(), "sum_error": error,
                  "position": list(batch.positions), "read_token": list(batch.read_tokens),
                  **({} if batch.distractor is None else {"distractor": batch.decode(batch.distractor)})}
    return Attribution(scores, tuple(labels), labels, method="direct_logit_attribution", by=by, units=UNITS,
                       title=f"{TITLE} by {by.replace('_', ' and ').replace('all', 'head, MLP and bias')}",
                       tokens=batch.tokens, metric=batch.metric(out["target"]), meta=meta, per_prompt=per_prompt)


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
