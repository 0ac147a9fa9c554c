"""Wall time of ``token_circulation`` against plain PyTorch hooks computing the same numbers, and the
all-positions logit lens (the same decoding work, without the split).

The model is a GPT-2-small-sized random model from ``bench_recipes.build`` (12 layers, d_model 768,
vocabulary 50257, float32), run on 8 prompts of 64 tokens. The hooks version records every
residual and every attention and MLP write with ``register_forward_hook``. It decodes one layer's
``[batch, pos, vocab]`` at a time, like the recipe, and does the split with plain float32 torch.
The three variants are interleaved after one untimed warm-up each; the median of the repeats is
reported, and the largest difference between the recipe and the hooks is checked once.

    PYTHONPATH=. python tests/benchmarks/bench_circulation.py
    PYTHONPATH=. python tests/benchmarks/bench_circulation.py --layers 2 --vocab 2000 --repeats 3   # quick
"""

from __future__ import annotations

import argparse
import statistics

import torch

from tests.benchmarks.bench_recipes import build, timed


def hooks(hf, input_ids, target: int) -> dict[str, torch.Tensor]:
    """``logit``, ``rank`` ``[batch, layer + 1, pos]`` and ``split`` ``[batch, layer, 3, pos]`` by hooks."""
    from tests.support import reference as ref

    nat, n = ref.native(hf), len(ref.blocks(hf))
    norm, unembed = hf.get_submodule(nat.final_norm), hf.get_submodule(nat.unembed)
    outputs = {f"h{i}": f"{nat.blocks}.{i}" for i in range(n)}
    outputs |= {f"a{i}": f"{nat.blocks}.{i}.{nat.attn_write}" for i in range(n)}
    outputs |= {f"m{i}": f"{nat.blocks}.{i}.{nat.mlp_write}" for i in range(n)}
    with torch.no_grad(), ref.recording(hf, outputs, {"h_in": f"{nat.blocks}.0"}) as seen:
        ref.forward(hf, input_ids)
        states = [seen["h_in"]] + [seen[f"h{i}"] for i in range(n)]  # [batch, pos, d_model]
        u = unembed.weight[target] * norm.weight  # LayerNorm: centre(w * W_U[t])
        u = u - u.mean()
        scale = [(h.var(-1, unbiased=False) + norm.eps).sqrt() for h in states]  # [batch, pos]
        logit, rank = [], []
        for h in states:
            logits = unembed(norm(h)).float()  # one layer's [batch, pos, vocab] at a time
            value = logits[..., target]
            logit.append(value)
            rank.append((logits > value[..., None]).sum(-1))
        split = [torch.stack([seen[f"a{i}"] @ u / scale[i + 1], seen[f"m{i}"] @ u / scale[i + 1],
                              states[i] @ u / scale[i + 1] - states[i] @ u / scale[i]], 1) for i in range(n)]
    return {"logit": torch.stack(logit, 1), "rank": torch.stack(rank, 1), "split": torch.stack(split, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import nnattr
    from nnattr.recipes import logit_lens, token_circulation

    hf, tok = build(args.layers, args.vocab)
    model = nnattr.load(hf, tok)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, args.vocab - 1, (args.batch, args.pos), generator=g)
    prompts = [" ".join(f"t{i}" for i in row) for row in input_ids.tolist()]
    target = 7
    variants = {
        "token_circulation": lambda: token_circulation.run(model, prompts, target),
        "hooks (same numbers)": lambda: hooks(hf, input_ids, target),
        "logit_lens (all positions)": lambda: logit_lens.run(model, prompts, target, positions="all"),
    }
    mine, ref = variants["token_circulation"](), variants["hooks (same numbers)"]()
    split = torch.tensor([[mine.per_prompt[k][b] for k in ("attn", "mlp", "rescale")] for b in range(args.batch)])
    diff = max((mine.values - ref["logit"]).abs().max().item(),
               (split.transpose(1, 2) - ref["split"]).abs().max().item())  # [batch, layer, part, pos]
    ranks = (torch.tensor(mine.per_prompt["rank"]) != ref["rank"]).sum().item()
    variants["logit_lens (all positions)"]()
    times = {name: [] for name in variants}
    for r in range(args.repeats):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            times[name].append(timed(variants[name]))
    base = statistics.median(times["hooks (same numbers)"])
    print(f"{args.layers} layers, vocab {args.vocab}, {args.batch} x {args.pos} tokens, {args.threads} thread(s), "
          f"median of {args.repeats}; recipe vs hooks: max |diff| {diff:.1e}, {ranks} ranks differ")
    print("| variant | seconds | ratio to hooks |\n|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.3f} | {statistics.median(t) / base:.2f} |")


if __name__ == "__main__":
    main()
