"""The newer recipes on every family (``tiny.ARCHS``) against plain hooks and plain autograd.

Each test runs a recipe on a left-padded batch and compares it with a reference computed one
prompt (or pair) at a time, unpadded, from forward hooks on the native Hugging Face modules
(``tests/support/reference.py``'s ``NATIVE`` table) and ``torch.autograd``: no nnsight, no nnattr
kernels, no ``nnattr.arch``. So every parity test is also a padding test. The columns they fill
in ``docs/status.md`` are listed in ``tests/support/status.py`` (``COLUMNS``):

- attention views: patterns, value-weighted, norm-based and per-head flow against loops over
  ``output_attentions`` and the value vectors;
- token attribution: integrated gradients (zero and BOS baselines, 4 steps) and gradient × input
  against plain autograd through the first block's input (replaced by a pre-hook); the direct path
  through attention against per-head, per-source DLA, or its refusal where heads are not exact;
- activation patching: every default node (residual per position, attention and MLP writes,
  heads) against a forward hook that writes the clean activation into the corrupted run;
- expert attribution: against the reference DLA by component (experts plus rest = the MLP write),
  and each expert against the block re-run with that expert's output weights zeroed;
- feature attribution and feature patching: random SAEs at all three sites against hooks with the
  same SAE, written out in float64 (``tests/test_feature_attribution.py``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from nnattr.recipes import (
    activation_patching, attention_views, expert_attribution, feature_attribution, feature_patching, token_attribution)
from tests import test_recipes as base
from tests.support import reference as ref
from tests.support import tiny
from tests.test_families import expert_reference
from tests.test_feature_attribution import block, encode64, random_sae, reference_dla, site_path
from tests.test_recipes import DISTRACTORS, HEAD_EXACT, PROMPTS, TARGETS, close, ids, token

zoo = base.zoo  # the sharpened tiny models (x10 on every matrix), eager attention
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

AT = [2, -1, 1]  # read positions, one per prompt
STEPS = 4


def own(values: torch.Tensor, n: int) -> torch.Tensor:
    """A prompt's last ``n`` (real) positions of a left-padded ``[..., position]`` row."""
    return values[..., values.shape[-1] - n:]


# ----------------------------------------------------------------------------- attention views


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_attention_views_equal_the_hooks_reference(zoo, arch):
    hf, model = zoo(arch)
    for view, options in (("patterns", {}), ("value_weighted", {"norm": "l1"}), ("norm_based", {}),
                          ("flow", {"residual": 0.3})):
        result = attention_views.run(model, PROMPTS, view=view, **options)  # a padded batch
        for i, p in enumerate(PROMPTS):
            if view == "flow":  # the last layer's flow (every layer's is the same recursion)
                expected, got = ref.flow(hf, ids(p), residual=0.3)[0], result[i].values[-1]
            else:
                expected, got = ref.attention_views(hf, ids(p), view, **options), result[i].values
            close(got, expected)
        assert result.values[2, ..., :3].isnan().all()  # the shortest prompt's padding (4 of 7 tokens)


# ----------------------------------------------------------------------------- token attribution


