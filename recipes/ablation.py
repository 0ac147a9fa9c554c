"""Ablation: the metric with a set of nodes knocked out, for many node sets at once.

Nodes as `nnattr.circuits.writers` names them (``embed``, ``L3H1``: its slice of the output projection's input,
``L3 MLP``), ``L3 attn``, ``L3 resid`` (the stream entering layer 3), each at one position with ``@p`` (``L3H1@-1``).
Each set is ablated in its own batch row and the metric read (``target``'s logit, default the unablated top
prediction, minus ``distractor``'s, at the last token). ``zero``: set to 0; ``mean``: to the mean over ``reference``
prompts (default: the prompts), per position aligned at the last token, or over all real positions
(``per_position=False``; Wang et al. 2022); ``resample``: to another reference prompt's values per row, drawn with
``seed`` (Chan et al. 2022). One session: unablated, reference, ablated rows. Wire: metrics.

    python recipes/ablation.py --prompt "..." --target " Mary" --distractor " John" --node-sets "L0H0,L0H2;L1 MLP"
"""

from __future__ import annotations

from typing import Literal, Sequence

import nnsight
import torch

from nnattr import runner
from nnattr.batch import Batch
from nnattr.kernels import (  # kernels by name: they travel to NDIF
    ablate, ablation_forwards, ablation_masks, ablation_node, ablation_nodes, ablation_sets, first, logit_diff,
    reference_mean, resample_draws)
from nnattr.result import Attribution

TITLE, UNITS = "Ablation", "metric with the set ablated"


def trace(model, batch: Batch, *, sets: list, mean: bool, reference: dict | None, per_position: bool,
          draws: torch.Tensor | None, rows: int, metric=None, remote=False, backend=None) -> dict:
    """One session: the unablated rows, the reference rows (mean, resample), then ``rows`` ablated rows a forward."""
    n, width, inputs, a = len(batch), batch.width, batch.inputs, batch.arch
    target, other, last = batch.answer("target"), batch.answer("distractor"), {} if metric else {"logits_to_keep": 1}
    plans = ablation_forwards(sets, inputs, rows, n_heads=a.n_heads, d_head=a.d_head, draws=draws)  # a row: prompt, set
    used, real = ablation_masks(sets, n_heads=a.n_heads, d_head=a.d_head), reference and reference["attention_mask"]
    with model.session(remote=remote, backend=backend):
        value = lambda logits, t, i: metric(logits).float() if metric else logit_diff(  # noqa: E731 [rows: prompts i]
            logits, t[i], None if other is None else other[i])
        node = lambda kind, layer, k: first(getattr(model, kind).output) if layer < 0 else (  # noqa: E731
            model.layers[layer].attn.o_proj.input if kind == "head" else model.layers[layer].input if kind == "resid"
            else first(getattr(model.layers[layer], kind + "_out").output, k))  # a write (OPT's MLP: unflattened)
        with torch.no_grad(), model.trace(inputs, **last):  # unablated: the metric, and the top prediction
            answer = model.output.logits[:, -1].argmax(-1) if target is None else target
            outs = [value(model.output.logits, answer, torch.arange(n)).cpu(), answer.cpu()]
        fill = {}  # per ablated site: its mean [pos or 1, d], or its reference values [reference, width, d]
        if reference is not None:
            with torch.no_grad(), model.trace(reference, **last):
                for kind, layer in used:
                    x = node(kind, layer, len(real))
                    fill[kind, layer] = reference_mean(x, real.bool(), per_position=per_position, width=width) if mean \
                        else x[:, x.shape[1] - width :].clone()  # a copy: Falcon adds into its MLP write in place
        for own, rows_in, batch_masks, pick in plans:
            with torch.no_grad(), model.trace(rows_in, **last):
                for (kind, layer), mask in batch_masks.items():  # in forward order
                    x = node(kind, layer, len(own))
                    if layer < 0:  # an embedding (GPT-2's position embedding may have one row): replaced
                        getattr(model, kind).output = ablate(x, mask, fill.get((kind, layer)), pick)
                    else:
                        x[:] = ablate(x, mask, fill.get((kind, layer)), pick)
                outs.append(value(model.output.logits, answer, own).cpu())
        outs = nnsight.save(outs)
    return {"clean": outs[0], "answer": outs[1], "ablated": torch.cat(outs[2:]).view(n, len(sets))}


