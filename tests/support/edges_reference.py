"""A slow, plain-PyTorch reference for edge attribution patching, independent of nnattr.

Every reader gets its own perturbation ``eps_r`` (zero) of the residual stream it reads, added
the way the model itself would see it: a head's query (key, value) is recomputed from
``norm(x + eps_r)`` on that head's slice of the projection's output only, an MLP's input becomes
``norm(x + eps_r)``, the final norm's input ``x + eps_r``. One backward gives every reader's
gradient ``d m / d eps_r``. Writers' changes come from forward hooks on the clean and corrupted
runs (a head's change: its slice of the output projection's input times its slice of the
weight). ``score(w -> r) = sum over positions of delta_w . grad_r``. Module paths and the head
slices of each projection are written here from each family's Hugging Face source (``READ``),
not taken from nnattr.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tests.support import reference as ref


def _separate(kind, h, cfg, d):
    return {"q": "q", "k": "k", "v": "v"}[kind], torch.arange(h * d, (h + 1) * d)


def _gpt2(kind, h, cfg, d):
    return "qkv", "qkv".index(kind) * cfg.hidden_size + torch.arange(h * d, (h + 1) * d)


def _neox(kind, h, cfg, d):  # per head [q | k | v]
    return "qkv", h * 3 * d + "qkv".index(kind) * d + torch.arange(d)


def _phi3(kind, h, cfg, d):  # [q (heads) | k (kv heads) | v (kv heads)]
    start = {"q": 0, "k": cfg.num_attention_heads * d,
             "v": (cfg.num_attention_heads + cfg.num_key_value_heads) * d}[kind]
    return "qkv", start + torch.arange(h * d, (h + 1) * d)


def _falcon(kind, h, cfg, d):  # per kv group [its queries | k | v]; `h` is a query head for "q", a kv head otherwise
    kv = kv_heads(cfg)
    group = cfg.num_attention_heads // kv
    slot = {"q": (h // group, h % group), "k": (h, group), "v": (h, group + 1)}[kind]
    return "qkv", (slot[0] * (group + 2) + slot[1]) * d + torch.arange(d)


@dataclass(frozen=True)
class Read:
    """Where one family's readers read (paths relative to a block)."""

    proj: dict[str, str]  # "q", "k", "v" or "qkv" (fused) -> the projection module
    heads: Callable  # (kind, head, config, d_head) -> (proj key, output indices of that head)
    attn_norm: str | None  # None: no pre-norm (OLMo-2)
    mlp_norm: str | None
    mlp_in: str  # the module whose first input is what the MLP reads
    parallel: bool = False
    conv1d: bool = False
    post_attn: str | None = None  # a norm on attention's output before the residual stream (Gemma-2/3, OLMo-2/3)
    weight_offset: float = 0.0  # that norm multiplies by (offset + weight)


