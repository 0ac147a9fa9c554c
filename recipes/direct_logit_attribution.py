"""Direct logit attribution: each residual write's share of the logit (or logit difference).

Elhage et al. 2021, A Mathematical Framework for Transformer Circuits. The final norm is handled
exactly: its scale is measured on the real forward pass and frozen, so the components plus the
``bias`` component sum to the model's logit (pre-soft-cap on Gemma-2). See docs/methods/dla.md.

by="component": embedding(s), each layer's attention and MLP output, bias.
by="layer":     embedding(s), each layer's attention + MLP, bias.
by="head":      each head (the attention output projection's bias is left out).
by="head_position": each head split by the source position it reads from.

Remote: only the scores cross the wire ([prompt, component] floats, or [prompt, layer, head(,
position)]); the residual writes stay on the server.

    python -m nnattr.recipes.direct_logit_attribution --prompt "..." --target " Mary"
"""

from __future__ import annotations

from typing import Literal, Sequence

import nnsight
import torch

from nnattr.kernels import (  # by name, not the module: docs/remote.md
    bias_term, direct_logit, expand_kv, first, head_direct_logit, head_position_direct_logit, inverse_softcap,
    logit_direction, norm_scale, o_proj_per_head, residual_direction, split_heads, split_values,
)
from nnattr.arch import dims, require_exact_heads, spec_for
from nnattr.inputs import Prompts, Token, as_prompts, check_unknown, map_chunks, right_align, token_ids, tokens_of
from nnattr.loading import require_probabilities
from nnattr.result import Attribution

By = Literal["component", "layer", "head", "head_position"]


def run(
    model,
    prompts: Prompts,
    target: Token | Sequence[Token] | None = None,
    distractor: Token | Sequence[Token] | None = None,
    *,
    by: By = "component",
    batch_size: int | None = None,
    remote: bool = False,
    backend=None,
) -> Attribution:
    """DLA of the last token's logit for ``target`` (default: the model's top prediction),
    minus ``distractor``'s when given. Returns ``[prompt, ...]`` scores (see module doc)."""
    if by not in ("component", "layer", "head", "head_position"):
        raise ValueError(f"by={by!r}; expected 'component', 'layer', 'head' or 'head_position'")
    spec, d = spec_for(model), dims(model)
    if by in ("head", "head_position"):
        require_exact_heads(spec, f"DLA by {by}")
    if by == "head_position":
        require_probabilities(model, "DLA by head and position")
    prompts = as_prompts(prompts)
    check_unknown(model.tokenizer, prompts)
    targets = token_ids(model.tokenizer, target, len(prompts), role="target")
    distractors = token_ids(model.tokenizer, distractor, len(prompts), role="distractor")
    tokens = [tokens_of(model.tokenizer, p) for p in prompts]
    length = max(len(t) for t in tokens)

    def step(start, chunk):
        stop = start + len(chunk)
        return _trace(
            model, chunk, by=by, spec=spec, d=d, remote=remote, backend=backend,
            target=None if targets is None else torch.tensor(targets[start:stop]),
            distractor=None if distractors is None else torch.tensor(distractors[start:stop]),
        )

    scores, answers, logits = [], [], []
    for start, chunk, out in map_chunks(step, prompts, batch_size=batch_size, desc="DLA", model=model,
                                        remote=remote, backend=backend):
        stop = start + len(chunk)
        scores += list(out["scores"]) if by != "head_position" else [
            s[..., -len(t):] for s, t in zip(out["scores"], tokens[start:stop])
        ]
        answers += out["target"].tolist()
        logits += out["logit"].tolist()

    n = d.n_layers
    embeds = list(spec.embeddings)
    if by == "component":
        labels = embeds + [f"{i}_{part}" for i in range(n) for part in ("attn_out", "mlp_out")] + ["bias"]
        values, extra = torch.stack(scores), {"component": labels}
    elif by == "layer":
        comp = torch.stack(scores)  # [prompt, embeds + 2 * layer + 1]
        e = len(embeds)
        per_layer = comp[:, e:-1].reshape(len(prompts), n, 2).sum(-1)  # [prompt, layer]
        values = torch.cat([comp[:, :e], per_layer, comp[:, -1:]], dim=1)
        extra = {"layer": embeds + [f"L{i}" for i in range(n)] + ["bias"]}
    else:
        values = torch.stack(scores) if by == "head" else right_align(scores, length)
        extra = {"layer": [f"L{i}" for i in range(n)], "head": [f"H{h}" for h in range(d.n_heads)]}
        if by == "head_position":
            extra["position"] = [str(p - length) for p in range(length)]
    meta = {
        "method": f"direct_logit_attribution[{by}]",
        "target": [model.tokenizer.decode([t]) for t in answers],
        "distractor": None if distractors is None else [model.tokenizer.decode([t]) for t in distractors],
        "logit": logits,
        "logit_kind": "pre-softcap logit" if d.logit_softcap else "logit",
    }
    dims_ = ("prompt",) + tuple(extra)
    return Attribution(values, dims_, {"prompt": prompts, **extra}, meta, tuple(map(tuple, tokens)))