def run(model, prompts, target=None, distractor=None, *, node_sets: str | Sequence | None = None,
        ablation: Literal["zero", "mean", "resample"] = "zero", reference: Sequence[str] | None = None,
        per_position: bool = True, metric=None, seed: int = 0, rows: int = 64, batch_size: int | None = None,
        remote=False, backend=None) -> Attribution:
    """The metric with each node set ablated, per prompt: ``[prompt, set]``.

    target: the answer token (default: the model's top prediction without ablation).
    distractor: subtract this token's logit (a logit difference).
    node_sets: sets of nodes, e.g. 'L0H0,L0H2@-1;L1 MLP;L2 resid' (default: every embedding, head and MLP alone).
    ablation: replace by zero, by the mean over the reference prompts, or by one reference prompt's values.
    reference: prompts for mean and resample (default: the prompts themselves).
    per_position: mean per position (aligned at the last token), or over all real positions.
    metric: a function of the logits [rows, pos, vocab] -> [rows], replacing the logit difference.
    seed: the draws of resample ablation.
    rows: ablated rows (prompt x set) per forward pass.
    """
    if ablation not in ("zero", "mean", "resample") or (ablation == "zero" and reference is not None):
        raise ValueError(f"ablation={ablation!r}: expected 'zero' (it takes no reference=), 'mean' or 'resample'")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < low for v, low in ((rows, 1), (seed, 0))):
        raise ValueError(f"rows={rows!r}, seed={seed!r}: give ints, rows >= 1 (rows per forward) and seed >= 0")
    batch = Batch.of(model, prompts, target, distractor)
    nodes = ablation_nodes(batch.arch.n_layers, batch.arch.n_heads, batch.arch.embeddings)
    names = ablation_sets(node_sets, nodes)
    ref = None if ablation == "zero" else Batch.of(model, prompts if reference is None else reference)
    sets = [[ablation_node(name, nodes) for name in s] for s in names]  # (kind, layer, head, position)
    if ref is not None:  # values from the reference prompts at each prompt's positions
        ref.check_reference(batch, ablation=ablation, per_position=per_position,
                            from_start=any(node[3] is not None and node[3] >= 0 for s in sets for node in s))
    draws = resample_draws(len(ref or []), len(batch), len(names), ablation=ablation, seed=seed, own=reference is None)
    options = dict(sets=sets, mean=ablation == "mean", rows=rows,
                   reference=None if ref is None else ref.inputs, per_position=per_position, metric=metric)
    parts = [out for _, _, out in runner.chunks(
        lambda start, chunk, backend: trace(model, chunk, draws=None if draws is None else draws[start:start + len(
            chunk)], **options, remote=remote, backend=backend),
        batch, batch_size=batch_size, desc=TITLE, model=model, remote=remote, backend=backend)]
    out = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    batch.check_answers(out["answer"])  # the model's own top prediction may be the distractor
    per_prompt = {"clean_metric": out["clean"].tolist(), "target": batch.decode(out["answer"]),  # unablated
                  **({} if batch.distractor is None else {"distractor": batch.decode(batch.distractor)}),
                  **({} if draws is None else {"drawn": draws.tolist()})}  # per set: the reference prompt drawn
    meta = {"ablation": ablation, "sets": names, **({} if ref is None else {"n_reference": len(ref)}),
            **{"mean": {"per_position": per_position}, "resample": {"seed": seed}}.get(ablation, {})}
    labels = {"prompt": batch.labels, "set": [" + ".join(s) or "nothing" for s in names]}
    return Attribution(out["ablated"], ("prompt", "set"), labels, method="ablation", by="set", units=UNITS,
                       title=f"{TITLE} ({ablation})", metric="custom metric" if metric else batch.metric(out["answer"]),
                       per_prompt=per_prompt, tokens=batch.tokens, meta=meta)


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
