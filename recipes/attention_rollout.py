"""Attention rollout, value-weighted rollout and per-head attention flow.

view="rollout" (Abnar & Zuidema 2020): fuse heads (``head_fusion``), mix with the identity for
    the residual stream (``residual``, default 0.5), renormalise, multiply through the layers:
    ``R = Â_{L-1} ... Â_0``. ``[prompt, query, key]``.
view="value_weighted": the same rollout over patterns weighted by each key's value-vector norm
    (``norm``; Kobayashi et al. 2020: raw weights overstate tokens with small values).
view="flow": per-head composition ``F_l = Â_l F_{l-1}`` without head fusion (``residual``
    default 0); the last layer's ``[prompt, head, query, key]``.

Streams: one layer's pattern is alive at a time; padded keys get no mass. Needs attention
probabilities (eager attention). Wire: one map per prompt (per head for flow) comes back,
never the per-layer patterns.

    python recipes/attention_rollout.py --prompt "..." --view rollout
"""

from __future__ import annotations

from typing import Literal

import nnsight
import torch

from nnattr import runner
from nnattr.batch import Batch
from nnattr.kernels import flow_step, rollout_step, split_values, value_weighted  # by name: they travel to NDIF
from nnattr.result import Attribution

TITLE, UNITS, ALIASES = "Attention rollout", "rollout weight", ("rollout",)


def trace(model, batch: Batch, *, view: str, residual: float, head_fusion: str | None, norm: str | None,
          remote=False, backend=None) -> dict:
    """One forward; the rollout (or flow) state is updated layer by layer."""
    a, inputs = batch.arch, batch.inputs
    key_mask = inputs["attention_mask"].bool()  # [batch, key]
    layout, n_heads, n_kv, d_head = a.value_layout, a.n_heads, a.n_kv_heads, a.d_head
    with model.session(remote=remote, backend=backend):  # no_grad inside the session: it runs where the model does
        with torch.no_grad(), model.trace(inputs):
            mask, state = key_mask.to(model.layers[0].input.device), None
            for layer in model.layers:
                if view == "value_weighted":  # [batch, key, kv_head, d_head]
                    values = split_values(layer.attn.v_proj.output, layout=layout, n_heads=n_heads, n_kv_heads=n_kv,
                                          d_head=d_head)
                pattern = layer.attn.output[1]  # [batch, head, query, key]
                if view == "value_weighted":
                    pattern = value_weighted(pattern, values, norm=norm)
                if view == "flow":
                    state = flow_step(state, pattern, residual=residual, key_mask=mask)
                else:
                    state = rollout_step(state, pattern, residual=residual, head_fusion=head_fusion, key_mask=mask)
            maps = nnsight.save({"maps": state.detach().cpu()})
    return maps


def run(model, prompts, *, view: Literal["rollout", "value_weighted", "flow"] = "rollout",
        residual: float | None = None, head_fusion: Literal["mean", "max", "min"] | None = None,
        norm: Literal["l1", "l2", "linf"] | None = None, batch_size: int | None = None, remote=False,
        backend=None) -> Attribution:
    """One attention map per prompt (per head for flow); see the module doc.

    view: rollout, value-weighted rollout, or per-head flow.
    residual: identity weight mixed into every layer (default 0.5; 0 for flow).
    head_fusion: how heads are fused for rollout views (default mean).
    norm: value-vector norm for view=value_weighted (default l2).
    """
    if view not in ("rollout", "value_weighted", "flow"):
        raise ValueError(f"view={view!r}; expected 'rollout', 'value_weighted' or 'flow'")
    if view == "flow" and head_fusion is not None:
        raise ValueError("head_fusion does not apply to view='flow', which keeps every head")
    if view != "value_weighted" and norm is not None:
        raise ValueError(f"norm applies to view='value_weighted' only, not view={view!r}")
    if residual is not None and not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual={residual}: the identity's weight must lie in [0, 1]")
    used = {"view": view, "residual": (0.0 if view == "flow" else 0.5) if residual is None else float(residual)}
    if view != "flow":
        used["head_fusion"] = head_fusion or "mean"
    if view == "value_weighted":
        used["norm"] = norm or "l2"
    batch = Batch.of(model, prompts)
    batch.arch.require_probabilities(f"attention {view}")
    out = runner.run(trace, model, batch, view=view, residual=used["residual"], head_fusion=used.get("head_fusion"),
                     norm=used.get("norm"), batch_size=batch_size, remote=remote, backend=backend)
    positions = [str(p - batch.width) for p in range(batch.width)]
    labels = {"prompt": batch.labels, "query": positions, "key": positions}
    if view == "flow":
        labels = {"prompt": batch.labels, "head": [f"H{h}" for h in range(batch.arch.n_heads)], **labels}
    title = {"rollout": TITLE, "value_weighted": "Value-weighted attention rollout",
             "flow": "Attention flow (per head, last layer)"}[view]
    return Attribution(out["maps"], tuple(labels), labels, method="attention_rollout", title=title, by=view,
                       units="flow weight" if view == "flow" else UNITS, meta={**used, **batch.arch.sink_meta},
                       tokens=batch.tokens)


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