def _trace(model, prompts, *, by, spec, d, target, distractor, remote, backend):
    # Plain values only inside the trace: it may run on a server where nnattr is not installed.
    embed_names = spec.embeddings
    norm, offset, eps, cap = spec.norm, spec.norm_weight_offset, d.eps, d.logit_softcap
    n_heads, n_kv, d_head, conv1d, layout = d.n_heads, d.n_kv_heads, d.d_head, spec.o_proj_conv1d, spec.value_layout
    heads, positions = by in ("head", "head_position"), by == "head_position"

    with torch.no_grad(), model.trace(prompts, remote=remote, backend=backend):
        writes = [first(getattr(model, name).output)[:, -1] for name in embed_names]
        z, W_O, rows, values = [], [], [], []
        for layer in model.layers:
            if positions:
                raw = layer.attn.v_proj.output  # [batch, pos, width]
                values.append(split_values(raw, layout=layout, n_heads=n_heads, n_kv_heads=n_kv, d_head=d_head))
            if heads:
                z.append(split_heads(layer.attn.o_proj.input[:, -1], n_heads=n_heads))  # [batch, head, d_head]
                W_O.append(o_proj_per_head(layer.attn.o_proj.weight, n_heads=n_heads, conv1d=conv1d))
            if positions:
                rows.append(layer.attn.output[1][:, :, -1])  # [batch, head, key]
            writes.append(first(layer.attn_out.output)[:, -1])
            writes.append(first(layer.mlp_out.output)[:, -1])
        resid = model.ln_f.input[:, -1]  # [batch, d_model]
        final = model.output.logits[:, -1].float()  # [batch, vocab]

        answer = final.argmax(-1) if target is None else target.to(final.device)
        other = None if distractor is None else distractor.to(final.device)
        direction, bias = logit_direction(
            model.lm_head.weight, answer, other, unembed_bias=getattr(model.lm_head, "bias", None)
        )
        u = residual_direction(direction, model.ln_f.weight, norm=norm, weight_offset=offset)
        scale = norm_scale(resid, norm=norm, eps=eps)
        if heads:
            if positions:
                parts = [
                    head_position_direct_logit(r, expand_kv(v, n_heads=n_heads), w, u, scale)
                    for r, v, w in zip(rows, values, W_O)
                ]
            else:
                parts = [head_direct_logit(h, w, u, scale) for h, w in zip(z, W_O)]
            scores = torch.stack(parts, dim=1)  # [batch, layer, head(, key)]
        else:
            constant = bias_term(direction, bias, getattr(model.ln_f, "bias", None))
            # Broadcast: GPT-2's position embedding is [1, d_model] when no row is padded.
            writes = torch.stack(torch.broadcast_tensors(*writes))  # [component, batch, d_model]
            scores = torch.cat([direct_logit(writes, u, scale), constant[None]]).T
        logit = inverse_softcap(final, cap).gather(-1, answer[:, None])[:, 0]
        if other is not None:
            logit = logit - inverse_softcap(final, cap).gather(-1, other[:, None])[:, 0]
        out = nnsight.save({"scores": scores.detach().cpu(), "target": answer.cpu(), "logit": logit.detach().cpu()})
    return out


def main(argv=None):
    from nnattr.cli import recipe_main

    return recipe_main("direct_logit_attribution", argv)


if __name__ == "__main__":
    raise SystemExit(main())
