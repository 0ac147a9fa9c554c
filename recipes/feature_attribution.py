"""Feature attribution: each SAE feature's direct share of the logit (or logit difference).

Direct logit attribution through the final norm (Elhage et al. 2021) of the features of sparse
autoencoders (Cunningham et al. 2023; Bricken et al. 2023), one or several (one per layer).
The norm's scale is measured on the real forward pass and frozen, so at the read position the
SAE site's activation ``x = sum_f a_f W_dec[f] + b_dec + error`` splits the logit exactly:

    logit = sum_f a_f (W_dec[f] . u) / s  +  b_dec . u / s  +  (x - x_hat) . u / s  +  rest

``rest`` is what the residual holds besides ``x`` (for ``resid_pre`` at layer L: the writes of
layers >= L), plus the norm and unembedding biases. Per SAE: its ``top_k`` features by magnitude,
``other features`` (the sum of the rest), ``b_dec``, ``error`` and ``rest``, which sum to the
logit (meta["sum_error"]).                                                       [prompt, component]
Wire: the SAE weights go with the request; only the top features' scores come back.

    python recipes/feature_attribution.py --prompt "..." --target " Mary" --distractor " John"
"""

from __future__ import annotations

from typing import Literal, Sequence

import nnsight
import torch

from nnattr import features, runner
from nnattr.batch import Batch
from nnattr.kernels import (  # kernels by name: they travel to NDIF
    bias_term, direct_logit, feature_direct_logit, first, inverse_softcap, logit_diff, logit_direction, norm_scale,
    read_at, residual_direction, sae_encode, top_features)

TITLE, UNITS = "Feature attribution", "direct effect (logits)"
EXTRA = ("other features", "b_dec", "error", "rest")


def trace(model, batch: Batch, *, saes: list, sites: list, top_k: int | None, remote=False, backend=None) -> dict:
    """One forward: each SAE's site at the read position, encoded; its features through the frozen norm."""
    a, target, other, at = batch.arch, batch.answer("target"), batch.answer("distractor"), batch.columns
    norm, offset, eps, cap, inputs = a.norm, a.norm_weight_offset, a.eps, a.logit_softcap, batch.inputs
    with model.session(remote=remote, backend=backend):  # no_grad inside the session: it runs where the model does
        with torch.no_grad(), model.trace(inputs):
            x = {}  # sae index -> [batch, d_model], read in forward order
            for layer, here in zip(model.layers, sites):
                for i, site in here:
                    site_out = layer.input if site == "resid_pre" else first(getattr(layer, site).output, len(at))
                    x[i] = read_at(site_out, at)  # [batch, d_model] (OPT's MLP write comes flattened)
            resid = read_at(model.ln_f.input, at)  # [batch, d_model]
            scale = norm_scale(resid, norm=norm, eps=eps)  # measured on this pass, then frozen
            final = inverse_softcap(read_at(model.output.logits, at).float(), cap)  # [batch, vocab]
            answer = final.argmax(-1) if target is None else target.to(final.device)
            out = {"target": answer.cpu(), "logit": logit_diff(final[:, None], answer, other).cpu()}  # [batch] each
            direction, bias = logit_direction(model.lm_head.weight, answer, other, unembed_bias=model.lm_head.bias)
            u = residual_direction(direction, model.ln_f.weight, norm=norm, weight_offset=offset)
            constant = bias_term(direction, bias, getattr(model.ln_f, "bias", None))  # [batch]
            for i, sae in enumerate(saes):
                scores, terms = feature_direct_logit(x[i], sae_encode(x[i], sae), sae, u, scale)  # [batch, d_sae]
                values, index = top_features(scores, top_k)  # [batch, k]
                rest = direct_logit((resid.float() - x[i].float())[None], u, scale)[0] + constant
                out[f"values{i}"], out[f"index{i}"] = values.cpu(), index.cpu()
                out[f"terms{i}"] = torch.cat([(scores.sum(-1) - values.sum(-1))[:, None], terms, rest[:, None]],
                                             1).cpu()  # [batch, 4]: other features, b_dec, error, rest
            out = nnsight.save(out)
    return out


def run(model, prompts, target=None, distractor=None, *, sae: features.SAEs | None = None,
        top_k: int | Literal["all"] | None = 20, position: int | Sequence[int] = -1, batch_size: int | None = None,
        remote=False, backend=None) -> features.Attribution:
    """DLA of each SAE feature at one position (see the module doc).

    target: the answer token (default: the model's top prediction).
    distractor: subtract this token's logit (a logit difference).
    sae: an SAE, a SAELens folder, a shipped SAE ('tiny-ioi'), 'basis' (the residual basis), or a list in Python.
    top_k: features kept per SAE and prompt, by magnitude ('all' or None: all).
    position: the token whose logit is read: -1 the last, 0 the first; one per prompt, or one for all.
    """
    top_k = None if top_k == "all" else top_k
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: give a positive int (features per SAE and prompt), or 'all' (or None)")
    batch = Batch.of(model, prompts, target, distractor).at(position)
    saes = features.resolve(model, sae)
    out = runner.run(trace, model, batch, saes=[s.tensors() for s in saes], top_k=top_k,
                     sites=features.plan(saes, batch.arch.n_layers), batch_size=batch_size, remote=remote,
                     backend=backend)
    batch.check_answers(out["target"])  # the model's own top prediction may be the distractor
    a = batch.arch
    return features.result(
        saes, out, EXTRA, labels={"prompt": batch.labels}, whole=out["logit"], method="feature_attribution",
        by="feature", units=UNITS, tokens=batch.tokens, title=f"{TITLE} ({', '.join(s.name for s in saes)})",
        metric=batch.metric(out["target"]),
        meta={"logit_kind": "pre-softcap logit" if a.logit_softcap else "logit", "read_at": batch.read_at,
              "top_k": top_k},
        per_prompt={"target": batch.decode(out["target"]), "logit": out["logit"].tolist(),
                    "position": list(batch.positions), "read_token": list(batch.read_tokens),
                    **({} if batch.distractor is None else {"distractor": batch.decode(batch.distractor)})})

if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
