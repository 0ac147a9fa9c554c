"""Circuit faithfulness: how much of the clean behaviour a circuit keeps when every other edge is ablated.

Conmy et al. 2023; Hanna et al. 2024; MIB (Mueller et al. 2025). A circuit is a set of edges from writers to readers
(`nnattr.circuits`: `top_edges`, `greedy`). The clean prompt runs with every reader reading, from each writer
whose edge into it is outside the circuit, that writer's corrupted value (``ablation="patch"``) or nothing
(``"zero"``), its mean over the corrupted prompts (``"mean"``) or another pair's corrupted value (``"resample"``)
instead of its value in this run:

    x_r = x - sum over writers w whose edge into r is not in the circuit of (w_now - w_ablated)

and each reader computes from its own ``x_r`` (a head's query, key or value through its pre-norm; an MLP; the
logits). The result is the recovered fraction (m(circuit) - m(corrupted)) / (m(clean) - m(corrupted)): 1 with
every edge, 0 (``"patch"``) with none. Every circuit is rows of one forward (rows: pairs x circuits); one session.
Wire: a metric per row.                                                                  [prompt, circuit]

    python recipes/circuit_faithfulness.py --clean "..." --corrupted "..." --answer " Mary" --distractor " John"
"""

from __future__ import annotations

from typing import Literal, Sequence

import nnsight
import torch

from nnattr import circuits, runner
from nnattr.kernels import (  # kernels by name: they travel to NDIF
    ablated_streams, apply_norm, first, head_deltas, logit_diff, o_proj_per_head, reader_projections)
from nnattr.pairs import Pairs, pairs

TITLE, UNITS = "Circuit faithfulness", "recovered fraction"


def trace(model, p: Pairs, *, masks: torch.Tensor, ablation: str, order: torch.Tensor, remote=False,
          backend=None) -> dict:
    """The clean and corrupted rows (the writers' ablated values), then the clean rows once per circuit."""
    a, n, metric, C = p.arch, len(p), p.metric, masks.shape[0]
    answer, other = p.clean.answer("target"), p.clean.answer("distractor")
    cols, norm = circuits.columns(a), a.norm_shape  # each attention reader's projection columns; the norms' shape
    embeds, parallel, normed, conv1d, H, KV, exact = a.embeddings, a.parallel, a.pre_norms, a.o_proj_conv1d, \
        a.n_heads, a.n_kv_heads, a.head_exact
    per_layer, rows, mask = H + 2 * KV + 1, C * n, masks.repeat_interleave(n, 0)  # [rows, reader, writer]
    slices = [slice(0, H), slice(H, H + KV), slice(H + KV, H + 2 * KV)]  # query heads, keys, values
    last = {} if metric else {"logits_to_keep": 1}
    both, runs = p.inputs_of(range(n), range(n)), p.inputs_of(list(range(n)) * C, [])  # circuit-major rows
    with model.session(remote=remote, backend=backend):
        value = lambda logits, k: metric(logits).float() if metric else logit_diff(  # noqa: E731 [rows]
            logits, answer.repeat(k), None if other is None else other.repeat(k))
        off = lambda now, then: now - (0 if ablation == "zero" else then.mean(0, keepdim=True) if ablation == "mean"  # noqa
                                       else then[order].repeat(C, *[1] * (then.ndim - 1)))  # a change: [rows, ...]
        with torch.no_grad(), model.trace(both, **last):  # the ablated values: the corrupted run's writers
            was = [[first(getattr(model, e).output).expand(2 * n, -1, -1)[n:] for e in embeds], [], []]
            for layer in model.layers:
                was[1].append(layer.attn.o_proj.input[n:])
                was[2].append(first(layer.mlp_out.output, 2 * n)[n:].clone())  # a copy: Falcon adds into it
            base = value(model.output.logits, 2)  # [clean n, corrupted n]
        with torch.no_grad(), model.trace(runs, **last):
            changes = [torch.stack([off(first(getattr(model, e).output).expand(rows, -1, -1), b)
                                    for e, b in zip(embeds, was[0])], 2)]  # per writer block: [rows, pos, w, d]
            post = [None]  # per writer block: heads behind a norm after attention (its weight, the heads, bias)
            for i, layer in enumerate(model.layers):
                x, r = layer.input, i * per_layer  # the stream, and this layer's first reader
                inputs = ablated_streams(x, changes, mask[:, r : r + per_layer - 1], post, **norm)  # each reader's own
                inputs = apply_norm(inputs, layer.attn_norm.weight if normed else None,
                                    getattr(layer.attn_norm, "bias", None) if normed else None, **norm)
                for proj, col, part in zip((layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj), cols, slices):
                    out = proj.output  # the fused module's three times: one tensor
                    out[..., col.flatten()] = reader_projections(inputs[:, :, part], proj.weight, proj.bias, col,
                                                                 conv1d=conv1d).flatten(-2)
                W_O = o_proj_per_head(layer.attn.o_proj.weight, n_heads=H, conv1d=conv1d)  # [head, d_head, d_model]
                changes.append(head_deltas(off(layer.attn.o_proj.input, was[1][i]), W_O))  # each head's change
                post.append(None if exact else (layer.attn_out.weight, head_deltas(layer.attn.o_proj.input, W_O),
                                                layer.attn.o_proj.bias))  # heads behind a norm: their values
                mid = x if parallel else x + first(layer.attn_out.output, rows)
                own = ablated_streams(mid, changes, mask[:, r + per_layer - 1], post, **norm)
                given = layer.mlp_in.input
                own = apply_norm(own, layer.mlp_norm.weight if normed else None,
                                 getattr(layer.mlp_norm, "bias", None) if normed else None, **norm)
                layer.mlp_in.input = own.reshape(given.shape)  # OPT's MLP reads the flattened stream
                changes.append(off(first(layer.mlp_out.output, rows), was[2][i])[:, :, None])
                post.append(None)
            model.ln_f.input = ablated_streams(model.ln_f.input, changes, mask[:, -1], post, **norm)
            out = nnsight.save({"circuit": value(model.output.logits, C).view(C, n).T.cpu(),  # [pair, circuit]
                                "base": base.view(2, n).T.cpu()})  # [pair, clean / corrupted]
    return out


