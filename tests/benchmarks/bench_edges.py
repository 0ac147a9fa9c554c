"""Edge attribution patching against node attribution patching: time and peak memory, same process.

A GPT-2-small-sized random model (12 layers, 12 heads, d_model 768, a 2,000-word vocabulary,
float32) on 8 clean/corrupted pairs of 64 tokens. Time: node AtP (`attribution_patching`, its
default node types) and EAP (`edge_attribution_patching`, every edge) interleaved after one
untimed warm-up each, the median of the repeats and the ratio EAP / node AtP; EAP-IG (``--steps``)
against node AtP-IG with the same steps; AtP* on heads and on edges (with GradDrop) against node AtP. Memory: each method in a fresh subprocess, the growth of
the peak resident set over the loaded model (``ru_maxrss``), and the ratio. TransformerLens's EAP
is reported where it runs (in TransformerLens 3.9 ``granularity="edge"`` raises NotImplementedError).

    PYTHONPATH=. python tests/benchmarks/bench_edges.py                 # the issue's setting
    PYTHONPATH=. python tests/benchmarks/bench_edges.py --layers 4 --repeats 2   # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def setup(layers: int, batch: int, tokens: int):
    from nnattr import load
    from tests.benchmarks.bench_recipes import build

    hf, tok = build(layers, 2000)
    model = load(hf, tok)
    g = torch.Generator().manual_seed(0)
    text = lambda: " ".join(f"t{i}" for i in torch.randint(1, 2000, (tokens,), generator=g))  # noqa: E731
    clean, corrupted = [text() for _ in range(batch)], [text() for _ in range(batch)]
    return model, clean, corrupted, ["t5"] * batch, ["t6"] * batch


def calls(model, clean, corrupted, answer, distractor, steps: int):
    from nnattr.recipes import atp_star, attribution_patching, edge_atp_star, edge_attribution_patching

    ig = dict(method="ig", steps=steps)
    return {
        "node AtP": lambda: attribution_patching.run(model, clean, corrupted, answer, distractor),
        "EAP": lambda: edge_attribution_patching.run(model, clean, corrupted, answer, distractor),
        f"node AtP-IG ({steps})": lambda: attribution_patching.run(model, clean, corrupted, answer, distractor, **ig),
        f"EAP-IG ({steps})": lambda: edge_attribution_patching.run(model, clean, corrupted, answer, distractor, **ig),
        "AtP* heads (QK fix)": lambda: atp_star.run(model, clean, corrupted, answer, distractor),
        "AtP* edges (QK fix)": lambda: edge_atp_star.run(model, clean, corrupted, answer, distractor),
        "AtP* edges + GradDrop": lambda: edge_atp_star.run(model, clean, corrupted, answer, distractor, grad_drop=True),
    }


def peak(args, name: str) -> float:
    """MB the peak resident set grows by when ``name`` runs once, in a fresh process."""
    code = (f"import sys, resource, torch; sys.path.insert(0, '.'); torch.set_num_threads(1)\n"
            f"from tests.benchmarks.bench_edges import setup, calls\n"
            f"m, *pairs = setup({args.layers}, {args.batch}, {args.tokens})\n"
            f"fn = calls(m, *pairs, {args.steps})[{name!r}]\n"
            f"before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"fn()\n"
            f"print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def tl_eap() -> str:
    try:
        from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig
    except ImportError:
        return "TransformerLens not importable"
    try:
        EdgeAttributionConfig(granularity="edge")
    except NotImplementedError as error:
        return f"TransformerLens EAP: not implemented ({str(error)[:80]}...)"
    return "TransformerLens EAP: available (not timed here)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # memory first: a child's peak resident set starts at its parent's when it is forked
    memory = {} if args.no_memory else {name: peak(args, name) for name in calls(*[None] * 5, args.steps)}
    fns = calls(*setup(args.layers, args.batch, args.tokens), args.steps)
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for r in range(args.repeats):
        for name in fns if r % 2 == 0 else reversed(list(fns)):
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    names = list(fns)
    print(f"GPT-2-small-sized, {args.layers} layers, {args.batch} pairs x {args.tokens} tokens, "
          f"{args.threads} thread(s), {args.repeats} repeats")
    print("| method | time (s) | time / node | peak growth (MB) | memory / node |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        base = names[0] if "IG" not in name else names[2]
        ratio = f"{memory[name] / memory[base]:.2f}" if memory and memory[base] > 0 else "—"
        mem = f"{memory[name]:,.0f} | {ratio}" if memory else "— | —"
        print(f"| {name} | {median[name]:.2f} | {median[name] / median[base]:.2f} | {mem} |")
    print(tl_eap())
    print(json.dumps({"time": median, "memory_mb": memory}))


if __name__ == "__main__":
    main()
