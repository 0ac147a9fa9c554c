"""Attribution patching and activation patching: exactness, parity, batching, padding, bad input.

The reference (``hooks_atp``) uses forward hooks on the native Hugging Face modules and plain
autograd: no nnsight, no nnattr kernels. Models are ``tests/support/tiny.py``'s with every
matrix scaled by ``SHARPEN`` so logits are O(1) and the nonlinearities matter.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.testing import assert_close

import nnattr
from nnattr import kernels as K
from nnattr.recipes import (activation_patching, atp_star, attribution_patching, edge_atp_star,
                            edge_attribution_patching)
from nnattr.pairs import NODES
from nnattr.validation import ApproximationWarning, compare, metric_effect, spearman
from tests.support import tiny

try:
    import ndif.services.ray.deployments.modeling.nns  # noqa: F401  (the loopback server's core)
except ImportError:
    ndif = None

torch.set_num_threads(1)

SHARPEN = 10.0
TOL = dict(atol=1e-5, rtol=1e-5)  # float32 against float32 computed another way
CLEAN, CORRUPTED = tiny.prompts(4, lengths=(5, 6)), tiny.prompts(4, seed=1, lengths=(5, 6))
ANSWER, DISTRACTOR = ["w5", "w17", "w42", "w8"], ["w9", "w3", "w60", "w1"]
UNEQUAL = tiny.prompts(4, seed=2, lengths=(4, 7, 6, 3))  # corrupted prompts of other lengths


def build(arch: str, *, linear: bool = False):
    """A sharpened tiny model; ``linear`` makes the metric linear in the last layer's attention
    output, heads and MLP output (no final norm, last MLP zeroed)."""
    hf = tiny.hf_model(arch)
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.mul_(SHARPEN)
        if linear:
            spec = nnattr.spec_for(hf)
            parent, name = spec.ln_f.rsplit(".", 1)
            setattr(hf.get_submodule(parent), name, torch.nn.Identity())
            last = hf.get_submodule(spec.layers)[-1]
            for p in last.get_submodule(spec.mlp).parameters():
                p.zero_()
    return hf


@pytest.fixture(scope="module")
def zoo():
    cache = {}

    def get(arch, linear=False):
        if (arch, linear) not in cache:
            hf = build(arch, linear=linear)
            cache[arch, linear] = hf, nnattr.load(hf, tiny.tokenizer())
        return cache[arch, linear]

    return get


def hooks_atp(hf, clean, corrupted, answer, distractor, *, steps=0):
    """AtP (or EAP-IG with ``steps``) of every node type with torch hooks: ``{site: [n, layer, (head,) pos]}``."""
    spec, d, tok = nnattr.spec_for(hf), nnattr.dims(hf), tiny.tokenizer()
    n = len(clean)
    enc = tok(clean + corrupted * (1 + steps), return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    lengths = mask.sum(-1)
    both = torch.minimum(lengths[:n], lengths[n : 2 * n])
    overlap = torch.arange(mask.shape[1])[None] >= (mask.shape[1] - both)[:, None]  # [n, pos]
    acts = {"resid": [], "head": [], "attn": [], "mlp": []}

    def keep(site, t):
        t.retain_grad()
        acts[site].append((t, t.detach().clone()))  # the value now: Falcon adds attention into its MLP output in place

    def write(site, out):  # GPT-OSS's MLP returns (out, scores); OPT's fc2 runs on the flattened [batch * pos, d]
        x = out[0] if isinstance(out, tuple) else out
        if x.ndim == 2:  # send the unflattened tensor on, so that it is the one the gradient reaches
            x = x.unflatten(0, (len(mask), -1))
            keep(site, x)
            return x.flatten(0, 1)
        keep(site, x)

    def embed_hook(module, args, out):
        if not steps:
            return out.requires_grad_(True)
        c, k = out[:n], out[n : 2 * n]
        path = [k + (s + 0.5) / steps * (c - k) * overlap[..., None] for s in range(steps)]
        return torch.cat([out[: 2 * n]] + path).requires_grad_(True)

    hooks = [hf.get_submodule(spec.embed).register_forward_hook(embed_hook)]
    for layer in hf.get_submodule(spec.layers):
        attn = layer.get_submodule(spec.attn)
        hooks += [
            layer.register_forward_pre_hook(lambda m, a, kw: keep("resid", a[0] if a else kw["hidden_states"]),
                                            with_kwargs=True),
            attn.get_submodule(spec.o_proj).register_forward_pre_hook(lambda m, a: keep("head", a[0])),
            layer.get_submodule(spec.attn_out or spec.attn).register_forward_hook(
                lambda m, a, out: write("attn", out)),
            layer.get_submodule(spec.mlp_out or spec.mlp).register_forward_hook(lambda m, a, out: write("mlp", out)),
        ]
    try:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count from the first token
        logits = hf(**enc, position_ids=position_ids).logits[:, -1].float()
    finally:
        for h in hooks:
            h.remove()
    ids = lambda words: torch.tensor([tok.convert_tokens_to_ids(w) for w in words] * (2 + steps))  # noqa: E731
    rows = torch.arange(len(logits))
    metric = logits[rows, ids(answer)] - logits[rows, ids(distractor)]
    metric[n if not steps else 2 * n :].sum().backward()
    out = {}
    for site, tensors in acts.items():
        per_layer = []
        for t, value in tensors:
            delta = (value[:n] - value[n : 2 * n]) * overlap[..., None]
            grad = t.grad[n : 2 * n] if not steps else t.grad[2 * n :].reshape(steps, n, *t.shape[1:]).mean(0)
            prod = (grad * delta).detach()  # [n, pos, width]
            if site == "head":
                prod = prod.reshape(*prod.shape[:2], d.n_heads, -1).sum(-1).transpose(1, 2)  # [n, head, pos]
            else:
                prod = prod.sum(-1)
            per_layer.append(prod)
        out[site] = torch.stack(per_layer, 1)
    return out, metric[: 2 * n].detach().reshape(2, n)


def flat(result, pair_lengths):
    """A recipe result as ``[n, layer * head or layer, pos of each pair]`` for comparison."""
    return [result.values[i][..., -L:] for i, L in enumerate(pair_lengths)]


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("arch", tiny.ARCHS)  # every family
@pytest.mark.parametrize("steps", [0, 3])
def test_parity_with_plain_torch_hooks(zoo, arch, steps):
    hf, model = zoo(arch)
    method = "ig" if steps else "atp"
    got = attribution_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, nodes=NODES, method=method,
                                   steps=steps or None)
    ref, metric = hooks_atp(hf, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, steps=steps)
    L = [len(tiny.tokenizer()(p)["input_ids"]) for p in CORRUPTED]
    heads = lambda s: s.flatten(1, 2)  # noqa: E731  [n, layer * head, ...]
    for i, length in enumerate(L):
        assert_close(got["resid"].values[i][:, -length:], ref["resid"][i][:, -length:], **TOL)
        assert_close(got["attn_pos"].values[i][:, -length:], ref["attn"][i][:, -length:], **TOL)
        assert_close(got["mlp_pos"].values[i][:, -length:], ref["mlp"][i][:, -length:], **TOL)
        assert_close(heads(got["head_pos"].values)[i][:, -length:], heads(ref["head"])[i][:, -length:], **TOL)
    assert_close(got["attn"].values, ref["attn"].sum(-1), **TOL)
    assert_close(got["mlp"].values, ref["mlp"].sum(-1), **TOL)
    assert_close(heads(got["head"].values), heads(ref["head"]).sum(-1), **TOL)
    assert_close(torch.tensor(got["head"].per_prompt["clean_metric"]), metric[0], **TOL)
    assert got["head"].dims == ("prompt", "layer", "head") and got["head"].labels["head"][:2] == ["H0", "H1"]
    assert got["attn"].dims == ("prompt", "layer") and got["attn"].labels["layer"][1] == "L1"
    assert got["resid"].dims == ("prompt", "layer", "position") and got["head_pos"].by == "head_pos"


def test_unequal_lengths_node_level_matches_reference(zoo):
    hf, model = zoo("llama")
    got = attribution_patching.run(model, CLEAN, UNEQUAL, ANSWER, DISTRACTOR, nodes=("attn", "mlp", "head"))
    for i in range(len(CLEAN)):  # each pair alone: padded only against its own partner
        ref, _ = hooks_atp(hf, CLEAN[i : i + 1], UNEQUAL[i : i + 1], ANSWER[i : i + 1], DISTRACTOR[i : i + 1])
        assert_close(got["attn"].values[i], ref["attn"][0].sum(-1), **TOL)
        assert_close(got["head"].values[i], ref["head"][0].sum(-1), **TOL)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("corrupted", [CORRUPTED, UNEQUAL], ids=["equal", "unequal"])
def test_exact_where_the_metric_is_linear_in_the_node(zoo, corrupted):
    _, model = zoo("llama", linear=True)
    nodes = ("attn", "attn_pos", "mlp", "head", "head_pos")
    align = None if corrupted is CORRUPTED else "right"
    estimate = attribution_patching.run(model, CLEAN, corrupted, ANSWER, DISTRACTOR, nodes=nodes, align=align)
    ig = attribution_patching.run(model, CLEAN, corrupted, ANSWER, DISTRACTOR, nodes=nodes, align=align,
                                  method="ig", steps=2)
    exact = activation_patching.run(model, CLEAN, corrupted, ANSWER, DISTRACTOR, nodes=nodes, align=align)
    for node in nodes:  # the last layer: [pair, (head,) (position)]
        truth = metric_effect(exact[node])[:, -1]
        assert node == "mlp" or truth.nan_to_num().abs().max() > 0.05  # a real effect, not zeros
        assert_close(estimate[node].values[:, -1], truth, atol=1e-4, rtol=1e-4, equal_nan=True)
        assert_close(ig[node].values[:, -1], truth, atol=1e-4, rtol=1e-4, equal_nan=True)
    # the MLP of the last layer is zero, so patching it changes nothing
    assert_close(exact["mlp"].values[:, -1], torch.zeros(len(CLEAN)))


def test_residual_patch_recovers_exactly_where_the_prompts_differ(zoo):
    _, model = zoo("gpt2")
    words = [p.split() for p in CLEAN]
    changed = [" ".join(w[:2] + ["w0"] + w[3:]) for w in words]  # token 2 replaced (no BOS here)
    exact = activation_patching.run(model, CLEAN, changed, ANSWER, DISTRACTOR, nodes=("resid",))
    estimate = attribution_patching.run(model, CLEAN, changed, ANSWER, DISTRACTOR, nodes=("resid",))
    for i, w in enumerate(words):
        row = exact["resid"][i].values  # [layer, position] of this pair's own tokens
        expected = torch.zeros(len(w))
        expected[2] = 1.0  # layer 0's input there is all that differs: patching it is the clean run
        assert_close(row[0], expected, **TOL)
        assert_close(row[:, :2], torch.zeros(row.shape[0], 2), **TOL)  # before the change nothing differs
        assert_close(estimate["resid"][i].values[:, :2], torch.zeros(row.shape[0], 2))
    assert_close(torch.tensor(exact["resid"].per_prompt["clean_metric"]),
                 torch.tensor(estimate["resid"].per_prompt["clean_metric"]), **TOL)


# ----------------------------------------------------------------------------- batching


def test_batched_equals_looped(zoo):
    _, model = zoo("gpt2")
    kw = dict(nodes=("attn", "mlp", "head"))
    together = attribution_patching.run(model, CLEAN, UNEQUAL, ANSWER, DISTRACTOR, **kw)
    one_by_one = attribution_patching.run(model, CLEAN, UNEQUAL, ANSWER, DISTRACTOR, batch_size=1, **kw)
    for node in kw["nodes"]:
        assert_close(together[node].values, one_by_one[node].values, **TOL)
    exact_all = activation_patching.run(model, CLEAN, UNEQUAL, ANSWER, DISTRACTOR, batch_size=None, **kw)
    exact_small = activation_patching.run(model, CLEAN, UNEQUAL, ANSWER, DISTRACTOR, batch_size=1, rows=3, **kw)
    for node in kw["nodes"]:
        assert_close(exact_all[node].values, exact_small[node].values, **TOL)


def test_frozen_parameters(zoo):
    hf, model = zoo("llama")
    trainable = attribution_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, nodes=("resid", "head"))
    hf.zero_grad(set_to_none=True)
    hf.requires_grad_(False)
    try:
        frozen = attribution_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, nodes=("resid", "head"))
        frozen_ig = attribution_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, nodes=("head",),
                                             method="ig", steps=2)
    finally:
        hf.requires_grad_(True)
    for node in ("resid", "head"):
        assert_close(frozen[node].values, trainable[node].values, equal_nan=True, **TOL)
    assert frozen_ig["head"].values.abs().sum() > 0
    assert all(p.grad is None for p in hf.parameters())


def test_custom_metric_equals_default(zoo):
    _, model = zoo("gpt2")
    a, b = tiny.tokenizer().convert_tokens_to_ids(["w5", "w9"])
    metric = lambda logits: logits[:, -1, a] - logits[:, -1, b]  # noqa: E731
    custom = attribution_patching.run(model, CLEAN, CORRUPTED, metric=metric, nodes=("head",))
    default = attribution_patching.run(model, CLEAN, CORRUPTED, "w5", "w9", nodes=("head",))
    assert_close(custom["head"].values, default["head"].values, **TOL)
    exact = activation_patching.run(model, CLEAN, CORRUPTED, metric=metric, nodes=("head",))
    exact_default = activation_patching.run(model, CLEAN, CORRUPTED, "w5", "w9", nodes=("head",))
    assert_close(exact["head"].values, exact_default["head"].values, **TOL)


def test_gradients_only_where_the_estimate_needs_them(zoo):
    """AtP: the clean rows run without gradients, the backward covers the corrupted rows only; IG: the
    clean and corrupted rows without, the path's rows with. Seen by a metric recording its calls."""
    hf, model = zoo("gpt2")
    calls = []

    def metric(logits):  # [rows, pos, vocab]: a custom metric gets every position's logits
        calls.append((logits.shape[0], logits.shape[1], logits.requires_grad))
        return logits[:, -1, 5] - logits[:, -1, 9]

    width = max(len(p.split()) for p in CLEAN + CORRUPTED)
    n = len(CLEAN)
    attribution_patching.run(model, CLEAN, CORRUPTED, metric=metric, nodes=("head",))
    assert calls[1:] == [(n, width, False), (n, width, True)]  # calls[0]: the probe before any trace
    calls.clear()
    attribution_patching.run(model, CLEAN, CORRUPTED, metric=metric, nodes=("head",), method="ig", steps=3)
    assert calls[1:] == [(2 * n, width, False), (3 * n, width, True)]
    calls.clear()
    activation_patching.run(model, CLEAN, CORRUPTED, metric=metric, nodes=("attn",))
    assert all(not grad for *_, grad in calls[1:])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_exact_patching_restarts_each_row_at_its_layer(zoo, arch):
    """The layers before a node's layer never run for its patched rows: they take the corrupted
    run's cached residual stream. Counted with hooks on the native layers."""
    hf, model = zoo(arch)
    spec = nnattr.spec_for(hf)
    layers = hf.get_submodule(spec.layers)
    seen = [0] * len(layers)  # rows through each layer's MLP (a skipped layer runs none of its modules)
    hooks = [layer.get_submodule(spec.mlp).register_forward_hook(
        lambda m, a, out, i=i: seen.__setitem__(i, seen[i] + len(a[0]))) for i, layer in enumerate(layers)]
    try:
        out = activation_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, nodes=("head", "mlp"), rows=7)
    finally:
        for h in hooks:
            h.remove()
    n, heads, n_layers = len(CLEAN), hf.config.num_attention_heads, len(layers)
    job_layers = sorted(i for i in range(n_layers) for _ in range(n * (heads + 1)))  # every head and MLP, per pair
    forwards = [job_layers[i : i + 7] for i in range(0, len(job_layers), 7)]  # one spans both layers
    assert any(len(set(f)) > 1 for f in forwards)
    assert seen == [2 * n + sum(len(f) for f in forwards if f[0] <= i) for i in range(n_layers)]
    assert not torch.isnan(out["head"].values).any() and not torch.isnan(out["mlp"].values).any()


