"""AtP* on edges: edge attribution patching with the QK fix (and GradDrop), fewer false negatives from saturation.

Kramár et al. 2024 on Syed et al. 2023's edges (`nnattr.circuits`). An edge from writer ``w`` into a query or key
moves that reader's copy of the stream by ``delta_w`` (clean - corrupted), at every position: the pre-norm exactly,
the projection, rotary embedding and any QK-norm to first order, the softmax exactly (`nnattr.kernels.qk_edges`):

    score(w -> query of h) = sum over rows t of g[t] . (softmax(S[t] + dq_w[t] . k * scale) - A[t]),  g = dm/dA

A kv head's key moves every head it serves. Other edges (values, MLPs, logits) are plain EAP. ``grad_drop``: each
layer's residual-stream write's gradient dropped in turn, ``sum_l |score_l| / (L - 1)``. Wire: only the scores
(``top_k``: each pair's largest).                                              [prompt, writer, reader], NaN: no edge

    python recipes/edge_atp_star.py --clean "..." --corrupted "..." --answer " Mary" --distractor " John"
"""

from __future__ import annotations

import nnsight
import torch

from nnattr import circuits, runner
from nnattr.kernels import (  # kernels by name: they travel to NDIF
    dropped_gradients, edge_grad_drop, edges_into, first, layer_readers, logit_diff, pair_delta, qk_edges, top_edges,
    writer_deltas)
from nnattr.pairs import Pairs, count, pairs

TITLE, UNITS = "AtP* on edges", "estimated effect (metric)"


