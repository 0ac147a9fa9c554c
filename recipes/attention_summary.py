"""Attention summary metrics: one layer's attention in six numbers per prompt (ICLRMetrics seed).

mean_attention and max_attention (the mean and largest weight), attention_entropy and
attention_concentration (each row's entropy in nats and largest share, averaged over heads and
queries), rollout_max and rollout_entropy (the same for attention rollout up to that layer:
Abnar & Zuidema 2020, mean head fusion, ``residual`` default 0.5). Means run over each prompt's
real tokens, so padding changes nothing. On a causal LM mean_attention is 1/n for n tokens and
max_attention is 1.0 (query 0 sees only itself); see docs/methods/attention_summary.md.

Returns ``[prompt, field]`` (``layer_idx="all"``: ``[prompt, layer, field]``); ``fields`` gives the
seed's dict, ``over`` runs a dataset batch by batch. Needs attention probabilities (eager
attention). Wire: six floats per prompt and layer, computed on the server.

    python recipes/attention_summary.py --prompt "..." --layer-idx all
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Literal

import nnsight
import torch

from nnattr import runner
from nnattr.batch import Batch, not_an_int, prompt_groups
from nnattr.kernels import SUMMARY_FIELDS, attention_summary, rollout_step  # by name: they travel to NDIF
from nnattr.result import Attribution

TITLE, UNITS = "Attention summary", "weight; entropies in nats"


def trace(model, batch: Batch, *, layers: list, residual: float, remote=False, backend=None) -> dict:
    """One forward; the rollout is streamed through every layer up to the last one asked."""
    inputs, last = batch.inputs, max(layers)
    key_mask = inputs["attention_mask"].bool()  # [batch, key]
    with model.session(remote=remote, backend=backend):  # no_grad inside the session: it runs where the model does
        with torch.no_grad(), model.trace(inputs):
            mask, state, rows = key_mask.to(model.layers[0].input.device), None, []
            for i in range(last + 1):
                pattern = model.layers[i].attn.output[1]  # [batch, head, query, key]
                state = rollout_step(state, pattern, residual=residual, head_fusion="mean", key_mask=mask)
                if i in layers:
                    rows.append(attention_summary(pattern, state, key_mask=mask))  # [batch, field]
            out = nnsight.save({"summary": torch.stack(rows, dim=1).detach().cpu()})  # [batch, layer, field]
    return out


def run(model, prompts, *, layer_idx: int | Literal["all"] = -1, residual: float = 0.5,
        batch_size: int | None = None, remote=False, backend=None) -> Attribution:
    """Six attention summaries per prompt, ``[prompt, field]`` (``"all"``: ``[prompt, layer, field]``).

    layer_idx: the layer to summarise (negative counts from the end), or all for every layer.
    residual: identity weight mixed into every rollout layer.
    """
    batch, every = Batch.of(model, prompts), isinstance(layer_idx, str) and layer_idx == "all"
    n, why = batch.arch.n_layers, "" if every else not_an_int(layer_idx, "layer")  # numpy ints are ints
    if not every and (why or not -n <= layer_idx < n):
        raise ValueError(f"layer_idx={layer_idx!r}: give a layer from {-n} to {n - 1}, or 'all' "
                         f"(the model has {n} layers{why and '; ' + why})")
    if isinstance(residual, bool) or not isinstance(residual, (int, float)) or not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual={residual!r}: the identity's weight must lie in [0, 1]")
    batch.arch.require_probabilities("attention summary metrics")
    layers = list(range(n)) if every else [int(layer_idx) % n]
    out = runner.run(trace, model, batch, layers=layers, residual=float(residual), batch_size=batch_size,
                     remote=remote, backend=backend)
    labels = {"prompt": batch.labels, **({"layer": [f"L{i}" for i in layers]} if every else {}),
              "field": list(SUMMARY_FIELDS)}
    return Attribution(out["summary"] if every else out["summary"][:, 0], tuple(labels), labels,
                       method="attention_summary", title=TITLE + ("" if every else f" at L{layers[0]}"), units=UNITS,
                       meta={"layer_idx": "all" if every else layers[0], "residual": float(residual),
                             **batch.arch.sink_meta},
                       per_prompt={"seq_length": list(batch.lengths)}, tokens=batch.tokens)


def fields(result: Attribution) -> dict:
    """The seed's dict: each field's mean over the result's prompts (with ``layer_idx="all"`` a list,
    one value per layer), ``batch_size`` (the number of prompts) and ``seq_length`` (the longest
    prompt's token count, the width of a padded batch)."""
    mean = result.mean().values  # [field] or [layer, field]
    summary = {name: mean[..., j].tolist() for j, name in enumerate(result.labels["field"])}
    return {**summary, "batch_size": len(result), "seq_length": max(result.per_prompt["seq_length"])}


def over(model, data: Iterable, *, batch_size: int = 32, **options) -> Attribution:
    """One result over a dataset: ``data`` yields prompts (str, grouped ``batch_size`` at a time) or
    batches (lists or tuples of str, run as given), each run with ``run(model, batch, **options)``
    under a progress bar. ``fields(over(...))`` is the dataset aggregate; ``.mean()``, ``.std()`` work."""
    from tqdm.auto import tqdm

    batch_size = runner.check_batch_size(batch_size)  # None: every loose prompt in one batch
    groups = prompt_groups(data, batch_size)  # one str is one prompt; any other item is refused, named
    bar = tqdm(groups, desc=TITLE, unit="batch", disable=not runner.show_progress())
    parts = [run(model, b, batch_size=batch_size, **options) for b in bar]
    if not parts:
        raise ValueError("over(): data held no prompts")
    return replace(parts[0], values=torch.cat([p.values for p in parts]),
                   labels={**parts[0].labels, "prompt": [x for p in parts for x in p.labels["prompt"]]},
                   per_prompt={"seq_length": [n for p in parts for n in p.per_prompt["seq_length"]]},
                   tokens=[t for p in parts for t in p.tokens])


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