def first_block_input(hf, input_ids: torch.Tensor, *, points=None, zero_tokens=False):
    """``(x, logits)``: the first block's input ``x`` (what enters the residual stream) on a plain
    ``model(...)`` call; ``points`` replaces it (a pre-hook); ``zero_tokens`` zeroes the token
    embedding's output (positions, where a model adds them, stay)."""
    seen = {}

    def pre(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        if points is None:
            return None
        return ((points, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": points})

    handles = [ref.blocks(hf)[0].register_forward_pre_hook(pre, with_kwargs=True)]
    if zero_tokens:
        handles.append(hf.get_input_embeddings().register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
    try:
        logits = ref.forward(hf, input_ids).logits
    finally:
        for h in handles:
            h.remove()
    return seen["x"], logits


def plain_ig(hf, input_ids, *, read, target, distractor, steps=None, baseline="zero"):
    """Integrated gradients (right Riemann sum on ``steps`` intervals) or, with ``steps=None``,
    gradient × input, of one unpadded prompt ``[1, pos]``. Returns ``(scores [pos], f(x), f(b))``."""
    f = lambda logits: logits[:, read, target] - logits[:, read, distractor]  # noqa: E731  [rows]
    with torch.no_grad():
        x, logits = first_block_input(hf, input_ids)
        fx, fb, b = f(logits), None, None
        if steps is not None:
            fill = {"pad": 0, "bos": 2}.get(baseline)  # tiny's pad and BOS tokens (pad's embedding is often 0)
            b, b_logits = first_block_input(hf, input_ids if fill is None else torch.full_like(input_ids, fill),
                                            zero_tokens=baseline == "zero")
            fb = f(b_logits)
    alphas = torch.tensor([1.0]) if steps is None else torch.arange(1, steps + 1) / steps
    start = torch.zeros_like(x) if b is None else b
    with torch.enable_grad():
        points = (start + alphas[:, None, None] * (x - start)).detach().requires_grad_(True)  # [rows, pos, d]
        _, out = first_block_input(hf, input_ids.expand(len(alphas), -1), points=points)
        grad = torch.autograd.grad(f(out.float()).sum(), points)[0].mean(0)  # [pos, d_model]
    return (grad * (x - start)[0]).sum(-1).detach(), float(fx), None if fb is None else float(fb)


@pytest.mark.filterwarnings("ignore::nnattr.result.CompletenessWarning")  # parity at 4 steps, not convergence
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_token_attribution_equals_plain_autograd(zoo, arch):
    hf, model = zoo(arch)
    t, d = [token(w) for w in TARGETS], [token(w) for w in DISTRACTORS]
    runs = [(dict(method="ig", steps=STEPS, baseline="zero", position=AT), AT),
            (dict(method="ig", steps=STEPS, baseline="bos"), [-1] * 3),
            (dict(method="grad_x_input", position=AT), AT)]
    for options, at in runs:
        result = token_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, batch_size=2, **options)
        for i, p in enumerate(PROMPTS):
            x = ids(p)
            scores, fx, fb = plain_ig(hf, x, read=at[i], target=t[i], distractor=d[i], steps=options.get("steps"),
                                      baseline=options.get("baseline"))
            close(own(result.values[i], x.shape[1]), scores, atol=1e-4)
            assert result.per_prompt["metric"][i] == pytest.approx(fx, abs=1e-4)
            if fb is not None:
                assert result.per_prompt["baseline_metric"][i] == pytest.approx(fb, abs=1e-4)
            assert own(result.values[i], x.shape[1]).isfinite().all()
            assert result.values[i, : result.values.shape[1] - x.shape[1]].isnan().all()  # padding: no score


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_token_attribution_through_attention_is_dla_by_head_and_source(zoo, arch):
    hf, model = zoo(arch)
    if arch not in HEAD_EXACT:  # post-sub-layer norms: per-head writes do not add up
        with pytest.raises(ValueError, match="not exact on .*by='component'"):
            token_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, method="attention")
        return
    result = token_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, method="attention")
    for i, p in enumerate(PROMPTS):
        expected = ref.dla_head_positions(hf, ids(p), token(TARGETS[i]), token(DISTRACTORS[i])).sum((1, 2))[0]
        close(own(result.values[i], ids(p).shape[1]), expected)


# ----------------------------------------------------------------------------- activation patching

CLEAN, CORRUPTED = tiny.prompts(2, lengths=(5, 6)), tiny.prompts(2, seed=1, lengths=(5, 6))


def _patch_hooks(hf, node: str, layer: int, index: int, clean: dict):
    """One forward (pre-)hook writing the clean activation of a node into the run."""
    nat = ref.native(hf)
    block = ref.blocks(hf)[layer]
    if node == "resid":  # the residual stream entering the layer, at position `index`
        def pre(module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).clone()
            x[:, index] = clean[f"r{layer}"][:, index]
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        return block.register_forward_pre_hook(pre, with_kwargs=True)
    if node == "head":  # one head's slice of the output projection's input, every position
        def pre_o(module, args):
            z = args[0].clone()
            width = z.shape[-1] // hf.config.num_attention_heads
            z[..., index * width : (index + 1) * width] = clean[f"z{layer}"][..., index * width : (index + 1) * width]
            return (z, *args[1:])

        return block.get_submodule(nat.o_proj).register_forward_pre_hook(pre_o)
    key, path = (f"a{layer}", nat.attn_write) if node == "attn" else (f"m{layer}", nat.mlp_write)

    def post(module, args, out):  # a fresh copy: Falcon adds attention into its MLP's output in place
        x = ref._tensor(out)
        patch = clean[key].reshape(x.shape).clone()  # OPT's fc2 runs on the stream flattened to [pos, d_model]
        return (patch, *out[1:]) if isinstance(out, tuple) else patch

    return block.get_submodule(path).register_forward_hook(post)


def plain_patching(hf, clean_ids, corrupted_ids, target, distractor) -> tuple[dict, float, float]:
    """Exact patching of one unpadded pair by hooks: ``({node: patched metric}, clean, corrupted)``,
    nodes as ``activation_patching`` shapes them (resid ``[layer, pos]``, attn/mlp ``[layer]``,
    head ``[layer, head]``)."""
    nat, n, heads = ref.native(hf), len(ref.blocks(hf)), hf.config.num_attention_heads
    metric = lambda logits: float(logits[0, -1, target] - logits[0, -1, distractor])  # noqa: E731
    outputs = {f"{k}{i}": f"{nat.blocks}.{i}.{p}" for i in range(n) for k, p in (("a", nat.attn_write),
                                                                              ("m", nat.mlp_write))}
    inputs = {f"r{i}": f"{nat.blocks}.{i}" for i in range(n)} | {f"z{i}": f"{nat.blocks}.{i}.{nat.o_proj}"
                                                               for i in range(n)}
    with torch.no_grad():
        with ref.recording(hf, outputs, inputs) as seen:
            clean_metric = metric(ref.forward(hf, clean_ids).logits)
        clean = {k: v.clone() for k, v in seen.items()}
        corrupted_metric = metric(ref.forward(hf, corrupted_ids).logits)
        shapes = {"resid": (n, clean_ids.shape[1]), "attn": (n,), "mlp": (n,), "head": (n, heads)}
        out = {node: torch.zeros(shape, dtype=torch.float64) for node, shape in shapes.items()}
        for node, shape in shapes.items():
            for entry in torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, len(shape)).tolist():
                handle = _patch_hooks(hf, node, entry[0], entry[-1], clean)
                try:
                    out[node][tuple(entry)] = metric(ref.forward(hf, corrupted_ids).logits)
                finally:
                    handle.remove()
    return out, clean_metric, corrupted_metric


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_activation_patching_equals_patching_by_hooks(zoo, arch):
    hf, model = zoo(arch)
    answer, distractor = TARGETS[:2], DISTRACTORS[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small gap on some random pair: compared as effects below
        result = activation_patching.run(model, CLEAN, CORRUPTED, answer, distractor, rows=16)  # past layer 0: skips
    for i in range(len(CLEAN)):
        c, k = ids(CLEAN[i]), ids(CORRUPTED[i])
        patched, m_clean, m_corrupted = plain_patching(hf, c, k, token(answer[i]), token(distractor[i]))
        got_clean, got_corrupted = (result["head"].per_prompt[key][i] for key in ("clean_metric", "corrupted_metric"))
        assert (got_clean, got_corrupted) == pytest.approx((m_clean, m_corrupted), abs=1e-4)
        for node, expected in patched.items():
            got = result[node].values[i].double()  # recovery (patched - corrupted) / (clean - corrupted)
            got = own(got, c.shape[1]) if node == "resid" else got
            close(got * (m_clean - m_corrupted), expected - m_corrupted, atol=1e-4)


# ----------------------------------------------------------------------------- expert attribution


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_expert_attribution_equals_the_hooks_reference(zoo, arch):
    """Dense families: plain DLA by component. MoE families: the experts and the rest add up to the
    MLP write, each expert equal to the block re-run without it (tests/test_families.py)."""
    hf, model = zoo(arch)
    result = expert_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS)  # a padded batch
    n, names = hf.config.num_hidden_layers, result.labels["component"]
    moe = hasattr(ref.blocks(hf)[0].get_submodule(ref.native(hf).mlp_write), "experts")
    e, embeds = result.meta["n_experts"], len(ref.native(hf).embeds)
    assert (e > 0) == moe and names[-1] == "bias"
    starts = [names.index(f"{layer}_attn_out") for layer in range(n)] + [len(names) - 1]
    mlps = [list(range(starts[layer] + 1, starts[layer + 1])) for layer in range(n)]  # experts (shared), rest
    assert [names[m[-1]] for m in mlps] == [f"{layer}_mlp_{'rest' if e else 'out'}" for layer in range(n)]
    for i, p in enumerate(PROMPTS):
        x, t, d = ids(p), token(TARGETS[i]), token(DISTRACTORS[i])
        shares, logit = ref.dla_components(hf, x, t, d)  # embeds, then attn and mlp of each layer, then bias
        row = result[i].values.double()
        whole = torch.stack([*row[:embeds], *[s for layer in range(n) for s in (row[starts[layer]],
                                                                             row[mlps[layer]].sum())], row[-1]])
        close(whole, shares[0])
        close(row.sum(), logit[0])
        if moe:
            each = expert_reference(hf, x, t, d)  # [layer, expert]
            for layer in range(n):
                close(row[[names.index(f"L{layer}E{j}") for j in range(e)]], each[layer])


