"""Token attribution: each input token's share of the logit of ``target`` (minus ``distractor``'s).

``x_p``: the vector entering the residual stream at position ``p`` (layer 0's input: token plus
position embedding, where the model has one); ``f``: the metric, read at the last token or ``position``.
``ig``: integrated gradients (Sundararajan et al. 2017) from a baseline ``b`` (zero; or each token pad
or BOS, positions kept), ``(x_p - b_p) . mean grad_{x_p} f`` by the right Riemann sum on ``steps``
intervals, the ``steps + 1`` points one batch in one trace; ``Σ_p = f(x) - f(b)`` up to its error,
reported, warned about above 5%. ``grad_x_input``: ``grad_{x_p} f . x_p``. ``attention``: the direct path
through the heads' value reads, summed over heads and layers per source. Wire: scores and metrics only.

    python recipes/token_attribution.py --prompt "..." --target " Mary" --distractor " John" --method ig
"""

from __future__ import annotations

from typing import Literal, Sequence

import nnsight
import torch

from nnattr import runner
from nnattr.batch import Batch
from nnattr.kernels import (  # kernels by name: they travel to NDIF
    gradients, ig_path, integrated_gradients, logit_diff, logit_direction, norm_scale, read_at, residual_direction,
    source_direct_logit, token_scores)
from nnattr.result import Attribution, completeness_error

TITLE, UNITS = "Token attribution", "contribution to the metric (logits)"
HOW = {"ig": "integrated gradients, {steps} steps, {baseline} baseline", "grad_x_input": "gradient × input",
       "attention": "direct path through attention"}


def trace(model, batch: Batch, *, method: str, steps: int, baseline: str, remote=False, backend=None) -> dict:
    """IG: one trace of ``steps + 1`` copies and one backward; grad × input: one copy; attention: one forward."""
    a, at, inputs, n, m = batch.arch, batch.columns, batch.inputs, len(batch), steps * (method == "ig")
    target, other, mask = batch.answer("target"), batch.answer("distractor"), inputs["attention_mask"]
    norm, offset, eps, heads = a.norm, a.norm_weight_offset, a.eps, dict(  # the attention's layout, for the kernel
        layout=a.value_layout, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, d_head=a.d_head, conv1d=a.o_proj_conv1d)
    if method == "attention":
        with model.session(remote=remote, backend=backend):  # no_grad inside the session: it runs where the model does
            with torch.no_grad(), model.trace(inputs):
                reads = [(layer.attn.v_proj.output, layer.attn.o_proj.weight,  # the read query's row [batch, head, key]
                          read_at(layer.attn.output[1].transpose(1, 2), at)) for layer in model.layers]
                scale = norm_scale(read_at(model.ln_f.input, at), norm=norm, eps=eps)  # measured, then frozen
                final = read_at(model.output.logits, at).float()  # [batch, vocab]
                answer = final.argmax(-1) if target is None else target.to(final.device)
                direction, _ = logit_direction(model.lm_head.weight, answer, other)
                u = residual_direction(direction, model.ln_f.weight, norm=norm, weight_offset=offset)
                scores = sum(source_direct_logit(row, v, w, u, scale, **heads) for v, w, row in reads)  # [batch, key]
                out = nnsight.save({"scores": scores.cpu(), "target": answer.cpu(),  # [batch, key], [batch] x 2
                                    "metric": logit_diff(final[:, None], answer, other).cpu()})
        return out
    ids, fill = inputs["input_ids"], {"pad": batch.pad_id, "bos": batch.tokenizer.bos_token_id}.get(baseline)
    blocks = [ids if fill is None else torch.where(mask.bool(), fill, ids)] + [ids] * m if m else [ids]  # step-major
    rows, k = {"input_ids": torch.cat(blocks), "attention_mask": mask.repeat(len(blocks), 1)}, len(blocks)
    with model.trace(rows, remote=remote, backend=backend):
        tokens = model.embed.output.detach()  # [(block batch), pos, d_model]: the token embeddings
        x = model.layers[0].input.detach()  # what enters the residual stream: tokens (+ positions)
        end, base = x[-n:], x[:n] - tokens[:n] if baseline == "zero" else x[:n]  # baselines keep positions
        path = (ig_path(end, base, steps=m) if m else end).clone().requires_grad_(True)  # the graph starts here
        model.layers[0].input = path
        final = read_at(model.output.logits, at.repeat(k)).float()  # [rows, vocab]
        answer = final[-n:].argmax(-1) if target is None else target.to(final.device)
        metric = logit_diff(final[:, None], answer.repeat(k), None if other is None else other.repeat(k))  # [rows]
        grads = gradients(metric.sum(), [path])[0]  # d f / d x at every point of the path
        scores = integrated_gradients(grads, end, base, steps=m, mask=mask) if m else token_scores(grads, end, mask)
        out = nnsight.save({"scores": scores.detach().cpu(), "target": answer.cpu(),  # [batch, pos], [batch]
                            "metric": metric[-n:].detach().cpu(), "baseline_metric": metric[:n].detach().cpu()})
    return out


