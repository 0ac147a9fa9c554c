"""Ablation of node sets: zero, mean over reference prompts, or resampled from one reference prompt.

A node is a writer to the residual stream, named as `nnattr.circuits.writers` names them: an embedding
(``embed``, ``pos_embed``), a head (``L3H1``: its ``d_head`` slice of the output projection's input), an MLP
(``L3 MLP``: its write), and also a whole attention write (``L3 attn``) and the residual stream entering a layer
(``L3 resid``). ``@p`` restricts a node to one position (``L3H1@-2``: counted from the last token when negative,
counted from each prompt's first token otherwise). A batch row ablates one set of nodes: ``ablation_masks`` gives, per
site ``(kind, layer)`` some row ablates, a ``[rows, 1 or pos, width]`` mask (a head's channels, or width 1 for a
whole write; the positions where a node has one), and ``ablate`` replaces the masked entries of the activation
``[rows, pos, width]`` by 0, by a mean (``reference_mean``: ``[pos, width]`` per position, or ``[1, width]`` over
every real position of the reference prompts), or by a drawn reference prompt's value (``value[rows]``).

>>> nodes = ablation_nodes(2, 4)
>>> sets = [[ablation_node("L0H1", nodes)], [ablation_node("L1 MLP@-1", nodes), ablation_node("L0H1", nodes)]]
>>> masks = ablation_masks(sets, n_heads=4, d_head=2, lengths=[3, 3], width=3)
>>> {key: m.int().tolist() for key, m in masks.items()}
{('head', 0): [[[0, 0, 1, 1, 0, 0, 0, 0]], [[0, 0, 1, 1, 0, 0, 0, 0]]], ('mlp', 1): [[[0], [0], [0]], [[0], [0], [1]]]}
"""

from __future__ import annotations

from typing import Sequence

import torch

KINDS = ("embed", "pos_embed", "resid", "head", "attn", "mlp")  # forward order in a layer (embeddings: -1)


def ablation_nodes(n_layers: int, n_heads: int, embeddings: Sequence[str] = ("embed",)) -> dict[str, tuple]:
    """Every node an ablation can name, in forward order -> ``(kind, layer, head)`` (layer -1: an embedding; head
    -1: a whole write): the embeddings, then per layer the stream entering it ``L{i} resid``, its heads
    ``L{i}H{h}``, its attention write ``L{i} attn`` and its MLP write ``L{i} MLP``. (Each may also take ``@p``:
    `ablation_node`.)"""
    nodes = {name: (name, -1, -1) for name in embeddings}
    for i in range(n_layers):
        nodes[f"L{i} resid"] = ("resid", i, -1)
        nodes.update({f"L{i}H{h}": ("head", i, h) for h in range(n_heads)})
        nodes.update({f"L{i} attn": ("attn", i, -1), f"L{i} MLP": ("mlp", i, -1)})
    return nodes


def ablation_node(name: str, nodes: dict[str, tuple]) -> tuple:
    """``(kind, layer, head, position)`` of a node name, ``@p`` an optional position (None: every position). An
    unknown name is a ValueError listing the valid ones."""
    base, at, where = name.partition("@")
    if base not in nodes or (at and not where.lstrip("-").isdigit()):
        raise ValueError(f"unknown node name {name!r}; valid names: {', '.join(nodes)}, each optionally at one "
                         f"position (@-1: the last token, @0: each prompt's first)")
    return (*nodes[base], int(where) if at else None)


def ablation_sets(given, nodes: dict[str, tuple]) -> list[list[str]]:
    """Node sets from ``given``: None (every node but the attention writes and the streams, each alone), one set (a
    list of names), several (a list of lists), or text (sets separated by ``;``, names by ``,``:
    ``"L0H0,L0H2@-1;L1 MLP"``). An unknown name is a ValueError listing the valid ones."""
    if given is None:
        return [[name] for name in nodes if not name.endswith((" attn", " resid"))]
    if isinstance(given, str):
        given = [[name.strip() for name in part.split(",") if name.strip()] for part in given.split(";")]
    elif isinstance(given, Sequence) and all(isinstance(name, str) for name in given) and len(given):
        given = [given]  # one set
    if not isinstance(given, Sequence) or not len(given) or any(
            isinstance(s, (str, bytes)) or not isinstance(s, Sequence) for s in given):
        raise ValueError(f"node_sets={given!r}: give a list of node names (one set), a list of such lists, or "
                         f"text 'L0H0,L0H2;L1 MLP' (sets split by ';', names by ',')")
    sets = [list(s) for s in given]
    for name in {name for s in sets for name in s}:
        ablation_node(str(name), nodes)
    return sets


