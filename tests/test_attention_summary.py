"""Attention summary metrics: the kernel's analytic and padded cases, the recipe against Hugging Face's
own ``output_attentions`` (every field by plain loops, prompt by prompt, no padding), a padded batch
against its prompts alone, the seed's dict, the dataset aggregate, and bad input.

The remote side (loopback NDIF, an edited copy) is in ``tests/test_remote.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

import nnattr
from nnattr.kernels import SUMMARY_FIELDS, attention_summary, rollout_step
from nnattr.recipes import attention_summary as summary
from tests import test_recipes as base
from tests.support import tiny

TOL = dict(atol=1e-5, rtol=0.0)  # float32 recipe vs float64-from-float32 loops
PROMPTS = tiny.prompts(3)  # 5, 7 and 4 tokens: a left-padded batch
ARCHS = tiny.ARCHS  # every family: Conv1D + LayerNorm, fused NeoX, GQA + RMSNorm, soft-capped sliding windows, ...
SEED_KEYS = [*SUMMARY_FIELDS, "batch_size", "seq_length"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


zoo = base.zoo  # the sharpened tiny models of tests/test_recipes.py: attention far from uniform


def close(actual, expected, **tol):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(), **{**TOL, **tol})


# ----------------------------------------------------------------------------- the reference


def entropy(row) -> float:
    return -sum(p * math.log(p) for p in row.tolist() if p > 0)


def seed_fields(hf, prompt: str, layer: int, *, residual: float = 0.5) -> list[float]:
    """The six fields of one unpadded prompt at ``layer``, from Hugging Face's attentions by loops."""
    ids = tiny.tokenizer()(prompt, return_tensors="pt")["input_ids"]  # [1, n]
    with torch.no_grad():
        attentions = [a[0].double() for a in hf(input_ids=ids, output_attentions=True).attentions]  # [head, n, n]
    heads, n, _ = attentions[0].shape
    R = torch.eye(n, dtype=torch.float64)
    for A in attentions[: layer + 1]:  # rollout up to and including the layer
        mixed = (1 - residual) * A.mean(0) + residual * torch.eye(n, dtype=torch.float64)
        R = (mixed / mixed.sum(-1, keepdim=True)) @ R
    A = attentions[layer]
    rows = [A[h, q] / A[h, q].sum() for h in range(heads) for q in range(n)]  # over real keys (GPT-OSS: < 1)
    return [float(A.sum()) / (heads * n * n), float(A.max()),
            sum(entropy(r) for r in rows) / len(rows), sum(float(r.max()) for r in rows) / len(rows),
            sum(float(R[q].max()) for q in range(n)) / n, sum(entropy(R[q]) for q in range(n)) / n]


# ----------------------------------------------------------------------------- the recipe


