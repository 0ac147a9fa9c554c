"""Token circulation: where one token's direction lives in the residual stream, layer by layer.

For a target token (default: the model's top prediction at the last position) every residual
of the first ``n_layers`` layers (row ``embed`` enters layer 0, row ``Li`` leaves layer i) is
decoded at every position as the logit lens does (nostalgebraist 2020): the model's own final
norm with that residual's own scale, the unembedding and Gemma-2's soft-cap. A value is the
target's logit there (minus the distractor's); ``per_prompt["rank"]`` is its rank (0 = top).
At full depth the last row is the model's own logit. Each layer's change is split on the
token's direction through the final norm as DLA does (Elhage et al. 2021): ``attn`` and ``mlp``
are the layer's writes dotted with ``centre(w * W_U[t])`` over the new residual's norm scale,
and ``rescale`` is that scale's change applied to the residual already there. The three sum to
the change of the pre-soft-cap lens logit exactly; at the last layer attn and mlp are DLA's.
Replaces Arrakis's ``track_token_circulation``.

Wire: each layer's logits are reduced on the server to the target's logit and rank; a few
floats per layer and position come back, whatever the vocabulary.

    python recipes/token_circulation.py --prompt "When Mary and John went to the store , John gave a drink to"
"""

from __future__ import annotations

import nnsight
import torch

from nnattr import runner
from nnattr.batch import Batch, not_an_int
from nnattr.kernels import (  # kernels by name: they travel to NDIF
    first, logit_direction, norm_scale, position_direct_logit, residual_direction, softcap, token_logit_rank)
from nnattr.result import Attribution

TITLE, UNITS = "Token circulation", "logit-lens logit"


def trace(model, batch: Batch, *, n_layers: int, remote=False, backend=None) -> dict:
    """One forward; every residual decoded at every position, every layer's change split on the token."""
    a, target, other = batch.arch, batch.answer("target"), batch.answer("distractor")
    norm, offset, eps, cap = a.norm, a.norm_weight_offset, a.eps, a.logit_softcap
    inputs = batch.inputs
    with model.session(remote=remote, backend=backend):  # no_grad inside the session: it runs where the model does
        with torch.no_grad(), model.trace(inputs):
            states, writes = [model.layers[0].input], []  # [batch, pos, d_model] each
            for i in range(n_layers):
                layer = model.layers[i]
                rows = len(inputs["input_ids"])  # first(output, rows): OPT's MLP write comes flattened
                writes.append(torch.stack([first(layer.attn_out.output), first(layer.mlp_out.output, rows)]))
                states.append(first(layer.output))
            final = model.output.logits[:, -1].float()  # [batch, vocab]: left-padded, so each prompt's last token
            answer = final.argmax(-1) if target is None else target.to(final.device)
            direction, _ = logit_direction(model.lm_head.weight, answer, other)  # biases: constant over layers
            u = residual_direction(direction, model.ln_f.weight, norm=norm, weight_offset=offset)  # [batch, d_model]
            scales = [norm_scale(h, norm=norm, eps=eps) for h in states]  # [batch, pos]: each residual's own
            logit, rank, split = [], [], []
            for h in states:  # one layer's [batch, pos, vocab] at a time
                value, place = token_logit_rank(softcap(model.lm_head(model.ln_f(h)).float(), cap), answer, other)
                logit.append(value)
                rank.append(place)
            for w, before, s_before, s in zip(writes, states, scales, scales[1:]):
                now = position_direct_logit(torch.cat([w, before[None]]), u, s)  # [attn | mlp | before, batch, pos]
                then = position_direct_logit(before[None], u, s_before)[0]
                split.append(torch.stack([now[0], now[1], now[2] - then]))  # attn, mlp, rescale
            out = nnsight.save({  # [batch, layer(, part), pos]
                "logit": torch.stack(logit, 1).cpu(),
                "rank": torch.stack(rank, 1).int().cpu(),  # int32: any vocabulary
                "split": torch.stack(split, 1).transpose(0, 2).cpu(),
                "target": answer.cpu(),
            })
    return out


def run(model, prompts, target=None, distractor=None, *, n_layers: int | None = None,
        batch_size: int | None = None, remote=False, backend=None) -> Attribution:
    """Token circulation: ``[prompt, layer, position]``, the target's logit-lens logit (see the module doc).

    target: the token to follow (default: the model's top prediction at the last position).
    distractor: follow the target's logit minus this token's (a logit difference).
    n_layers: follow the first n layers (default: all).
    """
    batch = Batch.of(model, prompts, target, distractor)
    total = batch.arch.n_layers
    n_layers = total if n_layers is None else n_layers
    why = not_an_int(n_layers, "number of layers")
    if why or not 1 <= n_layers <= total:
        raise ValueError(f"n_layers={n_layers!r}{why and f' ({why})'}: give how many layers to follow, an int from 1 "
                         f"to {total} (the model's layers), or None for all of them")
    n_layers = int(n_layers)
    out = runner.run(trace, model, batch, n_layers=n_layers, batch_size=batch_size, remote=remote, backend=backend)
    batch.check_answers(out["target"])  # the model's own top prediction may be the distractor
    own = lambda x: [row[..., -n:].tolist() for row, n in zip(x, batch.lengths)]  # noqa: E731  [prompt][layer][pos]
    labels = {"prompt": batch.labels, "layer": ["embed"] + [f"L{i}" for i in range(n_layers)],
              "position": [str(p - batch.width) for p in range(batch.width)]}
    cap = batch.arch.logit_softcap
    parts = {name: own(out["split"][:, :, i]) for i, name in enumerate(("attn", "mlp", "rescale"))}
    return Attribution(
        out["logit"], ("prompt", "layer", "position"), labels, method="token_circulation", title=TITLE,
        units=UNITS, metric=batch.metric(out["target"]), tokens=batch.tokens,
        meta={"n_layers": n_layers, "logit_kind": "soft-capped logit" if cap else "logit",
              "split_of": "the pre-soft-cap lens logit" if cap else "the lens logit"},
        per_prompt={"target": batch.decode(out["target"]), "rank": own(out["rank"]), **parts,
                    **({} if batch.distractor is None else {"distractor": batch.decode(batch.distractor)})},
    )


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