# ----------------------------------------------------------------------------- unequal lengths


def test_per_position_scores_refuse_unequal_lengths_unless_aligned(zoo):
    _, model = zoo("gpt2")
    with pytest.raises(ValueError, match=r"pair 0: the clean prompt has 5 tokens and the corrupted prompt 4"):
        attribution_patching.run(model, CLEAN, UNEQUAL, ANSWER, DISTRACTOR)
    with pytest.raises(ValueError, match="align='right'"):
        activation_patching.run(model, CLEAN, UNEQUAL, ANSWER, DISTRACTOR, nodes=("head_pos",))
    out = attribution_patching.run(model, CLEAN, UNEQUAL, ANSWER, DISTRACTOR, nodes=("head", "head_pos", "resid"),
                                   align="right")
    lengths = [len(tiny.tokenizer()(p)["input_ids"]) for p in (CLEAN, UNEQUAL) for p in p]
    for i in range(len(CLEAN)):
        c, k = lengths[i], lengths[len(CLEAN) + i]
        row = out["head_pos"].values[i].flatten(0, 1)  # [node, position], right-aligned to the longest corrupted prompt
        assert row[:, -min(c, k):].isfinite().all() and row[:, : row.shape[1] - min(c, k)].isnan().all()
    assert_close(out["head_pos"].values.nansum(-1), out["head"].values, **TOL)
    assert len(out["resid"][0].labels["position"]) == lengths[len(CLEAN)]  # one prompt: its own tokens


