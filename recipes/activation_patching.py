"""Activation patching: the exact effect of each node, to confirm what attribution patching finds.

For each clean/corrupted pair and each node, the corrupted run is repeated with that node's
clean activation patched in, and the metric gives the normalised recovery
``(patched - corrupted) / (clean - corrupted)`` (0: no effect, 1: all of the clean behaviour;
Meng et al. 2022, Wang et al. 2022). Nodes and labels are those of
``recipes/attribution_patching.py``; node-level types patch every position both prompts have.

Batched: one forward holds each pair's clean and corrupted rows and up to ``batch_size``
patched copies of the corrupted prompt, each patching a different node from its clean row as
the forward pass reaches it, so nothing is cached between traces. Cost: one row per node and
pair. Give ``candidates`` (an attribution-patching result) to patch only the ``k`` entries of
each node type it ranks highest (mean absolute score over pairs); the rest are NaN. Remote:
one metric per row crosses the wire.

    python -m nnattr.recipes.activation_patching --clean "..." --corrupted "..." --answer " Mary" --distractor " John"
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import nnsight
import torch

from nnattr.kernels import first, logit_diff, normalised_recovery, overlap_mask, patched_rows, topk_flat  # by name
from nnattr.arch import dims
from nnattr.inputs import Prompts, Token, map_chunks
from nnattr.pairs import DEFAULT_NODES, Metric, node_labels, pairs, positional
from nnattr.result import Attribution


def run(
    model,
    clean: Prompts,
    corrupted: Prompts,
    answer: Token | Sequence[Token] | None = None,
    distractor: Token | Sequence[Token] | None = None,
    *,
    metric: Metric | None = None,
    nodes: Sequence[str] | None = None,
    candidates: Mapping[str, Attribution] | None = None,
    k: int = 10,
    batch_size: int | None = 64,
    align: Literal["right"] | None = None,
    remote: bool = False,
    backend=None,
) -> dict[str, Attribution]:
    """Normalised recovery of patching each node, per pair: ``{node type: Attribution}``.

    nodes: default ``DEFAULT_NODES``, or with ``candidates`` the node types it holds.
    batch_size: patched rows per forward pass (None: all of them, or what fits on the GPU).
    """
    nodes = tuple(nodes or candidates or DEFAULT_NODES)
    if k < 1:
        raise ValueError(f"k={k}: patch at least one candidate per node type")
    if candidates is not None and not set(nodes) <= set(candidates):
        raise ValueError(f"candidates hold node types {sorted(candidates)}, not all of nodes={nodes}")
    d = dims(model)
    p = pairs(model, clean, corrupted, answer, distractor, metric=metric, nodes=nodes, align=align)
    width, overlap = max(p.lengths(1)), [min(a, b) for a, b in zip(p.lengths(0), p.lengths(1))]
    jobs = [(i, node, j, pos) for i in range(len(p)) for node in p.nodes
            for j, pos in _entries(node, d, width, None if candidates is None else candidates[node], k)
            if pos is None or -pos <= overlap[i]]  # pos: offset from the last token

    # Remotely every forward of the run goes in one session (one request, one queue wait);
    # locally each chunk is its own session, so memory back-off still works per forward.
    rows = batch_size or len(jobs)

    def step(start, chunk):
        plans = [_plan(p, chunk[i : i + rows], d) for i in range(0, len(chunk), rows)]
        return _session(model, plans, metric=p.metric, remote=remote, backend=backend)

    patched = {node: torch.full((len(p), len(node_labels(node, d)["node"]), width), float("nan")) for node in p.nodes}
    base = torch.full((2, len(p)), float("nan"))  # [clean / corrupted, pair]
    for _, chunk, outs in map_chunks(step, jobs, batch_size=None if remote else batch_size,
                                     desc="activation patching", model=model, remote=remote, backend=backend):
        for i0, out in zip(range(0, len(chunk), rows), outs):
            forward = chunk[i0 : i0 + rows]
            owners = list(dict.fromkeys(i for i, *_ in forward))  # rows: clean, corrupted of each, then patched
            base[:, owners] = out[: 2 * len(owners)].reshape(2, len(owners))
            for (i, node, j, pos), value in zip(forward, out[2 * len(owners) :]):
                patched[node][i, j, -1 if pos is None else pos] = value
    values = {}
    for node, v in patched.items():
        v = v if positional(node) else v[..., -1]  # [pair, node(, position)]
        shape = (-1,) + (1,) * (v.ndim - 1)
        values[node] = normalised_recovery(v, base[0].reshape(shape), base[1].reshape(shape))
    return p.results(values, base, d, method="activation_patching", units="recovery")


def _session(model, plans, *, metric, remote, backend):
    # Plain values only inside: it may run on a server. Each plan is one forward:
    # (prompts, sites, answer, distractor); sites[layer]: {site: (rows, source, positions, channels)}.
    # One statement per line before each nested `with`: the server recompiles this block.
    with torch.no_grad(), model.session(remote=remote, backend=backend):
        outs = list()
        for prompts, sites, answer, distractor in plans:
            with model.trace(prompts):
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
                        o = layer.mlp_out.output
                        o[plan["mlp"][0]] = patched_rows(o, *plan["mlp"])
                logits = model.output.logits  # [rows, pos, vocab]
                values = logit_diff(logits, answer, distractor) if metric is None else metric(logits).float()
                outs.append(values.cpu())
        outs = nnsight.save(outs)
    return outs


def _plan(p, jobs, d):
    """The rows of one forward (each job's pair's clean and corrupted prompts, then one corrupted
    copy per job) and, per layer and site, which rows to patch from which, where."""
    owners = list(dict.fromkeys(i for i, *_ in jobs))
    row_of = {i: r for r, i in enumerate(owners)}  # the pair's clean row; its corrupted row is + len(owners)
    length = max(max(p.lengths(0)[i], p.lengths(1)[i]) for i in owners)
    mask = overlap_mask(torch.tensor([p.lengths(0)[i] for i in owners]),
                          torch.tensor([p.lengths(1)[i] for i in owners]), length)  # [owner, pos]
    plan = [{} for _ in range(d.n_layers)]
    for r, (i, node, j, pos) in enumerate(jobs, start=2 * len(owners)):
        site = node.removesuffix("_pos")
        layer, head = divmod(j, d.n_heads) if site == "head" else (j, None)
        where = mask[row_of[i]] if pos is None else torch.arange(length) == length + pos  # [pos]
        channels = None if head is None else (torch.arange(d.n_heads * d.d_head) // d.d_head) == head
        plan[layer].setdefault(site, []).append((r, row_of[i], where, channels))
    order = ("resid", "head", "attn", "mlp")
    sites = [{s: _stack(entries[s]) for s in order if s in entries} for entries in plan]
    prompts = [p.clean[i] for i in owners] + [p.corrupted[i] for i in owners] + [p.corrupted[i] for i, *_ in jobs]
    ids = lambda role: None if getattr(p, role) is None else torch.tensor(  # noqa: E731
        [getattr(p, role)[i] for i in owners * 2 + [i for i, *_ in jobs]])
    return prompts, sites, ids("answer"), ids("distractor")


def _stack(entries):
    rows, source, where, channels = zip(*entries)
    return (torch.tensor(rows), torch.tensor(source), torch.stack(where),
            None if channels[0] is None else torch.stack(channels))


def _entries(node: str, d, width: int, candidates: Attribution | None, k: int) -> list[tuple[int, int | None]]:
    """``(node index, position offset or None)`` to patch: all of them, or the top ``k`` candidates."""
    n_nodes = len(node_labels(node, d)["node"])
    if candidates is None:
        return [(j, pos) for j in range(n_nodes) for pos in (range(-width, 0) if positional(node) else [None])]
    if list(candidates.labels["node"]) != node_labels(node, d)["node"]:
        raise ValueError(f"candidates for {node!r} are labelled for another model: {candidates.labels['node'][:4]}...")
    mean = candidates.mean().values  # [node(, position)]
    top, index = topk_flat(mean, k)
    return [(int(r[0]), int(r[1]) - mean.shape[1] if positional(node) else None)
            for v, r in zip(top, index) if not torch.isnan(v)]


def main(argv=None):
    from nnattr.cli import recipe_main

    return recipe_main("activation_patching", argv)


if __name__ == "__main__":
    raise SystemExit(main())
