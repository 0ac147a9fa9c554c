"""Figures for attribution results: ``plot`` picks the picture from the result's dimensions.

=============================  ===========================================================
dimensions (after ``single``)  picture
=============================  ===========================================================
``layer, head``                layer × head heatmap, diverging colours centred at 0
``component`` / ``layer``      bar chart (TransformerLens labels: ``embed``, ``3_attn_out``)
``layer, position`` (lens)     table coloured by probability, top token written in each cell
``layer, position`` (circ.)    target's lens logit and rank; attention, MLP panels below
``query, key``                 attention map over the prompt's tokens
``head, query, key`` (flow)    each head's map for the last query token
``layer, head, position``      token strip: all heads summed, then the top heads
``position``                   token strip
``prompt, position`` (tokens)  token attribution of several prompts: prompt × position, each cell its token
``layer`` (lens, last only)    one lens column: the top token per layer
``layer, position`` (other)    layer × position heatmap over the prompt's tokens
=============================  ===========================================================

Titles, units and the metric come from the result's own fields (``title``, ``units``,
``metric``): a new recipe needs no entry here.

Figures are ``matplotlib.figure.Figure`` objects built without ``pyplot``: nothing is shown,
no backend is switched, and ``fig.savefig("x.png")`` renders with Agg. Notebooks display them.

>>> fig = result.plot()  # doctest: +SKIP
>>> fig.savefig("dla.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
import textwrap

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.figure import Figure

DIVERGING, SEQUENTIAL = "RdBu_r", "Blues"
_OWN = "nnattr"  # the label of figures plot() made itself
_PATCHING = ("attribution_patching", "activation_patching")


def plot(attr, ax=None, **kw) -> Figure:
    """Draw ``attr`` (one prompt, or the mean over many) and return the figure.

    Options: ``title`` (replaces the generated title), ``top`` (heads listed in a token
    strip, default 8), ``annotate`` (write values in the cells; default when they fit).
    """
    if attr.method == "token_attribution" and attr.dims == ("prompt", "position") and len(attr) > 1:
        return _token_rows(attr, ax, **kw)
    a = attr.single()
    dims = tuple(a.dims)
    if a.method == "logit_lens" and dims in (("layer", "position"), ("layer",)):
        return _lens(a, ax, **kw)
    if a.method == "token_circulation" and dims == ("layer", "position"):
        return _circulation(a, ax, **kw)
    if a.method in ("feature_attribution", "feature_patching"):
        return _features(a, ax, **kw)
    if dims == ("layer", "head"):
        return _heatmap(a, ax, signed=True, **kw)
    if dims == ("component",) and (a.by == "all" or len(a.labels["component"]) > 40):
        return _ranked(a, ax, **kw)
    if dims in (("component",), ("layer",)):
        return _bars(a, ax, **kw)
    if dims == ("query", "key"):
        return _attention(a, ax, **kw)
    if dims == ("head", "query", "key"):
        return _flow(a, ax, **kw)
    if dims == ("layer", "head", "query", "key"):
        return _maps(a, **kw)
    if dims == ("layer", "head", "position"):
        return _head_strip(a, ax, **kw)
    if dims == ("position",):
        return _strip(a, _np(a.values)[None], ["score"], ax, **kw)
    if len(dims) == 1:
        return _bars(a, ax, **kw)
    if len(dims) == 2:
        return _heatmap(a, ax, signed=bool(np.nanmin(_np(a.values)) < 0), **kw)
    raise ValueError(f"no picture for dimensions {dims}: select or reduce to one or two dimensions first")


def describe(attr) -> tuple[str, str]:
    """``(title, unit)`` of a result: its title, then the metric (or, for values that are
    recovered fractions, what they are a fraction of) and how prompts were combined."""
    details = [(f"recovered fraction of the metric {attr.metric}: (patched − corrupted) / (clean − corrupted)"
                if attr.units == "recovered fraction" else f"metric: {attr.metric}")] if attr.metric else []
    details += [text for text in (read_at(attr), over_prompts(attr)) if text]
    return attr.title + ("\n" + " · ".join(details) if details else ""), attr.units


def read_at(attr) -> str:
    """Where the logit was read, in words, when it is not each prompt's last token ("" when it is)."""
    read = attr.meta.get("read_at")
    if read is None:
        return ""
    if isinstance(attr.meta.get("position"), int) and "read_token" in attr.meta:  # one prompt
        return f"read at token {attr.meta['position']} {attr.meta['read_token']!r}"
    if isinstance(read, int):
        return f"read at token {read}" + (" (from the end)" if read < 0 else "")
    return "read at one position per prompt"


