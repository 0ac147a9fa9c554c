"""The four recipes against independent plain-PyTorch references, invariants and bad input.

References live in ``tests/support/reference.py`` (forward hooks on the native Hugging Face
modules, no nnsight, no nnattr kernels). Every recipe runs on a left-padded batch of prompts of
different lengths; references run each prompt alone, so every parity test is also a padding test.
Models: ``tests/support/tiny.py`` (2 layers, d_model 32, float32), with their matrices scaled
by ``SHARPEN`` so logits are O(1) and attention is far from uniform.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import nnattr
from nnattr.recipes import attention_rollout, direct_logit_attribution, head_attribution, logit_lens
from tests.support import reference as ref
from tests.support import tiny

SHARPEN = 10.0  # random init gives logits ~0.3; x10 on every matrix gives ~3 (Gemma-2's cap is 5)
TOL = dict(atol=1e-5, rtol=0.0)  # float32 recipe vs float64-from-float32 reference
PROMPTS = tiny.prompts(3)  # 5, 7 and 4 tokens: a left-padded batch
TARGETS, DISTRACTORS = ["w5", "w17", "w42"], ["w9", "w3", "w60"]
HEAD_EXACT = [a for a in tiny.ARCHS if nnattr.arch.spec_for(tiny.CONFIGS[a]()).head_exact]  # others refuse (below)


def close(actual, expected, **tol):
    torch.testing.assert_close(actual.double(), torch.as_tensor(expected).double(), **{**TOL, **tol})


def ids(prompt: str) -> torch.Tensor:
    return tiny.tokenizer()(prompt, return_tensors="pt")["input_ids"]  # [1, pos]


def token(word: str) -> int:
    return tiny.tokenizer().convert_tokens_to_ids(word)


def build(arch: str, *, attn_implementation: str = "eager"):
    hf = tiny.hf_model(arch, attn_implementation=attn_implementation)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.mul_(SHARPEN)
    return hf


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def zoo():
    """``zoo(arch) -> (hf_model, nnattr_model)``, built once per module (same module objects)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            hf = build(arch)
            cache[arch] = hf, nnattr.load(hf, tiny.tokenizer())
        return cache[arch]

    return get


# ----------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_dla_components_sum_to_the_logit(zoo, arch):
    hf, model = zoo(arch)
    for target, distractor in ((None, None), (TARGETS, DISTRACTORS)):
        result = direct_logit_attribution.run(model, PROMPTS, target, distractor)
        layers = direct_logit_attribution.run(model, PROMPTS, target, distractor, by="layer")
        assert result.labels["component"][-1] == "bias"
        for i, p in enumerate(PROMPTS):
            t = None if target is None else token(target[i])
            d = None if distractor is None else token(distractor[i])
            _, logit = ref.dla_components(hf, ids(p), t, d)  # lm_head's own (pre-soft-cap) logit
            close(result.values[i].sum(), logit[0])
            close(layers.values[i].sum(), logit[0])
            close(torch.tensor(result.per_prompt["logit"][i]), logit[0])
    if arch == "gemma2":  # the soft-capped sum is the model's output logit
        cap = hf.config.final_logit_softcapping
        with torch.no_grad():
            out = hf(ids(PROMPTS[0])).logits[0, -1]
        top = direct_logit_attribution.run(model, PROMPTS[0])
        close(cap * torch.tanh(top.values[0].sum() / cap), out.max())


@pytest.mark.parametrize("arch", HEAD_EXACT)
def test_dla_heads_add_up_to_attention(zoo, arch):
    hf, model = zoo(arch)
    components = direct_logit_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS)
    heads = direct_logit_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, by="head")
    positions = direct_logit_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, by="head_position")
    attn = [components.labels["component"].index(f"{l}_attn_out") for l in range(hf.config.num_hidden_layers)]
    for i, p in enumerate(PROMPTS):
        bias = ref.o_proj_bias_shares(hf, ids(p), token(TARGETS[i]), token(DISTRACTORS[i]))[0]  # [layer]
        close(heads.values[i].sum(-1) + bias, components.values[i, attn])
        close(positions[i].values.sum(-1), heads.values[i])


# ----------------------------------------------------------------------------- parity with hooks


