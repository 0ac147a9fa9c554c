"""Clean/corrupted pairs for attribution and activation patching: validated once, before any trace.

Node types and the dimensions of their results (layer and head are always dimensions):

==========  ==============================================  ===================================
node type   what is patched                                 result
==========  ==============================================  ===================================
resid       the residual stream entering a layer            ``[prompt, layer, position]``
attn, mlp   a layer's attention / MLP write, all positions  ``[prompt, layer]``
attn_pos,   the same, one position at a time                ``[prompt, layer, position]``
mlp_pos
head        one head's slice of the output projection input ``[prompt, layer, head]``
head_pos    the same, one position at a time                ``[prompt, layer, head, position]``
==========  ==============================================  ===================================

Degenerate pairs are refused or flagged: a pair whose clean and corrupted prompts are the same
tokens changes nothing when patched (an error when every pair is, a warning naming the pairs
when some are); a metric that is NaN or infinite for a pair is an error naming the pairs (on
random logits before any trace, on the real runs once they are done); and activation patching
warns where a pair's gap ``|clean - corrupted|`` is under ``MIN_GAP * max(1, |clean|,
|corrupted|)``, because its recovered fraction divides by that gap.
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch

from .batch import Batch
from .kernels import overlap_mask, topk_flat
from .result import Attribution

Node = Literal["resid", "attn", "attn_pos", "mlp", "mlp_pos", "head", "head_pos"]
NODES: tuple[str, ...] = Node.__args__
DEFAULT_NODES = ("resid", "attn", "mlp", "head")
SITES = ("resid", "head", "attn", "mlp")  # where node types are read, in forward order within a layer
Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [batch, pos, vocab] -> [batch]
#: Activation patching warns where |clean - corrupted| < MIN_GAP * max(1, |clean|, |corrupted|):
#: 2% of the metric's size, and at least 0.02 metric units (logits, for the logit difference).
MIN_GAP = 0.02


@dataclass(frozen=True)
class Pairs:
    """Validated pairs: the clean and corrupted prompts as two `Batch` es of one common width,
    sharing the answers; sliced into chunks of pairs by the runner."""

    clean: Batch
    corrupted: Batch
    metric: Metric | None
    nodes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, index: slice) -> "Pairs":
        return replace(self, clean=self.clean[index], corrupted=self.corrupted[index])

    @property
    def arch(self):
        return self.clean.arch

    def inputs(self) -> dict[str, torch.Tensor]:
        """Rows ``[clean (n), corrupted (n)]``, left-padded to the common width."""
        return self.inputs_of(range(len(self)), range(len(self)))

    def inputs_of(self, clean, corrupted) -> dict[str, torch.Tensor]:
        """Rows: the clean prompts of pairs ``clean``, then the corrupted prompts of pairs ``corrupted``."""
        a, b = self.clean.inputs, self.corrupted.inputs
        return {k: torch.cat([a[k][list(clean)], b[k][list(corrupted)]]) for k in a}

    def identical(self) -> list[int]:
        """The pairs whose clean and corrupted prompts are the same tokens: patching changes nothing."""
        return [i for i, (x, y) in enumerate(zip(self.clean.ids, self.corrupted.ids)) if x == y]

    def overlap(self) -> torch.Tensor:
        """``[pair, position]`` bool: the positions both prompts have, aligned at the last token."""
        return overlap_mask(torch.tensor(self.clean.lengths), torch.tensor(self.corrupted.lengths), self.clean.width)

    def shape(self, node: str) -> tuple[int, ...]:
        """``(layer, (head,) (position))``: the nodes of a node type in one pair, over the common width."""
        return (self.arch.n_layers,) + (self.arch.n_heads,) * node.startswith("head") + \
            (self.clean.width,) * positional(node)

    def sites(self) -> dict[str, bool]:
        """Activations to read (``resid``, ``head``, ``attn``, ``mlp``): do we keep positions?"""
        out: dict[str, bool] = {}
        for node in self.nodes:
            out[node.removesuffix("_pos")] = out.get(node.removesuffix("_pos"), False) or positional(node)
        return out

    def jobs(self, entries: dict[str, list[tuple[int, ...]]]) -> list[tuple[int, str, tuple[int, ...]]]:
        """``(pair, node type, index)`` of every patched row (``entries``: `patch_entries` per node
        type); per-position nodes only where both prompts of the pair have a token."""
        overlap = self.overlap()  # [pair, position]
        return [(i, node, index) for i in range(len(self)) for node, indices in entries.items() for index in indices
                if not positional(node) or overlap[i, index[-1]]]

    def forwards(self, jobs, rows: int) -> list[list[tuple[int, str, tuple[int, ...]]]]:
        """The jobs of activation patching in forwards of at most ``rows``, sorted by their node's
        layer: each forward restarts at its first (lowest) layer and patches the later ones as
        the pass reaches them."""
        ordered = sorted(jobs, key=lambda job: job[2][0])  # stable: the order within a layer is kept
        return [ordered[i : i + rows] for i in range(0, len(ordered), rows)]

    def plan(self, jobs) -> tuple:
        """One forward of activation patching: ``(start, inputs, owners, patches)``. Row ``r`` is the
        corrupted prompt of pair ``owners[r]``, patched by job ``r``; the forward restarts at layer
        ``start`` (the lowest of its jobs); ``patches`` maps each layer with jobs, in order, to
        ``{site: (rows, source pairs, positions, channels)}``: ``resid`` / ``head`` / ``attn`` /
        ``mlp`` and the arguments of `nnattr.kernels.patched_rows` after the activations."""
        overlap, d_head, width = self.overlap(), self.arch.d_head, self.clean.width
        by_layer: dict[int, dict[str, list]] = {}
        for r, (i, node, index) in enumerate(jobs):
            site = node.removesuffix("_pos")
            where = torch.arange(width) == index[-1] if positional(node) else overlap[i]  # [pos]
            channels = None if site != "head" else torch.arange(self.arch.n_heads * d_head) // d_head == index[1]
            by_layer.setdefault(index[0], {}).setdefault(site, []).append((r, i, where, channels))
        owners = [i for i, *_ in jobs]
        patches = {layer: {s: _stack(by_layer[layer][s]) for s in SITES if s in by_layer[layer]}
                   for layer in sorted(by_layer)}
        return min(by_layer), self.inputs_of([], owners), torch.tensor(owners), patches

    def results(self, values: dict[str, torch.Tensor], metrics: torch.Tensor, *, method: str, title: str,
                units: str, meta: dict | None = None) -> dict[str, Attribution]:
        """``{node type: Attribution}`` from ``{node type: [pair, layer, (head,) (position)]}`` (or
        from values per site, ``{"head": ...}``, summed over positions for node types without them)
        with positions spanning the common width; they are cut to the corrupted prompts (the
        result's tokens), and positions outside a pair's overlap are NaN. ``metrics``: ``[2, pair]``."""
        self.check_metrics(metrics, recovery=method == "activation_patching")
        width, n = max(self.corrupted.lengths), self.arch.n_layers
        outside = ~self.overlap()[:, -width:]  # [pair, position]
        labels = {"prompt": list(self.clean.labels), "layer": [f"L{i}" for i in range(n)],
                  "head": [f"H{h}" for h in range(self.arch.n_heads)],
                  "position": [str(p - width) for p in range(width)]}
        per_prompt = {"clean_metric": metrics[0].tolist(), "corrupted_metric": metrics[1].tolist()}
        for role in ("target", "distractor"):
            if getattr(self.clean, role) is not None:
                per_prompt["answer" if role == "target" else role] = self.clean.decode(getattr(self.clean, role))
        out = {}
        for node in self.nodes:
            v, dims = values[node] if node in values else values[node.removesuffix("_pos")], node_dims(node)
            if v.ndim > len(dims):  # a node type summed over positions, read where positions were kept
                v = v.sum(-1)
            if positional(node):
                v = v[..., -width:].masked_fill(outside.reshape(len(self), *[1] * (v.ndim - 2), width), float("nan"))
            out[node] = Attribution(
                v, dims, {d: labels[d] for d in dims}, method=method, title=f"{title} · {node} nodes", by=node,
                units=units,
                metric=self.clean.metric() if self.metric is None else "custom metric", meta=dict(meta or {}),
                per_prompt=per_prompt, tokens=self.corrupted.tokens)
        return out

    def check_metrics(self, metrics: torch.Tensor, *, recovery: bool) -> None:
        """Refuse pairs whose metric (``[clean / corrupted, pair]``) is NaN or infinite; with
        ``recovery``, warn where the clean - corrupted gap is too small to divide by (`MIN_GAP`)."""
        clean, corrupted = metrics.double()
        bad = [i for i in range(len(self)) if not (clean[i].isfinite() and corrupted[i].isfinite())]
        if bad:
            i = bad[0]
            fix = "make your metric finite on these logits (a log of 0? a 0/0?)" if self.metric is not None else \
                "the model's logits are not finite (a float16 overflow? load it with dtype=torch.float32)"
            raise ValueError(f"the metric is NaN or infinite for pairs {bad[:10]} of {len(self)} (pair {i}: clean "
                             f"{clean[i].item():.4g}, corrupted {corrupted[i].item():.4g}), so every score of those "
                             f"pairs would be too: {fix}")
        if not recovery:
            return
        gap, floor = (clean - corrupted).abs(), MIN_GAP * torch.maximum(clean.abs().maximum(corrupted.abs()),
                                                                         torch.ones_like(clean))
        same = set(self.identical())  # already warned about in `pairs`
        small = [i for i in range(len(self)) if gap[i] < floor[i] and i not in same]
        if small:
            i = small[0]
            warnings.warn(
                f"pairs {small[:10]} ({len(small)} of {len(self)}): the clean - corrupted metric gap is too small to "
                f"divide by (pair {i}: clean {clean[i].item():.4g}, corrupted {corrupted[i].item():.4g}, gap "
                f"{gap[i].item():.3g} < {floor[i].item():.3g} = {MIN_GAP} × max(1, |clean|, |corrupted|)), so their "
                f"recovered fractions (patched - corrupted) / (clean - corrupted) are noise: choose corrupted prompts "
                f"that move the metric more, or read attribution patching's scores (metric units)", stacklevel=4)


def positional(node: str) -> bool:
    """Whether a node type has a position axis (``resid`` and the ``*_pos`` types)."""
    return node == "resid" or node.endswith("_pos")


def node_dims(node: str) -> tuple[str, ...]:
    """The result dimensions of a node type: ``("prompt", "layer", "head", "position")`` for head_pos."""
    return ("prompt", "layer") + (("head",) if node.startswith("head") else ()) + \
        (("position",) if positional(node) else ())


def patch_entries(node: str, shape: tuple[int, ...], candidates: Attribution | None, k: int) -> list[tuple[int, ...]]:
    """Indices ``(layer, (head,) (position))`` of a node type to patch: all of ``shape``, or the top
    ``k`` of ``candidates`` (an attribution-patching result), ranked by the magnitude of their mean
    score over pairs."""
    if candidates is None:
        grid = torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape))
        return [tuple(i) for i in grid.tolist()]
    structure = len(shape) - positional(node)  # layer (, head): must match; positions may not
    if candidates.dims != node_dims(node) or candidates.shape[1 : 1 + structure] != shape[:structure]:
        raise ValueError(f"candidates for {node!r} have dims {candidates.dims} and shape {candidates.shape}, not "
                         f"{node_dims(node)} with {shape[:structure]} layers (and heads): pass the "
                         f"attribution_patching result of the same model")
    mean = candidates.mean(align="end").values  # [layer, (head,) (position: counted from the last token)]
    top, index = topk_flat(mean, k)
    out = []
    for v, row in zip(top, index.tolist()):
        if positional(node):  # the same offset from the last token, in these pairs' common width
            row[-1] += shape[-1] - mean.shape[-1]
        if not torch.isnan(v) and row[-1] >= 0:  # a position these pairs do not have is not patched
            out.append(tuple(row))
    return out


def _stack(entries):
    rows, source, where, channels = zip(*entries)
    return (torch.tensor(rows), torch.tensor(source), torch.stack(where),
            None if channels[0] is None else torch.stack(channels))


def node_types(nodes, default=DEFAULT_NODES) -> tuple[str, ...]:
    """Node types as a tuple: one name (``"attn"``) or several; None gives ``default``. An empty or
    unknown one is refused, naming the node types there are."""
    nodes = tuple(default) if nodes is None else (nodes,) if isinstance(nodes, str) else tuple(nodes)
    unknown = [t for t in nodes if t not in NODES]
    if unknown or not nodes:
        raise ValueError(f"unknown node types {unknown}: choose one or more of {NODES}" if unknown else
                         f"no node types given: choose one or more of {NODES}")
    return nodes


def count(value, name: str, *, at_least: int = 1, default: int | None = None) -> int:
    """``value`` (None: ``default``) as an int of at least ``at_least`` (numpy ints and whole floats
    too), or a ValueError naming it: for ``rows``, ``steps``, ``k``."""
    value = default if value is None else value
    whole = isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer()
    if not whole or value < at_least:
        raise ValueError(f"{name}={value!r}: give a whole number of at least {at_least}")
    return int(value)


def pairs(model, clean, corrupted, answer, distractor, *, metric, nodes, align) -> Pairs:
    """Check everything before a trace runs: counts, tokens, lengths, nodes and metric."""
    nodes = node_types(nodes)
    if align not in (None, "right"):
        raise ValueError(f"align={align!r}; expected None or 'right'")
    a = Batch.of(model, clean, answer, distractor, role="answer")
    b = Batch.of(model, corrupted)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} clean prompts but {len(b)} corrupted: give one corrupted prompt per clean one")
    if metric is None and a.target is None:
        raise ValueError("give answer= (and distractor=; --answer and --distractor on the command line) for the "
                         "default logit-difference metric, or a metric=")
    if metric is not None:
        _check_metric(metric, a.arch.d_vocab)
        if answer is not None or distractor is not None:
            warnings.warn("answer= and distractor= do not enter a custom metric=, which reads the logits alone: the "
                          "scores are your metric's; they are kept as labels only", stacklevel=3)
    per_position = [t for t in nodes if positional(t)]
    _check_different(a, b)
    for i, (x, y) in enumerate(zip(a.lengths, b.lengths)):
        if x != y and per_position and align is None:
            raise ValueError(
                f"pair {i}: the clean prompt has {x} tokens and the corrupted prompt {y}, so per-position "
                f"node types {per_position} would compare different tokens. Pass align='right' (positions aligned at "
                f"the last token; those only one prompt has are NaN) or ask only for node types summed over positions."
            )
    width = max(a.width, b.width)
    return Pairs(replace(a, width=width), replace(b, width=width), metric, nodes)


def _check_different(clean: Batch, corrupted: Batch) -> None:
    """Refuse pairs whose two prompts are the same tokens when every pair is; warn when some are."""
    same = [i for i, (x, y) in enumerate(zip(clean.ids, corrupted.ids)) if x == y]
    if not same:
        return
    what = (f"the clean and corrupted prompts are the same tokens ({clean.labels[same[0]][:60]!r}), so patching "
            f"changes nothing (attribution patching scores 0, activation patching's recovery is 0/0 = NaN)")
    if len(same) == len(clean):
        where = "pair 0" if len(same) == 1 else f"every pair ({len(same)})"
        raise ValueError(f"{where}: {what}: give a corrupted prompt that differs from the clean one")
    warnings.warn(f"pairs {same[:10]} ({len(same)} of {len(clean)}): {what} for these pairs; give corrupted "
                  f"prompts that differ", stacklevel=4)


def _check_metric(metric, vocab: int) -> None:
    probe = torch.randn(2, 3, vocab, requires_grad=True)  # [batch, pos, vocab]
    value = metric(probe)
    if not isinstance(value, torch.Tensor) or value.shape != (2,):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"metric must map logits [batch, pos, vocab] to one value per row [batch]; "
                         f"for logits (2, 3, {vocab}) it returned {got}")
    if not torch.isfinite(value).all():
        raise ValueError(f"metric returned {value.tolist()} for random logits (2, 3, {vocab}): it must give a finite "
                         f"number per row (a log of 0, a 0/0?)")
    if not value.requires_grad or torch.autograd.grad(value.sum(), probe, allow_unused=True)[0] is None:
        raise ValueError("metric does not depend on the logits it is given, so it has no gradient to attribute: "
                         "compute it from the logits argument (e.g. logits[:, -1, answer] - logits[:, -1, other])")
