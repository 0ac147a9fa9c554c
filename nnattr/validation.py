"""How far can attribution patching be trusted? Compare it with exact activation patching.

>>> from nnattr.recipes import activation_patching, attribution_patching
>>> from nnattr.validation import compare
>>> estimate = attribution_patching.run(model, clean, corrupted, " Mary", " John")   # doctest: +SKIP
>>> exact = activation_patching.run(model, clean, corrupted, " Mary", " John")       # doctest: +SKIP
>>> report = compare(estimate, exact)                                                  # doctest: +SKIP
>>> print(report.table()); report.plot()                                               # doctest: +SKIP

Both sides are put in metric units (a recovery times the pair's ``clean - corrupted`` metric)
and averaged over pairs; per node type the report gives Pearson and Spearman correlation over
the nodes patched exactly (and Pearson over every pair-and-node entry), the top-k agreement
(the share of the exact top k that the estimate's top k also holds, with k at most half those
nodes: compared over the estimate's own top k only, it would be 1 whatever the ranking), a
scatter plot, and warnings where the linear approximation is known
to fail: the residual stream, MLP0, and saturating effects such as attention that flips
(Kramár et al. 2024, AtP*; RelP 2025 reports r = 0.75 / 0.98 / 0.20 for residual, attention
and MLP outputs of GPT-2 small on IOI).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import torch

from .result import Attribution


class ApproximationWarning(UserWarning):
    """Attribution patching is unreliable for some of the nodes compared."""


@dataclass(frozen=True)
class Agreement:
    """Attribution vs exact patching for one node type (mean effects over pairs, metric units)."""

    node_type: str
    labels: list[str]
    estimate: torch.Tensor  # [entry]
    exact: torch.Tensor  # [entry]
    pearson: float
    spearman: float
    pearson_per_pair: float
    k: int  # at most half the entries compared (0: too few to rank, top_k is NaN)
    top_k: float  # share of the exact top-k entries (by magnitude) in the estimate's top-k
    warnings: tuple[str, ...] = field(default=())
    total: int = 0  # entries of the node type, patched exactly or not (n of them were)

    @property
    def n(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class Comparison:
    """One ``Agreement`` per node type compared; ``table()`` and ``plot()`` for the report."""

    agreements: Mapping[str, Agreement]

    def __getitem__(self, node_type: str) -> Agreement:
        return self.agreements[node_type]

    @property
    def warnings(self) -> list[str]:
        return [w for a in self.agreements.values() for w in a.warnings]

    def table(self) -> str:
        """A Markdown report section: the figures per node type, then the warnings."""
        from .plotting import number

        lines = ["| node type | entries | Pearson | Spearman | Pearson (per pair) | top-k agreement |",
                 "|---|---:|---:|---:|---:|---:|"]
        for a in self.agreements.values():
            lines.append(f"| {a.node_type} | {a.n} | {number(a.pearson, signed=False)} | "
                         f"{number(a.spearman, signed=False)} | {number(a.pearson_per_pair, signed=False)} | "
                         f"{top_k_text(a)} |")
        return "\n".join(lines + ["", f"entries: the nodes patched exactly, of each type's total; {TOP_K}", ""]
                         + [f"- {w}" for w in self.warnings])

    def to_dict(self) -> dict:
        keys = ("n", "total", "pearson", "spearman", "pearson_per_pair", "k", "top_k", "warnings")
        plain = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731 (JSON has no NaN)
        return {t: {key: plain(getattr(a, key)) for key in keys} for t, a in self.agreements.items()}

    def plot(self, **kwargs):
        return scatter(self, **kwargs)

    def __repr__(self) -> str:
        return self.table()


def compare(estimate: Mapping[str, Attribution], exact: Mapping[str, Attribution], *, k: int = 10,
            warn: bool = True) -> Comparison:
    """Compare every node type the two results share (``{node type: Attribution}`` each, as the
    patching recipes return). Emits an ``ApproximationWarning`` per warning when ``warn``."""
    shared = [t for t in estimate if t in exact]
    if not shared:
        raise ValueError(f"no node type in common: estimate has {list(estimate)}, exact has {list(exact)}")
    out = {}
    for node_type in shared:
        a, b = estimate[node_type], exact[node_type]
        if a.shape != b.shape or a.dims != b.dims or a.labels != b.labels:
            raise ValueError(f"{node_type}: estimate {a.shape} and exact {b.shape} do not cover the same nodes "
                             f"and pairs")
        out[node_type] = _agreement(node_type, a, b, k)
    report = Comparison(out)
    if warn:
        for message in report.warnings:
            warnings.warn(message, ApproximationWarning, stacklevel=2)
    return report


def metric_effect(result: Attribution) -> torch.Tensor:
    """A patching result in metric units, ``[pair, ...]``: an estimate as it is, a normalised
    recovery times its pair's ``clean - corrupted`` metric."""
    if result.method == "attribution_patching":
        return result.values.float()
    if result.method == "activation_patching":
        gap = torch.tensor(result.per_prompt["clean_metric"]) - torch.tensor(result.per_prompt["corrupted_metric"])
        return result.values.float() * gap.reshape(-1, *([1] * (result.values.ndim - 1)))
    raise ValueError(f"a {result.method} result: expected attribution_patching or activation_patching")


