"""Clean/corrupted pairs for attribution and activation patching: validated once, before any trace.

Node types: ``resid`` (layer input, per position), ``attn`` / ``mlp`` (each layer's write to the
residual stream), ``head`` (each head's slice of the output projection's input), and
``attn_pos`` / ``mlp_pos`` / ``head_pos`` per position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .arch import dims
from .inputs import as_prompts, check_unknown, token_ids, tokens_of
from .result import Attribution

NODES = ("resid", "attn", "attn_pos", "mlp", "mlp_pos", "head", "head_pos")
DEFAULT_NODES = ("resid", "attn", "mlp", "head")
Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [batch, pos, vocab] -> [batch]


@dataclass(frozen=True)
class Pairs:
    """Validated clean/corrupted pairs, shared by attribution and activation patching."""

    clean: list[str]
    corrupted: list[str]
    tokens: tuple[list[list[str]], list[list[str]]]  # clean, corrupted
    answer: list[int] | None
    distractor: list[int] | None
    metric: Metric | None
    nodes: tuple[str, ...]
    tokenizer: object

    def __len__(self) -> int:
        return len(self.clean)

    def lengths(self, side: int) -> list[int]:
        return [len(t) for t in self.tokens[side]]

    def ids(self, role: str, index) -> torch.Tensor | None:
        """Token ids of ``answer`` or ``distractor`` for pairs ``index`` (None if not given)."""
        ids = getattr(self, role)
        return None if ids is None else torch.tensor(ids[index])

    def sites(self) -> dict[str, bool]:
        """Activations to read (``resid``, ``head``, ``attn``, ``mlp``): do we keep positions?"""
        out: dict[str, bool] = {}
        for node in self.nodes:
            site = node.removesuffix("_pos")
            out[site] = out.get(site, False) or positional(node)
        return out

    def results(self, values, metrics, d, *, method: str, units: str) -> dict[str, Attribution]:
        """One ``Attribution`` per node type from ``{node type: [pair, node(, position)]}`` (positions
        right-aligned to the longest corrupted prompt; those outside a pair's overlap become NaN)."""
        width = max(self.lengths(1))
        overlap = torch.tensor([min(a, b) for a, b in zip(self.lengths(0), self.lengths(1))])
        outside = torch.arange(width)[None, :] < (width - overlap)[:, None]  # [pair, position]
        meta = {"method": method, "units": units, "clean_metric": metrics[0].tolist(),
                "corrupted_metric": metrics[1].tolist(), **self._answers()}
        labels = {"prompt": self.clean, "position": [str(i - width) for i in range(width)]}
        out = {}
        for node, v in values.items():
            per_pos = positional(node)
            if per_pos:
                v = v.masked_fill(outside[:, None, :], float("nan"))
            dims_ = ("prompt", "node", "position") if per_pos else ("prompt", "node")
            out[node] = Attribution(v, dims_, {**labels, **node_labels(node, d)}, {**meta, "node_type": node},
                                    tuple(map(tuple, self.tokens[1])))
        return out

    def _answers(self) -> dict:
        decode = lambda ids: None if ids is None else [self.tokenizer.decode([t]) for t in ids]  # noqa: E731
        return {"answer": decode(self.answer), "distractor": decode(self.distractor)}


def positional(node: str) -> bool:
    """Whether a node type has a position axis (``resid`` and the ``*_pos`` types)."""
    return node == "resid" or node.endswith("_pos")


def node_labels(node: str, d) -> dict[str, list[str]]:
    """``{"node": labels}``: ``resid_pre_3``, ``3_attn_out``, ``3_mlp_out``, ``L3H7``."""
    site = node.removesuffix("_pos")
    names = {
        "resid": [f"resid_pre_{i}" for i in range(d.n_layers)],
        "attn": [f"{i}_attn_out" for i in range(d.n_layers)],
        "mlp": [f"{i}_mlp_out" for i in range(d.n_layers)],
        "head": [f"L{i}H{h}" for i in range(d.n_layers) for h in range(d.n_heads)],
    }[site]
    return {"node": names}


def pairs(model, clean, corrupted, answer, distractor, *, metric, nodes, align) -> Pairs:
    """Check everything before a trace runs: counts, tokens, lengths, nodes and metric."""
    clean, corrupted = as_prompts(clean), as_prompts(corrupted)
    if len(clean) != len(corrupted):
        raise ValueError(f"{len(clean)} clean prompts but {len(corrupted)} corrupted: "
                         f"give one corrupted prompt per clean one")
    nodes = tuple(nodes)
    unknown = [t for t in nodes if t not in NODES]
    if unknown or not nodes:
        raise ValueError(f"unknown node types {unknown or nodes}; choose from {NODES}")
    if align not in (None, "right"):
        raise ValueError(f"align={align!r}; expected None or 'right'")
    tok = model.tokenizer
    check_unknown(tok, clean + corrupted)
    answers = token_ids(tok, answer, len(clean), role="answer")
    distractors = token_ids(tok, distractor, len(clean), role="distractor")
    if metric is None and answers is None:
        raise ValueError("give answer= (and distractor=) for the default logit-difference metric, or a metric=")
    if metric is not None:
        _check_metric(metric, dims(model).d_vocab)
    tokens = ([tokens_of(tok, q) for q in clean], [tokens_of(tok, q) for q in corrupted])
    per_position = [t for t in nodes if positional(t)]
    for i, (a, b) in enumerate(zip(*tokens)):
        if len(a) != len(b) and per_position and align is None:
            raise ValueError(
                f"pair {i}: the clean prompt has {len(a)} tokens and the corrupted prompt {len(b)}, so per-position "
                f"node types {per_position} would compare different tokens. Pass align='right' (positions aligned at "
                f"the last token; those only one prompt has are NaN) or ask only for node types summed over positions."
            )
    return Pairs(clean, corrupted, tokens, answers, distractors, metric, nodes, tok)


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
