"""Options of the patching recipes checked by name before any trace: node types, counts, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nnattr
from nnattr.recipes import activation_patching, attribution_patching
from tests.support import tiny

CLEAN, CORRUPTED = ["w1 w2 w3 w4 w5"], ["w1 w2 w6 w4 w5"]


@pytest.fixture(scope="module")
def model():
    return nnattr.load(tiny.hf_model("gpt2"), tiny.tokenizer())


def test_one_node_type_as_a_string(model):
    one = attribution_patching.run(model, CLEAN, CORRUPTED, "w7", "w8", nodes="attn")
    listed = attribution_patching.run(model, CLEAN, CORRUPTED, "w7", "w8", nodes=["attn"])
    assert list(one) == ["attn"] and torch.equal(one["attn"].values, listed["attn"].values)
    exact = activation_patching.run(model, CLEAN, CORRUPTED, "w7", "w8", nodes="mlp")
    assert list(exact) == ["mlp"]


@pytest.mark.parametrize("nodes, problem", [
    ([], "no node types given: choose one or more of"),
    (["atn"], r"unknown node types \['atn'\]: choose one or more of"),
])
def test_bad_node_types(model, nodes, problem):
    for recipe in (attribution_patching, activation_patching):
        with pytest.raises(ValueError, match=problem):
            recipe.run(model, CLEAN, CORRUPTED, "w7", "w8", nodes=nodes)


@pytest.mark.parametrize("options, problem", [
    (dict(rows=1.5), r"rows=1.5: give a whole number of at least 1"),
    (dict(rows=0), r"rows=0: give a whole number of at least 1"),
    (dict(rows="4"), r"rows='4': give a whole number"),
    (dict(k=3), r"k=3: k \(the entries patched per node type\) applies with candidates only"),
])
def test_activation_patching_counts(model, options, problem):
    with pytest.raises(ValueError, match=problem):
        activation_patching.run(model, CLEAN, CORRUPTED, "w7", "w8", nodes="mlp", **options)


def test_whole_counts_of_any_type_work(model):
    plain = activation_patching.run(model, CLEAN, CORRUPTED, "w7", "w8", nodes="mlp", rows=2)
    numpy = activation_patching.run(model, CLEAN, CORRUPTED, "w7", "w8", nodes="mlp", rows=np.int64(2))
    assert torch.equal(plain["mlp"].values, numpy["mlp"].values)
    ig = attribution_patching.run(model, CLEAN, CORRUPTED, "w7", "w8", nodes="mlp", method="ig", steps=2.0)
    assert ig["mlp"].meta["steps"] == 2
    with pytest.raises(ValueError, match=r"steps=1.5: give a whole number of at least 1"):
        attribution_patching.run(model, CLEAN, CORRUPTED, "w7", "w8", method="ig", steps=1.5)


def test_answers_beside_a_custom_metric_are_named(model):
    metric = lambda logits: logits[:, -1, 7] - logits[:, -1, 8]  # noqa: E731
    with pytest.warns(UserWarning, match="answer= and distractor= do not enter a custom metric="):
        attribution_patching.run(model, CLEAN, CORRUPTED, "w7", "w8", metric=metric, nodes="mlp")
