"""Head attribution: gradient x activation on every attention head's output.

For head ``h`` of layer ``l`` with output ``z_h`` (the input of the attention output projection,
split by heads), the score is ``sum_pos grad_z_h(metric) . z_h``: the first-order estimate of
how much the metric would drop if the head's output were zeroed (attribution patching against
a zero baseline; Nanda 2023). Unlike DLA it counts the head's indirect effects through later
layers too. The metric is the logit for ``target`` (default: the model's top prediction) at the
last token or at ``position``, minus ``distractor``'s when given.

Works on frozen-parameter (hosted) models: the trace starts the graph at the embedding output.
``layers`` keeps some layers' heads: only their outputs are saved and differentiated.
Wire: only ``[prompt, layer, head(, position)]`` scores come back.

    python recipes/head_attribution.py --prompt "..." --target " Mary" --distractor " John"
"""

from __future__ import annotations

from typing import Literal, Sequence

import nnsight
import torch

from nnattr import runner
from nnattr.batch import Batch
from nnattr.kernels import gradients, read_at, split_heads  # kernels by name: they travel to NDIF
from nnattr.result import Attribution

TITLE, UNITS = "Head attribution (gradient × activation)", "first-order effect (logits)"


def trace(model, batch: Batch, *, by: str, layers: list, remote=False, backend=None) -> dict:
    """One forward and one backward to the outputs of ``layers``' heads only (no gradient lands on weights)."""
    n_heads, target, other, at = batch.arch.n_heads, batch.answer("target"), batch.answer("distractor"), batch.columns
    with model.trace(batch.inputs, remote=remote, backend=backend):
        model.embed.output.requires_grad_(True)  # frozen hosted weights: start the graph here
        z = [model.layers[i].attn.o_proj.input for i in layers]  # [batch, pos, head * d_head], in layer order
        final = read_at(model.output.logits, at).float()  # [batch, vocab] at the read position
        answer = final.argmax(-1) if target is None else target.to(final.device)
        metric = final.gather(-1, answer[:, None])[:, 0]
        if other is not None:
            metric = metric - final.gather(-1, other.to(final.device)[:, None])[:, 0]
        grads = gradients(metric.sum(), z)  # d metric / d z, for every kept layer at once
        scores = torch.stack([split_heads(g.float() * act.float(), n_heads=n_heads).sum(-1)  # [batch, pos, head]
                              for g, act in zip(grads, z)], dim=1).transpose(2, 3)  # [batch, kept layer, head, pos]
        out = nnsight.save({
            "scores": (scores if by == "head_position" else scores.sum(-1)).detach().cpu(),
            "target": answer.cpu(),
            "metric": metric.detach().cpu(),
        })
    return out


def run(model, prompts, target=None, distractor=None, *, by: Literal["head", "head_position"] = "head",
        layers: Sequence[int] | None = None, position: int | Sequence[int] = -1, batch_size: int | None = None,
        remote=False, backend=None) -> Attribution:
    """Gradient x activation per head: ``[prompt, layer, head]`` (or ``[..., position]``).

    target: the answer token (default: the model's top prediction).
    distractor: subtract this token's logit (a logit difference).
    by: per head, or per head and position.
    layers: only these layers' heads (default all; -1 the last).
    position: the token whose logit is the metric: -1 the last, 0 the first; one per prompt, or one for all.
    """
    if by not in ("head", "head_position"):
        raise ValueError(f"by={by!r}; expected 'head' or 'head_position'")
    batch = Batch.of(model, prompts, target, distractor).at(position)
    kept = batch.arch.pick(layers)  # layer indices, in order; every layer by default
    out = runner.run(trace, model, batch, by=by, layers=kept, batch_size=batch_size, remote=remote, backend=backend)
    batch.check_answers(out["target"])  # the model's own top prediction may be the distractor
    a = batch.arch
    labels = {"prompt": batch.labels, "layer": [f"L{i}" for i in kept],
              "head": [f"H{h}" for h in range(a.n_heads)]}
    if by == "head_position":
        labels["position"] = [str(p - batch.width) for p in range(batch.width)]
    per_prompt = {"target": batch.decode(out["target"]), "metric": out["metric"].tolist(),
                  "position": list(batch.positions), "read_token": list(batch.read_tokens)}
    if batch.distractor is not None:
        per_prompt["distractor"] = batch.decode(batch.distractor)
    return Attribution(out["scores"], tuple(labels), labels, method="head_attribution",
                       title=TITLE + " by head and position" * (by == "head_position"), by=by,
                       units=UNITS, metric=batch.metric(out["target"]), per_prompt=per_prompt, tokens=batch.tokens,
                       meta={"read_at": batch.read_at, **({} if layers is None else {"layers": kept})})


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
