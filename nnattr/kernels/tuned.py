"""Tuned lens kernels: a layer's affine translator and the KL to the model's own output
(Belrose et al. 2023, Eliciting Latent Predictions from Transformers with the Tuned Lens).

The tuned lens decodes the residual ``h_l`` entering layer ``l`` (``l = 0``: the embeddings) as
``softcap(lm_head(ln_f(h_l + A_l h_l + b_l)))``: the translator's output is *added* to the
residual, so a zero translator (the initial one) is the logit lens. The last layer's output is
the model's own final residual and has no translator.
"""

from __future__ import annotations

import torch


def translate(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``h + h @ weight.T + bias``, computed in float32 and returned in ``h``'s dtype.

    h: ``[..., d_model]``; weight: ``[d_model, d_model]`` (``torch.nn.Linear`` layout: out, in);
    bias: ``[d_model]`` or None. Weight and bias move to ``h``'s device.
    """
    d = h.shape[-1]
    if weight.shape != (d, d) or (bias is not None and bias.shape != (d,)):
        raise ValueError(f"translator weight {tuple(weight.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)} do not fit a residual of d_model {d} "
                         f"(h {tuple(h.shape)}): expected [{d}, {d}] and [{d}]")
    x = h.float()
    out = x + x @ weight.to(x.device, torch.float32).T
    if bias is not None:
        out = out + bias.to(x.device, torch.float32)
    return out.to(h.dtype)


def kl_to_final(final_logits: torch.Tensor, lens_logits: torch.Tensor) -> torch.Tensor:
    """``KL(final || lens)`` per row, in nats: ``sum_v p_final (log p_final - log p_lens)``.

    final_logits, lens_logits: ``[..., vocab]``. Returns ``[...]`` float32 (float64 in, float64 out).
    """
    if final_logits.shape != lens_logits.shape:
        raise ValueError(f"final logits {tuple(final_logits.shape)} and lens logits "
                         f"{tuple(lens_logits.shape)} differ in shape: both [..., vocab]")
    dtype = torch.float64 if final_logits.dtype == torch.float64 else torch.float32
    log_p = final_logits.to(dtype).log_softmax(-1)
    log_q = lens_logits.to(dtype).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)
