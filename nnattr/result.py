"""One result type for every attribution: values with named, labelled dimensions."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .kernels.lens import topk_flat


@dataclass(frozen=True)
class Attribution:
    """Values, the names of their dimensions, and labels aligned with each dimension.

    Recipes return one ``Attribution`` whose first dimension is ``"prompt"`` (one row per
    prompt, even for a single prompt). Position dimensions of a batch are aligned to the
    right, as the model sees a left-padded batch: the entries of padding are NaN, and
    ``tokens`` holds each prompt's own token strings. ``result[i]`` is prompt ``i`` on its own
    (padding stripped, positions labelled by its tokens); ``result.mean()`` averages over
    prompts.

    >>> a = Attribution(torch.tensor([[1.0, -3.0]]), ("prompt", "component"),
    ...                 {"prompt": ["p"], "component": ["embed", "0_attn_out"]})
    >>> a.top(1)
    [(('p', '0_attn_out'), -3.0)]
    """

    values: torch.Tensor
    dims: tuple[str, ...]
    labels: Mapping[str, list[str]]
    meta: Mapping[str, Any] = field(default_factory=dict)
    tokens: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self):
        if len(self.dims) != self.values.ndim:
            raise ValueError(f"dims {self.dims} do not match values of shape {tuple(self.values.shape)}")
        for i, dim in enumerate(self.dims):
            labels = self.labels.get(dim)
            if labels is None or len(labels) != self.values.shape[i]:
                got = None if labels is None else len(labels)
                raise ValueError(f"dimension {dim!r} has size {self.values.shape[i]} but {got} labels")
        object.__setattr__(self, "labels", {d: list(self.labels[d]) for d in self.dims})
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, i: int) -> "Attribution":
        """Prompt ``i`` alone: the ``prompt`` dimension dropped, its padding stripped."""
        if self.dims[0] != "prompt":
            raise TypeError(f"indexing selects a prompt, but this result has dims {self.dims}")
        values = self.values[i]
        dims = self.dims[1:]
        labels = {d: self.labels[d] for d in dims}
        if self.tokens is not None:
            toks = list(self.tokens[i])
            width = max(map(len, self.tokens))
            for axis, dim in enumerate(dims):
                # Position axes spanning the padded batch are stripped; a subset (the last) is kept.
                if dim in ("position", "key", "query") and values.shape[axis] == width:
                    values = values.narrow(axis, values.shape[axis] - len(toks), len(toks))
                    labels[dim] = [f"{j}:{t}" for j, t in enumerate(toks)]
        meta = {k: (v[i] if isinstance(v, (list, tuple)) and len(v) == len(self) else v) for k, v in self.meta.items()}
        return Attribution(values, dims, labels, meta)

    def mean(self) -> "Attribution":
        """The average over prompts (NaN padding ignored)."""
        if self.dims[0] != "prompt":
            raise TypeError(f"mean averages over prompts, but this result has dims {self.dims}")
        values = self.values.float().nanmean(0)
        dims = self.dims[1:]
        meta = {k: v for k, v in self.meta.items() if not (isinstance(v, (list, tuple)) and len(v) == len(self))}
        meta["n_prompts"] = len(self)
        return Attribution(values, dims, {d: self.labels[d] for d in dims}, meta)

    def single(self) -> "Attribution":
        """The one prompt of a one-prompt result, or the mean of many: what plots show."""
        if self.dims and self.dims[0] == "prompt":
            return self[0] if len(self) == 1 else self.mean()
        return self

    def top(self, k: int = 10, *, absolute: bool = True) -> list[tuple[tuple[str, ...], float]]:
        """The ``k`` largest entries (by magnitude when ``absolute``) as ``(labels, value)``."""
        values, index = topk_flat(self.values, k, absolute=absolute)
        return [
            (tuple(self.labels[d][int(j)] for d, j in zip(self.dims, row)), float(v))
            for v, row in zip(values, index)
            if not math.isnan(v)  # fewer than k real entries: padding never fills the list
        ]

    def to_dict(self) -> dict[str, Any]:
        """Plain Python: lists, strings and floats (NaN as None), ready for ``json.dump``."""

        def clean(x):
            if isinstance(x, list):
                return [clean(v) for v in x]
            return None if isinstance(x, float) and math.isnan(x) else x

        return {
            "dims": list(self.dims),
            "labels": {d: list(v) for d, v in self.labels.items()},
            "values": clean(self.values.detach().cpu().double().tolist()),
            "meta": {k: _plain(v) for k, v in self.meta.items()},
            "tokens": None if self.tokens is None else [list(t) for t in self.tokens],
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per entry (``{dim: label, ..., "value": v}``): ``pandas.DataFrame(records)``."""
        out = []
        for index in torch.cartesian_prod(*[torch.arange(n) for n in self.shape]).reshape(-1, self.values.ndim):
            row = {d: self.labels[d][int(j)] for d, j in zip(self.dims, index)}
            row["value"] = float(self.values[tuple(index.tolist())])
            out.append(row)
        return out

    def plot(self, ax=None, **kwargs):
        """Draw the result (heatmap, bars or token strip, chosen by its dimensions); returns the figure."""
        from .plotting import plot

        return plot(self, ax=ax, **kwargs)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.shape))
        method = self.meta.get("method", "attribution")
        return f"Attribution({method}: {sizes})"


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)
