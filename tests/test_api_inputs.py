"""Bad inputs to the Python API get a clear error naming the value and the fix, never an error from
deep inside torch, a contradictory message or a silently ignored option: prompt ids outside the
vocabulary, encodings without ids, int-like positions and layers, logit-lens options, result
indexing, ``top``, ``from_dict`` and ``attention_summary.over``'s data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import nnattr
from nnattr.batch import Batch, prompt_groups
from nnattr.embedded import MODELS
from nnattr.recipes import attention_summary as summary
from nnattr.recipes import direct_logit_attribution as dla
from nnattr.recipes import logit_lens
from nnattr.result import Attribution
from tests.support import tiny

P, Q = "w1 w2 w3 w4", "w5 w6 w7"


@pytest.fixture(scope="module")
def model():
    """The tiny random GPT-2 (2 layers, a vocabulary of 100 words)."""
    return nnattr.load(tiny.hf_model("gpt2"), tiny.tokenizer())


@pytest.fixture(scope="module")
def two(model):
    return dla.run(model, [P, Q])


# ------------------------------------------------------------------------- 1. ids outside the vocabulary

@pytest.mark.parametrize("prompts, bad", [
    ([[2, 5, 99999]], 99999),
    ([[2, 5, -5]], -5),
    ([[2, 5, 7], [2, 100]], 100),  # the vocabulary is [0, 100)
    (torch.tensor([[2, 5, 100]]), 100),
    (np.array([2, 5, -1]), -1),
    ({"input_ids": torch.tensor([[2, 5, 123]]), "attention_mask": torch.tensor([[1, 1, 1]])}, 123),
])
def test_ids_outside_the_vocabulary_are_named(model, prompts, bad):
    row = 1 if bad == 100 and isinstance(prompts, list) else 0
    with pytest.raises(ValueError, match=rf"prompt {row} holds token id {bad}, outside the model's vocabulary "
                                         rf"\[0, 100\)"):
        dla.run(model, prompts)


def test_padding_outside_the_mask_is_not_checked(model):
    encoding = {"input_ids": torch.tensor([[-1, 2, 5, 7]]), "attention_mask": torch.tensor([[0, 1, 1, 1]])}
    assert Batch.of(model, encoding).ids == ((2, 5, 7),)  # padding is dropped by the mask, whatever its id


@pytest.mark.skipif(not (MODELS["tiny-ioi"] / "model.safetensors").is_file(), reason="tiny-ioi has no weights")
def test_the_reviewers_ids_on_tiny_ioi():
    ioi = nnattr.load("tiny-ioi")
    vocab = ioi.config.vocab_size
    with pytest.raises(ValueError, match=rf"prompt 0 holds token id 99999, outside the model's vocabulary "
                                         rf"\[0, {vocab}\)"):
        dla.run(ioi, [[1, 2, 99999]])
    with pytest.raises(ValueError, match="prompt 0 holds token id -5, outside"):
        dla.run(ioi, [[1, 2, -5]])


# ------------------------------------------------------------------------- 2. an encoding needs input_ids

@pytest.mark.parametrize("prompts, keys", [
    ({"text": P}, r"\['text'\]"),
    ({"attention_mask": torch.ones(1, 3)}, r"\['attention_mask'\]"),
    ({}, r"\[\]"),
])
def test_an_encoding_without_input_ids_is_a_type_error(model, prompts, keys):
    with pytest.raises(TypeError, match=rf"prompts is a dict with keys {keys}, not an encoding: an encoding holds "
                                        r"'input_ids' \(token ids \[pos\] or \[batch, pos\]\) and optionally "
                                        r"'attention_mask'"):
        dla.run(model, prompts)


# ------------------------------------------------------------------------- 3. int-like positions and layers

def test_numpy_ints_are_positions_and_layers(model):
    base = dla.run(model, [P, Q], position=-2)
    torch.testing.assert_close(dla.run(model, [P, Q], position=np.int64(-2)).values, base.values)
    torch.testing.assert_close(dla.run(model, [P, Q], position=[np.int32(-2), np.int64(-2)]).values, base.values)
    at_one = summary.run(model, [P, Q], layer_idx=1)
    numpy = summary.run(model, [P, Q], layer_idx=np.int64(1))
    torch.testing.assert_close(numpy.values, at_one.values)
    assert numpy.meta == at_one.meta and type(numpy.meta["layer_idx"]) is int
    assert json.loads(numpy.to_json())["meta"]["layer_idx"] == 1


@pytest.mark.parametrize("position, problem", [
    (True, r"position True for prompt 0, which has 4 tokens \(True is a bool, not a position\): give an int from -4"),
    (-1.0, r"position -1.0 for prompt 0, which has 4 tokens \(-1.0 is a float: write it as the int -1\): give an "
           r"int from -4 \(its first token\) to 3, or -1 for its last token"),
    (1.5, r"position 1.5 for prompt 0, which has 4 tokens \(1.5 is a float, not an int\)"),
    ([0, False], r"position False for prompt 1, which has 3 tokens \(False is a bool, not a position\)"),
    (7, r"position 7 for prompt 0, which has 4 tokens: give an int from -4"),  # an int, out of range: no type clause
])
def test_positions_that_are_not_ints_say_why(model, position, problem):
    with pytest.raises(ValueError, match=problem):
        dla.run(model, [P, Q], position=position)


@pytest.mark.parametrize("bad, problem", [
    (True, r"layer_idx=True: give a layer from -2 to 1, or 'all' \(the model has 2 layers; True is a bool, not a "
           r"layer\)"),
    (1.0, r"layer_idx=1.0: give a layer from -2 to 1, or 'all' \(the model has 2 layers; 1.0 is a float: write it "
          r"as the int 1\)"),
    (np.float64(0.5), r"layer_idx=.*0.5.*: give a layer from -2 to 1, or 'all' \(the model has 2 layers; .*0.5.* is "
                      r"a float64, not an int\)"),
    ("last", r"layer_idx='last': give a layer from -2 to 1, or 'all' \(the model has 2 layers; 'last' is a str"),
    (np.int64(2), r"layer_idx=.*2.*: give a layer from -2 to 1, or 'all' \(the model has 2 layers\)$"),
])
def test_layers_that_are_not_ints_say_why(model, bad, problem):
    with pytest.raises(ValueError, match=problem):
        summary.run(model, P, layer_idx=bad)


# ------------------------------------------------------------------------- 4, 5. logit lens options

def test_logit_lens_refuses_all_positions_with_one_position(model):
    with pytest.raises(ValueError, match=r"positions='all' and position=-2 ask for different things: position "
                                         r"decodes one position per prompt, positions='all' decodes every one; "
                                         r"pass only one of them"):
        logit_lens.run(model, P, positions="all", position=-2)
    every, default = logit_lens.run(model, P, positions="all", k=2), logit_lens.run(model, P, k=2)
    assert every.dims == default.dims == ("prompt", "layer", "position") and default.meta["positions"] == "all"
    one, last = logit_lens.run(model, P, position=-2, k=2), logit_lens.run(model, P, positions="last", position=-2, k=2)
    assert one.dims == last.dims == ("prompt", "layer") and one.meta["positions"] == "last"
    torch.testing.assert_close(one.values, last.values)
    with pytest.raises(ValueError, match=r"positions='every': expected 'all' \(decode every position\) or 'last'"):
        logit_lens.run(model, P, positions="every")


@pytest.mark.parametrize("k", [1.5, 0, -1, 101, True, "3", None, float("nan")])
def test_logit_lens_k_is_an_int_within_the_vocabulary(model, k):
    with pytest.raises(ValueError, match=rf"k={k!r} \({type(k).__name__}\): give the number of top tokens kept per "
                                         r"cell, an int from 1 to 100 \(the vocabulary\)"):
        logit_lens.run(model, P, k=k)


def test_logit_lens_k_may_be_int_like(model):
    base = logit_lens.run(model, P, positions="last", k=2)
    for k in (np.int64(2), 2.0):
        result = logit_lens.run(model, P, positions="last", k=k)
        assert result.meta["k"] == 2 and type(result.meta["k"]) is int
        assert result.per_prompt["top_tokens"] == base.per_prompt["top_tokens"]


def test_the_command_line_refuses_positions_all_with_a_position(tiny_folder, capsys):
    from nnattr.cli import main

    assert main(["logit-lens", "--model", tiny_folder, "--prompt", P, "--positions", "all", "--position", "1"]) == 1
    assert "positions='all' and position=1" in capsys.readouterr().err
    assert main(["logit-lens", "--model", tiny_folder, "--prompt", P, "--position", "1"]) == 0


# ------------------------------------------------------------------------- 6. top(k)

def test_top_needs_a_positive_int(two):
    fix = r"k is how many entries to list, a positive int \(1, 2, ...\)"
    for k in (0, -1):
        with pytest.raises(ValueError, match=rf"top\(k={k}\): {fix}$"):
            two.top(k)
    for k, kind in ((1.5, "float"), (True, "bool"), ("3", "str"), (None, "NoneType")):
        with pytest.raises(TypeError, match=rf"top\(k={k!r}\): {fix}, not a {kind}$"):
            two.top(k)
    assert two.top(np.int64(2)) == two.top(2) and len(two.top(1)) == 1


# ------------------------------------------------------------------------- 7. from_dict, from_json

def test_from_dict_names_what_is_missing(two):
    with pytest.raises(ValueError, match=r"not an Attribution: missing 'dims', 'labels', 'values' "):
        Attribution.from_json("{}")
    values = two.to_dict()["values"]
    with pytest.raises(ValueError, match=r"not an Attribution: missing 'dims', 'labels' \(.*it has \['values'\]\)"):
        Attribution.from_dict({"values": values})
    with pytest.raises(ValueError, match=r"not an Attribution: a list"):
        Attribution.from_json("[]")
    data = two.to_dict()
    data["labels"].pop("component")
    with pytest.raises(ValueError, match=r"not an Attribution: dims \['component'\] have no labels"):
        Attribution.from_dict(data)
    again = Attribution.from_json(two.to_json())
    assert again.dims == two.dims and again.labels == two.labels


# ------------------------------------------------------------------------- 8. result[i]

def test_indexing_a_result_names_its_prompts(two):
    with pytest.raises(IndexError, match=r"prompt index 5 is out of range: this result has 2 prompts, so give an "
                                         r"int from 0 to 1 \(or -2 to -1 from the end\)"):
        two[5]
    with pytest.raises(IndexError, match="prompt index -3 is out of range"):
        two[-3]
    for bad, kind in (("x", "str"), (1.0, "float"), (True, "bool"), (slice(0, 1), "slice")):
        with pytest.raises(TypeError, match=rf"a result is indexed by prompt: give an int prompt index from 0 to 1 "
                                            rf"\(or -2 to -1 from the end; it has 2 prompts\), not .* \({kind}\)"):
            two[bad]
    torch.testing.assert_close(two[np.int64(1)].values, two[1].values)
    torch.testing.assert_close(two[-1].values, two[1].values)


# ------------------------------------------------------------------------- 9. attention_summary.over's data

@pytest.mark.parametrize("data, problem", [
    ([1, 2], r"data item 0 is 1 \(int\): each item is a prompt \(a str\) or a batch of prompts \(a list or tuple "
             r"of str\)"),
    ([P, None], r"data item 1 is None: each item is a prompt"),
    ([P, [Q, 3]], r"data item 1 is a batch \(list\) holding 3 \(int\) at 1: a batch is a list or tuple of prompts"),
    ((p for p in [P, b"w1"]), r"data item 1 is b'w1' \(bytes\): each item is a prompt"),
    ({P: 1, Q: 2}, r"data is a dict of 2 entries, which would run its keys: give a prompt \(a str\), or an iterable "
                   r"of prompts \(str\) or batches \(lists of str\); pass list\(data\) or list\(data.values\(\)\), "
                   r"whichever holds the prompts"),
    (None, r"data is None: give a prompt"),
    (3, r"data is 3 \(int\): give a prompt"),
])
def test_over_names_the_bad_item(model, data, problem):
    with pytest.raises(TypeError, match=problem):
        summary.over(model, data)


def test_over_checks_a_list_before_running_anything(model, monkeypatch):
    ran = []
    monkeypatch.setattr(summary, "run", lambda *a, **kw: ran.append(a))
    with pytest.raises(TypeError, match="data item 2 is None"):
        summary.over(model, [P, Q, None], batch_size=1)
    assert ran == []
    with pytest.raises(ValueError, match="data item 1 is an empty batch"):
        summary.over(model, [P, []])


def test_prompt_groups_keep_their_order():
    assert list(prompt_groups([P, Q, (P,), Q], 1)) == [[P], [Q], [P], [Q]]
    assert list(prompt_groups([P, Q, [P, Q], Q], None)) == [[P, Q], [P, Q], [Q]]
    assert list(prompt_groups(P, 2)) == [[P]]  # one str is one prompt, not characters
    assert list(prompt_groups(iter([P, Q, P]), 2)) == [[P, Q], [P]]
    assert list(prompt_groups(np.array([P, Q]), 5)) == [[P, Q]]
