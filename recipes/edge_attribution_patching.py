"""Edge attribution patching: the gradient estimate of patching each edge between two components.

Syed et al. 2023 (EAP); Hanna et al. 2024 (EAP-IG). An edge runs from a writer ``w`` (an embedding, a head, an
MLP) to a reader ``r`` downstream (a head's query, a kv head's key or value, an MLP, the logits: `nnattr.circuits`).
Patching it from the clean run into the corrupted one is estimated as

    score(w -> r) = sum over positions of (w_clean - w_corrupted) . d m / d x_r

``x_r`` the reader's own copy of the residual stream, at the corrupted run (``method="atp"``) or averaged over
``steps`` points from the corrupted to the clean input embeddings (``"ig"``). A reader's gradient is rebuilt from
its projection's output gradient through its pre-norm's exact Jacobian, a head's change from its output
projection's input, one layer at a time: no ``[batch, pos, writer, d_model]`` buffer (`nnattr.kernels.edges`).
Wire: only the scores come back (``top_k``: each pair's largest).        [prompt, writer, reader], NaN: no edge

    python recipes/edge_attribution_patching.py --clean "..." --corrupted "..." --answer " Mary" --distractor " John"
"""

from __future__ import annotations

from typing import Literal

import nnsight
import torch

from nnattr import circuits, runner
from nnattr.kernels import (  # kernels by name: they travel to NDIF
    edges_into, first, gradients, interpolate, layer_readers, logit_diff, pair_delta, path_mean, top_edges)
from nnattr.pairs import Pairs, count, pairs

TITLE, UNITS = "Edge attribution patching", "estimated effect (metric)"