# ----------------------------------------------------------------------------- features


def saes(hf) -> list:
    """Three random SAEs, one per site and activation, sized for the model."""
    d = hf.config.hidden_size
    return [random_sae(d, layer=1, activation="jumprelu", seed=1), random_sae(d, layer=0, site="attn_out", seed=2),
            random_sae(d, layer=1, site="mlp_out", activation="topk", k=6, seed=3)]


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_feature_attribution_equals_the_hooks_reference(zoo, arch):
    hf, model = zoo(arch)
    some = saes(hf)
    result = feature_attribution.run(model, PROMPTS, TARGETS, DISTRACTORS, sae=some, top_k=None)  # padded
    for i, p in enumerate(PROMPTS):
        x = ids(p)
        inputs = {"input_ids": x, "attention_mask": torch.ones_like(x)}  # one prompt, unpadded
        for sae in some:
            expected, logit = reference_dla(hf, inputs, sae, torch.tensor([token(TARGETS[i])]),
                                            torch.tensor([token(DISTRACTORS[i])]))
            close(block(result, sae)[i], expected[0])  # each feature, b_dec, error, rest
            close(expected[0].sum(), logit[0])  # the identity, in the reference
    assert result.meta["sum_error"] < 1e-4


def plain_feature_patching(hf, sae, clean_ids, corrupted_ids, target, distractor):
    """Per position ``(features [pos, d_sae], error [pos])``: ``(a_f(clean) - a_f(corrupted)) W_dec[f] . g``
    and ``((x - x_hat)(clean) - (x - x_hat)(corrupted)) . g``, ``g`` the gradient of the corrupted
    run's logit difference at the SAE's site, by hooks and ``torch.autograd``."""
    path, is_input = site_path(hf, sae)
    module = hf.get_submodule(path)
    acts = []
    for input_ids, grad in ((clean_ids, False), (corrupted_ids, True)):
        seen = {}

        def pre(m, args, kwargs):  # the site's value; the model goes on with a copy
            seen["x"] = args[0] if args else kwargs["hidden_states"]
            return ((seen["x"] * 1, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": seen["x"] * 1})

        def post(m, args, out):  # a copy: Falcon adds attention into its MLP's output in place
            x = ref._tensor(out)
            seen["x"] = x.unflatten(0, (len(input_ids), -1)) if x.ndim == 2 else x  # OPT's fc2: [batch * pos, d]
            copy = (seen["x"] * 1).reshape(x.shape)
            return (copy, *out[1:]) if isinstance(out, tuple) else copy

        handle = (module.register_forward_pre_hook(pre, with_kwargs=True) if is_input
                  else module.register_forward_hook(post))
        try:
            with torch.enable_grad():
                logits = ref.forward(hf, input_ids).logits[0, -1]
                if grad:
                    seen["x"].retain_grad()
                    (logits[target] - logits[distractor]).backward()
        finally:
            handle.remove()
        acts.append((seen["x"][0].detach().double(), seen["x"].grad[0].double() if grad else None))
    (x_clean, _), (x_corrupted, g) = acts
    hf.zero_grad(set_to_none=True)
    x_hat = lambda x: encode64(sae, x) @ sae.W_dec.double() + sae.b_dec.double()  # noqa: E731
    features = (encode64(sae, x_clean) - encode64(sae, x_corrupted)) * (g @ sae.W_dec.double().T)
    error = ((x_clean - x_hat(x_clean) - x_corrupted + x_hat(x_corrupted)) * g).sum(-1)
    return features, error


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_feature_patching_equals_plain_autograd(zoo, arch):
    hf, model = zoo(arch)
    some = saes(hf)
    corrupted = [" ".join(p.split()[:-2] + ["w1", p.split()[-1]]) for p in PROMPTS]  # same lengths
    result = feature_patching.run(model, PROMPTS, corrupted, TARGETS, DISTRACTORS, sae=some, top_k=None,
                                  per_position=True)  # a padded batch of pairs
    labels = result.labels["component"]
    for i, p in enumerate(PROMPTS):
        for sae in some:
            features, error = plain_feature_patching(hf, sae, ids(p), ids(corrupted[i]), token(TARGETS[i]),
                                                     token(DISTRACTORS[i]))
            got = result[i].values.double()  # [component, position], this pair's positions
            mine = got[[labels.index(f"{sae.name}/f{f}") for f in range(sae.d_sae)]].T  # [pos, d_sae]
            close(mine, features, atol=1e-4)
            close(got[labels.index(f"{sae.name}/error")], error, atol=1e-4)