def entry_labels(result: Attribution) -> list[str]:
    """One label per entry of a patching result's non-prompt dimensions, flattened in order:
    ``L3H7`` (head), ``L3 attn`` (a layer's write), with ``@-2`` for a position
    (`nnattr.plotting.entry_label`, the format of every table)."""
    from .plotting import entry_label

    grid = [[]]
    for d in (d for d in result.dims if d != "prompt"):
        grid = [g + [label] for g in grid for label in result.labels[d]]
    return [entry_label(result, g) for g in grid]


TOP_K = ("top-k agreement: the share of the exact top k (by magnitude, among the nodes patched exactly) that "
         "the estimate's top k also holds; k is at most half those nodes, since a larger k forces an overlap")


def top_k_text(a: Agreement) -> str:
    """The top-k agreement in words: ``0.83 (5 of the top 6)``, or why there is none."""
    from .plotting import number

    if not a.k:
        return f"n/a ({a.n} node{'s' * (a.n != 1)}: too few to rank)"
    return f"{number(a.top_k, signed=False)} ({round(a.top_k * a.k)} of the top {a.k})"


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = float(x.norm() * y.norm())
    return float(x @ y) / denominator if denominator > 0 else math.nan


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return pearson(_ranks(x), _ranks(y))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks from 0, ties sharing their average rank."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)  # sorted unique values
    first = counts.cumsum(0) - counts
    return (first + (counts - 1) / 2).double()[inverse]


def _agreement(node_type: str, a: Attribution, b: Attribution, k: int) -> Agreement:
    x_all, y_all = metric_effect(a), metric_effect(b)  # [pair, node(, position)]
    x, y = x_all.nanmean(0).flatten(), y_all.nanmean(0).flatten()  # [entry]
    labels = entry_labels(a)
    keep = ~(x.isnan() | y.isnan())
    x, y, labels = x[keep], y[keep], [lab for lab, kept in zip(labels, keep.tolist()) if kept]
    both = ~(x_all.isnan() | y_all.isnan())
    ranked = min(k, len(labels) // 2)  # k of n forces an overlap of 2k - n: k = n gives 1 whatever the ranking
    top_x, top_y = set(x.abs().topk(ranked).indices.tolist()), set(y.abs().topk(ranked).indices.tolist())
    return Agreement(
        node_type, labels, x, y, pearson(x, y), spearman(x, y), pearson(x_all[both], y_all[both]), ranked,
        len(top_x & top_y) / ranked if ranked else math.nan,
        tuple(_warnings(node_type, labels, x, y, min(k, len(labels)))), total=len(keep),
    )


def _warnings(node_type: str, labels: list[str], x: torch.Tensor, y: torch.Tensor, k: int) -> list[str]:
    out = []
    r = pearson(x, y)
    if node_type == "resid":
        out.append(f"resid: patching the residual stream replaces everything a position carries, far outside "
                   f"the linear regime; read its attribution as a rough ranking (Pearson r = {r:.2f}).")
    elif not r >= 0.5:
        out.append(f"{node_type}: attribution patching agrees poorly with exact patching (Pearson r = {r:.2f}); "
                   f"confirm candidates with activation_patching.")
    for i, label in enumerate(labels):
        if node_type == "mlp" and label == "L0 mlp":
            out.append(f"L0 mlp: MLP0 acts as part of the token embedding and is poorly linearised "
                       f"(estimate {x[i]:.3g}, exact {y[i]:.3g} metric units).")
    if node_type.startswith(("head", "attn")) and len(y):
        big = y.abs() >= 0.1 * y.abs().max()
        top = set(y.abs().topk(k).indices.tolist())
        missed = [i for i in top if big[i] and x[i].abs() < 0.5 * y[i].abs()]
        if missed:
            names = ", ".join(f"{labels[i]} ({x[i]:.3g} vs {y[i]:.3g})" for i in missed[:5])
            out.append(f"{node_type}: the estimate is under half the exact effect for {names}: saturating "
                       f"attention (a pattern that flips) is underestimated by the linear approximation; "
                       f"try method='ig' or trust the exact figures.")
    return out


def scatter(comparison: Comparison, *, annotate: int = 3):
    """Estimate against exact effect per node type, with the diagonal; returns the figure."""
    import matplotlib.pyplot as plt

    types = list(comparison.agreements.values())
    fig, axes = plt.subplots(1, len(types), figsize=(3.6 * len(types), 3.4), squeeze=False)
    for ax, a in zip(axes[0], types):
        ax.scatter(a.exact, a.estimate, s=12, alpha=0.7)
        lo = float(min(a.exact.min(), a.estimate.min())) if a.n else 0.0
        hi = float(max(a.exact.max(), a.estimate.max())) if a.n else 1.0
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        for i in a.exact.abs().topk(min(annotate, a.n)).indices.tolist():
            ax.annotate(a.labels[i], (float(a.exact[i]), float(a.estimate[i])), fontsize=7)
        ax.set_title(f"{a.node_type}: r = {a.pearson:.2f}", fontsize=9)
        ax.set_xlabel("exact patching (metric units)", fontsize=8)
        ax.set_ylabel("attribution patching", fontsize=8)
    fig.tight_layout()
    return fig
