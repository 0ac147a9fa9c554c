"""Direct logit attribution with the final norm handled exactly.

The residual stream at the read-out position is a sum of writes,
``x = sum_c x_c`` (embedding, position embedding, each attention and MLP output). The logit
(or logit difference) the model reports is

    logit = N(x) . d + b_U . t

with ``N(x) = (x - mean(x)) / s * w + b`` (LayerNorm; RMSNorm has no centring and no ``b``),
``d`` the unembedding column of the target (minus the distractor's), ``t`` the target
indicator (minus the distractor's), and ``s`` the norm's scale *measured on the real
forward pass*. With ``s`` frozen, centring and scaling are linear, so

    logit = sum_c (x_c . u) / s  +  (b . d + b_U . t),      u = centre(w * d)

exactly: each write's share is its dot product with ``u`` divided by ``s``, and the norm and
unembedding biases form one more component. Centring moves to the direction because
``centre(x) . v = x . centre(v)``. (Elhage et al. 2021, A Mathematical Framework for
Transformer Circuits; the frozen-scale treatment follows TransformerLens' ``apply_ln`` but
keeps the norm weight and bias instead of assuming they were folded.)

Shapes: ``direction, u: [batch, d_model]``, ``scale: [batch]``. Everything is computed in
float32 whatever the input dtype.
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import einsum

from ._precision import no_autocast


def logit_direction(
    unembed: torch.Tensor,
    target: torch.Tensor,
    distractor: torch.Tensor | None = None,
    *,
    unembed_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual-space direction of a logit or logit difference, and its bias.

    unembed: ``[vocab, d_model]`` (``lm_head.weight``); target, distractor: ``[batch]`` token ids.
    Returns ``(direction [batch, d_model], bias [batch])``: ``logit[target] - logit[distractor]
    = normed_resid . direction + bias``.

    >>> W = torch.eye(3)
    >>> d, b = logit_direction(W, torch.tensor([0]), torch.tensor([2]))
    >>> d.tolist(), b.tolist()
    ([[1.0, 0.0, -1.0]], [0.0])
    """
    if unembed.ndim != 2:
        raise ValueError(f"unembed must be [vocab, d_model], got shape {tuple(unembed.shape)}")
    if target.ndim != 1:
        raise ValueError(f"target must be [batch] token ids, got shape {tuple(target.shape)}")
    if distractor is not None and distractor.shape != target.shape:
        raise ValueError(f"distractor shape {tuple(distractor.shape)} != target shape {tuple(target.shape)}")
    direction = unembed[target].float()  # [batch, d_model]
    bias = torch.zeros(target.shape[0], device=unembed.device)
    if unembed_bias is not None:
        bias = bias + unembed_bias[target].float()
    if distractor is not None:
        direction = direction - unembed[distractor].float()
        if unembed_bias is not None:
            bias = bias - unembed_bias[distractor].float()
    return direction, bias


def residual_direction(
    direction: torch.Tensor,
    norm_weight: torch.Tensor | None,
    *,
    norm: Literal["layernorm", "rmsnorm"],
    weight_offset: float = 0.0,
) -> torch.Tensor:
    """``u = centre(w * d)`` for LayerNorm, ``w * d`` for RMSNorm; ``w`` is ``weight + offset``
    (Gemma's RMSNorm multiplies by ``1 + weight``). ``[batch, d_model] -> [batch, d_model]``."""
    if norm not in ("layernorm", "rmsnorm"):
        raise ValueError(f"unknown norm {norm!r}; expected 'layernorm' or 'rmsnorm'")
    u = direction.float()
    if norm_weight is not None:
        u = u * (norm_weight.float() + weight_offset)
    if norm == "layernorm":
        u = u - u.mean(-1, keepdim=True)
    return u


def norm_scale(
    resid: torch.Tensor, *, norm: Literal["layernorm", "rmsnorm"], eps: float
) -> torch.Tensor:
    """The final norm's divisor measured on the real residual: ``[..., d_model] -> [...]``.

    LayerNorm: ``sqrt(var(x) + eps)`` (biased variance, as ``nn.LayerNorm``); RMSNorm:
    ``sqrt(mean(x^2) + eps)``.
    """
    x = resid.float()
    if norm == "layernorm":
        return (x.var(-1, unbiased=False) + eps).sqrt()
    if norm == "rmsnorm":
        return (x.pow(2).mean(-1) + eps).sqrt()
    raise ValueError(f"unknown norm {norm!r}; expected 'layernorm' or 'rmsnorm'")


def bias_term(
    direction: torch.Tensor, bias: torch.Tensor, norm_bias: torch.Tensor | None
) -> torch.Tensor:
    """The constant component ``b . d + b_U . t``: ``[batch]``."""
    out = bias.float()
    if norm_bias is not None:
        with no_autocast(direction):
            out = out + direction.float() @ norm_bias.float()
    return out


def direct_logit(contributions: torch.Tensor, u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Each write's share of the logit: ``x_c . u / s``.

    contributions: ``[component, batch, d_model]``; u: ``[batch, d_model]``; scale: ``[batch]``.
    Returns ``[component, batch]``.
    """
    if contributions.shape[-2:] != u.shape or scale.shape != u.shape[:1]:
        raise ValueError(
            f"contributions {tuple(contributions.shape)}, u {tuple(u.shape)} and scale "
            f"{tuple(scale.shape)} do not line up as [component, batch, d_model], [batch, d_model], [batch]"
        )
    with no_autocast(u):
        return einsum(contributions.float(), u.float(), "c b d, b d -> c b") / scale.float()


def head_direct_logit(
    z: torch.Tensor, W_O: torch.Tensor, u: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Each head's share: ``z_h W_O^h . u / s``.

    z: ``[batch, head, d_head]`` (input of the output projection at the read-out position);
    W_O: ``[head, d_head, d_model]``. Returns ``[batch, head]``. The output projection's bias is
    not a head's: add it as its own component.
    """
    if z.shape[1:] != W_O.shape[:2]:
        raise ValueError(f"z {tuple(z.shape)} does not match W_O {tuple(W_O.shape)} as [batch, head, d_head]")
    with no_autocast(u):
        head_u = einsum(W_O.float(), u.float(), "h dh d, b d -> b h dh")  # [batch, head, d_head]
        return einsum(z.float(), head_u, "b h dh, b h dh -> b h") / scale.float()[:, None]


def head_position_direct_logit(
    pattern: torch.Tensor,
    values: torch.Tensor,
    W_O: torch.Tensor,
    u: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Each head's share split by source position: ``A[h, q, k] v_k W_O^h . u / s``.

    pattern: ``[batch, head, key]`` (the attention row of the read-out query); values:
    ``[batch, key, head, d_head]`` (kv heads already expanded); W_O: ``[head, d_head, d_model]``.
    Returns ``[batch, head, key]``; summed over ``key`` it equals `head_direct_logit`, since
    ``z_h = sum_k A[h, q, k] v_k``.
    """
    if pattern.shape[:2] != (values.shape[0], values.shape[2]) or pattern.shape[2] != values.shape[1]:
        raise ValueError(
            f"pattern {tuple(pattern.shape)} [batch, head, key] does not match values "
            f"{tuple(values.shape)} [batch, key, head, d_head]"
        )
    with no_autocast(u):
        head_u = einsum(W_O.float(), u.float(), "h dh d, b d -> b h dh")  # [batch, head, d_head]
        value_logit = einsum(values.float(), head_u, "b k h dh, b h dh -> b h k")
        return pattern.float() * value_logit / scale.float()[:, None, None]
