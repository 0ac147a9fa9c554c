"""Falcon-RW (``alibi=True``; falcon-rw-1b/7b: sequential block, one kv head per head, old decoder layout).

transformers' eager Falcon adds ALiBi twice (``FalconModel`` folds it into the attention mask and
``FalconAttention``'s eager path adds it to the scores again); its sdpa path adds it once, as the
original Falcon-RW code does. So nnattr refuses an eager Falcon-RW (`nnattr.arch._falcon_unsupported`)
and runs an sdpa one, where everything that needs no attention probabilities is exact. Here: the
refusal's premise, computed by hand from the modules' own q, k, v (if transformers fixes its eager
path, the first test fails and the refusal should go); the refusal; and on sdpa, DLA by component
against plain forward hooks (no ``output_attentions``, which would switch Falcon to its eager path),
by head against the component, padded batch == one by one, the logit lens, and the refusals of the
probability methods. Not in ``tiny.CONFIGS``: every family test there needs eager probabilities.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T

import nnattr
from nnattr.recipes import activation_patching, attention_rollout, direct_logit_attribution as dla, logit_lens
from tests import test_recipes as base
from tests.support import reference as ref, tiny
from tests.test_families_b import hooks_patch
from tests.test_recipes import DISTRACTORS, PROMPTS, TARGETS, close, ids, token

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

RW = dict(num_attention_heads=4, alibi=True, multi_query=False, parallel_attn=False, new_decoder_architecture=False,
          bias=True, ffn_hidden_size=64, **{k: v for k, v in tiny._COMMON.items() if k != "intermediate_size"})


def falcon_rw(attn_implementation: str):
    """A tiny random Falcon-RW (seeded: the same weights either way), biases randomised, weights sharpened."""
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(T.FalconConfig(**RW), attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2) if p.ndim == 1 else p.mul_(base.SHARPEN)
    assert sum(p.numel() for p in hf.parameters()) < tiny.MAX_PARAMS
    return hf


@pytest.fixture(scope="module")
def sdpa():
    hf = falcon_rw("sdpa")
    with pytest.warns(UserWarning, match="cannot switch its attention implementation at run time"):
        model = nnattr.load(hf, tiny.tokenizer())
    return hf, model


def by_hand(hf, input_ids, alibi_times: int):
    """Layer 0's attention ``(probabilities [batch, head, q, k], output [batch, pos, d_model])`` from its own q, k, v
    with ALiBi (``slope_h * key position / sqrt(d_head)``, Press et al. 2022) added ``alibi_times`` times."""
    seen, attn = {}, hf.transformer.h[0].self_attention
    hook = attn.register_forward_hook(lambda m, a, kw, out: seen.update(x=a[0] if a else kw["hidden_states"], out=out),
                                      with_kwargs=True)
    try:
        with torch.no_grad():
            ref.forward(hf, input_ids)
    finally:
        hook.remove()
    with torch.no_grad():
        q, k, v = (x.transpose(1, 2) for x in attn._split_heads(attn.query_key_value(seen["x"])))  # [b, head, pos, d]
        n, d = q.shape[-2], q.shape[-1]
        slopes = 2.0 ** (-8.0 * torch.arange(1, 5) / 4)  # 4 heads: 2^(-8 h / n_heads)
        alibi = slopes[:, None, None] * torch.arange(n)[None, None, :]  # [head, 1, key]
        causal = torch.full((n, n), float("-inf")).triu(1)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + alibi_times * alibi / math.sqrt(d) + causal, -1)
        out = attn.dense((probs @ v).transpose(1, 2).flatten(2))
    return probs, out, seen["out"]


def test_eager_falcon_rw_adds_alibi_twice_sdpa_once():
    x = ids(PROMPTS[1])
    probs, _, (_, eager_probs) = by_hand(falcon_rw("eager"), x, alibi_times=2)
    close(eager_probs, probs, atol=1e-6, rtol=1e-5)  # eager: the model's own probabilities carry ALiBi twice
    once, out, (sdpa_out, _) = by_hand(falcon_rw("sdpa"), x, alibi_times=1)
    close(sdpa_out, out, atol=1e-5, rtol=1e-5)  # sdpa: the attention output with ALiBi once
    assert (once - probs).abs().max() > 1e-2  # the two are different models


def test_eager_falcon_rw_is_refused_with_the_reason(tmp_path):
    reason = r"this Falcon configuration: alibi=True \(Falcon-RW\) with eager attention: .*twice.*'sdpa'"
    with pytest.raises(ValueError, match=reason):
        nnattr.load(falcon_rw("eager"), tiny.tokenizer())
    assert nnattr.arch.spec_for(T.FalconConfig(**RW)).family == "Falcon"  # a bare config: no implementation yet
    falcon_rw("sdpa").save_pretrained(tmp_path)  # a checkpoint folder, loaded as a Hub repo would be
    tiny.tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=reason):
        nnattr.load(tmp_path)  # nnattr's default: eager
    assert nnattr.arch.arch_of(nnattr.load(tmp_path, attn_implementation="sdpa")).attention == "sdpa"


def plain_dla(hf, input_ids, target, distractor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(shares [component], heads [layer, head], logit)`` at the last position from forward hooks on a plain
    forward: each write, and each head's ``z_h W_O[:, h]^T``, through the final norm at its frozen scale."""
    n = hf.config.num_hidden_layers
    outputs, inputs = {"e": "transformer.word_embeddings"}, {"resid": "transformer.ln_f"}
    for i in range(n):
        outputs |= {f"a{i}": f"transformer.h.{i}.self_attention", f"m{i}": f"transformer.h.{i}.mlp"}
        inputs[f"z{i}"] = f"transformer.h.{i}.self_attention.dense"
    with torch.no_grad(), ref.recording(hf, outputs, inputs) as seen:
        logits = ref.forward(hf, input_ids).logits[0, -1]
    t, t2, resid = torch.tensor([target]), torch.tensor([distractor]), seen["resid"][:, -1].double()
    writes = torch.stack([seen[key][:, -1].double() for key in outputs])  # [component, 1, d_model]
    shares = ref.frozen_norm_share(hf, writes, resid, t, t2)[:, 0]
    heads = []
    for i in range(n):
        z = seen[f"z{i}"][0, -1].double().view(4, -1)  # [head, d_head]
        W_O = hf.transformer.h[i].self_attention.dense.weight.double().view(32, 4, -1)  # [d_model, head, d_head]
        per_head = torch.einsum("hd,mhd->hm", z, W_O)[:, None]  # [head, 1, d_model]
        heads.append(ref.frozen_norm_share(hf, per_head, resid, t, t2)[:, 0])
    return torch.cat([shares, ref.bias_share(hf, t, t2)]), torch.stack(heads), logits[target] - logits[distractor]