def run(model, prompts, target=None, distractor=None, *, method: Literal["ig", "grad_x_input", "attention"] = "ig",
        steps: int | None = None, baseline: Literal["zero", "pad", "bos"] | None = None,
        position: int | Sequence[int] = -1, batch_size: int | None = None, remote=False, backend=None) -> Attribution:
    """Each input token's contribution to the metric: ``[prompt, position]`` (see the module doc).

    target: the answer token (default: the model's top prediction at the read position).
    distractor: subtract this token's logit (a logit difference).
    method: integrated gradients (ig), gradient x input (token + position), or the direct path through attention.
    steps: intervals on the integrated-gradients path (default 64; steps + 1 forwards, one batch).
    baseline: where integrated gradients starts: zero embeddings (default), or every token pad or BOS.
    position: the token whose logit is the metric: -1 the last, 0 the first; one per prompt, or one for all.
    """
    if method not in ("ig", "grad_x_input", "attention"):
        raise ValueError(f"method={method!r}; expected 'ig' (integrated gradients), 'grad_x_input' or 'attention'")
    if method != "ig" and (steps, baseline) != (None, None):
        raise ValueError(f"steps={steps!r}, baseline={baseline!r}: options of integrated gradients; pass method='ig'")
    steps, baseline = 64 if steps is None else steps, baseline or "zero"
    if isinstance(steps, bool) or not isinstance(steps, (int, float)) or not float(steps).is_integer() or steps < 1:
        raise ValueError(f"steps={steps!r}: give a whole number of at least 1 (intervals on the path; more is closer)")
    steps = int(steps)  # numpy ints and whole floats too
    if baseline not in ("zero", "pad", "bos") or baseline == "bos" and model.tokenizer.bos_token_id is None:
        raise ValueError(f"baseline={baseline!r}; expected 'zero' (zero embeddings), 'pad' or 'bos' (where the "
                         f"tokenizer has a BOS token: this one has {model.tokenizer.bos_token!r})")
    batch = Batch.of(model, prompts, target, distractor).at(position)
    if method == "attention":
        batch.arch.require("Token attribution through attention", exact_heads=True, probabilities=True)
    out = runner.run(trace, model, batch, method=method, steps=steps, baseline=baseline, batch_size=batch_size,
                     remote=remote, backend=backend)
    batch.check_answers(out["target"])  # the model's own top prediction may be the distractor
    per_prompt = {"target": batch.decode(out["target"]), "metric": out["metric"].tolist(),
                  "position": list(batch.positions), "read_token": list(batch.read_tokens),
                  **({} if batch.distractor is None else {"distractor": batch.decode(batch.distractor)})}
    meta = {"method": method, "read_at": batch.read_at}
    if method == "ig":
        error = completeness_error(out["scores"], out["metric"] - out["baseline_metric"], steps=steps)
        per_prompt.update(baseline_metric=out["baseline_metric"].tolist(), completeness_error=error)
        meta.update(steps=steps, baseline=baseline, rule="right Riemann", completeness_error=max(map(abs, error)))
    labels = {"prompt": batch.labels, "position": [str(p - batch.width) for p in range(batch.width)]}
    return Attribution(out["scores"], ("prompt", "position"), labels, method="token_attribution", by=method,
                       title=f"{TITLE} ({HOW[method].format(steps=steps, baseline=baseline)})", units=UNITS,
                       metric=batch.metric(out["target"]), meta=meta, per_prompt=per_prompt, tokens=batch.tokens)


if __name__ == "__main__":
    import sys

    from nnattr.cli import recipe_main

    raise SystemExit(recipe_main(sys.modules[__name__]))
