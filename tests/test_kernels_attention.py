"""Numerics of nnattr.kernels.attention: analytic cases, slow loop references, invariants, errors."""

from __future__ import annotations

import ast
import doctest
import math
from pathlib import Path

import pytest
import torch

import nnattr.kernels.attention as attention
from nnattr.kernels.attention import (
    attention_concentration,
    attention_entropy,
    attention_flow,
    flow_step,
    norm_based,
    norm_based_layer,
    rollout,
    rollout_entropy,
    rollout_max,
    rollout_step,
    value_weighted,
)

torch.set_num_threads(1)

F64 = dict(rtol=1e-12, atol=1e-12)  # loop references in float64: only summation order differs
F32 = dict(rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- fixtures


def causal_patterns(layers, batch, heads, pos, *, key_mask=None, seed=0, dtype=torch.float64):
    """Causal softmax patterns [layer, batch, head, query, key]. With ``key_mask`` they are made
    hostile: real queries leak mass onto padded keys and padded query rows spread over every key
    (garbage, as a fully masked softmax gives), so the kernels' own masking must do the work."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, batch, heads, pos, pos, generator=g, dtype=dtype) * 2
    allowed = torch.ones(pos, pos, dtype=torch.bool).tril().expand(batch, pos, pos)  # [batch, query, key]
    if key_mask is not None:
        allowed = allowed | ~key_mask[:, :, None]
    return logits.masked_fill(~allowed[None, :, None], -math.inf).softmax(-1)


def left_padded_mask(lengths, pos):
    """[batch, key] bool, True on the last `length` positions of each row."""
    return torch.stack([torch.arange(pos) >= pos - n for n in lengths])


MASK = left_padded_mask([5, 3], 5)  # row 1 has two left pads


def uniform_causal(n, dtype=torch.float64):
    return torch.ones(n, n, dtype=dtype).tril() / torch.arange(1, n + 1, dtype=dtype)[:, None]


def bos_sink(n, dtype=torch.float64):
    a = torch.zeros(n, n, dtype=dtype)
    a[:, 0] = 1.0
    return a


# ----------------------------------------------------------------------------- loop references


def ref_layer_matrix(rows, residual, mask_row):
    """One mixed, masked, renormalised [query][key] list-of-lists matrix."""
    n = len(rows)
    out = []
    for q in range(n):
        row = [(1 - residual) * rows[q][k] + residual * (q == k) for k in range(n)]
        if mask_row is not None:
            row = [0.0 if not (mask_row[k] and mask_row[q]) else row[k] for k in range(n)]
        total = sum(row)
        out.append([x / total for x in row] if total > 0 else [0.0] * n)
    return out


def ref_matmul(a, b):
    n, m, p = len(a), len(b), len(b[0])
    return [[sum(a[i][j] * b[j][k] for j in range(m)) for k in range(p)] for i in range(n)]


def ref_rollout(patterns, residual, fusion, key_mask):
    L, B, H, Q, K = patterns.shape
    fuse = {"mean": lambda xs: sum(xs) / len(xs), "max": max, "min": min}[fusion]
    out = []
    for b in range(B):
        state = None
        mask_row = None if key_mask is None else key_mask[b].tolist()
        for layer in range(L):
            p = patterns[layer, b].tolist()
            fused = [[fuse([p[h][q][k] for h in range(H)]) for k in range(K)] for q in range(Q)]
            step = ref_layer_matrix(fused, residual, mask_row)
            state = step if state is None else ref_matmul(step, state)
        out.append(state)
    return torch.tensor(out, dtype=torch.float64)


def ref_flow(patterns, residual, key_mask):
    L, B, H, Q, K = patterns.shape
    out = [[[None] * H for _ in range(B)] for _ in range(L)]
    for b in range(B):
        mask_row = None if key_mask is None else key_mask[b].tolist()
        for h in range(H):
            state = None
            for layer in range(L):
                step = ref_layer_matrix(patterns[layer, b, h].tolist(), residual, mask_row)
                state = step if state is None else ref_matmul(step, state)
                out[layer][b][h] = state
    return torch.tensor(out, dtype=torch.float64)


def ref_vector_norm(vec, norm):
    if norm == "l1":
        return sum(abs(x) for x in vec)
    if norm == "l2":
        return math.sqrt(sum(x * x for x in vec))
    return max(abs(x) for x in vec)


def ref_masked(key_mask, b, q, k, n_query, n_key):
    return key_mask is None or (bool(key_mask[b, k]) and bool(key_mask[b, n_key - n_query + q]))


def ref_value_weighted(pattern, values, norm, key_mask):
    B, H, Q, K = pattern.shape
    group = H // values.shape[2]
    out = torch.zeros(B, H, Q, K, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for q in range(Q):
                row = [
                    float(pattern[b, h, q, k]) * ref_vector_norm(values[b, k, h // group].tolist(), norm)
                    if ref_masked(key_mask, b, q, k, Q, K) else 0.0
                    for k in range(K)
                ]
                total = sum(row)
                for k in range(K):
                    out[b, h, q, k] = row[k] / total if total > 0 else 0.0
    return out


def ref_norm_based(pattern, values, W_O, per_head, key_mask):
    B, H, Q, K = pattern.shape
    group, d_head, d_model = H // values.shape[2], W_O.shape[1], W_O.shape[2]
    out = torch.zeros((B, H, Q, K) if per_head else (B, Q, K), dtype=torch.float64)
    for b in range(B):
        for q in range(Q):
            for k in range(K):
                total = [0.0] * d_model
                for h in range(H):
                    a = float(pattern[b, h, q, k]) if ref_masked(key_mask, b, q, k, Q, K) else 0.0
                    v = values[b, k, h // group].tolist()
                    vec = [a * sum(v[d] * float(W_O[h, d, m]) for d in range(d_head)) for m in range(d_model)]
                    if per_head:
                        out[b, h, q, k] = ref_vector_norm(vec, "l2")
                    total = [t + x for t, x in zip(total, vec)]
                if not per_head:
                    out[b, q, k] = ref_vector_norm(total, "l2")
    return out


def ref_row_metrics(pattern, key_mask):
    """(entropy, max share) per row of [batch, head, query, key]."""
    B, H, Q, K = pattern.shape
    ent, top = torch.zeros(B, H, Q, dtype=torch.float64), torch.zeros(B, H, Q, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for q in range(Q):
                row = [float(pattern[b, h, q, k]) if ref_masked(key_mask, b, q, k, Q, K) else 0.0 for k in range(K)]
                total = sum(row)
                row = [x / total for x in row] if total > 0 else [0.0] * K
                ent[b, h, q] = -sum(x * math.log(x) for x in row if x > 0)
                top[b, h, q] = max(row)
    return ent, top


# ----------------------------------------------------------------------------- analytic cases


@pytest.mark.parametrize("residual", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_identity_attention_gives_identity_rollout(residual, fusion):
    patterns = torch.eye(4).expand(3, 2, 5, 4, 4)
    torch.testing.assert_close(rollout(patterns, residual=residual, head_fusion=fusion), torch.eye(4).expand(2, 4, 4))


def test_uniform_causal_one_and_two_layers_by_hand():
    A = uniform_causal(3)[None, None]  # [batch, head, query, key]
    torch.testing.assert_close(rollout_step(None, A, residual=0.0)[0], uniform_causal(3), **F64)
    expected = torch.tensor([[1, 0, 0], [1 / 4, 3 / 4, 0], [1 / 6, 1 / 6, 2 / 3]], dtype=torch.float64)
    torch.testing.assert_close(rollout_step(None, A)[0], expected, **F64)
    # uniform causal twice, residual 0: A @ A
    twice = torch.tensor([[1, 0, 0], [3 / 4, 1 / 4, 0], [11 / 18, 5 / 18, 2 / 18]], dtype=torch.float64)
    torch.testing.assert_close(rollout(torch.stack([A, A]), residual=0.0)[0], twice, **F64)
    # uniform causal, then a BOS sink, residual 0.5: (½ sink + ½ I) @ (½ uniform + ½ I)
    sink = bos_sink(3)[None, None]
    by_hand = torch.tensor([[1, 0, 0], [5 / 8, 3 / 8, 0], [7 / 12, 1 / 12, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(rollout(torch.stack([A, sink]))[0], by_hand, **F64)


def test_head_fusion_by_hand():
    heads = torch.stack([torch.eye(3, dtype=torch.float64), bos_sink(3)])[None]  # [batch, head, query, key]
    half = torch.tensor([[1, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(rollout_step(None, heads, residual=0.0, head_fusion="mean")[0], half, **F64)
    torch.testing.assert_close(rollout_step(None, heads, residual=0.0, head_fusion="max")[0], half, **F64)
    # min of disjoint heads leaves rows 1, 2 without mass: zero rows at residual 0, identity at 0.5
    only_bos = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(rollout_step(None, heads, residual=0.0, head_fusion="min")[0], only_bos, **F64)
    torch.testing.assert_close(rollout_step(None, heads, head_fusion="min")[0], torch.eye(3, dtype=torch.float64))


def test_rows_sum_to_one_and_padding_gets_no_mass():
    patterns = causal_patterns(4, 2, 3, 5, key_mask=MASK)
    for out in (rollout(patterns, key_mask=MASK), attention_flow(patterns, key_mask=MASK)[-1]):
        rows = out.sum(-1)  # [batch, (head,) query]
        real = MASK if rows.ndim == 2 else MASK[:, None].expand_as(rows)
        torch.testing.assert_close(rows[real], torch.ones_like(rows[real]), **F64)
        assert (rows[~real] == 0).all()
        pad_keys = ~MASK.view(2, *(1,) * (out.ndim - 2), 5).expand_as(out)
        assert (out[pad_keys] == 0).all()


def test_residual_one_gives_identity_on_real_tokens():
    patterns = causal_patterns(2, 2, 3, 5, key_mask=MASK)
    eye_real = torch.diag_embed(MASK.double())  # [batch, query, key]
    torch.testing.assert_close(rollout(patterns, residual=1.0, key_mask=MASK), eye_real, **F64)
    flow = attention_flow(patterns, residual=1.0, key_mask=MASK)
    torch.testing.assert_close(flow, eye_real[None, :, None].expand_as(flow), **F64)


def test_nan_in_padded_query_rows_does_not_leak():
    patterns = causal_patterns(2, 2, 3, 5, key_mask=MASK)
    patterns[:, 1, :, :2] = math.nan  # fully masked softmax rows of the padded queries
    assert torch.isfinite(rollout(patterns, key_mask=MASK)).all()
    assert torch.isfinite(attention_entropy(patterns[0], key_mask=MASK)).all()


# ----------------------------------------------------------------------------- loop references


@pytest.mark.parametrize("key_mask", [None, MASK], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("residual", [0.0, 0.3])
def test_rollout_matches_loops(key_mask, fusion, residual):
    patterns = causal_patterns(3, 2, 4, 5, key_mask=key_mask, seed=1)
    out = rollout(patterns, residual=residual, head_fusion=fusion, key_mask=key_mask)
    torch.testing.assert_close(out, ref_rollout(patterns, residual, fusion, key_mask), **F64)


@pytest.mark.parametrize("key_mask", [None, MASK], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("residual", [0.0, 0.2])
def test_flow_matches_loops(key_mask, residual):
    patterns = causal_patterns(3, 2, 3, 5, key_mask=key_mask, seed=2)
    out = attention_flow(patterns, residual=residual, key_mask=key_mask)
    torch.testing.assert_close(out, ref_flow(patterns, residual, key_mask), **F64)


@pytest.mark.parametrize("key_mask", [None, MASK], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("n_kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
def test_value_weighted_matches_loops(key_mask, n_kv, norm):
    pattern = causal_patterns(1, 2, 4, 5, key_mask=key_mask, seed=3)[0]
    values = torch.randn(2, 5, n_kv, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out = value_weighted(pattern, values, norm=norm, key_mask=key_mask)
    torch.testing.assert_close(out, ref_value_weighted(pattern, values, norm, key_mask), **F64)


@pytest.mark.parametrize("key_mask", [None, MASK], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("n_kv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("per_head", [True, False], ids=["per-head", "layer"])
def test_norm_based_matches_loops(key_mask, n_kv, per_head):
    g = torch.Generator().manual_seed(5)
    pattern = causal_patterns(1, 2, 4, 5, key_mask=key_mask, seed=6)[0]
    values = torch.randn(2, 5, n_kv, 3, dtype=torch.float64, generator=g)
    W_O = torch.randn(4, 3, 6, dtype=torch.float64, generator=g)  # [head, d_head, d_model]
    out = (norm_based if per_head else norm_based_layer)(pattern, values, W_O, key_mask=key_mask)
    # the layer-level form is a Gram-matrix square root: float64 rounding then sqrt
    tol = F64 if per_head else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out, ref_norm_based(pattern, values, W_O, per_head, key_mask), **tol)


def test_float32_inputs_match_the_float64_loops():
    """The float32 path (what runs on saved activations) against the loops, at float32 tolerances;
    the layer-level norm goes through a Gram matrix and a square root, hence its looser bound."""
    g = torch.Generator().manual_seed(13)
    patterns = causal_patterns(3, 2, 4, 5, key_mask=MASK, seed=14)
    values, W_O = torch.randn(2, 5, 2, 3, dtype=torch.float64, generator=g), torch.randn(4, 3, 6, dtype=torch.float64, generator=g)
    p32, v32, w32 = patterns.float(), values.float(), W_O.float()
    torch.testing.assert_close(rollout(p32, key_mask=MASK), ref_rollout(patterns, 0.5, "mean", MASK).float(), **F32)
    torch.testing.assert_close(attention_flow(p32, key_mask=MASK), ref_flow(patterns, 0.0, MASK).float(), **F32)
    layer = ref_norm_based(patterns[0], values, W_O, False, MASK).float()
    torch.testing.assert_close(norm_based_layer(p32[0], v32, w32, key_mask=MASK), layer, rtol=1e-4, atol=1e-5)


def test_norm_based_key_chunks_agree(monkeypatch):
    g = torch.Generator().manual_seed(7)
    pattern = causal_patterns(1, 2, 4, 6, seed=8)[0]
    values, W_O = torch.randn(2, 6, 2, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    whole = [(norm_based if p else norm_based_layer)(pattern, values, W_O) for p in (True, False)]
    monkeypatch.setattr(attention, "_CHUNK_ELEMENTS", 2 * 4 * 5 * 4)  # 4 keys per chunk: 2 chunks
    for p, expected in zip((True, False), whole):
        torch.testing.assert_close((norm_based if p else norm_based_layer)(pattern, values, W_O), expected, **F64)


@pytest.mark.parametrize("key_mask", [None, MASK], ids=["unpadded", "left-padded"])
def test_entropy_and_concentration_match_loops(key_mask):
    pattern = causal_patterns(1, 2, 3, 5, key_mask=key_mask, seed=9)[0]
    ent, top = ref_row_metrics(pattern, key_mask)
    torch.testing.assert_close(attention_entropy(pattern, key_mask=key_mask), ent, **F64)
    torch.testing.assert_close(attention_concentration(pattern, key_mask=key_mask), top, **F64)
    matrix = rollout(causal_patterns(2, 2, 3, 5, key_mask=key_mask), key_mask=key_mask)
    ent, top = ref_row_metrics(matrix[:, None], None)
    torch.testing.assert_close(rollout_entropy(matrix), ent[:, 0], **F64)
    torch.testing.assert_close(rollout_max(matrix), top[:, 0], **F64)


def test_metrics_on_generation_step_queries():
    """One new query over a left-padded cache: the query is the last key position."""
    pattern = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.2, 0.2, 0.2, 0.4]])[:, None, None]  # [batch, head, 1, key]
    mask = left_padded_mask([2, 4], 4)
    torch.testing.assert_close(attention_entropy(pattern, key_mask=mask)[:, 0, 0][0], torch.tensor(math.log(2)))
    torch.testing.assert_close(attention_concentration(pattern, key_mask=mask)[:, 0, 0], torch.tensor([0.5, 0.4]))


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa"])
def test_norm_based_on_a_real_attention_layer(family):
    """Query 0 sees only key 0, so its layer-level norm is exactly ‖attention output − b_O‖: a real
    module checks the value layout, the W_O orientation and the GQA grouping end to end."""
    transformers = pytest.importorskip("transformers")
    from nnattr.kernels.heads import o_proj_per_head, split_values

    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(n_layer=1, n_head=4, n_embd=32, vocab_size=50, n_positions=16)
        model = transformers.GPT2LMHeadModel(config)
        attn = model.transformer.h[0].attn
        v_module, o_module, layout, n_kv, conv1d = attn.c_attn, attn.c_proj, "gpt2_fused", 4, True
    else:
        config = transformers.LlamaConfig(
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
            intermediate_size=64, vocab_size=50, attention_bias=True,
        )
        model = transformers.LlamaForCausalLM(config)
        attn = model.model.layers[0].self_attn
        v_module, o_module, layout, n_kv, conv1d = attn.v_proj, attn.o_proj, "separate", 2, False
    assert sum(p.numel() for p in model.parameters()) < 50_000
    model.set_attn_implementation("eager")
    seen = {}
    v_module.register_forward_hook(lambda m, i, out: seen.update(v=out))
    o_module.register_forward_hook(lambda m, i, out: seen.update(o=out))
    with torch.no_grad():
        pattern = model(torch.randint(0, 50, (2, 6)), output_attentions=True).attentions[0]  # [batch, head, query, key]
    values = split_values(seen["v"], layout=layout, n_heads=4, n_kv_heads=n_kv, d_head=8)  # [batch, key, kv_head, d_head]
    W_O = o_proj_per_head(o_module.weight, n_heads=4, conv1d=conv1d)  # [head, d_head, d_model]
    layer = norm_based_layer(pattern, values, W_O)  # [batch, query, key]
    torch.testing.assert_close(layer[:, 0, 0], (seen["o"][:, 0] - o_module.bias).norm(dim=-1), **F32)
    rows = rollout(pattern[None]).sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), **F32)


# ----------------------------------------------------------------------------- streaming, dtypes, devices


def test_streaming_fold_equals_stacked():
    patterns = causal_patterns(4, 2, 3, 5, key_mask=MASK, dtype=torch.float32)
    state = None
    for layer in range(4):
        state = rollout_step(state, patterns[layer].clone(), residual=0.4, head_fusion="max", key_mask=MASK)
    assert torch.equal(state, rollout(patterns, residual=0.4, head_fusion="max", key_mask=MASK))
    flow = None
    for layer in range(4):
        flow = flow_step(flow, patterns[layer], key_mask=MASK)
    assert torch.equal(flow, attention_flow(patterns, key_mask=MASK)[-1])


def test_bf16_inputs_give_float32_close_to_float32_path():
    g = torch.Generator().manual_seed(10)
    patterns = causal_patterns(3, 2, 4, 5, key_mask=MASK, dtype=torch.float32)
    values, W_O = torch.randn(2, 5, 2, 3, generator=g), torch.randn(4, 3, 6, generator=g)
    cases = [
        lambda p, v, w: rollout(p, key_mask=MASK),
        lambda p, v, w: attention_flow(p, key_mask=MASK),
        lambda p, v, w: value_weighted(p[0], v, key_mask=MASK),
        lambda p, v, w: norm_based(p[0], v, w),
        lambda p, v, w: norm_based_layer(p[0], v, w),
        lambda p, v, w: attention_entropy(p[0], key_mask=MASK),
    ]
    bf16 = [x.bfloat16() for x in (patterns, values, W_O)]
    for case in cases:
        out = case(*bf16)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, case(*[x.float() for x in bf16]), **F32)  # same math on the rounded inputs
        torch.testing.assert_close(out, case(patterns, values, W_O), rtol=3e-2, atol=3e-2)  # bf16 rounding only


def test_float32_math_survives_autocast():
    """NDIF runs blocks under bf16 autocast; the kernels switch it off for their matmuls."""
    patterns = causal_patterns(3, 2, 4, 5, dtype=torch.float32)
    values, W_O = torch.randn(2, 5, 4, 3), torch.randn(4, 3, 6)
    plain = rollout(patterns), norm_based_layer(patterns[0], values, W_O)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = rollout(patterns), norm_based_layer(patterns[0], values, W_O)
    for a, b in zip(cast, plain):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_meta_tensors_give_shapes_without_memory():
    patterns = torch.empty(80, 1, 64, 4096, 4096, device="meta")
    assert rollout(patterns).shape == (1, 4096, 4096)


def test_gradients_flow_through_every_kernel():
    """gradcheck in float64: the in-place steps run on fresh tensors only."""
    g = torch.Generator().manual_seed(11)
    mask = left_padded_mask([3, 2], 3)
    patterns = causal_patterns(2, 2, 2, 3, key_mask=mask, seed=12).requires_grad_(True)
    values = torch.randn(2, 3, 1, 2, dtype=torch.float64, generator=g, requires_grad=True)
    W_O = torch.randn(2, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    weights = torch.randn(2, 3, 3, dtype=torch.float64, generator=g)  # rows of rollout sum to 1: weight them
    cases = [
        (lambda p: rollout(p, key_mask=mask, head_fusion="max") * weights, (patterns,)),
        (lambda p: attention_flow(p, residual=0.2, key_mask=mask), (patterns,)),
        (lambda p, v: value_weighted(p[0], v, key_mask=mask), (patterns, values)),
        (lambda p, v, w: norm_based_layer(p[0], v, w, key_mask=mask), (patterns, values, W_O)),
        (lambda p, v, w: norm_based(p[0], v, w, key_mask=mask), (patterns, values, W_O)),
        (attention_entropy, (torch.rand(2, 3, 4, dtype=torch.float64, generator=g).requires_grad_(True),)),
    ]
    for fn, inputs in cases:
        assert torch.autograd.gradcheck(fn, inputs)
    # at p = 0 entropy has no derivative (-inf); the kernel gives 0 there, not NaN
    attention_entropy(patterns[0], key_mask=mask).sum().backward()
    assert torch.isfinite(patterns.grad).all()


# ----------------------------------------------------------------------------- bad input


def bad(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        fn(*args, **kwargs)


def test_errors_name_shapes_and_modes():
    p4, p5 = torch.rand(2, 4, 5, 5), torch.rand(3, 2, 4, 5, 5)
    bad(r"patterns must be \[layer, batch, head, query, key\]; got shape \(2, 4, 5, 5\)", rollout, p4)
    bad(r"pattern must be \[batch, head, query, key\]; got shape \(3, 2, 4, 5, 5\)", rollout_step, None, p5)
    bad(r"has no layers", rollout, torch.rand(0, 2, 4, 5, 5))
    bad(r"query == key; got pattern \(2, 4, 1, 5\)", rollout_step, None, torch.rand(2, 4, 1, 5))
    bad(r"state \(2, 4, 4\) must be \[batch, query, key\] = \[2, 5, 5\]", rollout_step, torch.rand(2, 4, 4), p4)
    bad(r"state \(2, 5, 5\) must match pattern \(2, 4, 5, 5\)", flow_step, torch.rand(2, 5, 5), p4)
    bad(r"unknown head_fusion 'median'", rollout, p5, head_fusion="median")
    bad(r"residual must lie in \[0, 1\]; got 1.5", rollout, p5, residual=1.5)
    bad(r"key_mask must be a bool tensor \[batch, key\] = \[2, 5\].*\(2, 4, 5, 5\); got torch.bool of shape \(2, 4\)",
        rollout, p5, key_mask=torch.ones(2, 4, dtype=torch.bool))
    bad(r"got torch.int64 of shape \(2, 5\)", attention_flow, p5, key_mask=torch.ones(2, 5, dtype=torch.long))
    bad(r"unknown norm 'l3'", value_weighted, p4, torch.rand(2, 5, 2, 3), norm="l3")
    bad(r"4 heads, not a multiple of the 3 kv heads of values \(2, 5, 3, 8\)", value_weighted, p4, torch.rand(2, 5, 3, 8))
    bad(r"values \(2, 6, 2, 8\) must be \[batch, key, kv_head, d_head\] with batch=2, key=5", norm_based,
        p4, torch.rand(2, 6, 2, 8), torch.rand(4, 8, 16))
    bad(r"W_O \(8, 4, 16\) must be \[head, d_head, d_model\] with head=4, d_head=8", norm_based,
        p4, torch.rand(2, 5, 2, 8), torch.rand(8, 4, 16))
    bad(r"rollout_matrix must be \[batch, query, key\]; got shape \(5, 5\)", rollout_entropy, torch.rand(5, 5))
    bad(r"pattern must be \[batch, \.\.\., query, key\]; got shape \(5, 5\)",
        attention_entropy, torch.rand(5, 5), key_mask=torch.ones(5, 5, dtype=torch.bool))


# ----------------------------------------------------------------------------- the module itself


def test_docstring_examples_run():
    result = doctest.testmod(attention, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10 and result.failed == 0
