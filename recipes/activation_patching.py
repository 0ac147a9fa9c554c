"""Activation patching: the exact effect of each node, to confirm what attribution patching finds.

For each clean/corrupted pair and node, the corrupted run is repeated with that node's clean
activation patched in, and the metric gives the normalised recovery
``(patched - corrupted) / (clean - corrupted)`` (0: no effect, 1: all of the clean behaviour;
Meng et al. 2022, Wang et al. 2022). Node types and result dimensions: see `nnattr.pairs`.
Give ``candidates`` (an attribution-patching result) to patch only the ``k`` entries of each node
type it ranks highest (by the magnitude of the mean score over pairs); the rest are NaN.

Batched and restarted at each node's layer: a first pass caches the clean activations and the residual
stream; each later forward patches up to ``rows`` corrupted prompts, sorted by layer, skipping the layers
before its lowest one ``l`` (they return the cached residual), so a node at layer ``l`` of ``L`` costs
about ``(L - l) / L`` of a forward. One session per chunk of pairs: one request. Wire: a metric per row.

    python recipes/activation_patching.py --clean "..." --corrupted "..." --answer " Mary" --distractor " John"
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import nnsight
import torch

from nnattr import runner
from nnattr.kernels import first, logit_diff, normalised_recovery, patched_rows  # by name: they travel to NDIF
from nnattr.pairs import DEFAULT_NODES, Node, Pairs, count, node_types, pairs, patch_entries
from nnattr.result import Attribution

TITLE, UNITS = "Activation patching", "recovered fraction"


def trace(model, p: Pairs, *, forwards: list, remote=False, backend=None) -> list:
    """One session: the clean and corrupted rows once, caching what the patches need; then per
    forward, one layer's patched rows, restarted at that layer from the corrupted run's cache."""
    n, sites, metric, both = len(p), p.sites(), p.metric, p.inputs()  # both: rows clean (n), corrupted (n)
    plans, answer, other = [p.plan(jobs) for jobs in forwards], p.clean.answer("target"), p.clean.answer("distractor")
    last = {} if metric else {"logits_to_keep": 1}  # the default metric reads the last position only
    block_tuple = p.arch.block_tuple  # Falcon's blocks return (hidden, weights): a skipped one must too
    with model.session(remote=remote, backend=backend):
        value = lambda logits, i: metric(logits).float() if metric else logit_diff(  # noqa: E731 [rows of pairs i]
            logits, answer[i], None if other is None else other[i])
        with torch.no_grad(), model.trace(both, **last):
            resid, clean = [], {site: [] for site in sites}  # per layer, in forward order
            for layer in model.layers:
                resid.append(layer.input)  # the residual stream entering the layer, both runs
                if "head" in sites:
                    clean["head"].append(layer.attn.o_proj.input[:n])
                if "attn" in sites:
                    clean["attn"].append(first(layer.attn_out.output)[:n].clone())  # copies: Falcon adds in place
                if "mlp" in sites:
                    clean["mlp"].append(first(layer.mlp_out.output, 2 * n)[:n].clone())  # OPT's: unflattened
            outs = [value(model.output.logits, torch.arange(n).repeat(2)).cpu()]  # [clean (n), corrupted (n)]
        for at, inputs, owners, patches in plans:  # each row: the corrupted prompt of pair owners[row]
            with torch.no_grad(), model.trace(inputs, **last):
                for i in range(at):  # skipped: each returns the corrupted residual stream entering layer `at`
                    model.layers[i].skip((resid[at][n + owners], None) if block_tuple else resid[at][n + owners])
                for i, patch in patches.items():  # the layers with patches, from `at` on
                    layer = model.layers[i]
                    if "resid" in patch:
                        x = layer.input  # [rows, pos, d_model]
                        x[patch["resid"][0]] = patched_rows(x, resid[i][:n], *patch["resid"])
                    if "head" in patch:
                        z = layer.attn.o_proj.input  # [rows, pos, head * d_head]
                        z[patch["head"][0]] = patched_rows(z, clean["head"][i], *patch["head"])
                    if "attn" in patch:
                        a = first(layer.attn_out.output)
                        a[patch["attn"][0]] = patched_rows(a, clean["attn"][i], *patch["attn"])
                    if "mlp" in patch:
                        o = first(layer.mlp_out.output, len(owners))  # [rows, pos, d_model]; a view on OPT
                        o[patch["mlp"][0]] = patched_rows(o, clean["mlp"][i], *patch["mlp"])
                outs.append(value(model.output.logits, owners).cpu())
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
    rows: patched rows per forward pass, sorted by layer (a forward restarts at its lowest layer).
    align: "right" compares pairs of unequal length per position, aligned at the last token.
    """
    if candidates is not None and not isinstance(candidates, Mapping):
        raise ValueError("candidates must be {node type: Attribution}, as attribution_patching.run returns")
    if k is not None and candidates is None:
        raise ValueError(f"k={k}: k (the entries patched per node type) applies with candidates only")
    k, rows, nodes = count(k, "k", default=10), count(rows, "rows"), node_types(nodes, candidates or DEFAULT_NODES)
    if candidates is not None and not set(nodes) <= set(candidates):
        raise ValueError(f"candidates hold node types {sorted(candidates)}, not all of nodes={nodes}")
    p = pairs(model, clean, corrupted, answer, distractor, metric=metric, nodes=nodes, align=align)
    entries = {node: patch_entries(node, p.shape(node), candidates and candidates[node], k) for node in p.nodes}
    patched = {node: torch.full((len(p), *p.shape(node)), float("nan")) for node in p.nodes}
    base, forwards = torch.full((2, len(p)), float("nan")), {}  # base: [clean / corrupted, pair]
    for start, chunk, outs in runner.chunks(
            lambda start, chunk, backend: trace(model, chunk, forwards=forwards.setdefault(
                (start, len(chunk)), chunk.forwards(chunk.jobs(entries), rows)), remote=remote, backend=backend),
            p, batch_size=batch_size, desc=TITLE, model=model, remote=remote, backend=backend):
        base[:, start : start + len(chunk)] = outs[0].reshape(2, len(chunk))
        for jobs, out in zip(forwards[start, len(chunk)], outs[1:]):  # (a chunk retried smaller has its own)
            for (i, node, index), value in zip(jobs, out):
                patched[node][(start + i, *index)] = value
    values = {node: normalised_recovery(v, *(b.reshape(-1, *[1] * (v.ndim - 1)) for b in base))
              for node, v in patched.items()}
    meta = {**({"k": k} if candidates is not None else {}), **({"align": align} if align else {})}
    return p.results(values, base, method="activation_patching", title=TITLE, units=UNITS, meta=meta)


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
