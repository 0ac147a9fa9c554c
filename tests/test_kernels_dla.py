"""The DLA, head and lens kernels against analytic cases, torch modules and slow loops."""

import ast
import pathlib

import pytest
import torch
from torch.testing import assert_close

from nnattr import kernels as K

ALLOWED = {"torch", "einops", "math", "typing", "__future__"}


@pytest.mark.parametrize("path", sorted(pathlib.Path(K.__file__).parent.glob("*.py")), ids=lambda p: p.name)
def test_kernel_modules_import_only_remote_safe_modules(path):
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported <= ALLOWED, f"{path.name} imports {imported - ALLOWED}"


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_components_sum_to_the_normed_logit(norm):
    torch.manual_seed(0)
    batch, n_comp, d_model, vocab = 3, 5, 16, 11
    writes = torch.randn(n_comp, batch, d_model, dtype=torch.float64) * 3
    x = writes.sum(0)
    weight, bias = torch.randn(d_model, dtype=torch.float64), torch.randn(d_model, dtype=torch.float64)
    W_U, b_U = torch.randn(vocab, d_model, dtype=torch.float64), torch.randn(vocab, dtype=torch.float64)
    t, t2 = torch.tensor([1, 4, 7]), torch.tensor([2, 2, 0])
    if norm == "layernorm":
        normed = torch.nn.functional.layer_norm(x, (d_model,), weight, bias, eps=1e-5)
    else:
        normed = x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * weight
        bias = None
    logits = normed @ W_U.T + b_U
    want = logits.gather(-1, t[:, None])[:, 0] - logits.gather(-1, t2[:, None])[:, 0]

    direction, b = K.logit_direction(W_U, t, t2, unembed_bias=b_U)
    u = K.residual_direction(direction, weight, norm=norm)
    scale = K.norm_scale(x, norm=norm, eps=1e-5)
    parts = K.direct_logit(writes, u, scale)  # [component, batch]
    total = parts.sum(0) + K.bias_term(direction, b, bias)
    assert_close(total, want.float(), rtol=1e-5, atol=1e-5)


def test_gemma_weight_offset():
    d = torch.randn(2, 8)
    w = torch.randn(8)
    assert_close(K.residual_direction(d, w, norm="rmsnorm", weight_offset=1.0), d * (1 + w))


def test_head_kernels_against_loops():
    torch.manual_seed(1)
    batch, heads, kv, d_head, d_model, keys = 2, 4, 2, 3, 8, 5
    W_O = torch.randn(heads, d_head, d_model)
    u, scale = torch.randn(batch, d_model), torch.rand(batch) + 0.5
    pattern = torch.softmax(torch.randn(batch, heads, keys), -1)
    values = torch.randn(batch, keys, kv, d_head)
    expanded = K.expand_kv(values, n_heads=heads)
    z = torch.einsum("bhk,bkhd->bhd", pattern, expanded)

    per_pos = K.head_position_direct_logit(pattern, expanded, W_O, u, scale)
    per_head = K.head_direct_logit(z, W_O, u, scale)
    want = torch.zeros(batch, heads, keys)
    for b in range(batch):
        for h in range(heads):
            for k in range(keys):
                vec = pattern[b, h, k] * values[b, k, h // (heads // kv)] @ W_O[h]
                want[b, h, k] = vec @ u[b] / scale[b]
    assert_close(per_pos, want)
    assert_close(per_head, want.sum(-1))


def test_o_proj_orientations_agree():
    heads, d_head, d_model = 3, 4, 6
    linear = torch.nn.Linear(heads * d_head, d_model, bias=False)
    z = torch.randn(2, heads * d_head)
    W_lin = K.o_proj_per_head(linear.weight, n_heads=heads)
    W_conv = K.o_proj_per_head(linear.weight.T.contiguous(), n_heads=heads, conv1d=True)
    per_head = torch.einsum("bhd,hdm->bm", K.split_heads(z, n_heads=heads), W_lin)
    assert_close(per_head, linear(z))
    assert_close(W_lin, W_conv)


def test_split_values_layouts():
    batch, pos, heads, d_head = 2, 3, 4, 5
    v = torch.randn(batch, pos, heads, d_head)
    q, k = torch.randn_like(v), torch.randn_like(v)
    gpt2 = torch.cat([t.flatten(2) for t in (q, k, v)], -1)  # [q | k | v]
    neox = torch.cat([q, k, v], -1).flatten(2)  # per head [q | k | v]
    for raw, layout in ((gpt2, "gpt2_fused"), (neox, "neox_fused"), (v.flatten(2), "separate")):
        got = K.split_values(raw, layout=layout, n_heads=heads, n_kv_heads=heads, d_head=d_head)
        assert_close(got, v)
    with pytest.raises(ValueError, match="layout"):
        K.split_values(gpt2, layout="nope", n_heads=heads, n_kv_heads=heads, d_head=d_head)


def test_lens_summary_and_softcap():
    logits = torch.tensor([[[1.0, 3.0, 2.0]], [[0.0, 0.0, 5.0]]])  # [layer, batch, vocab]
    s = K.lens_summary(logits, torch.tensor([2]), k=2)
    assert s["top_id"].tolist() == [[[1, 2]], [[2, 0]]]
    assert s["target_rank"].tolist() == [[1], [0]]
    assert_close(s["target_prob"], logits.softmax(-1)[..., 2])
    x = torch.linspace(-4, 4, 9)
    assert_close(K.inverse_softcap(K.softcap(x, 30.0), 30.0), x, atol=1e-4, rtol=1e-4)
    assert K.softcap(x, None) is x


def test_topk_flat_ignores_nan():
    values = torch.tensor([[1.0, float("nan")], [-3.0, 2.0]])
    v, idx = K.topk_flat(values, 2)
    assert v.tolist() == [-3.0, 2.0] and idx.tolist() == [[1, 0], [1, 1]]


def test_bad_shapes_name_them():
    with pytest.raises(ValueError, match=r"\(3, 2, 5\)"):
        K.direct_logit(torch.zeros(3, 2, 5), torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError, match="n_heads=5"):
        K.split_heads(torch.zeros(2, 12), n_heads=5)
    with pytest.raises(ValueError, match="norm"):
        K.norm_scale(torch.zeros(2, 3), norm="batchnorm", eps=1e-5)
