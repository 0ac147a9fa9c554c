"""Issue-14 families (famB): GPT-J and Falcon (parallel attention + MLP blocks), Phi-3 (fused qkv),
and OPT (its MLP computed on the flattened stream).

The parity of every recipe with the hooks reference, the DLA sum identity and padding invariance
run for ``gptj``, ``falcon`` (Falcon-7B's layout: multi-query, parallel), ``falcon_new`` (the new
decoder architecture: grouped kv, two norms) and ``phi3`` in the parametrized tests over
``tiny.ARCHS``; attribution patching in tests/test_patching.py; remote == local in
tests/test_families_remote.py. Here: the value layouts against each module's own split, the
classic Falcon layout (one kv head per head, sequential block), exact activation patching on the
parallel blocks against forward hooks that replace the native module's output (Falcon adds
attention into the MLP's output tensor in place: a cached copy must not see that), GPT-J's
unembedding bias in the DLA bias term, and the refusal of OPT's post-norm and projected configurations.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

import nnattr
from nnattr.kernels import split_values
from nnattr.recipes import activation_patching, attention_rollout, direct_logit_attribution as dla
from tests import test_recipes as base
from tests.support import reference as ref, tiny
from tests.test_recipes import DISTRACTORS, PROMPTS, TARGETS, close, ids, token

zoo = base.zoo  # the sharpened tiny models
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

_FALCON = {k: v for k, v in tiny._COMMON.items() if k != "intermediate_size"}
CLASSIC = dict(num_attention_heads=4, multi_query=False, parallel_attn=False, new_decoder_architecture=False,
               bias=True, ffn_hidden_size=64, **_FALCON)  # Falcon-RW-like (rotary here): sequential, a kv per head


@pytest.mark.parametrize("config", [tiny.CONFIGS["falcon"](), tiny.CONFIGS["falcon_new"](), T.FalconConfig(**CLASSIC)],
                         ids=["multi_query", "new_decoder", "classic"])
def test_falcon_values_are_the_modules_own_split(config):
    torch.manual_seed(0)
    attn = T.models.falcon.modeling_falcon.FalconAttention(config, layer_idx=0)
    raw = attn.query_key_value(torch.randn(2, 5, 32))
    d = nnattr.dims(config)
    got = split_values(raw, layout="grouped_qkv", n_heads=d.n_heads, n_kv_heads=d.n_kv_heads, d_head=d.d_head)
    value = attn._split_heads(raw)[2]  # [batch, pos, kv_head (new decoder: broadcast to every head), d_head]
    assert got.shape[2] == {False: 1 if config.multi_query else 4, True: 2}[config.new_decoder_architecture]
    torch.testing.assert_close(got.repeat_interleave(value.shape[2] // got.shape[2], dim=2), value, rtol=0, atol=0)


def test_phi3_values_are_the_modules_own_slice(zoo):
    hf, _ = zoo("phi3")
    raw = ref.blocks(hf)[0].self_attn.qkv_proj(torch.randn(1, 4, 32))
    d = nnattr.dims(hf)
    got = split_values(raw, layout="qkv_blocks", n_heads=d.n_heads, n_kv_heads=d.n_kv_heads, d_head=d.d_head)
    close(got.flatten(2), raw[..., 48:], atol=0)  # [q: 4 heads * 8 | k: 2 * 8 | v: 2 * 8]
    assert d.n_kv_heads == 2 and got.shape == (1, 4, 2, 8)


def test_classic_falcon_dla_heads_by_source_match_the_reference():
    torch.manual_seed(1)  # biases and norms randomised, weights sharpened, as the zoo's models
    hf = T.AutoModelForCausalLM.from_config(T.FalconConfig(**CLASSIC), attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.mul_(base.SHARPEN)
    model = nnattr.load(hf, tiny.tokenizer())
    result = dla.run(model, PROMPTS, TARGETS, DISTRACTORS, by="head_position")
    whole = dla.run(model, PROMPTS, TARGETS, DISTRACTORS)
    for i, p in enumerate(PROMPTS):
        x, t, d = ids(p), token(TARGETS[i]), token(DISTRACTORS[i])
        L = x.shape[1]
        close(result[i].values[..., -L:], ref.dla_head_positions(hf, x, t, d)[0])
        shares, logit = ref.dla_components(hf, x, t, d)
        close(whole[i].values, shares[0])
        close(whole[i].values.sum(), logit[0])


def test_gptj_unembedding_bias_is_in_the_bias_term(zoo):
    hf, model = zoo("gptj")
    assert hf.lm_head.bias is not None and hf.lm_head.bias.abs().sum() > 0
    result = dla.run(model, PROMPTS, TARGETS, DISTRACTORS)
    t, d = torch.tensor([token(w) for w in TARGETS]), torch.tensor([token(w) for w in DISTRACTORS])
    b = hf.lm_head.bias.detach().double()
    norm_bias = (hf.lm_head.weight[t] - hf.lm_head.weight[d]).double() @ hf.transformer.ln_f.bias.double()
    close(result.values[:, -1], b[t] - b[d] + norm_bias)


def hooks_patch(hf, clean: str, corrupted: str, answer: str, distractor: str, layers: int, length: int) -> dict:
    """Exact patching with forward hooks on the native modules, one node at a time:
    ``{site: [layer, pos]}`` of normalised recovery, sites resid (the block's input), attn, mlp."""
    nat, tok = ref.native(hf), tiny.tokenizer()
    t, t2 = tok.convert_tokens_to_ids(answer), tok.convert_tokens_to_ids(distractor)

    def run(text, node=None, value=None):
        keep, hooks = {}, []
        for i, block in enumerate(ref.blocks(hf)):
            def pre(m, a, kw, i=i):
                x = a[0] if a else kw["hidden_states"]
                if node == (i, "resid"):
                    x[:, pos] = value
                keep[i, "resid"] = x.clone()
            hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            for site, path in (("attn", nat.attn_write), ("mlp", nat.mlp_write)):
                def post(m, a, out, i=i, site=site):
                    x = out[0] if isinstance(out, tuple) else out
                    x = x.unflatten(0, (1, -1)) if x.ndim == 2 else x  # OPT's fc2: [pos, d_model], a view
                    if node == (i, site):
                        x[:, pos] = value
                    keep[i, site] = x.clone()  # now: the block may add into it in place afterwards
                hooks.append(block.get_submodule(path).register_forward_hook(post))
        try:
            with torch.no_grad():
                logits = ref.forward(hf, ids(text)).logits[0, -1]
        finally:
            for h in hooks:
                h.remove()
        return float(logits[t] - logits[t2]), keep

    m_clean, cache = run(clean)
    m_corrupted, _ = run(corrupted)
    out = {site: torch.zeros(layers, length, dtype=torch.float64) for site in ("resid", "attn", "mlp")}
    for site in out:
        for layer in range(layers):
            for pos in range(length):
                m, _ = run(corrupted, (layer, site), cache[layer, site][0, pos])
                out[site][layer, pos] = (m - m_corrupted) / (m_clean - m_corrupted)
    return out


@pytest.mark.filterwarnings("ignore:pairs")  # a small gap: the same ratio on both sides, compared as numbers
@pytest.mark.parametrize("arch", ["gptj", "falcon", "falcon_new", "opt"])
def test_exact_patching_of_parallel_blocks_matches_hooks(zoo, arch):
    """Patching resid / attn / mlp on a parallel block means what it means on a sequential one:
    the residual entering the block, attention's write, the MLP's write."""
    hf, model = zoo(arch)
    clean, corrupted = tiny.prompts(2, lengths=(5,)), tiny.prompts(2, seed=3, lengths=(5,))
    got = activation_patching.run(model, clean, corrupted, TARGETS[:2], DISTRACTORS[:2],
                                  nodes=("resid", "attn_pos", "mlp_pos"))
    for i in range(2):
        want = hooks_patch(hf, clean[i], corrupted[i], TARGETS[i], DISTRACTORS[i], 2, 5)
        for site, key in (("resid", "resid"), ("attn", "attn_pos"), ("mlp", "mlp_pos")):
            close(got[key].values[i], want[site], atol=1e-4)  # a ratio of float32 logit differences


@pytest.mark.parametrize("change, reason", [
    ({"do_layer_norm_before": False}, "do_layer_norm_before=False"),
    ({"word_embed_proj_dim": 16}, "project_in/project_out"),
])
def test_opt_post_norm_and_projected_configurations_are_refused_with_the_reason(change, reason):
    config = T.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64, vocab_size=100,
                         **{"word_embed_proj_dim": 32, **change})
    with pytest.raises(ValueError, match="does not support this OPT configuration: ") as error:
        nnattr.spec_for(config)
    assert reason in str(error.value)
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        nnattr.load(T.AutoModelForCausalLM.from_config(config), tiny.tokenizer())
    assert "opt" in nnattr.supported()  # the pre-norm configurations (OPT-125m, 1.3b and up) are supported


def test_falcon_built_with_sdpa_says_it_cannot_switch_and_rollout_refuses():
    hf = tiny.hf_model("falcon", attn_implementation="sdpa")
    with pytest.warns(UserWarning, match="cannot switch its attention implementation at run time") as said:
        model = nnattr.load(hf, tiny.tokenizer())
    assert not [w for w in said if "switched the model" in str(w.message)]  # one message, not two contradicting
    with pytest.raises(ValueError, match="needs attention probabilities.*Falcon cannot switch at run time: build it "
                                         "eager"):
        attention_rollout.run(model, PROMPTS)
    result = dla.run(model, PROMPTS, TARGETS, DISTRACTORS)  # sdpa: the components still sum to the model's logit
    for i, p in enumerate(PROMPTS):  # (not the reference's read_out: output_attentions on an sdpa Falcon is not sdpa)
        with torch.no_grad():
            logits = ref.forward(hf, ids(p)).logits[0, -1]
        close(result[i].values.sum(), logits[token(TARGETS[i])] - logits[token(DISTRACTORS[i])])
