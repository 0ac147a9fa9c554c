"""A family nnattr does not ship, described from Python: StableLM through ``nnattr.load(spec=)``
and ``nnattr.register``, checked against the plain-hooks reference, and specs that do not fit.

StableLM (``StableLmConfig``): LayerNorm, partial rotary embedding, q/k/v biases, grouped kv
heads. The spec below is the one docs/architectures.md walks through; the reference's module table
for it is written here from the Hugging Face module tree, not from the spec.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as T

import nnattr
from nnattr import arch
from nnattr.recipes import direct_logit_attribution, logit_lens
from nnattr.spec_check import SpecError
from tests.support import reference as ref
from tests.support import tiny
from tests.test_recipes import DISTRACTORS, PROMPTS, SHARPEN, TARGETS, close, ids, token

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

STABLELM = nnattr.ArchSpec(
    family="StableLM",
    model_types=("stablelm",),
    embed="model.embed_tokens",
    layers="model.layers",
    attn="self_attn",
    o_proj="o_proj",
    v_proj="v_proj",
    mlp="mlp",
    ln_f="model.norm",
    norm="layernorm",
    eps_key="layer_norm_eps",
    q_proj="q_proj",
    k_proj="k_proj",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
)


def stablelm(seed: int = 0):
    """A tiny random StableLM, biases and norms randomised and matrices sharpened as in test_recipes."""
    config = T.StableLmConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=tiny.VOCAB, max_position_embeddings=64,
                              use_qkv_bias=True, partial_rotary_factor=0.25, pad_token_id=0, bos_token_id=2,
                              eos_token_id=2)
    torch.manual_seed(seed)
    hf = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.mul_(SHARPEN)
    n = sum(p.numel() for p in hf.parameters())
    assert n < tiny.MAX_PARAMS, f"StableLM test model has {n} parameters: not tiny"
    return hf


@pytest.fixture()
def native(monkeypatch):
    """The reference's table for StableLM (module paths read off ``print(model)``)."""
    monkeypatch.setitem(ref.NATIVE, "stablelm", ref.Native(
        embeds=("model.embed_tokens",), blocks="model.layers", attn_write="self_attn", mlp_write="mlp",
        o_proj="self_attn.o_proj", v_module="self_attn.v_proj", values=ref._separate, final_norm="model.norm"))


@pytest.fixture()
def registry(monkeypatch):
    """`nnattr.register` for one test: the lookup is restored afterwards."""
    monkeypatch.setattr(arch, "_BY_TYPE", dict(arch._BY_TYPE))


def test_unknown_family_error_names_the_way_around():
    with pytest.raises(ValueError, match=r"model_type='stablelm'.*nnattr\.load\(model, spec=nnattr\.ArchSpec"
                                         r".*nnattr\.register\(nnattr\.ArchSpec.*docs/architectures\.md"):
        nnattr.load(stablelm(), tiny.tokenizer())


def test_spec_from_python_matches_the_reference(native):
    hf = stablelm()
    model = nnattr.load(hf, tiny.tokenizer(), spec=STABLELM)
    assert arch.arch_of(model).family == "StableLM" and nnattr.dims(model).n_kv_heads == 2
    components = direct_logit_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS)  # a left-padded batch
    heads = direct_logit_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, by="head")
    positions = direct_logit_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, by="head_position")
    lens = logit_lens.run(model, PROMPTS, TARGETS, positions="last")
    for i, p in enumerate(PROMPTS):
        x, t, d = ids(p), token(TARGETS[i]), token(DISTRACTORS[i])
        shares, logit = ref.dla_components(hf, x, t, d)
        close(components[i].values, shares[0])
        close(components[i].values.sum(), logit[0])  # the sum identity
        close(heads[i].values, ref.dla_heads(hf, x, t, d)[0])
        close(positions[i].values, ref.dla_head_positions(hf, x, t, d)[0])
        with torch.no_grad():
            probs = hf(x).logits[0, -1].softmax(-1)
        prob, _, _ = ref.logit_lens(hf, x, torch.tensor([[t]]), k=3)
        close(lens[i].values, prob[:, 0, 0])
        close(lens[i].values[-1], probs[t])  # the last layer's lens is the model


