"""Token circulation: one token's logit-lens logit and rank, and each layer's change on its direction.

Let ``h_l`` be the residual after layer ``l`` (``h_-1`` the one entering layer 0), ``a_l`` and
``m_l`` the attention and MLP writes (``h_l = h_{l-1} + a_l + m_l``), ``s(h)`` the final norm's
scale of ``h`` and ``u = centre(w * d)`` the token's direction through the norm (`residual_direction`).
At a frozen scale the norm is linear, so the pre-soft-cap lens logit is ``h . u / s(h) + c``
and its change from row ``l - 1`` to row ``l`` splits exactly into

    a_l . u / s_l  +  m_l . u / s_l  +  h_{l-1} . u (1 / s_l - 1 / s_{l-1})
    (attention)       (MLP)             (rescale: the norm's new scale on what was there)

with ``s_l = s(h_l)``: the attention and MLP shares are DLA's (Elhage et al. 2021) at the scale of
the residual being decoded, and at the last layer exactly DLA's components.
"""

from __future__ import annotations

import torch

from .dla import direct_logit


def token_logit_rank(
    logits: torch.Tensor, target: torch.Tensor, distractor: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's logit (minus the distractor's) and rank at every position.

    logits: ``[batch, pos, vocab]``; target, distractor: ``[batch]`` token ids. Returns
    ``(logit [batch, pos] float32, rank [batch, pos])``; rank counts the tokens with a larger
    logit than the target (0 = top).

    >>> token_logit_rank(torch.tensor([[[1.0, 3.0, 2.0]]]), torch.tensor([2]), torch.tensor([0]))
    (tensor([[1.]]), tensor([[1]]))
    """
    if logits.ndim != 3 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} are not "
                         f"[batch, pos, vocab], [batch]")
    if distractor is not None and distractor.shape != target.shape:
        raise ValueError(f"distractor shape {tuple(distractor.shape)} != target shape {tuple(target.shape)}")
    logits = logits.float()
    pick = lambda ids: logits.gather(-1, ids.to(logits.device)[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]  # noqa: E731
    value = pick(target)  # [batch, pos]
    rank = (logits > value[..., None]).sum(-1)
    return (value if distractor is None else value - pick(distractor)), rank


def position_direct_logit(contributions: torch.Tensor, u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`direct_logit` at every position: ``x_c . u / s`` with each position's own scale.

    contributions: ``[component, batch, pos, d_model]``; u: ``[batch, d_model]``; scale:
    ``[batch, pos]``. Returns ``[component, batch, pos]`` float32.
    """
    if contributions.ndim != 4 or contributions.shape[1:3] != scale.shape or u.shape != (
            scale.shape[0], contributions.shape[-1]):
        raise ValueError(f"contributions {tuple(contributions.shape)}, u {tuple(u.shape)} and scale "
                         f"{tuple(scale.shape)} do not line up as [component, batch, pos, d_model], "
                         f"[batch, d_model], [batch, pos]")
    flat = direct_logit(contributions.flatten(1, 2), u.repeat_interleave(scale.shape[1], 0), scale.flatten())
    return flat.unflatten(1, tuple(scale.shape))  # [component, batch * pos] -> [component, batch, pos]
