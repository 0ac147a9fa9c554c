"""Edge attribution patching (Syed et al. 2023; EAP-IG, Hanna et al. 2024), without the writer buffer.

An edge runs from a writer ``w`` (an embedding, one head's output, an MLP's output) to a reader
``r`` (one query head's query input, one kv head's key or value input, an MLP's input, the
logits) of a later point in the residual stream. Its score is

    score(w -> r) = (w_clean - w_corrupted) . d m / d x_r

summed over positions, where ``x_r`` is reader ``r``'s own copy of the residual stream it reads
(what TransformerLens's split q/k/v inputs make explicit) and ``m`` the metric, at the corrupted
run (AtP) or averaged over the path (IG). A model has no per-reader copies, so the gradient is
rebuilt exactly from what it has:

- the gradient at each projection's output (queries, keys, values: `split_qkv`) goes back
  through that head's slice of the projection weight (`reader_gradients`), which gives one
  gradient per reader in the norm's output space, and
- the pre-norm's exact vector-Jacobian product at this run's own input (`norm_vjp`: LayerNorm or
  RMSNorm, its statistics measured, not frozen) takes it to the residual stream.

Writers are never stacked into a ``[batch, pos, writer, d_model]`` buffer: a head's change is
rebuilt from the change of the output projection's input one writer layer at a time
(`head_deltas`), and `edge_scores` contracts it with one reader layer's gradients at a time.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import einsum, rearrange

Layout = Literal["separate", "gpt2_fused", "neox_fused", "qkv_blocks", "grouped_qkv"]


def split_qkv(q_raw: torch.Tensor, k_raw: torch.Tensor, v_raw: torch.Tensor, *, layout: Layout, n_heads: int,
              n_kv_heads: int, d_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values per head from the projections' outputs: ``[..., head, d_head]`` each
    (keys and values with ``kv_head`` heads, queries with ``head``).

    ``"separate"``: three modules (``q_proj``, ``k_proj``, ``v_proj``); every fused layout passes the
    one fused output three times (see `nnattr.kernels.split_values` for the layouts).

    >>> q, k, v = split_qkv(*[torch.arange(12.).view(1, 12)] * 3, layout="gpt2_fused", n_heads=2,
    ...                     n_kv_heads=2, d_head=2)
    >>> q.tolist(), v.tolist()
    ([[[0.0, 1.0], [2.0, 3.0]]], [[[8.0, 9.0], [10.0, 11.0]]])
    """
    h, kv, d = n_heads, n_kv_heads, d_head
    if layout == "separate":
        q, k, v = q_raw, k_raw, v_raw
    elif layout == "gpt2_fused":
        q, k, v = q_raw.chunk(3, dim=-1)
    elif layout == "neox_fused":
        q, k, v = (rearrange(x, "... (head d) -> ... head d", head=h)
                   for x in rearrange(q_raw, "... (head three d) -> three ... (head d)", head=h, three=3))
        return q, k, v
    elif layout == "qkv_blocks":
        q, k, v = q_raw[..., : h * d], q_raw[..., h * d : (h + kv) * d], q_raw[..., (h + kv) * d :]
    elif layout == "grouped_qkv":  # per kv head: its h // kv queries, then k, then v
        groups = rearrange(q_raw, "... (kv slot d) -> ... kv slot d", kv=kv, d=d)
        return (rearrange(groups[..., :-2, :], "... kv slot d -> ... (kv slot) d"), groups[..., -2, :],
                groups[..., -1, :])
    else:
        raise ValueError(f"unknown qkv layout {layout!r}")
    for x, heads in ((q, h), (k, kv), (v, kv)):
        if x.shape[-1] != heads * d:
            raise ValueError(f"projection width {x.shape[-1]} ({layout}) != {heads} heads * d_head {d}")
    return tuple(rearrange(x, "... (head d) -> ... head d", d=d) for x in (q, k, v))


