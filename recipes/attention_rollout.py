"""Attention rollout, per-head attention flow and value-weighted rollout.

view="rollout" (Abnar & Zuidema 2020): fuse heads, mix with the identity for the residual
    stream (``residual``), renormalise, and multiply through the layers:
    ``R = Â_{L-1} ... Â_0``. Returns ``[prompt, query, key]``.
view="value_weighted": the same rollout over patterns weighted by each key's value-vector norm
    (``norm``; Kobayashi et al. 2020 show raw weights overstate tokens with small values).
view="flow": per-head composition ``F_l = A_l F_{l-1}`` without head fusion; returns the last
    layer's ``[prompt, head, query, key]``.

The recipe streams: one layer's pattern is alive at a time, and padded keys (left padding)
receive no mass. It needs attention probabilities (eager attention). Remote: the reduction
runs on the server and one ``[query, key]`` matrix per prompt (per head for flow) comes back,
never the per-layer patterns.

    python -m nnattr.recipes.attention_rollout --prompt "..." --view rollout
"""

from __future__ import annotations

from typing import Literal

import nnsight
import torch

from nnattr.kernels import flow_step, rollout_step, split_values, value_weighted  # by name: docs/remote.md
from nnattr.arch import dims, spec_for
from nnattr.inputs import Prompts, as_prompts, check_unknown, map_chunks, tokens_of
from nnattr.loading import require_probabilities
from nnattr.result import Attribution

View = Literal["rollout", "value_weighted", "flow"]


def run(
    model,
    prompts: Prompts,
    *,
    view: View = "rollout",
    residual: float = 0.5,
    head_fusion: Literal["mean", "max", "min"] = "mean",
    norm: Literal["l1", "l2", "linf"] = "l2",
    batch_size: int | None = None,
    remote: bool = False,
    backend=None,
) -> Attribution:
    """Rollout-style attention maps, one per prompt (see module doc)."""
    if view not in ("rollout", "value_weighted", "flow"):
        raise ValueError(f"view={view!r}; expected 'rollout', 'value_weighted' or 'flow'")
    require_probabilities(model, f"attention {view}")
    spec, d = spec_for(model), dims(model)
    prompts = as_prompts(prompts)
    check_unknown(model.tokenizer, prompts)
    tokens = [tokens_of(model.tokenizer, p) for p in prompts]
    length = max(map(len, tokens))
    shape = (len(prompts), d.n_heads, length, length) if view == "flow" else (len(prompts), length, length)
    values = torch.full(shape, float("nan"))

    def step(start, chunk):
        lengths = [len(t) for t in tokens[start : start + len(chunk)]]
        width = max(lengths)
        key_mask = torch.arange(width)[None, :] >= torch.tensor([width - n for n in lengths])[:, None]
        return _trace(
            model, chunk, key_mask, view=view, residual=residual, head_fusion=head_fusion, norm=norm,
            layout=spec.value_layout, n_heads=d.n_heads, n_kv=d.n_kv_heads, d_head=d.d_head,
            remote=remote, backend=backend,
        )

    for start, chunk, maps in map_chunks(step, prompts, batch_size=batch_size, desc=f"attention {view}",
                                         model=model, remote=remote, backend=backend):
        lengths = [len(t) for t in tokens[start : start + len(chunk)]]
        for b, n in enumerate(lengths):
            values[start + b, ..., -n:, -n:] = maps[b, ..., -n:, -n:]

    positions = [str(p - length) for p in range(length)]
    labels = {"prompt": prompts, "query": positions, "key": positions}
    dim_names = ("prompt", "query", "key")
    if view == "flow":
        labels["head"] = [f"H{h}" for h in range(d.n_heads)]
        dim_names = ("prompt", "head", "query", "key")
    meta = {"method": f"attention_{view}", "residual": residual, "head_fusion": head_fusion, "norm": norm}
    return Attribution(values, dim_names, labels, meta, tuple(map(tuple, tokens)))


def _trace(model, prompts, key_mask, *, view, residual, head_fusion, norm, layout, n_heads, n_kv, d_head,
           remote, backend):
    with torch.no_grad(), model.trace(prompts, remote=remote, backend=backend):
        mask = key_mask.to(model.layers[0].input.device)
        state = None
        for layer in model.layers:
            if view == "value_weighted":
                values = split_values(layer.attn.v_proj.output, layout=layout, n_heads=n_heads,
                                      n_kv_heads=n_kv, d_head=d_head)  # [batch, key, kv_head, d_head]
            pattern = layer.attn.output[1]  # [batch, head, query, key]
            if view == "value_weighted":
                pattern = value_weighted(pattern, values, norm=norm)
            if view == "flow":
                state = flow_step(state, pattern, key_mask=mask)
            else:
                state = rollout_step(state, pattern, residual=residual, head_fusion=head_fusion, key_mask=mask)
        maps = nnsight.save(state.detach().cpu())
    return maps


def main(argv=None):
    from nnattr.cli import recipe_main

    return recipe_main("attention_rollout", argv)


if __name__ == "__main__":
    raise SystemExit(main())
