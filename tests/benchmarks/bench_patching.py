"""Wall time of attribution patching against exact activation patching, all 144 heads of a
GPT-2-small-sized model (12 layers x 12 heads, d_model 768, vocabulary 50257; random weights
built from the config, frozen as on a hosted model).

Timed in one process, the best of ``--repeat`` interleaved rounds (exact patching:
``--exact-repeat``; unbatched: once), in wall-clock and process CPU time (the CPU figures are
steadier on a shared machine), as multiples of a baseline: one plain Hugging Face forward pass
(no gradients) over the same clean and corrupted rows:
- ``atp``: ``recipes/attribution_patching`` for the heads (2 forward rows + 1 backward per pair);
- ``atp_hooks``: the same scores with plain PyTorch forward hooks and autograd (no nnsight);
- ``ig_steps5``: the recipe with ``method="ig", steps=5``;
- ``exact_batched``: ``recipes/activation_patching`` with ``rows=144``: each forward holds one
  layer's patched rows (12 heads x pairs), restarted at that layer;
- ``exact_unbatched``: the same with ``rows=1``: one forward per head and pair.

    PYTHONPATH=. python tests/benchmarks/bench_patching.py                 # 2 pairs of 16 tokens
    PYTHONPATH=. python tests/benchmarks/bench_patching.py --pairs 1 --unbatched-pairs 1   # quick
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, GPT2Config

import nnattr
from nnattr.recipes import activation_patching, attribution_patching
from tests.support import tiny


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def best_interleaved(repeat: int, fns: dict) -> dict[str, tuple[float, float]]:
    """The best wall and CPU time of ``repeat`` rounds, each round running every function once
    (a shared machine's load then hits them all alike)."""
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            wall, cpu = timed(fn)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def hooks_atp_heads(hf, enc, n: int, answer: torch.Tensor, distractor: torch.Tensor) -> torch.Tensor:
    """AtP of every head with forward hooks: ``[n, layer, head]``."""
    z = []

    def keep(module, args):
        args[0].retain_grad()
        z.append(args[0])

    hooks = [hf.transformer.wte.register_forward_hook(lambda m, a, out: out.requires_grad_(True))]
    hooks += [block.attn.c_proj.register_forward_pre_hook(keep) for block in hf.transformer.h]
    try:
        logits = hf(**enc).logits[n:, -1].float()
    finally:
        for h in hooks:
            h.remove()
    rows = torch.arange(n)
    (logits[rows, answer] - logits[rows, distractor]).sum().backward()
    heads = hf.config.n_head
    scores = [(t.grad[n:] * (t[:n] - t[n:])).detach().unflatten(-1, (heads, -1)).sum((1, 3)) for t in z]
    return torch.stack(scores, 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--unbatched-pairs", type=int, default=1, help="pairs for the slow unbatched run")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--exact-repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval().requires_grad_(False)
    tok = tiny.tokenizer()
    model = nnattr.load(hf, tok)
    clean = tiny.prompts(args.pairs, lengths=(args.tokens,))
    corrupted = tiny.prompts(args.pairs, seed=1, lengths=(args.tokens,))
    answer, distractor = ["w5"] * args.pairs, ["w9"] * args.pairs
    enc = tok(clean + corrupted, return_tensors="pt", padding=True)
    ids = lambda words: torch.tensor(tok.convert_tokens_to_ids(words))  # noqa: E731
    heads = ("head",)

    def baseline():
        with torch.no_grad():
            hf(**enc)

    def atp():
        return attribution_patching.run(model, clean, corrupted, answer, distractor, nodes=heads)

    def hooks():
        return hooks_atp_heads(hf, enc, args.pairs, ids(answer), ids(distractor))

    # the two implementations agree before anything is timed
    torch.testing.assert_close(atp()["head"].values, hooks().flatten(1), atol=1e-4, rtol=1e-4)
    u = args.unbatched_pairs
    times = best_interleaved(args.repeat, {
        "baseline_forward": baseline,
        "atp": atp,
        "atp_hooks": hooks,
        "ig_steps5": lambda: attribution_patching.run(model, clean, corrupted, answer, distractor, nodes=heads,
                                                      method="ig", steps=5),
    })
    times.update(best_interleaved(args.exact_repeat, {"exact_batched": lambda: activation_patching.run(
        model, clean, corrupted, answer, distractor, nodes=heads, rows=144)}))
    unbatched = timed(lambda: activation_patching.run(
        model, clean[:u], corrupted[:u], answer[:u], distractor[:u], nodes=heads, rows=1))
    times["exact_unbatched"] = tuple(t * args.pairs / u for t in unbatched)
    report = {
        "setup": {**vars(args), "torch_threads": torch.get_num_threads(), "device": "cpu",
                  "note": f"exact_unbatched timed on {u} pair(s) and scaled to {args.pairs}"},
    }
    for clock, c in (("wall", 0), ("cpu", 1)):
        t = {name: v[c] for name, v in times.items()}
        report[clock] = {
            "seconds": {name: round(v, 3) for name, v in t.items()},
            "forward_equivalents": {name: round(v / t["baseline_forward"], 2) for name, v in t.items()},
            "exact_batched / atp": round(t["exact_batched"] / t["atp"], 1),
            "exact_unbatched / atp": round(t["exact_unbatched"] / t["atp"], 1),
            "atp nnsight / hooks": round(t["atp"] / t["atp_hooks"], 2),
        }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
