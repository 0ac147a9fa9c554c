"""Attention views: each chosen layer's per-head attention maps, raw or re-weighted.

view="patterns": the attention probabilities ``A_{l,h}``; each row sums to 1 over the prompt's keys.
view="value_weighted": ``A_{l,h,q,k} · ‖v_{l,h,k}‖`` (``norm`` l1, l2 or linf), rows renormalised:
    Kobayashi et al. 2020 without ``W_O``. Next to the raw patterns it shows attention sinks:
    keys with much weight but small values (often the first token).
view="norm_based": ``‖α_{l,h,q,k} v_{l,h,k} W_O^h‖₂`` (Kobayashi et al. 2020): the size of what each key
    writes through the head, in residual-stream units, not renormalised.
view="flow": per-head flow ``F_{l,h} = Â_{l,h} F_{l-1,h}`` (``Â``: mixed with ``residual`` · I and
    renormalised), at every chosen layer.

Returns ``[prompt, layer, head, query, key]`` for ``layers`` and ``heads`` (default: all). Needs
attention probabilities (eager attention); padded keys and queries are NaN. Wire: only the chosen
layers × heads come back, reduced on the server.

    python recipes/attention_views.py --prompt "..." --view value_weighted --layers 2 --heads 0 1
"""

from __future__ import annotations

from typing import Literal, Sequence

import nnsight
import torch

from nnattr import runner
from nnattr.batch import Batch
from nnattr.kernels import flow_step, norm_based, o_proj_per_head, split_values, value_weighted  # travel by name
from nnattr.result import Attribution

TITLE, UNITS = "Attention", "attention weight"


def trace(model, batch: Batch, *, view: str, layers: list, heads: list, norm: str | None, residual: float,
          remote=False, backend=None) -> dict:
    """One forward; each chosen layer's patterns, re-weighted as the view asks, cut to the chosen heads."""
    a, inputs = batch.arch, batch.inputs
    key_mask = inputs["attention_mask"].bool()  # [batch, key]
    layout, n_heads, n_kv, d_head, conv1d = a.value_layout, a.n_heads, a.n_kv_heads, a.d_head, a.o_proj_conv1d
    wanted, last = torch.tensor(heads), max(layers)
    with model.session(remote=remote, backend=backend):  # no_grad inside the session: it runs where the model does
        with torch.no_grad(), model.trace(inputs):
            mask, state, maps = key_mask.to(model.layers[0].input.device), None, []
            for i in range(last + 1):  # forward order; flow needs every layer up to the last one asked
                layer = model.layers[i]
                if view in ("value_weighted", "norm_based") and i in layers:  # [batch, key, kv_head, d_head]
                    values = split_values(layer.attn.v_proj.output, layout=layout, n_heads=n_heads, n_kv_heads=n_kv,
                                          d_head=d_head)
                if view != "flow" and i not in layers:
                    continue
                pattern = layer.attn.output[1]  # [batch, head, query, key]
                if view == "value_weighted":
                    pattern = value_weighted(pattern, values, norm=norm, key_mask=mask)
                elif view == "norm_based":
                    W_O = o_proj_per_head(layer.attn.o_proj.weight, n_heads=n_heads, conv1d=conv1d)
                    pattern = norm_based(pattern, values, W_O, key_mask=mask)
                elif view == "flow":
                    pattern = state = flow_step(state, pattern, residual=residual, key_mask=mask)
                if i in layers:
                    maps.append(pattern[:, wanted.to(pattern.device)].float())  # [batch, head, query, key]
            out = nnsight.save({"maps": torch.stack(maps, dim=1).detach().cpu()})  # [batch, layer, head, q, k]
    return out


def run(model, prompts, *, view: Literal["patterns", "value_weighted", "norm_based", "flow"] = "patterns",
        layers: Sequence[int] | None = None, heads: Sequence[int] | None = None,
        norm: Literal["l1", "l2", "linf"] | None = None, residual: float | None = None,
        batch_size: int | None = None, remote=False, backend=None) -> Attribution:
    """Per-head attention maps ``[prompt, layer, head, query, key]`` (see the module doc).

    view: raw patterns, value-weighted patterns, norm-based contributions, or per-head flow.
    layers: layer indices to return (default all; negative counts from the end).
    heads: head indices to return (default all).
    norm: value-vector norm for view=value_weighted (default l2).
    residual: identity weight mixed in for view=flow (default 0).
    """
    if view not in ("patterns", "value_weighted", "norm_based", "flow"):
        raise ValueError(f"view={view!r}; expected 'patterns', 'value_weighted', 'norm_based' or 'flow'")
    if (norm is not None and view != "value_weighted") or (residual is not None and view != "flow"):
        raise ValueError(f"view={view!r}: norm applies to view='value_weighted' only, residual to view='flow' only")
    if residual is not None and not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual={residual}: the identity's weight must lie in [0, 1]")
    batch = Batch.of(model, prompts)
    a = batch.arch
    a.require_probabilities(f"attention view {view!r}")
    layers, heads = _indices(layers, a.n_layers, "layers"), _indices(heads, a.n_heads, "heads")
    used = {"view": view, **({"norm": norm or "l2"} if view == "value_weighted" else {}),
            **({"residual": float(residual or 0.0)} if view == "flow" else {})}
    out = runner.run(trace, model, batch, view=view, layers=layers, heads=heads, norm=used.get("norm"),
                     residual=used.get("residual", 0.0), batch_size=batch_size, remote=remote, backend=backend)
    positions = [str(p - batch.width) for p in range(batch.width)]
    labels = {"prompt": batch.labels, "layer": [f"L{i}" for i in layers], "head": [f"H{h}" for h in heads],
              "query": positions, "key": positions}
    title = TITLE + {"patterns": ": patterns", "value_weighted": ": value-weighted", "norm_based": ": norm-based "
                     "‖α v W_O‖", "flow": ": per-head flow"}[view]
    units = "residual-stream norm" if view == "norm_based" else "flow weight" if view == "flow" else UNITS
    return Attribution(out["maps"], tuple(labels), labels, method="attention_views", title=title, by=view,
                       units=units, meta={**used, "layers": layers, "heads": heads}, tokens=batch.tokens)


def _indices(given, n: int, name: str) -> list[int]:
    """Sorted, distinct indices in [0, n) from ``given`` (None: all; negative: from the end)."""
    if given is None:
        return list(range(n))
    picked = [i + n if isinstance(i, int) and -n <= i < 0 else i for i in given]
    if not picked or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n for i in picked):
        raise ValueError(f"{name}={list(given)}: give indices from {-n} to {n - 1} (the model has {n} {name})")
    return sorted(set(picked))


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