def trace(model, p: Pairs, *, grad_drop: bool, top_k: int | None, remote=False, backend=None) -> dict:
    """Clean rows (writers), corrupted rows and one backward (GradDrop: one more per layer); edges per reader layer."""
    n, a, metric, mask = len(p), p.arch, p.metric, p.overlap()
    answer, other = p.clean.answer("target"), p.clean.answer("distractor")
    shape = {**a.qkv_shape, **a.norm_shape, "conv1d": a.o_proj_conv1d}  # layout and norms, for the kernels
    embeds, exact, parallel, normed, n_layers = a.embeddings, a.head_exact, a.parallel, a.pre_norms, a.n_layers
    last = {} if metric else {"logits_to_keep": 1}  # the default metric reads the last position only
    clean_in, corrupted_in = p.inputs_of(range(n), []), p.inputs_of([], range(n))
    with model.session(remote=remote, backend=backend):
        value = lambda logits: metric(logits).float() if metric else logit_diff(logits, answer, other)  # noqa: E731
        with torch.no_grad(), model.trace(clean_in, **last):
            was = [[first(getattr(model, e).output).expand(n, -1, -1) for e in embeds], [], []]
            for layer in model.layers:  # writers: the embeddings, each output projection's input, each MLP's write
                was[1].append(layer.attn.o_proj.input)
                was[2].append(first(layer.mlp_out.output, n).clone())  # a copy: Falcon adds into it in place
            clean_metric = value(model.output.logits)
        with model.trace(corrupted_in, **last):
            model.embed.output.requires_grad_(True)  # frozen hosted weights: start the graph here
            now = [[first(getattr(model, e).output).detach().expand(n, -1, -1) for e in embeds], [], []]
            stream, reads, attn, post, outs, writes = [], [], [], [], [], []  # per layer
            for layer in model.layers:
                interface, start = layer.attn.source.attention_interface_1, layer.input  # (instrumented first)
                stream.append(start.detach())
                y = layer.attn.q_proj.input  # what the projections read: the forward-mode product starts here
                proj = [layer.attn.q_proj.output, layer.attn.k_proj.output, layer.attn.v_proj.output]
                args, kwargs = interface.inputs  # q, k (after rotary embeddings), v, the mask; the scale
                attn.append((y, args[1], args[2], args[3].detach(), args[4], kwargs.get("scaling")))
                reads.append(proj + [layer.attn.o_proj.input])
                now[1].append(reads[-1][-1].detach())
                post.append(None if exact else (layer.attn_out.input.detach(), layer.attn_out.weight))
                stream.append(stream[-1] if parallel else stream[-1] + first(layer.attn_out.output, n).detach())
                reads[-1].append(layer.mlp_in.input.clone())  # the MLP's own copy: its gradient is the MLP reader's
                layer.mlp_in.input = reads[-1][-1]
                now[2].append(first(layer.mlp_out.output, n).detach().clone())
                outs.append(first(layer.output))
                writes.append(outs[-1] - start)  # the layer's contribution to the residual stream
            final = model.ln_f.input  # the logits read the last residual stream through the final norm
            values = value(model.output.logits)
            out = {"metric": torch.stack([clean_metric, values.detach()], 1).cpu()}  # [pair, clean / corrupted]
            runs = dropped_gradients(values.sum(), [t for r in reads for t in r] + [final], writes, outs,
                                     grad_drop=grad_drop, layers=[i // 5 for i in range(5 * n_layers)] + [n_layers],
                                     retain_graph=True)  # [run][q, k, v, o_proj input, MLP input per layer; final]
            delta = [[pair_delta(b, c, mask) for b, c in zip(*pair)] for pair in zip(was, now)]
            writers = dict(embeds=torch.stack(delta[0], 2), z=delta[1], mlps=delta[2], parallel=parallel, post=post,
                           W_O=[layer.attn.o_proj.weight for layer in model.layers], **shape)
            scores = [[] for _ in runs]  # [run][reader layer, then the logits]: [pair, writer, reader]
            for i, layer in enumerate(model.layers):
                norms = [layer.attn_norm.weight, layer.mlp_norm.weight] if normed else [None, None]
                qk = qk_edges(writer_deltas(upto=i, **writers), stream[2 * i], norms[0], *attn[i],
                              [r[5 * i + 3] for r in runs], **shape)  # [run, pair, writer, query or key reader]
                for r, g_run in enumerate(runs):
                    g = layer_readers([*g_run[5 * i : 5 * i + 3], g_run[5 * i + 4]], [layer.attn.q_proj.weight,
                                      layer.attn.k_proj.weight, layer.attn.v_proj.weight], stream[2 * i : 2 * i + 2],
                                      norms, **shape)
                    scores[r].append(edges_into(g, layer=i, fixed=qk[r], **writers))  # EAP; the QK fix where it applies
            scores = [torch.cat(s + [edges_into(g_run[-1][:, :, None], layer=n_layers, **writers)], 2)
                      for s, g_run in zip(scores, runs)]  # then the logits
            out["scores"] = (edge_grad_drop(scores) if grad_drop else scores[0]).cpu()  # GradDrop: mean magnitudes
            if top_k:  # each pair's largest: values [pair, k], (writer, reader) indices [pair, k, 2]
                out["scores"], out["index"] = top_edges(out["scores"], top_k)
            out = nnsight.save(out)
    return out


def run(model, clean, corrupted, answer=None, distractor=None, *, metric=None, grad_drop: bool = False,
        top_k: int | None = None, batch_size: int | None = None, remote=False, backend=None) -> circuits.Attribution:
    """AtP* estimate of patching each edge from clean into corrupted, per pair (see the module doc).

    answer: the clean prompt's answer token; distractor: subtract its logit.
    metric: a function of the logits [batch, pos, vocab] -> [batch], replacing the logit difference.
    grad_drop: GradDrop: average over layers the magnitude of the score with that layer's gradient dropped.
    top_k: return only each pair's top_k edges by magnitude (the rest NaN): for large models.
    """
    p = pairs(model, clean, corrupted, answer, distractor, metric=metric, nodes=("attn",), align=None)  # summed
    p.arch.require_readers(TITLE)
    p.arch.require_softmax(TITLE, instead="edge_attribution_patching (plain AtP)")
    if not isinstance(grad_drop, bool) or grad_drop and p.arch.n_layers < 2:
        raise ValueError(f"grad_drop={grad_drop!r}: True or False (True needs 2 layers or more: it averages over them)")
    k = None if top_k is None else count(top_k, "top_k")
    out = runner.run(trace, model, p, grad_drop=bool(grad_drop), top_k=k, batch_size=batch_size, remote=remote,
                     backend=backend)
    return circuits.edge_result(p, out, method="atp*", steps=0, top_k=k, units=UNITS, recipe="edge_atp_star", meta={
        "grad_drop": bool(grad_drop)}, title=f"{TITLE} ({'QK fix + GradDrop, magnitudes' if grad_drop else 'QK fix'})")


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
