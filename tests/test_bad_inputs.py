"""Every bad input gets a clear error (or a warning, where the numbers are merely doubtful) before
any compute: the message names the value, the limit and the fix. Python API and command line."""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest
import torch

import nnattr
from nnattr.batch import Batch
from nnattr.cli import main
from nnattr.embedded import MODELS
from nnattr.recipes import (
    activation_patching, attention_rollout, attention_summary, attention_views, attribution_patching,
    direct_logit_attribution, head_attribution, logit_lens,
)
from tests.support import tiny

EMBEDDED = (MODELS["tiny-ioi"] / "model.safetensors").is_file()
needs_embedded = pytest.mark.skipif(not EMBEDDED, reason="tiny-ioi has no trained weights in this checkout")
IOI = "When Mary and John went to the store , John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store , Mary gave a drink to"
NEAR_MISS = "When Mary and John went to the store , John gave a book to"  # moves the logit difference by ~0.03
RECIPES = {  # name: run(model, batch_size) on the tiny GPT-2 (words w0 ... w96)
    "dla": lambda m, **kw: direct_logit_attribution.run(m, "w1 w2 w3", **kw),
    "head_attribution": lambda m, **kw: head_attribution.run(m, "w1 w2 w3", **kw),
    "logit_lens": lambda m, **kw: logit_lens.run(m, "w1 w2 w3", **kw),
    "rollout": lambda m, **kw: attention_rollout.run(m, "w1 w2 w3", **kw),
    "summary": lambda m, **kw: attention_summary.run(m, "w1 w2 w3", **kw),
    "views": lambda m, **kw: attention_views.run(m, "w1 w2 w3", **kw),
    "attribution_patching": lambda m, **kw: attribution_patching.run(m, "w1 w2 w3", "w1 w4 w3", "w5", "w6", **kw),
    "activation_patching": lambda m, **kw: activation_patching.run(m, "w1 w2 w3", "w1 w4 w3", "w5", "w6",
                                                                   nodes=["attn"], **kw),
}
MODULES = {"dla": direct_logit_attribution, "head_attribution": head_attribution, "logit_lens": logit_lens,
           "rollout": attention_rollout, "summary": attention_summary, "views": attention_views,
           "attribution_patching": attribution_patching, "activation_patching": activation_patching}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def ioi():
    if not EMBEDDED:
        pytest.skip("tiny-ioi has no trained weights in this checkout")
    return nnattr.load("tiny-ioi")


@pytest.fixture(scope="module")
def gpt2():
    return nnattr.load(tiny.hf_model("gpt2"), tiny.tokenizer())


@pytest.fixture(scope="module")
def llama():
    return nnattr.load(tiny.hf_model("llama"), tiny.tokenizer())


def words(n: int) -> str:
    return " ".join(f"w{3 + i % 90}" for i in range(n))


@pytest.fixture
def no_compute(monkeypatch):
    """Every recipe's trace fails the test: what is refused is refused before anything runs."""
    def trace(*args, **kwargs):
        raise AssertionError("a trace ran")

    for module in MODULES.values():
        monkeypatch.setattr(module, "trace", trace)


# --- prompts longer than the model's positions -----------------------------------------------