def run(model, clean, corrupted, answer=None, distractor=None, *, circuit: Sequence[circuits.Circuit] | None = None,
        edges: int | Sequence[int] | None = None, ablation: Literal["patch", "zero", "mean", "resample"] = "patch",
        seed: int = 0, metric=None, batch_size: int | None = None, remote=False, backend=None) -> circuits.Attribution:
    """The recovered fraction of the metric with only each circuit's edges kept, per pair (see the module doc).

    answer: the clean prompt's answer token; distractor: subtract its logit.
    circuit: a circuit (nnattr.circuits.top_edges, greedy), or several: each is rows of the same forward.
    edges: without circuit, the top edges by EAP-IG (5 steps) on these pairs (default: 1 to 100 percent of them).
    ablation: what a reader reads from a writer outside the circuit: its corrupted value (patch), nothing (zero),
    its mean over the corrupted prompts at that position (mean), or another pair's corrupted value (resample).
    seed: the draws of resample ablation.
    metric: a function of the logits [batch, pos, vocab] -> [batch], replacing the logit difference.
    """
    p = pairs(model, clean, corrupted, answer, distractor, metric=metric, nodes=("attn",), align=None)
    order = circuits.ablation_order(p, ablation, seed, batch_size)  # each pair's source of ablated values
    p.arch.require_readers(TITLE)
    todo = circuits.to_test(model, clean, corrupted, answer, distractor, circuit=circuit, edges=edges, metric=metric,
                            remote=remote, backend=backend)  # the circuits given, or built by EAP-IG
    masks = circuits.ablated(p.arch, todo)  # [circuit, reader, writer]: unknown edge names are refused there
    out = runner.run(trace, model, p, masks=masks, ablation=ablation, order=order, remote=remote, backend=backend,
                     batch_size=batch_size if ablation in ("patch", "zero") else len(p))  # across pairs: one batch
    return circuits.faithfulness_result(p, out, todo, ablation=ablation, units=UNITS, title=TITLE,
                                        drawn=(order, seed) if ablation == "resample" else None)


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
