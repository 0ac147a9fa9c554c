"""Logit lens read-out and top-k helpers (nostalgebraist 2020).

The logit lens decodes an intermediate residual ``x_l`` as if it were the last one:
``softcap(lm_head(ln_f(x_l)))``. The final norm is applied to each layer's *own* residual,
so its scale is ``x_l``'s, not the last layer's.
"""

from __future__ import annotations

import torch


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(logits / cap)`` (Gemma-2's final logit soft-capping); identity for None."""
    if cap is None:
        return logits
    return cap * torch.tanh(logits / cap)


def inverse_softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The pre-cap logit ``cap * atanh(logits / cap)``; identity for None."""
    if cap is None:
        return logits
    return cap * torch.atanh(logits / cap)


def lens_summary(
    logits: torch.Tensor, target: torch.Tensor, *, k: int
) -> dict[str, torch.Tensor]:
    """Top-k tokens and the target's probability and rank per layer.

    logits: ``[layer, batch, vocab]``; target: ``[batch]``. Returns float32 tensors
    ``top_prob [layer, batch, k]``, ``top_id [layer, batch, k]``, ``target_prob [layer, batch]``,
    ``target_logit [layer, batch]``, ``target_rank [layer, batch]`` (0 = top).
    """
    if logits.ndim != 3 or target.shape != logits.shape[1:2]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} are not [layer, batch, vocab], [batch]"
        )
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k={k} must be between 1 and the vocabulary size {logits.shape[-1]}")
    logits = logits.float()
    probs = logits.softmax(-1)
    top_prob, top_id = probs.topk(k, dim=-1)
    index = target[None, :, None].expand(logits.shape[0], -1, 1)
    target_logit = logits.gather(-1, index)[..., 0]
    target_prob = probs.gather(-1, index)[..., 0]
    target_rank = (logits > target_logit[..., None]).sum(-1)
    return {
        "top_prob": top_prob,
        "top_id": top_id,
        "target_prob": target_prob,
        "target_logit": target_logit,
        "target_rank": target_rank,
    }


def topk_flat(values: torch.Tensor, k: int, *, absolute: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of a tensor of any shape (by magnitude when ``absolute``).

    Returns ``(values [k'], index [k', ndim])`` with ``k' = min(k, numel)``; NaNs never win.
    """
    flat = values.reshape(-1).float()
    key = flat.abs() if absolute else flat
    key = torch.where(torch.isnan(key), torch.full_like(key, -float("inf")), key)
    k = min(k, flat.numel())
    _, order = key.topk(k)
    index = torch.stack(torch.unravel_index(order, values.shape), dim=-1) if values.ndim else order[:, None]
    return flat[order], index
