"""Train the tuned lens shipped with the embedded ``tiny-ioi`` model.

Run (about 5 minutes on one busy CPU thread; ``lens.json`` records the command, the time and the
held-out KL table):

    python -m nnattr.embedded.train_lens --out nnattr/embedded/tiny-ioi/tuned-lens

The texts are the model's own training mixture (``nnattr.embedded.train``): a quarter IOI prompts
followed by their answer, three quarters induction sequences (a run of 4-24 distinct filler words,
then the same run again), from the training split with ``--seed``. The held-out table uses
``texts(n, seed=HELDOUT_SEED, split="test")``: other name pairs, other runs, another seed.
The objective, optimiser and sampling are `nnattr.lens.TunedLens.train`'s.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from nnattr.embedded import tasks

HELDOUT_SEED, HELDOUT_TEXTS = 1, 512


def texts(n: int, *, seed: int, split: tasks.Split = "train") -> list[str]:
    """``n`` texts of the embedded model's training mixture: every fourth an IOI prompt with its
    answer, the rest induction sequences of 4-24 words repeated; a pure function of its arguments."""
    rng = random.Random(f"tuned-lens {seed} {split}")
    n_ioi = n // 4
    ioi = [p["prompt"] + p["answer"] for p in tasks.ioi_prompts(n_ioi, seed=seed, split=split)]
    runs = [tasks.induction_sequences(1, length=rng.randint(4, 24), seed=rng.randrange(2**31), split=split)[0]
            for _ in range(n - n_ioi)]
    out = []
    for i in range(n):  # interleaved: IOI at every fourth place
        out.append(ioi.pop() if i % 4 == 0 and ioi else runs.pop())
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m nnattr.embedded.train_lens", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder to write lens.safetensors + lens.json to")
    p.add_argument("--model", default="tiny-ioi")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texts", type=int, default=2048, help="training texts")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    import nnattr
    from nnattr.lens import TunedLens, kl_by_layer

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = nnattr.load(args.model)
    started = time.perf_counter()
    lens = TunedLens.train(model, texts(args.texts, seed=args.seed), steps=args.steps, lr=args.lr,
                           batch_size=args.batch_size, seed=args.seed)
    wall = time.perf_counter() - started
    heldout = texts(HELDOUT_TEXTS, seed=HELDOUT_SEED, split="test")
    logit, tuned = kl_by_layer(model, heldout), kl_by_layer(model, heldout, lens)
    command = "python -m nnattr.embedded.train_lens " + " ".join(sys.argv[1:] if argv is None else argv)
    info = {**lens.info, "command": command, "model": args.model, "wall_time_s": round(wall, 1),
            "torch_threads": args.threads, "versions": {"torch": torch.__version__},
            "heldout": {"texts": HELDOUT_TEXTS, "seed": HELDOUT_SEED, "split": "test",
                        "kl_logit_lens": [round(v, 4) for v in logit.tolist()],
                        "kl_tuned_lens": [round(v, 4) for v in tuned.tolist()]}}
    TunedLens(lens.weight, lens.bias, base_model=args.model, source=args.model, info=info).save(args.out)
    print(json.dumps(info["heldout"], indent=1))
    print(f"wrote {args.out} in {wall:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
