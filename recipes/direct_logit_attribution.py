"""Direct logit attribution: each residual write's share of the logit (or logit difference).

Elhage et al. 2021. The final norm is exact: its scale is measured on the real forward pass and
frozen, so the components plus ``bias`` sum to the model's logit (pre-soft-cap on Gemma-2).

by="component": embeddings, each layer's attention and MLP output, bias.     [prompt, component]
by="layer":     embeddings, each layer's attention + MLP, bias.               [prompt, layer]
by="head":      each head (the output projection's bias is left out).          [prompt, layer, head]
by="head_position": each head split by the source position it reads.   [prompt, layer, head, position]
Wire: only the scores come back; the residual writes stay on the server.

    python recipes/direct_logit_attribution.py --prompt "..." --target " Mary" --distractor " John" --by head
"""

from __future__ import annotations

from typing import Literal

import nnsight
import torch

from nnattr import runner
from nnattr.batch import Batch
from nnattr.kernels import (  # kernels by name: they travel to NDIF
    bias_term, direct_logit, expand_kv, first, head_direct_logit, head_position_direct_logit, inverse_softcap,
    logit_direction, norm_scale, o_proj_per_head, residual_direction, split_heads, split_values,
)
from nnattr.result import Attribution

TITLE, UNITS, ALIASES = "Direct logit attribution", "direct effect (logits)", ("dla",)


def trace(model, batch: Batch, *, by: str, remote=False, backend=None) -> dict:
    """One forward: residual writes at the last position, read through the frozen final norm."""
    a, target, other = batch.arch, batch.answer("target"), batch.answer("distractor")
    embeds, norm, offset, eps, cap = a.embeddings, a.norm, a.norm_weight_offset, a.eps, a.logit_softcap
    n_heads, n_kv, d_head, conv1d, layout = a.n_heads, a.n_kv_heads, a.d_head, a.o_proj_conv1d, a.value_layout
    heads, positions = by in ("head", "head_position"), by == "head_position"
    with torch.no_grad(), model.trace(batch.inputs, remote=remote, backend=backend):
        writes = [first(getattr(model, name).output)[:, -1] for name in embeds]  # [batch, d_model] each
        z, W_O, rows, values = [], [], [], []
        for layer in model.layers:
            if positions:  # [batch, key, kv_head, d_head]
                values.append(split_values(layer.attn.v_proj.output, layout=layout, n_heads=n_heads,
                                           n_kv_heads=n_kv, d_head=d_head))
            if heads:
                z.append(split_heads(layer.attn.o_proj.input[:, -1], n_heads=n_heads))  # [batch, head, d_head]
                W_O.append(o_proj_per_head(layer.attn.o_proj.weight, n_heads=n_heads, conv1d=conv1d))
            if positions:
                rows.append(layer.attn.output[1][:, :, -1])  # [batch, head, key]
            writes.append(first(layer.attn_out.output)[:, -1])
            writes.append(first(layer.mlp_out.output)[:, -1])
        resid = model.ln_f.input[:, -1]  # [batch, d_model]
        final = model.output.logits[:, -1].float()  # [batch, vocab]
        answer = final.argmax(-1) if target is None else target.to(final.device)
        other = None if other is None else other.to(final.device)
        direction, bias = logit_direction(model.lm_head.weight, answer, other, unembed_bias=model.lm_head.bias)
        u = residual_direction(direction, model.ln_f.weight, norm=norm, weight_offset=offset)
        scale = norm_scale(resid, norm=norm, eps=eps)  # measured on this pass, then frozen
        if positions:  # [batch, layer, head, key]
            scores = torch.stack([head_position_direct_logit(r, expand_kv(v, n_heads=n_heads), w, u, scale)
                                  for r, v, w in zip(rows, values, W_O)], dim=1)
        elif heads:
            scores = torch.stack([head_direct_logit(h, w, u, scale) for h, w in zip(z, W_O)], dim=1)
        else:  # broadcast: GPT-2's position embedding is [1, d_model] when no row is padded
            writes = torch.stack(torch.broadcast_tensors(*writes))  # [component, batch, d_model]
            constant = bias_term(direction, bias, getattr(model.ln_f, "bias", None))  # [batch]
            scores = torch.cat([direct_logit(writes, u, scale), constant[None]]).T  # [batch, component]
        logit = inverse_softcap(final, cap).gather(-1, answer[:, None])[:, 0]
        if other is not None:
            logit = logit - inverse_softcap(final, cap).gather(-1, other[:, None])[:, 0]
        out = nnsight.save({"scores": scores.detach().cpu(), "target": answer.cpu(), "logit": logit.detach().cpu()})
    return out


def run(model, prompts, target=None, distractor=None, *,
        by: Literal["component", "layer", "head", "head_position"] = "component",
        batch_size: int | None = None, remote=False, backend=None) -> Attribution:
    """DLA of the last token's logit for ``target`` minus ``distractor``'s (see the module doc).

    target: the answer token (default: the model's top prediction).
    distractor: subtract this token's logit (a logit difference).
    by: component, layer, head, or head and source position.
    """
    if by not in ("component", "layer", "head", "head_position"):
        raise ValueError(f"by={by!r}; expected 'component', 'layer', 'head' or 'head_position'")
    batch = Batch.of(model, prompts, target, distractor)
    if by in ("head", "head_position"):
        batch.arch.require_exact_heads(f"DLA by {by}")
    if by == "head_position":
        batch.arch.require_probabilities("DLA by head and position")
    out = runner.run(trace, model, batch, by=by, batch_size=batch_size, remote=remote, backend=backend)
    batch.check_answers(out["target"])  # the model's own top prediction may be the distractor
    a, scores, embeds = batch.arch, out["scores"], list(batch.arch.embeddings)
    layers, labels = [f"L{i}" for i in range(a.n_layers)], {"prompt": batch.labels}
    if by == "component":
        labels["component"] = [*embeds, *(f"{i}_{p}_out" for i in range(a.n_layers) for p in ("attn", "mlp")), "bias"]
    elif by == "layer":  # attention + MLP of each layer
        e = len(embeds)
        scores = torch.cat([scores[:, :e], scores[:, e:-1].unflatten(1, (a.n_layers, 2)).sum(-1), scores[:, -1:]], 1)
        labels["layer"] = embeds + layers + ["bias"]
    else:
        labels.update(layer=layers, head=[f"H{h}" for h in range(a.n_heads)])
        if by == "head_position":
            labels["position"] = [str(p - batch.width) for p in range(batch.width)]
    return Attribution(
        scores, tuple(labels), labels, method="direct_logit_attribution", by=by, units=UNITS,
        title=f"{TITLE} by {by.replace('_', ' and ')}", metric=batch.metric(out["target"]), tokens=batch.tokens,
        meta={"logit_kind": "pre-softcap logit" if a.logit_softcap else "logit"},
        per_prompt={"target": batch.decode(out["target"]), "logit": out["logit"].tolist(),
                    **({} if batch.distractor is None else {"distractor": batch.decode(batch.distractor)})},
    )


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