_LLAMA = Read({"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}, _separate,
              "input_layernorm", "post_attention_layernorm", "mlp")
READ = {
    "gpt2": Read({"qkv": "attn.c_attn"}, _gpt2, "ln_1", "ln_2", "mlp", conv1d=True),
    "gpt_neox": Read({"qkv": "attention.query_key_value"}, _neox, "input_layernorm", "post_attention_layernorm",
                     "mlp", parallel=True),
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "qwen3_moe": _LLAMA, "mixtral": _LLAMA,
    "gemma": _LLAMA, "gpt_oss": _LLAMA,
    "qwen2_moe": _LLAMA,
    "gemma2": Read(_LLAMA.proj, _separate, "input_layernorm", "pre_feedforward_layernorm", "mlp",
                   post_attn="post_attention_layernorm", weight_offset=1.0),
    "gemma3_text": Read(_LLAMA.proj, _separate, "input_layernorm", "pre_feedforward_layernorm", "mlp",
                        post_attn="post_attention_layernorm", weight_offset=1.0),
    "olmo2": Read(_LLAMA.proj, _separate, None, None, "mlp", post_attn="post_attention_layernorm"),
    "olmo3": Read(_LLAMA.proj, _separate, None, None, "mlp", post_attn="post_attention_layernorm"),
    "gptj": Read({"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj"}, _separate, "ln_1", "ln_1", "mlp",
                 parallel=True),
    "opt": Read({"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj"}, _separate,
                "self_attn_layer_norm", "final_layer_norm", "fc1"),
    "phi3": Read({"qkv": "self_attn.qkv_proj"}, _phi3, "input_layernorm", "post_attention_layernorm", "mlp"),
    "falcon": Read({"qkv": "self_attention.query_key_value"}, _falcon, "input_layernorm", "input_layernorm", "mlp",
                   parallel=True),
    "falcon_new": Read({"qkv": "self_attention.query_key_value"}, _falcon, "ln_attn", "ln_mlp", "mlp", parallel=True),
}


def kv_heads(cfg) -> int:
    if cfg.model_type == "falcon":
        return cfg.num_kv_heads if cfg.new_decoder_architecture else (1 if cfg.multi_query else cfg.num_attention_heads)
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _linear(module: nn.Module, x: torch.Tensor, conv1d: bool) -> torch.Tensor:
    return x @ module.weight + module.bias if conv1d else F.linear(x, module.weight, module.bias)


def reader_gradients(hf, key: str, input_ids, attention_mask, answer, distractor, *, embeds=None, shift=None,
                     hooks=None):
    """``{reader label: [batch, pos, d_model]}``: d m / d (the reader's copy of its input), m = the
    logit difference at the last position summed over the batch. ``embeds``: replace the token
    embedding's output (integrated gradients). ``shift(label)``: add this to each reader's copy instead, and
    return the metric ``[batch]`` (no gradients); ``hooks``: more hooks to hold during the forward."""
    read, cfg = READ[key], hf.config
    heads, kv = cfg.num_attention_heads, kv_heads(cfg)
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    batch, pos = input_ids.shape
    eps, hooks, seen = {}, list(hooks or []), {}

    def new(label):
        eps[label] = torch.zeros(batch, pos, cfg.hidden_size, dtype=torch.float32, requires_grad=shift is None)
        return eps[label] if shift is None else shift(label)

    def norm_of(block, name):
        return (lambda x: x) if name is None else block.get_submodule(name)

    for i, block in enumerate(ref.blocks(hf)):
        hooks.append(block.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.__setitem__(("x", i), a[0] if a else kw["hidden_states"]), with_kwargs=True))
        readers = [("q", h) for h in range(heads)] + [(s, g) for s in "kv" for g in range(kv)]
        for proj_key, path in read.proj.items():
            mine = [(s, h) for s, h in readers if read.heads(s, h, cfg, d_head)[0] == proj_key]
            mods = {(s, h): read.heads(s, h, cfg, d_head)[1] for s, h in mine}
            labels = {(s, h): f"L{i}{'H' if s == 'q' or kv == heads else 'KV'}{h} {s}" for s, h in mine}

            def project(module, args, out, i=i, block=block, mods=mods, labels=labels):
                x, norm = seen[("x", i)], norm_of(block, read.attn_norm)
                plain = _linear(module, norm(x), read.conv1d)
                extra = torch.zeros_like(out)
                for reader, index in mods.items():
                    moved = _linear(module, norm(x + new(labels[reader])), read.conv1d) - plain
                    extra = extra.index_add(-1, index, moved[..., index])
                return out + extra

            hooks.append(block.get_submodule(path).register_forward_hook(project))

        def mlp_pre(module, args, kwargs, i=i, block=block):
            u = args[0] if args else kwargs["hidden_states"]
            x = u if not read.mlp_norm else seen[("x", i)] if read.parallel else seen[("mid", i)]
            x = x.unflatten(0, (batch, -1)) if x.ndim == 2 else x  # OPT: the MLP runs on the flattened stream
            norm = norm_of(block, read.mlp_norm)
            moved = norm(x + new(f"L{i} MLP")) - norm(x)
            u = u + (moved.flatten(0, 1) if u.ndim == 2 else moved)  # OPT's fc1 reads the flattened stream
            return ((u, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": u})

        if read.mlp_norm and not read.parallel:  # the stream after attention, as the MLP's norm reads it
            hooks.append(block.get_submodule(read.mlp_norm).register_forward_pre_hook(
                lambda m, a, i=i: seen.__setitem__(("mid", i), a[0])))
        hooks.append(block.get_submodule(read.mlp_in).register_forward_pre_hook(mlp_pre, with_kwargs=True))
    final = hf.get_submodule(ref.native(hf).final_norm)
    hooks.append(final.register_forward_pre_hook(lambda m, a: (a[0] + new("logits"),)))
    if embeds is not None:
        hooks.append(hf.get_submodule(ref.native(hf).embeds[0]).register_forward_hook(lambda m, a, out: embeds))
    try:
        logits = ref.forward(hf, input_ids, attention_mask).logits[:, -1].float()
        rows = torch.arange(batch)
        metric = logits[rows, answer] - logits[rows, distractor]
        if shift is not None:
            return metric.detach()
        labels = list(eps)
        grads = torch.autograd.grad(metric.sum(), [eps[k] for k in labels])
    finally:
        for h in hooks:
            h.remove()
    return dict(zip(labels, grads))


def writer_outputs(hf, key: str, input_ids, attention_mask, post_scale=None) -> dict[str, torch.Tensor]:
    """``{writer label: [batch, pos, d_model]}`` on one run: the embeddings, each head's output, each MLP's write.
    With ``post_scale`` (per layer ``[batch, pos, d_model]``), each head's output times that scale (a norm after
    attention, frozen). ``"post{i}"``: the input of that norm (the attention output), where there is one."""
    nat, read = ref.native(hf), READ[key]
    outputs = {f"embed{j}": path for j, path in enumerate(nat.embeds)}
    inputs = {}
    for i, _ in enumerate(ref.blocks(hf)):
        outputs[f"L{i} MLP"] = f"{nat.blocks}.{i}.{nat.mlp_write}"
        inputs[f"z{i}"] = f"{nat.blocks}.{i}.{nat.o_proj}"
        if read.post_attn:
            inputs[f"post{i}"] = f"{nat.blocks}.{i}.{read.post_attn}"
    with torch.no_grad(), ref.recording(hf, outputs, inputs) as seen:
        ref.forward(hf, input_ids, attention_mask)
    out = {}
    for j, _ in enumerate(nat.embeds):
        out[f"embed{j}"] = seen[f"embed{j}"].expand(input_ids.shape[0], -1, -1).float()
    for i, _ in enumerate(ref.blocks(hf)):
        for h, W_h in enumerate(ref._per_head_W_O(hf, i)):
            d = W_h.shape[0]
            head = (seen[f"z{i}"][..., h * d : (h + 1) * d].double() @ W_h).float()
            out[f"L{i}H{h}"] = head if post_scale is None else head * post_scale[i]
        out[f"L{i} MLP"] = seen[f"L{i} MLP"].float()
        if read.post_attn:
            out[f"post{i}"] = seen[f"post{i}"].float()
    return out


def post_scales(hf, key: str, post_inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the frozen scale of the norm after attention at these inputs: ``(offset + w) / rms(x)``."""
    read = READ[key]
    out = []
    for i, block in enumerate(ref.blocks(hf)):
        norm = block.get_submodule(read.post_attn)
        eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")
        rms = torch.sqrt(post_inputs[i].double().pow(2).mean(-1, keepdim=True) + eps)
        out.append(((read.weight_offset + norm.weight.double()) / rms).float())
    return out


def edge_scores(hf, key: str, clean: torch.Tensor, corrupted: torch.Tensor, answer, distractor, *, steps: int = 0):
    """``{(writer, reader): [pair]}`` for every edge, on pairs of equal length (no padding):
    AtP (``steps=0``) or EAP-IG with ``steps`` midpoints between the corrupted and clean token embeddings."""
    was, now = writer_outputs(hf, key, clean, None), writer_outputs(hf, key, corrupted, None)
    if READ[key].post_attn:  # heads through the norm after attention, at its scale on the corrupted run, frozen
        layers = range(len(ref.blocks(hf)))
        if steps:  # measured on the path's rows (their mean), as the gradient is
            raise NotImplementedError("the reference's post-norm scale along an IG path")
        scale = post_scales(hf, key, [now[f"post{i}"] for i in layers])
        was = {**was, **writer_outputs(hf, key, clean, None, post_scale=scale)}
        now = {**now, **writer_outputs(hf, key, corrupted, None, post_scale=scale)}
        was, now = ({k: v for k, v in d.items() if not k.startswith("post")} for d in (was, now))
    if steps:
        grads = {}
        for s in range(steps):
            alpha = (s + 0.5) / steps
            g = reader_gradients(hf, key, corrupted, None, answer, distractor,
                                 embeds=now["embed0"] + alpha * (was["embed0"] - now["embed0"]))
            grads = {k: grads.get(k, 0) + v / steps for k, v in g.items()}
    else:
        grads = reader_gradients(hf, key, corrupted, None, answer, distractor)
    def layer(label: str) -> int:  # "L3H1", "L3 MLP", "L3KV0 k"; the logits after the last layer
        return len(ref.blocks(hf)) if label == "logits" else int(label[1:].split("H")[0].split("K")[0].split(" ")[0])

    out = {}
    for w, d in ((w, was[w] - now[w]) for w in was):
        for r, g in grads.items():
            lw, lr = (-1 if w.startswith("embed") else layer(w)), layer(r)
            mlp_reads_heads = lw == lr and r.endswith("MLP") and not w.endswith("MLP") and not READ[key].parallel
            if lw < lr or mlp_reads_heads:
                out[w, r] = (d.double() * g.double()).sum((1, 2))
    return out


def _layer(label: str, last: int) -> int:
    """A writer's or reader's layer: embeddings -1, the logits after the last layer."""
    if label == "logits":
        return last
    return -1 if label.startswith("embed") else int(label[1:].split("H")[0].split("K")[0].split(" ")[0])


def edge_ablated_metric(hf, key: str, clean, corrupted, answer, distractor, keep: set, *, zero: bool = False):
    """The metric ``[pair]`` of the clean prompts with every edge (writer, reader) not in ``keep`` ablated: the
    reader reads that writer's corrupted value (or nothing, ``zero``) in place of its value in this run. Writers
    are recorded by hooks as this forward computes them; each reader adds ``-sum (now - ablated)`` over its
    ablated edges to its own copy of its input (`reader_gradients`'s hooks). Equal-length pairs, no padding."""
    nat, read, n_layers = ref.native(hf), READ[key], len(ref.blocks(hf))
    then = writer_outputs(hf, key, corrupted, None)  # writers: "embed0", "embed1", "L0H0", ..., "L0 MLP", ...
    now, hooks = {}, []
    for j, path in enumerate(nat.embeds):
        hooks.append(hf.get_submodule(path).register_forward_hook(
            lambda m, a, out, j=j: now.__setitem__(f"embed{j}", out.expand(clean.shape[0], -1, -1).float())))
    for i, block in enumerate(ref.blocks(hf)):
        W = ref._per_head_W_O(hf, i)

        def heads(m, a, i=i, W=W):
            for h, W_h in enumerate(W):
                d = W_h.shape[0]
                now[f"L{i}H{h}"] = (a[0][..., h * d : (h + 1) * d].double() @ W_h).float()

        def mlp(m, a, out, i=i):
            x = out[0] if isinstance(out, tuple) else out
            now[f"L{i} MLP"] = (x.unflatten(0, (clean.shape[0], -1)) if x.ndim == 2 else x).float().clone()

        hooks.append(block.get_submodule(nat.o_proj).register_forward_pre_hook(heads))
        hooks.append(block.get_submodule(nat.mlp_write).register_forward_hook(mlp))

    def shift(reader):
        lr, out = _layer(reader, n_layers), 0
        for w in now:
            lw = _layer(w, n_layers)
            runs = lw < lr or (lw == lr and reader.endswith("MLP") and "H" in w and not read.parallel)
            if runs and (w, reader) not in keep:
                out = out - (now[w] - (0 if zero else then[w]))
        return torch.zeros(clean.shape[0], clean.shape[1], hf.config.hidden_size) + out

    return reader_gradients(hf, key, clean, None, answer, distractor, shift=shift, hooks=hooks)