@pytest.mark.parametrize("layer_idx", ["default", -2, "all"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_field_matches_hugging_face_attentions(zoo, arch, layer_idx):
    hf, model = zoo(arch)
    options = {} if layer_idx == "default" else {"layer_idx": layer_idx}
    result = summary.run(model, PROMPTS, **options)  # a padded batch; the reference runs each prompt alone
    layers = {"default": [1], -2: [0], "all": [0, 1]}[layer_idx]
    assert result.labels["field"] == list(SUMMARY_FIELDS) and not result.values.isnan().any()
    assert result.dims == (("prompt", "layer", "field") if layer_idx == "all" else ("prompt", "field"))
    sinks = tiny.CONFIGS[arch]().model_type == "gpt_oss"  # learned sinks take mass: rows sum to < 1
    assert result.meta == {"layer_idx": "all" if layer_idx == "all" else layers[0], "residual": 0.5,
                           **({"attention_sinks": nnattr.arch.SINKS} if sinks else {})}
    assert result.per_prompt == {"seq_length": [5, 7, 4]} and result.values.dtype == torch.float32
    for i, prompt in enumerate(PROMPTS):
        expected = torch.tensor([seed_fields(hf, prompt, layer) for layer in layers])  # [layer, field]
        close(result[i].values, expected if layer_idx == "all" else expected[0])
        n = result.per_prompt["seq_length"][i]
        if sinks:  # n * mean_attention = 1 - the mean sink mass, which is real here
            assert (result[i].values[..., 0] * n < 0.95).all()
        else:
            close(result[i].values[..., 0], torch.full(result[i].shape[:-1], 1 / n))  # rows sum to 1: mean 1/n
    if not sinks:  # query 0 sees only itself (and, on GPT-OSS, the sink)
        close(result.values[..., 1], torch.ones(result.values.shape[:-1]))


def test_a_padded_batch_equals_its_prompts_alone(zoo):
    _, model = zoo("llama")
    prompts = tiny.prompts(4)  # 5, 7, 4 and 6 tokens
    for options in ({}, {"layer_idx": "all", "residual": 0.2}):
        batch = summary.run(model, prompts, **options)
        chunked = summary.run(model, prompts, batch_size=3, **options)  # chunks of one width
        assert not batch.values.isnan().any()
        close(chunked.values, batch.values)
        for i, prompt in enumerate(prompts):
            close(batch.values[i], summary.run(model, prompt, **options).values[0])


def test_residual_one_makes_rollout_the_identity(zoo):
    _, model = zoo("gpt2")
    values = summary.run(model, PROMPTS, layer_idx="all", residual=1.0).values  # [prompt, layer, field]
    close(values[..., 4], torch.ones(3, 2))  # rollout_max
    close(values[..., 5], torch.zeros(3, 2))  # rollout_entropy


def test_fields_the_seed_dict(zoo):
    _, model = zoo("gpt2")
    last, every = summary.run(model, PROMPTS), summary.run(model, PROMPTS, layer_idx="all")
    got = summary.fields(last)
    assert list(got) == SEED_KEYS and got["batch_size"] == 3 and got["seq_length"] == 7
    for j, name in enumerate(SUMMARY_FIELDS):
        assert isinstance(got[name], float)
        close(got[name], last.values[:, j].mean())
    per_layer = summary.fields(every)
    assert list(per_layer) == SEED_KEYS and all(len(per_layer[name]) == 2 for name in SUMMARY_FIELDS)
    close([per_layer[name][-1] for name in SUMMARY_FIELDS], [got[name] for name in SUMMARY_FIELDS])


def test_over_a_dataset_equals_one_run(zoo):
    _, model = zoo("llama")
    prompts = tiny.prompts(5)
    whole = summary.run(model, prompts, layer_idx="all")
    streamed = summary.over(model, (p for p in prompts), batch_size=2, layer_idx="all")  # a generator
    batches = summary.over(model, [prompts[:3], prompts[3:]], layer_idx="all")  # batches as given
    mixed = summary.over(model, [prompts[0], prompts[1:3], *prompts[3:]], batch_size=1, layer_idx="all")
    for got in (streamed, batches, mixed):  # prompts keep their order
        assert (got.dims, got.labels, got.meta, got.per_prompt, got.tokens) == \
            (whole.dims, whole.labels, whole.meta, whole.per_prompt, whole.tokens)
        close(got.values, whole.values)
        close(got.mean().values, whole.mean().values)
        assert got.std().values.shape == (2, 6)
    dataset = summary.fields(streamed)
    assert dataset["batch_size"] == 5 and dataset["seq_length"] == 7
    close([dataset[k] for k in SUMMARY_FIELDS], [summary.fields(whole)[k] for k in SUMMARY_FIELDS])
    with pytest.raises(ValueError, match="data held no prompts"):
        summary.over(model, [])
    close(summary.over(model, prompts[1], layer_idx="all").values, whole.values[1:2])  # a string is one prompt


@pytest.mark.parametrize("bad, match", [
    (2, r"layer_idx=2: give a layer from -2 to 1, or 'all' \(the model has 2 layers\)"),
    (-3, r"layer_idx=-3: give a layer from -2 to 1"),
    ("last", r"layer_idx='last': give a layer from -2 to 1, or 'all'"),
    (True, r"layer_idx=True: give a layer from -2 to 1"),
    (1.0, r"layer_idx=1.0: give a layer from -2 to 1"),
    ([0], r"layer_idx=\[0\]: give a layer from -2 to 1"),
])
def test_bad_layer_idx_names_the_range(zoo, bad, match):
    _, model = zoo("gpt2")
    with pytest.raises(ValueError, match=match):
        summary.run(model, PROMPTS, layer_idx=bad)


def test_bad_residual_and_sdpa_are_refused(zoo):
    _, model = zoo("gpt2")
    for residual in (1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match=r"residual=.*must lie in \[0, 1\]"):
            summary.run(model, PROMPTS, residual=residual)
    sdpa = nnattr.load(tiny.hf_model("gpt2", attn_implementation="sdpa"), tiny.tokenizer(), attn_implementation="sdpa")
    with pytest.raises(ValueError, match="attention summary metrics needs attention probabilities"):
        summary.run(sdpa, PROMPTS)


def test_the_command_line(tiny_folder, capsys):
    from nnattr.cli import main

    assert main(["attention-summary", "--model", tiny_folder, "--prompt", "w1 w2 w3", "--layer-idx", "all",
                 "--top", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Attention summary") and "L1 rollout_entropy" in out and "L0 mean_attention" in out
    assert main(["attention-summary", "--model", tiny_folder, "--prompt", "w1", "--layer-idx", "5"]) == 1
    assert "layer_idx=5: give a layer from -2 to 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the kernel


def test_kernel_analytic_cases():
    n = 5
    uniform = torch.full((1, 3, n, n), 1 / n)  # [batch, head, query, key]: every key alike
    got = attention_summary(uniform, rollout_step(None, uniform, residual=0.0))[0]
    close(got, [1 / n, 1 / n, math.log(n), 1 / n, 1 / n, math.log(n)], atol=1e-6)
    one_hot = torch.eye(n).expand(2, 3, n, n)  # every query on itself: entropy 0, NaN-free
    got = attention_summary(one_hot, rollout_step(None, one_hot))
    assert torch.equal(got, torch.tensor([[1 / n, 1.0, 0.0, 1.0, 1.0, 0.0]] * 2))
    causal = torch.ones(n, n).tril() / torch.arange(1, n + 1)[:, None]  # query q spreads over q + 1 keys
    got = attention_summary(causal.expand(1, 2, n, n), rollout_step(None, causal.expand(1, 2, n, n)))[0]
    close(got[:4], [1 / n, 1.0, sum(math.log(q + 1) for q in range(n)) / n, sum(1 / (q + 1) for q in range(n)) / n],
          atol=1e-6)


def test_kernel_ignores_padding_even_nan_rows():
    g = torch.Generator().manual_seed(0)
    n, width = 3, 5
    logits = torch.randn(1, 2, n, n, generator=g).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf)
    alone = logits.softmax(-1)  # [1, head, n, n]
    padded = torch.full((1, 2, width, width), float("nan"))  # padded rows: NaN, as a fully masked softmax gives
    padded[..., width - n :, :] = 0.3  # and real rows leak onto padded keys
    padded[..., width - n :, width - n :] = alone
    mask = torch.arange(width)[None] >= width - n  # [batch, key]: two left pads
    state = torch.full((1, width, width), float("nan"))
    state[:, width - n :, width - n :] = rollout_step(None, alone)
    got = attention_summary(padded, state, key_mask=mask)
    assert not got.isnan().any()
    torch.testing.assert_close(got, attention_summary(alone, rollout_step(None, alone)))


def test_kernel_sees_mass_leaking_to_padding():
    """The padded keys are masked out, not renormalised away: a leak shows in mean_attention."""
    mask = torch.tensor([[False, True, True]])  # [batch, key]: one left pad
    leaky = torch.tensor([[[[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]]])  # [1, 1, 3, 3]
    got = attention_summary(leaky, rollout_step(None, leaky, key_mask=mask), key_mask=mask)[0]
    close(got[0], (0.5 + 1.0) / (1 * 2 * 2), atol=1e-7)  # not 1/2: a quarter of the mass went to the pad
    close(got[2], (0.0 + math.log(2)) / 2, atol=1e-7)  # entropy of the rows renormalised over real keys


def test_kernel_generation_step_queries_and_dtypes():
    """One new query over a left-padded cache; bf16 in, float32 out, also under autocast."""
    pattern = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4]])[:, None, None]  # [batch, head, 1, key]
    mask = torch.tensor([[False, False, True, True], [True] * 4])
    state = pattern[:, 0].clone()  # [batch, 1, key]
    got = attention_summary(pattern, state, key_mask=mask)
    ent = -sum(p * math.log(p) for p in (0.1, 0.2, 0.3, 0.4))
    close(got, [[1 / 2, 0.5, math.log(2), 0.5, 0.5, math.log(2)], [1 / 4, 0.4, ent, 0.4, 0.4, ent]], atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = attention_summary(pattern.bfloat16(), state.bfloat16(), key_mask=mask)
    assert cast.dtype == torch.float32 and attention_summary(pattern.double(), state).dtype == torch.float64
    close(cast, got, atol=1e-2)


def test_kernel_errors_name_shapes():
    p = torch.rand(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"pattern must be \[batch, head, query, key\]; got shape \(4, 5, 5\)"):
        attention_summary(p[0], torch.rand(2, 5, 5))
    with pytest.raises(ValueError, match=r"state \(2, 4, 4\) must be \[batch, query, key\] = \[2, 5, 5\]"):
        attention_summary(p, torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match=r"key_mask must be a bool tensor \[batch, key\] = \[2, 5\]"):
        attention_summary(p, torch.rand(2, 5, 5), key_mask=torch.ones(2, 5))


def test_over_checks_batch_size_before_any_run():
    model = nnattr.load(tiny.hf_model("gpt2"), tiny.tokenizer())
    with pytest.raises(ValueError, match=r"batch_size=1.5: give a positive int"):
        summary.over(model, iter(tiny.prompts(3)), batch_size=1.5)
    together = summary.over(model, tiny.prompts(3), batch_size=None)  # None: one batch
    torch.testing.assert_close(together.values, summary.run(model, tiny.prompts(3)).values)
