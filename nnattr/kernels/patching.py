"""Attribution patching and activation patching on clean/corrupted pairs (Nanda 2023).

Activations are ``[n, pos, width]`` per pair, the clean prompts' and the corrupted prompts';
gradients are taken at the corrupted rows (AtP) or at ``steps * n`` rows on the path between
them (integrated gradients, ``[step_1 pairs .., step_2 pairs .., ...]``). The first-order estimate
of patching node ``a``, taken from the clean run, into the corrupted run is

    score(a) = grad_a m(corrupted) . (a_clean - a_corrupted)                (AtP)

and with ``steps`` interpolation steps the gradient is the mean over the path instead
(EAP-IG, Hanna et al. 2024). Positions are right-aligned (left padding); a pair whose prompts
differ in length is compared on the positions both have (``overlap_mask``).

Exact patching puts the clean activation into a corrupted row (``patched_rows``) and reports
``(patched - corrupted) / (clean - corrupted)`` (``normalised_recovery``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from einops import rearrange


def gradients(output: torch.Tensor, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``d output / d inputs`` for a scalar ``output``: ``torch.autograd.grad``, inside a trace too.

    Gradients are computed for ``inputs`` only (activations the trace captured), never for the
    weights. When no graph reaches ``output`` the error says why: the process runs under
    ``torch.inference_mode`` (a server that refuses gradients), or the trace never started a
    graph (frozen, hosted parameters: call ``.requires_grad_(True)`` on the earliest activation).
    """
    if not output.requires_grad:
        why = ("this process runs the trace under torch.inference_mode, so gradients are unavailable here"
               if torch.is_inference_mode_enabled() else
               "the trace started no graph: frozen (hosted) parameters never require grad, so call "
               ".requires_grad_(True) on the earliest activation, e.g. model.embed.output")
        raise RuntimeError(f"the metric does not require grad: {why}")
    return torch.autograd.grad(output, list(inputs))


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, distractor: torch.Tensor | None = None) -> torch.Tensor:
    """The last position's logit of ``answer`` minus that of ``distractor`` (if given).

    logits: ``[batch, pos, vocab]``; answer, distractor: ``[batch]`` token ids. Returns ``[batch]``
    in float32. Left padding puts every row's last real token at position ``-1``.
    """
    if logits.ndim != 3 or answer.shape != logits.shape[:1]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and answer {tuple(answer.shape)} are not [batch, pos, vocab], [batch]"
        )
    last = logits[:, -1].float()  # [batch, vocab]
    value = last.gather(-1, answer.to(last.device)[:, None])[:, 0]
    if distractor is not None:
        value = value - last.gather(-1, distractor.to(last.device)[:, None])[:, 0]
    return value


def overlap_mask(clean_lengths: torch.Tensor, corrupted_lengths: torch.Tensor, length: int) -> torch.Tensor:
    """``[pair, pos]`` bool: the last ``min(clean, corrupted)`` positions of a batch padded on the
    left to ``length``, i.e. the positions where both prompts have a token, aligned at the end."""
    if clean_lengths.shape != corrupted_lengths.shape or clean_lengths.ndim != 1:
        raise ValueError(f"lengths {tuple(clean_lengths.shape)} and {tuple(corrupted_lengths.shape)} must be equal 1-D")
    both = torch.minimum(clean_lengths, corrupted_lengths)
    if int(torch.maximum(clean_lengths, corrupted_lengths).max()) > length:
        raise ValueError(f"a prompt is longer than the padded length {length}")
    return torch.arange(length, device=both.device)[None, :] >= (length - both)[:, None]


