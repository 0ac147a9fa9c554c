"""Attribution patching: the gradient estimate of activation patching, for every node at once.

Nanda 2023; Syed et al. 2023. For clean/corrupted pairs and a metric ``m`` (default: logit of
``answer`` minus ``distractor`` at the last position), the effect of patching node ``a`` from
the clean run into the corrupted run is estimated as ``grad_a m(corrupted) . (a_clean -
a_corrupted)``: two forward rows and one backward for every node of every pair. With
``method="ig"`` the gradient is averaged over ``steps`` points between the corrupted and clean
input embeddings (EAP-IG, Hanna et al. 2024), at ``steps`` more rows per pair.

Node types (``nodes=``): ``resid`` (layer input, per position), ``attn`` / ``mlp`` (each
layer's write to the residual stream, summed over positions), ``head`` (each head's slice of
the attention output projection's input), and ``attn_pos`` / ``mlp_pos`` / ``head_pos`` per
position. Returns ``{node type: Attribution}``, each ``[prompt, node]`` or ``[prompt, node,
position]``, in metric units (``meta["clean_metric"]``, ``meta["corrupted_metric"]`` per pair).

Pairs of unequal length are compared on the positions both prompts have, aligned at the last
token (left padding); per-position node types refuse such pairs unless ``align="right"``.
Works on frozen (hosted) models. Remote: only the scores and metrics cross the wire.

    python -m nnattr.recipes.attribution_patching --clean "..." --corrupted "..." --answer " Mary" --distractor " John"
"""

from __future__ import annotations

from typing import Literal, Sequence

import nnsight
import torch

from nnattr.kernels import (  # by name, not the module: docs/remote.md
    attribution_scores, first, interpolate, logit_diff, overlap_mask, pair_delta, path_gradient,
)
from nnattr.arch import dims
from nnattr.inputs import Prompts, Token, map_chunks
from nnattr.pairs import DEFAULT_NODES, NODES, Metric, pairs, positional  # noqa: F401  (re-exported)
from nnattr.result import Attribution



def run(
    model,
    clean: Prompts,
    corrupted: Prompts,
    answer: Token | Sequence[Token] | None = None,
    distractor: Token | Sequence[Token] | None = None,
    *,
    metric: Metric | None = None,
    nodes: Sequence[str] = DEFAULT_NODES,
    method: Literal["atp", "ig"] = "atp",
    steps: int = 5,
    batch_size: int | None = None,
    align: Literal["right"] | None = None,
    remote: bool = False,
    backend=None,
) -> dict[str, Attribution]:
    """Estimated effect of patching each node, per pair: ``{node type: Attribution}``."""
    if method not in ("atp", "ig") or (method == "ig" and steps < 1):
        raise ValueError(f"method={method!r}, steps={steps}: expected 'atp', or 'ig' with steps >= 1")
    d = dims(model)
    p = pairs(model, clean, corrupted, answer, distractor, metric=metric, nodes=nodes, align=align)
    m = steps if method == "ig" else 0
    alphas = (torch.arange(m) + 0.5) / m if m else None  # midpoints of m equal steps
    sites = p.sites()  # {"head": keep positions?, ...}

    def step(start, chunk):
        index = slice(start, start + len(chunk))
        length = max(max(p.lengths(0)[index]), max(p.lengths(1)[index]))
        return _trace(
            model, p.clean[index] + p.corrupted[index] * (1 + m), sites=sites, n_heads=d.n_heads,
            mask=overlap_mask(torch.tensor(p.lengths(0)[index]), torch.tensor(p.lengths(1)[index]), length),
            alphas=alphas, metric=p.metric, answer=p.ids("answer", index), distractor=p.ids("distractor", index),
            remote=remote, backend=backend,
        )

    width, scores, metrics = max(p.lengths(1)), {node: [] for node in p.nodes}, []
    for start, chunk, out in map_chunks(step, p.clean, batch_size=batch_size, desc="attribution patching",
                                        model=model, remote=remote, backend=backend):
        metrics.append(out["metric"])
        for node in p.nodes:  # out[site]: [n, layer, (head,) pos] or [n, layer, (head)]
            s = out[node.removesuffix("_pos")].flatten(1, 2 if node.startswith("head") else 1)  # [n, node, ...]
            scores[node].append(_fit(s, width) if positional(node) else s.sum(-1) if s.ndim == 3 else s)
    values = {node: torch.cat(v) for node, v in scores.items()}
    method = "attribution_patching[atp]" if m == 0 else f"attribution_patching[ig, steps={m}]"
    return p.results(values, torch.cat(metrics, dim=1), d, method=method, units="metric")


def _fit(s: torch.Tensor, width: int) -> torch.Tensor:
    """Right-align the last (position) axis to ``width``: NaN-pad on the left or drop the left."""
    pad = width - s.shape[-1]
    return s[..., -width:] if pad <= 0 else torch.cat([s.new_full((*s.shape[:-1], pad), float("nan")), s], dim=-1)


def _trace(model, prompts, *, sites, n_heads, mask, alphas, metric, answer, distractor, remote, backend):
    # Plain values only inside the trace: it may run on a server where nnattr is not installed.
    n = mask.shape[0]
    steps = 0 if alphas is None else alphas.shape[0]
    with model.trace(prompts, remote=remote, backend=backend):
        if alphas is None:
            model.embed.output.requires_grad_(True)  # frozen hosted weights: start the graph here
        else:
            model.embed.output = interpolate(model.embed.output, mask, alphas).requires_grad_(True)
        acts = {site: [] for site in sites}  # forward order: layer input, heads, attn, mlp
        for layer in model.layers:
            if "resid" in sites:
                acts["resid"].append(layer.input)  # [rows, pos, d_model]
            if "head" in sites:
                acts["head"].append(layer.attn.o_proj.input)  # [rows, pos, head * d_head]
            if "attn" in sites:
                acts["attn"].append(first(layer.attn_out.output))
            if "mlp" in sites:
                acts["mlp"].append(layer.mlp_out.output)
        deltas = {site: [pair_delta(a, mask) for a in acts[site]] for site in sites}
        logits = model.output.logits  # [rows, pos, vocab]
        if metric is None:
            reps = 2 + steps  # the pairs' answers, repeated over the blocks of rows
            values = logit_diff(logits, answer.repeat(reps), None if distractor is None else distractor.repeat(reps))
        else:
            values = metric(logits).float()  # [rows]
        scores = {site: [] for site in sites}
        captured = [a for site in sites for a in acts[site]]
        with values[n if steps == 0 else 2 * n :].sum().backward(inputs=captured):  # no .grad on weights
            for i in reversed(range(len(model.layers))):  # gradients arrive in reverse forward order
                for site in ("mlp", "attn", "head", "resid"):
                    if site in sites:
                        grad = path_gradient(acts[site][i].grad, n_pairs=n, steps=steps)
                        s = attribution_scores(grad, deltas[site][i], n_heads=n_heads if site == "head" else None)
                        scores[site].append(s if sites[site] else s.sum(-1))  # [n, (head,) pos] or [n, (head)]
        out = {site: torch.stack(v[::-1], dim=1).detach().cpu() for site, v in scores.items()}
        out["metric"] = values[: 2 * n].detach().float().cpu().reshape(2, n)  # [clean / corrupted, n]
        out = nnsight.save(out)
    return out


def main(argv=None):
    from nnattr.cli import recipe_main

    return recipe_main("attribution_patching", argv)


if __name__ == "__main__":
    raise SystemExit(main())