def qkv_weights(weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, conv1d: bool = False,
                **layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each head's slice of the query, key and value projections: ``[head, d_model, d_head]`` each.

    weights: the ``q_proj``, ``k_proj``, ``v_proj`` weights (the fused weight three times), as
    ``nn.Linear`` stores them (``[out, in]``) or as GPT-2's ``Conv1D`` (``[in, out]``, ``conv1d=True``);
    ``layout``: the keyword arguments of `split_qkv`.
    """
    as_in_out = [w if conv1d else w.T for w in weights]  # [d_model, out]: rows as positions for split_qkv
    return tuple(rearrange(x, "d_model head d_head -> head d_model d_head") for x in split_qkv(*as_in_out, **layout))


def reader_gradients(grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor], stream: torch.Tensor,
                     norm_weight: torch.Tensor | None, *, layout: Layout, n_heads: int, n_kv_heads: int, d_head: int,
                     norm: Literal["layernorm", "rmsnorm"], eps: float, weight_offset: float = 0.0,
                     conv1d: bool = False) -> torch.Tensor:
    """Each attention reader's gradient in the residual stream: ``[..., head + 2 * kv_head, d_model]``,
    the query heads, then the kv heads' keys, then their values.

    grads: the gradients at the query, key and value projections' outputs (the fused one three
    times); weights: those projections' weights (see `qkv_weights`); stream: ``[..., d_model]`` the
    residual stream the attention reads through its norm, ``norm_weight`` (None: no norm). The
    norm's weight and scale are folded into the projection and the compact gradients, so only the
    norm's two rank-one corrections touch the ``[..., reader, d_model]`` result (`norm_vjp`).
    """
    shape = dict(layout=layout, n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=d_head)
    unit, scale = _unit(stream, norm=norm, eps=eps) if norm_weight is not None else (None, None)
    folded = norm_weight is not None and norm_weight.detach().float()[:, None] + weight_offset  # [d_model, 1]
    out = torch.cat([einsum(g.detach().float() / (1 if scale is None else scale[..., None]),
                            w.detach().float() * (1 if folded is False else folded),
                            "... head e, head d e -> ... head d")
                     for g, w in zip(split_qkv(*grads, **shape), qkv_weights(weights, conv1d=conv1d, **shape))], dim=-2)
    return out if unit is None else _project_out(out, unit, norm)


def layer_readers(grads: list[torch.Tensor], weights: list[torch.Tensor], streams: tuple[torch.Tensor, torch.Tensor],
                  norm_weights: tuple[torch.Tensor | None, torch.Tensor | None], *, steps: int = 0,
                  conv1d: bool = False, **shape_and_norm) -> torch.Tensor:
    """One layer's readers' gradients in the residual stream, ``[n, pos, reader, d_model]``: its
    attention readers (`reader_gradients`), then its MLP (`norm_vjp`), averaged over ``steps``.

    grads: the gradients at the q, k, v projections' outputs and at the MLP's input (OPT's flattened
    ``[rows * pos, d_model]`` is unflattened); streams: what attention and the MLP read through their
    norms, whose weights are ``norm_weights`` (None: no norm).
    """
    shape = {k: shape_and_norm[k] for k in ("layout", "n_heads", "n_kv_heads", "d_head")}
    norm = {k: v for k, v in shape_and_norm.items() if k not in shape}
    attn = reader_gradients(grads[:3], weights, streams[0], norm_weights[0], conv1d=conv1d, **shape, **norm)
    mlp = grads[3].unflatten(0, (streams[1].shape[0], -1)) if grads[3].ndim == 2 else grads[3]
    mlp = norm_vjp(streams[1], mlp, norm_weights[1], **norm)  # [rows, pos, d_model]
    return path_mean(torch.cat([attn, mlp[:, :, None]], 2), steps=steps)


def _unit(x: torch.Tensor, *, norm: str, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised input and the norm's scale: ``([..., d_model], [..., 1])``."""
    x = x.detach().float()
    centred = x - x.mean(-1, keepdim=True) if norm == "layernorm" else x
    scale = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    return centred / scale, scale


