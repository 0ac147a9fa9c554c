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
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch

from .batch import Batch
from .result import Attribution

Node = Literal["resid", "attn", "attn_pos", "mlp", "mlp_pos", "head", "head_pos"]
NODES: tuple[str, ...] = Node.__args__
DEFAULT_NODES = ("resid", "attn", "mlp", "head")
Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [batch, pos, vocab] -> [batch]


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

    def inputs(self, copies: int = 1) -> dict[str, torch.Tensor]:
        """Rows ``[clean (n), corrupted (n) x copies]``, left-padded to the common width."""
        return self.inputs_of(range(len(self)), list(range(len(self))) * copies)

    def inputs_of(self, clean, corrupted) -> dict[str, torch.Tensor]:
        """Rows: the clean prompts of pairs ``clean``, then the corrupted prompts of pairs ``corrupted``."""
        a, b = self.clean.inputs, self.corrupted.inputs
        return {k: torch.cat([a[k][list(clean)], b[k][list(corrupted)]]) for k in a}

    def overlap(self) -> torch.Tensor:
        """``[pair, position]`` bool: the positions both prompts have, aligned at the last token."""
        both = torch.tensor([min(a, b) for a, b in zip(self.clean.lengths, self.corrupted.lengths)])
        width = self.clean.width
        return torch.arange(width)[None, :] >= (width - both)[:, None]

    def sites(self) -> dict[str, bool]:
        """Activations to read (``resid``, ``head``, ``attn``, ``mlp``): do we keep positions?"""
        out: dict[str, bool] = {}
        for node in self.nodes:
            out[node.removesuffix("_pos")] = out.get(node.removesuffix("_pos"), False) or positional(node)
        return out

    def results(self, values: dict[str, torch.Tensor], metrics: torch.Tensor, *, method: str, title: str,
                units: str, meta: dict | None = None) -> dict[str, Attribution]:
        """``{node type: Attribution}`` from ``{node type: [pair, layer, (head,) (position)]}`` with
        positions spanning the common width; they are cut to the corrupted prompts (the result's
        tokens), and positions outside a pair's overlap are NaN. ``metrics``: ``[2, pair]``."""
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
        for node, v in values.items():
            dims = node_dims(node)
            if positional(node):
                v = v[..., -width:].masked_fill(outside.reshape(len(self), *[1] * (v.ndim - 2), width), float("nan"))
            out[node] = Attribution(
                v, dims, {d: labels[d] for d in dims}, method=method, title=f"{title} · {node} nodes", by=node, units=units,
                metric=self.clean.metric() if self.metric is None else "custom metric", meta=dict(meta or {}),
                per_prompt=per_prompt, tokens=self.corrupted.tokens)
        return out


def positional(node: str) -> bool:
    """Whether a node type has a position axis (``resid`` and the ``*_pos`` types)."""
    return node == "resid" or node.endswith("_pos")


def node_dims(node: str) -> tuple[str, ...]:
    """The result dimensions of a node type: ``("prompt", "layer", "head", "position")`` for head_pos."""
    return ("prompt", "layer") + (("head",) if node.startswith("head") else ()) + \
        (("position",) if positional(node) else ())


def pairs(model, clean, corrupted, answer, distractor, *, metric, nodes, align) -> Pairs:
    """Check everything before a trace runs: counts, tokens, lengths, nodes and metric."""
    nodes = tuple(nodes)
    unknown = [t for t in nodes if t not in NODES]
    if unknown or not nodes:
        raise ValueError(f"unknown node types {unknown or nodes}; choose from {NODES}")
    if align not in (None, "right"):
        raise ValueError(f"align={align!r}; expected None or 'right'")
    a = Batch.of(model, clean, answer, distractor, role="answer")
    b = Batch.of(model, corrupted)
    if len(a) != len(b):
        raise ValueError(f"{len(a)} clean prompts but {len(b)} corrupted: give one corrupted prompt per clean one")
    if metric is None and a.target is None:
        raise ValueError("give answer= (and distractor=) for the default logit-difference metric, or a metric=")
    if metric is not None:
        _check_metric(metric, a.arch.d_vocab)
    per_position = [t for t in nodes if positional(t)]
    for i, (x, y) in enumerate(zip(a.lengths, b.lengths)):
        if x != y and per_position and align is None:
            raise ValueError(
                f"pair {i}: the clean prompt has {x} tokens and the corrupted prompt {y}, so per-position "
                f"node types {per_position} would compare different tokens. Pass align='right' (positions aligned at "
                f"the last token; those only one prompt has are NaN) or ask only for node types summed over positions."
            )
    width = max(a.width, b.width)
    b = replace(b, target=a.target, distractor=a.distractor)
    return Pairs(replace(a, width=width), replace(b, width=width), metric, nodes)


def _check_metric(metric, vocab: int) -> None:
    probe = torch.randn(2, 3, vocab, requires_grad=True)  # [batch, pos, vocab]
    value = metric(probe)
    if not isinstance(value, torch.Tensor) or value.shape != (2,):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"metric must map logits [batch, pos, vocab] to one value per row [batch]; "
                         f"for logits (2, 3, {vocab}) it returned {got}")
    if not value.requires_grad or torch.autograd.grad(value.sum(), probe, allow_unused=True)[0] is None:
        raise ValueError("metric does not depend on the logits it is given, so it has no gradient to attribute: "
                         "compute it from the logits argument (e.g. logits[:, -1, answer] - logits[:, -1, other])")