def over_prompts(attr) -> str:
    """How a result was reduced over prompts, in words ("" for one prompt)."""
    n = attr.meta.get("n_prompts")
    if not n:
        return ""
    aligned = " (positions counted from the last token)" if attr.meta.get("positions_from") == "end" else ""
    return f"{attr.meta.get('statistic', 'mean')} over {n} prompts{aligned}"


def number(value: float, *, signed: bool = True) -> str:
    """One number as every table writes it: 3 significant figures (``+24.1``, ``-0.968``,
    ``+1.00``), scientific below 0.001 and from 1000 on (``+1.23e-05``); "nan" for NaN."""
    value = float(value)
    if not math.isfinite(value):
        return "nan" if math.isnan(value) else f"{value:{'+' if signed else ''}}"
    sign = "+" if signed else ""
    if value == 0:
        return "0"
    value = float(f"{value:.3g}")  # rounded first, so 9.996 is +10.0, not +10.00
    if not 1e-3 <= abs(value) < 1e3:
        return f"{value:{sign}.2e}"
    return f"{value:{sign}.{max(0, 2 - math.floor(math.log10(abs(value))))}f}"


def entry_label(attr, labels) -> str:
    """One entry's name, in the one format every table uses: ``L1H0`` for a head, ``L1 attn`` /
    ``L1 mlp`` / ``L1 resid`` for a patching node of a layer, then any other label (``L1
    rollout_entropy``, ``1_attn_out``), with ``@`` and the position last (``L1H0@10:John``, ``L0
    resid@-5``). ``labels``: one per dimension of ``attr`` other than ``prompt``, in order."""
    at = dict(zip([d for d in attr.dims if d != "prompt"], labels))
    position = next((at.pop(d) for d in ("position", "key", "query") if d in at), None)
    name = []
    if "layer" in at:
        layer = at.pop("layer")
        if "head" in at:
            name.append(layer + at.pop("head"))
        elif attr.method in _PATCHING and attr.by:
            name.append(f"{layer} {attr.by.removesuffix('_pos')}")
        else:
            name.append(layer)
    name = " ".join(name + list(at.values()))
    return f"{name}@{position}" if name and position is not None else name or str(position)


def _np(values) -> np.ndarray:
    return values.detach().float().cpu().numpy()


def _figure(ax, width: float, height: float):
    """A new figure sized for the data (at least room for a title and a colour bar), or ``ax``'s."""
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=(min(max(width, 6.0), 30), min(max(height, 3.0), 30)), layout="constrained")
    fig.set_label(_OWN)
    return fig, fig.add_subplot()


def _title(ax, text: str) -> None:
    """The title, each line wrapped to the figure's width. On a figure of our own it is centred
    on the figure (colour bars push the axes aside), on a caller's axes it is the axes title."""
    fig = ax.figure
    chars = max(40, int(fig.get_figwidth() * 10))  # about 10 characters per inch at 10 pt
    text = "\n".join(textwrap.fill(line, chars) for line in text.splitlines())
    if fig.get_label() == _OWN:
        fig.suptitle(text, fontsize=10)
    else:
        ax.set_title(text, fontsize=10)


def _signed_norm(values: np.ndarray) -> colors.Normalize:
    """Symmetric limits, so 0 is the white middle of the diverging map whatever the data."""
    vmax = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0
    vmax = vmax or 1e-12
    return colors.Normalize(-vmax, vmax)


def _display(token: str) -> str:
    """A vocabulary piece as a reader writes it: byte-level and sentencepiece space markers
    dropped (``"ĠMary"``, ``"▁Mary"`` -> ``"Mary"``), newlines shown as ``⏎``."""
    token = token.replace("Ċ", "⏎").replace("\n", "⏎").lstrip("Ġ▁").strip()
    return token or "␣"


def _tokens(a, dim: str) -> list[str]:
    """What to write along a position dimension: the prompt's own tokens (``meta["tokens"]`` of a
    single prompt), else the dimension's labels (offsets from the last token, for a mean)."""
    tokens = a.meta.get("tokens")
    return list(tokens) if tokens is not None and len(tokens) == len(a.labels[dim]) else list(a.labels[dim])


