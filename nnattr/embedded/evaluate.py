"""Held-out evaluation of the embedded model, plus cheap per-head circuit checks.

``evaluate`` measures task behaviour on the test split of ``nnattr.embedded.tasks``;
``head_scores`` measures attention patterns (induction, previous-token) and the effect of
mean-ablating each head on the IOI logit difference.

>>> from transformers import AutoTokenizer, GPT2LMHeadModel
>>> from nnattr.embedded import path
>>> model = GPT2LMHeadModel.from_pretrained(path("tiny-ioi"), attn_implementation="eager")
>>> tokenizer = AutoTokenizer.from_pretrained(path("tiny-ioi"))
>>> evaluate(model, tokenizer)["ioi_acc"] > 0.95
True
"""

from __future__ import annotations

import contextlib

import torch

from nnattr.embedded import tasks


def _single_token_ids(tokenizer, words: list[str]) -> torch.Tensor:
    ids = tokenizer(words, add_special_tokens=False)["input_ids"]
    bad = [w for w, i in zip(words, ids) if len(i) != 1]
    if bad:
        raise ValueError(f"expected single-token words, these are not: {bad[:5]}")
    return torch.tensor([i[0] for i in ids])


def _forward(model, enc, **kwargs):
    """Run a left-padded batch with positions counted from each row's first real token (as
    nnsight and ``generate`` do), so that padding changes nothing."""
    mask = enc["attention_mask"]  # [batch, pos]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids,
                 **kwargs)


def _ioi_final_logits(model, tokenizer, items: list[dict], *, batch_size: int) -> torch.Tensor:
    """Logits at the last position of each (left-padded) IOI prompt: ``[n, vocab]``."""
    out = []
    for start in range(0, len(items), batch_size):
        enc = tokenizer([p["prompt"] for p in items[start : start + batch_size]],
                        return_tensors="pt", padding=True)
        out.append(_forward(model, enc).logits[:, -1])  # left padding: -1 is the last word
    return torch.cat(out)


def _ioi_logit_diffs(model, tokenizer, items: list[dict], *, batch_size: int) -> torch.Tensor:
    """logit(IO) - logit(S) at the last position of each prompt: ``[n]``."""
    logits = _ioi_final_logits(model, tokenizer, items, batch_size=batch_size)
    io = _single_token_ids(tokenizer, [p["answer"] for p in items])
    s = _single_token_ids(tokenizer, [p["distractor"] for p in items])
    rows = torch.arange(len(items))
    return logits[rows, io] - logits[rows, s]


def _induction_acc(model, tokenizer, *, n: int, seed: int, length: int, prefix: int,
                   batch_size: int, split: tasks.Split = "test") -> float:
    """Top-1 accuracy on the predictable words of the second run of induction sequences."""
    L, P = length, prefix
    seqs = tasks.induction_sequences(n, length=L, seed=seed, split=split, prefix=P)
    correct = []
    for start in range(0, n, batch_size):
        enc = tokenizer(seqs[start : start + batch_size], return_tensors="pt", padding=True)
        ids = enc["input_ids"]  # [batch, 1 + P + 2L]: <bos>, prefix, first run, second run
        pred = _forward(model, enc).logits.argmax(-1)  # [batch, 1 + P + 2L]
        # positions P+L+1 .. P+2L-1 hold second-run words 1..L-1; their next word is a copy
        correct.append(pred[:, P + L + 1 : P + 2 * L] == ids[:, P + L + 2 : P + 2 * L + 1])
    return torch.cat(correct).float().mean().item()


@torch.no_grad()
def evaluate(model, tokenizer, *, n: int = 512, seed: int = 0, induction_length: int = 20,
             induction_prefix: int = 7, batch_size: int = 128,
             split: tasks.Split = "test") -> dict:
    """Accuracies of ``model`` on ``n`` held-out IOI prompts and ``n`` induction sequences.

    ``split="train"`` measures on training-distribution data instead (used by ``train.py`` to
    decide when to stop, so that the test split is never used for a training decision).

    Returns a dict of floats:
    - ``ioi_acc``: fraction of prompts with logit(IO) > logit(S) at the final position;
    - ``ioi_logit_diff`` / ``ioi_logit_diff_std``: mean / std of logit(IO) - logit(S);
    - ``ioi_top1``: fraction where IO is the argmax over the whole vocabulary;
    - ``induction_acc``: top-1 accuracy on the predictable tokens of the repeated half (all
      positions whose next token is a copy, ``induction_length - 1`` per sequence);
    - ``induction_prefix_acc``: the same after ``induction_prefix`` random non-repeating words,
      which defeats shortcuts based on absolute position;
    - ``n_ioi``, ``n_induction``.
    """
    was_training = model.training
    model.eval()
    items = tasks.ioi_prompts(n, seed=seed, split=split)
    logits = _ioi_final_logits(model, tokenizer, items, batch_size=batch_size)  # [n, vocab]
    io = _single_token_ids(tokenizer, [p["answer"] for p in items])
    s = _single_token_ids(tokenizer, [p["distractor"] for p in items])
    rows = torch.arange(n)
    diffs = logits[rows, io] - logits[rows, s]  # [n]
    top1 = logits.argmax(-1) == io

    induction = {}
    for prefix in (0, induction_prefix):
        induction[prefix] = _induction_acc(model, tokenizer, n=n, seed=seed,
                                           length=induction_length, prefix=prefix,
                                           batch_size=batch_size, split=split)
    model.train(was_training)
    return {
        "ioi_acc": (diffs > 0).float().mean().item(),
        "ioi_logit_diff": diffs.mean().item(),
        "ioi_logit_diff_std": diffs.std().item(),
        "ioi_top1": top1.float().mean().item(),
        "induction_acc": induction[0],
        "induction_prefix_acc": induction[induction_prefix],
        "n_ioi": n,
        "n_induction": n,
    }