def _dla(by, reference):
    def check(hf, model):
        result = direct_logit_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, by=by)
        for i, p in enumerate(PROMPTS):
            expected = reference(hf, ids(p), token(TARGETS[i]), token(DISTRACTORS[i]))
            close(result[i].values, expected[0][0] if by == "component" else expected[0])

    return check


def _logit_lens(hf, model):
    result = logit_lens.run(model, PROMPTS, positions="all", k=3)
    for i, p in enumerate(PROMPTS):
        x = ids(p)
        with torch.no_grad():
            top = hf(x).logits[0, -1].argmax()
        expected = torch.cat([x[0, 1:], top[None]])[None]  # [1, pos]: next token, then the answer
        prob, rank, top_prob = ref.logit_lens(hf, x, expected, k=3)
        close(result[i].values, prob[:, 0])
        assert result.per_prompt["target_rank"][i] == rank[:, 0].tolist()
        close(torch.tensor(result.per_prompt["top_probs"][i]), top_prob[:, 0])


def _head_attribution(hf, model):
    result = head_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, by="head_position")
    heads = head_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS)
    for i, p in enumerate(PROMPTS):
        expected = ref.head_attribution(hf, ids(p), token(TARGETS[i]), token(DISTRACTORS[i]))[0]
        close(result[i].values, expected)
        close(heads[i].values, expected.sum(-1))


def _rollout(hf, model):
    result = attention_rollout.run(model, PROMPTS)
    for i, p in enumerate(PROMPTS):
        close(result[i].values, ref.rollout(hf, ids(p))[0])


PARITY = {
    "dla_component": _dla("component", ref.dla_components),
    "dla_head": _dla("head", ref.dla_heads),
    "dla_head_position": _dla("head_position", ref.dla_head_positions),
    "logit_lens": _logit_lens,
    "head_attribution": _head_attribution,
    "attention_rollout": _rollout,
}


@pytest.mark.parametrize("arch, method", [  # Gemma-2, OLMo-2/3, Gemma-3 refuse head-level DLA (test_head_dla_refused)
    (arch, method) for method in PARITY for arch in tiny.ARCHS
    if arch in HEAD_EXACT or method not in ("dla_head", "dla_head_position")])
def test_parity_with_hooks_reference(zoo, arch, method):
    PARITY[method](*zoo(arch))


def test_parity_with_transformer_lens(zoo):
    import transformer_lens as tl  # a test dependency: the peer on identical weights
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf, model = zoo("gpt2")
    c = hf.config
    cfg = tl.HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd,
        d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new", normalization_type="LN", eps=c.layer_norm_epsilon,
    )
    hooked = tl.HookedTransformer(cfg)
    hooked.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=True, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False)
    result = direct_logit_attribution.run(model, PROMPTS[0], TARGETS[0])
    _, cache = hooked.run_with_cache(ids(PROMPTS[0]))
    stack = cache.apply_ln_to_stack(cache.decompose_resid(layer=-1, pos_slice=-1), layer=-1, pos_slice=-1)
    close(result.values[0, :-1], (stack @ hooked.W_U[:, token(TARGETS[0])])[:, 0], atol=1e-4, rtol=0.0)


# ----------------------------------------------------------------------------- batching


RUNS = {
    "dla": lambda m, p, **kw: direct_logit_attribution.run(m, p, **kw),
    "dla_head_position": lambda m, p, **kw: direct_logit_attribution.run(m, p, by="head_position", **kw),
    "logit_lens": lambda m, p, **kw: logit_lens.run(m, p, positions="all", **kw),
    "head_attribution": lambda m, p, **kw: head_attribution.run(m, p, by="head_position", **kw),
    "attention_rollout": lambda m, p, **kw: attention_rollout.run(m, p, **kw),
}


@pytest.mark.parametrize("recipe", RUNS)
@pytest.mark.parametrize("arch, batch", [("gpt2", "padded"), ("gpt2", "equal"), ("llama", "padded")])
def test_batch_equals_prompts_one_by_one(zoo, arch, batch, recipe):
    """GPT-2 has absolute positions (left padding must not shift them; without padding its
    position embedding has batch size 1); Llama has RoPE and grouped kv heads."""
    _, model = zoo(arch)
    prompts = tiny.prompts(3, lengths=(5, 7, 4) if batch == "padded" else (6,))
    together = RUNS[recipe](model, prompts)
    for i, p in enumerate(prompts):
        alone = RUNS[recipe](model, p)[0]
        assert together[i].labels == alone.labels
        close(together[i].values, alone.values)


