"""The embedded ``tiny-ioi`` model: shipped weights, held-out behaviour, tokenizer, task data."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from nnattr.embedded import MODELS, path, tasks
from nnattr.embedded.evaluate import evaluate

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return GPT2LMHeadModel.from_pretrained(path("tiny-ioi"), attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(path("tiny-ioi"))


def test_path_lookup():
    assert path("tiny-ioi") == MODELS["tiny-ioi"]
    with pytest.raises(ValueError, match="tiny-ioi"):
        path("gpt-17")


def test_model_is_tiny(model):
    weights = path("tiny-ioi") / "model.safetensors"
    assert weights.stat().st_size < 5 * 2**20
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.config.n_layer <= 4 and model.config.n_positions >= 64


def test_heldout_accuracy_matches_record(model, tokenizer):
    metrics = evaluate(model, tokenizer, n=1024, seed=0)
    assert metrics["ioi_acc"] >= 0.95
    assert metrics["induction_acc"] >= 0.95
    assert metrics["ioi_logit_diff"] > 2.0
    record = json.loads((path("tiny-ioi") / "training.json").read_text())["heldout_metrics"]
    for key in ("ioi_acc", "ioi_logit_diff", "induction_acc", "induction_prefix_acc"):
        torch.testing.assert_close(metrics[key], record[key], atol=1e-3, rtol=1e-3)


def test_unpadded_prompts_match_padded_batch(model, tokenizer):
    items = tasks.ioi_prompts(16, seed=1, split="test")
    prompts = [p["prompt"] for p in items]
    batch = model(**tokenizer(prompts, return_tensors="pt", padding=True)).logits[:, -1]
    single = torch.cat([model(**tokenizer(p, return_tensors="pt")).logits[:, -1] for p in prompts])
    # left padding shifts absolute positions; the model was trained to be robust to that
    assert (batch.argmax(-1) == single.argmax(-1)).float().mean() >= 0.9
    io = torch.tensor([tokenizer.convert_tokens_to_ids(p["io"]) for p in items])
    s = torch.tensor([tokenizer.convert_tokens_to_ids(p["s"]) for p in items])
    rows = torch.arange(len(items))
    assert ((single[rows, io] - single[rows, s]) > 0).float().mean() >= 0.9


def test_tokenizer_words_are_single_tokens(tokenizer):
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<pad>" and tokenizer.bos_token == "<bos>"
    words = tasks.NAMES + tasks.PLACES + tasks.OBJECTS + tasks.FILLER
    for word in words:
        for text in (word, " " + word):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, text
            assert tokenizer.decode(ids) == word
    assert len(tokenizer) == len(tasks.vocabulary()) + 4


def test_tokenizer_prepends_bos_and_round_trips(tokenizer):
    for item in tasks.ioi_prompts(50, seed=0) + tasks.ioi_prompts(50, seed=0, split="test"):
        ids = tokenizer(item["prompt"])["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == item["prompt"]
    seq = tasks.induction_sequences(1, length=10, seed=0)[0]
    assert len(tokenizer(seq)["input_ids"]) == 1 + 20


def test_ioi_generators_are_deterministic_and_split():
    assert tasks.ioi_prompts(64, seed=3) == tasks.ioi_prompts(64, seed=3)
    assert tasks.ioi_prompts(64, seed=3) != tasks.ioi_prompts(64, seed=4)
    train = {frozenset(p) for p in tasks.name_pairs("train")}
    test = {frozenset(p) for p in tasks.name_pairs("test")}
    assert train and test and not train & test
    assert len(train) + len(test) == len(tasks.NAMES) * (len(tasks.NAMES) - 1) // 2
    train_prompts = {p["prompt"] for p in tasks.ioi_prompts(2000, seed=0)}
    test_prompts = tasks.ioi_prompts(2000, seed=0, split="test")
    assert not train_prompts & {p["prompt"] for p in test_prompts}
    assert all(frozenset((p["io"], p["s"])) in test for p in test_prompts)
    assert {p["order"] for p in test_prompts} == {"ABB", "BAB"}
    assert {p["template"] for p in test_prompts} == set(range(len(tasks.TEMPLATES)))
    assert len(tasks.TEMPLATES) >= 8


def test_ioi_pairs_flip_the_answer(tokenizer):
    pairs = tasks.ioi_pairs(100, seed=0)
    assert pairs == tasks.ioi_pairs(100, seed=0)
    for p in pairs:
        clean, corrupt = (tokenizer(p[k])["input_ids"] for k in ("clean", "corrupted"))
        assert len(clean) == len(corrupt)
        diff = [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
        assert len(diff) == 1  # only the second mention changes: S in clean, IO in corrupted
        assert tokenizer.decode(clean[diff[0]]) == p["distractor"].strip()
        assert tokenizer.decode(corrupt[diff[0]]) == p["answer"].strip()
        # in the corrupted prompt the clean answer is now the repeated (subject) name
        answer = tokenizer.convert_tokens_to_ids(p["answer"].strip())
        assert corrupt.count(answer) == 2 and clean.count(answer) == 1


def test_induction_generator_is_deterministic_and_split():
    a = tasks.induction_sequences(200, length=8, seed=0)
    assert a == tasks.induction_sequences(200, length=8, seed=0)
    b = tasks.induction_sequences(200, length=8, seed=0, split="test")
    assert not set(a) & set(b)
    for seq in a[:20]:
        words = seq.split()
        assert len(words) == 16 and words[:8] == words[8:] and len(set(words[:8])) == 8
    with pytest.raises(ValueError, match="split"):
        tasks.induction_sequences(1, length=8, seed=0, split="valid")
    words = tasks.induction_sequences(1, length=5, seed=0, prefix=3)[0].split()
    assert len(words) == 13 and words[3:8] == words[8:] and not set(words[:3]) & set(words[3:])