def _mean_head_inputs(model, enc) -> list[torch.Tensor]:
    """Per layer, the mean input of ``attn.c_proj`` over real positions: ``[n_heads * d_head]``."""
    inputs = []
    hooks = [b.attn.c_proj.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
             for b in model.transformer.h]
    try:
        _forward(model, enc)
    finally:
        for h in hooks:
            h.remove()
    real = enc["attention_mask"].bool()  # [batch, pos]
    return [x[real].mean(0) for x in inputs]  # x: [batch, pos, n_heads * d_head]


@contextlib.contextmanager
def _replaced(c_proj, cols: slice, mean: torch.Tensor):
    """Within the block, columns ``cols`` of the input of ``c_proj`` are replaced by ``mean``."""
    def hook(mod, args):
        x = args[0].clone()  # [batch, pos, n_heads * d_head]
        x[..., cols] = mean[cols]
        return (x,)

    handle = c_proj.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def head_scores(model, tokenizer, *, n: int = 128, seed: int = 0, induction_length: int = 20,
                induction_prefix: int = 0) -> dict[str, torch.Tensor]:
    """Per-head circuit checks on held-out data, each a ``[n_layers, n_heads]`` tensor.

    - ``induction``: mean attention from a word of the second run to the word after its first
      occurrence (Olsson et al. 2022), after ``induction_prefix`` random words; 1.0 is a
      perfect induction head.
    - ``previous_token``: mean attention from each word of an induction sequence to the word
      before it.
    - ``induction_ablation``: drop of induction accuracy (no prefix) when the head's output
      (its slice of the input to ``attn.c_proj``) is replaced by its mean over all sequences
      and positions (mean-ablation); large values mark heads induction depends on.
    - ``ioi_ablation``: drop of the mean IO - S logit difference under the same mean-ablation
      on IOI prompts; large positive values mark heads the IOI behaviour depends on.
    - ``ioi_io_attention`` / ``ioi_s_attention``: mean attention from the final position to the
      indirect object (its only mention) and to the subject (both mentions, summed).

    The model must use eager attention (``attn_implementation="eager"``).
    """
    model.eval()
    blocks = model.transformer.h
    n_heads = model.config.n_head
    d_head = model.config.n_embd // n_heads
    L, P = induction_length, induction_prefix

    seqs = tasks.induction_sequences(n, length=L, seed=seed, split="test", prefix=P)
    enc = tokenizer(seqs, return_tensors="pt", padding=True)
    out = _forward(model, enc, output_attentions=True)
    attn = torch.stack(out.attentions)  # [layer, batch, head, q, k]
    if attn.numel() == 0:
        raise ValueError("no attention weights returned; load the model with "
                         "attn_implementation='eager'")
    q = torch.arange(P + L + 1, P + 2 * L)  # second-run words with a successor in the first
    induction = attn[:, :, :, q, q - L + 1].mean(dim=(1, 3))  # [layer, head]
    q = torch.arange(2, P + 2 * L + 1)
    previous = attn[:, :, :, q, q - 1].mean(dim=(1, 3))  # [layer, head]

    items = tasks.ioi_prompts(n, seed=seed, split="test")
    enc = tokenizer([p["prompt"] for p in items], return_tensors="pt", padding=True)
    ids = enc["input_ids"]  # [batch, pos], left-padded
    io = _single_token_ids(tokenizer, [p["answer"] for p in items])
    s = _single_token_ids(tokenizer, [p["distractor"] for p in items])
    out = _forward(model, enc, output_attentions=True)
    attn = torch.stack(out.attentions)[:, :, :, -1]  # [layer, batch, head, k]: from the last word
    io_mask = (ids == io[:, None]).float()[None, :, None]  # [1, batch, 1, k]
    s_mask = (ids == s[:, None]).float()[None, :, None]
    io_attention = (attn * io_mask).sum(-1).mean(1)  # [layer, head]
    s_attention = (attn * s_mask).sum(-1).mean(1)

    # head outputs are the slices of the input of attn.c_proj; ablation replaces one slice by
    # its mean over all real positions of the task's data
    ind_enc = tokenizer(tasks.induction_sequences(n, length=L, seed=seed, split="test"),
                        return_tensors="pt", padding=True)
    ioi_means = _mean_head_inputs(model, enc)
    ind_means = _mean_head_inputs(model, ind_enc)
    base_ioi = _ioi_logit_diffs(model, tokenizer, items, batch_size=n).mean()
    base_ind = _induction_acc(model, tokenizer, n=n, seed=seed, length=L, prefix=0, batch_size=n)
    ioi_ablation = torch.zeros(len(blocks), n_heads)
    ind_ablation = torch.zeros(len(blocks), n_heads)
    for layer, block in enumerate(blocks):
        for head in range(n_heads):
            cols = slice(head * d_head, (head + 1) * d_head)
            with _replaced(block.attn.c_proj, cols, ioi_means[layer]):
                ioi_ablation[layer, head] = base_ioi - _ioi_logit_diffs(
                    model, tokenizer, items, batch_size=n).mean()
            with _replaced(block.attn.c_proj, cols, ind_means[layer]):
                ind_ablation[layer, head] = base_ind - _induction_acc(
                    model, tokenizer, n=n, seed=seed, length=L, prefix=0, batch_size=n)
    return {
        "induction": induction,
        "previous_token": previous,
        "induction_ablation": ind_ablation,
        "ioi_ablation": ioi_ablation,
        "ioi_io_attention": io_attention,
        "ioi_s_attention": s_attention,
    }


__all__ = ["evaluate", "head_scores"]