def test_registered_family_loads_by_model_type(registry):
    assert nnattr.register(STABLELM) is STABLELM
    assert "stablelm" in nnattr.supported()
    hf = stablelm()
    model = nnattr.load(hf, tiny.tokenizer())
    assert model._nnattr_spec == STABLELM  # checked on load: a registered spec is not nnattr's own
    result = direct_logit_attribution.run(model, PROMPTS, TARGETS)
    close(result.values.sum(-1), torch.tensor(result.per_prompt["logit"]))
    with pytest.raises(ValueError, match="'llama' already has the spec 'Llama': pass replace=True"):
        nnattr.register(dataclasses.replace(STABLELM, model_types=("llama",)))
    with pytest.raises(TypeError, match="takes an ArchSpec"):
        nnattr.register({"family": "StableLM"})


@pytest.mark.parametrize("field, value, alias, problem", [
    ("o_proj", "o_prj", "attn.o_proj", r"o_proj='o_prj' \(alias 'attn.o_proj'\) does not resolve: layers\[0\] "
                                       r"\(model.layers.0\).self_attn has no submodule 'o_prj'; did you mean 'o_proj'"),
    ("layers", "model.layer", "layers", r"layers='model.layer' \(alias 'layers'\).*did you mean 'layers'"),
    ("ln_f", "model.final_norm", "ln_f", r"alias 'ln_f'.*has no submodule 'final_norm'"),
    ("eps_key", "rms_norm_eps", "ln_f", r"eps_key='rms_norm_eps'.*epsilon keys: \['layer_norm_eps'\]"),
])
def test_a_path_that_does_not_resolve_names_its_alias(field, value, alias, problem):
    with pytest.raises(SpecError, match=problem) as error:
        nnattr.load(stablelm(), tiny.tokenizer(), spec=dataclasses.replace(STABLELM, **{field: value}))
    assert error.value.alias == alias


@pytest.mark.parametrize("change, alias, problem", [
    (dict(norm="rmsnorm"), "ln_f", r"ln_f='model.norm' \(alias 'ln_f'\) is not norm='rmsnorm'.*"
                                   r"It matches norm='layernorm', norm_weight_offset=0"),
    (dict(norm_weight_offset=1.0), "ln_f", r"norm_weight_offset=1.*It matches norm='layernorm', norm_weight_offset=0"),
    (dict(attn_out="post_attention_layernorm"), "layers[0].attn_out / mlp_out",
     r"not the sum of the writes.*layers\[0\]'s output"),
    (dict(block_tuple=True), "block_tuple", r"its decoder blocks return a tensor, so set block_tuple=False"),
])
def test_a_spec_that_breaks_the_identity_names_its_alias(change, alias, problem):
    with pytest.raises(SpecError, match=problem) as error:
        nnattr.load(stablelm(), tiny.tokenizer(), spec=dataclasses.replace(STABLELM, **change))
    assert error.value.alias == alias


def test_spec_must_be_an_archspec():
    with pytest.raises(TypeError, match="spec= takes an nnattr.ArchSpec"):
        nnattr.load(stablelm(), tiny.tokenizer(), spec={"family": "StableLM"})


def test_a_copy_of_a_shipped_spec_passes_its_checks_even_where_writes_change_in_place():
    # Falcon adds attention into its MLP's output tensor in place: the check keeps the writes as written.
    hf = tiny.hf_model("falcon")
    mine = dataclasses.replace(arch.spec_for(hf.config), family="My Falcon")
    assert nnattr.arch.arch_of(nnattr.load(hf, tiny.tokenizer(), spec=mine)).family == "My Falcon"
    with pytest.raises(SpecError, match="return a tuple, so set block_tuple=True"):  # what a skipped block returns
        nnattr.load(hf, tiny.tokenizer(), spec=dataclasses.replace(mine, block_tuple=False))


@pytest.mark.parametrize("change", [dict(mlp="mlp.down_proj"), dict(v_proj="o_proj", o_proj="v_proj"),
                                    dict(ln_f="model.layers.0.input_layernorm")])
