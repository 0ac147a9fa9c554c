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

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import nnsight
import torch

from nnattr.kernels import (  # by name, not the module: docs/remote.md
    attribution_scores, first, interpolate, logit_diff, overlap_mask, pair_delta, path_gradient,
)
from nnattr.arch import dims
from nnattr.inputs import Prompts, Token, as_prompts, check_unknown, map_chunks, token_ids, tokens_of
from nnattr.result import Attribution

NODES = ("resid", "attn", "attn_pos", "mlp", "mlp_pos", "head", "head_pos")
DEFAULT_NODES = ("resid", "attn", "mlp", "head")
Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [batch, pos, vocab] -> [batch]


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


@dataclass(frozen=True)
class Pairs:
    """Validated clean/corrupted pairs, shared by attribution and activation patching."""

    clean: list[str]
    corrupted: list[str]
    tokens: tuple[list[list[str]], list[list[str]]]  # clean, corrupted
    answer: list[int] | None
    distractor: list[int] | None
    metric: Metric | None
    nodes: tuple[str, ...]
    tokenizer: object

    def __len__(self) -> int:
        return len(self.clean)

    def lengths(self, side: int) -> list[int]:
        return [len(t) for t in self.tokens[side]]

    def ids(self, role: str, index) -> torch.Tensor | None:
        """Token ids of ``answer`` or ``distractor`` for pairs ``index`` (None if not given)."""
        ids = getattr(self, role)
        return None if ids is None else torch.tensor(ids[index])

    def sites(self) -> dict[str, bool]:
        """Activations to read (``resid``, ``head``, ``attn``, ``mlp``): do we keep positions?"""
        out: dict[str, bool] = {}
        for node in self.nodes:
            site = node.removesuffix("_pos")
            out[site] = out.get(site, False) or positional(node)
        return out

    def results(self, values, metrics, d, *, method: str, units: str) -> dict[str, Attribution]:
        """One ``Attribution`` per node type from ``{node type: [pair, node(, position)]}`` (positions
        right-aligned to the longest corrupted prompt; those outside a pair's overlap become NaN)."""
        width = max(self.lengths(1))
        overlap = torch.tensor([min(a, b) for a, b in zip(self.lengths(0), self.lengths(1))])
        outside = torch.arange(width)[None, :] < (width - overlap)[:, None]  # [pair, position]
        meta = {"method": method, "units": units, "clean_metric": metrics[0].tolist(),
                "corrupted_metric": metrics[1].tolist(), **self._answers()}
        labels = {"prompt": self.clean, "position": [str(i - width) for i in range(width)]}
        out = {}
        for node, v in values.items():
            per_pos = positional(node)
            if per_pos:
                v = v.masked_fill(outside[:, None, :], float("nan"))
            dims_ = ("prompt", "node", "position") if per_pos else ("prompt", "node")
            out[node] = Attribution(v, dims_, {**labels, **node_labels(node, d)}, {**meta, "node_type": node},
                                    tuple(map(tuple, self.tokens[1])))
        return out

    def _answers(self) -> dict:
        decode = lambda ids: None if ids is None else [self.tokenizer.decode([t]) for t in ids]  # noqa: E731
        return {"answer": decode(self.answer), "distractor": decode(self.distractor)}


def positional(node: str) -> bool:
    """Whether a node type has a position axis (``resid`` and the ``*_pos`` types)."""
    return node == "resid" or node.endswith("_pos")


def node_labels(node: str, d) -> dict[str, list[str]]:
    """``{"node": labels}``: ``resid_pre_3``, ``3_attn_out``, ``3_mlp_out``, ``L3H7``."""
    site = node.removesuffix("_pos")
    names = {
        "resid": [f"resid_pre_{i}" for i in range(d.n_layers)],
        "attn": [f"{i}_attn_out" for i in range(d.n_layers)],
        "mlp": [f"{i}_mlp_out" for i in range(d.n_layers)],
        "head": [f"L{i}H{h}" for i in range(d.n_layers) for h in range(d.n_heads)],
    }[site]
    return {"node": names}


def pairs(model, clean, corrupted, answer, distractor, *, metric, nodes, align) -> Pairs:
    """Check everything before a trace runs: counts, tokens, lengths, nodes and metric."""
    clean, corrupted = as_prompts(clean), as_prompts(corrupted)
    if len(clean) != len(corrupted):
        raise ValueError(f"{len(clean)} clean prompts but {len(corrupted)} corrupted: "
                         f"give one corrupted prompt per clean one")
    nodes = tuple(nodes)
    unknown = [t for t in nodes if t not in NODES]
    if unknown or not nodes:
        raise ValueError(f"unknown node types {unknown or nodes}; choose from {NODES}")
    if align not in (None, "right"):
        raise ValueError(f"align={align!r}; expected None or 'right'")
    tok = model.tokenizer
    check_unknown(tok, clean + corrupted)
    answers = token_ids(tok, answer, len(clean), role="answer")
    distractors = token_ids(tok, distractor, len(clean), role="distractor")
    if metric is None and answers is None:
        raise ValueError("give answer= (and distractor=) for the default logit-difference metric, or a metric=")
    if metric is not None:
        _check_metric(metric, dims(model).d_vocab)
    tokens = ([tokens_of(tok, q) for q in clean], [tokens_of(tok, q) for q in corrupted])
    per_position = [t for t in nodes if positional(t)]
    for i, (a, b) in enumerate(zip(*tokens)):
        if len(a) != len(b) and per_position and align is None:
            raise ValueError(
                f"pair {i}: the clean prompt has {len(a)} tokens and the corrupted prompt {len(b)}, so per-position "
                f"node types {per_position} would compare different tokens. Pass align='right' (positions aligned at "
                f"the last token; those only one prompt has are NaN) or ask only for node types summed over positions."
            )
    return Pairs(clean, corrupted, tokens, answers, distractors, metric, nodes, tok)


def _check_metric(metric, vocab: int) -> None:
    probe = torch.randn(2, 3, vocab, requires_grad=True)  # [batch, pos, vocab]
    value = metric(probe)
    if not isinstance(value, torch.Tensor) or value.shape != (2,):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"metric must map logits [batch, pos, vocab] to one value per row [batch]; "
                         f"for logits (2, 3, {vocab}) it returned {got}")
    if not value.requires_grad or torch.autograd.grad(value.sum(), probe, allow_unused=True)[0] is None:
        raise ValueError("metric does not depend on the logits it is given, so it has no gradient to attribute: "
                         "compute it from the logits argument (e.g. logits[:, -1, answer] - logits[:, -1, other])")


def main(argv=None):
    from nnattr.cli import recipe_main

    return recipe_main("attribution_patching", argv)


if __name__ == "__main__":
    raise SystemExit(main())
