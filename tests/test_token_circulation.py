"""Token circulation against an independent plain-PyTorch reference, its split identity, and bad input.

The reference (``circulation`` below) uses forward hooks on the native Hugging Face modules
(`tests/support/reference.py`'s paths and frozen-norm share, no nnsight, no nnattr kernels): every
residual (block 0's input, then each block's output) through the HF final norm and ``lm_head``
(and Gemma-2's soft-cap), and each layer's attention and MLP writes dotted with the target's
unembedding through the final norm at the scale of the residual after that layer, in float64.
It treats one unpadded prompt's positions as its batch; the recipe runs a left-padded batch.
"""

from __future__ import annotations

import pytest
import torch

import nnattr
from nnattr.kernels import direct_logit, inverse_softcap, position_direct_logit, token_logit_rank
from nnattr.recipes import direct_logit_attribution as dla
from nnattr.recipes import logit_lens
from nnattr.recipes import token_circulation as circulation
from tests import test_recipes as base
from tests.support import reference as ref
from tests.support import tiny
from tests.test_recipes import DISTRACTORS, PROMPTS, TARGETS, close, ids, token

zoo = base.zoo  # the same fixture: sharpened tiny models (logits O(1), Gemma-2's cap 5 matters)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
IOI = "When Mary and John went to the store , John gave a drink to"


def circulation_reference(hf, input_ids, target=None, distractor=None) -> dict[str, torch.Tensor]:
    """One unpadded prompt ``[1, pos]``: ``logit``, ``pre_cap``, ``rank`` ``[layer + 1, pos]``
    (rows: embed, then each block) and ``attn``, ``mlp``, ``rescale`` ``[layer, pos]``, and the
    model's own output ``model_logit [pos]`` and ``target``."""
    nat, n = ref.native(hf), len(ref.blocks(hf))
    norm, unembed = hf.get_submodule(nat.final_norm), hf.get_submodule(nat.unembed)
    outputs = {f"h{i}": f"{nat.blocks}.{i}" for i in range(n)}
    outputs |= {f"a{i}": f"{nat.blocks}.{i}.{nat.attn_write}" for i in range(n)}
    outputs |= {f"m{i}": f"{nat.blocks}.{i}.{nat.mlp_write}" for i in range(n)}
    with torch.no_grad(), ref.recording(hf, outputs, {"h_in": f"{nat.blocks}.0"}) as seen:
        model_logits = ref.forward(hf, input_ids).logits[0]  # [pos, vocab], soft-capped on Gemma-2
        t = int(model_logits[-1].argmax()) if target is None else target
        states = [seen["h_in"][0]] + [seen[f"h{i}"][0] for i in range(n)]  # [pos, d_model] each
        out = {"logit": [], "pre_cap": [], "rank": []}
        pick = lambda x: x[:, t] - (0 if distractor is None else x[:, distractor])  # noqa: E731
        for h in states:
            pre = unembed(norm(h))  # [pos, vocab], float32 as the model computes it
            capped = ref.softcap(pre, hf)
            out["logit"].append(pick(capped.double()))
            out["pre_cap"].append(pick(pre.double()))
            out["rank"].append((capped > capped[:, t, None]).sum(-1))
        ts = torch.full((input_ids.shape[1],), t)  # positions as the reference's batch
        ds = None if distractor is None else torch.full_like(ts, distractor)
        share = lambda v, resid: ref.frozen_norm_share(hf, v.double(), resid.double(), ts, ds)  # noqa: E731
        out["attn"] = [share(seen[f"a{i}"][0], states[i + 1]) for i in range(n)]
        out["mlp"] = [share(seen[f"m{i}"][0], states[i + 1]) for i in range(n)]
        out["rescale"] = [share(states[i], states[i + 1]) - share(states[i], states[i]) for i in range(n)]
    result = {k: torch.stack(v) for k, v in out.items()}
    return {**result, "model_logit": pick(model_logits.double()), "target": t}


