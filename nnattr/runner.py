"""The shared runner: a recipe's trace over chunks of a batch, locally or on NDIF.

Contract. A recipe's trace function is ``trace(model, batch, *, <options>, remote, backend)``:
it takes a `nnattr.batch.Batch` chunk, runs one nnsight trace (or session) on
``batch.inputs``, and returns a dict of tensors whose first dimension is the prompt. Position
axes span ``batch.width`` (every chunk is padded to the whole batch's width), so `run` only
concatenates. Everything else lives here, once:

- chunking (``batch_size``; by default everything at once on CPU or NDIF, and on a GPU as many
  prompts as an estimate fits in half the free memory), with a progress bar on a terminal;
- CUDA out-of-memory back-off: the chunk is halved and retried, down to one prompt;
- NDIF: `nnattr.remote.prepare` runs once before anything is sent (API key, model hosted,
  versions), the trace is checked for names NDIF cannot resolve before it is sent
  (`nnattr.remote.check_block`), each chunk is one request, and a failed request raises
  `nnattr.remote.NDIFError`, which names the fix. Chunks queued by `nnattr.remote.submit` yield
  nothing here.

>>> out = run(trace, model, batch, k=5)                 # doctest: +SKIP
>>> out["prob"].shape                                   # [prompt, layer, position]  # doctest: +SKIP
"""

from __future__ import annotations

import numbers
import sys
from contextlib import nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch

Trace = Callable[..., dict]


def run(trace: Trace, model, batch, *, batch_size: int | None = None, remote: Any = False, backend: Any = None,
        desc: str | None = None, **options) -> dict[str, torch.Tensor]:
    """``trace(model, chunk, **options, remote=, backend=)`` over chunks of ``batch``, concatenated
    along the prompt dimension: ``{name: [prompt, ...]}``."""
    desc = desc or getattr(sys.modules.get(getattr(trace, "__module__", "")), "TITLE", "trace")
    outs = [out for _, _, out in chunks(
        lambda start, chunk, backend: trace(model, chunk, remote=remote, backend=backend, **options),
        batch, batch_size=batch_size, desc=desc, model=model, remote=remote, backend=backend)]
    return {name: torch.cat([out[name] for out in outs]) for name in outs[0]}


def chunks(fn: Callable, items: Sequence, *, batch_size: int | None, desc: str, model=None, remote: Any = False,
           backend: Any = None) -> Iterator[tuple[int, Sequence, Any]]:
    """Run ``fn(start, chunk, backend)`` over chunks of ``items``; yield ``(start, chunk, result)``.

    ``items`` is anything sliceable with a length (a `Batch`, a list of patching jobs).
    ``backend`` passed to ``fn`` is the one to hand to nnsight: remotely, nnattr's own
    (`nnattr.remote.backend_for`), which checks the block before sending it.
    """
    from . import remote as ndif

    batch_size = check_batch_size(batch_size)
    on_ndif = ndif.is_remote(remote, backend)
    if on_ndif:
        ndif.prepare(model, backend, remote=remote)
        backend = ndif.backend_for(model, remote, backend)
    size = batch_size or (len(items) if on_ndif else _fits_on_gpu(model, len(items)))
    bar = None
    if size < len(items):
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc=desc, unit="prompt", disable=not show_progress(), leave=False)
    start, queued = 0, 0
    while start < len(items):
        chunk = items[start : start + size]
        try:
            with ndif.errors(model, backend, remote=remote, batch_size=len(chunk)) if on_ndif else nullcontext():
                out = fn(start, chunk, backend)
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


def show_progress() -> bool:
    """Whether to draw progress bars: on a terminal, or in a notebook (a Jupyter kernel's stderr is
    its own stream, never a TTY); not when stderr is piped or captured (CI logs, pytest)."""
    return sys.stderr.isatty() or type(sys.stderr).__module__.startswith("ipykernel")


def check_batch_size(batch_size) -> int | None:
    """``batch_size`` as an int (numpy ints and whole floats such as ``2.0`` too), or a ValueError
    naming it: a positive int, or None for all at once."""
    fix = "give a positive int (prompts per chunk; pairs, for patching), or None for all at once"
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Real):
        raise ValueError(f"batch_size={batch_size!r} is a {type(batch_size).__name__}: {fix}")
    if not float(batch_size).is_integer() or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: {fix}")
    return int(batch_size)


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


__all__ = ["run", "chunks", "check_batch_size", "show_progress"]
