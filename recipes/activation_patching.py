"""Activation patching: the exact effect of each node, to confirm what attribution patching finds.

For each clean/corrupted pair and node, the corrupted run is repeated with that node's clean
activation patched in, and the metric gives the normalised recovery
``(patched - corrupted) / (clean - corrupted)`` (0: no effect, 1: all of the clean behaviour;
Meng et al. 2022, Wang et al. 2022). Node types and result dimensions: see `nnattr.pairs`.
Give ``candidates`` (an attribution-patching result) to patch only the ``k`` entries of each
node type it ranks highest (mean absolute score over pairs); the rest are NaN.

Batched: a forward holds each pair's clean and corrupted rows and up to ``rows`` patched
copies of the corrupted prompt, each patched from its clean row as the pass reaches the node.
Every forward of a chunk of pairs runs in one session: remotely one request, one queue wait.
Wire: one metric per row comes back.

    python recipes/activation_patching.py --clean "..." --corrupted "..." --answer " Mary" --distractor " John"
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import nnsight
import torch

from nnattr import runner
from nnattr.kernels import first, logit_diff, normalised_recovery, patched_rows, topk_flat  # by name: to NDIF
from nnattr.pairs import DEFAULT_NODES, Node, Pairs, node_dims, pairs, positional
from nnattr.result import Attribution

TITLE, UNITS = "Activation patching", "recovered fraction"


def trace(model, p: Pairs, *, jobs: list, rows: int, remote=False, backend=None) -> list:
    """One session; per forward: the pairs' clean and corrupted rows, then one patched row per job."""
    plans = [_plan(p, jobs[i : i + rows]) for i in range(0, len(jobs), rows)]
    metric = p.metric
    with torch.no_grad(), model.session(remote=remote, backend=backend):
        outs = list()
        for inputs, sites, answer, distractor in plans:
            with model.trace(inputs):
                for layer, plan in zip(model.layers, sites):  # forward order: resid, head, attn, mlp
                    if "resid" in plan:
                        x = layer.input  # [rows, pos, d_model]
                        x[plan["resid"][0]] = patched_rows(x, *plan["resid"])
                    if "head" in plan:
                        z = layer.attn.o_proj.input  # [rows, pos, head * d_head]
                        z[plan["head"][0]] = patched_rows(z, *plan["head"])
                    if "attn" in plan:
                        a = first(layer.attn_out.output)
                        a[plan["attn"][0]] = patched_rows(a, *plan["attn"])
                    if "mlp" in plan:
                        o = first(layer.mlp_out.output)
                        o[plan["mlp"][0]] = patched_rows(o, *plan["mlp"])
                logits = model.output.logits  # [rows, pos, vocab]
                values = logit_diff(logits, answer, distractor) if metric is None else metric(logits).float()
                outs.append(values.cpu())
        outs = nnsight.save(outs)
    return outs


def run(model, clean, corrupted, answer=None, distractor=None, *, metric=None,
        nodes: Sequence[Node] | None = None, candidates: Mapping[str, Attribution] | None = None, k: int = 10,
        rows: int = 64, align: Literal["right"] | None = None, batch_size: int | None = None, remote=False,
        backend=None) -> dict[str, Attribution]:
    """Normalised recovery of patching each node, per pair: ``{node type: Attribution}``.

    answer: the clean prompt's answer token; distractor: subtract its logit.
    nodes: node types to patch (default resid attn mlp head, or those of candidates).
    k: with candidates, the entries patched per node type.
    rows: patched rows per forward pass.
    align: "right" compares pairs of unequal length per position, aligned at the last token.
    """
    nodes = tuple(nodes or candidates or DEFAULT_NODES)
    if k < 1 or rows < 1:
        raise ValueError(f"k={k}, rows={rows}: both must be at least 1")
    if candidates is not None and not set(nodes) <= set(candidates):
        raise ValueError(f"candidates hold node types {sorted(candidates)}, not all of nodes={nodes}")
    p = pairs(model, clean, corrupted, answer, distractor, metric=metric, nodes=nodes, align=align)
    width, n_layers, n_heads = p.clean.width, p.arch.n_layers, p.arch.n_heads
    shape = lambda node: (n_layers,) + (n_heads,) * node.startswith("head") + (width,) * positional(node)  # noqa
    entries = {node: _entries(node, shape(node), None if candidates is None else candidates[node], k, p)
               for node in p.nodes}
    patched = {node: torch.full((len(p), *shape(node)), float("nan")) for node in p.nodes}
    base = torch.full((2, len(p)), float("nan"))  # [clean / corrupted, pair]
    for start, chunk, outs in runner.chunks(
            lambda start, chunk, backend: trace(model, chunk, jobs=_jobs(chunk, entries), rows=rows,
                                                remote=remote, backend=backend),
            p, batch_size=batch_size, desc="activation patching", model=model, remote=remote, backend=backend):
        jobs = _jobs(chunk, entries)
        for i0, out in zip(range(0, len(jobs), rows), outs):
            owners = list(dict.fromkeys(i for i, *_ in jobs[i0 : i0 + rows]))
            base[:, [start + i for i in owners]] = out[: 2 * len(owners)].reshape(2, len(owners))
            for (i, node, index), value in zip(jobs[i0 : i0 + rows], out[2 * len(owners) :]):
                patched[node][(start + i, *index)] = value
    values = {node: normalised_recovery(v, *(b.reshape(-1, *[1] * (v.ndim - 1)) for b in base))
              for node, v in patched.items()}
    return p.results(values, base, method="activation_patching", title=TITLE, units=UNITS,
                     meta={"k": k} if candidates is not None else {})