def per_prompt(result, key: str, i: int) -> torch.Tensor:
    return torch.tensor(result.per_prompt[key][i], dtype=torch.float64)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_equals_the_hooks_reference_on_every_family(zoo, arch):
    hf, model = zoo(arch)
    for target, distractor in ((None, None), (TARGETS, DISTRACTORS)):
        result = circulation.run(model, PROMPTS, target, distractor)
        assert result.dims == ("prompt", "layer", "position") and result.labels["layer"] == ["embed", "L0", "L1"]
        for i, p in enumerate(PROMPTS):
            t = None if target is None else token(target[i])
            d = None if distractor is None else token(distractor[i])
            expected = circulation_reference(hf, ids(p), t, d)
            mine = result[i]  # padding stripped
            assert result.per_prompt["target"][i] == tiny.tokenizer().decode([expected["target"]])
            close(mine.values, expected["logit"])
            close(mine.values[-1], expected["model_logit"])  # full depth: the model's own logit, every position
            assert result.per_prompt["rank"][i] == expected["rank"].tolist()
            for key in ("attn", "mlp", "rescale"):
                close(per_prompt(result, key, i), expected[key])


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_each_layer_change_splits_into_attention_mlp_and_rescale(zoo, arch):
    hf, model = zoo(arch)
    result = circulation.run(model, PROMPTS, TARGETS)
    components = dla.run(model, PROMPTS, TARGETS)  # the last position, through the final norm
    n = hf.config.num_hidden_layers
    last = [components.labels["component"].index(f"{n - 1}_{part}_out") for part in ("attn", "mlp")]
    for i in range(len(PROMPTS)):
        lens = inverse_softcap(result[i].values.double(), getattr(hf.config, "final_logit_softcapping", None))
        parts = sum(per_prompt(result, key, i) for key in ("attn", "mlp", "rescale"))  # [layer, pos]
        close(lens[1:] - lens[:-1], parts, atol=2e-5)  # exact up to float32 rounding of logits ~10
        close(lens[-1] - lens[0], parts.sum(0), atol=5e-5)  # telescoped: embed row + every change = last row
        # At the last layer the scale is the final one: attention and MLP are DLA's own components.
        close(torch.stack([per_prompt(result, key, i)[-1, -1] for key in ("attn", "mlp")]),
              components.values[i, last])
    assert result.meta["split_of"] == ("the pre-soft-cap lens logit" if arch == "gemma2" else "the lens logit")


def test_the_first_layers_and_the_logit_lens(zoo):
    hf, model = zoo("llama")
    full = circulation.run(model, PROMPTS, TARGETS, DISTRACTORS)
    first = circulation.run(model, PROMPTS, TARGETS, DISTRACTORS, n_layers=1)
    assert first.labels["layer"] == ["embed", "L0"] and first.meta["n_layers"] == 1
    torch.testing.assert_close(first.values, full.values[:, :2], equal_nan=True)
    for key in ("rank", "attn", "mlp", "rescale"):  # rows: embed and L0 for the rank, L0 for the split
        assert first.per_prompt[key] == [rows[: 1 + (key == "rank")] for rows in full.per_prompt[key]]
    lens = logit_lens.run(model, PROMPTS, TARGETS, positions="last")  # same decoding, same target, same rank
    assert [[row[-1] for row in p] for p in circulation.run(model, PROMPTS, TARGETS).per_prompt["rank"]] == \
        [[row[0] for row in p] for p in lens.per_prompt["target_rank"]]


def test_a_batch_equals_its_prompts_one_by_one(zoo):
    hf, model = zoo("gpt2")
    batch = circulation.run(model, PROMPTS, TARGETS, DISTRACTORS)
    width = max(len(t) for t in batch.tokens)
    for i, p in enumerate(PROMPTS):
        alone = circulation.run(model, p, TARGETS[i], DISTRACTORS[i])
        pad = width - len(batch.tokens[i])
        assert batch.values[i, :, :pad].isnan().all() and not batch.values[i, :, pad:].isnan().any()
        torch.testing.assert_close(batch.values[i, :, pad:], alone.values[0], atol=1e-5, rtol=0)
        for key in ("rank", "attn", "mlp", "rescale"):
            torch.testing.assert_close(per_prompt(batch, key, i), per_prompt(alone, key, 0), atol=1e-5, rtol=0)
    chunked = circulation.run(model, PROMPTS, TARGETS, DISTRACTORS, batch_size=2)
    torch.testing.assert_close(chunked.values, batch.values, atol=1e-5, rtol=0, equal_nan=True)