# ----------------------------------------------------------------------------- top-k workflow


def test_top_k_mode_patches_only_the_candidates(zoo):
    _, model = zoo("gpt2")
    nodes = ("head", "attn_pos")
    estimate = attribution_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, nodes=nodes)
    full = activation_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, nodes=nodes)
    top = activation_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, candidates=estimate, k=3)
    assert set(top) == set(nodes)
    for node in nodes:
        done = ~top[node].values.isnan()
        assert done.sum() == 3 * len(CLEAN)
        assert_close(top[node].values[done], full[node].values[done], **TOL)
        mean = top[node].mean(align="end")  # positions counted from the last token, as candidates are ranked
        done_entries = mean.values.isfinite().nonzero()  # [entry, (layer, head, position)]
        patched = {tuple(mean.labels[d][int(j)] for d, j in zip(mean.dims, row)) for row in done_entries}
        assert patched == {labels for labels, _ in estimate[node].mean(align="end").top(3)}


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_before_anything_runs(zoo):
    _, model = zoo("gpt2")
    run = attribution_patching.run
    with pytest.raises(ValueError, match="does not depend on the logits"):
        run(model, CLEAN, CORRUPTED, metric=lambda logits: torch.ones(logits.shape[0]))
    with pytest.raises(ValueError, match="one value per row"):
        run(model, CLEAN, CORRUPTED, metric=lambda logits: logits.sum())
    with pytest.raises(ValueError, match="4 clean prompts but 3 corrupted"):
        run(model, CLEAN, CORRUPTED[:3], ANSWER, DISTRACTOR)
    with pytest.raises(ValueError, match="is 2 tokens"):
        run(model, CLEAN, CORRUPTED, "w5 w6", "w9")
    with pytest.raises(ValueError, match="unknown node types"):
        run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, nodes=("heads",))
    with pytest.raises(ValueError, match="give answer="):
        run(model, CLEAN, CORRUPTED)
    with pytest.raises(ValueError, match="steps=0: give a whole number of at least 1"):
        run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, method="ig", steps=0)
    with pytest.raises(ValueError, match="method='atp', steps=3"):
        run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, method="atp", steps=3)
    with pytest.raises(ValueError, match="4 clean prompts but 3 corrupted"):
        activation_patching.run(model, CLEAN, CORRUPTED[:3], ANSWER, DISTRACTOR)