@pytest.mark.parametrize("recipe", RUNS)
def test_chunked_run_equals_unchunked(zoo, recipe):
    _, model = zoo("llama")
    whole = RUNS[recipe](model, PROMPTS)
    chunked = RUNS[recipe](model, PROMPTS, batch_size=1)
    assert chunked.labels == whole.labels and chunked.tokens == whole.tokens
    close(chunked.values, whole.values, equal_nan=True)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_logit_lens_last_layer_is_the_model(zoo, arch):
    hf, model = zoo(arch)
    every = logit_lens.run(model, PROMPTS, positions="all")
    last = logit_lens.run(model, PROMPTS, TARGETS, positions="last")
    for i, p in enumerate(PROMPTS):
        x = ids(p)
        with torch.no_grad():
            probs = hf(x).logits[0].softmax(-1)  # [pos, vocab]
        expected = torch.cat([x[0, 1:], probs[-1].argmax()[None]])
        close(every[i].values[-1], probs.gather(-1, expected[:, None])[:, 0])
        close(last.values[i, -1], probs[-1, token(TARGETS[i])])


def test_logit_lens_builds_no_graph_over_the_vocabulary(zoo):
    """Each layer's read-out is reduced at once; a graph would keep every layer's [batch, pos, vocab]
    softmax alive to the end of the trace (+1.1 GiB peak on GPT-2 small, 8 x 64 tokens, all positions)."""
    hf, model = zoo("gpt2")

    def saved_vocab_sized(run) -> int:
        shapes = []

        def pack(t):
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return sum(len(s) > 1 and s[-1] == hf.config.vocab_size for s in shapes)

    model_alone = saved_vocab_sized(lambda: hf(ids(PROMPTS[0])))  # the unembedding weight
    assert saved_vocab_sized(lambda: logit_lens.run(model, PROMPTS, positions="all")) <= model_alone


def test_head_attribution_on_frozen_parameters(zoo):
    hf, model = zoo("gpt2")
    expected = head_attribution.run(model, PROMPTS, TARGETS)
    hf.requires_grad_(False)  # as a hosted model: the recipe must start the graph itself
    try:
        frozen = head_attribution.run(model, PROMPTS, TARGETS)
    finally:
        hf.requires_grad_(True)
    close(frozen.values, expected.values)
    assert frozen.values.abs().sum() > 0


def test_head_attribution_leaves_no_gradients_on_the_model(zoo):
    hf, model = zoo("gpt2")
    hf.zero_grad(set_to_none=True)
    head_attribution.run(model, PROMPTS, TARGETS)
    assert [n for n, p in hf.named_parameters() if p.grad is not None] == []


# ----------------------------------------------------------------------------- bad input


WITH_TARGET = [direct_logit_attribution, logit_lens, head_attribution]
ALL = WITH_TARGET + [attention_rollout]


@pytest.mark.parametrize("recipe", WITH_TARGET, ids=lambda r: r.__name__.rsplit(".", 1)[-1])
def test_bad_targets(zoo, recipe):
    _, model = zoo("gpt2")
    with pytest.raises(ValueError, match=r"'w1 w2' is 2 tokens \['w1', 'w2'\]"):
        recipe.run(model, PROMPTS, "w1 w2")
    with pytest.raises(ValueError, match="'zzz' is not in the vocabulary"):
        recipe.run(model, PROMPTS, "zzz")
    with pytest.raises(ValueError, match="2 targets for 3 prompts"):
        recipe.run(model, PROMPTS, TARGETS[:2])
    if recipe is not logit_lens:
        with pytest.raises(ValueError, match="1 distractors for 3 prompts"):
            recipe.run(model, PROMPTS, "w5", ["w9"])


