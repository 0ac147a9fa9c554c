"""Edges between components, and the results of edge attribution patching.

A writer puts a vector into the residual stream: an embedding (``embed``, ``pos_embed``), a head
(``L3H1``: its slice of the output projection), an MLP (``L3 MLP``). A reader takes a copy of the
stream downstream: a head's query (``L4H1 q``), a kv head's key or value (``L4H0 k``, ``L4H0 v``;
``L4KV0 k`` where heads share kv heads), an MLP (``L4 MLP``), the logits (``logits``). An edge
runs from a writer to every reader of a later layer, and from a layer's heads to its own MLP
when the block is sequential. Results are ``[prompt, writer, reader]``, NaN where no edge runs.
"""

from __future__ import annotations

import torch

from .arch import Arch
from .pairs import Pairs
from .result import Attribution


def writers(a: Arch) -> list[str]:
    """The embeddings, then per layer its heads and its MLP, in the order of the score's writer axis."""
    return [*a.embeddings, *[w for i in range(a.n_layers) for w in [*(f"L{i}H{h}" for h in range(a.n_heads)),
                                                                     f"L{i} MLP"]]]


def readers(a: Arch) -> list[str]:
    """Per layer its query heads, its kv heads' keys, then their values, and its MLP; then the logits."""
    kv = "H" if a.n_kv_heads == a.n_heads else "KV"
    per_layer = lambda i: [*(f"L{i}H{h} q" for h in range(a.n_heads)),  # noqa: E731
                           *(f"L{i}{kv}{h} {s}" for s in "kv" for h in range(a.n_kv_heads)), f"L{i} MLP"]
    return [r for i in range(a.n_layers) for r in per_layer(i)] + ["logits"]


def edge_result(p: Pairs, out: dict, *, method: str, steps: int, top_k: int | None, title: str,
                units: str) -> Attribution:
    """The ``[prompt, writer, reader]`` result of `recipes.edge_attribution_patching`'s trace output:
    ``out["scores"]``: the scores, or with ``top_k`` each pair's largest values, at ``out["index"]`` ``[pair, k, 2]``
    (the rest NaN)."""
    a, metric = p.arch, out["metric"]  # [pair, clean / corrupted]
    p.check_metrics(metric.T, recovery=False)
    labels = {"prompt": list(p.clean.labels), "writer": writers(a), "reader": readers(a)}
    scores = out["scores"]
    if top_k:  # each pair's (values, [k, 2] indices)
        scores = torch.full((len(p), len(labels["writer"]), len(labels["reader"])), float("nan"))
        for i, (values, index) in enumerate(zip(out["scores"], out["index"])):
            scores[i, index[:, 0], index[:, 1]] = values
    meta = {"method": method, **({"steps": steps} if steps else {}), **({"top_k": top_k} if top_k else {})}
    if not a.head_exact:
        meta["heads"] = (f"{a.family}'s heads pass a norm after attention: their changes are taken through its scale "
                         f"measured on the corrupted run and frozen, so a layer's head edges sum to its attention "
                         f"write's edge only to first order")
    per_prompt = {"clean_metric": metric[:, 0].tolist(), "corrupted_metric": metric[:, 1].tolist()}
    for role in ("target", "distractor"):
        if getattr(p.clean, role) is not None:
            per_prompt["answer" if role == "target" else role] = p.clean.decode(getattr(p.clean, role))
    return Attribution(scores, ("prompt", "writer", "reader"), labels, method="edge_attribution_patching", by="edge",
                       units=units, title=title, meta=meta, per_prompt=per_prompt, tokens=p.corrupted.tokens,
                       metric=p.clean.metric() if p.metric is None else "custom metric")