# ----------------------------------------------------------------------------- kernels and validation


def test_kernels_against_loops():
    g = torch.Generator().manual_seed(0)
    act, grad = torch.randn(6, 5, 8, generator=g), torch.randn(6, 5, 8, generator=g)
    mask = K.overlap_mask(torch.tensor([5, 3]), torch.tensor([4, 5]), 5)
    assert mask.tolist() == [[False, True, True, True, True], [False, False, True, True, True]]
    delta = K.pair_delta(act[:2], act[2:4], mask)
    path = K.path_gradient(grad, steps=3)  # the mean of 3 blocks of 2 rows
    assert_close(path, (grad[:2] + grad[2:4] + grad[4:]) / 3)
    scores = K.head_attribution_scores(path, delta, n_heads=2)  # [2, head, pos]
    assert_close(K.attribution_scores(path, delta), scores.sum(1))
    for i in range(2):
        for h in range(2):
            for p in range(5):
                sl = slice(4 * h, 4 * h + 4)
                expected = path[i, p, sl] @ (act[i, p, sl] - act[2 + i, p, sl]) if mask[i, p] else 0.0
                assert_close(scores[i, h, p], torch.as_tensor(expected), atol=1e-6, rtol=1e-6)
    assert K.path_gradient(grad, steps=0) is grad  # AtP: the corrupted rows' own gradient
    alphas = torch.tensor([0.25, 0.75])
    steps = K.interpolate(act[:2], act[2:4], mask, alphas)  # [step * pair, pos, d]
    for s, a in enumerate(alphas):
        for i in range(2):
            expected = torch.where(mask[i, :, None], act[2 + i] + a * (act[i] - act[2 + i]), act[2 + i])
            assert_close(steps[2 * s + i], expected)
    clean = act[:2]  # row 4 takes pair 1's clean values, on its overlap, in the first head's channels
    rows = K.patched_rows(act, clean, torch.tensor([4]), torch.tensor([1]), mask[1:], torch.arange(8)[None] < 4)
    assert_close(rows[0, 2:, :4], clean[1, 2:, :4])
    assert_close(rows[0, :, 4:], act[4, :, 4:])
    assert_close(rows[0, :2], act[4, :2])
    with pytest.raises(ValueError, match="4 blocks of rows"):
        K.path_gradient(grad, steps=4)
    with pytest.raises(ValueError, match="overlap mask"):
        K.pair_delta(act[:2], act[2:5], mask)