def _ticks(ax, axis: str, labels: list[str], *, rotate: bool = False, size: float = 8) -> None:
    """Every label when they fit (~60), otherwise an even subset."""
    step = max(1, math.ceil(len(labels) / 60))
    where = list(range(0, len(labels), step))
    shown = [labels[i] for i in where]
    if axis == "x":
        ax.set_xticks(where, shown, rotation=90 if rotate else 0, fontsize=size)
    else:
        ax.set_yticks(where, shown, fontsize=size)


def _fmt(values: np.ndarray, signed: bool = True) -> str:
    """A format with two significant digits for the largest value: ``+0.015``, ``+2.1``."""
    vmax = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 0.0
    decimals = min(4, max(0, 1 - math.floor(math.log10(vmax)))) if vmax > 0 else 2
    return "{:" + ("+" if signed else "") + f".{decimals}f" + "}"


def _annotate(ax, values: np.ndarray, norm, cmap, *, signed: bool = True, size: float = 7, offset: int = 0) -> None:
    cm, fmt = colormaps[cmap], _fmt(values, signed)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            text = fmt.format(v)
            text = "0" if float(text) == 0 else text  # not "+0.0" / "-0.0": less noise around the big cells
            ax.text(j, i + offset, text, ha="center", va="center", fontsize=size,
                    color=_ink(cm(norm(v))), in_layout=False)  # inside the cells: nothing for the layout to fit


def _bar_values(ax, bars: np.ndarray) -> None:
    """Each horizontal bar's value at its end, in one format for all of them."""
    fmt = _fmt(bars)
    for i, v in enumerate(bars):
        ax.annotate(fmt.format(v), (v, i), xytext=(3 if v >= 0 else -3, 0), textcoords="offset points",
                    ha="left" if v >= 0 else "right", va="center", fontsize=7)


def _ink(rgba) -> str:
    """Black text on light cells, white on dark ones."""
    r, g, b = rgba[:3]
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def _colorbar(fig, image, ax, unit: str) -> None:
    bar = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.02)
    bar.set_label(unit, fontsize=9)


