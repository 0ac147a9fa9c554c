"""Logit lens: decode every layer's residual stream as if it were the last (nostalgebraist 2020).

Each layer's residual goes through the model's own final norm and unembedding (and Gemma-2's
logit soft-cap), so the norm's scale is that residual's own, not the last layer's. Row
``embed`` is the residual entering layer 0; the last row equals the model's output exactly.

Values are the probability of the *expected* token at each cell: the next prompt token at
earlier positions, and ``target`` (default: the model's final top prediction) at the last.
``meta["top_tokens"]`` and ``meta["top_probs"]`` hold the top-k per cell, ``meta["target_rank"]``
the expected token's rank.

Remote: per layer the logits are reduced on the server to top-k and one probability per
position, so a few KB cross the wire whatever the vocabulary.

    python -m nnattr.recipes.logit_lens --prompt "..." --positions all
"""

from __future__ import annotations

from typing import Literal, Sequence

import nnsight
import torch

from nnattr.kernels import first, lens_summary, softcap  # by name, not the module: docs/remote.md
from nnattr.arch import dims
from nnattr.inputs import Prompts, Token, as_prompts, check_unknown, map_chunks, right_align, token_ids, tokens_of
from nnattr.result import Attribution


def run(
    model,
    prompts: Prompts,
    target: Token | Sequence[Token] | None = None,
    *,
    positions: Literal["last", "all"] = "last",
    k: int = 5,
    batch_size: int | None = None,
    remote: bool = False,
    backend=None,
) -> Attribution:
    """Logit lens over ``[prompt, layer, position]`` (``position`` is the last token only, or
    every token with ``positions="all"``)."""
    if positions not in ("last", "all"):
        raise ValueError(f"positions={positions!r}; expected 'last' or 'all'")
    d = dims(model)
    prompts = as_prompts(prompts)
    check_unknown(model.tokenizer, prompts)
    targets = token_ids(model.tokenizer, target, len(prompts), role="target")
    ids = [model.tokenizer(p)["input_ids"] for p in prompts]
    tokens = [tokens_of(model.tokenizer, p) for p in prompts]
    decode = model.tokenizer.convert_ids_to_tokens

    def step(start, chunk):
        rows = ids[start : start + len(chunk)]
        width = max(map(len, rows))
        # The expected token at each position of the left-padded chunk: the next prompt token;
        # the last position's is filled in inside the trace. [batch, pos]
        expected = torch.tensor([[0] * (width - len(r)) + r[1:] + [0] for r in rows])
        last_target = None if targets is None else torch.tensor(targets[start : start + len(chunk)])
        return _trace(model, chunk, expected, last_target, positions=positions, k=k,
                      cap=d.logit_softcap, remote=remote, backend=backend)

    probs, ranks, top_ids, top_probs, answers = [], [], [], [], []
    for start, chunk, out in map_chunks(step, prompts, batch_size=batch_size, desc="logit lens",
                                        model=model, remote=remote, backend=backend):
        rows = ids[start : start + len(chunk)]
        for b, r in enumerate(rows):
            keep = len(r) if positions == "all" else 1
            probs.append(out["prob"][:, b, -keep:])  # [layer, pos]
            ranks.append(out["rank"][:, b, -keep:])
            top_ids.append(out["top_id"][:, b, -keep:].tolist())  # [layer][pos][k] per prompt
            top_probs.append(out["top_prob"][:, b, -keep:].tolist())
        answers += out["target"].tolist()

    width = max(p.shape[-1] for p in probs)
    if positions == "all":
        position_labels = [str(p - width) for p in range(width)]
    else:
        position_labels = ["last"]
    layers = ["embed"] + [f"L{i}" for i in range(d.n_layers)]
    meta = {
        "method": "logit_lens",
        "positions": positions,
        "target": [model.tokenizer.decode([t]) for t in answers],
        "top_tokens": [[[decode(cell) for cell in row] for row in per_layer] for per_layer in top_ids],
        "top_probs": top_probs,
        "target_rank": [r.tolist() for r in ranks],
    }
    return Attribution(
        right_align(probs, width),
        ("prompt", "layer", "position"),
        {"prompt": prompts, "layer": layers, "position": position_labels},
        meta,
        tuple(map(tuple, tokens)),
    )


def _trace(model, prompts, expected, last_target, *, positions, k, cap, remote, backend):
    every = positions == "all"
    with torch.no_grad(), model.trace(prompts, remote=remote, backend=backend):
        states = [model.layers[0].input] + [first(layer.output) for layer in model.layers]
        want = (expected if every else expected[:, -1:]).to(states[0].device)  # [batch, pos]
        cells, last = [], []
        for h in states:
            h = h if every else h[:, -1:]  # [batch, pos, d_model]
            logits = softcap(model.lm_head(model.ln_f(h)).float(), cap)  # [batch, pos, vocab]
            # Reduce each layer at once: only [batch, pos, k] and the last row's logits live on.
            cells.append(lens_summary(logits.flatten(0, 1)[None], want.flatten(), k=k))
            last.append(logits[:, -1])  # [batch, vocab]
        final = model.output.logits[:, -1].float()
        answer = final.argmax(-1) if last_target is None else last_target.to(final.device)
        at_last = lens_summary(torch.stack(last), answer, k=k)  # [layer, batch]
        shape = (len(states),) + tuple(want.shape)  # [layer, batch, pos]
        prob = torch.cat([c["target_prob"] for c in cells]).reshape(shape)
        rank = torch.cat([c["target_rank"] for c in cells]).reshape(shape)
        prob[:, :, -1] = at_last["target_prob"]
        rank[:, :, -1] = at_last["target_rank"]
        out = nnsight.save({
            "prob": prob.detach().cpu(),
            "rank": rank.cpu(),
            "top_id": torch.cat([c["top_id"] for c in cells]).reshape(shape + (k,)).cpu(),
            "target": answer.detach().cpu(),
            "top_prob": torch.cat([c["top_prob"] for c in cells]).reshape(shape + (k,)).detach().cpu(),
        })
    return out


def main(argv=None):
    from nnattr.cli import recipe_main

    return recipe_main("logit_lens", argv)


if __name__ == "__main__":
    raise SystemExit(main())