def _project_out(u: torch.Tensor, unit: torch.Tensor, norm: str) -> torch.Tensor:
    """``u - mean(u) - unit (unit . u) / d`` (no mean for RMSNorm) over the last dimension, in place, for
    ``u: [..., reader, d]`` and ``unit: [..., d]``: the norm's Jacobian after its weight and scale."""
    flat, d = u.view(-1, *u.shape[-2:]), u.shape[-1]  # [positions, reader, d]
    basis = unit.reshape(-1, 1, d)  # [positions, 1, d]
    coef = torch.bmm(flat, basis.transpose(1, 2)) / d  # [positions, reader, 1]
    if norm == "layernorm":
        basis = torch.cat([basis, torch.ones_like(basis)], 1)  # [positions, 2, d]
        coef = torch.cat([coef, flat.mean(-1, keepdim=True)], 2)  # [positions, reader, 2]
    return torch.baddbmm(flat, coef, basis, alpha=-1).view_as(u)


def norm_vjp(x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor | None, *,
             norm: Literal["layernorm", "rmsnorm"], eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """The gradient at a norm's input from the gradient at its output, exactly, at this input.

    x: ``[..., d_model]`` the norm's input (its statistics are measured here); grad: ``[..., d_model]``
    or ``[..., reader, d_model]`` (one gradient per reader, sharing ``x``); weight: the norm's
    weight (``(offset + weight)`` multiplies, Gemma's ``offset = 1``), or None for no norm at all
    (the gradient passes unchanged). The bias does not enter. Returns ``grad``'s shape, float32.
    """
    if weight is None:
        return grad.detach().float()
    unit, scale = _unit(x, norm=norm, eps=eps)
    readers = grad.ndim == x.ndim + 1
    g = grad.detach().float() * (weight.detach().float() + weight_offset) / (scale[..., None] if readers else scale)
    out = _project_out(g if readers else g.unsqueeze(-2), unit, norm)
    return out if readers else out.squeeze(-2)


def path_mean(x: torch.Tensor, *, steps: int = 0) -> torch.Tensor:
    """``x`` itself (``steps=0``: AtP), or its mean over ``steps`` blocks of rows (integrated
    gradients): ``[max(steps, 1) * n, ...] -> [n, ...]``."""
    if steps == 0:
        return x
    if x.shape[0] % steps:
        raise ValueError(f"{tuple(x.shape)} does not hold {steps} blocks of rows")
    return x.unflatten(0, (steps, -1)).mean(0)


def head_deltas(delta_z: torch.Tensor, W_O: torch.Tensor, post: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                norm: Literal["layernorm", "rmsnorm"] = "rmsnorm", eps: float = 0.0,
                weight_offset: float = 0.0) -> torch.Tensor:
    """Each head's change of its write: ``[..., head * d_head] x [head, d_head, d_model] -> [..., head, d_model]``
    (the output projection's bias cancels in a difference; scores only: no gradient flows back).

    ``post = (attention output, weight)``: the write passes a norm after attention (Gemma-2/3,
    OLMo-2/3), taken here at its scale measured on that output and frozen, so the heads' changes
    sum to the change of the write only to first order.
    """
    z = rearrange(delta_z.detach().float(), "... (head d) -> ... head d", head=W_O.shape[0])
    out = einsum(z, W_O.detach().float(), "... head e, head e d -> ... head d")
    if post is None:
        return out
    x, weight = post[0].detach().float(), post[1].detach().float() + weight_offset
    if norm == "layernorm":
        x, out = x - x.mean(-1, keepdim=True), out - out.mean(-1, keepdim=True)
    return out * (weight / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)).unsqueeze(-2)


