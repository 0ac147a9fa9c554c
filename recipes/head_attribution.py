"""Head attribution: gradient x activation on every attention head's output.

For head ``h`` of layer ``l`` with output ``z_h`` (the input of the attention output projection,
split by heads), the score is ``sum_pos grad_z_h(metric) . z_h``: the first-order estimate of
how much the metric would drop if the head's output were zeroed (attribution patching against
a zero baseline; Nanda 2023). Unlike DLA it counts the head's indirect effects through later
layers too. The metric is the last token's logit for ``target`` (default: the model's top
prediction), minus ``distractor``'s when given.

Works on frozen-parameter models (hosted ones): the recipe sets ``requires_grad_`` on the
embedding output inside the trace. Remote: only ``[prompt, layer, head(, position)]`` scores
cross the wire; activations and gradients stay on the server.

    python -m nnattr.recipes.head_attribution --prompt "..." --target " Mary" --distractor " John"
"""

from __future__ import annotations

from typing import Literal, Sequence

import nnsight
import torch

from nnattr.kernels import split_heads  # by name, not the module: docs/remote.md
from nnattr.arch import dims
from nnattr.inputs import Prompts, Token, as_prompts, check_unknown, map_chunks, right_align, token_ids, tokens_of
from nnattr.result import Attribution


def run(
    model,
    prompts: Prompts,
    target: Token | Sequence[Token] | None = None,
    distractor: Token | Sequence[Token] | None = None,
    *,
    by: Literal["head", "head_position"] = "head",
    batch_size: int | None = None,
    remote: bool = False,
    backend=None,
) -> Attribution:
    """Gradient x activation per head: ``[prompt, layer, head]`` (or ``[..., position]``)."""
    if by not in ("head", "head_position"):
        raise ValueError(f"by={by!r}; expected 'head' or 'head_position'")
    d = dims(model)
    prompts = as_prompts(prompts)
    check_unknown(model.tokenizer, prompts)
    targets = token_ids(model.tokenizer, target, len(prompts), role="target")
    distractors = token_ids(model.tokenizer, distractor, len(prompts), role="distractor")
    tokens = [tokens_of(model.tokenizer, p) for p in prompts]
    length = max(map(len, tokens))

    def step(start, chunk):
        stop = start + len(chunk)
        return _trace(
            model, chunk, n_heads=d.n_heads, per_position=by == "head_position", remote=remote, backend=backend,
            target=None if targets is None else torch.tensor(targets[start:stop]),
            distractor=None if distractors is None else torch.tensor(distractors[start:stop]),
        )

    scores, answers, metrics = [], [], []
    for start, chunk, out in map_chunks(step, prompts, batch_size=batch_size, desc="head attribution",
                                        model=model, remote=remote, backend=backend):
        stop = start + len(chunk)
        for s, t in zip(out["scores"], tokens[start:stop]):  # s: [layer, head(, pos)]
            scores.append(s if by == "head" else s[..., -len(t):])
        answers += out["target"].tolist()
        metrics += out["metric"].tolist()

    labels = {"layer": [f"L{i}" for i in range(d.n_layers)], "head": [f"H{h}" for h in range(d.n_heads)]}
    if by == "head_position":
        labels["position"] = [str(p - length) for p in range(length)]
    values = torch.stack(scores) if by == "head" else right_align(scores, length)
    meta = {
        "method": f"head_attribution[{by}]",
        "target": [model.tokenizer.decode([t]) for t in answers],
        "distractor": None if distractors is None else [model.tokenizer.decode([t]) for t in distractors],
        "metric": metrics,
    }
    return Attribution(values, ("prompt",) + tuple(labels), {"prompt": prompts, **labels}, meta,
                       tuple(map(tuple, tokens)))


def _trace(model, prompts, *, n_heads, per_position, target, distractor, remote, backend):
    with model.trace(prompts, remote=remote, backend=backend):
        model.embed.output.requires_grad_(True)  # frozen hosted weights: start the graph here
        z = [layer.attn.o_proj.input for layer in model.layers]  # [batch, pos, head * d_head]
        final = model.output.logits[:, -1].float()
        answer = final.argmax(-1) if target is None else target.to(final.device)
        metric = final.gather(-1, answer[:, None])[:, 0]
        if distractor is not None:
            metric = metric - final.gather(-1, distractor.to(final.device)[:, None])[:, 0]
        scores = []
        with metric.sum().backward(inputs=z):  # activations only: no .grad lands on the weights
            for act in reversed(z):  # gradients arrive in reverse forward order
                per_head = split_heads(act.grad.float() * act.float(), n_heads=n_heads).sum(-1)  # [batch, pos, head]
                scores.append(per_head.transpose(1, 2))  # [batch, head, pos]
        scores = torch.stack(scores[::-1], dim=1).detach()  # [batch, layer, head, pos]
        out = nnsight.save({
            "scores": (scores if per_position else scores.sum(-1)).cpu(),  # only what the result keeps crosses
            "target": answer.cpu(),
            "metric": metric.detach().cpu(),
        })
    return out


def main(argv=None):
    from nnattr.cli import recipe_main

    return recipe_main("head_attribution", argv)


if __name__ == "__main__":
    raise SystemExit(main())
