"""The tuned lens (`nnattr.lens`, the logit lens recipe's ``lens=``): parity with a plain-PyTorch
reference, the tuned-lens package's saved layout, training, the shipped tiny-ioi lens and its
documented KL table, and bad input.

The reference (`reference_lens`) reads Hugging Face's ``output_hidden_states`` (no nnsight, no
nnattr), adds each translator's output in float64, and decodes with float64 copies of the
model's final norm and ``lm_head`` (and Gemma-2's soft-cap). Remote parity (``lens-tuned``) is in
``tests/test_remote.py``.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

import nnattr
from nnattr.embedded.train_lens import HELDOUT_SEED, HELDOUT_TEXTS, texts
from nnattr.kernels import kl_to_final, translate
from nnattr.lens import TunedLens, kl_by_layer, kl_plot, resolve
from nnattr.recipes import logit_lens
from tests.support import reference as ref
from tests.support import tiny

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = tiny.prompts(3)  # 5, 7 and 4 tokens: a left-padded batch
SHARPEN = 10.0  # as tests/test_recipes.py: logits O(1), so probabilities differ across layers
FAMILIES = ["gpt2", "gpt_neox", "llama", "gemma", "gemma2"]

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def build(arch: str):
    hf = tiny.hf_model(arch)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.mul_(SHARPEN)
    return hf, nnattr.load(hf, tiny.tokenizer())


def random_lens(n_layers: int = 2, d_model: int = 32, seed: int = 0, scale: float = 0.3) -> TunedLens:
    g = torch.Generator().manual_seed(seed)
    return TunedLens(torch.randn(n_layers, d_model, d_model, generator=g) * scale / d_model ** 0.5,
                     torch.randn(n_layers, d_model, generator=g) * scale, base_model="tiny", source="random")


def reference_lens(hf, x: torch.Tensor, lens: TunedLens | None) -> torch.Tensor:
    """Float64 logits ``[layer + 1, pos, vocab]`` for one unpadded prompt ``x [1, pos]``: hidden state
    ``l < n_layers`` (HF's ``hidden_states[l]``, the residual entering layer ``l``) plus its translator's
    output, through the final norm and ``lm_head``; the last row is the model's own logits."""
    norm = copy.deepcopy(hf.get_submodule(ref.native(hf).final_norm)).double()
    unembed = copy.deepcopy(hf.get_submodule(ref.native(hf).unembed)).double()
    with torch.no_grad():
        out = hf(x, output_hidden_states=True)
        rows = []
        for i, h in enumerate(out.hidden_states[:-1]):
            h = h[0].double()  # [pos, d_model]
            if lens is not None:
                h = h + h @ lens.weight[i].double().T + lens.bias[i].double()
            rows.append(ref.softcap(unembed(norm(h)), hf))
        rows.append(out.logits[0].double())
    return torch.stack(rows)


def ids(prompt: str) -> torch.Tensor:
    return tiny.tokenizer()(prompt, return_tensors="pt")["input_ids"]


@pytest.fixture(scope="module")
def ioi():
    return nnattr.load("tiny-ioi")


# ----------------------------------------------------------------------------- kernels


def test_translate_adds_the_affine_map_and_refuses_other_sizes():
    h, w, b = torch.randn(2, 3, 4), torch.randn(4, 4), torch.randn(4)
    torch.testing.assert_close(translate(h, w, b), h + torch.einsum("bpi,oi->bpo", h, w) + b)
    assert torch.equal(translate(h, torch.zeros(4, 4), torch.zeros(4)), h)
    with pytest.raises(ValueError, match=r"do not fit a residual of d_model 4.*expected \[4, 4\] and \[4\]"):
        translate(h, torch.zeros(3, 3), torch.zeros(3))


def test_kl_to_final_is_zero_on_itself_and_matches_the_definition():
    p, q = torch.randn(5, 7), torch.randn(5, 7)
    assert kl_to_final(p, p).abs().max() < 1e-6
    P, Q = p.double().softmax(-1), q.double().softmax(-1)
    torch.testing.assert_close(kl_to_final(p.double(), q.double()), (P * (P / Q).log()).sum(-1))


# ----------------------------------------------------------------------------- the recipe with a lens


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_zero_translators_are_the_logit_lens_exactly(arch):
    _, model = build(arch)
    plain = logit_lens.run(model, PROMPTS, positions="all", k=3)
    zero = logit_lens.run(model, PROMPTS, positions="all", k=3, lens=TunedLens.zeros(model))
    assert torch.equal(plain.values.nan_to_num(-1), zero.values.nan_to_num(-1))
    assert plain.per_prompt == zero.per_prompt
    assert (plain.title, zero.title) == ("Logit lens", "Tuned lens") and "lens" not in plain.meta
    assert {k: zero.meta["lens"][k] for k in ("source", "n_layers", "d_model")} == \
        {"source": "zeros", "n_layers": 2, "d_model": 32}


@pytest.mark.parametrize("arch", FAMILIES)
def test_recipe_with_a_lens_equals_plain_pytorch(arch):
    hf, model = build(arch)
    lens = random_lens(seed=FAMILIES.index(arch))
    result = logit_lens.run(model, PROMPTS, positions="all", k=3, lens=lens)
    plain = logit_lens.run(model, PROMPTS, positions="all", k=3)
    assert not torch.allclose(result.values.nan_to_num(), plain.values.nan_to_num(), atol=1e-3)  # the lens acts
    for i, p in enumerate(PROMPTS):
        x = ids(p)
        logits = reference_lens(hf, x, lens)  # [layer + 1, pos, vocab]
        expected = torch.cat([x[0, 1:], logits[-1, -1].argmax()[None]])  # next tokens, then the top prediction
        probs = logits.softmax(-1)
        want = probs.gather(-1, expected[None, :, None].expand(len(probs), -1, 1))[..., 0]  # [layer + 1, pos]
        torch.testing.assert_close(result[i].values.double(), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(result.per_prompt["top_probs"][i]).double(),
                                   probs.topk(3, dim=-1).values, atol=1e-5, rtol=0)
    last = logit_lens.run(model, PROMPTS, positions="last", lens=lens)  # one position: the same numbers
    torch.testing.assert_close(last.values, result.values[..., -1])


def test_kl_by_layer_equals_plain_pytorch():
    hf, model = build("llama")
    lens = random_lens(seed=3)
    for chosen in (None, lens):
        total, count = 0, 0
        for p in PROMPTS:
            logits = reference_lens(hf, ids(p), chosen)
            total = total + kl_to_final(logits[-1].expand_as(logits), logits).sum(-1)  # [layer + 1]
            count += logits.shape[1]
        torch.testing.assert_close(kl_by_layer(model, PROMPTS, chosen, batch_size=2), total / count,
                                   atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- saved forms


def test_tuned_lens_package_layout_loads(tmp_path):
    _, model = build("gpt2")
    lens = random_lens(seed=5)
    folder = tmp_path / "lens"
    folder.mkdir()
    # Exactly what tuned-lens's TunedLens.save writes: its TunedLensConfig as JSON, and torch.save of
    # layer_translators.state_dict() (torch.nn.Linear per layer: "{i}.weight" [out, in], "{i}.bias").
    (folder / "config.json").write_text(json.dumps({
        "base_model_name_or_path": "tiny-gpt2", "d_model": 32, "num_hidden_layers": 2, "bias": True,
        "base_model_revision": None, "unembed_hash": "0" * 16, "lens_type": "linear_tuned_lens"}))
    linears = torch.nn.ModuleList([torch.nn.Linear(32, 32) for _ in range(2)])
    with torch.no_grad():
        for i, linear in enumerate(linears):
            linear.weight.copy_(lens.weight[i])
            linear.bias.copy_(lens.bias[i])
    torch.save(linears.state_dict(), folder / "params.pt")
    assert sorted(torch.load(folder / "params.pt")) == ["0.bias", "0.weight", "1.bias", "1.weight"]

    loaded = TunedLens.load(folder)
    assert torch.equal(loaded.weight, lens.weight) and torch.equal(loaded.bias, lens.bias)
    assert loaded.base_model == "tiny-gpt2" and loaded.source == str(folder)
    h = torch.randn(4, 32)
    for i in range(2):  # the package's transform_hidden: h + translator(h)
        torch.testing.assert_close(loaded.translate(h, i), h + linears[i](h).detach())
    a = logit_lens.run(model, PROMPTS, lens=str(folder))  # a folder, as the CLI gives it
    b = logit_lens.run(model, PROMPTS, lens=lens)
    torch.testing.assert_close(a.values, b.values, atol=0, rtol=0, equal_nan=True)

    # save(layout="tuned-lens") writes the same layout; a lens without biases reads as zero biases
    back = TunedLens.load(lens.save(tmp_path / "written", layout="tuned-lens"))
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    config = json.loads((tmp_path / "written" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["d_model"], config["lens_type"]) == (2, 32, "linear_tuned_lens")
    state = torch.load(tmp_path / "written" / "params.pt")
    torch.save({k: v for k, v in state.items() if k.endswith("weight")}, tmp_path / "written" / "params.pt")
    assert torch.equal(TunedLens.load(tmp_path / "written").bias, torch.zeros(2, 32))


def test_own_layout_round_trips(tmp_path):
    lens = TunedLens(random_lens().weight, random_lens().bias, base_model="tiny", source="x", info={"steps": 3})
    folder = lens.save(tmp_path / "mine")
    assert sorted(p.name for p in folder.iterdir()) == ["lens.json", "lens.safetensors"]
    back = TunedLens.load(folder)
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    assert (back.base_model, back.info, back.source) == ("tiny", {"steps": 3}, str(folder))


# ----------------------------------------------------------------------------- training


def test_training_is_seeded():
    _, model = build("gpt2")
    data = tiny.prompts(12, seed=1)
    a, b = (TunedLens.train(model, data, steps=4, batch_size=4, lr=1e-2, seed=7) for _ in range(2))
    c = TunedLens.train(model, data, steps=4, batch_size=4, lr=1e-2, seed=8)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    assert a.info["seed"] == 7 and a.info["steps"] == 4 and a.base_model


def test_training_beats_the_logit_lens_on_held_out_text(ioi):
    lens = TunedLens.train(ioi, texts(64, seed=0), steps=15, batch_size=32, lr=1e-2, seed=0)
    heldout = texts(32, seed=HELDOUT_SEED, split="test")
    logit, tuned = kl_by_layer(ioi, heldout), kl_by_layer(ioi, heldout, lens)
    assert (tuned[:-1] < logit[:-1]).all(), (logit, tuned)
    assert logit[-1].abs() < 1e-5 and tuned[-1].abs() < 1e-5  # the output row is the model itself


# ----------------------------------------------------------------------------- the shipped lens


def _docs_table() -> dict[str, tuple[float, float]]:
    page = (ROOT / "docs" / "methods" / "tuned_lens.md").read_text()
    block = page.split("<!-- kl-table -->")[1]
    rows = re.findall(r"^\| `(\w+)` \| ([\d.]+) \| ([\d.]+) \|", block, re.M)
    return {name: (float(a), float(b)) for name, a, b in rows}


def test_shipped_lens_kl_table_matches_the_docs(ioi):
    lens = TunedLens.load("tiny-ioi")
    assert (lens.n_layers, lens.d_model, lens.base_model) == (3, 128, "tiny-ioi")
    heldout = texts(HELDOUT_TEXTS, seed=HELDOUT_SEED, split="test")
    logit, tuned = kl_by_layer(ioi, heldout), kl_by_layer(ioi, heldout, lens)
    table = _docs_table()
    assert list(table) == ["embed", "L0", "L1", "L2"]
    for i, (a, b) in enumerate(table.values()):  # printed with 3 decimals
        assert abs(logit[i] - a) <= 6e-4 and abs(tuned[i] - b) <= 6e-4, (i, logit, tuned)
    recorded = lens.info["heldout"]
    assert recorded["kl_tuned_lens"] == pytest.approx(tuned.tolist(), abs=1e-3)
    fig = kl_plot({"logit lens": logit, "tuned lens": tuned})
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["logit lens", "tuned lens"]


def test_tuned_names_the_lens_shipped_with_the_model(ioi):
    prompt = "When Mary and John went to the store, John gave a drink to"
    named = logit_lens.run(ioi, prompt, lens="tuned")
    same = logit_lens.run(ioi, prompt, lens=TunedLens.load("tiny-ioi"))
    torch.testing.assert_close(named.values, same.values, atol=0, rtol=0)
    assert named.title == "Tuned lens" and named.meta["lens"]["source"] == "tiny-ioi"
    assert named.meta["lens"]["base_model"] == "tiny-ioi"
    assert named.per_prompt["top_tokens"][0][-1][-1][0].strip() == "Mary"  # the last row is the model's output


# ----------------------------------------------------------------------------- bad input


def test_a_lens_for_another_model_is_refused_naming_both():
    _, model = build("gpt2")
    with pytest.raises(ValueError, match=r"3 translators of d_model 128.*2 layers of d_model 32"):
        logit_lens.run(model, PROMPTS, lens=TunedLens.load("tiny-ioi"))
    with pytest.raises(ValueError, match=r"ships no tuned lens.*TunedLens.train"):
        logit_lens.run(model, PROMPTS, lens="tuned")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve(model, "/nonexistent/lens")
    with pytest.raises(ValueError, match=r"lens=3 \(int\)"):
        logit_lens.run(model, PROMPTS, lens=3)
    with pytest.raises(ValueError, match=r"weight \[layer, d_model, d_model\]"):
        TunedLens(torch.zeros(2, 32, 31), torch.zeros(2, 32))


def test_a_lens_recorded_for_another_model_of_the_same_sizes_is_warned_about(ioi):
    model, prompt = ioi, "When Mary and John went to the store , John gave a drink to"
    other = TunedLens(torch.zeros(3, 128, 128), torch.zeros(3, 128), base_model="gpt2", source="zeros")
    with pytest.warns(UserWarning, match=r"trained for 'gpt2', and the model is 'tiny-ioi'"):
        logit_lens.run(model, prompt, lens=other)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logit_lens.run(model, prompt, lens="tuned")  # its own lens: no word
