"""Logit lens: decode every layer's residual stream as if it were the last (nostalgebraist 2020).

Each residual goes through the model's own final norm and unembedding (and Gemma-2's logit
soft-cap), so the norm's scale is that residual's own, not the last layer's. Row ``embed`` is
the residual entering layer 0; the last row equals the model's output exactly. A value is the
probability of the *expected* token: the next prompt token, and at the last position
``target`` (default: the model's own top prediction). ``position`` decodes one position per
prompt instead of all (``target`` is then expected there). ``per_prompt`` holds each cell's
top-k tokens and probabilities and the expected token's rank. With ``lens`` (a tuned lens,
Belrose et al. 2023) each layer's residual first goes through its translator ``h + A_l h + b_l``.

Wire: each layer's logits are reduced on the server to top-k ids and probabilities and one
probability and rank per position, so a few KB come back whatever the vocabulary. A tuned
lens's translators (``n_layers x d_model^2`` floats) travel with the request.

    python recipes/logit_lens.py --prompt "When Mary and John went to the store, John gave a drink to"
"""

from __future__ import annotations

import numbers
from typing import Literal, Sequence

import nnsight
import torch

from nnattr import runner
from nnattr.batch import Batch
from nnattr.kernels import first, lens_summary, read_at, softcap, translate  # by name: they travel to NDIF
from nnattr.result import Attribution

TITLE, UNITS = "Logit lens", "probability of the expected token"


def trace(model, batch: Batch, *, positions: str, k: int, lens=None, remote=False, backend=None) -> dict:
    """One forward; every layer's residual decoded at the read position (the last) or at all of them.
    lens: None, or a tuned lens's ``(weight [layer, d_model, d_model], bias [layer, d_model])``."""
    cap, at, one = batch.arch.logit_softcap, batch.columns, positions == "last"
    inputs = batch.inputs
    expected = inputs["input_ids"].roll(-1, dims=1)  # [batch, pos]: each position's next token
    default = torch.where(at == batch.width - 1, -1, read_at(expected, at))  # -1: the model's top prediction
    target = default if batch.target is None else batch.answer("target")  # expected at the read position
    with model.session(remote=remote, backend=backend):  # no_grad inside the session: it runs where the model does
        with torch.no_grad(), model.trace(inputs):
            states = [model.layers[0].input] + [first(layer.output) for layer in model.layers]
            final = read_at(model.output.logits, at).float()  # [batch, vocab]
            answer = torch.where(target.to(final.device) < 0, final.argmax(-1), target.to(final.device))
            want = answer[:, None] if one else torch.cat([expected[:, :-1].to(final.device), answer[:, None]], 1)
            cells = []
            for i, h in enumerate(states):  # [batch, pos, d_model]; reduced at once: no [layer, pos, vocab] lives on
                h = read_at(h, at)[:, None] if one else h
                h = h if lens is None or i == len(states) - 1 else translate(h, lens[0][i], lens[1][i])
                logits = softcap(model.lm_head(model.ln_f(h)).float(), cap)  # [batch, pos, vocab]
                cells.append(lens_summary(logits.flatten(0, 1)[None], want.flatten(), k=k))
            cell = {key: torch.cat([c[key] for c in cells]).unflatten(1, want.shape) for key in cells[0]}
            out = nnsight.save({  # [batch, layer, pos(, k)]
                "prob": cell["target_prob"].transpose(0, 1).detach().cpu(),
                "rank": cell["target_rank"].transpose(0, 1).cpu(),
                "top_id": cell["top_id"].transpose(0, 1).cpu(),
                "top_prob": cell["top_prob"].transpose(0, 1).detach().cpu(),
                "target": answer.cpu(),
            })
    return out


def run(model, prompts, target=None, *, positions: Literal["all", "last"] | None = None,
        position: int | Sequence[int] | None = None, k: int = 5, lens: str | None = None,
        batch_size: int | None = None, remote=False, backend=None) -> Attribution:
    """Logit lens: ``[prompt, layer, position]`` (one position: ``[prompt, layer]``).

    target: the token expected at the last (or read) position (default: the model's top prediction).
    positions: decode every position ("all") or the last one only ("last"); unset (None): all, or only position.
    position: decode only this one: -1 the last, 0 the first; one per prompt, or one for all.
    k: top tokens kept per cell.
    lens: "tuned" (the tuned lens shipped with the model), a saved lens's folder, or a nnattr.lens.TunedLens.
    """
    if position is not None and positions == "all":
        raise ValueError(f"positions='all' and position={position!r} ask for different things: position decodes one "
                         f"position per prompt, positions='all' decodes every one; pass only one of them")
    positions = "last" if position is not None else "all" if positions is None else positions
    batch = Batch.of(model, prompts, target).at(position)
    if positions not in ("all", "last"):
        raise ValueError(f"positions={positions!r}: expected 'all' (decode every position) or 'last'")
    vocab = batch.arch.d_vocab  # k: numpy ints and whole floats (2.0) are fine
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not float(k).is_integer() or not 1 <= k <= vocab:
        raise ValueError(f"k={k!r} ({type(k).__name__}): give the number of top tokens kept per cell, an int from 1 "
                         f"to {vocab} (the vocabulary)")
    k = int(k)
    if lens is not None:  # checked against the model; only its two tensors enter the trace
        from nnattr.lens import resolve

        lens = resolve(model, lens)
    out = runner.run(trace, model, batch, positions=positions, k=k, lens=lens and (lens.weight, lens.bias),
                     batch_size=batch_size, remote=remote, backend=backend)
    keep = batch.lengths if positions == "all" else (1,) * len(batch)  # each prompt's own positions
    own = lambda x: [row[:, -n:].tolist() for row, n in zip(x, keep)]  # noqa: E731  [prompt][layer][pos]...
    labels = {"prompt": batch.labels, "layer": ["embed"] + [f"L{i}" for i in range(batch.arch.n_layers)]}
    values, dims = out["prob"], ("prompt", "layer", "position")
    if positions == "all":
        labels["position"] = [str(p - batch.width) for p in range(batch.width)]
    else:
        values, dims = values[..., -1], ("prompt", "layer")
    top = [[[batch.decode(cell) for cell in row] for row in prompt] for prompt in own(out["top_id"])]
    return Attribution(
        values, dims, labels, method="logit_lens", title=TITLE if lens is None else "Tuned lens", units=UNITS,
        metric="P(expected token)", meta={"positions": positions, "k": k, "read_at": batch.read_at,
                                          **({"lens": lens.to_dict()} if lens else {})}, tokens=batch.tokens,
        per_prompt={"target": batch.decode(out["target"]), "top_tokens": top, "top_probs": own(out["top_prob"]),
                    "target_rank": own(out["rank"]), "position": list(batch.positions),
                    "read_token": list(batch.read_tokens)},
    )


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
