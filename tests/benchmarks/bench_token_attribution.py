"""Cost of token attribution against plain forwards and backwards on the same model.

Claim (issue 9): integrated gradients with ``m`` steps costs at most ``(m + 1)`` forward-equivalents
plus one backward. The recipe runs the ``m + 1`` points of the path (the baseline and ``m``
points, the last the input itself) as one batch of ``m + 1`` copies of the prompt and takes one
backward through that batch. The bound measured here is exactly that, in plain PyTorch: one
forward of ``m + 1`` copies plus the backward of the same batch (the forward + backward of the
batch minus its forward), so the ratio to it is nnsight's and the kernels' overhead; all times
are also given as multiples of one plain forward of the prompt.

A GPT-2-small-sized random model (12 layers, 12 heads, d_model 768, vocab 50257, float32), one
prompt of 32 tokens, CPU, one torch thread, median of ``--repeats`` runs after one warm-up each.

    PYTHONPATH=. python tests/benchmarks/bench_token_attribution.py
    PYTHONPATH=. python tests/benchmarks/bench_token_attribution.py --layers 2 --steps 4 8 --repeats 3   # quick
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def timed(fns: dict, repeats: int) -> dict:
    """``{name: median seconds}``, the functions run round-robin (one warm-up each first), so a
    neighbour's load on a shared machine falls on all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--steps", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import nnattr
    from nnattr.recipes import token_attribution
    from tests.benchmarks.bench_recipes import build

    hf, tok = build(args.layers, args.vocab)
    model = nnattr.load(hf, tok)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, args.vocab - 1, (1, args.tokens), generator=g)
    prompt = " ".join(f"t{i}" for i in ids[0].tolist())
    target = int(ids[0, -1])
    embed = hf.get_input_embeddings()

    def forward(rows: int = 1):
        with torch.no_grad():
            hf(input_ids=ids.expand(rows, -1)).logits[:, -1, target].sum()

    def forward_backward(rows: int = 1):
        x = embed(ids.expand(rows, -1)).detach().requires_grad_(True)
        logit = hf(inputs_embeds=x).logits[:, -1, target].sum()
        torch.autograd.grad(logit, x)

    def ig(m):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a random model's completeness is not the point here
            token_attribution.run(model, prompt, target, steps=m)

    fns = {"plain forward (1 prompt)": forward, "plain forward + backward": forward_backward,
           "recipe: grad × input": lambda: token_attribution.run(model, prompt, target, method="grad_x_input")}
    for m in args.steps:
        fns |= {f"forward of {m + 1} copies": lambda m=m: forward(m + 1),
                f"forward + backward of {m + 1} copies": lambda m=m: forward_backward(m + 1),
                f"recipe: IG m={m}": lambda m=m: ig(m)}
    t = timed(fns, args.repeats)
    fwd = t["plain forward (1 prompt)"]
    rows = [(name, t[name], None) for name in list(fns)[:3]]
    for m in args.steps:
        # (m + 1) forwards in one batch plus that batch's backward = the batch's forward + backward
        bound = t[f"forward + backward of {m + 1} copies"]
        rows += [(f"forward of {m + 1} copies", t[f"forward of {m + 1} copies"], None),
                 (f"bound m={m}: (m+1) forwards + 1 backward", bound, None),
                 (f"recipe: IG m={m}", t[f"recipe: IG m={m}"], bound)]

    print(f"GPT-2-sized random model: {args.layers} layers, d_model 768, vocab {args.vocab}; 1 prompt x "
          f"{args.tokens} tokens; {args.threads} thread(s); median of {args.repeats}")
    print(f"{'case':44} {'seconds':>9} {'x forward':>10} {'/ bound':>8}")
    for name, seconds, bound in rows:
        ratio = "" if bound is None else f"{seconds / bound:8.2f}"
        print(f"{name:44} {seconds:9.3f} {seconds / fwd:10.1f} {ratio:>8}")


if __name__ == "__main__":
    main()
