"""Expert attribution: direct logit attribution with each mixture-of-experts MLP split per expert.

Elhage et al. 2021 (DLA) on mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS). A
MoE block writes ``sum_e g_e(x) E_e(x)``: the router's weight ``g_e`` (0 outside the top-k) times
expert e's output, plus, on Qwen2-MoE, a shared expert ``sigmoid(w . x) S(x)`` every token uses.
Each term goes through the final norm at its measured, frozen scale, so the embeddings, each
layer's attention, its experts (shared too) and its rest, and ``bias`` sum to the logit (pre-soft-cap).

``L{i}E{e}``: expert e's weighted write at layer i (0 where the router did not pick it);
``L{i}shared``: the gated shared expert's write (only where the spec names one);
``{i}_mlp_rest``: the MLP write less its experts' (float rounding); a layer's experts plus its
rest are DLA's ``{i}_mlp_out``. On a dense model there are no experts and ``{i}_mlp_out`` is the
whole MLP: plain DLA by component. Each expert is re-run on the read position only, by the model's
own experts module, with every other expert's routing weight set to 0 (the block is linear in the
routing weights); the shared expert and its gate, by their own modules on the same input.
Returns ``[prompt, component]``; ``per_prompt["routing"]``: the router's weights [layer][expert].
Wire: only the scores and the routing weights come back.

    python recipes/expert_attribution.py --prompt "..." --target " Paris"
"""

from __future__ import annotations

from typing import Sequence

import nnsight
import torch

from nnattr import runner
from nnattr.batch import Batch
from nnattr.kernels import (  # kernels by name: they travel to NDIF
    bias_term, direct_logit, first, inverse_softcap, logit_diff, logit_direction, norm_scale, read_at,
    residual_direction)
from nnattr.result import Attribution, sum_error

TITLE, UNITS, ALIASES = "Expert attribution", "direct effect (logits)", ("experts",)


def trace(model, batch: Batch, *, remote=False, backend=None) -> dict:
    """One forward: residual writes at the read position, each MoE write split per expert."""
    a, target, other, at = batch.arch, batch.answer("target"), batch.answer("distractor"), batch.columns
    embeds, norm, offset, eps, cap = a.embeddings, a.norm, a.norm_weight_offset, a.eps, a.logit_softcap
    n_experts, inputs, has_shared, gated = a.n_experts, batch.inputs, a.shared_expert, a.shared_expert_gate
    with model.session(remote=remote, backend=backend):  # no_grad inside the session: it runs where the model does
        with torch.no_grad(), model.trace(inputs):
            writes = [read_at(first(getattr(model, name).output), at) for name in embeds]  # [batch, d_model] each
            routing = []
            for layer in model.layers:
                writes.append(read_at(first(layer.attn_out.output), at))
                if n_experts:  # the experts' inputs: [batch * pos, d_model], then [batch * pos, k] twice
                    h, index, weight = layer.mlp.experts.inputs[0]
                    h, index, weight = [read_at(x.view(at.shape[0], -1, x.shape[-1]), at) for x in (h, index, weight)]
                    ids = torch.arange(n_experts, device=index.device)[:, None, None]  # [expert, 1, 1]
                    gates = (index[None] == ids) * weight[None]  # [expert, batch, k]: one expert's weights each
                    per = layer.mlp.experts(h.repeat(n_experts, 1), index.repeat(n_experts, 1), gates.flatten(0, 1))
                    per = per.view(n_experts, at.shape[0], -1)  # [expert, batch, d_model]
                    routing.append(gates.sum(-1).T)  # [batch, expert]
                    shared = [layer.mlp.shared_expert(h)] if has_shared else []  # every token's: [batch, d_model]
                    if gated:  # its gate: one logit, through a sigmoid
                        shared = [torch.sigmoid(layer.mlp.shared_expert_gate(h)) * shared[0]]
                mlp = read_at(first(layer.mlp_out.output, len(at)), at)  # [batch, d_model] (OPT's: flattened)
                writes += [*per, *shared, mlp - per.sum(0) - sum(shared)] if n_experts else [mlp]
            scale = norm_scale(read_at(model.ln_f.input, at), norm=norm, eps=eps)  # measured, then frozen
            final = inverse_softcap(read_at(model.output.logits, at).float(), cap)  # [batch, vocab]
            answer = final.argmax(-1) if target is None else target.to(final.device)
            out = {"target": answer.cpu(), "logit": logit_diff(final[:, None], answer, other).cpu()}  # [batch] each
            direction, bias = logit_direction(model.lm_head.weight, answer, other, unembed_bias=model.lm_head.bias)
            u = residual_direction(direction, model.ln_f.weight, norm=norm, weight_offset=offset)
            constant = bias_term(direction, bias, getattr(model.ln_f, "bias", None))  # [batch]
            out["scores"] = torch.cat([direct_logit(torch.stack(writes), u, scale), constant[None]]).T.cpu()
            out["routing"] = (torch.stack(routing, 1) if routing else torch.zeros(at.shape[0], 0, 0)).float().cpu()
            out = nnsight.save(out)
    return out


def run(model, prompts, target=None, distractor=None, *, position: int | Sequence[int] = -1,
        batch_size: int | None = None, remote=False, backend=None) -> Attribution:
    """DLA of the logit for ``target`` minus ``distractor``'s, each MoE MLP split per expert (module doc).

    target: the answer token (default: the model's top prediction).
    distractor: subtract this token's logit (a logit difference).
    position: the token whose logit is read: -1 the last, 0 the first; one per prompt, or one for all.
    """
    batch = Batch.of(model, prompts, target, distractor).at(position)
    out = runner.run(trace, model, batch, batch_size=batch_size, remote=remote, backend=backend)
    batch.check_answers(out["target"])  # the model's own top prediction may be the distractor
    error = sum_error(out["scores"], out["logit"], what="expert attribution's components")
    a, n, e = batch.arch, batch.arch.n_layers, batch.arch.n_experts
    mlp = "rest" if e else "out"  # a dense model: the MLP is one write
    parts = [x for i in range(n) for x in (f"{i}_attn_out", *[f"L{i}E{j}" for j in range(e)],
                                           *[f"L{i}shared"] * a.shared_expert, f"{i}_mlp_{mlp}")]
    labels = {"prompt": batch.labels, "component": [*a.embeddings, *parts, "bias"]}
    return Attribution(
        out["scores"], tuple(labels), labels, method="expert_attribution", units=UNITS, tokens=batch.tokens,
        title=TITLE if e else f"{TITLE} (a dense model: no experts)", metric=batch.metric(out["target"]),
        meta={"logit_kind": "pre-softcap logit" if a.logit_softcap else "logit", "read_at": batch.read_at,
              "n_experts": e, "shared_expert": a.shared_expert, "sum_error": max(error)},
        per_prompt={"target": batch.decode(out["target"]), "logit": out["logit"].tolist(), "sum_error": error,
                    "position": list(batch.positions), "read_token": list(batch.read_tokens),
                    **({"routing": out["routing"].tolist()} if e else {}),
                    **({} if batch.distractor is None else {"distractor": batch.decode(batch.distractor)})},
    )


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