def edges_into(grads: torch.Tensor, embeds: torch.Tensor, z: list[torch.Tensor], mlps: list[torch.Tensor], *,
               W_O: list[torch.Tensor], n_heads: int, conv1d: bool = False, layer: int, parallel: bool = False,
               post: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None, fixed: torch.Tensor | None = None,
               **norm) -> torch.Tensor:
    """The scores of every edge into one reader layer: ``[n, writer, reader]``, NaN where no edge runs.

    grads: ``[n, pos, reader, d_model]`` the readers' gradients in the residual stream (layer
    ``layer``'s attention readers then its MLP; or the logits, ``layer = len(z)``); embeds:
    ``[n, pos, embedding, d_model]`` the embeddings' changes; per layer, z: the change of the output
    projection's input ``[n, pos, head * d_head]``, mlps: the MLP write's change ``[n, pos, d_model]``,
    W_O: the output projection's weight as stored (``conv1d``: ``[in, out]``); ``post``, ``norm``: see
    `head_deltas`. Writers: the
    embeddings, then per layer its heads and its MLP. A layer's MLP reads its own heads unless the
    block is ``parallel``. Each layer's head changes are rebuilt here, one layer at a time, so no
    ``[n, pos, writer, d_model]`` buffer is ever held. ``fixed`` ``[n, w, r]``: scores that replace the first ``w``
    writers' edges into the first ``r`` readers (AtP*'s QK fix: `nnattr.kernels.qk_edges`).
    """
    norm = {key: norm[key] for key in ("norm", "eps", "weight_offset") if key in norm}  # (a layout may come too)

    def product(deltas, g):  # [n, pos, w, d] . [n, pos, r, d] summed over pos and d: one small matmul per position
        flat = deltas.detach().float().flatten(0, 1) @ g.detach().float().flatten(0, 1).transpose(1, 2)
        return flat.unflatten(0, deltas.shape[:2]).sum(1)  # [n, w, r]

    blocks, deltas = [], writer_deltas(embeds, z, mlps, W_O=W_O, n_heads=n_heads, conv1d=conv1d, upto=layer,
                                       post=post, **norm)
    blocks.append(product(next(deltas), grads))
    for writes in deltas:  # the writer layers before this one: [n, pos, head + 1, d_model]
        blocks.append(product(writes, grads))
    for i in range(min(layer, len(z)), len(z)):
        block = torch.full((grads.shape[0], n_heads + 1, grads.shape[2]), float("nan"), device=grads.device)
        if i == layer and not parallel:  # this layer's heads into this layer's MLP (the last reader)
            W = rearrange(W_O[i] if conv1d else W_O[i].T, "(head e) d -> head e d", head=n_heads)
            heads = head_deltas(z[i], W, None if post is None else post[i], **norm)  # [n, pos, head, d_model]
            block[:, :-1, -1:] = product(heads, grads[:, :, -1:])
        blocks.append(block)
    out = torch.cat(blocks, 1)
    if fixed is not None:
        out[:, : fixed.shape[1], : fixed.shape[2]] = fixed.to(out.device)
    return out


def writer_deltas(embeds: torch.Tensor, z: list[torch.Tensor], mlps: list[torch.Tensor], *, W_O: list[torch.Tensor],
                  n_heads: int, upto: int, conv1d: bool = False,
                  post: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None, **norm):
    """The writers' changes one block at a time (a generator, so no ``[n, pos, writer, d_model]`` buffer is held):
    the embeddings ``[n, pos, embedding, d_model]``, then for each layer before ``upto`` its heads and its MLP
    ``[n, pos, head + 1, d_model]``. Arguments as `edges_into`'s."""
    norm = {key: norm[key] for key in ("norm", "eps", "weight_offset") if key in norm}
    yield embeds
    for i in range(min(upto, len(z))):
        W = rearrange(W_O[i] if conv1d else W_O[i].T, "(head e) d -> head e d", head=n_heads)  # per head
        heads = head_deltas(z[i], W, None if post is None else post[i], **norm)  # [n, pos, head, d_model]
        yield torch.cat([heads, mlps[i][:, :, None].float()], 2)