def test_validation_report(zoo):
    _, model = zoo("gpt2")
    nodes = ("resid", "attn", "mlp", "head")
    estimate = attribution_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, nodes=nodes)
    exact = activation_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, nodes=nodes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = compare(estimate, exact, k=3)
    assert any(issubclass(w.category, ApproximationWarning) and "resid" in str(w.message) for w in caught)
    assert any("L0 mlp" in w for w in report.warnings)
    assert set(report.agreements) == set(nodes) and -1 <= report["head"].pearson <= 1
    assert "| head | 8 |" in report.table()
    json.dumps(report.to_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ApproximationWarning)
        same = compare(exact, exact, k=3)
    assert same["head"].pearson == pytest.approx(1.0) and same["head"].top_k == 1.0
    assert spearman(torch.tensor([1.0, 2.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 1.0, 9.0])) == pytest.approx(1.0)
    import matplotlib

    matplotlib.use("Agg")
    fig = report.plot()
    assert len(fig.axes) == len(nodes)


# ----------------------------------------------------------------------------- the trained model


def _trained_ioi():
    from nnattr.embedded import path

    try:
        record = json.loads((path("tiny-ioi") / "training.json").read_text())
    except FileNotFoundError:
        return None
    return path("tiny-ioi") if record.get("heldout_metrics", {}).get("ioi_acc", 0) >= 0.9 else None


