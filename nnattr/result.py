"""One result type for every attribution: values with named, labelled dimensions.

Structure is kept as structure: layer and head are dimensions (never ``"L3H7"`` strings), the
method, its resolution (``by``), the units and the metric are fields, per-prompt facts are lists
in ``per_prompt``, and padding is known from each prompt's ``tokens``, never guessed from a shape.
"""

from __future__ import annotations

import html
import json
import math
import numbers
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping

import torch

from .kernels.lens import topk_flat

#: Dimensions that index a prompt's tokens. In a batch they span the longest prompt, aligned
#: to the right (as the model sees a left-padded batch); a shorter prompt's padding is NaN.
POSITION_DIMS = ("position", "query", "key")


#: A decomposition whose parts miss their whole by more than this share of max(1, |whole|) is
#: reported (`sum_error`). float32 runs stay near 1e-7 of it; bf16 and fp16 models land near 1e-3,
#: because they round the residual stream at every addition and the logit itself.
SUM_TOLERANCE = 1e-4


class PrecisionWarning(UserWarning):
    """A decomposition that should be exact misses its total on this run (low-precision arithmetic)."""


def sum_error(parts: torch.Tensor, whole: torch.Tensor, *, what: str) -> list[float]:
    """``|Σ parts − whole|`` per prompt (``parts: [prompt, part]``, ``whole: [prompt]``), measured on
    the run; a `PrecisionWarning` names the prompts above `SUM_TOLERANCE` × max(1, |whole|)."""
    error = (parts.double().sum(-1) - whole.double()).abs()
    over = (error > SUM_TOLERANCE * whole.double().abs().clamp(min=1)).nonzero().flatten().tolist()
    if over:
        i = over[0]
        warnings.warn(
            f"{what} miss the model's own value by {error[i]:.2g} on prompt {i} (sum {float(parts[i].sum()):+.5g}, "
            f"model {float(whole[i]):+.5g}; {len(over)} of {len(error)} prompts above {SUM_TOLERANCE:g} × max(1, "
            f"|value|)): low-precision arithmetic (bf16 or fp16 weights, or a server's autocast) rounds the residual "
            f"stream at every addition, and the value itself. Load the model in float32 for sums exact to ~1e-6; "
            f"meta['sum_error'] holds the gap", PrecisionWarning, stacklevel=3)
    return error.tolist()


#: Integrated gradients' scores may miss ``f(x) − f(baseline)`` by this share of it before a warning.
COMPLETENESS_TOLERANCE = 0.05


class CompletenessWarning(UserWarning):
    """Integrated gradients' scores miss ``f(x) − f(baseline)`` by more than `COMPLETENESS_TOLERANCE`."""


def completeness_error(scores: torch.Tensor, gap: torch.Tensor, *, steps: int) -> list[float]:
    """``Σ scores − gap`` per prompt (signed; ``scores: [prompt, position]`` with NaN or 0 padding,
    ``gap: [prompt]`` = ``f(x) − f(baseline)``); a `CompletenessWarning` names the prompts whose error
    is above `COMPLETENESS_TOLERANCE` × |gap| (and 1e-5) and says to raise ``steps``."""
    error = scores.double().nansum(-1) - gap.double()
    over = (error.abs() > (COMPLETENESS_TOLERANCE * gap.double().abs()).clamp(min=1e-5)).nonzero().flatten().tolist()
    if over:
        i = over[0]
        warnings.warn(
            f"integrated gradients' scores sum to {float(error[i] + gap[i]):+.4g} on prompt {i}, but f(x) − "
            f"f(baseline) = {float(gap[i]):+.4g}: a completeness error of {float(error[i]):+.3g}, over "
            f"{COMPLETENESS_TOLERANCE:.0%} of it ({len(over)} of {len(error)} prompts). The path integral is too "
            f"coarse at steps={steps}: raise "
            f"steps (e.g. to {4 * steps}); meta['completeness_error'] holds the largest gap", CompletenessWarning,
            stacklevel=3)
    return error.tolist()


