"""Attention kernels: rollout, per-head flow, value-weighted and norm-based attention, metrics.

Pure functions, tensors in and out. They also run inside an nnsight trace on NDIF, so this
module imports only torch, einops, math, typing and __future__.

Conventions: ``pattern`` holds softmax probabilities; padding is ``key_mask: [batch, key]``
(bool, True = real token); a query is the token at the same position among the last ``query``
keys (causal LMs, with or without a KV cache). Math runs in float32 (float64 stays float64)
with autocast off, because NDIF runs blocks under bf16 autocast: bf16 in, float32 out.
"""

from __future__ import annotations

import math
from typing import Literal

import einops
import torch

from ._precision import no_autocast as _no_autocast

HeadFusion = Literal["mean", "max", "min"]
VectorNorm = Literal["l1", "l2", "linf"]

_NORM_ORD = {"l1": 1.0, "l2": 2.0, "linf": math.inf}
_CHUNK_ELEMENTS = 1 << 26  # most elements of one [batch, key_chunk, head, d_model] block


def _dims(x: torch.Tensor, name: str, dims: str) -> tuple:
    """``x``'s shape, after checking it has the named axes (e.g. ``"batch head query key"``)."""
    if x.ndim != len(dims.split()):
        raise ValueError(f"{name} must be [{', '.join(dims.split())}]; got shape {tuple(x.shape)}")
    return tuple(x.shape)


def _check_mask(key_mask: torch.Tensor | None, batch: int, key: int, against: str) -> None:
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (batch, key)):
        raise ValueError(
            f"key_mask must be a bool tensor [batch, key] = [{batch}, {key}] to match {against}; "
            f"got {key_mask.dtype} of shape {tuple(key_mask.shape)}"
        )


def _check_square(pattern: torch.Tensor, residual: float) -> None:
    if pattern.shape[-2] != pattern.shape[-1]:
        raise ValueError(f"composing layers needs query == key; got pattern {tuple(pattern.shape)}")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must lie in [0, 1]; got {residual}")


def _dtype(*xs: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16 and fp16 are upcast)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in xs) else torch.float32