def ablation_masks(sets: Sequence[Sequence[tuple]], *, n_heads: int, d_head: int,
                   lengths: Sequence[int] | None = None, width: int | None = None) -> dict[tuple, torch.Tensor]:
    """Row ``r`` ablates the nodes ``sets[r]`` (`ablation_node` tuples): ``{(kind, layer): mask}`` in forward order,
    for the sites some row ablates; ``[rows, 1 or width, channels]``: a head's channels (``n_heads * d_head``) or 1
    for a whole write, at every position or (where a node has one) per position of the left-padded rows, whose
    token ``lengths`` and padded ``width`` place it. A position a prompt does not have is a ValueError."""
    masks: dict[tuple, torch.Tensor] = {}
    for row, nodes in enumerate(sets):
        for kind, layer, head, *where in nodes:
            pos = where[0] if where else None
            mask = masks.get((kind, layer), torch.zeros(len(sets), 1, n_heads * d_head if kind == "head" else 1,
                                                        dtype=torch.bool))
            at = slice(None)
            if pos is not None and lengths is not None:  # the real position in the left-padded row
                if not -lengths[row] <= pos < lengths[row]:
                    raise ValueError(f"position {pos} is outside a prompt of {lengths[row]} tokens: give a position "
                                     f"every prompt has (-1 is the last token)")
                mask = mask.expand(-1, width, -1).clone() if mask.shape[1] == 1 else mask
                at = width + pos if pos < 0 else width - lengths[row] + pos
            masks[kind, layer] = mask
            mask[row, at, slice(head * d_head, (head + 1) * d_head) if kind == "head" else slice(None)] = True
    return dict(sorted(masks.items(), key=lambda item: (item[0][1], KINDS.index(item[0][0]))))


def ablation_forwards(sets: Sequence[Sequence[tuple]], inputs: dict, rows: int, *, n_heads: int, d_head: int,
                      draws: torch.Tensor | None = None) -> list[tuple]:
    """The ablated rows, prompt-major (a row: prompt ``i`` with ``sets[s]`` ablated), ``rows`` per forward: per
    forward ``(owners [r], inputs, ablation_masks, picks [r])``: the rows' prompts, their rows of ``inputs``
    (``{name: [prompt, pos]}``), masks, and their reference prompts ``draws[i, s]`` (resample; else None)."""
    jobs = [(i, s) for i in range(len(inputs["input_ids"])) for s in range(len(sets))]
    plans = []
    for part in (jobs[k : k + rows] for k in range(0, len(jobs), rows)):
        owners = torch.tensor([i for i, _ in part])
        lengths = inputs["attention_mask"][owners].sum(-1).tolist() if "attention_mask" in inputs else \
            [inputs["input_ids"].shape[1]] * len(part)
        plans.append((owners, {name: x[owners] for name, x in inputs.items()},
                      ablation_masks([sets[s] for _, s in part], n_heads=n_heads, d_head=d_head, lengths=lengths,
                                     width=inputs["input_ids"].shape[1]),
                      None if draws is None else torch.stack([draws[i, s] for i, s in part])))
    return plans


def reference_mean(x: torch.Tensor, mask: torch.Tensor, *, per_position: bool, width: int) -> torch.Tensor:
    """The mean an ablation writes, in float32. x: ``[reference, pos, d]`` (left-padded); mask: ``[reference, pos]``
    (real tokens). ``per_position``: ``[width, d]``, the mean over the reference prompts at each of the last
    ``width`` positions (aligned at the last token; every prompt must have them); else ``[1, d]``, the mean over
    every real position of every reference prompt."""
    if x.ndim != 3 or mask.shape != x.shape[:2]:
        raise ValueError(f"activation {tuple(x.shape)} and mask {tuple(mask.shape)} are not [reference, pos, d], "
                         f"[reference, pos]")
    if per_position:
        return x[:, x.shape[1] - width :].float().mean(0)
    real = mask.to(device=x.device, dtype=torch.float32)[..., None]
    return ((x.float() * real).sum((0, 1)) / real.sum())[None]


def ablate(x: torch.Tensor, mask: torch.Tensor, value: torch.Tensor | None = None,
           rows: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` ``[rows or 1, pos, d]`` with the entries ``mask`` ``[rows, 1 or pos, d or 1]`` selects replaced: by 0
    (``value`` None), by ``value`` ``[pos or 1, d]`` (a mean), or by ``value[rows]`` (``value``: ``[reference, pos,
    d]``, ``rows``: ``[rows]`` reference indices, a resample). Returns ``[rows, pos, d]``."""
    if mask.ndim == 2:  # [rows, d or 1]: every position
        mask = mask[:, None]
    if mask.ndim != 3 or x.ndim != 3 or x.shape[0] not in (1, mask.shape[0]) or mask.shape[1] not in (1, x.shape[1]) \
            or mask.shape[2] not in (1, x.shape[2]):
        raise ValueError(f"activation {tuple(x.shape)} and mask {tuple(mask.shape)} are not [rows, pos, d], "
                         f"[rows, 1 or pos, d or 1]")
    if value is None:
        value = torch.zeros((), dtype=x.dtype, device=x.device)
    else:
        value = (value if rows is None else value[rows.to(value.device)]).to(device=x.device, dtype=x.dtype)
    return torch.where(mask.to(x.device), value, x)


def resample_draws(n_reference: int, n_prompts: int, n_sets: int, *, ablation: str, seed: int,
                   own: bool) -> torch.Tensor | None:
    """Which reference prompt each (prompt, set) row takes its values from (resample; None otherwise). With
    ``own`` (the reference is the prompts themselves) a row never draws its own prompt, and mean or resample
    over a single prompt is refused: it would replace the prompt by itself and change nothing."""
    if ablation != "zero" and own and n_reference < 2:
        raise ValueError(f"{ablation} ablation over the prompts themselves needs at least 2 prompts (one would be "
                         f"replaced by itself and nothing would change): give more prompts, or reference=")
    if ablation != "resample":
        return None
    generator = torch.Generator().manual_seed(seed)
    if not own:
        return torch.randint(n_reference, (n_prompts, n_sets), generator=generator)
    draws = torch.randint(n_reference - 1, (n_prompts, n_sets), generator=generator)  # skip each row's own prompt
    return draws + (draws >= torch.arange(n_prompts)[:, None]).long()