def top_edges(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair's ``k`` largest edges by magnitude (NaN: no edge, never chosen): values ``[n, k]`` and
    ``(writer, reader)`` indices ``[n, k, 2]``."""
    flat = scores.flatten(1)
    key = flat.abs().nan_to_num(-1.0)
    order = key.topk(min(k, flat.shape[1]), dim=1).indices  # [n, k]
    return flat.gather(1, order), torch.stack([order // scores.shape[2], order % scores.shape[2]], -1)


def apply_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None, *,
               norm: Literal["layernorm", "rmsnorm"], eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """A pre-norm recomputed from its weights, on any ``[..., d_model]`` (readers' own inputs): LayerNorm or
    RMSNorm times ``(offset + weight)`` plus ``bias``; ``weight=None``: no norm (the input itself)."""
    if weight is None:
        return x
    unit, _ = _unit(x, norm=norm, eps=eps)
    out = unit * (weight.float() + weight_offset)
    return (out if bias is None else out + bias.float()).to(x.dtype)


def reader_projections(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, columns: torch.Tensor, *,
                       conv1d: bool = False) -> torch.Tensor:
    """Each reader's own columns of a projection, from its own input: ``[..., reader, d_model] -> [..., reader, c]``.

    columns: ``[reader, c]``, the output columns (one head's query, key or value) each reader computes;
    weight: as stored (``nn.Linear``: ``[out, in]``; ``conv1d``: ``[in, out]``).
    """
    W = (weight.T if conv1d else weight)[columns]  # [reader, c, d_model]
    out = einsum(x, W.to(x.dtype), "... r d, r c d -> ... r c")
    return out if bias is None else out + bias[columns].to(x.dtype)


def ablated_streams(x: torch.Tensor, changes: list[torch.Tensor], mask: torch.Tensor,
                    post: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None] | None = None, *,
                    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm", eps: float = 0.0,
                    weight_offset: float = 0.0, **_) -> torch.Tensor:
    """Each reader's own copy of the stream with its ablated edges taken out (circuit faithfulness).

    x: ``[rows, pos, d_model]`` the stream the readers read; changes: per writer block ``[rows, pos, w, d_model]``
    (each writer's value in this run minus its ablated value), in the order of ``mask``'s writers; mask:
    ``[rows, reader, writer]`` (or ``[rows, writer]`` for one reader), 1 where the edge is ablated (writers past
    the blocks given are ignored). ``post``: per block None, or ``(weight, heads, bias)`` where the block is a
    layer's heads whose sum passes a norm after attention (Gemma-2/3, OLMo-2/3): ``heads`` ``[rows, pos, head,
    d_model]`` are their values in this run before that norm (``bias``: the output projection's, or None), and
    the reader sees the norm of its own attention output, its kept heads' values plus its ablated heads' ablated
    values, in place of the norm of the whole: the norm recomputed for each reader, summed from the heads it
    keeps (so ablating every head gives exactly the bias, not a difference of nearly equal terms).
    Returns ``[rows, pos, reader, d_model]`` (or ``[rows, pos, d_model]``).
    """
    one = mask.ndim == 2
    mask, out, start = (mask[:, None] if one else mask), x[:, :, None], 0
    for block, extra in zip(changes, post or [None] * len(changes)):
        m = mask[:, :, start : start + block.shape[2]].to(block.dtype)  # [rows, reader, w]
        if extra is None:
            moved = einsum(block, m, "b p w d, b r w -> b p r d")
        else:
            weight, heads, bias = extra[0], extra[1], 0 if extra[2] is None else extra[2]
            whole = heads.sum(2, keepdim=True) + bias  # [rows, pos, 1, d_model]
            own = einsum(heads, 1 - m, "b p w d, b r w -> b p r d") + einsum(heads - block, m,
                                                                             "b p w d, b r w -> b p r d") + bias
            shape = dict(norm=norm, eps=eps, weight_offset=weight_offset)
            moved = apply_norm(whole, weight, **shape) - apply_norm(own, weight, **shape)
        out, start = out - moved, start + block.shape[2]
    return out[:, :, 0] if one else out