@pytest.mark.skipif(_trained_ioi() is None, reason="the embedded tiny-ioi model is not trained yet")
def test_heads_agree_with_exact_patching_on_ioi():
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from nnattr.embedded import tasks

    folder = _trained_ioi()
    model = nnattr.load(GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval(),
                        AutoTokenizer.from_pretrained(folder))
    items = tasks.ioi_pairs(24, seed=0, split="test")
    args = [[x[key] for x in items] for key in ("clean", "corrupted", "answer", "distractor")]
    nodes = ("head", "attn", "mlp")
    estimate = attribution_patching.run(model, *args, nodes=nodes)
    exact = activation_patching.run(model, *args, nodes=nodes, batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ApproximationWarning)
        report = compare(estimate, exact, k=5)
    assert report["head"].pearson >= 0.9, report.table()


# ----------------------------------------------------------------------------- remote (loopback NDIF)

REPO, KEY = "nnattr-test/tiny-llama-patching", "6f1c0d3e-8a8b-4f7e-9d55-1f0c2b3a4d5e"
needs_ndif = pytest.mark.skipif(ndif is None, reason="needs the ndif server core (see .ci/run)")


if ndif is not None:
    from tests.support.fixtures import offline_server

    REMOTE_CLIENT, server = offline_server(build("llama"), "llama", REPO, KEY)  # frozen, sdpa, no aliases


