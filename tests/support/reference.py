"""Plain-PyTorch references for the four recipes: forward hooks on native Hugging Face modules.

Written from the math, independently of nnattr: no nnsight, no ``nnattr.kernels``, no
``nnattr.arch``. Module paths come from this file's own table (``NATIVE``); every quantity is
read with ``register_forward_hook`` / ``register_forward_pre_hook`` on a plain ``model(...)``
call. Each function takes a batch ``input_ids: [batch, pos]`` and an optional left-padding
``attention_mask`` (positions are then counted from each row's first real token).

- DLA: the final norm's scale ``s`` is measured on the real residual and frozen; each write
  ``c`` then contributes ``N_s(c) . (W_U[t] - W_U[t'])`` with ``N_s(c) = centre(c) / s * w``
  (LayerNorm) or ``c / s * w`` (RMSNorm; Gemma: ``w = 1 + weight``), and the norm's bias and
  the unembedding's bias form one more term (Elhage et al. 2021).
- Logit lens: every layer's residual through the HF final norm and ``lm_head`` (and Gemma-2's
  soft-cap) (nostalgebraist 2020).
- Head attribution: ``sum_pos grad . z`` per head, ``z`` the output projection's input,
  the gradient from ``torch.autograd.grad`` (Nanda 2023).
- Attention rollout: ``output_attentions`` of an eager model, mean over heads,
  ``0.5 A + 0.5 I``, rows renormalised over real tokens, multiplied through the layers
  (Abnar & Zuidema 2020).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def _fused_gpt2(out: torch.Tensor, model) -> torch.Tensor:
    """GPT-2's ``c_attn`` output ``[q | k | v]``: values ``[batch, pos, head, d_head]``."""
    d_model, heads = model.config.hidden_size, model.config.num_attention_heads
    v = out[..., 2 * d_model :]  # [batch, pos, head * d_head]
    return v.reshape(*v.shape[:2], heads, d_model // heads)


def _fused_neox(out: torch.Tensor, model) -> torch.Tensor:
    """GPT-NeoX's ``query_key_value`` output, per head ``[q | k | v]``: ``[batch, pos, head, d_head]``."""
    heads = model.config.num_attention_heads
    per_head = out.reshape(*out.shape[:2], heads, -1)  # [batch, pos, head, 3 * d_head]
    d_head = per_head.shape[-1] // 3
    return per_head[..., 2 * d_head :]


def _separate(out: torch.Tensor, model) -> torch.Tensor:
    """``v_proj`` output ``[batch, pos, kv_head * d_head]`` -> ``[batch, pos, head, d_head]``,
    query head ``h`` reading kv head ``h // group``."""
    heads = model.config.num_attention_heads
    kv = model.config.num_key_value_heads
    v = out.reshape(*out.shape[:2], kv, -1)  # [batch, pos, kv_head, d_head]
    return torch.stack([v[:, :, h // (heads // kv)] for h in range(heads)], dim=2)


def _per_head(out: torch.Tensor, model) -> torch.Tensor:
    """A multi-head ``v_proj`` output (GPT-J: no ``num_key_value_heads``): ``[batch, pos, head, d_head]``."""
    return out.reshape(*out.shape[:2], model.config.num_attention_heads, -1)


def _phi3(out: torch.Tensor, model) -> torch.Tensor:
    """Phi-3's ``qkv_proj`` output, sliced as ``Phi3Attention.forward`` does: queries ``[:heads * d]``, keys the next
    ``kv * d``, values the rest; query head ``h`` reads kv head ``h // group``."""
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    d = model.config.hidden_size // heads
    return _separate(out[..., (heads + kv) * d :], model)


def _falcon(out: torch.Tensor, model) -> torch.Tensor:
    """Falcon's ``query_key_value`` output through the module's own ``_split_heads``; one shared (multi-query)
    value head is repeated for every query head."""
    value = model.transformer.h[0].self_attention._split_heads(out)[2]  # [batch, pos, head or 1, d_head]
    return value.expand(*value.shape[:2], model.config.num_attention_heads, value.shape[-1])


@dataclass(frozen=True)
class Native:
    """Where one family keeps things (paths for ``get_submodule``; block paths are relative)."""

    embeds: tuple[str, ...]  # modules whose outputs are the residual stream's first writes
    blocks: str
    attn_write: str  # the module whose output is attention's write to the residual stream
    mlp_write: str
    o_proj: str
    v_module: str
    values: Callable[[torch.Tensor, nn.Module], torch.Tensor]
    final_norm: str
    unembed: str = "lm_head"
    weight_offset: float = 0.0
    conv1d: bool = False  # output projection stored as [in, out]


_LLAMA = dict(embeds=("model.embed_tokens",), blocks="model.layers", attn_write="self_attn", mlp_write="mlp",
              o_proj="self_attn.o_proj", v_module="self_attn.v_proj", values=_separate, final_norm="model.norm")

NATIVE = {
    "gpt2": Native(("transformer.wte", "transformer.wpe"), "transformer.h", "attn", "mlp", "attn.c_proj",
                   "attn.c_attn", _fused_gpt2, "transformer.ln_f", conv1d=True),
    "gpt_neox": Native(("gpt_neox.embed_in",), "gpt_neox.layers", "attention", "mlp", "attention.dense",
                       "attention.query_key_value", _fused_neox, "gpt_neox.final_layer_norm"),
    "llama": Native(**_LLAMA),
    "mistral": Native(**_LLAMA),
    "qwen2": Native(**_LLAMA),
    "gemma": Native(**_LLAMA, weight_offset=1.0),
    "gemma2": Native(**{**_LLAMA, "attn_write": "post_attention_layernorm", "mlp_write": "post_feedforward_layernorm"},
                     weight_offset=1.0),
    # famA (issue 14). MoE blocks (Mixtral, Qwen3-MoE, GPT-OSS) write once, as `mlp` (GPT-OSS's returns
    # (out, router_scores): `_tensor` unwraps). OLMo-2/3 and Gemma-3 norm each sub-layer's output.
    "qwen3": Native(**_LLAMA),
    "qwen3_moe": Native(**_LLAMA),
    "mixtral": Native(**_LLAMA),
    "qwen2_moe": Native(**_LLAMA),  # routed experts plus a sigmoid-gated shared expert, one write
    "gpt_oss": Native(**_LLAMA),
    "olmo2": Native(**{**_LLAMA, "attn_write": "post_attention_layernorm", "mlp_write": "post_feedforward_layernorm"}),
    "olmo3": Native(**{**_LLAMA, "attn_write": "post_attention_layernorm", "mlp_write": "post_feedforward_layernorm"}),
    "gemma3_text": Native(**{**_LLAMA, "attn_write": "post_attention_layernorm",
                             "mlp_write": "post_feedforward_layernorm"}, weight_offset=1.0),
    # famB (issue 14). GPT-J and Falcon: parallel blocks, h + attn(ln(h)) + mlp(ln(h)); Falcon adds attention into the
    # MLP's output tensor in place (`recording` copies under no_grad).
    "gptj": Native(("transformer.wte",), "transformer.h", "attn", "mlp", "attn.out_proj", "attn.v_proj", _per_head,
                   "transformer.ln_f"),
    "falcon": Native(("transformer.word_embeddings",), "transformer.h", "self_attention", "mlp",
                     "self_attention.dense", "self_attention.query_key_value", _falcon, "transformer.ln_f"),
    "phi3": Native(**{**_LLAMA, "v_module": "self_attn.qkv_proj", "values": _phi3}),
    # OPT: no MLP module; fc1 -> relu -> fc2 run on the stream flattened to [batch * pos, d_model] (`recording`
    # restores the batch dimension).
    "opt": Native(("model.decoder.embed_tokens", "model.decoder.embed_positions"), "model.decoder.layers",
                  "self_attn", "fc2", "self_attn.out_proj", "self_attn.v_proj", _per_head,
                  "model.decoder.final_layer_norm"),
}


def native(model) -> Native:
    return NATIVE[model.config.model_type]


def blocks(model) -> list[nn.Module]:
    return list(model.get_submodule(native(model).blocks))


def _tensor(x):
    """The one place a tuple-or-tensor module output is unwrapped."""
    return x[0] if isinstance(x, (tuple, list)) else x


@contextlib.contextmanager
def recording(model, outputs: dict[str, str] | None = None, inputs: dict[str, str] | None = None):
    """Record modules' outputs and first inputs during ``model(...)``: ``{key: path}`` in,
    ``{key: tensor}`` out (the tensor stays in the autograd graph)."""
    seen: dict[str, torch.Tensor] = {}
    rows = {}  # the batch size of the call, for outputs a block computes on the flattened stream (OPT's fc2)

    def batch_size(module, args, kwargs):
        x = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        rows["n"] = x.shape[0]

    def record(module, args, out, key):
        x = _tensor(out)
        if x.ndim == 2:  # [batch * pos, d_model]: unflatten, and send the unflattened tensor on (so it has a gradient)
            x = x.unflatten(0, (rows["n"], -1))
            seen[key] = x if torch.is_grad_enabled() else x.clone()
            return x.flatten(0, 1)
        seen[key] = x if torch.is_grad_enabled() else x.clone()  # a copy: Falcon adds in place

    handles = [model.register_forward_pre_hook(batch_size, with_kwargs=True)]
    for key, path in (outputs or {}).items():
        handles.append(model.get_submodule(path).register_forward_hook(functools.partial(record, key=key)))
    for key, path in (inputs or {}).items():
        hook = lambda m, a, kw, key=key: seen.__setitem__(key, a[0] if a else kw["hidden_states"])  # noqa: E731
        handles.append(model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """``model(...)`` with left-padding-aware position ids."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                 **kwargs)


def softcap(logits: torch.Tensor, model) -> torch.Tensor:
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else cap * torch.tanh(logits / cap)


# ----------------------------------------------------------------------------- DLA


@dataclass(frozen=True)
class ReadOut:
    """What one forward pass leaves for DLA at the last position. Float64 copies."""

    writes: torch.Tensor  # [component, batch, d_model]: embeds, then attn and mlp of each layer
    resid: torch.Tensor  # [batch, d_model]: the final norm's input
    logits: torch.Tensor  # [batch, vocab]: lm_head's output (before any soft-cap)
    z: list[torch.Tensor]  # per layer [batch, head * d_head]: output projection's input
    rows: list[torch.Tensor]  # per layer [batch, head, key]: last query's attention
    values: list[torch.Tensor]  # per layer [batch, key, head, d_head]


def read_out(model, input_ids, attention_mask=None) -> ReadOut:
    nat, n = native(model), len(blocks(model))
    outputs = {f"e{i}": p for i, p in enumerate(nat.embeds)}
    for i in range(n):
        outputs |= {f"a{i}": f"{nat.blocks}.{i}.{nat.attn_write}", f"m{i}": f"{nat.blocks}.{i}.{nat.mlp_write}",
                    f"v{i}": f"{nat.blocks}.{i}.{nat.v_module}"}
    outputs["logits"] = nat.unembed
    inputs = {"resid": nat.final_norm} | {f"z{i}": f"{nat.blocks}.{i}.{nat.o_proj}" for i in range(n)}
    with torch.no_grad(), recording(model, outputs, inputs) as seen:
        out = forward(model, input_ids, attention_mask, output_attentions=True)
    last = lambda key: seen[key][:, -1].double()  # noqa: E731
    keys = [f"e{i}" for i in range(len(nat.embeds))] + [k for i in range(n) for k in (f"a{i}", f"m{i}")]
    return ReadOut(
        writes=torch.stack([last(k) for k in keys]),
        resid=last("resid"),
        logits=last("logits"),
        z=[last(f"z{i}") for i in range(n)],
        rows=[a[:, :, -1].double() for a in out.attentions],
        values=[nat.values(seen[f"v{i}"], model).double() for i in range(n)],
    )


def answers(model, logits: torch.Tensor, target, distractor):
    """Token ids ``[batch]``: the target (default: the top prediction) and the distractor or None."""
    as_ids = lambda t: None if t is None else torch.as_tensor(t).expand(logits.shape[0])  # noqa: E731
    return (logits.argmax(-1) if target is None else as_ids(target)), as_ids(distractor)


def frozen_norm_share(model, vectors: torch.Tensor, resid: torch.Tensor, t, t2) -> torch.Tensor:
    """Each vector's share of ``logit[t] - logit[t2]`` through the final norm at frozen scale.

    vectors: ``[..., batch, d_model]``; resid: ``[batch, d_model]``; t, t2: ``[batch]`` (t2 may be None).
    Returns ``[..., batch]``.
    """
    norm = model.get_submodule(native(model).final_norm)
    W_U = model.get_submodule(native(model).unembed).weight  # [vocab, d_model]
    d = W_U[t].double() - (0 if t2 is None else W_U[t2].double())  # [batch, d_model]
    weight = norm.weight.double() + native(model).weight_offset
    eps = norm.eps if hasattr(norm, "eps") else norm.variance_epsilon
    if isinstance(norm, nn.LayerNorm):
        s = (resid.var(-1, unbiased=False) + eps).sqrt()  # [batch]
        normed = (vectors - vectors.mean(-1, keepdim=True)) / s[:, None] * weight
    else:
        s = (resid.pow(2).mean(-1) + eps).sqrt()
        normed = vectors / s[:, None] * weight
    return (normed * d).sum(-1)


def bias_share(model, t, t2) -> torch.Tensor:
    """The constant term: final norm bias and unembedding bias, ``[batch]``."""
    norm = model.get_submodule(native(model).final_norm)
    unembed = model.get_submodule(native(model).unembed)
    d = unembed.weight[t].double() - (0 if t2 is None else unembed.weight[t2].double())  # [batch, d_model]
    out = torch.zeros(t.shape[0], dtype=torch.float64)
    if getattr(norm, "bias", None) is not None:
        out = out + d @ norm.bias.double()
    if getattr(unembed, "bias", None) is not None:
        b = unembed.bias.double()
        out = out + b[t] - (0 if t2 is None else b[t2])
    return out


def dla_components(model, input_ids, target=None, distractor=None, attention_mask=None):
    """``(shares [batch, component], logit [batch])``: components are the embedding write(s),
    each layer's attention and MLP writes, then the bias; ``logit`` is the lm_head logit
    (difference) they must sum to (pre-soft-cap)."""
    r = read_out(model, input_ids, attention_mask)
    t, t2 = answers(model, r.logits, target, distractor)
    shares = frozen_norm_share(model, r.writes, r.resid, t, t2)  # [component, batch]
    shares = torch.cat([shares, bias_share(model, t, t2)[None]]).T
    logit = r.logits.gather(-1, t[:, None])[:, 0] - (0 if t2 is None else r.logits.gather(-1, t2[:, None])[:, 0])
    return shares, logit


def _per_head_W_O(model, layer: int) -> list[torch.Tensor]:
    """Per head ``[d_head, d_model]`` slices of the output projection."""
    nat = native(model)
    W = blocks(model)[layer].get_submodule(nat.o_proj).weight.double()
    W = W if nat.conv1d else W.T  # [head * d_head, d_model]
    heads = model.config.num_attention_heads
    d_head = W.shape[0] // heads
    return [W[h * d_head : (h + 1) * d_head] for h in range(heads)]


def o_proj_bias_shares(model, input_ids, target=None, distractor=None, attention_mask=None) -> torch.Tensor:
    """Each layer's output-projection bias share: ``[batch, layer]`` (0 where there is no bias)."""
    r = read_out(model, input_ids, attention_mask)
    t, t2 = answers(model, r.logits, target, distractor)
    nat = native(model)
    out = []
    for block in blocks(model):
        bias = block.get_submodule(nat.o_proj).bias
        vec = torch.zeros_like(r.resid) if bias is None else bias.double().expand_as(r.resid)
        out.append(frozen_norm_share(model, vec, r.resid, t, t2))
    return torch.stack(out, dim=1)


def dla_heads(model, input_ids, target=None, distractor=None, attention_mask=None) -> torch.Tensor:
    """Each head's share ``z_h W_O^h`` through the frozen final norm: ``[batch, layer, head]``."""
    r = read_out(model, input_ids, attention_mask)
    t, t2 = answers(model, r.logits, target, distractor)
    heads = model.config.num_attention_heads
    out = torch.zeros(r.resid.shape[0], len(r.z), heads, dtype=torch.float64)
    for layer, z in enumerate(r.z):
        for h, W_h in enumerate(_per_head_W_O(model, layer)):
            d_head = W_h.shape[0]
            write = z[:, h * d_head : (h + 1) * d_head] @ W_h  # [batch, d_model]
            out[:, layer, h] = frozen_norm_share(model, write, r.resid, t, t2)
    return out


def dla_head_positions(model, input_ids, target=None, distractor=None, attention_mask=None) -> torch.Tensor:
    """Each head's share split by source position, ``A[h, -1, k] v_k W_O^h``: ``[batch, layer, head, key]``."""
    r = read_out(model, input_ids, attention_mask)
    t, t2 = answers(model, r.logits, target, distractor)
    batch, pos = input_ids.shape
    heads = model.config.num_attention_heads
    out = torch.zeros(batch, len(r.z), heads, pos, dtype=torch.float64)
    for layer in range(len(r.z)):
        for h, W_h in enumerate(_per_head_W_O(model, layer)):
            for k in range(pos):
                write = r.rows[layer][:, h, k, None] * r.values[layer][:, k, h] @ W_h  # [batch, d_model]
                out[:, layer, h, k] = frozen_norm_share(model, write, r.resid, t, t2)
    return out


# ----------------------------------------------------------------------------- logit lens


def logit_lens(model, input_ids, expected: torch.Tensor, attention_mask=None, *, k: int = 5):
    """Per layer (embedding first): the probability and rank of ``expected: [batch, pos']``, the
    tokens to score at the last ``pos'`` positions, and the top-k probabilities there. Returns
    ``(prob, rank, top_prob)`` shaped ``[layer + 1, batch, pos']`` and ``[layer + 1, batch, pos', k]``.
    One layer's logits are alive at a time."""
    nat, n = native(model), len(blocks(model))
    norm, unembed = model.get_submodule(nat.final_norm), model.get_submodule(nat.unembed)
    width = expected.shape[1]
    with torch.no_grad(), recording(model, {f"h{i}": f"{nat.blocks}.{i}" for i in range(n)},
                                    {"h_in": f"{nat.blocks}.0"}) as seen:
        forward(model, input_ids, attention_mask)
        probs, ranks, tops = [], [], []
        for key in ["h_in"] + [f"h{i}" for i in range(n)]:
            logits = softcap(unembed(norm(seen[key][:, -width:])), model).float()  # [batch, pos', vocab]
            p = logits.softmax(-1)
            probs.append(p.gather(-1, expected[..., None])[..., 0])
            ranks.append((logits > logits.gather(-1, expected[..., None])).sum(-1))
            tops.append(p.topk(k, dim=-1).values)
    return torch.stack(probs), torch.stack(ranks), torch.stack(tops)


# ----------------------------------------------------------------------------- head attribution


def head_attribution(model, input_ids, target=None, distractor=None, attention_mask=None) -> torch.Tensor:
    """``sum over positions of grad(metric) . z`` per head, ``z`` the output projection's input
    and the metric the last position's logit of ``target`` (minus ``distractor``'s), summed over
    the batch. Returns ``[batch, layer, head, pos]`` (sum over ``pos`` for the head score)."""
    nat, n = native(model), len(blocks(model))
    heads = model.config.num_attention_heads
    z_paths = {f"z{i}": f"{nat.blocks}.{i}.{nat.o_proj}" for i in range(n)}
    with torch.enable_grad(), recording(model, inputs=z_paths) as seen:
        logits = forward(model, input_ids, attention_mask).logits[:, -1].float()  # [batch, vocab]
        zs = [seen[f"z{i}"] for i in range(n)]
        if not all(z.requires_grad for z in zs):
            raise RuntimeError("the reference needs a model whose parameters require grad")
        t, t2 = answers(model, logits, target, distractor)
        metric = logits.gather(-1, t[:, None])[:, 0] - (0 if t2 is None else logits.gather(-1, t2[:, None])[:, 0])
        grads = torch.autograd.grad(metric.sum(), zs)
    out = []
    for z, g in zip(zs, grads):
        prod = (z * g).detach()  # [batch, pos, head * d_head]
        out.append(prod.reshape(*prod.shape[:2], heads, -1).sum(-1).transpose(1, 2))  # [batch, head, pos]
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------- attention rollout


def rollout(model, input_ids, attention_mask=None, *, residual: float = 0.5) -> torch.Tensor:
    """Abnar & Zuidema 2020 with mean head fusion, as a plain loop over prompts and layers.

    Each layer: ``A = mean_h(attn)`` over real tokens, ``(1 - r) A + r I``, rows renormalised;
    ``R = A_{L-1} ... A_0``. Returns ``[batch, pos, pos]``, NaN outside each prompt's real
    tokens (right-aligned)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        attentions = forward(model, input_ids, attention_mask, output_attentions=True).attentions
    batch, pos = input_ids.shape
    out = torch.full((batch, pos, pos), float("nan"), dtype=torch.float64)
    for b in range(batch):
        real = attention_mask[b].bool()
        m = int(real.sum())
        R = torch.eye(m, dtype=torch.float64)
        for A in attentions:  # [batch, head, query, key]
            a = A[b][:, real][:, :, real].double().mean(0)  # [m, m]
            a = (1 - residual) * a + residual * torch.eye(m, dtype=torch.float64)
            a = a / a.sum(-1, keepdim=True)
            R = a @ R
        out[b, pos - m :, pos - m :] = R
    return out


def flow(model, input_ids, *, residual: float = 0.0) -> torch.Tensor:
    """Per-head attention flow of one unpadded prompt: ``F_l = Â_l F_{l-1}`` with
    ``Â = (1 - r) A + r I`` row-normalised, per head, no fusion. Returns the last layer's
    ``[1, head, pos, pos]``."""
    with torch.no_grad():
        attentions = forward(model, input_ids, torch.ones_like(input_ids), output_attentions=True).attentions
    m = input_ids.shape[1]
    F = None
    for A in attentions:  # [1, head, query, key]
        a = (1 - residual) * A[0].double() + residual * torch.eye(m, dtype=torch.float64)
        a = a / a.sum(-1, keepdim=True)
        F = a if F is None else a @ F
    return F[None]


def attention_views(model, input_ids, view: str, *, norm: str = "l2") -> torch.Tensor:
    """Per-head attention maps of one unpadded prompt, by loops: ``[layer, head, query, key]``.

    ``patterns``: the probabilities; ``value_weighted``: ``A · ‖v_k‖_norm`` renormalised per row;
    ``norm_based``: ``A · ‖v_k W_O^h‖₂``, not renormalised."""
    nat = native(model)
    paths = {f"v{i}": f"{nat.blocks}.{i}.{nat.v_module}" for i in range(model.config.num_hidden_layers)}
    with torch.no_grad(), recording(model, outputs=paths) as seen:
        attentions = forward(model, input_ids, output_attentions=True).attentions
    order = {"l1": 1, "l2": 2, "linf": float("inf")}[norm]
    out = []
    for i, A in enumerate(attentions):  # [1, head, query, key]
        values = nat.values(seen[f"v{i}"], model)[0].double()  # [key, head, d_head]
        W_O = _per_head_W_O(model, i)
        layer = torch.zeros(A.shape[1:], dtype=torch.float64)
        for h in range(A.shape[1]):
            for q in range(A.shape[2]):
                for k in range(q + 1):
                    a = float(A[0, h, q, k])
                    if view == "patterns":
                        layer[h, q, k] = a
                    elif view == "value_weighted":
                        layer[h, q, k] = a * torch.linalg.vector_norm(values[k, h], ord=order)
                    else:
                        layer[h, q, k] = a * torch.linalg.vector_norm(values[k, h] @ W_O[h])
                if view == "value_weighted":
                    layer[h, q] /= layer[h, q].sum()
        out.append(layer)
    return torch.stack(out)