def trace(model, p: Pairs, *, steps: int, top_k: int | None, remote=False, backend=None) -> dict:
    """Clean rows (IG: and corrupted) without gradients, the gradient's rows, one backward; edges per reader layer."""
    n, a, metric, mask = len(p), p.arch, p.metric, p.overlap()
    answer, other, alphas = p.clean.answer("target"), p.clean.answer("distractor"), (torch.arange(steps) + 0.5) / steps
    shape = {**a.qkv_shape, **a.norm_shape, "conv1d": a.o_proj_conv1d}  # layout and norms, for the kernels
    embeds, exact, parallel, normed, n_layers = a.embeddings, a.head_exact, a.parallel, a.pre_norms, a.n_layers
    last = {} if metric else {"logits_to_keep": 1}  # the default metric reads the last position only
    plain, path = p.inputs_of(range(n), range(n) if steps else []), p.inputs_of([], list(range(n)) * max(steps, 1))
    rows = [len(inputs["input_ids"]) for inputs in (plain, path)]
    with model.session(remote=remote, backend=backend):
        value = lambda logits, k: metric(logits).float() if metric else logit_diff(  # noqa: E731 [rows]
            logits, answer.repeat(k), None if other is None else other.repeat(k))
        with torch.no_grad(), model.trace(plain, **last):
            emb = model.embed.output if steps else None  # IG: [clean, corrupted, pos, d_model]
            was = [[first(getattr(model, e).output).expand(rows[0], -1, -1) for e in embeds], [], []]
            for layer in model.layers:  # writers: the embeddings, each output projection's input, each MLP's write
                was[1].append(layer.attn.o_proj.input)
                was[2].append(first(layer.mlp_out.output, rows[0]).clone())  # a copy: Falcon adds into it in place
            base_metric = value(model.output.logits, rows[0] // n)  # [clean (, corrupted)]
        with model.trace(path, **last):
            x = interpolate(emb[:n], emb[n:], mask, alphas) if steps else model.embed.output  # IG: the path's points
            model.embed.output = x.requires_grad_(True)  # frozen hosted weights: start the graph here
            now = [[first(getattr(model, e).output).detach().expand(rows[1], -1, -1) for e in embeds], [], []]
            stream, qkv, mlp_in, post = [], [], [], []  # per layer: the stream attention reads, then the MLP
            for layer in model.layers:
                stream.append(layer.input.detach())
                qkv.append([layer.attn.q_proj.output, layer.attn.k_proj.output, layer.attn.v_proj.output])
                now[1].append(layer.attn.o_proj.input.detach())
                post.append(None if exact else (path_mean(layer.attn_out.input.detach(), steps=steps),
                                                       layer.attn_out.weight))  # a norm after attention: its scale
                stream.append(stream[-1] if parallel else stream[-1] + first(layer.attn_out.output, rows[1]).detach())
                mlp_in.append(layer.mlp_in.input.clone())  # the MLP's own copy: its gradient is the MLP reader's
                layer.mlp_in.input = mlp_in[-1]
                now[2].append(first(layer.mlp_out.output, rows[1]).detach().clone())
            final = model.ln_f.input  # the logits read the last residual stream through the final norm
            values = value(model.output.logits, max(steps, 1))  # [rows]
            grads = gradients(values.sum(), [t for three in qkv for t in three] + mlp_in + [final])
            out = {"metric": torch.stack([base_metric[:n], base_metric[n:] if steps else values.detach()], 1).cpu()}
            delta = [[pair_delta(b[:n], b[n:] if steps else c, mask) for b, c in zip(*pair)]
                     for pair in zip(was, now)]  # the embeddings', output projections' inputs', MLP writes' changes
            writers = dict(embeds=torch.stack(delta[0], 2), z=delta[1], mlps=delta[2], parallel=parallel, post=post,
                           W_O=[layer.attn.o_proj.weight for layer in model.layers], **shape)
            scores = []  # per reader layer, then the logits: [pair, writer, reader]
            for i, layer in enumerate(model.layers):  # [pair, pos, reader, d_model]: its attention readers, its MLP
                g = layer_readers([*grads[3 * i : 3 * i + 3], grads[3 * n_layers + i]], [layer.attn.q_proj.weight,
                                  layer.attn.k_proj.weight, layer.attn.v_proj.weight], stream[2 * i : 2 * i + 2],
                                  [layer.attn_norm.weight, layer.mlp_norm.weight] if normed else [None, None],
                                  steps=steps, **shape)
                scores.append(edges_into(g, layer=i, **writers))
            scores.append(edges_into(path_mean(grads[-1][:, :, None], steps=steps), layer=n_layers, **writers))
            scores = torch.cat(scores, 2).cpu()
            if top_k:  # each pair's largest: values [pair, k], (writer, reader) indices [pair, k, 2]
                scores, out["index"] = top_edges(scores, top_k)
            out["scores"] = scores
            out = nnsight.save(out)
    return out


def run(model, clean, corrupted, answer=None, distractor=None, *, metric=None, method: Literal["atp", "ig"] = "atp",
        steps: int | None = None, top_k: int | None = None, batch_size: int | None = None, remote=False,
        backend=None) -> circuits.Attribution:
    """Estimated effect of patching each edge from clean into corrupted, per pair (see the module doc).

    answer: the clean prompt's answer token; distractor: subtract its logit.
    metric: a function of the logits [batch, pos, vocab] -> [batch], replacing the logit difference.
    method: plain gradient (atp) or integrated gradients (ig).
    steps: interpolation steps for method=ig (default 5).
    top_k: return only each pair's top_k edges by magnitude (the rest NaN): for large models.
    """
    if method not in ("atp", "ig") or (method == "atp" and steps is not None):
        raise ValueError(f"method={method!r}, steps={steps}: expected 'atp' (no steps), or 'ig' with steps >= 1")
    m, k = count(steps, "steps", default=5) if method == "ig" else 0, None if top_k is None else count(top_k, "top_k")
    p = pairs(model, clean, corrupted, answer, distractor, metric=metric, nodes=("attn",), align=None)  # summed
    p.arch.require_readers(TITLE)
    out = runner.run(trace, model, p, steps=m, top_k=k, batch_size=batch_size, remote=remote, backend=backend)
    return circuits.edge_result(p, out, method=method, steps=m, top_k=k, units=UNITS,
                                title=f"{TITLE} ({f'EAP-IG, {m} steps' if m else 'EAP'})")


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
