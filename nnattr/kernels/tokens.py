"""Input-token attribution: gradient × input and integrated gradients over the input embeddings.

``x`` is the vector that enters the first layer at each position (the token embedding, plus
the position embedding where the model has one): ``[n, pos, d_model]``. A token's score is a
dot product over ``d_model`` with the gradient of a scalar metric ``f``:

    grad × input:          s_p = grad_{x_p} f(x) . x_p
    integrated gradients:  s_p = (x_p - b_p) . int_0^1 grad_{x_p} f(b + a (x - b)) da

(Sundararajan et al. 2017, Axiomatic Attribution for Deep Networks). The integral is their right
Riemann sum (eq. 3) on ``steps`` equal intervals: the mean of the gradient at ``a = k / steps``,
``k = 1 .. steps``. It is exact when ``f`` is linear in ``x`` and its error falls as ``1 / steps``.
It never evaluates the gradient at the baseline itself, where a zero input sits on the first
norm's singular point (the gradient of ``x / sqrt(mean(x^2) + eps)`` at 0 is ``1 / sqrt(eps)``).
The path is run with the baseline as one more block of rows (forward only), so one batch of
``steps + 1`` blocks also gives ``f(b)``, and its last block is ``x`` itself, giving ``f(x)``:
the completeness check ``sum_p s_p = f(x) - f(b)`` costs nothing extra.

Rows are step-major: ``[(step n), pos, d_model]``, step 0 the baseline, step ``steps`` the input.
"""

from __future__ import annotations

import torch
from einops import rearrange

from .dla import head_position_direct_logit
from .heads import expand_kv, o_proj_per_head, split_values


def ig_path(x: torch.Tensor, baseline: torch.Tensor, *, steps: int) -> torch.Tensor:
    """The ``steps + 1`` points ``b + a (x - b)``, ``a = k / steps``: ``[(steps + 1) * n, pos, d_model]``.

    x, baseline: ``[n, pos, d_model]``. Block 0 is ``baseline`` and block ``steps`` is ``x``,
    bit for bit (the interior points are ``x - (1 - a)(x - b)``).
    """
    if x.ndim != 3 or baseline.shape != x.shape:
        raise ValueError(f"x {tuple(x.shape)} and baseline {tuple(baseline.shape)} are not both [n, pos, d_model]")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: integrated gradients needs an int >= 1 (intervals on the path)")
    alphas = torch.arange(1, steps, device=x.device, dtype=torch.float32) / steps  # the interior points
    inner = x[None] - (1 - alphas).to(x.dtype)[:, None, None, None] * (x - baseline)[None]  # [step - 1, n, pos, d]
    return rearrange(torch.cat([baseline[None], inner, x[None]]), "step n pos d -> (step n) pos d")


def riemann_mean(grads: torch.Tensor, *, steps: int) -> torch.Tensor:
    """The path integral of the gradient by the right Riemann sum: the mean of blocks ``1 .. steps``
    of ``[(steps + 1) * n, ...]`` (block 0, the baseline, is left out). Returns ``[n, ...]``."""
    if grads.shape[0] % (steps + 1):
        raise ValueError(f"gradient {tuple(grads.shape)} does not hold steps + 1 = {steps + 1} blocks of rows")
    return rearrange(grads.float(), "(step n) ... -> step n ...", step=steps + 1)[1:].mean(0)


def token_scores(grad: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``grad . delta`` over ``d_model`` per row and position, exactly 0 where ``mask`` is 0 (padding).

    grad, delta: ``[n, pos, d_model]``; mask: ``[n, pos]`` (the attention mask). Returns ``[n, pos]``
    in float32.
    """
    if grad.shape != delta.shape or grad.ndim != 3:
        raise ValueError(f"gradient {tuple(grad.shape)} and input {tuple(delta.shape)} are not both [n, pos, d_model]")
    scores = (grad.float() * delta.float()).sum(-1)
    if mask is None:
        return scores
    if mask.shape != scores.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match the scores {tuple(scores.shape)} [n, pos]")
    return torch.where(mask.to(scores.device).bool(), scores, torch.zeros_like(scores))


def integrated_gradients(grads: torch.Tensor, x: torch.Tensor, baseline: torch.Tensor, *, steps: int,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """Integrated gradients per token: ``(x - b) . riemann_mean(grads)`` over ``d_model``.

    grads: ``[(steps + 1) * n, pos, d_model]`` at the points of `ig_path`; x, baseline:
    ``[n, pos, d_model]``; mask: ``[n, pos]``. Returns ``[n, pos]``.
    """
    return token_scores(riemann_mean(grads, steps=steps), x.float() - baseline.float(), mask)


def source_direct_logit(pattern: torch.Tensor, raw_values: torch.Tensor, o_weight: torch.Tensor, u: torch.Tensor,
                        scale: torch.Tensor, *, layout: str, n_heads: int, n_kv_heads: int, d_head: int,
                        conv1d: bool = False) -> torch.Tensor:
    """One layer's direct path to the logit through its heads' value reads, summed over heads, per
    source position: ``sum_h A[h, q, k] v_k W_O^h . u / s`` (`head_position_direct_logit` summed).

    pattern: ``[batch, head, key]`` (the read query's attention row); raw_values: the output of the
    module holding the values (``attn.v_proj``, in ``layout``, see `split_values`); o_weight: the
    output projection's weight (``conv1d``: GPT-2's ``[in, out]``); u, scale: see `nnattr.kernels.dla`.
    Returns ``[batch, key]``.
    """
    values = split_values(raw_values, layout=layout, n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=d_head)
    W_O = o_proj_per_head(o_weight, n_heads=n_heads, conv1d=conv1d)  # [head, d_head, d_model]
    return head_position_direct_logit(pattern, expand_kv(values, n_heads=n_heads), W_O, u, scale).sum(1)
