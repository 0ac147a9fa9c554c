"""AtP* (QK fix, GradDrop) against a brute-force plain-autograd reference and exact patching.

The reference wraps the family's eager attention function (no nnsight, no nnattr kernels): it records each layer's
post-RoPE q, k, v and mask, keeps the attention probabilities' gradient by autograd, and recomputes every patched
softmax in full, one query row or one key column at a time. GradDrop's reference detaches each block's contribution
in turn with a forward hook and reruns the backward.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch.testing import assert_close

import nnattr
from nnattr.recipes import activation_patching, atp_star
from tests.support import tiny

torch.set_num_threads(1)
CLEAN, CORRUPTED = tiny.prompts(2, lengths=(5, 6)), tiny.prompts(2, seed=1, lengths=(5, 6))
ANSWER, DISTRACTOR = ["w5", "w17"], ["w9", "w3"]


def sharpened(arch):
    hf = tiny.hf_model(arch)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.mul_(6.0)  # saturated-ish attention: the softmax's nonlinearity matters
    return hf


def record(hf, ids, mask, *, drop=None):
    """Run the HF model, recording (q, k, v, mask, scaling, weights, output) per layer, keeping the gradients of
    the probabilities and the head outputs; ``drop``: detach that block's contribution to the residual stream."""
    mod = importlib.import_module(type(hf).__module__)
    original, seen = mod.eager_attention_forward, []

    def wrapped(module, q, k, v, m, scaling=None, dropout=0.0, **kw):
        out, w = original(module, q, k, v, m, scaling=scaling, dropout=dropout, **kw)
        if out.requires_grad:
            w.retain_grad(), out.retain_grad()
        seen.append((q.detach(), k.detach(), v.detach(), m, scaling, w, out))
        return out, w

    layers = hf.get_submodule(nnattr.spec_for(hf).layers)
    hooks = [] if drop is None else [layers[drop].register_forward_hook(
        lambda _, args, out: args[0] + (out - args[0]).detach())]
    mod.eager_attention_forward = wrapped
    try:
        logits = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    finally:
        mod.eager_attention_forward = original
        for h in hooks:
            h.remove()
    return logits, seen


def reference(hf, *, drop=None):
    """``[3 (query, key, value), pair, layer, head, pos]``: every patched softmax recomputed in full."""
    tok = tiny.tokenizer()
    enc = tok(CLEAN + CORRUPTED, return_tensors="pt", padding=True)
    answer, other = (torch.tensor(tok.convert_tokens_to_ids(x)) for x in (ANSWER, DISTRACTOR))
    with torch.no_grad():
        _, clean = record(hf, enc.input_ids[:2], enc.attention_mask[:2])
    logits, seen = record(hf, enc.input_ids[2:], enc.attention_mask[2:], drop=drop)
    rows = torch.arange(2)
    (logits[rows, -1, answer] - logits[rows, -1, other]).sum().backward()
    out = []
    for (q, k, v, m, sc, w, z), (qc, kc, vc, *_) in zip(seen, clean):
        rep = q.shape[1] // k.shape[1]
        k, v, kc, vc = (x.repeat_interleave(rep, 1) for x in (k, v, kc, vc))
        a = w.detach()  # a block whose contribution is dropped gets no gradient at all: zero
        g = torch.zeros_like(a) if w.grad is None else w.grad
        g_z = (torch.zeros_like(z) if z.grad is None else z.grad).transpose(1, 2)  # [b, head, query, d]
        soft = lambda qq, kk: (qq @ kk.transpose(-1, -2) * sc + m).softmax(-1)  # noqa: E731
        parts = torch.zeros(3, *q.shape[:3])
        for t in range(q.shape[2]):
            qq, kk = q.clone(), k.clone()
            qq[:, :, t], kk[:, :, t] = qc[:, :, t], kc[:, :, t]
            parts[0, :, :, t] = (g * (soft(qq, k) - a)).sum((-1, -2))
            parts[1, :, :, t] = (g * (soft(q, kk) - a)).sum((-1, -2))
            parts[2, :, :, t] = (a[..., t] * (g_z @ (vc - v)[:, :, t, :, None])[..., 0]).sum(-1)
        out.append(parts)
    return torch.stack(out, 2)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_qk_fix_matches_brute_force_reference(arch):
    hf = sharpened(arch)
    model = nnattr.load(hf, tokenizer=tiny.tokenizer())
    got = atp_star.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR)
    want = reference(sharpened(arch))  # a fresh copy: nnsight instruments the traced one's forward
    for i, name in enumerate(("query", "key", "value")):
        assert_close(got[name].values.nan_to_num(), want[i], atol=1e-4, rtol=1e-4)
    assert_close(got["head"].values, want.sum((0, -1)), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_grad_drop_matches_detached_blocks(arch):
    hf = sharpened(arch)
    model = nnattr.load(hf, tokenizer=tiny.tokenizer())
    got = atp_star.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, grad_drop=True)["head"].values
    n = hf.config.num_hidden_layers
    want = sum(reference(sharpened(arch), drop=layer).sum((0, -1)).abs() for layer in range(n)) / (n - 1)
    assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch, why", [("falcon", "attention interface"), ("gemma2", "soft-caps"),
                                       ("gpt_oss", "sinks")])
def test_refuses_families_whose_softmax_it_cannot_recompute(arch, why):
    model = nnattr.load(tiny.hf_model(arch), tokenizer=tiny.tokenizer())
    with pytest.raises(ValueError, match=why):
        atp_star.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR)


def test_tiny_ioi_l0h2_against_exact_patching():
    """The report's false negative: L0H2's AtP estimate is half its exact effect; AtP* moves it closer."""
    model = nnattr.load("tiny-ioi")
    pair = ("When Mary and John went to the store , John gave a drink to",
            "When Mary and John went to the store , Mary gave a drink to", " Mary", " John")
    got = atp_star.run(model, *pair)
    exact = activation_patching.run(model, *pair, nodes=("head",))["head"]
    gap = exact.per_prompt["clean_metric"][0] - exact.per_prompt["corrupted_metric"][0]
    want, star, atp = exact.values[0, 0, 2].item() * gap, got["head"].values[0, 0, 2].item(), \
        got["atp"].values[0, 0, 2].item()
    assert want == pytest.approx(43.4, abs=0.2) and atp == pytest.approx(21.0, abs=0.2)
    assert abs(star - want) < abs(atp - want) and star == pytest.approx(22.7, abs=0.2)


def test_sdpa_masks_give_the_eager_scores():
    """Under sdpa the interface may get no mask (causal) or a boolean one: the same scores as eager's additive mask."""
    eager = atp_star.run(nnattr.load(sharpened("llama"), tokenizer=tiny.tokenizer()), CLEAN, CORRUPTED, ANSWER,
                         DISTRACTOR)
    hf = sharpened("llama")
    hf.set_attn_implementation("sdpa")
    sdpa = atp_star.run(nnattr.load(hf, tokenizer=tiny.tokenizer(), attn_implementation="sdpa"), CLEAN, CORRUPTED,
                        ANSWER, DISTRACTOR)
    for name in ("head", "query", "key", "value"):
        assert_close(sdpa[name].values, eager[name].values, atol=1e-4, rtol=1e-4, equal_nan=True)
