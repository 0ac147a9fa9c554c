"""Feature patching: attribution patching of SAE features on clean/corrupted pairs.

Marks et al. 2024 (Sparse Feature Circuits); Nanda 2023. For each pair and feature ``f`` of an
SAE at a site (one, or several: one per layer), the effect of patching ``f``'s clean activation
into the corrupted run, the SAE error held fixed, is estimated to first order as

    score_f = (a_f(clean) - a_f(corrupted)) * (W_dec[f] . grad_x m(corrupted))

summed over positions (or per position, ``per_position=True``), with ``m`` the metric (default:
answer minus distractor logit at the last position), as `attribution_patching` signs it. Per SAE:
its ``top_k`` features by magnitude, ``other features`` (the sum of the rest) and ``error``
(the error term's own score ``grad . (err_clean - err_corrupted)``); the three sum to the estimate
of patching the whole site. One session: a clean forward, a corrupted forward and one backward.
Validated against exact patching of single features in tests/test_feature_attribution.py.
                                                              [prompt, component(, position)]
Wire: the SAE weights go with the request; only the top features' scores come back.

    python recipes/feature_patching.py --clean "..." --corrupted "..." --answer " Mary" --distractor " John"
"""

from __future__ import annotations

from typing import Literal

import nnsight
import torch

from nnattr import features, runner
from nnattr.kernels import (  # kernels by name: they travel to NDIF
    attribution_scores, feature_patching_scores, first, gradients, logit_diff, pair_delta, sae_decode, sae_encode,
    top_features)
from nnattr.pairs import Pairs, pairs

TITLE, UNITS = "Feature patching", "estimated effect (metric)"
EXTRA = ("other features", "error")


def trace(model, p: Pairs, *, saes: list, sites: list, top_k: int | None, per_position: bool, remote=False,
          backend=None) -> dict:
    """One session: the clean rows without gradients, then the corrupted rows and one backward."""
    n, metric, mask = len(p), p.metric, p.overlap()
    answer, other, copy = p.clean.answer("target"), p.clean.answer("distractor"), p.arch.writes_in_place
    last = {} if metric else {"logits_to_keep": 1}  # the default metric reads the last position only
    clean_rows, corrupted_rows = p.inputs_of(range(n), []), p.inputs_of([], range(n))
    with model.session(remote=remote, backend=backend):
        value = lambda logits: metric(logits).float() if metric else logit_diff(logits, answer, other)  # noqa: E731
        with torch.no_grad(), model.trace(clean_rows, **last):
            clean = {}  # sae index -> the site's activation [pair, pos, d_model], in forward order
            for layer, here in zip(model.layers, sites):
                for i, site in here:
                    clean[i] = layer.input if site == "resid_pre" else first(getattr(layer, site).output, n)
                    clean[i] = clean[i].clone() if copy else clean[i]  # Falcon adds into its MLP's output in place
            clean_metric = value(model.output.logits)  # [pair]
        with model.trace(corrupted_rows, **last):
            model.embed.output.requires_grad_(True)  # frozen hosted weights: start the graph here
            x, now = {}, {}  # now: the values as read
            for layer, here in zip(model.layers, sites):
                for i, site in here:
                    x[i] = layer.input if site == "resid_pre" else first(getattr(layer, site).output)
                    now[i] = first(x[i].detach().clone() if copy else x[i].detach(), n)  # OPT's MLP: unflattened
            values = value(model.output.logits)  # [pair]
            grads = gradients(values.sum(), [x[i] for i in range(len(saes))])
            grads = [g.view_as(now[i]) for i, g in enumerate(grads)]  # [pair, pos, d_model], as each site was read
            out = {"metric": torch.stack([clean_metric, values.detach()], 1).cpu()}  # [pair, clean / corrupted]
            for i, sae in enumerate(saes):
                a_clean, a_corrupted = sae_encode(clean[i], sae), sae_encode(now[i], sae)  # [pair, pos, d_sae]
                scores = feature_patching_scores(grads[i], a_clean, a_corrupted, sae, mask)  # [pair, pos, d_sae]
                error = attribution_scores(grads[i], pair_delta(clean[i].float() - sae_decode(a_clean, sae),
                                                                now[i].float() - sae_decode(a_corrupted, sae),
                                                                mask))  # [pair, pos]
                scores, error = (scores, error) if per_position else (scores.sum(1), error.sum(1))
                top, index = top_features(scores, top_k)  # [pair, k]: index into (pos,) feature
                kept = torch.zeros_like(scores).flatten(1).scatter(1, index, top).view_as(scores)  # the top entries
                rest = (scores - kept).sum(-1)  # [pair(, pos)]: the other features' share
                out[f"values{i}"], out[f"index{i}"] = top.detach().cpu(), index.cpu()
                out[f"terms{i}"] = torch.stack([rest, error], 1).detach().cpu()  # [pair, 2(, pos)]
            out = nnsight.save(out)
    return out


def run(model, clean, corrupted, answer=None, distractor=None, *, sae: features.SAEs | None = None, metric=None,
        top_k: int | Literal["all"] | None = 20, per_position: bool = False, align: Literal["right"] | None = None,
        batch_size: int | None = None, remote=False, backend=None) -> features.Attribution:
    """Estimated effect of patching each SAE feature from clean into corrupted, per pair (see the module doc).

    answer: the clean prompt's answer token; distractor: subtract its logit.
    metric: a function of the logits [batch, pos, vocab] -> [batch], replacing the logit difference.
    sae: an SAE, a SAELens folder, a shipped SAE ('tiny-ioi'), 'basis' (the residual basis), or a list in Python.
    top_k: features kept per SAE and pair, by magnitude ('all' or None: all); per position: (position, feature).
    per_position: score each feature at each position instead of summed over positions.
    align: "right" compares pairs of unequal length per position, aligned at the last token.
    """
    top_k = None if top_k == "all" else top_k
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: give a positive int (features per SAE and pair), or 'all' (or None)")
    p = pairs(model, clean, corrupted, answer, distractor, metric=metric, align=align,  # features are per position:
              nodes=("resid",))  # pairs of unequal length need align="right", summed or not
    saes = features.resolve(model, sae)
    out = runner.run(trace, model, p, saes=[s.tensors() for s in saes], sites=features.plan(saes, p.arch.n_layers),
                     top_k=top_k, per_position=bool(per_position), batch_size=batch_size, remote=remote,
                     backend=backend)
    p.check_metrics(out["metric"].T, recovery=False)
    width = max(p.corrupted.lengths)
    answers = {r: p.clean.decode(getattr(p.clean, r)) for r in ("target", "distractor") if getattr(p.clean, r)}
    return features.result(
        saes, out, EXTRA, labels={"prompt": list(p.clean.labels), "position": [str(i - width) for i in range(width)]},
        keep=p.overlap()[:, -width:] if per_position else None, method="feature_patching", by="feature",
        units=UNITS, tokens=p.corrupted.tokens, title=f"{TITLE} ({', '.join(s.name for s in saes)})",
        metric=p.clean.metric() if metric is None else "custom metric",
        meta={"top_k": top_k, "per_position": bool(per_position), **({"align": align} if align else {})},
        per_prompt={"clean_metric": out["metric"][:, 0].tolist(), "corrupted_metric": out["metric"][:, 1].tolist(),
                    **{"answer" if r == "target" else r: v for r, v in answers.items()}})


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