@dataclass(frozen=True)
class Attribution:
    """Values, the names of their dimensions, and labels aligned with each dimension.

    Recipes return one ``Attribution`` whose first dimension is ``"prompt"`` (one row per
    prompt, even for one prompt). ``result[i]`` is prompt ``i`` alone (its padding stripped,
    positions labelled ``"3:John"``); ``result.mean()``, ``.std()`` and ``.count()`` reduce over
    prompts.

    Fields: ``method`` (the recipe, ``"direct_logit_attribution"``), ``title`` (in words),
    ``by`` (the resolution or node type, ``"head"``), ``units`` (of one value, ``"logits"``),
    ``metric`` (what is attributed, ``"logit(' Mary') − logit(' John')"``), ``meta`` (the options
    the run used), ``per_prompt`` (lists with one entry per prompt: targets, logits, ...) and
    ``tokens`` (each prompt's tokens).

    >>> a = Attribution(torch.tensor([[1.0, -3.0]]), ("prompt", "component"),
    ...                 {"prompt": ["p"], "component": ["embed", "0_attn_out"]})
    >>> a.top(1)
    [(('p', '0_attn_out'), -3.0)]
    """

    values: torch.Tensor
    dims: tuple[str, ...]
    labels: Mapping[str, list[str]]
    method: str = "attribution"
    title: str = "Attribution"
    by: str | None = None
    units: str = "value"
    metric: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    per_prompt: Mapping[str, list] = field(default_factory=dict)
    tokens: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self):
        dims = tuple(self.dims)
        if len(dims) != self.values.ndim:
            raise ValueError(f"dims {dims} do not match values of shape {tuple(self.values.shape)}")
        for i, dim in enumerate(dims):
            labels = self.labels.get(dim)
            if labels is None or len(labels) != self.values.shape[i]:
                got = None if labels is None else len(labels)
                raise ValueError(f"dimension {dim!r} has size {self.values.shape[i]} but {got} labels")
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("dims", dims)
        set_("labels", {d: list(self.labels[d]) for d in dims})
        set_("meta", dict(self.meta))
        set_("per_prompt", {k: list(v) for k, v in self.per_prompt.items()})
        if self.tokens is not None:
            set_("tokens", tuple(tuple(t) for t in self.tokens))
            set_("values", self._mask_padding(self.values))

    def _mask_padding(self, values: torch.Tensor) -> torch.Tensor:
        """NaN where a position dimension points at a prompt's left padding."""
        if not self.dims or self.dims[0] != "prompt" or len(self.tokens) != values.shape[0]:
            raise ValueError(f"tokens are given for {len(self.tokens)} prompts, but the result's first dimension "
                             f"is {self.dims[:1]} of size {values.shape[:1]}")
        width, axes = max(self.lengths), [i for i, d in enumerate(self.dims) if d in POSITION_DIMS]
        for axis in axes:
            if values.shape[axis] != width:
                raise ValueError(f"dimension {self.dims[axis]!r} has size {values.shape[axis]}, but the longest "
                                 f"prompt has {width} tokens: position dimensions span the whole batch")
        if not axes or min(self.lengths) == width:
            return values
        values = values.clone() if values.is_floating_point() else values.float()
        pad = (width - torch.tensor(self.lengths))  # [prompt]
        for axis in axes:
            shape = [1] * values.ndim
            shape[0], shape[axis] = len(pad), width
            values = values.masked_fill((torch.arange(width)[None] < pad[:, None]).reshape(shape), float("nan"))
        return values

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def lengths(self) -> tuple[int, ...] | None:
        """Each prompt's number of tokens (None when the result has no prompts)."""
        return None if self.tokens is None else tuple(map(len, self.tokens))

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, i: int) -> "Attribution":
        """Prompt ``i`` alone: the ``prompt`` dimension dropped, its padding stripped."""
        if self.dims[0] != "prompt":
            raise TypeError(f"indexing selects a prompt, but this result has dims {self.dims}")
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise TypeError(f"a result is indexed by prompt: give an int prompt index from 0 to {n - 1} (or -{n} "
                            f"to -1 from the end; it has {n} prompt{'s' * (n != 1)}), not {i!r} ({type(i).__name__})")
        if not -n <= i < n:
            raise IndexError(f"prompt index {i} is out of range: this result has {n} prompt{'s' * (n != 1)}, so give "
                             f"an int from 0 to {n - 1} (or -{n} to -1 from the end)")
        i = int(i) % n
        values, dims = self.values[i], self.dims[1:]
        labels = {d: self.labels[d] for d in dims}
        if self.tokens is not None:
            tokens, width = self.tokens[i], max(self.lengths)
            for axis, dim in enumerate(dims):
                if dim in POSITION_DIMS:
                    values = values.narrow(axis, width - len(tokens), len(tokens))
                    labels[dim] = [f"{j}:{t}" for j, t in enumerate(tokens)]
        meta = {**self.meta, **{k: v[i] for k, v in self.per_prompt.items()}, "prompt": self.labels["prompt"][i]}
        if self.tokens is not None:
            meta["tokens"] = list(self.tokens[i])
        return replace(self, values=values, dims=dims, labels=labels, meta=meta, per_prompt={}, tokens=None)

    def mean(self, *, align: Literal["end"] | None = None) -> "Attribution":
        """The average over prompts (NaN padding ignored).

        A position dimension of prompts with different lengths points at different tokens:
        position ``-3`` is another word in each prompt. Such a mean is refused unless
        ``align="end"``: positions counted back from each prompt's last token (the batch's own
        alignment); each entry then averages the prompts that have that position (`count`), so a
        mean row of a pattern need not sum to 1. ``meta`` records ``n_prompts`` and, when aligned,
        ``positions_from="end"`` (a recipe's own ``align`` option is kept).
        """
        values = self._over_prompts("mean", align)
        return self._reduced(values.nanmean(0), "mean", align)

    def std(self, *, align: Literal["end"] | None = None) -> "Attribution":
        """The standard deviation over prompts (NaN padding ignored; ``n - 1`` in the denominator,
        NaN where fewer than two prompts have an entry): how consistent an attribution is across
        inputs. Positions as in `mean`."""
        values = self._over_prompts("std", align)
        n = (~values.isnan()).sum(0)
        square = (values - values.nanmean(0)).square().nansum(0)
        std = (square / (n - 1).clamp(min=1)).sqrt().masked_fill(n < 2, float("nan"))
        return self._reduced(std, "standard deviation", align)

    def count(self, *, align: Literal["end"] | None = None) -> "Attribution":
        """How many prompts each entry of `mean` and `std` averages (padding and NaN excluded)."""
        values = self._over_prompts("count", align)
        return replace(self._reduced((~values.isnan()).sum(0).float(), "count", align), units="prompts")

    def single(self) -> "Attribution":
        """The one prompt of a one-prompt result, or the mean of many (positions counted from the
        last token): what plots show."""
        if self.dims and self.dims[0] == "prompt":
            return self[0] if len(self) == 1 else self.mean(align="end")
        return self

    def _over_prompts(self, what: str, align) -> torch.Tensor:
        if self.dims[0] != "prompt":
            raise TypeError(f"{what} reduces over prompts, but this result has dims {self.dims}")
        if align not in (None, "end"):
            raise ValueError(f"align={align!r}; expected None or 'end' (positions counted from the last token)")
        positions = [d for d in self.dims if d in POSITION_DIMS]
        if positions and align is None and self.lengths and len(set(self.lengths)) > 1:
            raise ValueError(
                f"the prompts have {min(self.lengths)} to {max(self.lengths)} tokens, so each {positions[0]!r} "
                f"index is a different token in each prompt and a {what} over prompts would mix them. Pass "
                f"align='end' to count positions back from each prompt's last token (each entry then covers the "
                f"prompts that have that position: see count()), or reduce prompts of one length.")
        return self.values.float()

    def _reduced(self, values: torch.Tensor, what: str, align) -> "Attribution":
        dims = self.dims[1:]
        aligned = align and any(d in POSITION_DIMS for d in dims)  # only where positions are there to align
        meta = {**self.meta, "n_prompts": len(self), **({"positions_from": align} if aligned else {})}
        if what != "mean":
            meta["statistic"] = what
        return replace(self, values=values, dims=dims, labels={d: self.labels[d] for d in dims}, meta=meta,
                       per_prompt={}, tokens=None)

    def top(self, k: int = 10, *, absolute: bool = True) -> list[tuple[tuple[str, ...], float]]:
        """The ``k`` largest entries (by magnitude when ``absolute``) as ``(labels, value)``."""
        fix = f"top(k={k!r}): k is how many entries to list, a positive int (1, 2, ...)"
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"{fix}, not a {type(k).__name__}")
        if k < 1:
            raise ValueError(fix)
        k = int(k)
        values, index = topk_flat(self.values, k, absolute=absolute)
        return [
            (tuple(self.labels[d][int(j)] for d, j in zip(self.dims, row)), float(v))
            for v, row in zip(values, index)
            if not math.isnan(v)  # fewer than k real entries: padding never fills the list
        ]

    # ------------------------------------------------------------------------- export

    def to_dict(self) -> dict[str, Any]:
        """Plain Python: lists, strings and floats (NaN as None), ready for ``json.dump``."""
        return {
            "method": self.method, "title": self.title, "by": self.by, "units": self.units, "metric": self.metric,
            "dims": list(self.dims),
            "labels": {d: list(v) for d, v in self.labels.items()},
            "values": _nan_to_none(self.values.detach().cpu().double().tolist()),
            "meta": _plain(self.meta),
            "per_prompt": _plain(self.per_prompt),
            "tokens": None if self.tokens is None else [list(t) for t in self.tokens],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Attribution":
        """The inverse of `to_dict` (values come back as float64)."""
        if "values" not in data and "results" in data:
            raise ValueError("this holds several results (one per node type, as a patching command writes): "
                             "read it with nnattr.result.read(path), which returns {node type: Attribution}")
        if not isinstance(data, Mapping):
            raise ValueError(f"not an Attribution: a {type(data).__name__}, where Attribution.to_dict() gives a dict "
                             f"with 'dims', 'labels' and 'values'")
        missing = [key for key in ("dims", "labels", "values") if key not in data]
        if missing:
            raise ValueError(f"not an Attribution: missing {', '.join(map(repr, missing))} (Attribution.to_dict() "
                             f"gives 'dims', 'labels', 'values' and more; it has {sorted(map(str, data))[:8]})")
        unlabelled = [d for d in data["dims"] if d not in data["labels"]]
        if unlabelled:
            raise ValueError(f"not an Attribution: dims {unlabelled} have no labels")
        values = torch.tensor(_none_to_nan(data["values"]), dtype=torch.float64)
        fields = {k: data[k] for k in ("method", "title", "by", "units", "metric", "meta", "per_prompt") if k in data}
        return cls(values.reshape([len(data["labels"][d]) for d in data["dims"]]), tuple(data["dims"]),
                   data["labels"], tokens=data.get("tokens"), **fields)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Attribution":
        return cls.from_dict(json.loads(text))

    def to_records(self) -> list[dict[str, Any]]:
        """One dict per entry (``{dim: label, ..., "value": v}``)."""
        grid = torch.cartesian_prod(*[torch.arange(n) for n in self.shape]).reshape(-1, self.values.ndim)
        flat = self.values.detach().double().flatten().tolist()
        return [{**{d: self.labels[d][int(j)] for d, j in zip(self.dims, index)}, "value": v}
                for index, v in zip(grid, flat)]

    def to_frame(self):
        """A long-format ``pandas.DataFrame``: one column per dimension, then ``value`` (needs pandas)."""
        try:
            import pandas
        except ImportError:
            raise ImportError("to_frame() needs pandas, which nnattr does not install: pip install pandas "
                              "(or use to_records())") from None
        return pandas.DataFrame.from_records(self.to_records(), columns=[*self.dims, "value"])

    def plot(self, ax=None, **kwargs):
        """Draw the result (heatmap, bars or token strip, chosen by its dimensions); returns the figure."""
        from .plotting import plot

        return plot(self, ax=ax, **kwargs)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{d}={n}" for d, n in zip(self.dims, self.shape))
        by = f" by {self.by}" if self.by else ""
        return f"Attribution({self.method}{by}: {sizes}; {self.units})"

    def _repr_html_(self) -> str:
        """A notebook's view: what it is, its shape, and its top entries."""
        e = html.escape
        rows = "".join(f"<tr>{''.join(f'<td>{e(str(x))}</td>' for x in labels)}<td>{v:+.4g}</td></tr>"
                       for labels, v in self.top(10))
        head = "".join(f"<th>{e(d)}</th>" for d in self.dims)
        what = e(self.title)
        metric = f"<br>metric: {e(self.metric)}" if self.metric else ""
        shape = " × ".join(f"{e(d)} {n}" for d, n in zip(self.dims, self.shape))
        return (f"<div><b>{what}</b> <span style='color:#666'>({shape}; {e(self.units)})</span>{metric}"
                f"<table><tr>{head}<th>value</th></tr>{rows}</table><small>top 10 by magnitude</small></div>")


def read(path) -> "Attribution | dict[str, Attribution]":
    """A result from a JSON file written by ``to_json`` or a command's ``--out``: one `Attribution`,
    or ``{name: Attribution}`` for a file holding several (the patching commands, one per node type)."""
    from pathlib import Path

    data = json.loads(Path(path).read_text())
    if "sections" in data and "values" not in data:
        raise ValueError(f"{path} is an nnattr report's results.json: each of data['sections'] holds results "
                         f"as dicts; read one with Attribution.from_dict(data['sections'][key][name])")
    if "results" in data and "values" not in data:
        return {name: Attribution.from_dict(r) for name, r in data["results"].items()}
    return Attribution.from_dict(data)


def _nan_to_none(x):
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _none_to_nan(x):
    if isinstance(x, list):
        return [_none_to_nan(v) for v in x]
    return math.nan if x is None else x


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


__all__ = ["Attribution", "CompletenessWarning", "POSITION_DIMS", "completeness_error", "read"]