def _mask_(a: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero padded keys and padded query rows of a fresh ``a: [batch, ..., query, key]`` in place.

    ``masked_fill_``, not a product, so NaN in padded rows (a fully masked softmax) goes too.
    """
    if key_mask is not None:
        query, key = a.shape[-2:]
        lead = (1,) * (a.ndim - 3)
        keys = key_mask.view(a.shape[0], *lead, 1, key)  # [batch, 1..., 1, key]
        queries = key_mask[:, key - query :].reshape(a.shape[0], *lead, query, 1)  # [batch, 1..., query, 1]
        a.masked_fill_(~(keys & queries), 0.0)
    return a


def _mix_mask_normalise_(a: torch.Tensor, key_mask: torch.Tensor | None, residual: float) -> torch.Tensor:
    """(1 - r) a + r I, masked, rows renormalised (0 rows stay 0), in place on a fresh ``a``.

    In place because streaming rollout's peak memory is one pattern plus three ``[batch, query, key]``.
    """
    if residual:
        a.mul_(1.0 - residual).diagonal(dim1=-2, dim2=-1).add_(residual)
    _mask_(a, key_mask)
    total = a.sum(-1, keepdim=True)  # [batch, ..., query, 1]
    return a.div_(torch.where(total > 0, total, 1.0))


def rollout_step(
    state: torch.Tensor | None,
    pattern: torch.Tensor,
    *,
    residual: float = 0.5,
    head_fusion: HeadFusion = "mean",
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer of attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow").

    Â = norm((1 - r) · fuse_h(A_h) + r · I), the row-normalised mix of the head-fused pattern
    with the identity standing for the residual stream; rollout = Â_l · rollout_{l-1}, and
    rollout_0 = Â_0 (pass ``state=None`` for the first layer). Padded keys get zero mass and rows
    are renormalised over real keys: rows of real queries sum to 1, padded query rows are all 0
    (so is a real row with no mass on real keys at r = 0, e.g. ``"min"`` over disjoint heads).

    Shapes: ``state: [batch, query, key]`` or None; ``pattern: [batch, head, query, key]``
    (query == key); ``key_mask: [batch, key]``. Returns ``[batch, query, key]``, float32.

    >>> A = torch.eye(3).expand(2, 4, 3, 3)  # [batch, head, query, key]
    >>> state = rollout_step(None, A)
    >>> torch.equal(rollout_step(state, A), torch.eye(3).expand(2, 3, 3))
    True
    """
    batch, _, query, key = _dims(pattern, "pattern", "batch head query key")
    _check_square(pattern, residual)
    if head_fusion not in ("mean", "max", "min"):
        raise ValueError(f"unknown head_fusion {head_fusion!r}; expected 'mean', 'max' or 'min'")
    _check_mask(key_mask, batch, key, f"pattern {tuple(pattern.shape)}")
    if state is not None and tuple(state.shape) != (batch, query, key):
        raise ValueError(f"state {tuple(state.shape)} must be [batch, query, key] = {[batch, query, key]}")
    dtype = _dtype(state, pattern)
    with _no_autocast(pattern):
        if head_fusion == "mean":
            fused = pattern.mean(1, dtype=dtype)  # [batch, query, key]
        else:
            fused = pattern.amax(1) if head_fusion == "max" else pattern.amin(1)  # autograd keeps it:
            fused = fused.to(dtype, copy=True)  # copy before the in-place steps
        step = _mix_mask_normalise_(fused, key_mask, residual)  # [batch, query, key]
        return step if state is None else torch.bmm(step, state.to(dtype))


def rollout(
    patterns: torch.Tensor,
    *,
    residual: float = 0.5,
    head_fusion: HeadFusion = "mean",
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention rollout over all layers (Abnar & Zuidema 2020): Â_{L-1} ··· Â_1 Â_0.

    A fold of :func:`rollout_step` over layers, so it equals streaming layer by layer exactly;
    prefer streaming when the patterns need not all be alive at once (see the docs' benchmark).

    Shapes: ``patterns: [layer, batch, head, query, key]``; returns ``[batch, query, key]``.

    >>> rollout(torch.eye(3).expand(2, 1, 2, 3, 3)).shape
    torch.Size([1, 3, 3])
    """
    _dims(patterns, "patterns", "layer batch head query key")
    if patterns.shape[0] == 0:
        raise ValueError(f"patterns {tuple(patterns.shape)} has no layers")
    state = None
    for pattern in patterns:  # pattern: [batch, head, query, key]
        state = rollout_step(state, pattern, residual=residual, head_fusion=head_fusion, key_mask=key_mask)
    return state


def flow_step(
    state: torch.Tensor | None,
    pattern: torch.Tensor,
    *,
    residual: float = 0.0,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer of per-head attention flow: F_{l,h} = Â_{l,h} · F_{l-1,h}, F_{0,h} = Â_{0,h}.

    Rollout without head fusion: head h of layer l composes with head h of layer l-1. Â_{l,h} is
    masked, mixed with r · I (``residual``, default 0) and renormalised as in :func:`rollout_step`.
    This is path composition, not the max-flow "attention flow" of Abnar & Zuidema 2020, and head
    indices carry no meaning across layers: read it per head, as a diagnostic.

    Shapes: ``state: [batch, head, query, key]`` or None; ``pattern: [batch, head, query, key]``;
    ``key_mask: [batch, key]``. Returns ``[batch, head, query, key]``, float32.

    >>> flow_step(None, torch.full((1, 2, 2, 2), 0.5)).sum(-1)
    tensor([[[1., 1.],
             [1., 1.]]])
    """
    batch, _, _, key = _dims(pattern, "pattern", "batch head query key")
    _check_square(pattern, residual)
    _check_mask(key_mask, batch, key, f"pattern {tuple(pattern.shape)}")
    if state is not None and state.shape != pattern.shape:
        raise ValueError(f"state {tuple(state.shape)} must match pattern {tuple(pattern.shape)}")
    dtype = _dtype(state, pattern)
    with _no_autocast(pattern):
        step = _mix_mask_normalise_(pattern.to(dtype, copy=True), key_mask, residual)  # [batch, head, query, key]
        return step if state is None else step @ state.to(dtype)


def attention_flow(
    patterns: torch.Tensor,
    *,
    residual: float = 0.0,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head flow at every layer, a fold of :func:`flow_step` (see its caveats).

    Shapes: ``patterns: [layer, batch, head, query, key]``; returns the same shape, float32.

    >>> attention_flow(torch.eye(2).expand(3, 1, 4, 2, 2)).shape
    torch.Size([3, 1, 4, 2, 2])
    """
    _dims(patterns, "patterns", "layer batch head query key")
    flows = torch.empty(patterns.shape, dtype=_dtype(patterns), device=patterns.device)
    state = None
    for layer, pattern in enumerate(patterns):  # pattern: [batch, head, query, key]
        state = flows[layer] = flow_step(state, pattern, residual=residual, key_mask=key_mask)
    return flows


def _check_values(pattern: torch.Tensor, values: torch.Tensor) -> int:
    """Heads per kv head (1 without grouped-query attention), after checking ``values``' shape."""
    batch, n_heads, _, key = _dims(pattern, "pattern", "batch head query key")
    _, _, n_kv, _ = _dims(values, "values", "batch key kv_head d_head")
    if values.shape[:2] != (batch, key):
        raise ValueError(
            f"values {tuple(values.shape)} must be [batch, key, kv_head, d_head] with "
            f"batch={batch}, key={key} to match pattern {tuple(pattern.shape)}"
        )
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(
            f"pattern {tuple(pattern.shape)} has {n_heads} heads, not a multiple of the {n_kv} kv "
            f"heads of values {tuple(values.shape)}"
        )
    return n_heads // n_kv


def value_weighted(
    pattern: torch.Tensor,
    values: torch.Tensor,
    *,
    norm: VectorNorm = "l2",
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention weighted by value size: A'_{h,q,k} ∝ A_{h,q,k} · ‖v_{kv(h),k}‖, rows renormalised.

    A simplification of Kobayashi et al. 2020 ("Attention is Not Only a Weight") that leaves out
    W_O (:func:`norm_based` keeps it). With grouped-query attention head h reads kv head
    h // (n_heads // n_kv_heads), as Hugging Face's ``repeat_kv``. Padded keys get 0 and rows are
    renormalised as in rollout. ``values`` come from ``nnattr.kernels.heads.split_values``.

    Shapes: ``pattern: [batch, head, query, key]``; ``values: [batch, key, kv_head, d_head]``;
    ``key_mask: [batch, key]``. Returns ``[batch, head, query, key]``, float32.

    >>> value_weighted(torch.full((1, 2, 1, 2), 0.5), torch.tensor([1.0, 3.0]).view(1, 2, 1, 1))
    tensor([[[[0.2500, 0.7500]],
    <BLANKLINE>
             [[0.2500, 0.7500]]]])
    """
    group = _check_values(pattern, values)
    if norm not in _NORM_ORD:
        raise ValueError(f"unknown norm {norm!r}; expected 'l1', 'l2' or 'linf'")
    _check_mask(key_mask, pattern.shape[0], pattern.shape[-1], f"pattern {tuple(pattern.shape)}")
    dtype = _dtype(pattern, values)
    with _no_autocast(pattern):
        size = torch.linalg.vector_norm(values.to(dtype), ord=_NORM_ORD[norm], dim=-1)  # [batch, key, kv_head]
        size = einops.repeat(size, "batch key kv -> batch (kv group) 1 key", group=group)  # [batch, head, 1, key]
        return _mix_mask_normalise_(pattern.to(dtype) * size, key_mask, 0.0)


def _head_outputs(values: torch.Tensor, W_O: torch.Tensor, group: int, cross: bool) -> torch.Tensor:
    """Reductions of f_h(k) = v_{kv(h),k} W_O^h, built over key chunks so that the whole
    ``[batch, key, head, d_model]`` never exists: ‖f_h‖ ``[batch, key, head]``, or with ``cross``
    the Gram matrix ⟨f_h, f_g⟩ ``[batch, key, head, head]``."""
    W = einops.rearrange(W_O, "(kv group) d_head d_model -> kv group d_head d_model", group=group)
    batch, key = values.shape[:2]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * W_O.shape[0] * W_O.shape[-1]))
    parts = []
    for start in range(0, key, chunk):
        f = torch.einsum("bkvd,vgdm->bkvgm", values[:, start : start + chunk], W)  # [batch, chunk, kv, group, d_model]
        f = einops.rearrange(f, "b k kv group m -> b k (kv group) m")  # [batch, chunk, head, d_model]
        parts.append(torch.einsum("bkhm,bkgm->bkhg", f, f) if cross else torch.linalg.vector_norm(f, dim=-1))
    return torch.cat(parts, dim=1)


def norm_based(
    pattern: torch.Tensor,
    values: torch.Tensor,
    W_O: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Norm-based attention per head (Kobayashi et al. 2020, "Attention is Not Only a Weight").

    ‖α_{h,q,k} v_{kv(h),k} W_O^h‖₂ = α_{h,q,k} ‖v_{kv(h),k} W_O^h‖₂ → ``[batch, head, query, key]``,
    without building ``[batch, key, head, d_model]``. Not renormalised; padded keys and padded
    query rows are 0. `norm_based_layer` is the same over all heads together.

    Shapes: ``pattern: [batch, head, query, key]``; ``values: [batch, key, kv_head, d_head]``;
    ``W_O: [head, d_head, d_model]``, from ``nnattr.kernels.heads.o_proj_per_head``, which undoes
    GPT-2's Conv1D ``[(head d_head), d_model]`` and Llama's Linear ``[d_model, (head d_head)]``.

    >>> norm_based(torch.ones(1, 2, 1, 1), torch.ones(1, 1, 1, 1), torch.ones(2, 1, 3))
    tensor([[[[1.7321]],
    <BLANKLINE>
             [[1.7321]]]])
    """
    alpha, outputs = _norm_inputs(pattern, values, W_O, key_mask, cross=False)
    with _no_autocast(pattern):
        return alpha * einops.rearrange(outputs, "batch key head -> batch head 1 key")


def norm_based_layer(
    pattern: torch.Tensor,
    values: torch.Tensor,
    W_O: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Norm-based attention of a whole layer: ‖Σ_h α_{h,q,k} v_{kv(h),k} W_O^h‖₂ → ``[batch, query, key]``.

    Computed as sqrt(Σ_{h,g} α_h α_g ⟨f_h, f_g⟩) from a per-key head Gram matrix, so neither
    ``[batch, head, query, key, d_model]`` nor ``[batch, key, head, d_model]`` is ever built.
    Shapes and masking as in `norm_based`.

    >>> norm_based_layer(torch.ones(1, 2, 1, 1), torch.ones(1, 1, 1, 1), torch.ones(2, 1, 3))
    tensor([[[3.4641]]])
    """
    alpha, gram = _norm_inputs(pattern, values, W_O, key_mask, cross=True)
    with _no_autocast(pattern):
        mixed = torch.einsum("bhqk,bkhg->bgqk", alpha, gram)  # [batch, head, query, key]
        square = (mixed * alpha).sum(1)  # [batch, query, key]; rounding can make it slightly < 0
        positive = square > 0
        return torch.where(positive, torch.where(positive, square, 1.0).sqrt(), 0.0)  # no inf grad at 0


def _norm_inputs(pattern, values, W_O, key_mask, *, cross: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked, masked ``alpha [batch, head, query, key]`` and the per-key head reductions."""
    group = _check_values(pattern, values)
    n_heads, d_head = pattern.shape[1], values.shape[-1]
    if W_O.ndim != 3 or W_O.shape[:2] != (n_heads, d_head):
        raise ValueError(
            f"W_O {tuple(W_O.shape)} must be [head, d_head, d_model] with head={n_heads}, "
            f"d_head={d_head} to match pattern {tuple(pattern.shape)} and values {tuple(values.shape)}"
        )
    _check_mask(key_mask, pattern.shape[0], pattern.shape[-1], f"pattern {tuple(pattern.shape)}")
    dtype = _dtype(pattern, values, W_O)
    with _no_autocast(pattern):
        alpha = _mask_(pattern.to(dtype, copy=True), key_mask)
        return alpha, _head_outputs(values.to(dtype), W_O.to(dtype), group, cross=cross)


def _rows(pattern: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """``pattern: [batch, ..., query, key]`` masked and row-normalised (0 rows stay 0)."""
    if pattern.ndim < (2 if key_mask is None else 3):
        raise ValueError(f"pattern must be [batch, ..., query, key]; got shape {tuple(pattern.shape)}")
    if key_mask is not None:
        _check_mask(key_mask, pattern.shape[0], pattern.shape[-1], f"pattern {tuple(pattern.shape)}")
    return _mix_mask_normalise_(pattern.to(_dtype(pattern), copy=True), key_mask, 0.0)


def attention_entropy(pattern: torch.Tensor, *, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of each query's attention, H_q = −Σ_k p_{q,k} ln p_{q,k} (nats, 0 · ln 0 = 0).

    The per-head summary of Clark et al. 2019 ("What Does BERT Look At?"): low = focused head.

    Rows are renormalised first (so value-weighted or norm-based scores work too); padded and
    all-zero rows give 0, never NaN. Entries must be non-negative.
    Shapes: ``pattern: [batch, ..., query, key]``, ``key_mask: [batch, key]`` → ``[batch, ..., query]``.

    >>> attention_entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    tensor([0.6931, 0.0000])
    """
    p = _rows(pattern, key_mask)  # [batch, ..., query, key]
    plogp = p * torch.where(p > 0, p, 1.0).log()  # 0 · ln 0 = 0 with a zero (not NaN) gradient
    return 0.0 - plogp.sum(-1)  # 0.0 - : no -0.0 for one-hot rows


def attention_concentration(pattern: torch.Tensor, *, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Largest share of each query's (renormalised) attention, max_k p_{q,k}; padded rows give 0.

    Shapes: ``pattern: [batch, ..., query, key]``, ``key_mask: [batch, key]`` → ``[batch, ..., query]``.

    >>> attention_concentration(torch.tensor([[0.25, 0.75], [0.0, 0.0]]))
    tensor([0.7500, 0.0000])
    """
    return _rows(pattern, key_mask).amax(-1)


def rollout_entropy(rollout_matrix: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each token's rollout row: how spread its attribution is over sources.

    ``rollout_matrix: [batch, query, key]`` (padded rows are 0 and give 0) → ``[batch, query]``.

    >>> rollout_entropy(rollout(torch.full((2, 1, 1, 2, 2), 0.5), residual=0.0))
    tensor([[0.6931, 0.6931]])
    """
    _dims(rollout_matrix, "rollout_matrix", "batch query key")
    return attention_entropy(rollout_matrix)


def rollout_max(rollout_matrix: torch.Tensor) -> torch.Tensor:
    """Largest source share of each token's rollout row, ``[batch, query, key]`` → ``[batch, query]``.

    >>> rollout_max(torch.eye(2)[None])
    tensor([[1., 1.]])
    """
    _dims(rollout_matrix, "rollout_matrix", "batch query key")
    return attention_concentration(rollout_matrix)


#: The order of :func:`attention_summary`'s last axis (the fields of the ICLRMetrics seed's
#: ``compute_attention_attribution``, less ``batch_size`` and ``seq_length``).
SUMMARY_FIELDS = ("mean_attention", "max_attention", "attention_entropy", "attention_concentration",
                  "rollout_max", "rollout_entropy")


def attention_summary(
    pattern: torch.Tensor,
    state: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's attention in six numbers per prompt, in the order of ``SUMMARY_FIELDS``.

    With ``A = pattern`` (softmax probabilities), ``R = state`` (the rollout up to and including
    this layer, from :func:`rollout_step`), ``Q`` a prompt's real queries, ``K`` its real keys
    and ``H`` the heads, per prompt:

    - ``mean_attention`` = Σ_{h,q∈Q,k∈K} A_{h,q,k} / (H |Q| |K|). Rows summing to 1 over real
      keys make it 1/n for an n-token prompt: kept for parity with the seed, and as a check that
      no mass leaks onto padding (it is smaller if some does).
    - ``max_attention`` = max_{h,q∈Q,k∈K} A_{h,q,k}. On a causal LM query 0 sees only itself, so
      this is 1.0 there; it is informative for encoders (or generation-step queries).
    - ``attention_entropy`` = mean_{h,q∈Q} −Σ_k p_{h,q,k} ln p_{h,q,k} (nats, 0 · ln 0 = 0), p the
      row renormalised over real keys (:func:`attention_entropy`).
    - ``attention_concentration`` = mean_{h,q∈Q} max_k p_{h,q,k} (:func:`attention_concentration`).
    - ``rollout_max``, ``rollout_entropy``: mean_{q∈Q} of R's row max and row entropy.

    Means run over real positions only, so a left-padded batch gives what each prompt gives alone;
    padded rows (even NaN ones, from a fully masked softmax) never reach a result. A query is the
    token at the same position among the last ``query`` keys, as everywhere in this module.

    Shapes: ``pattern: [batch, head, query, key]``; ``state: [batch, query, key]``;
    ``key_mask: [batch, key]`` (bool, True = real token). Returns ``[batch, 6]``, float32.

    >>> A = torch.full((1, 2, 4, 4), 0.25)  # [batch, head, query, key]: uniform over 4 keys
    >>> attention_summary(A, rollout_step(None, A, residual=0.0))  # 1/4, 1/4, ln 4, 1/4, 1/4, ln 4
    tensor([[0.2500, 0.2500, 1.3863, 0.2500, 0.2500, 1.3863]])
    """
    batch, _, query, key = _dims(pattern, "pattern", "batch head query key")
    _check_mask(key_mask, batch, key, f"pattern {tuple(pattern.shape)}")
    if tuple(state.shape) != (batch, query, key):
        raise ValueError(f"state {tuple(state.shape)} must be [batch, query, key] = {[batch, query, key]} "
                         f"to match pattern {tuple(pattern.shape)}")
    dtype = _dtype(pattern, state)
    with _no_autocast(pattern):
        real = torch.ones(batch, key, dtype=torch.bool, device=pattern.device) if key_mask is None else key_mask
        queries = real[:, key - query :].to(dtype)  # [batch, query]
        n_q, n_k = queries.sum(-1).clamp(min=1), real.sum(-1).clamp(min=1)  # [batch]; 1 for no real token (0 out)
        a = _mask_(pattern.to(dtype, copy=True), real)  # [batch, head, query, key]; padding 0, NaN gone
        rollout_rows = _mask_(state.to(dtype, copy=True), real)  # [batch, query, key]
        rows = torch.stack([  # [batch, 4, query]; heads averaged first: they share the real queries
            attention_entropy(a).mean(1), attention_concentration(a).mean(1),
            rollout_max(rollout_rows), rollout_entropy(rollout_rows),
        ], dim=1)
        whole = torch.stack([a.sum((1, 2, 3)) / (pattern.shape[1] * n_q * n_k), a.amax((1, 2, 3))], dim=-1)
        return torch.cat([whole, (rows * queries[:, None]).sum(-1) / n_q[:, None]], dim=-1)  # [batch, field]
