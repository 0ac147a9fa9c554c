"""AtP* kernels (Kramár et al. 2024): the QK fix and GradDrop's gradients. Pure torch; they travel to NDIF.

Shapes follow Hugging Face's attention interface: queries ``[batch, head, pos, d_head]``, keys and values
``[batch, kv_head, pos, d_head]`` (grouped-query attention: each kv head serves ``head // kv_head`` query heads),
the additive (or boolean) mask ``[batch, 1 | head, query, key]`` the interface received, and ``scaling``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .edges import apply_norm
from .patching import gradients


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``[batch, kv_head, pos, d] -> [batch, head, pos, d]`` in float32 (Hugging Face's ``repeat_kv``)."""
    if n_heads % x.shape[1]:
        raise ValueError(f"{n_heads} query heads are not a multiple of the {x.shape[1]} kv heads of {tuple(x.shape)}")
    return x.float().repeat_interleave(n_heads // x.shape[1], dim=1)


def attention_scores(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, *, scaling: float) -> torch.Tensor:
    """Pre-softmax scores ``[batch, head, query, key]`` (float32), masked as eager attention masks them
    (None: causal; boolean: True keeps)."""
    return _masked(q.float() @ _heads(k, q.shape[1]).transpose(-1, -2) * scaling, mask)


def _masked(s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scores ``[..., query, key]`` with the attention mask applied (see `attention_scores`)."""
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


def qk_edges(deltas: Iterable[torch.Tensor], stream: torch.Tensor, norm_weight: torch.Tensor | None,
             y: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
             scaling: float | None, grads_z: Sequence[torch.Tensor], *, norm: str = "layernorm", eps: float = 0.0,
             weight_offset: float = 0.0, **_) -> torch.Tensor:
    """The QK fix on edges into one layer's queries and keys: ``[run, n, writer, head + kv_head]`` (each query
    head's query, then each kv head's key; one run per gradient in ``grads_z``).

    Writer ``w``'s edge into head ``h``'s query moves the stream that query reads by ``delta_w``: the pre-norm is
    recomputed exactly (``norm(x + delta_w) - norm(x)``), the query projection with its rotary embedding and any
    QK-norm to first order (a forward-mode product through the graph from ``y`` to ``q``), and the softmax exactly:
    ``sum_t g[t] . (softmax(S[t] + scaling * dq[t] . k) - A[t])``, ``g = d m / d A = grad_z . v`` (`qk_fix`), all
    positions of the edge patched at once. An edge into a kv head's key moves every query head it serves.

    deltas: the writers' changes ``[n, pos, writer, d_model]``, one block at a time (`writer_deltas`); stream:
    ``[n, pos, d_model]`` what the layer's attention reads through its pre-norm (``norm_weight``; None: none);
    y: the projections' input, in the graph; q ``[n, head, pos, d]``, k ``[n, kv_head, pos, d]``: as the attention
    interface receives them, in the graph from ``y``; v, mask, scaling: the interface's (None: ``d ** -0.5``);
    grads_z: the output projection input's gradient ``[n, pos, head * d]`` per run (GradDrop: one per dropped layer).
    """
    n, h, t, d = q.shape
    scaling = d ** -0.5 if scaling is None else scaling
    q0, k0 = q.detach().float(), _heads(k.detach(), h)
    raw = q0 @ k0.transpose(-1, -2) * scaling  # [n, head, query, key], before the mask
    a, vx = _masked(raw, mask).softmax(-1), _heads(v, h)
    gs = [g.float().reshape(n, t, h, d).transpose(1, 2) @ vx.transpose(-1, -2) for g in grads_z]  # d m / d A
    products = [_forward_product(out_, y) for out_ in (q, k)]  # tangents at y -> moves of the queries, the keys
    x, out = stream.detach().float()[:, :, None], []
    shape = dict(norm=norm, eps=eps, weight_offset=weight_offset)
    base = apply_norm(x, norm_weight, **shape)  # (no bias: it cancels in the difference; None: no norm)
    for block in deltas:  # [n, pos, writer, d_model]
        dy = apply_norm(x + block.float(), norm_weight, **shape) - base
        dq, dk = (jvp(dy.movedim(2, 0).to(y.dtype)).float() for jvp in products)
        dk = _heads(dk.flatten(0, 1), h).unflatten(0, dk.shape[:2])  # [writer, n, head, pos, d]
        rows = _masked(raw + dq @ k0.transpose(-1, -2) * scaling, mask).softmax(-1) - a  # [writer, n, head, t, s]
        cols = _masked(raw + q0 @ dk.transpose(-1, -2) * scaling, mask).softmax(-1) - a
        key = [(cols * g).sum((-1, -2)).unflatten(-1, (k.shape[1], -1)).sum(-1) for g in gs]  # per kv head
        out.append(torch.stack([torch.cat([(rows * g).sum((-1, -2)), kk], -1) for g, kk in zip(gs, key)]))
    return torch.cat(out, 1).transpose(1, 2)  # [run, writer, n, reader] -> [run, n, writer, reader]


def _forward_product(out: torch.Tensor, inp: torch.Tensor):
    """``tangents -> J tangents[i]`` for each ``i``, ``J = d out / d inp`` in the autograd graph (``[m, *inp.shape]
    -> [m, *out.shape]``): the transpose of a vector-Jacobian product, built once, applied batched."""
    u = torch.zeros_like(out, requires_grad=True)
    (vjp,) = torch.autograd.grad(out, inp, u, create_graph=True)
    return lambda tangents: torch.autograd.grad(vjp, u, tangents, is_grads_batched=True, retain_graph=True)[0]


def dropped_gradients(total: torch.Tensor, acts: Sequence[torch.Tensor], writes: Sequence[torch.Tensor],
                      outputs: Sequence[torch.Tensor], *, grad_drop: bool = True, layers: Sequence[int] | None = None,
                      retain_graph: bool = False) -> list[list[torch.Tensor]]:
    """``d total / d acts[j]`` (``acts[j]`` read in layer ``layers[j]``, default ``j``), then with GradDrop one list
    per layer ``l``: the same with the gradient through layer ``l``'s residual-stream contribution dropped
    (unchanged for acts read after ``l``; zero for those read in ``l``). ``writes[l]``: layer ``l``'s contribution
    (its output minus its input, in the graph); ``outputs[l]``: its output. The paths through layer ``l`` are
    ``J^T (d total / d outputs[l])``: one backward that starts at layer ``l`` and runs down, subtracted from the
    total gradient. ``retain_graph``: keep the graph for later products."""
    if not total.requires_grad:
        gradients(total, acts)  # refuses, saying why no graph reaches the metric
    layers = list(range(len(acts))) if layers is None else list(layers)
    grads = torch.autograd.grad(total, [*acts, *outputs], retain_graph=grad_drop or retain_graph)
    plain, after, runs = list(grads[: len(acts)]), grads[len(acts):], []
    for i, (write, g_after) in enumerate(zip(writes, after) if grad_drop else []):
        below = [j for j, layer in enumerate(layers) if layer <= i]
        via = torch.autograd.grad(write, [acts[j] for j in below], grad_outputs=g_after,
                                  retain_graph=retain_graph or i < len(writes) - 1, allow_unused=True)
        dropped = list(plain)
        for j, p in zip(below, via):
            dropped[j] = plain[j] - (torch.zeros_like(plain[j]) if p is None else p)
        runs.append(dropped)
    return [plain] + runs


def edge_grad_drop(runs: Sequence[torch.Tensor]) -> torch.Tensor:
    """GradDrop on edges: ``[plain, dropped layer 0, ..., dropped layer L-1]`` scores ``[n, writer, reader]`` (the
    logits the last reader) -> each edge's mean magnitude over the dropped layers that can change it. Dropping a
    reader's own layer zeroes its edges, so a reader in a layer averages over the other ``L - 1``; no layer is
    downstream of the logits, so theirs is over all ``L`` (their plain magnitude)."""
    total = sum(run.abs() for run in runs[1:])
    return torch.cat([total[..., :-1] / (len(runs) - 2), total[..., -1:] / (len(runs) - 1)], -1)