def pair_delta(clean: torch.Tensor, corrupted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``clean - corrupted`` of every pair, zero off the overlap.

    clean, corrupted: ``[n, pos, width]``; mask: ``[n, pos]``. Returns ``[n, pos, width]``.
    """
    if clean.ndim != 3 or clean.shape != corrupted.shape or clean.shape[:2] != mask.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} activations are not "
                         f"[n, pos, width] for the overlap mask {tuple(mask.shape)}")
    return (clean - corrupted) * mask[..., None].to(device=clean.device, dtype=clean.dtype)


def path_gradient(grad: torch.Tensor, *, steps: int = 0) -> torch.Tensor:
    """The gradient the estimate uses: ``grad`` itself (``steps=0``: AtP, taken at the corrupted
    rows), or its mean over ``steps`` blocks of rows on the path (integrated gradients).
    grad: ``[max(steps, 1) * n, pos, width]``. Returns ``[n, pos, width]``."""
    if steps == 0:
        return grad
    if grad.shape[0] % steps:
        raise ValueError(f"gradient {tuple(grad.shape)} does not hold {steps} blocks of rows")
    return rearrange(grad, "(step n) pos width -> step n pos width", step=steps).mean(0)


def attribution_scores(grad: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``grad . delta`` per pair and position. grad, delta: ``[n, pos, width]``. Returns ``[n, pos]``."""
    if grad.shape != delta.shape:
        raise ValueError(f"gradient {tuple(grad.shape)} and delta {tuple(delta.shape)} differ")
    return (grad.float() * delta.float()).sum(-1)


def head_attribution_scores(grad: torch.Tensor, delta: torch.Tensor, *, n_heads: int) -> torch.Tensor:
    """``grad . delta`` per pair, head and position: ``[n, head, pos]``.

    grad, delta: ``[n, pos, head * d_head]`` (the input of the attention output projection);
    the dot product runs over ``d_head`` only.
    """
    if grad.shape != delta.shape:
        raise ValueError(f"gradient {tuple(grad.shape)} and delta {tuple(delta.shape)} differ")
    if grad.shape[-1] % n_heads:
        raise ValueError(f"width {grad.shape[-1]} of {tuple(grad.shape)} is not divisible by n_heads={n_heads}")
    product = grad.float() * delta.float()  # [n, pos, head * d_head]
    return rearrange(product, "n pos (head d_head) -> n head pos d_head", head=n_heads).sum(-1)


def interpolate(clean: torch.Tensor, corrupted: torch.Tensor, mask: torch.Tensor,
                alphas: torch.Tensor) -> torch.Tensor:
    """Input rows for integrated gradients: one copy of the corrupted rows per step, with the
    overlap moved ``alpha`` of the way towards clean.

    clean, corrupted: ``[n, pos, d_model]`` (input embeddings); mask: ``[n, pos]``;
    alphas: ``[step]``. Returns ``[step * n, pos, d_model]``, step-major.
    """
    delta = pair_delta(clean, corrupted, mask)  # [n, pos, d_model]
    path = corrupted[None] + alphas.to(device=clean.device, dtype=clean.dtype)[:, None, None, None] * delta[None]
    return rearrange(path, "step n pos d -> (step n) pos d")


def patched_rows(
    x: torch.Tensor,
    clean: torch.Tensor,
    rows: torch.Tensor,
    source: torch.Tensor,
    positions: torch.Tensor,
    channels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``rows`` of ``x`` with the entries selected by ``positions`` (and ``channels``) taken
    over from rows ``source`` of ``clean``: write the result back with ``x[rows] = ...``.

    x: ``[batch, pos, width]``; clean: ``[n, pos, width]`` (the same activation in the clean run);
    rows, source: ``[r]``; positions: ``[r, pos]`` bool; channels: ``[r, width]`` bool (one head's
    slice), or None for every channel. Returns ``[r, pos, width]``.
    """
    if positions.shape != (rows.shape[0], x.shape[1]) or source.shape != rows.shape or clean.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"rows {tuple(rows.shape)}, source {tuple(source.shape)} and positions {tuple(positions.shape)} "
            f"do not match activation {tuple(x.shape)} and clean activation {tuple(clean.shape)}"
        )
    select = positions.to(x.device)[:, :, None]  # [r, pos, 1]
    if channels is not None:
        select = select & channels.to(x.device)[:, None, :]  # [r, pos, width]
    return torch.where(select, clean[source.to(clean.device)].to(x.device), x[rows.to(x.device)])


def normalised_recovery(patched: torch.Tensor, clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """``(patched - corrupted) / (clean - corrupted)``: 0 = no effect, 1 = the clean metric.
    All inputs broadcast (e.g. patched ``[pair, node]``, clean and corrupted ``[pair, 1]``)."""
    return (patched - corrupted) / (clean - corrupted)