@needs_ndif
@pytest.mark.parametrize("recipe, kwargs", [
    (attribution_patching, dict(nodes=NODES)),
    (attribution_patching, dict(nodes=("head", "resid"), method="ig", steps=2)),
    (activation_patching, dict(nodes=("resid", "attn", "head"), batch_size=None)),
    (activation_patching, dict(nodes=("resid", "attn", "head"), rows=8)),  # many forwards, one session
    (edge_attribution_patching, dict()),
    (edge_attribution_patching, dict(method="ig", steps=2)),
    (edge_attribution_patching, dict(top_k=10)),  # only each pair's largest edges come back
    (atp_star, dict()),  # the QK fix: q, k, v read at the attention interface (sdpa here)
    (atp_star, dict(grad_drop=True)),  # GradDrop: one backward per layer, same request
    (edge_atp_star, dict()),  # the QK fix on edges: forward-mode products through the graph, on the server
    (edge_atp_star, dict(grad_drop=True)),
    (edge_atp_star, dict(top_k=10)),
], ids=["atp", "ig", "exact", "exact-session", "edges", "edges-ig", "edges-top", "atp-star", "atp-star-gd",
        "edge-atp-star", "edge-atp-star-gd", "edge-atp-star-top"])
def test_remote_equals_local_in_one_request(server, recipe, kwargs):
    local = recipe.run(REMOTE_CLIENT, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, **kwargs)
    before = len(server.requests)
    far = recipe.run(REMOTE_CLIENT, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, remote=True, **kwargs)
    assert len(server.requests) == before + 1 and server.last.status == "COMPLETED"
    assert server.last.request_size < 16_000  # the block and the kernels it calls, as source
    assert server.last.result_size < 20_000  # scores and metrics, never activations
    if "top_k" in kwargs:
        assert server.last.result_size < 2_000
    for node in local if isinstance(local, dict) else [None]:
        got, want = (far[node], local[node]) if node else (far, local)
        assert_close(got.values, want.values, atol=1e-5, rtol=1e-5, equal_nan=True)
        assert got.per_prompt["clean_metric"] == pytest.approx(want.per_prompt["clean_metric"], abs=1e-5)


