"""Peak memory of streaming attention rollout against stacking every layer's pattern first.

Three ways to get the same rollout, each in a fresh subprocess:
- ``stream``: generate one layer's pattern, fold it in with ``rollout_step``, drop it;
- ``stack``: keep every layer's pattern in a list (as saved per-layer outputs or Hugging Face's
  ``output_attentions`` tuple give them), ``torch.stack`` them, then ``rollout``;
- ``prealloc``: the cheapest stacking, each layer written straight into one preallocated
  ``[layer, batch, head, query, key]`` tensor, then ``rollout``.

Patterns are causal softmaxes of seeded noise, generated in place, identical in every variant.
On CPU the peak is the child's ``ru_maxrss`` less that of a baseline child that imports the same
modules and runs a tiny rollout; on CUDA it is ``torch.cuda.max_memory_allocated``.

    PYTHONPATH=. python tests/benchmarks/bench_rollout_memory.py            # 24 x 16 heads x 512, batch 8
    PYTHONPATH=. python tests/benchmarks/bench_rollout_memory.py --layers 4 --pos 128   # quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nnattr.kernels.attention import rollout, rollout_step

MIB = 2**20


def make_pattern(layer: int, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out: [batch, head, query, key]`` with layer ``layer``'s causal softmax, in place."""
    out.normal_(generator=torch.Generator(device=out.device).manual_seed(layer))
    query, key = out.shape[-2:]
    future = torch.ones(query, key, dtype=torch.bool, device=out.device).triu(1)  # [query, key]
    out.masked_fill_(future, -torch.inf)
    out.sub_(out.amax(-1, keepdim=True)).exp_()
    return out.div_(out.sum(-1, keepdim=True))


def run_variant(variant: str, layers: int, shape: tuple, device: str) -> torch.Tensor:
    def new(*lead: int) -> torch.Tensor:  # [*lead, batch, head, query, key], uninitialised
        return torch.empty(*lead, *shape, device=device)

    if variant == "baseline":
        return rollout_step(None, make_pattern(0, torch.empty(1, 1, 8, 8, device=device)))
    if variant == "stream":
        state = None
        for layer in range(layers):  # one [batch, head, query, key] alive at a time
            state = rollout_step(state, make_pattern(layer, new()))
        return state
    if variant == "stack":
        return rollout(torch.stack([make_pattern(layer, new()) for layer in range(layers)]))
    if variant == "prealloc":
        patterns = new(layers)  # [layer, batch, head, query, key]
        for layer in range(layers):
            make_pattern(layer, patterns[layer])
        return rollout(patterns)
    raise ValueError(f"unknown variant {variant!r}")


def child(args: argparse.Namespace) -> None:
    """Run one variant and print its peak memory (bytes) and time as JSON."""
    shape = (args.batch, args.heads, args.pos, args.pos)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = run_variant(args.variant, args.layers, shape, args.device)
    seconds = time.perf_counter() - start
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    torch.save(result.cpu(), args.out)
    print(json.dumps({"peak": peak, "seconds": seconds}))


def spawn(args: argparse.Namespace, variant: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--out", str(out)]
    for name in ("layers", "heads", "pos", "batch", "device"):
        cmd += [f"--{name}", str(getattr(args, name))]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--pos", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    layer_bytes = args.batch * args.heads * args.pos * args.pos * 4
    print(f"{args.layers} layers x {args.heads} heads x {args.pos} positions, batch {args.batch}, float32, "
          f"{args.device}: one layer's pattern is {layer_bytes / MIB:.0f} MiB, all of them "
          f"{args.layers * layer_bytes / MIB:.0f} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {v: spawn(args, v, Path(tmp) / f"{v}.pt") for v in ("baseline", "stream", "prealloc", "stack")}
        results = {v: torch.load(Path(tmp) / f"{v}.pt") for v in ("stream", "prealloc", "stack")}
    base = runs["baseline"]["peak"] if args.device == "cpu" else 0
    peak = {v: runs[v]["peak"] - base for v in ("stream", "prealloc", "stack")}
    for v in ("stream", "prealloc", "stack"):
        print(f"  {v:9s} peak {peak[v] / MIB:8.0f} MiB  ({runs[v]['seconds']:.1f} s)")
    for v in ("prealloc", "stack"):
        diff = (results["stream"] - results[v]).abs().max().item()
        print(f"  streaming saves {100 * (1 - peak['stream'] / peak[v]):.1f}% against {v}; max abs diff {diff:.1e}")


if __name__ == "__main__":
    main()