def test_sdpa_falcon_rw_dla_and_lens_are_exact(sdpa):
    hf, model = sdpa
    assert nnattr.arch.arch_of(model).attention == "sdpa"
    whole = dla.run(model, PROMPTS, TARGETS, DISTRACTORS)  # a left-padded batch
    heads = dla.run(model, PROMPTS, TARGETS, DISTRACTORS, by="head")
    lens = logit_lens.run(model, PROMPTS, TARGETS, positions="last")
    for i, p in enumerate(PROMPTS):
        x, t, d = ids(p), token(TARGETS[i]), token(DISTRACTORS[i])
        shares, per_head, logit = plain_dla(hf, x, t, d)
        close(whole[i].values, shares)
        close(whole[i].values.sum(), logit)
        close(heads[i].values, per_head)
        close(dla.run(model, p, TARGETS[i], DISTRACTORS[i])[0].values, whole[i].values)  # alone == in the batch
        with torch.no_grad():
            probs = ref.forward(hf, x).logits[0, -1].softmax(-1)  # [vocab]
        close(lens.values[i, -1], probs[t])  # the lens's last layer is the model


@pytest.mark.filterwarnings("ignore:pairs")  # recovery of random tiny models: compared as numbers
def test_sdpa_falcon_rw_exact_patching_matches_hooks(sdpa):
    hf, model = sdpa
    clean, corrupted = tiny.prompts(1, lengths=(5,)), tiny.prompts(1, seed=3, lengths=(5,))
    got = activation_patching.run(model, clean, corrupted, TARGETS[:1], DISTRACTORS[:1],
                                  nodes=("resid", "attn_pos", "mlp_pos"))
    want = hooks_patch(hf, clean[0], corrupted[0], TARGETS[0], DISTRACTORS[0], 2, 5)  # plain forwards: sdpa
    for site, key in (("resid", "resid"), ("attn", "attn_pos"), ("mlp", "mlp_pos")):
        close(got[key].values[0], want[site], atol=1e-4)  # a ratio of float32 logit differences


def test_sdpa_falcon_rw_refuses_methods_that_need_probabilities(sdpa):
    _, model = sdpa
    with pytest.raises(ValueError, match="needs attention probabilities"):
        attention_rollout.run(model, PROMPTS)
    with pytest.raises(ValueError, match="needs attention probabilities"):
        dla.run(model, PROMPTS, TARGETS, by="head_position")
