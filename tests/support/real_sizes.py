"""Real model sizes on paper: each recipe's NDIF request, its result and the server memory it holds.

For the real configurations of Llama-3.1-8B/70B/405B, GPT-J-6B and OLMo-3-7B (written out below,
weights on the meta device, nothing downloaded), one prompt of `POSITIONS` tokens:

- **request**: the recipe's block serialized exactly as nnsight's `RemoteBackend` sends it (zstd),
  built against the meta model and never sent (`_Capture`);
- **result**: the bytes of the tensors the trace saves (`result_bytes`, from shapes; the tests
  check every formula against the tensors a tiny model's run really returns);
- **held**: server memory the trace keeps alive beyond the plain forward (`held_bytes`, from
  shapes, bf16 activations as NDIF serves them, float32 where the kernels compute): the dominant
  terms named in `HELD`, plus, for gradient recipes, the autograd graph of the forward, measured
  (`graph_bytes`) on the meta model with ``saved_tensors_hooks`` (parameters excluded).

    PYTHONPATH=. python tests/support/real_sizes.py            # rewrite docs/remote.md's section
"""

from __future__ import annotations

import functools

import torch
import transformers as T

POSITIONS, K, BF16, F32, I64 = 128, 5, 2, 4, 8
MB = 1_000_000