@pytest.mark.parametrize("recipe", ALL, ids=lambda r: r.__name__.rsplit(".", 1)[-1])
def test_bad_prompts(zoo, recipe):
    _, model = zoo("gpt2")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        recipe.run(model, ["w1 w2", "  "])
    with pytest.raises(ValueError, match=r"prompt 0 has tokens not in the vocabulary: \['zzz'\]"):
        recipe.run(model, ["w1 zzz w2"])
    with pytest.raises(ValueError, match="no prompts given"):
        recipe.run(model, [])


def test_rollout_and_position_dla_refuse_sdpa():
    model = nnattr.load(build("llama", attn_implementation="sdpa"), tiny.tokenizer(), attn_implementation="sdpa")
    with pytest.raises(ValueError, match="'sdpa' attention.*attn_implementation='eager'"):
        attention_rollout.run(model, PROMPTS)
    with pytest.raises(ValueError, match="'sdpa' attention.*attn_implementation='eager'"):
        direct_logit_attribution.run(model, PROMPTS, by="head_position")


@pytest.mark.parametrize("by", ["head", "head_position"])
@pytest.mark.parametrize("arch", [a for a in tiny.ARCHS if a not in HEAD_EXACT])
def test_head_dla_refused(zoo, arch, by):
    _, model = zoo(arch)
    family = nnattr.arch.spec_for(model.config).family
    with pytest.raises(ValueError, match=f"not exact on {family}.*by='component'"):
        direct_logit_attribution.run(model, PROMPTS, by=by)


def test_unsupported_architecture(tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(n_layer=1, hidden_size=8, n_head=2, vocab_size=tiny.VOCAB)
    supported = ", ".join(nnattr.arch.supported())
    message = rf"model_type='bloom'.*Supported: {supported}.*docs/architectures\.md"
    with pytest.raises(ValueError, match=message):
        nnattr.load(BloomForCausalLM(config), tiny.tokenizer())
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        nnattr.load(str(tmp_path))


# ----------------------------------------------------------------------------- result type


RESULTS = {
    "dla": lambda m: direct_logit_attribution.run(m, PROMPTS, by="head_position"),
    "logit_lens": lambda m: logit_lens.run(m, PROMPTS, positions="all"),
    "head_attribution": lambda m: head_attribution.run(m, PROMPTS),
    "attention_rollout": lambda m: attention_rollout.run(m, PROMPTS),
}


@pytest.mark.parametrize("name", RESULTS)
def test_result_type(zoo, name):
    _, model = zoo("gpt2")
    result = RESULTS[name](model)
    assert result.dims[0] == "prompt" and result.labels["prompt"] == PROMPTS and len(result) == 3
    for dim, size in zip(result.dims, result.shape):
        assert len(result.labels[dim]) == size
    top = result.top(4)
    assert len(top) == 4 and [abs(v) for _, v in top] == sorted((abs(v) for _, v in top), reverse=True)
    for labels, value in top:
        index = tuple(result.labels[d].index(label) for d, label in zip(result.dims, labels))
        assert result.values[index].item() == value
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    flat = torch.tensor([math.nan if v is None else v for v in _flatten(data["values"])], dtype=torch.float64)
    close(flat.view(result.shape), result.values, equal_nan=True, atol=0.0, rtol=0.0)
    for i, p in enumerate(PROMPTS):
        one, n = result[i], len(p.split())
        assert one.dims == result.dims[1:] and not one.values.isnan().any()
        for axis, dim in enumerate(one.dims):
            if dim in ("position", "query", "key"):
                assert one.labels[dim] == [f"{j}:{w}" for j, w in enumerate(p.split())] and one.shape[axis] == n
    close(result.mean(align="end").values, result.values.double().nanmean(0), equal_nan=True)
    if any(d in ("position", "query", "key") for d in result.dims):  # 5, 7 and 4 tokens: positions differ
        with pytest.raises(ValueError, match="a different token in each prompt"):
            result.mean()
    else:
        close(result.mean().values, result.values.double().nanmean(0))


def test_mean_std_and_count_over_prompts():
    """Against statistics.mean / stdev entry by entry; positions of unequal prompts only when aligned."""
    import statistics

    from nnattr.result import Attribution

    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 5.0, -1.0], [0.0, 7.0, 1.0, 2.0]])
    tokens = [("a", "b", "c", "d"), ("e", "f"), ("g", "h", "i")]  # right-aligned: padding is masked to NaN
    a = Attribution(values, ("prompt", "position"), {"prompt": ["p", "q", "r"], "position": ["-4", "-3", "-2", "-1"]},
                    tokens=tokens)
    with pytest.raises(ValueError, match="2 to 4 tokens.*align='end'"):
        a.mean()
    for reduce in (a.std, a.count):
        with pytest.raises(ValueError, match="align='end'"):
            reduce()
    mean, std, count = a.mean(align="end"), a.std(align="end"), a.count(align="end")
    columns = [[row[j] for row, t in zip(values.tolist(), tokens) if j >= 4 - len(t)] for j in range(4)]
    assert count.values.tolist() == [len(c) for c in columns] == [1, 2, 3, 3]
    close(mean.values, torch.tensor([statistics.mean(c) for c in columns]))
    assert math.isnan(std.values[0])  # one prompt has that position: no spread to measure
    close(std.values[1:], torch.tensor([statistics.stdev(c) for c in columns[1:]]))
    assert mean.meta["positions_from"] == "end" and std.meta["statistic"] == "standard deviation" and count.units == "prompts"
    same = Attribution(values, ("prompt", "position"), {"prompt": ["p", "q", "r"], "position": list("wxyz")},
                       tokens=[tuple("abcd")] * 3)  # one length: no alignment needed
    close(same.mean().values, values.mean(0))
    close(same.std().values, values.std(0))


