"""Activation patching: the exact effect of each node, to confirm what attribution patching finds.

For each clean/corrupted pair and node, the corrupted run is repeated with that node's clean
activation patched in, and the metric gives the normalised recovery
``(patched - corrupted) / (clean - corrupted)`` (0: no effect, 1: all of the clean behaviour;
Meng et al. 2022, Wang et al. 2022). Node types and result dimensions: see `nnattr.pairs`.
Give ``candidates`` (an attribution-patching result) to patch only the ``k`` entries of each
node type it ranks highest (by the magnitude of the mean score over pairs); the rest are NaN.

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
from nnattr.kernels import first, logit_diff, normalised_recovery, patched_rows  # by name: they travel to NDIF
from nnattr.pairs import DEFAULT_NODES, Node, Pairs, owners_of, pairs, patch_entries, positional
from nnattr.result import Attribution

TITLE, UNITS = "Activation patching", "recovered fraction"


def trace(model, p: Pairs, *, jobs: list, rows: int, remote=False, backend=None) -> list:
    """One session; per forward: the pairs' clean and corrupted rows, then one patched row per job."""
    plans = [p.plan(jobs[i : i + rows]) for i in range(0, len(jobs), rows)]
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
        nodes: Sequence[Node] | None = None, candidates: Mapping[str, Attribution] | None = None,
        k: int | None = None, rows: int = 64, align: Literal["right"] | None = None, batch_size: int | None = None,
        remote=False, backend=None) -> dict[str, Attribution]:
    """Normalised recovery of patching each node, per pair: ``{node type: Attribution}``.

    answer: the clean prompt's answer token; distractor: subtract its logit.
    nodes: node types to patch (default resid attn mlp head, or those of candidates).
    candidates: an attribution-patching result (on the command line: the JSON its --out wrote).
    k: with candidates, the entries patched per node type (default 10).
    rows: patched rows per forward pass.
    align: "right" compares pairs of unequal length per position, aligned at the last token.
    """
    if candidates is not None and not isinstance(candidates, Mapping):
        raise ValueError("candidates must be {node type: Attribution}, as attribution_patching.run returns")
    if (k is not None and (candidates is None or k < 1)) or rows < 1:
        raise ValueError(f"k={k}, rows={rows}: k (at least 1) applies with candidates only; rows must be at least 1")
    nodes = tuple(nodes or candidates or DEFAULT_NODES)
    if candidates is not None and not set(nodes) <= set(candidates):
        raise ValueError(f"candidates hold node types {sorted(candidates)}, not all of nodes={nodes}")
    p = pairs(model, clean, corrupted, answer, distractor, metric=metric, nodes=nodes, align=align)
    width, n_layers, n_heads, k = p.clean.width, p.arch.n_layers, p.arch.n_heads, k or 10
    shape = lambda node: (n_layers,) + (n_heads,) * node.startswith("head") + (width,) * positional(node)  # noqa
    entries = {node: patch_entries(node, shape(node), None if candidates is None else candidates[node], k)
               for node in p.nodes}
    patched = {node: torch.full((len(p), *shape(node)), float("nan")) for node in p.nodes}
    base, jobs = torch.full((2, len(p)), float("nan")), {}  # base: [clean / corrupted, pair]
    for start, chunk, outs in runner.chunks(
            lambda start, chunk, backend: trace(model, chunk, jobs=jobs.setdefault((start, len(chunk)),
                                                chunk.jobs(entries)), rows=rows, remote=remote, backend=backend),
            p, batch_size=batch_size, desc=TITLE, model=model, remote=remote, backend=backend):
        done = jobs[start, len(chunk)]  # (a chunk retried smaller after running out of memory has its own)
        for i0, out in zip(range(0, len(done), rows), outs):  # one forward: its owners' rows, then jobs
            forward = done[i0 : i0 + rows]
            owners = owners_of(forward)
            base[:, [start + i for i in owners]] = out[: 2 * len(owners)].reshape(2, len(owners))
            for (i, node, index), value in zip(forward, out[2 * len(owners) :]):
                patched[node][(start + i, *index)] = value
    values = {node: normalised_recovery(v, *(b.reshape(-1, *[1] * (v.ndim - 1)) for b in base))
              for node, v in patched.items()}
    meta = {**({"k": k} if candidates is not None else {}), **({"align": align} if align else {})}
    return p.results(values, base, method="activation_patching", title=TITLE, units=UNITS, meta=meta)


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
