"""Train the shipped SAE of ``tiny-ioi``: 512 ReLU features on the residual stream entering layer 2.

Run (a few minutes on one CPU thread; ``training.json`` records the time and the figures):

    python -m nnattr.embedded.train_sae --out nnattr/embedded/tiny-ioi-sae

Data: the residual stream entering layer 2 (``blocks.2.hook_resid_pre``) of ``tiny-ioi`` at every
token but ``<bos>`` (its activation is the same in every prompt and far larger than the rest) of
training-split IOI prompts with their answer, and induction sequences (runs of 4-24 words
repeated), both from `nnattr.embedded.tasks` with fixed seeds. Held-out figures use the test split.

SAE: ``a = relu((x - b_dec) W_enc + b_enc)``, ``x_hat = a W_dec + b_dec`` (Bricken et al. 2023),
loss ``|x - x_hat|^2 + l1 * sum_f a_f``, decoder rows kept at unit norm after every step, ``b_dec``
started at the data mean, ``W_enc`` at ``W_dec^T``. Adam, seeded; deterministic for a given
seed and thread count. Writes the SAELens layout (`nnattr.features.SAE.save`) and
``training.json``: hyperparameters, wall time, and held-out MSE, fraction of variance explained,
L0, dead features, and the IOI logit difference and next-token loss with the reconstruction
spliced into the forward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import time

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, GPT2LMHeadModel

from nnattr.embedded import path, tasks
from nnattr.features import SAE, reconstruction

LAYER = 2


def texts(n_ioi: int, n_induction: int, *, seed: int, split: str) -> list[str]:
    """IOI prompts followed by their answer, and induction sequences of 4-24 words repeated."""
    ioi = [p["prompt"] + p["answer"] for p in tasks.ioi_prompts(n_ioi, seed=seed, split=split)]
    runs = [s for i in range(n_induction) for s in
            tasks.induction_sequences(1, length=4 + (i * 7) % 21, seed=seed * 100_003 + i, split=split)]
    return ioi + runs


def _encode(tokenizer, batch: list[str]) -> dict:
    enc = tokenizer(batch, return_tensors="pt", padding=True)
    enc["position_ids"] = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as nnsight counts them
    return enc


@contextlib.contextmanager
def at_site(model, fn):
    """Run ``fn(hidden_states)`` on the residual stream entering layer ``LAYER``; its return, if a
    tensor, replaces it."""
    def hook(module, args, kwargs):
        new = fn(args[0] if args else kwargs["hidden_states"])
        if new is None:
            return None
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    handle = model.transformer.h[LAYER].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def activations(model, tokenizer, data: list[str], *, batch_size: int = 256) -> torch.Tensor:
    """``[tokens, d_model]``: the site's activation at every real token but ``<bos>``."""
    rows = []
    for i in range(0, len(data), batch_size):
        enc, seen = _encode(tokenizer, data[i : i + batch_size]), []
        with at_site(model, seen.append):
            model(**enc)
        keep = enc["attention_mask"].bool() & (enc["input_ids"] != tokenizer.bos_token_id)
        rows.append(seen[0][keep])
    return torch.cat(rows)


def train(x: torch.Tensor, *, features: int, l1: float, steps: int, batch: int, lr: float, seed: int) -> SAE:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    W_dec = torch.randn(features, x.shape[1], generator=g)
    W_dec = (W_dec / W_dec.norm(dim=-1, keepdim=True)).requires_grad_(True)
    W_enc = W_dec.detach().T.clone().requires_grad_(True)
    b_enc = torch.zeros(features, requires_grad=True)
    b_dec = x.mean(0).clone().requires_grad_(True)
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        xb = x[torch.randint(len(x), (batch,), generator=g)]
        a = F.relu((xb - b_dec) @ W_enc + b_enc)
        loss = (a @ W_dec + b_dec - xb).pow(2).sum(-1).mean() + l1 * a.sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
    return SAE(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, layer=LAYER, site="resid_pre")


@torch.no_grad()
def spliced(model, tokenizer, sae: SAE, *, n: int = 512, seed: int = 0) -> dict[str, float]:
    """Held-out IOI logit difference and next-token loss, as the model runs and with the SAE's
    reconstruction replacing the site (every position but ``<bos>``), and with the site mean-ablated."""
    ioi = tasks.ioi_prompts(n, seed=seed, split="test")
    enc = _encode(tokenizer, [p["prompt"] for p in ioi])
    answer = tokenizer([p["answer"] for p in ioi], add_special_tokens=False)["input_ids"]
    other = tokenizer([p["distractor"] for p in ioi], add_special_tokens=False)["input_ids"]
    answer, other = torch.tensor(answer)[:, 0], torch.tensor(other)[:, 0]
    runs = _encode(tokenizer, texts(0, n, seed=seed, split="test"))
    keep = lambda enc: (enc["input_ids"] != tokenizer.bos_token_id)[..., None]  # noqa: E731
    mean = activations(model, tokenizer, texts(n, n, seed=seed, split="test")).mean(0)
    out = {}
    fns = {"clean": lambda x: None, "spliced": lambda x: torch.where(keep(current), sae.decode(sae.encode(x)), x),
           "mean_ablated": lambda x: torch.where(keep(current), mean.expand_as(x), x)}
    for name, fn in fns.items():
        with at_site(model, fn):
            current = enc
            logits = model(**enc).logits[:, -1]
            out[f"ioi_logit_diff_{name}"] = (logits.gather(1, answer[:, None]) -
                                             logits.gather(1, other[:, None])).mean().item()
            current = runs
            logits = model(**runs).logits[:, :-1]
            target = runs["input_ids"][:, 1:].masked_fill(~runs["attention_mask"][:, 1:].bool(), -100)
            out[f"induction_ce_{name}"] = F.cross_entropy(logits.flatten(0, 1), target.flatten()).item()
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", type=int, default=512)
    p.add_argument("--l1", type=float, default=8.0)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it; default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    model = GPT2LMHeadModel.from_pretrained(path("tiny-ioi")).eval()
    tokenizer = AutoTokenizer.from_pretrained(path("tiny-ioi"))
    x = activations(model, tokenizer, texts(6000, 3000, seed=args.seed, split="train"))
    sae = train(x, features=args.features, l1=args.l1, steps=args.steps, batch=args.batch, lr=args.lr,
                seed=args.seed)
    held_out = activations(model, tokenizer, texts(512, 512, seed=args.seed + 1, split="test"))
    report = {"seed": args.seed, "site": sae.hook_name, "hyperparameters": {k: v for k, v in vars(args).items()
                                                                           if k not in ("out", "seed", "threads")},
              "train_tokens": len(x), "held_out_tokens": len(held_out), "torch_threads": torch.get_num_threads(),
              "held_out": {**reconstruction(sae, held_out), **spliced(model, tokenizer, sae, seed=args.seed + 1)}}
    report["wall_seconds"] = round(time.time() - start, 1)
    sae.save(args.out)
    (args.out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