def test_kernels_on_known_answers():
    logits = torch.tensor([[[1.0, 3.0, 2.0], [5.0, 0.0, -1.0]]])  # [batch 1, pos 2, vocab 3]
    value, rank = token_logit_rank(logits, torch.tensor([2]))
    assert value.tolist() == [[2.0, -1.0]] and rank.tolist() == [[1, 2]]
    value, _ = token_logit_rank(logits, torch.tensor([2]), torch.tensor([0]))
    assert value.tolist() == [[1.0, -6.0]]
    g = torch.Generator().manual_seed(0)
    writes, u, scale = torch.randn(3, 2, 4, 8, generator=g), torch.randn(2, 8, generator=g), torch.rand(2, 4) + 0.5
    got = position_direct_logit(writes, u, scale)  # [3, batch, pos]
    for p in range(4):
        torch.testing.assert_close(got[:, :, p], direct_logit(writes[:, :, p], u, scale[:, p]))
    with pytest.raises(ValueError, match=r"\[component, batch, pos, d_model\]"):
        position_direct_logit(writes, u, scale[:, :3])


@pytest.mark.parametrize("n_layers, problem", [
    (0, r"n_layers=0: give how many layers to follow, an int from 1 to 2"),
    (3, r"n_layers=3: .* from 1 to 2 \(the model's layers\)"),
    (1.5, r"1.5 is a float, not an int"),
    (True, r"True is a bool"),
])
def test_bad_n_layers_says_what_to_give(zoo, n_layers, problem):
    _, model = zoo("gpt2")
    with pytest.raises(ValueError, match=problem):
        circulation.run(model, PROMPTS, n_layers=n_layers)


def test_a_multi_token_target_is_refused(zoo):
    _, model = zoo("gpt2")
    with pytest.raises(ValueError, match=r"target 'w3 w4' is 2 tokens .* it must be a single token"):
        circulation.run(model, PROMPTS, "w3 w4")
    with pytest.raises(ValueError, match="the same token"):
        circulation.run(model, PROMPTS, "w5", "w5")


def test_the_command_line_and_the_plot(tiny_folder, tmp_path, capsys):
    from nnattr.cli import main

    argv = ["token-circulation", "--model", tiny_folder, "--prompt", "w1 w2 w3 w4", "--target", "w7",
            "--n-layers", "1", "--top", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Token circulation · metric: logit('w7') (1 prompt)") and "layer position" in out
    saved = nnattr.result.read(tmp_path / "token_circulation.json")
    assert saved.labels["layer"] == ["embed", "L0"] and (tmp_path / "token_circulation.png").stat().st_size > 10_000
    assert main(["token-circulation", "--model", tiny_folder, "--prompt", "w1", "--n-layers", "5"]) == 1
    assert "n_layers=5: give how many layers to follow" in capsys.readouterr().err


def test_the_embedded_model_as_the_docs_quote_it():
    model = nnattr.load("tiny-ioi")
    result = circulation.run(model, IOI, " Mary")
    assert [round(v, 2) for v in result.values[0, :, -1].tolist()] == [-6.11, 7.92, 22.27, 21.81]
    assert [row[-1] for row in result.per_prompt["rank"][0]] == [451, 10, 0, 0]
    split = {k: [round(row[-1], 2) for row in result.per_prompt[k][0]] for k in ("attn", "mlp", "rescale")}
    assert split == {"attn": [7.03, 19.57, 0.98], "mlp": [1.42, -0.21, -1.02], "rescale": [5.59, -5.02, -0.42]}
    pair = circulation.run(model, IOI, " Mary", " John")  # the logit difference
    assert round(pair.values[0, -1, -1].item(), 2) == 25.23 and round(pair.per_prompt["attn"][0][1][-1], 2) == 24.54
    fig = result.plot()
    panels = lambda fig: [ax.get_ylabel() for ax in fig.axes if ax.get_label() != "<colorbar>"]  # noqa: E731
    assert panels(fig) == ["residual after", "attention write", "MLP write"]
    assert "of 'Mary' (0 = top, bold)" in fig.texts[0].get_text() and len(fig.axes[0].texts) == 4 * 15
    assert panels(circulation.run(model, [IOI, IOI.replace("Mary", "Anna")]).plot()) == ["residual after"]  # a mean