def _entries(node, shape, candidates, k, p) -> list[tuple[int, ...]]:
    """Indices ``(layer, (head,) (position))`` to patch: every one, or the top ``k`` candidates."""
    if candidates is None:
        return [tuple(i) for i in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist()]
    if candidates.dims != node_dims(node) or candidates.shape[1:3] != shape[: len(candidates.shape[1:3])]:
        raise ValueError(f"candidates for {node!r} have dims {candidates.dims} and shape {candidates.shape}, not "
                         f"this model's {node_dims(node)}: pass attribution_patching's result for the same model")
    mean = candidates.mean().values  # [layer, (head,) (position: right-aligned to the same width)]
    top, index = topk_flat(mean, k)
    offset = shape[-1] - mean.shape[-1] if positional(node) else 0  # candidates' width -> common width
    return [tuple(r[:-1].tolist()) + ((int(r[-1]) + offset,) if positional(node) else (int(r[-1]),))
            for v, r in zip(top, index) if not torch.isnan(v)]


def _jobs(p: Pairs, entries) -> list[tuple[int, str, tuple[int, ...]]]:
    """``(pair, node type, index)`` of every patched row; positions only where both prompts have a token."""
    overlap = p.overlap()  # [pair, position]
    return [(i, node, index) for i in range(len(p)) for node, indices in entries.items() for index in indices
            if not positional(node) or overlap[i, index[-1]]]


def _plan(p: Pairs, jobs):
    """The inputs of one forward and, per layer and site, which rows to patch from which, where."""
    owners = list(dict.fromkeys(i for i, *_ in jobs))
    row_of = {i: r for r, i in enumerate(owners)}  # the pair's clean row; its corrupted row is + len(owners)
    overlap, d_head, width = p.overlap(), p.arch.d_head, p.clean.width
    plan = [{} for _ in range(p.arch.n_layers)]
    for r, (i, node, index) in enumerate(jobs, start=2 * len(owners)):
        site, layer = node.removesuffix("_pos"), index[0]
        where = torch.arange(width) == index[-1] if positional(node) else overlap[i]  # [pos]
        channels = None if site != "head" else torch.arange(p.arch.n_heads * d_head) // d_head == index[1]
        plan[layer].setdefault(site, []).append((r, row_of[i], where, channels))
    sites = [{s: _stack(entries[s]) for s in ("resid", "head", "attn", "mlp") if s in entries} for entries in plan]
    inputs = p.inputs_of(owners, owners + [i for i, *_ in jobs])
    ids = lambda role: None if getattr(p.clean, role) is None else torch.tensor(  # noqa: E731
        [getattr(p.clean, role)[i] for i in owners * 2 + [i for i, *_ in jobs]])
    return inputs, sites, ids("target"), ids("distractor")


def _stack(entries):
    rows, source, where, channels = zip(*entries)
    return (torch.tensor(rows), torch.tensor(source), torch.stack(where),
            None if channels[0] is None else torch.stack(channels))


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
