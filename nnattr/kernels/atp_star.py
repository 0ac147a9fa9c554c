"""AtP* kernels (Kramár et al. 2024): the QK fix and GradDrop's gradients. Pure torch; they travel to NDIF.

Shapes follow Hugging Face's attention interface: queries ``[batch, head, pos, d_head]``, keys and values
``[batch, kv_head, pos, d_head]`` (grouped-query attention: each kv head serves ``head // kv_head`` query heads),
the additive (or boolean) mask ``[batch, 1 | head, query, key]`` the interface received, and ``scaling``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .patching import gradients


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[batch, kv_head, pos, d] -> [batch, head, pos, d]`` in float32 (Hugging Face's ``repeat_kv``)."""
    if n_heads % x.shape[1]:
        raise ValueError(f"{n_heads} query heads are not a multiple of the {x.shape[1]} kv heads of {tuple(x.shape)}")
    return x.float().repeat_interleave(n_heads // x.shape[1], dim=1)


def attention_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, *, scaling: float) -> torch.Tensor:
    """Pre-softmax scores ``[batch, head, query, key]`` (float32), masked as eager attention masks them
    (None: causal; boolean: True keeps)."""
    s = q.float() @ _heads(k, q.shape[1]).transpose(-1, -2) * scaling
    if mask is None:
        mask = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(s.shape[-1] - s.shape[-2])
    if mask.dtype == torch.bool:
        return s.masked_fill(~mask.to(s.device), torch.finfo(s.dtype).min)
    return s + mask.to(device=s.device, dtype=s.dtype)


def qk_fix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_clean: torch.Tensor, k_clean: torch.Tensor,
           v_clean: torch.Tensor, grad_z: torch.Tensor, mask: torch.Tensor | None, *, scaling: float,
           overlap: torch.Tensor | None = None) -> torch.Tensor:
    """Each head's estimated effect of patching its query, key or value at each position from the clean run:
    ``[3 (query, key, value), batch, head, pos]`` (summed: the head's AtP* estimate).

    ``g = d m / d A = grad_z . v`` is the gradient at the corrupted run's attention probabilities ``A``
    (exact: the head's output is ``A v``). Query at ``t``: ``g[t] . (softmax(q_clean[t] k) - A[t])``, the row
    recomputed exactly. Key at ``s``: every row ``t`` recomputed with key ``s``'s score moved by
    ``d = q[t] . (k_clean[s] - k[s]) * scaling``, in closed form: ``(A'-A)[t] . g[t] = r (g[t, s] - A[t] . g[t])``
    with ``r = 1 - Z / Z' = 1 - 1 / (1 - A[t, s] + A[t, s] e^d)`` (log space: saturated rows are exact too).
    Value at ``s``: ``sum_t A[t, s] grad_z[t] . (v_clean[s] - v[s])`` (linear in ``v``: exact AtP).
    q, q_clean ``[b, head, pos, d]``; k, v, k_clean, v_clean ``[b, kv_head, pos, d]``; grad_z the output
    projection input's gradient ``[b, pos, head * d]``; overlap ``[b, pos]`` bool: positions both prompts have
    (elsewhere nothing is patched).
    """
    b, h, n, d = q.shape
    if grad_z.shape != (b, n, h * d) or (k.shape, v.shape, q.shape) != (k_clean.shape, v_clean.shape, q_clean.shape):
        raise ValueError(f"qk_fix: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, clean q "
                         f"{tuple(q_clean.shape)}, k {tuple(k_clean.shape)}, v {tuple(v_clean.shape)} and grad_z "
                         f"{tuple(grad_z.shape)} do not describe one attention layer")
    keep = torch.ones(b, n, dtype=torch.bool) if overlap is None else overlap.bool()
    keep = keep.to(q.device)[:, None, :, None]  # [b, 1, pos, 1]
    q_new, k_new, v_new = (torch.where(keep, c, x) for c, x in ((q_clean, q), (k_clean, k), (v_clean, v)))
    g_z = grad_z.float().reshape(b, n, h, d).transpose(1, 2)  # [b, head, pos, d]
    vx, dk, dv = _heads(v, h), _heads(k_new - k, h), _heads(v_new - v, h)
    s = attention_scores(q, k, mask, scaling=scaling)
    log_a = s.log_softmax(-1)
    a, g = log_a.exp(), g_z @ vx.transpose(-1, -2)  # [b, head, query, key]
    mean_g = (a * g).sum(-1, keepdim=True)  # A[t] . g[t]
    query = (g * (attention_scores(q_new, k, mask, scaling=scaling).softmax(-1) - a)).sum(-1)
    shift = q.float() @ dk.transpose(-1, -2) * scaling  # d[t, s]
    rest = torch.where(log_a > -0.6931, torch.log(-torch.expm1(log_a)), torch.log1p(-a))  # log(1 - A), stable
    r = -torch.expm1(-torch.logaddexp(rest, log_a + shift))  # 1 - Z / Z'
    key = (r * (g - mean_g)).masked_fill(s <= torch.finfo(s.dtype).min / 2, 0).sum(-2)
    value = (a * (g_z @ dv.transpose(-1, -2))).sum(-2)
    return torch.stack([query, key, value])


def dropped_gradients(total: torch.Tensor, acts: Sequence[torch.Tensor], writes: Sequence[torch.Tensor],
                      outputs: Sequence[torch.Tensor], *, grad_drop: bool = True) -> list[list[torch.Tensor]]:
    """``d total / d acts[j]`` (``acts[j]`` read in layer ``j``), then with GradDrop one list per layer ``l``: the
    same with the gradient through layer ``l``'s residual-stream contribution dropped (unchanged for ``j > l``;
    zero for ``j == l``). ``writes[l]``: layer ``l``'s contribution (its output minus its input, in the graph);
    ``outputs[l]``: its output. The paths through layer ``l`` are ``J^T (d total / d outputs[l])``: one backward
    that starts at layer ``l`` and runs down, subtracted from the total gradient."""
    if not total.requires_grad:
        gradients(total, acts)  # refuses, saying why no graph reaches the metric
    grads = torch.autograd.grad(total, [*acts, *outputs], retain_graph=grad_drop)
    plain, after, runs = list(grads[: len(acts)]), grads[len(acts):], []
    for i, (write, g_after) in enumerate(zip(writes, after) if grad_drop else []):
        via = torch.autograd.grad(write, list(acts[: i + 1]), grad_outputs=g_after, retain_graph=True,
                                  allow_unused=True)
        runs.append([g - (torch.zeros_like(g) if p is None else p) for g, p in zip(plain, via)] + plain[i + 1:])
    return [plain] + runs


def qk_refusal(family: str, sinks: bool, softcap: float | None) -> str | None:
    """Why the QK fix cannot recompute a family's softmax exactly (None: it can)."""
    if family == "Falcon":
        return "Falcon's attention computes its scores itself, not through Hugging Face's attention interface"
    if sinks:
        return f"{family}'s learned attention sinks take part in the softmax the QK fix recomputes"
    if softcap:
        return f"{family} soft-caps its attention scores (attn_logit_softcapping), which the fix does not model"
    return None
