"""Head-level views of attention tensors: per-head output weights, value vectors, head splits.

These are the only places where a module's storage layout is undone. The caller passes the
layout from its ``ArchSpec``; the functions stay pure so they can run inside a remote trace.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange


def first(output, rows: int | None = None):
    """The tensor of a module output that may be a tuple (``attn`` returns ``(out, weights)``).

    The one place nnattr unwraps tuple-or-tensor outputs. With ``rows`` (the batch size), a
    residual write that the block flattened to ``[rows * pos, d_model]`` (OPT computes its MLP on
    the flattened stream) comes back as ``[rows, pos, d_model]``, a view of the same storage, so
    an in-place patch of it still reaches the forward pass; any other tensor is returned as it is.

    >>> first((torch.zeros(6, 4), None), rows=2).shape
    torch.Size([2, 3, 4])
    """
    x = output[0] if isinstance(output, (tuple, list)) else output
    return x.unflatten(0, (rows, -1)) if rows is not None and x.ndim == 2 else x


def read_at(x: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Each row's entry at its own position: ``x[i, columns[i]]``, ``[batch, pos, ...] -> [batch, ...]``.

    ``columns: [batch]`` indexes the padded positions (`nnattr.batch.Batch.columns`). A batch
    dimension of 1 (GPT-2's position embedding when no row is padded) is broadcast to every row.

    >>> read_at(torch.arange(6).view(2, 3), torch.tensor([2, 0]))
    tensor([2, 3])
    """
    if columns.ndim != 1 or x.shape[0] not in (1, columns.shape[0]):
        raise ValueError(f"x {tuple(x.shape)} and columns {tuple(columns.shape)} are not [batch, pos, ...], [batch]")
    columns = columns.to(x.device)
    return x.expand(columns.shape[0], *x.shape[1:])[torch.arange(columns.shape[0], device=x.device), columns]


def split_heads(z: torch.Tensor, *, n_heads: int) -> torch.Tensor:
    """``[..., head * d_head] -> [..., head, d_head]`` (the input of the output projection)."""
    if z.shape[-1] % n_heads:
        raise ValueError(f"last dim {z.shape[-1]} of shape {tuple(z.shape)} is not divisible by n_heads={n_heads}")
    return rearrange(z, "... (head d_head) -> ... head d_head", head=n_heads)


def o_proj_per_head(weight: torch.Tensor, *, n_heads: int, conv1d: bool = False) -> torch.Tensor:
    """The output projection as one matrix per head: ``W_O: [head, d_head, d_model]``.

    ``weight`` is ``[d_model, head * d_head]`` for ``nn.Linear`` and ``[head * d_head, d_model]``
    for GPT-2's ``Conv1D`` (``conv1d=True``).
    """
    if weight.ndim != 2:
        raise ValueError(f"o_proj weight must be 2-D, got shape {tuple(weight.shape)}")
    w_in_out = weight if conv1d else weight.T  # [head * d_head, d_model]
    if w_in_out.shape[0] % n_heads:
        raise ValueError(
            f"o_proj input width {w_in_out.shape[0]} (weight {tuple(weight.shape)}, conv1d={conv1d}) "
            f"is not divisible by n_heads={n_heads}"
        )
    return rearrange(w_in_out, "(head d_head) d_model -> head d_head d_model", head=n_heads)


def split_values(
    raw: torch.Tensor,
    *,
    layout: Literal["separate", "gpt2_fused", "neox_fused", "qkv_blocks", "grouped_qkv"],
    n_heads: int,
    n_kv_heads: int,
    d_head: int,
) -> torch.Tensor:
    """Value vectors from the output of the module that computes them.

    raw: ``[batch, pos, width]``, the output of ``attn.v_proj`` (the alias): ``v_proj`` itself
    (``"separate"``, width ``kv_head * d_head``), GPT-2's ``c_attn`` (``"gpt2_fused"``, width
    ``3 * head * d_head`` as ``[q | k | v]``) or GPT-NeoX's ``query_key_value`` (``"neox_fused"``,
    width ``head * 3 * d_head``, per head ``[q | k | v]``), Phi-3's ``qkv_proj`` (``"qkv_blocks"``,
    ``[q | k | v]`` with ``head`` query and ``kv_head`` key and value heads) or Falcon's
    ``query_key_value`` (``"grouped_qkv"``, per kv head ``[its head // kv_head queries | k | v]``,
    ``d_head`` wide each: multi-query is one group, the classic layout one group per head).

    Returns ``[batch, pos, kv_head, d_head]``.
    """
    if layout == "separate":
        v = raw  # [batch, pos, kv_head * d_head]
        heads = n_kv_heads
    elif layout == "gpt2_fused":
        v = raw.chunk(3, dim=-1)[2]  # [batch, pos, head * d_head]
        heads = n_heads
    elif layout == "neox_fused":
        per_head = rearrange(raw, "b p (head three_d) -> b p head three_d", head=n_heads)
        v = rearrange(per_head.chunk(3, dim=-1)[2], "b p head d -> b p (head d)")
        heads = n_heads
    elif layout == "qkv_blocks":
        v = raw[..., (n_heads + n_kv_heads) * d_head :]  # [batch, pos, kv_head * d_head]
        heads = n_kv_heads
    elif layout == "grouped_qkv":
        groups = rearrange(raw, "b p (kv slot d) -> b p kv slot d", kv=n_kv_heads, d=d_head)
        v = rearrange(groups[..., -1, :], "b p kv d -> b p (kv d)")  # the last slot of each group
        heads = n_kv_heads
    else:
        raise ValueError(f"unknown value layout {layout!r}; expected 'separate', 'gpt2_fused', 'neox_fused', "
                         f"'qkv_blocks' or 'grouped_qkv'")
    if v.shape[-1] != heads * d_head:
        raise ValueError(
            f"value width {v.shape[-1]} from raw shape {tuple(raw.shape)} ({layout}) != "
            f"{heads} heads * d_head {d_head}"
        )
    return rearrange(v, "b p (head d_head) -> b p head d_head", head=heads)


def expand_kv(values: torch.Tensor, *, n_heads: int) -> torch.Tensor:
    """Grouped-query attention: ``[batch, pos, kv_head, d_head] -> [batch, pos, head, d_head]``.

    Query head ``h`` reads kv head ``h // (n_heads // n_kv_heads)``, as Hugging Face's
    ``repeat_kv`` does.
    """
    n_kv = values.shape[-2]
    if n_heads % n_kv:
        raise ValueError(f"n_heads={n_heads} is not a multiple of the {n_kv} kv heads in {tuple(values.shape)}")
    return values.repeat_interleave(n_heads // n_kv, dim=-2)