def test_mean_rollout_rows_still_sum_to_one(zoo):
    """Averaged over prompts of one length, each query's rollout row remains a distribution."""
    _, model = zoo("gpt2")
    prompts = tiny.prompts(4, lengths=(6,))
    mean = attention_rollout.run(model, prompts).mean()
    close(mean.values.sum(-1), torch.ones(mean.shape[:-1]))


def _flatten(x):
    return [v for item in x for v in _flatten(item)] if isinstance(x, list) else [x]


@pytest.mark.parametrize("name", RESULTS)
def test_result_holds_no_autograd_graph(zoo, name):
    result = RESULTS[name](zoo("gpt2")[1])
    assert not result.values.requires_grad and result.values.grad_fn is None


def test_logit_lens_last_position_indexes(zoo):
    _, model = zoo("gpt2")
    result = logit_lens.run(model, PROMPTS, positions="last")  # the last position only: no position dimension
    one = result[1]
    assert one.dims == ("layer",) and len(one.meta["top_tokens"][0]) == 1
    close(one.values, result.values[1])


# ----------------------------------------------------------------------------- loader


def test_load_switches_sdpa_to_eager():
    hf = build("llama", attn_implementation="sdpa")
    with pytest.warns(UserWarning, match="from 'sdpa' to 'eager'"):
        model = nnattr.load(hf, tiny.tokenizer())
    assert model.config._attn_implementation == "eager" == hf.config._attn_implementation
    result = attention_rollout.run(model, PROMPTS)
    for i, p in enumerate(PROMPTS):
        close(result[i].values, ref.rollout(hf, ids(p))[0])


