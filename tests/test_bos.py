"""The BOS token: the tokenizer's behaviour by default, ``prepend_bos`` to choose, a warning when
ids lack the BOS a tokenizer puts before text (the model was trained with it)."""

from __future__ import annotations

import json
import warnings

import pytest

import nnattr
from nnattr.batch import Batch
from nnattr.cli import main
from nnattr.recipes import attribution_patching, direct_logit_attribution as dla
from tests.support import tiny

PROMPT = "When Mary and John went to the store , John gave a drink to"


@pytest.fixture(scope="module")
def ioi():
    return nnattr.load("tiny-ioi")


def logit(model, prompts, **kwargs) -> float:
    return dla.run(model, prompts, " Mary", " John", **kwargs).per_prompt["logit"][0]


def test_ids_without_the_bos_the_tokenizer_adds_warn(ioi):
    ids = ioi.tokenizer(PROMPT)["input_ids"]
    assert ids[0] == ioi.tokenizer.bos_token_id  # the embedded tokenizer puts BOS before text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_bos = logit(ioi, PROMPT)
        assert logit(ioi, ids) == with_bos  # ids with their BOS: no warning, the same numbers
    with pytest.warns(UserWarning, match=r"prompt 0 does not start with the BOS token '<bos>'.*prepend_bos=True"):
        without = logit(ioi, ids[1:])
    assert abs(without - with_bos) > 0.1  # the model was trained with BOS: the number moves
    with pytest.warns(UserWarning, match=r"prompts \[0, 1\] do not start"):
        Batch.of(ioi, [ids[1:], ids[2:]])


def test_prepend_bos_on_the_model_and_per_batch(ioi):
    ids = ioi.tokenizer(PROMPT)["input_ids"]
    added = nnattr.load("tiny-ioi", prepend_bos=True)
    removed = nnattr.load("tiny-ioi", prepend_bos=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a choice made: no warning
        assert logit(added, ids[1:]) == logit(ioi, PROMPT)  # BOS put back
        assert logit(added, ids) == logit(ioi, PROMPT)  # never twice
        assert logit(removed, PROMPT) == logit(removed, ids[1:])  # BOS taken off text too
        batch = Batch.of(ioi, ids[1:], prepend_bos=True)  # per call, over the model's default
    assert batch.tokens[0][0] == "<bos>" and batch.ids[0] == tuple(ids)
    assert Batch.of(added, PROMPT, prepend_bos=False).ids[0] == tuple(ids[1:])
    pairs = attribution_patching.run(added, [ids[1:]], [ioi.tokenizer(PROMPT.replace("John gave", "Mary gave"))[
        "input_ids"][1:]], " Mary", " John", nodes=("mlp",))
    assert pairs["mlp"].tokens[0][0] == "<bos>"  # the pairs follow the model's choice too


def test_a_tokenizer_without_bos_before_text_is_left_alone():
    model = nnattr.load(tiny.hf_model("gpt2"), tiny.tokenizer())  # like GPT-2's: no BOS before text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = Batch.of(model, "w1 w2 w3")
    assert plain.tokens[0] == ("w1", "w2", "w3")
    assert Batch.of(model, "w1 w2 w3", prepend_bos=True).tokens[0] == ("<bos>", "w1", "w2", "w3")  # as TransformerLens


def test_bad_prepend_bos():
    with pytest.raises(TypeError, match="prepend_bos='yes': give True, False or None"):
        nnattr.load("tiny-ioi", prepend_bos="yes")
    model = nnattr.load(tiny.hf_model("gpt2"), tiny.tokenizer())
    with pytest.raises(TypeError, match="prepend_bos=1"):
        Batch.of(model, "w1", prepend_bos=1)


def test_the_command_line(tmp_path, capsys):
    assert main(["dla", "--prompt", PROMPT, "--target", " Mary", "--distractor", " John", "--no-prepend-bos",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "direct_logit_attribution.json").read_text())
    assert data["tokens"][0][0] == "When"
    assert main(["dla", "--help"]) == 0
    assert "--prepend-bos" in capsys.readouterr().out