def test_a_spec_nnsight_cannot_bind_is_a_spec_error(change):
    hf = T.StableLmForCausalLM(T.StableLmConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                                num_attention_heads=4, num_key_value_heads=4,
                                                vocab_size=tiny.VOCAB)).eval()
    spec = nnattr.ArchSpec(family="StableLM", model_types=("stablelm",), embed="model.embed_tokens",
                           layers="model.layers", attn="self_attn", o_proj="o_proj", v_proj="v_proj", mlp="mlp",
                           ln_f="model.norm", norm="layernorm", eps_key="layer_norm_eps")
    with pytest.raises(SpecError):
        nnattr.load(hf, tiny.tokenizer(), spec=dataclasses.replace(spec, **change))


def test_edge_attribution_on_a_family_added_from_python():
    """StableLM's edges: every reader reads the writers' changes it should (the edges out of each head and MLP sum to
    attribution patching's node score of it, computed another way), and a spec without the readers is refused."""
    from nnattr.recipes import attribution_patching, edge_attribution_patching

    model = nnattr.load(stablelm(), tiny.tokenizer(), spec=STABLELM)
    clean, corrupted = tiny.prompts(2, lengths=(5,)), tiny.prompts(2, seed=3, lengths=(5,))
    edges = edge_attribution_patching.run(model, clean, corrupted, ["w7", "w8"], ["w8", "w9"])
    nodes = attribution_patching.run(model, clean, corrupted, ["w7", "w8"], ["w8", "w9"], nodes=("head", "mlp"))
    out_of, W = edges.values.nansum(2), edges.labels["writer"]
    for layer in range(2):
        heads = [W.index(f"L{layer}H{h}") for h in range(4)]
        torch.testing.assert_close(out_of[:, heads], nodes["head"].values[:, layer], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out_of[:, W.index(f"L{layer} MLP")], nodes["mlp"].values[:, layer], atol=1e-5,
                                   rtol=1e-4)
    bare = dataclasses.replace(STABLELM, q_proj=None, k_proj=None, attn_norm=None, mlp_norm=None)
    with pytest.raises(ValueError, match="the spec names no attn_norm or mlp_norm or q_proj or k_proj"):
        edge_attribution_patching.run(nnattr.load(stablelm(), tiny.tokenizer(), spec=bare), clean, corrupted,
                                      ["w7", "w8"], ["w8", "w9"])


@pytest.mark.parametrize("family, change, alias", [
    ("gpt2", dict(o_proj_conv1d=False), "head_exact / o_proj_conv1d"),  # heads no longer add up to the write
    ("olmo2", dict(head_exact=True), "head_exact / o_proj_conv1d"),  # a norm follows attention
    ("falcon_new", dict(value_layout="qkv_blocks"), "value_layout"),
    ("phi3", dict(value_layout="grouped_qkv"), "value_layout"),
    ("falcon", dict(writes_in_place=False), "writes_in_place"),  # Falcon adds attention into its MLP's output
    ("qwen2_moe", dict(shared_expert=None, shared_expert_gate=None), "shared_expert"),
    ("gpt_oss", dict(attention_sinks=False), "attention_sinks"),
    ("llama", dict(attention_sinks=True), "attention_sinks"),
])
def test_a_wrong_field_that_components_cannot_see_is_caught_on_load(family, change, alias):
    """The head-level fields: the component checks pass with any of these wrong, the head checks do not."""
    hf = tiny.hf_model(family)
    spec = dataclasses.replace(arch.spec_for(hf.config), family="My copy", **change)
    with pytest.raises(SpecError) as error:
        nnattr.load(hf, tiny.tokenizer(), spec=spec)
    assert error.value.alias == alias


@pytest.mark.parametrize("change, problem", [
    (dict(model_types="stablelm"), r"model_types='stablelm' must be a tuple of config.model_type strings, "
                                   r"e.g. \('stablelm',\)"),
    (dict(norm="RMSNorm"), r"norm='RMSNorm'; expected one of 'layernorm', 'rmsnorm'"),
    (dict(value_layout="fused"), r"value_layout='fused'; expected one of 'separate', 'gpt2_fused'"),
])
def test_a_value_no_family_has_is_refused_when_the_spec_is_made(change, problem):
    with pytest.raises(ValueError, match=problem):
        dataclasses.replace(STABLELM, **change)
