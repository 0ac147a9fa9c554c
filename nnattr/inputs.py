"""Prompts, answer tokens and chunking: validated once, before anything runs."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Sequence, Union

import torch

Prompts = Union[str, Sequence[str]]
Token = Union[str, int]


def as_prompts(prompts: Prompts) -> list[str]:
    """One prompt or many, as a non-empty list of non-empty strings."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise ValueError("no prompts given: pass a string or a list of strings")
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is a {type(p).__name__}, not a string")
        if not p.strip():
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
    return items


def token_id(tokenizer, token: Token, *, role: str = "target") -> int:
    """The id of a single-token string or an id, or a clear error.

    Strings are encoded without special tokens and must give exactly one token that is not
    the tokenizer's unknown token. Write the leading space where the tokenizer expects one
    (GPT-2: ``" Mary"``).
    """
    vocab = len(tokenizer)
    if isinstance(token, bool) or not isinstance(token, (str, int)):
        raise TypeError(f"{role} must be a token string or an int id, got {type(token).__name__}")
    if isinstance(token, int):
        if not 0 <= token < vocab:
            raise ValueError(f"{role} id {token} is outside the vocabulary [0, {vocab})")
        return token
    if token == "":
        raise ValueError(f"{role} is an empty string: pass one token, e.g. ' Mary'")
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if len(ids) != 1:
        raise ValueError(
            f"{role} {token!r} is {len(ids)} tokens {pieces}: it must be a single token. "
            f"Pick one token (e.g. the first, {pieces[0]!r}) or pass its id."
            if ids
            else f"{role} {token!r} encodes to no tokens"
        )
    unk = tokenizer.unk_token_id
    if unk is not None and ids[0] == unk and token != tokenizer.unk_token:
        raise ValueError(f"{role} {token!r} is not in the vocabulary (it encodes to the unknown token)")
    return ids[0]


def token_ids(tokenizer, tokens: Token | Sequence[Token] | None, n: int, *, role: str) -> list[int] | None:
    """One id per prompt: a single token is shared by all prompts, a sequence gives one each."""
    if tokens is None:
        return None
    if isinstance(tokens, (str, int)):
        return [token_id(tokenizer, tokens, role=role)] * n
    tokens = list(tokens)
    if len(tokens) != n:
        raise ValueError(f"{len(tokens)} {role}s for {n} prompts: give one {role}, or one per prompt")
    return [token_id(tokenizer, t, role=role) for t in tokens]


def check_unknown(tokenizer, prompts: list[str]) -> None:
    """Refuse prompts with words a word-level tokenizer does not know (they would silently
    become the unknown token). Sub-word tokenizers never produce it for ordinary text."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return
    for i, p in enumerate(prompts):
        ids = tokenizer(p)["input_ids"]
        if unk in ids:
            words = [w for w in p.split() if tokenizer(w, add_special_tokens=False)["input_ids"] == [unk]]
            raise ValueError(f"prompt {i} has tokens not in the vocabulary: {words or p!r}")


def tokens_of(tokenizer, prompt: str) -> list[str]:
    """The prompt's tokens as strings, as the model sees them (special tokens included)."""
    ids = tokenizer(prompt)["input_ids"]
    return [tokenizer.decode([i]) for i in ids]


def map_chunks(fn, items: list, *, batch_size: int | None, desc: str, model=None, remote=False, backend=None):
    """Run ``fn(start, chunk)`` over chunks of ``items``; yield ``(start, chunk, result)``.

    ``batch_size=None`` means: everything at once on CPU or remote; on a local GPU, as many
    prompts as an estimate of the activations fits in half the free memory. On a CUDA
    out-of-memory error the chunk is halved and retried, down to one prompt. A progress bar
    shows on a terminal when there is more than one chunk.

    Remote (``remote=True``, a host URL, or a remote ``backend``): `nnattr.remote.prepare` runs
    once before anything is sent (API key, model hosted, versions), each chunk is one request
    with its own queue wait, and a failed request raises `nnattr.remote.NDIFError`, which names
    the fix. Chunks queued by `nnattr.remote.submit` yield nothing here.
    """
    from . import remote as ndif

    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    on_ndif = ndif.is_remote(remote, backend)
    if on_ndif:
        ndif.prepare(model, backend, remote=remote)
    size = batch_size or (len(items) if on_ndif else _fits_on_gpu(model, len(items)))
    bar = None
    if size < len(items):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=desc, unit="prompt", disable=not sys.stderr.isatty(), leave=False)
    start, queued = 0, 0
    while start < len(items):
        chunk = items[start : start + size]
        try:
            with ndif.errors(model, backend, remote=remote, batch_size=len(chunk)) if on_ndif else nullcontext():
                out = fn(start, chunk)
        except ndif.Deferred:
            queued += 1
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise MemoryError(f"{desc}: one prompt does not fit in GPU memory; use a shorter prompt or "
                                  f"a larger GPU (or remote=True)") from None
            size = max(1, size // 2)
            torch.cuda.empty_cache()
            continue
        else:
            yield start, chunk, out
        start += len(chunk)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if queued:
        raise ndif.Deferred(queued)


def _fits_on_gpu(model, n: int, *, tokens: int = 512) -> int:
    """How many prompts of ``tokens`` tokens fit in half the free GPU memory (all of them on CPU)."""
    device = getattr(model, "device", None) if model is not None else None
    if device is None or getattr(device, "type", "cpu") != "cuda":
        return n
    free, _ = torch.cuda.mem_get_info(device)
    config = model.config
    # Per prompt: a residual-sized tensor per sub-layer kept for the trace, plus the attention
    # probabilities of one layer, in float32.
    per_prompt = 4 * tokens * (4 * config.num_hidden_layers * config.hidden_size + config.num_attention_heads * tokens)
    return max(1, min(n, int(0.5 * free // per_prompt)))


def right_align(rows: list[torch.Tensor], length: int, *, dim: int = -1) -> torch.Tensor:
    """Stack tensors whose ``dim`` is a position axis, right-aligned and NaN-padded to ``length``."""
    out = []
    for row in rows:
        pad = length - row.shape[dim]
        if pad:
            shape = list(row.shape)
            shape[dim] = pad
            row = torch.cat([torch.full(shape, float("nan"), dtype=row.dtype), row], dim=dim)
        out.append(row)
    return torch.stack(out)