def _heatmap(a, ax, *, signed: bool, title=None, annotate=None, **_) -> Figure:
    values = _np(a.values)  # [row, col]
    rows, cols = (a.labels[d] for d in a.dims)
    fig, ax = _figure(ax, max(5.5, 2.6 + 0.45 * len(cols)), max(3.0, 1.6 + 0.34 * len(rows)))
    norm = _signed_norm(values) if signed else colors.Normalize(0, max(float(np.nanmax(values)), 1e-12))
    cmap = DIVERGING if signed else SEQUENTIAL
    image = ax.imshow(values, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    if annotate if annotate is not None else values.size <= 160 and len(cols) <= 16:
        _annotate(ax, values, norm, cmap, signed=signed)
    positional = a.dims[1] in ("position", "key")
    _ticks(ax, "x", _tokens(a, a.dims[1]) if positional else cols, rotate=positional or len(cols) > 16)
    _ticks(ax, "y", rows)
    patched = positional and a.method in _PATCHING
    ax.set_xlabel("position (corrupted prompt's tokens)" if patched else a.dims[1])
    ax.set_ylabel(a.dims[0])
    text, unit = describe(a)
    _title(ax, title or text)
    _colorbar(fig, image, ax, unit)
    return fig


def _bars(a, ax, *, title=None, annotate=None, **_) -> Figure:
    values = _np(a.values)
    labels = a.labels[a.dims[0]]
    fig, ax = _figure(ax, max(5.0, 1.5 + 0.3 * len(labels)), 4.2)
    norm = _signed_norm(values)
    cm = colormaps[DIVERGING]
    # Bar colours from the heatmaps' diverging map, saturated enough to see small bars.
    fill = [cm(0.5 + 0.5 * max(0.35, abs(norm(v) - 0.5) * 2) * (1 if v >= 0 else -1)) for v in values]
    ax.bar(range(len(values)), values, color=fill, edgecolor="0.3", linewidth=0.5)
    ax.axhline(0, color="0.2", linewidth=0.8)
    if annotate if annotate is not None else len(values) <= 24:
        fmt = _fmt(values)
        for i, v in enumerate(values):
            text = fmt.format(v)
            ax.annotate("0" if float(text) == 0 else text, (i, v), xytext=(0, 3 if v >= 0 else -3),
                        textcoords="offset points", ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
        ax.margins(y=0.15)
    ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 8 else 0, fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    text, unit = describe(a)
    total = float(np.nansum(values))
    if a.method == "direct_logit_attribution":
        text += f"\nsum of the bars = {total:+.3f}"
        if isinstance(a.meta.get("logit"), float):
            text += f" (model: {a.meta['logit']:+.3f})"
    _title(ax, title or text)
    ax.set_ylabel(unit, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _ranked(a, ax, *, title=None, top=None, **_) -> Figure:
    """The ``top`` largest contributors (default 20) as a ranked list of horizontal bars, largest
    first, then one bar for everything else, so the bars still add up to the whole."""
    values, labels = _np(a.values), a.labels[a.dims[0]]
    order = np.argsort(-np.abs(np.nan_to_num(values)), kind="stable")[: top or 20]
    rest = np.delete(values, order)
    shown = [labels[i] for i in order] + ([f"the other {rest.size}"] if rest.size else [])
    bars = np.append(values[order], np.nansum(rest)) if rest.size else values[order]
    fig, ax = _figure(ax, 6.5, 1.2 + 0.26 * len(bars))
    cm, norm = colormaps[DIVERGING], _signed_norm(bars)
    fill = [cm(0.5 + 0.5 * max(0.35, abs(norm(v) - 0.5) * 2) * (1 if v >= 0 else -1)) for v in bars]
    if rest.size:
        fill[-1] = "0.75"
    ax.barh(range(len(bars)), bars, color=fill, edgecolor="0.3", linewidth=0.5)
    ax.axvline(0, color="0.2", linewidth=0.8)
    ax.set_yticks(range(len(bars)), shown, fontsize=8)
    ax.invert_yaxis()  # the largest on top
    _bar_values(ax, bars)
    ax.margins(x=0.15)
    text, unit = describe(a)
    if a.method == "direct_logit_attribution":
        text += f"\nsum of all {values.size} = {float(np.nansum(values)):+.3f}"
    _title(ax, title or text)
    ax.set_xlabel(unit, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _lens(a, ax, *, title=None, **_) -> Figure:
    values = _np(a.values).reshape(len(a.labels["layer"]), -1)  # [layer, position]
    layers, positions = a.labels["layer"], a.labels.get("position", ["last"])
    top = a.meta.get("top_tokens")  # [layer][position][k] for one prompt
    ranks = a.meta.get("target_rank")  # [layer][position]
    one = isinstance(top, list) and len(top) == len(layers) and isinstance(top[0][0], list)
    fig, ax = _figure(ax, 2.4 + 0.62 * len(positions), 1.6 + 0.34 * len(layers))
    norm = colors.Normalize(0, 1)
    image = ax.imshow(values, cmap=SEQUENTIAL, norm=norm, aspect="auto", origin="lower", interpolation="nearest")
    if one:
        cm = colormaps[SEQUENTIAL]
        size = 7 if len(positions) <= 24 else 6
        cell = 72 * (fig.get_figwidth() - 2.4) / len(positions)  # points per column
        width = max(3, min(12, int(cell / (0.7 * size))))  # characters that fit (bold, wide letters)
        for (i, j), v in np.ndenumerate(values):
            word = _display(str(top[i][j][0]))
            word = word if len(word) <= width else word[: width - 1] + "…"
            hit = ranks is not None and ranks[i][j] == 0
            ax.text(j, i, word, ha="center", va="center", fontsize=size, in_layout=False,
                    color=_ink(cm(norm(v if np.isfinite(v) else 0))),
                    fontweight="bold" if hit else "normal")
    shown = _tokens(a, "position") if "position" in a.labels else positions
    _ticks(ax, "x", shown, rotate=True)
    _ticks(ax, "y", layers)
    ax.set_xlabel("input token (position)")
    ax.set_ylabel("residual stream after")
    if one and len(positions) > 1:
        expected = shown[1:] + [str(a.meta.get("target", "target")).strip()]
        top_ax = ax.secondary_xaxis("top")
        top_ax.set_xticks(range(len(expected)), expected, rotation=90, fontsize=7, color="0.35")
        top_ax.set_xlabel("expected next token", fontsize=8, color="0.35")
    how = "translated by its tuned-lens translator, then decoded" if a.meta.get("lens") else "decoded"
    name = f"{a.title}: each layer's residual {how} by the final norm and unembedding"
    if one:
        how = "cell text: top prediction (bold when it is the expected next token); colour: P(expected token)"
    else:
        how = "colour: probability of the expected next token" + (f" · {over_prompts(a)}" if over_prompts(a) else "")
    _title(ax, title or f"{name}\n{how}")
    _colorbar(fig, image, ax, "probability of the expected token")
    return fig


def _circulation(a, ax, *, title=None, split: bool = True, **_) -> Figure:
    """The target's lens logit per layer × token, its rank in each cell; below it (one prompt, own
    figure, ``split=True``) each layer's attention and MLP writes on the token's direction."""
    values = _np(a.values)  # [layer, position]
    layers, tokens = a.labels["layer"], _tokens(a, "position")
    ranks, parts = a.meta.get("rank"), [a.meta.get(k) for k in ("attn", "mlp")]
    split = split and ax is None and all(isinstance(p, list) for p in parts)
    height = 0.34 * len(layers) + 0.3
    fig, ax = _figure(ax, 2.6 + 0.5 * len(tokens), (3 * height + 2.2) if split else height + 1.6)
    axes = [ax]
    if split:
        fig.delaxes(ax)
        axes = list(fig.subplots(3, 1, sharex=True, height_ratios=[len(layers), len(layers) - 1, len(layers) - 1]))
    norm = _signed_norm(values)
    image = axes[0].imshow(values, cmap=DIVERGING, norm=norm, aspect="auto", origin="lower", interpolation="nearest")
    if isinstance(ranks, list) and len(tokens) <= 40:
        cm = colormaps[DIVERGING]
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                axes[0].text(j, i, str(ranks[i][j]), ha="center", va="center", fontsize=7, in_layout=False,
                             color=_ink(cm(norm(v))), fontweight="bold" if ranks[i][j] == 0 else "normal")
    _colorbar(fig, image, axes[0], a.units)
    _ticks(axes[0], "y", layers)
    axes[0].set_ylabel("residual after")
    if split:
        both = np.array(parts, dtype=float)  # [attn | mlp, layer, position]
        norm = _signed_norm(both)
        for ax_, part, name in zip(axes[1:], both, ("attention", "MLP")):
            image = ax_.imshow(part, cmap=DIVERGING, norm=norm, aspect="auto", origin="lower", interpolation="nearest")
            if len(tokens) <= 24:
                _annotate(ax_, part, norm, DIVERGING, size=6)
            _ticks(ax_, "y", layers[1:])
            ax_.set_ylabel(f"{name} write", fontsize=9)
        fig.colorbar(image, ax=axes[1:], shrink=0.9, pad=0.02).set_label("share of the change (logits)", fontsize=9)
    _ticks(axes[-1], "x", tokens, rotate=True)
    axes[-1].set_xlabel("token (position)")
    text, _ = describe(a)
    target, other = a.meta.get("target"), a.meta.get("distractor")
    how = f"colour: the lens logit of {target!r}" if isinstance(target, str) else "colour: the target's lens logit"
    if isinstance(target, str) and isinstance(other, str):  # a logit difference; the rank is the target's own
        how = f"colour: lens logit({target!r}) − logit({other!r})"
    how += f"; cell: the rank of {target!r} (0 = top, bold)" if isinstance(ranks, list) and isinstance(target, str) \
        else "; cell: the target's rank (0 = top, bold)" if isinstance(ranks, list) else ""
    if split:
        how += ("\nbelow: each layer's attention and MLP writes on its direction through the final norm "
                "(without the norm's rescale)")
    _title(axes[0], title or f"{text}\n{how}")
    return fig


def _token_rows(a, ax, *, title=None, **_) -> Figure:
    """Prompt × position (right-aligned): each cell coloured by its score and labelled with its own token."""
    values, width, cm = _np(a.values), a.values.shape[1], colormaps[DIVERGING]  # [prompt, position], NaN padding
    fig, ax = _figure(ax, 3.2 + 0.6 * width, 1.6 + 0.4 * len(values))
    norm = _signed_norm(values)
    image = ax.imshow(values, cmap=DIVERGING, norm=norm, aspect="auto", interpolation="nearest")
    for i, tokens in enumerate(a.tokens):
        for j, token in enumerate(tokens, start=width - len(tokens)):
            ax.text(j, i, _display(token)[:8], ha="center", va="center", fontsize=6, in_layout=False,
                    color=_ink(cm(norm(values[i, j]))) if np.isfinite(values[i, j]) else "0.4")
    _ticks(ax, "x", a.labels["position"])
    _ticks(ax, "y", [textwrap.shorten(p, 40) for p in a.labels["prompt"]])
    ax.set_xlabel("position (from the last token)")
    text, unit = describe(a)
    _title(ax, title or text)
    _colorbar(fig, image, ax, unit)
    return fig


def _attention(a, ax, *, title=None, **_) -> Figure:
    values = _np(a.values)  # [query, key]
    tokens = _tokens(a, "query")
    n = len(tokens)
    fig, ax = _figure(ax, 2.6 + 0.24 * n, max(4.0, 2.0 + 0.22 * n))
    vmax = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
    # Square-root scale: rollout piles mass on the first token; this keeps the rest visible.
    norm = colors.PowerNorm(0.5, vmin=0, vmax=vmax or 1.0)
    shown = np.where(np.tril(np.ones_like(values, dtype=bool)), values, np.nan)
    image = ax.imshow(shown, cmap=SEQUENTIAL, norm=norm, interpolation="nearest")
    _ticks(ax, "x", tokens, rotate=True)
    _ticks(ax, "y", tokens)
    ax.set_xlabel("key (input token it draws on)")
    ax.set_ylabel("query (token being represented)")
    text, unit = describe(a)
    meta = a.meta
    shown = ("residual", "head_fusion", "norm")
    detail = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in meta.items() if k in shown)
    _title(ax, title or f"{text}\n{detail} · colour: square-root scale".strip(" ·"))
    _colorbar(fig, image, ax, unit)
    return fig


def _maps(a, *, title=None, panels: int = 16, **_) -> Figure:
    """One attention map per (layer, head), the first ``panels`` of them, on one colour scale."""
    values = _np(a.values).reshape(-1, *a.shape[-2:])[:panels]  # [panel, query, key]
    names = [f"{layer}{head}" for layer in a.labels["layer"] for head in a.labels["head"]][:panels]
    tokens, cols = _tokens(a, "query"), min(4, len(names))
    rows = math.ceil(len(names) / cols)
    side = max(2.4, 0.16 * len(tokens))
    fig = Figure(figsize=(min(30, side * cols + 1.2), min(30, side * rows + 1.2)), layout="constrained")
    fig.set_label(_OWN)
    axes = fig.subplots(rows, cols, squeeze=False)
    finite = values[np.isfinite(values)]
    norm = colors.PowerNorm(0.5, vmin=0, vmax=float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
    for ax, name, panel in zip(axes.flat, names, values):
        image = ax.imshow(np.where(np.tril(np.ones_like(panel, dtype=bool)), panel, np.nan), cmap=SEQUENTIAL,
                          norm=norm, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        _ticks(ax, "x", tokens, rotate=True, size=6)
        _ticks(ax, "y", tokens, size=6)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    text, unit = describe(a)
    more = a.values[..., 0, 0].numel() - len(names)
    note = f" · first {len(names)} of {len(names) + more} maps (choose layers= and heads=)" if more > 0 else ""
    fig.suptitle(title or f"{text}\nrows: query, columns: key · colour: square-root scale{note}", fontsize=10)
    fig.colorbar(image, ax=axes, shrink=0.8).set_label(unit, fontsize=9)
    return fig


def _flow(a, ax, *, title=None, **_) -> Figure:
    values = _np(a.values)[:, -1, :]  # [head, key] for the last query
    tokens = _tokens(a, "key")
    fig, ax = _figure(ax, 2.6 + 0.3 * len(tokens), 1.8 + 0.3 * len(a.labels["head"]))
    image = ax.imshow(values, cmap=SEQUENTIAL, norm=colors.Normalize(0, float(np.nanmax(values)) or 1.0),
                      aspect="auto", interpolation="nearest")
    _ticks(ax, "x", tokens, rotate=True)
    _ticks(ax, "y", a.labels["head"])
    ax.set_xlabel("key (input token)")
    ax.set_ylabel("head (last layer)")
    text, unit = describe(a)
    _title(ax, title or f"{text}\nlast query token ({tokens[-1]!r})")
    _colorbar(fig, image, ax, unit)
    return fig


def _head_strip(a, ax, *, top: int = 8, **kw) -> Figure:
    values = _np(a.values)  # [layer, head, position]
    layers, heads = a.labels["layer"], a.labels["head"]
    flat = values.reshape(-1, values.shape[-1])  # [(layer head), position]
    names = [f"{layer}{head}" for layer in layers for head in heads]
    order = np.argsort(-np.abs(np.nansum(flat, -1)))[:top]
    return _strip(a, flat[order], [names[i] for i in order], ax, total=np.nansum(flat, 0), **kw)


def _strip(a, rows: np.ndarray, names: list[str], ax, *, total=None, title=None, annotate=None, **_) -> Figure:
    """Per-position scores as coloured cells under the prompt's tokens, one row per series.

    ``total`` (optional) is drawn as a first row on its own colour scale: a sum over many
    series would otherwise wash out the series below it.
    """
    tokens = _tokens(a, "position")
    n_rows = len(names) + (total is not None)
    fig, ax = _figure(ax, 3.2 + 0.5 * len(tokens), 1.6 + 0.36 * n_rows)
    label = annotate if annotate is not None else len(tokens) <= 24
    text, unit = describe(a)
    blocks = [(rows, 0, unit)]  # (values [row, position], first row, colour bar label)
    if total is not None:
        blocks = [(total[None], 0, f"all heads: {unit}"), (rows, 1, f"per head: {unit}")]
    for block, start, bar_label in blocks:
        norm = _signed_norm(block)
        extent = (-0.5, len(tokens) - 0.5, start + len(block) - 0.5, start - 0.5)
        image = ax.imshow(block, cmap=DIVERGING, norm=norm, aspect="auto", interpolation="nearest", extent=extent)
        if label:
            _annotate(ax, block, norm, DIVERGING, size=6, offset=start)
        _colorbar(fig, image, ax, bar_label)
    ax.set_ylim(n_rows - 0.5, -0.5)
    _ticks(ax, "x", tokens, rotate=True)
    _ticks(ax, "y", (["all heads"] if total is not None else []) + names)
    if total is not None:
        ax.axhline(0.5, color="0.2", linewidth=1.5)
    if total is not None:
        ax.set_xlabel("source token (position read from)")
        how = f"per source position · row 1: every head summed (own colour scale), then the top {len(names)} heads"
        text = f"{text}\n{how}"
    else:
        ax.set_xlabel("token (position)")
    _title(ax, title or text)
    return fig


__all__ = ["plot", "describe", "entry_label", "number", "DIVERGING", "SEQUENTIAL"]


def _features(a, ax, *, title=None, top=None, **_) -> Figure:
    """SAE features (`nnattr.features`): the ``top`` largest (default 15, per-position scores summed),
    ranked, as coloured bars labelled ``<sae>/f<index>``; then, in grey, each SAE's other terms (the
    other features, b_dec, the error, the rest), so what the features leave out stays in view."""
    values = _np(a.values)
    values = np.where(np.isnan(values).all(-1), np.nan, np.nansum(values, -1)) if values.ndim == 2 else values
    labels, kinds = a.labels["component"], a.meta["components"]["kind"]
    feats = [i for i, k in enumerate(kinds) if k == "feature" and not np.isnan(values[i])]
    order = sorted(feats, key=lambda i: -abs(values[i]))[: top or 15]
    terms = [i for i, k in enumerate(kinds) if k != "feature" and not np.isnan(values[i])]
    rows = order + terms
    bars = values[rows]
    fig, ax = _figure(ax, 6.5, 1.4 + 0.26 * len(rows))
    cm, norm = colormaps[DIVERGING], _signed_norm(bars[: len(order)] if order else bars)
    fill = [cm(0.5 + 0.5 * max(0.35, abs(norm(v) - 0.5) * 2) * (1 if v >= 0 else -1)) for v in bars[: len(order)]]
    fill += ["0.75"] * len(terms)
    ax.barh(range(len(rows)), bars, color=fill, edgecolor="0.3", linewidth=0.5)
    ax.axvline(0, color="0.2", linewidth=0.8)
    if order and terms:
        ax.axhline(len(order) - 0.5, color="0.5", linewidth=0.6, linestyle=":")
    ax.set_yticks(range(len(rows)), [labels[i] for i in rows], fontsize=8)
    ax.invert_yaxis()  # the largest feature on top
    _bar_values(ax, bars)
    ax.margins(x=0.15)
    text, unit = describe(a)
    if a.method == "feature_attribution" and isinstance(a.meta.get("logit"), float):
        text += f"\neach SAE's bars sum to the model's value ({a.meta['logit']:+.3f}); grey: not single features"
    _title(ax, title or text)
    ax.set_xlabel(unit, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return fig


def plot_circuit(circuit, scores=None, ax=None, *, title: str | None = None) -> Figure:
    """A circuit as a layered graph: one column per layer (the embeddings first, the logits last), each
    head and MLP a node, each kept edge a line from its writer to the component that reads it (a query
    solid, a key dashed, a value dotted; a kv head's key or value goes to every head that shares it).
    With ``scores`` (an edge attribution result) a line's width is its mean |score| and its colour its sign."""
    import matplotlib.lines as mlines

    from .circuits import _component, _kv_group, _layer

    if not circuit.edges:
        raise ValueError("the circuit has no edges to draw")
    values = None
    if scores is not None:
        v = scores.values.nanmean(0) if scores.values.ndim == 3 else scores.values
        W, R = scores.labels["writer"], scores.labels["reader"]
        values = {(w, r): float(v[W.index(w), R.index(r)]) for w, r in circuit.edges}
    last = max([_layer(n, 0) for e in circuit.edges for n in e if n != "logits"]) + 1  # the logits' column
    heads = max([int(n.split("H")[1].split(" ")[0]) for e in circuit.edges for n in e if "H" in n and
                 n.startswith("L") and "KV" not in n] + [0]) + 1
    group = _kv_group(scores.labels["reader"]) if scores is not None else 1

    def place(node: str) -> tuple[float, float]:
        layer = _layer(node, last)
        if node == "logits" or not node.startswith("L"):
            return layer, (heads - 1) / 2 + (0.5 if node == "pos_embed" else 0)
        return layer, heads if node.endswith("MLP") else float(node.split("H")[1].split(" ")[0])

    fig, ax = _figure(ax, max(6.0, 1.6 * (last + 3)), max(3.5, 0.55 * (heads + 2)))
    style = {"q": "-", "k": "--", "v": ":"}
    biggest = max([abs(x) for x in (values or {}).values()] + [1e-12])
    for w, r in sorted(circuit.edges):
        kind = r.split(" ")[1] if " " in r and not r.endswith("MLP") else "q"
        targets = _component(r, group)
        for t in targets:
            (x0, y0), (x1, y1) = place(w), place(t)
            y1 += {"q": 0.0, "k": 0.18, "v": -0.18}[kind] if " " in r and not r.endswith("MLP") else 0.0  # apart
            score = None if values is None else values[w, r]
            colour = "0.35" if score is None else ("#b2182b" if score > 0 else "#2166ac")
            width = 1.2 if score is None else 0.6 + 4.0 * abs(score) / biggest
            ax.plot([x0, x1], [y0, y1], linestyle=style[kind], color=colour, linewidth=width, alpha=0.8, zorder=1)
    nodes = {n for w, r in circuit.edges for n in [w, *_component(r, group)]}
    for node in nodes:
        x, y = place(node)
        ax.scatter([x], [y], s=260, color="white", edgecolor="0.2", zorder=2)
        label = node if not node.startswith("L") else node.split(" ")[0][len(f"L{_layer(node, last)}"):] or node
        ax.annotate("MLP" if node.endswith("MLP") else label, (x, y), ha="center", va="center", fontsize=7, zorder=3)
    ax.set_xticks(range(-1, last + 1), ["embed"] + [f"L{i}" for i in range(last)] + ["logits"])
    ax.set_yticks([])
    ax.set_xlim(-1.6, last + 0.6)
    ax.set_ylim(-1, heads + 1)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    handles = [mlines.Line2D([], [], color="0.35", linestyle=s, label=k) for k, s in
               (("query, MLP, logits", "-"), ("key", "--"), ("value", ":"))]
    ax.legend(handles=handles, loc="upper left", fontsize=7, frameon=False, ncol=3, bbox_to_anchor=(0, 1.08))
    _title(ax, title or f"{circuit!r}" + ("" if values is None else ": line width |mean score|, red raises the metric"))
    return fig


def plot_faithfulness(result, ax=None, *, title: str | None = None) -> Figure:
    """Recovered fraction against circuit size (`nnattr.circuits.curve`): the mean over the pairs, and
    their range shaded; the x axis is the circuit's share of the model's edges."""
    edges, total = np.asarray(result.meta["edges"], dtype=float), float(result.meta["total"])
    values = _np(result.values)  # [prompt, circuit]
    fig, ax = _figure(ax, 6.0, 3.6)
    share = 100 * edges / total
    ax.fill_between(share, np.nanmin(values, 0), np.nanmax(values, 0), color="#b2182b", alpha=0.15, linewidth=0)
    ax.plot(share, np.nanmean(values, 0), marker="o", color="#b2182b")
    ax.axhline(1.0, color="0.5", linewidth=0.8, linestyle="--")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("edges kept (% of the model's)")
    ax.set_ylabel(f"{result.units} ({result.meta['ablation']})")
    _title(ax, title or f"{result.title}: mean over {values.shape[0]} pairs, range shaded")
    return fig