@needs_embedded
def test_prompt_longer_than_learned_positions_is_refused(ioi, no_compute, tmp_path, capsys):
    assert ioi.config.n_positions == 128
    long = " ".join(["Mary"] * 128)  # with <bos>: 129 tokens
    message = (r"prompt 1 has 129 tokens, but the model has 128 positions \(n_positions=128 in its config, one "
               r"learned embedding each\): shorten it to at most 128 tokens")
    with pytest.raises(ValueError, match=message):
        direct_logit_attribution.run(ioi, [IOI, long])
    with pytest.raises(ValueError, match="prompt 0 has 129 tokens"):
        attribution_patching.run(ioi, long, long.replace("Mary", "John", 1), " Mary", " John")
    with pytest.raises(ValueError, match="prompt 0 has 129 tokens"):  # a corrupted prompt too
        activation_patching.run(ioi, IOI, long, " Mary", " John")
    assert main(["report", "--prompt", long, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "error: prompt 0 has 129 tokens" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@needs_embedded
def test_prompt_at_the_limit_runs(ioi):
    batch = Batch.of(ioi, " ".join(["Mary"] * 127), " Mary")
    assert batch.lengths == (128,)
    assert direct_logit_attribution.run(ioi, batch).values.isfinite().all()


def test_rotary_model_warns_past_its_positions(gpt2, llama):
    assert llama.config.max_position_embeddings == 64
    with pytest.warns(UserWarning, match=r"prompt 0 has 70 tokens, more than max_position_embeddings=64 .*rotary"):
        batch = Batch.of(llama, words(70))
    assert batch.lengths == (70,)
    with pytest.raises(ValueError, match=r"prompt 0 has 70 tokens, but the model has 64 positions \(n_positions=64"):
        Batch.of(gpt2, words(70))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Batch.of(llama, words(64)).lengths == (64,)


# --- targets and prompts of the wrong type -----------------------------------------------------


@needs_embedded
def test_int_like_targets_give_the_same_result_as_ints(ioi):
    mary, john = (Batch.of(ioi, IOI, t).target[0] for t in (" Mary", " John"))
    expected = direct_logit_attribution.run(ioi, IOI, target=mary, distractor=john)
    for target in (float(mary), np.int64(mary), np.float32(mary), torch.tensor(mary), torch.tensor(float(mary)),
                   [float(mary)]):
        got = direct_logit_attribution.run(ioi, IOI, target=target, distractor=np.int64(john))
        torch.testing.assert_close(got.values, expected.values, rtol=0, atol=0)
        assert got.per_prompt == expected.per_prompt
    estimate = attribution_patching.run(ioi, IOI, IOI_CORRUPTED, np.int64(mary), float(john), nodes=["attn"])
    assert estimate["attn"].values.isfinite().all()


def test_fractional_target_ids_are_refused(gpt2):
    with pytest.raises(ValueError, match="target id 5.5 is not a whole number: pass an int token id"):
        direct_logit_attribution.run(gpt2, "w1 w2", target=5.5)
    with pytest.raises(ValueError, match="distractor id 7.25 is not a whole number"):
        direct_logit_attribution.run(gpt2, "w1 w2", target=5, distractor=torch.tensor(7.25))
    with pytest.raises(ValueError, match="answer id nan is not a whole number"):
        attribution_patching.run(gpt2, "w1 w2", "w1 w3", float("nan"), 5)


@pytest.mark.parametrize("prompts, message", [
    (None, r"prompts is None: pass text \(a str\), a list of texts, token ids"),
    (5, r"prompts is 5 \(int\): pass text \(a str\)"),
    (b"w1 w2", r"prompts is bytes \(b'w1 w2'\), not text: decode it first \(.decode\('utf-8'\)\)"),
    (["w1", None], r"prompt 1 is None: in a list, every prompt is text \(a str\), or every one a list of int token"),
    (["w1", b"w2"], r"prompt 1 is bytes \(b'w2'\), not text: decode it first"),
    (["w1", 7], r"prompt 1 is 7 \(int\): in a list, every prompt is text"),
])
def test_prompts_of_the_wrong_type_name_the_prompt_and_the_fix(gpt2, prompts, message):
    with pytest.raises(TypeError, match=message):
        logit_lens.run(gpt2, prompts)
    with pytest.raises(TypeError, match=message):
        attribution_patching.run(gpt2, prompts, "w1 w3", "w5", "w6")


def test_int_like_token_ids_as_prompts(gpt2):
    expected = Batch.of(gpt2, [[2, 5, 6]]).ids
    assert Batch.of(gpt2, [2, np.int64(5), 6]).ids == expected
    assert Batch.of(gpt2, np.array([[2, 5, 6]])).ids == expected
    assert Batch.of(gpt2, np.array(["w3 w4"])).labels == ("w3 w4",)
    with pytest.raises(ValueError, match=r"prompt 1 must be a non-empty list of int token ids; it holds 4.5 \(float\)"):
        Batch.of(gpt2, [[2, 5], [6, 4.5]])


def test_cli_takes_a_token_id(tiny_folder, tmp_path, capsys):
    w7 = tiny.tokenizer().convert_tokens_to_ids("w7")
    base = ["dla", "--model", tiny_folder, "--prompt", "w1 w2 w3"]
    assert main([*base, "--target", "w7", "--distractor", "w8"]) == 0
    by_text = capsys.readouterr().out
    assert main([*base, "--target-id", str(w7), "--distractor-id", str(w7 + 1)]) == 0
    assert capsys.readouterr().out == by_text
    assert main([*base, "--target", str(w7)]) == 1  # a bare number stays text
    assert "error: target '10' is not in the vocabulary" in capsys.readouterr().err
    assert main([*base, "--target-id", "1e3"]) == 2
    assert "argument --target-id: expected a token id (an int from 0), got '1e3'" in capsys.readouterr().err
    assert main([*base, "--target-id", "5", "--target", "w7"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main([*base, "--target-id", "100"]) == 1
    assert "error: target id 100 is outside the vocabulary [0, 100)" in capsys.readouterr().err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"clean": "w1 w2 w3", "corrupted": "w1 w4 w3", "answer": 10, "distractor": "w8"}\n')
    assert main(["attribution-patching", "--model", tiny_folder, "--prompts-file", str(pairs), "--nodes", "attn"]) == 0
    assert "logit('w7') − logit('w8')" in capsys.readouterr().out


# --- degenerate pairs and metrics --------------------------------------------------------------


def test_identical_pairs_are_refused_or_named(gpt2, no_compute, tiny_folder, capsys):
    for recipe in (attribution_patching, activation_patching):
        with pytest.raises(ValueError, match=r"pair 0: the clean and corrupted prompts are the same tokens \('w1 w2 "
                                             r"w3'\), so patching changes nothing .*: give a corrupted prompt that"):
            recipe.run(gpt2, "w1 w2 w3", "w1 w2 w3", "w5", "w6")
        with pytest.raises(ValueError, match=r"every pair \(2\): the clean and corrupted prompts are the same"):
            recipe.run(gpt2, ["w1 w2", "w3 w4"], ["w1 w2", "w3 w4"], "w5", "w6")
    assert main(["attribution-patching", "--model", tiny_folder, "--clean", "w1 w2", "--corrupted", "w1 w2",
                 "--answer", "w5", "--distractor", "w6"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: pair 0: the clean and corrupted prompts are the same tokens")
    assert captured.out == ""


def test_some_identical_pairs_are_named_in_a_warning(gpt2):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = activation_patching.run(gpt2, ["w1 w2 w3", "w1 w2", "w7 w8"], ["w1 w4 w3", "w1 w2", "w7 w9"], "w5",
                                      "w6", nodes=["attn"])
    same, gap = (str(w.message) for w in caught)  # this random model's gaps are tiny: a second warning
    assert same.startswith("pairs [1] (1 of 3): the clean and corrupted prompts are the same tokens ('w1 w2')")
    assert gap.startswith("pairs [0, 2] (2 of 3): the clean - corrupted metric gap is too small")  # 1: named once
    assert out["attn"].values[1].isnan().all() and out["attn"].values[[0, 2]].isfinite().all()


def test_a_nan_metric_is_refused_naming_the_pairs(gpt2):
    def nan_everywhere(logits):
        return logits[:, -1, 5] / 0 * 0

    with pytest.raises(ValueError, match=r"metric returned \[nan, nan\] for random logits \(2, 3, 100\): it must "
                                         r"give a finite number"):
        attribution_patching.run(gpt2, "w1 w2 w3", "w1 w4 w3", metric=nan_everywhere)

    def nan_on_real_prompts(logits):  # finite on the 3-position probe, NaN on these 4-token prompts
        value = logits[:, -1, 5] - logits[:, -1, 6]
        return value if logits.shape[1] == 3 else value * float("nan")

    message = (r"the metric is NaN or infinite for pairs \[0, 1\] of 2 \(pair 0: clean nan, corrupted nan\), so every "
               r"score of those pairs would be too: make your metric finite")
    for recipe in (attribution_patching, activation_patching):
        with pytest.raises(ValueError, match=message):
            recipe.run(gpt2, ["w1 w2 w3 w4", "w5 w6 w7 w8"], ["w1 w9 w3 w4", "w5 w9 w7 w8"],
                       metric=nan_on_real_prompts, nodes=["attn"])


@needs_embedded
def test_a_tiny_gap_warns_that_recovery_is_noise(ioi, tiny_folder, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real gap (25 logits): no warning
        activation_patching.run(ioi, IOI, IOI_CORRUPTED, " Mary", " John", nodes=["attn"])
    with pytest.warns(UserWarning, match=r"pairs \[0\] \(1 of 1\): the clean - corrupted metric gap is too small to "
                                         r"divide by \(pair 0: clean 25\.\d+, corrupted 25\.\d+, gap 0\.0\d+ < "
                                         r"0\.50\d+ = 0\.02 × max\(1, \|clean\|, \|corrupted\|\)\)"):
        activation_patching.run(ioi, IOI, NEAR_MISS, " Mary", " John", nodes=["attn"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # attribution patching is in metric units: nothing is divided
        attribution_patching.run(ioi, IOI, NEAR_MISS, " Mary", " John", nodes=["attn"])
    assert main(["activation-patching", "--clean", IOI, "--corrupted", NEAR_MISS, "--answer", " Mary",
                 "--distractor", " John", "--nodes", "attn"]) == 0
    assert "gap is too small to divide by" in capsys.readouterr().err


# --- bad options and paths ---------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_bad_batch_size_is_refused_before_any_trace(gpt2, no_compute, recipe):
    for bad, message in ((1.5, r"batch_size=1\.5: give a positive int"), ("2", r"batch_size='2' is a str: give"),
                         (0, "batch_size=0: give"), (True, "batch_size=True is a bool")):
        with pytest.raises(ValueError, match=message):
            RECIPES[recipe](gpt2, batch_size=bad)


def test_int_like_batch_sizes_run(gpt2):
    expected = RECIPES["dla"](gpt2, batch_size=1).values
    for size in (np.int64(1), 1.0):
        torch.testing.assert_close(RECIPES["dla"](gpt2, batch_size=size).values, expected, rtol=0, atol=0)


def test_cli_batch_size_must_be_a_positive_integer(capsys):
    assert main(["dla", "--batch-size", "1.5"]) == 2
    assert "argument --batch-size: expected a positive integer, got '1.5'" in capsys.readouterr().err


def test_a_missing_folder_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("./no/such/folder", "no/such/folder", tmp_path / "nope"):
        with pytest.raises(FileNotFoundError, match=r"no such folder \(.*\)\. A local model is a folder holding "
                                                    r"config.json .* a Hugging Face repo id looks like 'org/name'"):
            nnattr.load(name)
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(FileNotFoundError, match="'./weights.bin': is a file, not a folder"):
        nnattr.load("./weights.bin")


def test_a_misspelt_embedded_name_suggests_it_without_the_network(tiny_folder, capsys):
    for name in ("tiny-iio", "tiny_ioi", "Tiny-IOI"):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=rf"model '{name}': no such model; did you mean the embedded 'tiny-ioi'\? "
                                             r"\(a Hugging Face repo id looks like 'org/name'"):
            nnattr.load(name)
        assert time.perf_counter() - start < 1, "no network retries"
    assert main(["dla", "--model", "tiny-iio"]) == 1
    assert capsys.readouterr().err.endswith(
        "error: could not load model 'tiny-iio': no such model; did you mean the embedded 'tiny-ioi'? (a Hugging Face "
        "repo id looks like 'org/name'; a local folder like './my-model')\n")


# --- --out -------------------------------------------------------------------------------------


def test_out_with_earlier_results_names_the_files_overwritten(tiny_folder, tmp_path, capsys):
    (tmp_path / "direct_logit_attribution.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["dla", "--model", tiny_folder, "--prompt", "w1 w2", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"warning: --out {tmp_path} already holds direct_logit_attribution.json: files of the same name are " \
           f"overwritten" in err and "notes.txt" not in err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert main(["dla", "--model", tiny_folder, "--prompt", "w1 w2", "--out", str(tmp_path / "new")]) == 0
    assert "already holds" not in capsys.readouterr().err


@pytest.mark.parametrize("command", [["dla"], ["report"]])
def test_out_that_cannot_be_written_is_refused_before_loading(command, tmp_path, monkeypatch, capsys):
    from nnattr import cli

    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("the model was loaded"))
    file = tmp_path / "file"
    file.write_text("")
    assert main([*command, "--out", str(file / "sub")]) == 2
    assert f"error: --out: {file} is a file, so {file / 'sub'} cannot be made in it; give another folder" \
        in capsys.readouterr().err
    assert main([*command, "--out", str(file)]) == 2
    assert f"error: --out: {file} is a file; give a folder" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path) == str(locked) else real(path, mode))
    assert main([*command, "--out", str(locked)]) == 2
    assert f"error: --out: {locked} is not writable; give a folder you can write to" in capsys.readouterr().err
    assert main([*command, "--out", str(locked / "a" / "b")]) == 2
    assert f"error: --out: {locked} is not writable, so {locked / 'a' / 'b'} cannot be made in it" \
        in capsys.readouterr().err