def test_candidates_of_other_lengths_patch_only_positions_these_pairs_have(zoo):
    _, model = zoo("gpt2")
    long_clean = [p + " w11 w12 w13" for p in CLEAN]
    long_corrupted = [p + " w11 w12 w13" for p in CORRUPTED]
    estimate = attribution_patching.run(model, long_clean, long_corrupted, ANSWER, DISTRACTOR, nodes=("head_pos",))
    width = estimate["head_pos"].shape[-1]
    full = activation_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, nodes=("head_pos",))
    top = activation_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, candidates=estimate,
                                  k=estimate["head_pos"].values[0].numel())  # every entry, of a wider result
    done = ~top["head_pos"].values.isnan()
    assert done.any() and done.sum() < done.numel()  # positions beyond these pairs were skipped
    assert_close(top["head_pos"].values[done], full["head_pos"].values[done], **TOL)  # nothing overwritten
    assert top["head_pos"].shape[-1] < width

    unequal = attribution_patching.run(model, CLEAN, UNEQUAL, ANSWER, DISTRACTOR, nodes=("resid",), align="right")
    again = activation_patching.run(model, CLEAN, UNEQUAL, ANSWER, DISTRACTOR, candidates=unequal, k=3, align="right")
    assert (~again["resid"].values.isnan()).sum() > 0 and again["resid"].meta == {"k": 3, "align": "right"}


def test_options_that_do_not_apply_are_refused(zoo):
    _, model = zoo("gpt2")
    with pytest.raises(ValueError, match="k .* applies with candidates only"):
        activation_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, k=2)
    with pytest.raises(ValueError, match=r"expected 'atp' \(no steps\)"):
        attribution_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, steps=3)
    with pytest.raises(ValueError, match="candidates must be"):
        activation_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR,
                                candidates=attribution_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR)["head"])
    with pytest.raises(ValueError, match="the answer and the distractor are the same token"):
        attribution_patching.run(model, CLEAN, CORRUPTED, ANSWER, ANSWER)


def test_exact_patching_backs_off_on_out_of_memory(zoo, monkeypatch):
    from nnattr import runner

    _, model = zoo("gpt2")
    whole = activation_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, nodes=("head",))
    real, seen = activation_patching.trace, []

    def tight(model, p, **kw):  # a GPU that holds one pair at a time
        seen.append(len(p))
        if len(p) > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(model, p, **kw)

    monkeypatch.setattr(activation_patching, "trace", tight)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(runner, "_fits_on_gpu", lambda model, n: n)
    backed_off = activation_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, nodes=("head",))
    assert seen[0] == len(CLEAN) and set(seen[-len(CLEAN):]) == {1}
    assert_close(backed_off["head"].values, whole["head"].values, **TOL)
    with pytest.raises(ValueError, match="k=0: give a whole number of at least 1"):
        activation_patching.run(model, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, candidates=whole, k=0)


@needs_ndif
def test_circuit_faithfulness_on_ndif_equals_local_in_one_request(server):
    from nnattr import circuits
    from nnattr.recipes import circuit_faithfulness

    scores = edge_attribution_patching.run(REMOTE_CLIENT, CLEAN, CORRUPTED, ANSWER, DISTRACTOR)
    kept = [circuits.top_edges(scores, 5), circuits.greedy(scores, 9)]
    for ablation in ("patch", "zero"):
        local = circuit_faithfulness.run(REMOTE_CLIENT, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, circuit=kept,
                                         ablation=ablation)
        before = len(server.requests)
        far = circuit_faithfulness.run(REMOTE_CLIENT, CLEAN, CORRUPTED, ANSWER, DISTRACTOR, circuit=kept,
                                       ablation=ablation, remote=True)
        assert len(server.requests) == before + 1 and server.last.status == "COMPLETED"
        assert server.last.result_size < 4_000  # a metric per row
        assert_close(far.values, local.values, atol=1e-5, rtol=1e-5)