def llama31(layers: int, d_model: int, heads: int, d_mlp: int):
    return lambda: T.LlamaConfig(
        num_hidden_layers=layers, hidden_size=d_model, num_attention_heads=heads, num_key_value_heads=8,
        intermediate_size=d_mlp, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


MODELS = {
    "Llama-3.1-8B": llama31(32, 4096, 32, 14336),
    "Llama-3.1-70B": llama31(80, 8192, 64, 28672),
    "Llama-3.1-405B": llama31(126, 16384, 128, 53248),
    "GPT-J-6B": lambda: T.GPTJConfig(
        vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, n_inner=None,
        activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=False, bos_token_id=50256,
        eos_token_id=50256),
    "OLMo-3-7B": lambda: T.Olmo3Config(
        vocab_size=100278, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=65536, rms_norm_eps=1e-6, sliding_window=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
        pad_token_id=100277, bos_token_id=None, eos_token_id=100257),
}


def _recipes():
    from nnattr.recipes import (activation_patching, attention_rollout, attention_summary, attention_views,
                                attribution_patching, direct_logit_attribution, edge_attribution_patching,
                                expert_attribution, feature_attribution,
                                feature_patching, head_attribution, logit_lens, token_attribution, token_circulation)

    dla, views = direct_logit_attribution, attention_views
    return {  # name: (recipe, keyword arguments)
        **{f"dla by={by}": (dla, dict(by=by)) for by in ("component", "layer", "head", "head_position", "all")},
        "logit_lens positions=last": (logit_lens, dict(positions="last")),
        "logit_lens positions=all": (logit_lens, dict(positions="all")),
        "head_attribution by=head": (head_attribution, dict(by="head")),
        "head_attribution by=head_position": (head_attribution, dict(by="head_position")),
        "dla by=head_position layers=[-1]": (dla, dict(by="head_position", layers=[-1])),  # the 1 MB rule's option
        "head_attribution by=head_position layers=[-1]": (head_attribution, dict(by="head_position", layers=[-1])),
        **{f"attention_rollout view={v}": (attention_rollout, dict(view=v)) for v in ("rollout", "value_weighted",
                                                                                       "flow")},
        "attention_views patterns layers=[-1]": (views, dict(layers=[-1])),
        "attention_views patterns layers=[-1] heads=[0]": (views, dict(layers=[-1], heads=[0])),
        "attention_summary layer_idx=all": (attention_summary, dict(layer_idx="all")),
        "token_attribution ig (64 steps)": (token_attribution, dict(method="ig")),
        "token_attribution grad_x_input": (token_attribution, dict(method="grad_x_input")),
        "token_attribution attention": (token_attribution, dict(method="attention")),
        "token_circulation": (token_circulation, {}),
        # on one clean/corrupted pair (`corrupted`), answer and distractor ids ANSWER:
        "activation_patching every node (default)": (activation_patching, {}),
        f"activation_patching candidates k={PATCH_K}": (activation_patching, dict(candidates=Built(candidates),
                                                                                   k=PATCH_K)),
        "attribution_patching atp": (attribution_patching, {}),
        "attribution_patching ig (5 steps)": (attribution_patching, dict(method="ig")),
        "attribution_patching atp nodes=[head_pos]": (attribution_patching, dict(nodes=["head_pos"])),
        "edge_attribution_patching atp": (edge_attribution_patching, {}),
        "edge_attribution_patching ig (5 steps)": (edge_attribution_patching, dict(method="ig")),
        f"edge_attribution_patching atp top_k={EDGES_K}": (edge_attribution_patching, dict(top_k=EDGES_K)),
        "expert_attribution (dense: DLA by component)": (expert_attribution, {}),
        f"feature_attribution ({SAE_WIDTH}x SAE, top_k=20)": (feature_attribution, dict(sae=Built(sae))),
        f"feature_patching ({SAE_WIDTH}x SAE, top_k=20)": (feature_patching, dict(sae=Built(sae))),
    }


#: Patching recipes run on one pair: the prompt and `corrupted` (its middle token changed), with answer and
#: distractor ids every vocabulary holds. SAE recipes: a ReLU SAE of SAE_WIDTH x d_model features on the middle
#: layer's resid_pre (between Llama Scope's 8x and 32x SAEs of Llama-3.1-8B), built on the model's device (meta:
#: no memory). TOP_K: the SAE recipes' default top_k.
PAIRS = ("activation_patching", "attribution_patching", "edge_attribution_patching", "feature_patching")
ANSWER, PATCH_K, SAE_WIDTH, TOP_K, EDGES_K = (5, 6), 10, 16, 20, 1000


class Built:
    """An option built for the run's model and prompt (``make(model, ids)``): an SAE of its width, candidates."""

    def __init__(self, make) -> None:
        self.make = make


def corrupted(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` with its middle token replaced by another id in 3..99."""
    out, mid = ids.clone(), ids.shape[1] // 2
    out[:, mid] = 3 + (ids[:, mid] - 2) % 97
    return out


def sae(model, ids):
    """A ReLU SAE of ``SAE_WIDTH x d_model`` features at the middle layer's resid_pre (random, float32, as nnattr
    sends it), on the model's device: on the meta device it allocates nothing (`request_bytes` adds its bytes)."""
    from nnattr.arch import arch_of
    from nnattr.features import SAE

    a, meta = arch_of(model), next(model._module.parameters()).is_meta
    d, n, g = a.d_model, SAE_WIDTH * a.d_model, torch.Generator().manual_seed(0)
    make = (lambda *shape: torch.empty(*shape, device="meta")) if meta else \
        (lambda *shape: torch.randn(*shape, generator=g) / d**0.5)  # noqa: E731
    return SAE(W_enc=make(d, n), b_enc=make(n), W_dec=make(n, d), b_dec=make(d), layer=a.n_layers // 2)


def sae_bytes(d) -> int:
    """The SAE's float32 tensors, which travel with the request (``d``: `nnattr.arch.Arch` sizes)."""
    return F32 * (2 * d.d_model * SAE_WIDTH * d.d_model + SAE_WIDTH * d.d_model + d.d_model)


def candidates(model, ids) -> dict:
    """An attribution-patching result's shapes for ``ids`` (random scores): activation patching's
    ``candidates``, from which it patches the top `PATCH_K` of each default node type."""
    from nnattr.arch import arch_of
    from nnattr.pairs import DEFAULT_NODES, node_dims
    from nnattr.result import Attribution

    a, g = arch_of(model), torch.Generator().manual_seed(0)
    sizes = {"prompt": 1, "layer": a.n_layers, "head": a.n_heads, "position": ids.shape[1]}
    return {node: Attribution(torch.randn(*[sizes[d] for d in node_dims(node)], generator=g), node_dims(node),
                              {d: [str(i) for i in range(sizes[d])] for d in node_dims(node)},
                              method="attribution_patching", by=node) for node in DEFAULT_NODES}


def run_case(case: str, model, ids: torch.Tensor, backend=None, **override):
    """Run ``case``'s recipe on ``ids`` (``[1, pos]``; pair recipes: and `corrupted`), options overridden."""
    recipe, kwargs = _recipes()[case]
    kwargs = {k: v.make(model, ids) if isinstance(v, Built) else v for k, v in {**kwargs, **override}.items()}
    if recipe.__name__.rsplit(".", 1)[-1] in PAIRS:
        return recipe.run(model, ids, corrupted(ids), [ANSWER[0]], [ANSWER[1]], backend=backend, **kwargs)
    return recipe.run(model, ids, backend=backend, **kwargs)




#: Cases that need exact per-head contributions: refused where heads pass a post-sub-layer norm (OLMo-3).
HEAD_LEVEL = ("dla by=head", "dla by=head_position", "dla by=all", "token_attribution attention",
              "dla by=head_position layers=[-1]")


def refused(case: str, d) -> bool:
    return case in HEAD_LEVEL and not d.head_exact


def edges(d) -> int:
    """Writers x readers: embeddings, heads, MLPs x query heads, kv heads (key, value), MLPs, the logits."""
    return (len(d.embeddings) + d.n_layers * (d.n_heads + 1)) * (d.n_layers * (d.n_heads + 2 * d.n_kv_heads + 1) + 1)


def result_bytes(case: str, d, pos: int = POSITIONS) -> int:
    """Bytes of the tensors the trace saves for one prompt (``d``: `nnattr.arch.Arch` sizes)."""
    L, H, e = d.n_layers, d.n_heads, len(d.embeddings)
    answer = I64 + F32  # target id, its logit (metric)
    dla = answer + F32 * (e + 2 * L + 1)  # scores: embeddings, attn and MLP of each layer, bias
    lens = I64 + (L + 1) * (F32 + I64 + K * (I64 + F32))  # per layer: prob, rank, top-k ids and probs
    return {
        "dla by=component": dla, "dla by=layer": dla, "dla by=head": dla + F32 * L * H,
        "dla by=head_position": dla + F32 * L * H * pos, "dla by=all": dla + F32 * L * H,
        "logit_lens positions=last": lens, "logit_lens positions=all": I64 + pos * (lens - I64),
        "head_attribution by=head": answer + F32 * L * H,
        "head_attribution by=head_position": answer + F32 * L * H * pos,
        "dla by=head_position layers=[-1]": dla + F32 * 1 * H * pos,  # one layer kept
        "head_attribution by=head_position layers=[-1]": answer + F32 * 1 * H * pos,
        "attention_rollout view=rollout": F32 * pos**2, "attention_rollout view=value_weighted": F32 * pos**2,
        "attention_rollout view=flow": F32 * H * pos**2,
        "attention_views patterns layers=[-1]": F32 * H * pos**2,
        "attention_views patterns layers=[-1] heads=[0]": F32 * pos**2,
        "attention_summary layer_idx=all": F32 * L * 6,
        "token_attribution ig (64 steps)": answer + F32 + F32 * pos,
        "token_attribution grad_x_input": answer + F32 + F32 * pos,
        "token_attribution attention": answer + F32 * pos,
        "token_circulation": I64 + pos * (L + 1) * (F32 + 4) + F32 * 3 * L * pos,
        # a metric per patched row, after the clean and corrupted rows' (resid: per position, head: per head)
        "activation_patching every node (default)": F32 * (2 + L * (pos + 2 + H)),
        f"activation_patching candidates k={PATCH_K}": F32 * (2 + min(PATCH_K, L * pos) + 2 * min(PATCH_K, L)
                                                              + min(PATCH_K, L * H)),
        "attribution_patching atp": F32 * (2 + L * pos + 2 * L + L * H),  # metrics; resid, attn, mlp, head
        "attribution_patching ig (5 steps)": F32 * (2 + L * pos + 2 * L + L * H),
        "attribution_patching atp nodes=[head_pos]": F32 * (2 + L * H * pos),
        "edge_attribution_patching atp": F32 * (2 + edges(d)),  # metrics; every edge, NaN where none runs
        "edge_attribution_patching ig (5 steps)": F32 * (2 + edges(d)),
        f"edge_attribution_patching atp top_k={EDGES_K}": F32 * 2 + min(EDGES_K, edges(d)) * (F32 + 2 * I64),
        "expert_attribution (dense: DLA by component)": dla,  # no experts: no routing weights
        f"feature_attribution ({SAE_WIDTH}x SAE, top_k=20)": answer + TOP_K * (F32 + I64) + F32 * 4,
        f"feature_patching ({SAE_WIDTH}x SAE, top_k=20)": F32 * 2 + TOP_K * (F32 + I64) + F32 * 2,
    }[case]


#: What each recipe keeps alive beyond the plain forward (dominant terms); G(n) is the autograd graph
#: of the forward on n rows (measured), "one layer" terms live one layer at a time.
HELD = {
    "dla": "each write at the read position ((e + 2L) d_model, bf16) and the read logits row (vocab, f32)",
    "dla heads": "+ each layer's z at the read position (L x head x d_head, bf16)",
    "dla head_position": "+ every layer's values (L x pos x kv_head x d_head, bf16) and the read query's "
                         "attention rows (L x head x pos)",
    "logit_lens": "one layer's logits, probabilities and ranks at the read positions (3 x pos x vocab, f32)",
    "head_attribution": "G(1) + z and its gradient for every layer (2 x L x pos x head x d_head, bf16)",
    "attention": "the running map and one layer's probabilities ((1 + head) x pos^2, f32)",
    "token_attribution": "ig: G(steps + 1) for the steps + 1 rows; grad_x_input: G(1); attention: as DLA by "
                         "head_position",
    "token_circulation": "every layer's attention and MLP writes (2 x L x pos x d_model, bf16) and one layer's "
                         "logits (3 x pos x vocab, f32)",
    "activation_patching": "the residual stream entering every layer, both runs (2 x L x pos x d_model), and the "
                           "clean run's head inputs, attention and MLP writes (L x pos x (head x d_head + 2 d_model)), "
                           "bf16, whatever is patched; the patched forwards run `rows` prompts at once",
    "attribution_patching": "atp: G(1) + each node site's activation on the clean run and its gradient on the "
                            "corrupted run (2 x L x pos x width, bf16; width: d_model for resid, attn and mlp, "
                            "head x d_head for head); ig: G(steps) and (2 + steps) x L x pos x width (the clean and "
                            "corrupted runs, the gradients of the steps rows)",
    "edge_attribution_patching": "G(rows) (rows: 1, or steps for ig) + the writers' values on the clean (and, for "
                                 "ig, corrupted) run and the rows the gradient is taken at (embeddings, each output "
                                 "projection's input and MLP write: e x d_model + L x (head x d_head + d_model) per "
                                 "row and position, bf16), the streams the readers read and the MLP inputs' copies "
                                 "(3 x L x d_model), the projections' gradients (L x (head + 2 kv_head) x d_head), one "
                                 "reader layer's gradients in the residual stream ((head + 2 kv_head + 1) x d_model, "
                                 "f32) and the scores (writers x readers, f32)",
    "expert_attribution": "a dense model: as DLA by component",
    "feature_attribution": "the SAE's weights (2 x d_model x d_sae + d_sae + d_model, f32), 3 rows of d_sae "
                           "(f32) and the read logits row (vocab, f32)",
    "feature_patching": "the SAE's weights, G(1), the clean site and its gradient (2 x pos x d_model, bf16), and at "
                        "the scoring's peak 5 x pos x d_sae (f32: both runs' feature activations, the gradient "
                        "through W_dec, the difference, the scores)",
}


def held_bytes(case: str, d, graph: int, pos: int = POSITIONS) -> int:
    """Server memory the trace keeps alive beyond the plain forward (`HELD`); ``graph``: G(1) in bytes."""
    L, H, KV, dh, D, V, e = d.n_layers, d.n_heads, d.n_kv_heads, d.d_head, d.d_model, d.d_vocab, len(d.embeddings)
    dla = BF16 * (e + 2 * L) * D + F32 * V
    heads = BF16 * L * H * dh
    values = BF16 * L * (pos * KV * dh + H * pos)
    attention, S = F32 * (1 + H) * pos**2, SAE_WIDTH * D
    written = e * D + L * (H * dh + D)  # the writers, per row and position

    def eap(rows: int) -> int:  # the graph of `rows` rows, the writers of clean (, corrupted) and path rows, ...
        kept = BF16 * pos * ((1 + (rows > 1) + rows) * written + rows * (3 * L * D + L * (H + 2 * KV) * dh))
        return rows * graph + kept + F32 * pos * (H + 2 * KV + 1) * D * rows + F32 * edges(d)
    return {
        "dla by=component": dla, "dla by=layer": dla, "dla by=head": dla + heads, "dla by=all": dla + heads,
        "dla by=head_position": dla + heads + values,
        "logit_lens positions=last": 3 * F32 * V, "logit_lens positions=all": 3 * F32 * pos * V,
        "head_attribution by=head": graph + 2 * BF16 * L * pos * H * dh,
        "head_attribution by=head_position": graph + 2 * BF16 * L * pos * H * dh,
        "dla by=head_position layers=[-1]": dla + (heads + values) // L,  # one layer's z, values and rows
        "head_attribution by=head_position layers=[-1]": graph + 2 * BF16 * 1 * pos * H * dh,  # one layer's z, grad
        "attention_rollout view=rollout": attention, "attention_rollout view=value_weighted": attention,
        "attention_rollout view=flow": 2 * F32 * H * pos**2,
        "attention_views patterns layers=[-1]": F32 * H * pos**2,
        "attention_views patterns layers=[-1] heads=[0]": attention,
        "attention_summary layer_idx=all": attention,
        "token_attribution ig (64 steps)": 65 * graph, "token_attribution grad_x_input": graph,
        "token_attribution attention": values + F32 * V,
        "token_circulation": 2 * BF16 * L * pos * D + 3 * F32 * pos * V,
        "activation_patching every node (default)": BF16 * L * pos * (4 * D + H * dh),
        f"activation_patching candidates k={PATCH_K}": BF16 * L * pos * (4 * D + H * dh),
        "attribution_patching atp": graph + 2 * BF16 * L * pos * (3 * D + H * dh),
        "attribution_patching ig (5 steps)": 5 * graph + (2 + 5) * BF16 * L * pos * (3 * D + H * dh),
        "attribution_patching atp nodes=[head_pos]": graph + 2 * BF16 * L * pos * H * dh,
        "edge_attribution_patching atp": eap(1), "edge_attribution_patching ig (5 steps)": eap(5),
        f"edge_attribution_patching atp top_k={EDGES_K}": eap(1),
        "expert_attribution (dense: DLA by component)": dla,
        f"feature_attribution ({SAE_WIDTH}x SAE, top_k=20)": sae_bytes(d) + 3 * F32 * S + F32 * V,
        f"feature_patching ({SAE_WIDTH}x SAE, top_k=20)": sae_bytes(d) + graph + 2 * BF16 * pos * D + 5 * F32 * pos * S,
    }[case]


@functools.lru_cache(maxsize=None)
def meta_model(name: str):
    """The nnattr model of a real configuration, bf16 weights on the meta device (nothing allocated)."""
    import tempfile

    import nnsight

    from nnattr.arch import spec_for
    from tests.support import tiny

    config = MODELS[name]()
    folder = tempfile.mkdtemp(prefix="nnattr-real-config-")
    config.save_pretrained(folder)  # config.json only: nnsight builds the model on the meta device, as for a
    model = nnsight.TransformersModel(  # Hub repo id before dispatch (what nnattr.load does for remote use)
        folder, task="text-generation", tokenizer=tiny.tokenizer(), rename=spec_for(config).rename(),
        attn_implementation="eager",
        dtype=torch.bfloat16)
    model._module.requires_grad_(False)  # as NDIF hosts it
    assert all(p.is_meta for p in model._module.parameters())
    return model  # ids only: the word-level test tokenizer needs to decode nothing here


def prompt() -> torch.Tensor:
    """``[1, POSITIONS]`` token ids: BOS, then fixed ids every vocabulary holds."""
    ids = torch.randint(3, 100, (1, POSITIONS), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 2
    return ids


def request_bytes(name: str, case: str) -> int:
    """The recipe's request for ``name`` as nnsight's RemoteBackend would send it (zstd), not sent."""
    from nnattr.arch import arch_of
    from nnattr.remote import Deferred

    capture = _Capture()
    try:
        run_case(case, meta_model(name), prompt(), backend=capture)
    except Deferred:
        pass
    assert len(capture.sizes) == 1, f"{case}: {len(capture.sizes)} requests"
    return capture.sizes[0] + (sae_bytes(arch_of(MODELS[name]())) if "SAE" in case else 0)  # a meta SAE's bytes


def graph_bytes(name: str, rows: int = 1) -> int:
    """The autograd graph of the plain forward from the embedding output (what a backward keeps),
    measured with ``saved_tensors_hooks`` on the meta model: tensors saved for backward, without
    the (frozen) parameters, bf16."""
    import transformers.masking_utils as masking

    hf = meta_model(name)._module
    parameters = {id(p) for p in hf.parameters()}
    saved: dict[int, int] = {}

    def pack(x):
        base = x if x._base is None else x._base
        if id(x) not in parameters and id(base) not in parameters:
            saved[id(base)] = base.numel() * base.element_size()
        return x

    ids = torch.zeros(rows, POSITIONS, dtype=torch.long, device="meta")
    hook = hf.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    packed = masking.find_packed_sequence_indices  # reads values (.all()), which meta tensors lack
    masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        masking.find_packed_sequence_indices = packed
        hook.remove()
    return sum(saved.values())


def _make_capture():
    from nnsight.intervention.backends.remote import RemoteBackend

    from nnattr.remote import Deferred, _Replay, check_block

    class Capture(_Replay):  # a _Replay: nnattr's preflight (API key, hosted model) is skipped
        """Serializes each block as `RemoteBackend` would send it, records its size, sends nothing."""

        def __init__(self) -> None:
            super().__init__("meta/capture", "http://127.0.0.1:9", [])
            self.sizes: list[int] = []

        def __call__(self, tracer=None):
            check_block(tracer)
            self.sizes.append(len(RemoteBackend._serialize(self, tracer)))
            raise Deferred(len(self.sizes))

    return Capture()


_Capture = _make_capture


def result_cell(case: str, d) -> str:
    n = result_bytes(case, d)
    return size(n) + (" **>1 MB**" if n > MB else "")


def size(n: float) -> str:
    return f"{n / MB:,.1f} MB" if n >= 100_000 else f"{n / 1000:,.1f} kB"


def tables() -> str:
    """The three tables of docs/remote.md's section, measured and computed now."""
    from nnattr.arch import arch_of

    names, cases = list(MODELS), list(_recipes())
    archs = {n: arch_of(meta_model(n)) for n in names}
    graphs = {n: graph_bytes(n) for n in names}
    request = {(n, c): request_bytes(n, c) for n in names for c in cases if not refused(c, archs[n])}
    head = "| recipe | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    out = []
    for title, value in (
        ("Request (zstd, as sent)", lambda n, c: size(request[n, c])),
        (f"Result (1 prompt x {POSITIONS} positions)", lambda n, c: result_cell(c, archs[n])),
        ("Held beyond the plain forward", lambda n, c: size(held_bytes(c, archs[n], graphs[n]))),
    ):
        out.append(f"**{title}**\n\n" + head + "".join(
            f"| {c} | " + " | ".join("refused" if refused(c, archs[n]) else value(n, c) for n in names) + " |\n"
            for c in cases))
    out.append("G(1), the autograd graph of one prompt's forward (measured): "
               + ", ".join(f"{n} {size(graphs[n])}" for n in names) + ".\n")
    out.append(over_1mb(archs[BIGGEST]))
    out.append(closing(archs, graphs))
    return "\n".join(out)


BIGGEST = "Llama-3.1-405B"


def reductions(d) -> dict[str, str]:
    """For each case whose result can pass 1 MB at 405B (``d``), what a user can ask for instead."""
    r = lambda case: size(result_bytes(case, d))  # noqa: E731
    lens_k1 = I64 + POSITIONS * (d.n_layers + 1) * (F32 + I64 + (I64 + F32))
    per_layer = size(F32 * d.n_heads * POSITIONS)
    return {
        "dla by=head_position": f"`layers=[...]` ({per_layer} per layer kept: those layers' heads by source "
        f"position), or `by=\"head\"` ({r('dla by=head')}: every head, summed over source positions); then "
        "`attention_views` (`view=\"value_weighted\"`, `layers=`, `heads=`) for the few heads that matter",
        "head_attribution by=head_position": f"`layers=[...]` ({per_layer} per layer kept), or `by=\"head\"` "
                                             f"({r('head_attribution by=head')})",
        "logit_lens positions=all": f"`k=1` ({size(lens_k1)}: the top-1 prediction instead of the top {K}), "
                                    f"`positions=\"last\"` or `position=` ({r('logit_lens positions=last')})",
        "attention_rollout view=flow": "`attention_views(view=\"flow\", layers=[-1], heads=[...])`: "
                                       f"{r('attention_views patterns layers=[-1] heads=[0]')} per head",
        "attention_views patterns layers=[-1]": f"`heads=[...]`: {r('attention_views patterns layers=[-1] heads=[0]')}"
                                                " per head",
        "attribution_patching atp nodes=[head_pos]": f"`nodes=\"head\"` ({size(F32 * (2 + d.n_layers * d.n_heads))}: "
        "the same heads summed over positions) to find the heads, then "
        "`activation_patching(nodes=\"head_pos\", candidates=<that result>, k=...)`, which patches each of the top "
        f"`k` heads at every position (4 bytes per patched row); or `attn_pos` / `mlp_pos` nodes "
        f"({size(F32 * (2 + d.n_layers * POSITIONS))} each: one value per layer and position)",
        "edge_attribution_patching atp": f"`top_k=` ({r(f'edge_attribution_patching atp top_k={EDGES_K}')} for "
        f"{EDGES_K:,} edges: each pair's largest, chosen on the server); the whole grid is "
        f"{edges(d):,} edges per pair",
        "edge_attribution_patching ig (5 steps)": f"`top_k=`, as for `atp` "
                                                  f"({r(f'edge_attribution_patching atp top_k={EDGES_K}')})",
    }


def over_1mb(d) -> str:
    """The section's table of results over 1 MB at 405B (``d``), each with its reduction."""
    over = [c for c in _recipes() if not refused(c, d) and result_bytes(c, d) > MB]
    missing = [c for c in over if c not in reductions(d)]
    assert not missing, f"results over 1 MB at 405B without a reduction in real_sizes.reductions: {missing}"
    return ("### Over 1 MB at 405B, and how to ask for less\n\n| recipe | result at 405B | reduction |\n"
            "|---|---:|---|\n" + "".join(f"| `{c}` | {size(result_bytes(c, d))} | {reductions(d)[c]} |\n"
                                          for c in over))


def closing(archs: dict, graphs: dict) -> str:
    """What limits the gradient and SAE recipes: memory and the request, not the result."""
    small, big = "Llama-3.1-8B", BIGGEST
    gb = lambda n: f"{n / 1e9:,.0f} GB" if n >= 1e10 else f"{n / 1e9:,.1f} GB"  # noqa: E731
    return (
        f"Memory, not bytes, is what limits the gradient recipes: integrated gradients with the default 64\n"
        f"steps runs 65 copies of the prompt in one trace, and its autograd graph (65 × G(1)) is about "
        f"{gb(65 * graphs[small])}\nat 8B and {gb(65 * graphs[big])} at 405B for {POSITIONS} tokens. Use fewer "
        f"`steps`, shorter prompts, or `grad_x_input`\n(G(1)) on the largest models; attribution patching's "
        f"`method=\"ig\"` holds G(steps) ({gb(5 * graphs[big])} at 405B\nwith its default 5 steps).\n\n"
        f"The SAE recipes are limited by the SAE: its float32 weights (2 × d_model × d_sae × 4 bytes) travel\n"
        f"with every request and stay on the server for the run: {gb(sae_bytes(archs[small]))} for a "
        f"{SAE_WIDTH} × d_model SAE on Llama-3.1-8B,\n{gb(sae_bytes(archs[big]))} at 405B (zstd saves about 6% "
        f"of float32 weights). A narrower SAE is the only way to\nsend less: nnattr keeps SAEs in float32 and has "
        f"no server-side SAE.\n")


def write_doc(text: str, doc=None) -> None:
    """Replace docs/remote.md's section between its real-sizes markers with ``text``."""
    from pathlib import Path

    doc = Path(doc or Path(__file__).resolve().parents[2] / "docs" / "remote.md")
    old = doc.read_text()
    begin, end = "<!-- real-sizes:begin -->\n", "<!-- real-sizes:end -->"
    head, rest = old.split(begin)
    doc.write_text(head + begin + text + rest[rest.index(end):])


if __name__ == "__main__":
    torch.set_num_threads(1)
    write_doc(tables())