def test_load_saved_folder_offline(zoo, tmp_path, monkeypatch):
    import huggingface_hub.constants

    hf, model = zoo("gpt2")
    hf.save_pretrained(tmp_path)
    tiny.tokenizer().save_pretrained(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = nnattr.load(str(tmp_path))
    assert not [w for w in caught if "switched" in str(w.message)]  # eager was saved: nothing to switch
    assert loaded.config._attn_implementation == "eager"
    close(direct_logit_attribution.run(loaded, PROMPTS).values, direct_logit_attribution.run(model, PROMPTS).values)


# ----------------------------------------------------------------------------- one data path


def test_prompts_as_ids_tensors_encodings_or_a_batch_give_the_same_result(zoo):
    from nnattr.batch import Batch

    _, model = zoo("llama")
    text = direct_logit_attribution.run(model, PROMPTS, TARGETS, by="head_position")
    rows = [tiny.tokenizer()(p)["input_ids"] for p in PROMPTS]
    width = max(map(len, rows))
    encoding = {"input_ids": torch.tensor([[0] * (width - len(r)) + r for r in rows]),
                "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}
    right = {k: torch.stack([v[i].roll(-(width - len(r))) for i, r in enumerate(rows)]) for k, v in encoding.items()}
    batch = Batch.of(model, PROMPTS, TARGETS)
    for given in (rows, encoding, right, batch):
        other = direct_logit_attribution.run(model, given, None if given is batch else TARGETS, by="head_position")
        assert other.tokens == text.tokens
        close(other.values, text.values, equal_nan=True, atol=0.0)
    one = direct_logit_attribution.run(model, torch.tensor(rows[0]), TARGETS[0])
    close(one.values[0], direct_logit_attribution.run(model, PROMPTS[0], TARGETS[0]).values[0], atol=0.0)
    assert batch.inputs["input_ids"].shape == (3, width) and batch[1:].width == width
    with pytest.raises(ValueError, match=r"integer tensor \[pos\] or \[batch, pos\]"):
        direct_logit_attribution.run(model, torch.zeros(2, 3))


def test_padding_is_nan_by_length_and_indexing_strips_it(zoo):
    _, model = zoo("gpt2")
    result = logit_lens.run(model, PROMPTS)  # [prompt, layer, position], positions right-aligned
    assert result.lengths == (5, 7, 4)
    for i, n in enumerate(result.lengths):
        assert result.values[i, :, : 7 - n].isnan().all() and not result.values[i, :, 7 - n :].isnan().any()
        assert result[i].shape == (3, n) and result[i].meta["prompt"] == PROMPTS[i]
    assert result[-1].labels == result[2].labels
    with pytest.raises(ValueError, match="position dimensions span the whole batch"):
        nnattr.Attribution(torch.zeros(1, 3), ("prompt", "position"), {"prompt": ["p"], "position": ["a", "b", "c"]},
                           tokens=[["a", "b"]])


def test_result_round_trips_and_renders(zoo):
    try:
        import pandas
    except ImportError:  # optional: to_frame says how to get it
        pandas = None
    _, model = zoo("gpt2")
    for result in (direct_logit_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, by="head_position"),
                   logit_lens.run(model, PROMPTS, positions="all", k=2)):
        back = nnattr.Attribution.from_json(result.to_json())
        assert back.to_dict() == result.to_dict()
        close(back.values, result.values, equal_nan=True, atol=0.0)
        assert (back.method, back.by, back.units, back.metric, back.per_prompt) == \
            (result.method, result.by, result.units, result.metric, result.per_prompt)
        if pandas is None:
            with pytest.raises(ImportError, match="pip install pandas"):
                result.to_frame()
        else:
            frame = result.to_frame()
            assert isinstance(frame, pandas.DataFrame) and list(frame.columns) == [*result.dims, "value"]
            assert len(frame) == result.values.numel()
        assert len(result.to_records()) == result.values.numel()
        page = result._repr_html_()
        assert result.title in page and "<table>" in page and str(result.top(1)[0][1])[:4] in page


def test_rollout_options_apply_or_fail(zoo):
    hf, model = zoo("llama")
    with pytest.raises(ValueError, match="head_fusion does not apply to view='flow'"):
        attention_rollout.run(model, PROMPTS, view="flow", head_fusion="max")
    with pytest.raises(ValueError, match="norm applies to view='value_weighted' only"):
        attention_rollout.run(model, PROMPTS, norm="l1")
    assert attention_rollout.run(model, PROMPTS).meta == {"view": "rollout", "residual": 0.5, "head_fusion": "mean"}
    assert attention_rollout.run(model, PROMPTS, view="flow").meta == {"view": "flow", "residual": 0.0}
    flow = attention_rollout.run(model, PROMPTS, view="flow", residual=0.3)  # a residual term is a real variant
    for i, p in enumerate(PROMPTS):
        close(flow[i].values, ref.flow(hf, ids(p), residual=0.3)[0])
        close(flow[i].values.sum(-1), torch.ones(flow[i].shape[:-1]))


def test_bad_options_are_refused_before_anything_runs(zoo):
    _, model = zoo("gpt2")
    with pytest.raises(ValueError, match="k=0"):
        logit_lens.run(model, PROMPTS, k=0)
    with pytest.raises(ValueError, match=r"residual=2.0: the identity's weight must lie in \[0, 1\]"):
        attention_rollout.run(model, PROMPTS, residual=2.0)
    with pytest.raises(ValueError, match="target and the distractor are the same token"):
        direct_logit_attribution.run(model, PROMPTS, "w5", "w5")
    as_ids = [direct_logit_attribution.run(model, PROMPTS, t).values for t in (token("w5"), torch.tensor(token("w5")),
                                                                             torch.tensor([token("w5")] * 3))]
    close(as_ids[1], as_ids[0], atol=0.0) and close(as_ids[2], as_ids[0], atol=0.0)
    close(as_ids[0], direct_logit_attribution.run(model, PROMPTS, "w5").values, atol=0.0)
    one = direct_logit_attribution.run(model, tiny.tokenizer()(PROMPTS[0])["input_ids"])  # a flat list of ids
    close(one.values, direct_logit_attribution.run(model, PROMPTS[0]).values, atol=0.0)


# ----------------------------------------------------------------------------- attention views


@pytest.mark.parametrize("view", ["patterns", "value_weighted", "norm_based", "flow"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_attention_views_against_loops(zoo, arch, view):
    from nnattr.recipes import attention_views

    hf, model = zoo(arch)
    options = {"norm": "linf"} if view == "value_weighted" else {"residual": 0.2} if view == "flow" else {}
    every = attention_views.run(model, PROMPTS, view=view, **options)  # a padded batch
    some = attention_views.run(model, PROMPTS, view=view, layers=[-1], heads=[2, 0], **options)
    assert every.dims == ("prompt", "layer", "head", "query", "key") and some.labels["head"] == ["H0", "H2"]
    for i, p in enumerate(PROMPTS):
        if view == "flow":
            expected = ref.flow(hf, ids(p), residual=0.2)[0][None]  # the last layer only
            got = every[i].values[-1:]
        else:
            expected = ref.attention_views(hf, ids(p), view, **options)
            got = every[i].values
        close(got, expected)
        close(some[i].values[0], every[i].values[-1][[0, 2]])
        if view != "norm_based":  # probabilities: every real row sums to 1, padded keys get no mass
            close(every[i].values.sum(-1), torch.ones(every[i].shape[:-1]))
    assert every.values[2, ..., :3].isnan().all()  # the shortest prompt's padding (4 of 7 tokens)


def test_attention_views_options_and_wire_size(zoo):
    from nnattr.recipes import attention_views

    _, model = zoo("llama")
    with pytest.raises(ValueError, match="norm applies to view='value_weighted' only"):
        attention_views.run(model, PROMPTS, norm="l1")
    with pytest.raises(ValueError, match=r"layers=\[5\]: give indices from -2 to 1"):
        attention_views.run(model, PROMPTS, layers=[5])
    one = attention_views.run(model, PROMPTS, view="value_weighted", layers=[0], heads=[1])
    assert one.shape == (3, 1, 1, 7, 7) and one.meta == {"view": "value_weighted", "norm": "l2", "layers": [0],
                                                         "heads": [1]}


def test_a_slice_of_a_batch_and_the_top_prediction_as_distractor(zoo):
    from nnattr.batch import Batch

    hf, model = zoo("gpt2")
    batch = Batch.of(model, PROMPTS)
    part = logit_lens.run(model, batch[2:])  # a batch of its own: its own width
    close(part.values, logit_lens.run(model, PROMPTS[2:]).values, atol=0.0)
    with torch.no_grad():
        top = int(hf(ids(PROMPTS[0])).logits[0, -1].argmax())
    with pytest.raises(ValueError, match="the model's top prediction .* and the distractor are the same token"):
        direct_logit_attribution.run(model, PROMPTS[0], distractor=top)
    with pytest.raises(ValueError, match="the target and the distractor are the same token"):
        direct_logit_attribution.run(model, Batch.of(model, PROMPTS, "w5"), distractor="w5")
    padded = logit_lens.run(model, PROMPTS)
    assert nnattr.Attribution.from_json(padded.to_json()).values.dtype == torch.float64
