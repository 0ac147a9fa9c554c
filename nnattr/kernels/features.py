"""Sparse-autoencoder features: encode, decode, and their share of a logit or of a patching effect.

An SAE (Cunningham et al. 2023; Bricken et al. 2023) reads one site's activation ``x: [..., d_in]``
and writes it as a sparse sum of decoder rows plus an error:

    a = act((x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc)          [..., d_sae]
    x = sum_f a_f W_dec[f] + b_dec + (x - x_hat),   x_hat = a @ W_dec + b_dec

``act`` is ReLU, JumpReLU (``a * (a > threshold)`` after the ReLU, per feature) or TopK (the ``k``
largest pre-activations, then ReLU; the rest 0), as SAELens defines them. With the final norm's
scale frozen (see `nnattr.kernels.dla`), a feature's direct share of the logit is
``a_f (W_dec[f] . u) / s``; the ``b_dec`` and error terms are ``b_dec . u / s`` and
``(x - x_hat) . u / s``, so features, ``b_dec`` and error sum to the site's own share ``x . u / s``.

The attribution-patching score of a feature (Marks et al. 2024; Nanda 2023) holds the SAE error
fixed, so ``dx / da_f = W_dec[f]``:

    score_f = (a_f(clean) - a_f(corrupted)) * (W_dec[f] . grad_x m(corrupted))

An SAE travels into a trace as a plain dict (``nnattr.features.SAE.tensors()``): ``W_enc [d_in,
d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, ``threshold [d_sae]`` or
None, and the settings ``activation`` ("relu" | "jumprelu" | "topk"), ``k`` (TopK) and
``apply_b_dec_to_input``. Everything is computed in float32.
"""

from __future__ import annotations

from typing import Mapping

import torch
from einops import einsum

from ._precision import no_autocast

ACTIVATIONS = ("relu", "jumprelu", "topk")


def sae_encode(x: torch.Tensor, sae: Mapping) -> torch.Tensor:
    """Feature activations ``[..., d_sae]`` of activations ``x: [..., d_in]``."""
    W_enc = sae["W_enc"]
    if x.shape[-1] != W_enc.shape[0]:
        raise ValueError(f"activations {tuple(x.shape)} do not match the SAE's W_enc {tuple(W_enc.shape)} "
                         f"([d_in, d_sae]): d_in {W_enc.shape[0]} != {x.shape[-1]}")
    with no_autocast(x):
        x = x.float().to(W_enc.device)
        if sae["apply_b_dec_to_input"]:
            x = x - sae["b_dec"].float()
        pre = x @ W_enc.float() + sae["b_enc"].float()  # [..., d_sae]
    activation = sae["activation"]
    if activation == "relu":
        return pre.relu()
    if activation == "jumprelu":
        return pre.relu() * (pre > sae["threshold"].float())
    if activation == "topk":
        top = pre.topk(sae["k"], dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    raise ValueError(f"unknown SAE activation {activation!r}; expected one of {ACTIVATIONS}")


def sae_decode(acts: torch.Tensor, sae: Mapping) -> torch.Tensor:
    """The reconstruction ``x_hat = acts @ W_dec + b_dec``: ``[..., d_sae] -> [..., d_in]``."""
    with no_autocast(acts):
        return acts.float() @ sae["W_dec"].float() + sae["b_dec"].float()


def feature_direct_logit(x: torch.Tensor, acts: torch.Tensor, sae: Mapping, u: torch.Tensor,
                         scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each feature's direct share of the logit, and the ``b_dec`` and error terms.

    x: ``[batch, d_in]`` (the site's activation at the read position); acts: ``[batch, d_sae]``;
    u: ``[batch, d_in]`` (`residual_direction`); scale: ``[batch]`` (`norm_scale`).
    Returns ``(features [batch, d_sae], terms [batch, 2])`` with ``terms`` = (b_dec, error); their
    sum is ``x . u / s``.
    """
    if x.shape != u.shape or acts.shape[:1] != x.shape[:1] or scale.shape != x.shape[:1]:
        raise ValueError(f"x {tuple(x.shape)}, acts {tuple(acts.shape)}, u {tuple(u.shape)} and scale "
                         f"{tuple(scale.shape)} are not [batch, d_in], [batch, d_sae], [batch, d_in], [batch]")
    with no_autocast(u):
        u, s = u.float(), scale.float()[:, None]
        decoder_u = einsum(sae["W_dec"].float(), u, "f d, b d -> b f")  # [batch, d_sae]
        error = x.float() - sae_decode(acts, sae)  # [batch, d_in]
        terms = torch.stack([sae["b_dec"].float().expand_as(u), error]) * u  # [2, batch, d_in]
        return acts.float() * decoder_u / s, terms.sum(-1).T / s


def feature_patching_scores(grad: torch.Tensor, clean: torch.Tensor, corrupted: torch.Tensor, sae: Mapping,
                            mask: torch.Tensor) -> torch.Tensor:
    """``(a_clean - a_corrupted) * (W_dec . grad)`` per pair, position and feature: ``[n, pos, d_sae]``.

    grad: ``[n, pos, d_in]`` (the metric's gradient at the site, on the corrupted run); clean,
    corrupted: ``[n, pos, d_sae]`` feature activations; mask: ``[n, pos]`` (`overlap_mask`).
    """
    if clean.shape != corrupted.shape or grad.shape[:2] != clean.shape[:2] or mask.shape != clean.shape[:2]:
        raise ValueError(f"grad {tuple(grad.shape)}, clean {tuple(clean.shape)}, corrupted {tuple(corrupted.shape)} "
                         f"and mask {tuple(mask.shape)} are not [n, pos, d_in], [n, pos, d_sae] (twice), [n, pos]")
    with no_autocast(grad):
        decoder_grad = einsum(grad.float(), sae["W_dec"].float(), "n p d, f d -> n p f")
        delta = (clean.float() - corrupted.float()) * mask[..., None].to(device=clean.device, dtype=torch.float32)
        return delta * decoder_grad


def top_features(scores: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` entries of each row largest in magnitude: ``(values, index)``, each ``[batch, k]``.

    scores: ``[batch, ...]``, flattened after the first dimension (``index`` is into that flat
    row); ``k`` None, or at least the row's size, keeps every entry, in order.
    """
    flat = scores.flatten(1)  # [batch, n]
    if k is None or k >= flat.shape[1]:
        index = torch.arange(flat.shape[1], device=flat.device).expand(flat.shape[0], -1)
        return flat, index
    index = flat.abs().topk(k, dim=-1).indices  # [batch, k]
    return flat.gather(1, index), index
