"""``layers=``: head-level DLA and head attribution for some layers only (issue 14's 1 MB rule).

At Llama-3.1-405B a ``[prompt, layer, head, position]`` grid is 8.3 MB; ``layers=`` keeps some
layers' heads, and only those are read and computed inside the trace. Checked on tiny models with
four layers (so a subset can skip layers): the subset is the full run's slice, and both equal the
plain-hooks reference (`tests/support/reference.py`); the trace calls its per-layer kernels once per
kept layer; bad values get errors that name the range; the command line passes ``--layers``.
Remote == local: ``tests/test_remote.py`` (``dla-head-position-layers``, ``heads-layers``).
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

import nnattr
from nnattr.cli import main
from nnattr.recipes import direct_logit_attribution as dla
from nnattr.recipes import head_attribution
from tests.support import reference as ref
from tests.support import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
FAMILIES = ["llama", "gpt2", "phi3"]  # grouped kv heads; LayerNorm, Conv1D, separate position embedding; fused qkv
PROMPTS, TARGETS, DISTRACTORS = tiny.prompts(3), ["w5", "w17", "w42"], ["w9", "w3", "w60"]
RUNS = {  # name: (recipe, keyword arguments)
    "dla-head": (dla, dict(by="head")),
    "dla-head_position": (dla, dict(by="head_position")),
    "heads-head": (head_attribution, dict(by="head")),
    "heads-head_position": (head_attribution, dict(by="head_position")),
}


def four_layers(arch: str):
    """`tiny.hf_model` with four layers instead of two (randomised the same way), still tiny."""
    config = tiny.CONFIGS[arch]()
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    hf = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "ln" in name or p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.2)
    assert sum(p.numel() for p in hf.parameters()) < tiny.MAX_PARAMS
    return hf


@pytest.fixture(scope="module")
def zoo():
    cache = {}

    def get(arch):
        if arch not in cache:
            hf = four_layers(arch)
            cache[arch] = hf, nnattr.load(hf, tiny.tokenizer())
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("name", RUNS)
def test_some_layers_are_the_full_runs_slice(zoo, arch, name):
    recipe, kwargs = RUNS[name]
    _, model = zoo(arch)
    full = recipe.run(model, PROMPTS, TARGETS, DISTRACTORS, **kwargs)
    for layers, kept in (([2, -1, 0], [0, 2, 3]), ([-1], [3]), ([1], [1])):
        some = recipe.run(model, PROMPTS, TARGETS, DISTRACTORS, layers=layers, **kwargs)
        assert some.dims == full.dims and some.labels["layer"] == [f"L{i}" for i in kept]  # the real layers
        assert {k: v for k, v in some.labels.items() if k != "layer"} == {
            k: v for k, v in full.labels.items() if k != "layer"}
        torch.testing.assert_close(some.values, full.values[:, kept], atol=1e-6, rtol=0, equal_nan=True)
        assert some.meta == {**full.meta, "layers": kept} and some.per_prompt == full.per_prompt  # sum_error too


@pytest.mark.parametrize("by", ["head", "head_position"])
def test_some_layers_equal_the_hooks_reference(zoo, by):
    hf, model = zoo("llama")
    kept = [1, 3]
    dla_some = dla.run(model, PROMPTS, TARGETS, DISTRACTORS, by=by, layers=[1, -1])
    heads_some = head_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, by=by, layers=[-3, 3])
    reference = ref.dla_head_positions if by == "head_position" else ref.dla_heads
    for i, p in enumerate(PROMPTS):
        ids = tiny.tokenizer()(p, return_tensors="pt")["input_ids"]  # [1, pos]: the prompt alone, unpadded
        t, d = tiny.tokenizer().convert_tokens_to_ids([TARGETS[i], DISTRACTORS[i]])
        expected = reference(hf, ids, t, d)[0, kept].double()  # [layer, head(, key)]
        torch.testing.assert_close(dla_some[i].values.double(), expected, atol=1e-5, rtol=0)
        expected = ref.head_attribution(hf, ids, t, d)[0, kept].double()  # [layer, head, key]
        got = heads_some[i].values.double()
        torch.testing.assert_close(got, expected if by == "head_position" else expected.sum(-1), atol=1e-5, rtol=0)


def test_the_trace_computes_the_kept_layers_only(zoo, monkeypatch):
    _, model = zoo("llama")
    calls = {}

    def counting(module, name):
        kernel = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return kernel(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    for name in ("split_values", "head_position_direct_logit", "split_heads", "o_proj_per_head"):
        counting(dla, name)
    counting(head_attribution, "split_heads")
    dla.run(model, PROMPTS, by="head_position", layers=[-1])
    assert calls == {"split_values": 1, "head_position_direct_logit": 1, "split_heads": 1, "o_proj_per_head": 1}
    calls.clear()
    head_attribution.run(model, PROMPTS, layers=[0, 2])  # only these z are saved and differentiated
    assert calls == {"split_heads": 2}
    calls.clear()
    dla.run(model, PROMPTS, by="all")  # every layer's heads: the list sums to the logit
    assert calls == {"split_heads": 4, "o_proj_per_head": 4}


@pytest.mark.parametrize("layers, problem", [
    ([4], r"layers=\[4\]: \[4\] out of range; the model has 4 layers, indexed -4 to 3"),
    ([0, -5], r"\[-5\] out of range"),
    ([1, -3], r"layer 1 named more than once"),
    ([2, 2], r"layer 2 named more than once"),
    ([], r"layers=\[\]: give at least one layer index, or layers=None for all 4"),
    (2, r"layers=2: give a list of layer indices, e.g. layers=\[0, -1\]"),
    ([1.0], r"give a list of layer indices"),
    ([True], r"give a list of layer indices"),
])
@pytest.mark.parametrize("recipe", [dla, head_attribution])
def test_bad_layers_are_refused_naming_the_range(zoo, recipe, layers, problem):
    _, model = zoo("llama")
    with pytest.raises(ValueError, match=problem):
        recipe.run(model, PROMPTS, by="head", layers=layers)


@pytest.mark.parametrize("by", ["component", "layer", "all"])
def test_dla_takes_layers_by_head_only(zoo, by):
    _, model = zoo("llama")
    with pytest.raises(ValueError, match=rf"layers= is for by='head' or 'head_position'; by='{by}' sums every layer"):
        dla.run(model, PROMPTS, by=by, layers=[0])


def test_numpy_and_range_indices(zoo):
    np = pytest.importorskip("numpy")
    _, model = zoo("gpt2")
    one = dla.run(model, PROMPTS, by="head", layers=np.array([3, 1]))
    assert one.labels["layer"] == ["L1", "L3"]
    assert dla.run(model, PROMPTS, by="head", layers=range(-2, 0)).labels["layer"] == ["L2", "L3"]


def test_the_command_line_flag(tiny_folder, tmp_path, capsys):  # tests/conftest.py: a 2-layer GPT-2
    prompt = ["--prompt", "w1 w2 w3 w4", "--target", "w7", "--out", str(tmp_path)]
    assert main(["dla", "--model", tiny_folder, "--by", "head_position", "--layers", "-1", *prompt]) == 0
    data = json.loads((tmp_path / "direct_logit_attribution.json").read_text())
    assert data["dims"] == ["prompt", "layer", "head", "position"] and data["labels"]["layer"] == ["L1"]
    assert main(["head-attribution", "--model", tiny_folder, "--layers", "1", "0", *prompt]) == 0
    data = json.loads((tmp_path / "head_attribution.json").read_text())
    assert data["labels"]["layer"] == ["L0", "L1"] and data["meta"]["layers"] == [0, 1]
    capsys.readouterr()
    assert main(["dla", "--model", tiny_folder, "--by", "head", "--layers", "2", *prompt]) == 1  # run() refuses it
    assert "layers=[2]: [2] out of range; the model has 2 layers" in capsys.readouterr().err
