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

import importlib
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
        grads = torch.autograd.grad(metric.sum(), [eps[k] for k in labels], allow_unused=True)  # GradDrop: unused
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.zeros_like(eps[k]) if g is None else g for k, g in zip(labels, grads)}


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


def deltas(hf, key: str, clean: torch.Tensor, corrupted: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{writer: [pair, pos, d_model]}``: each writer's clean - corrupted output (heads through a norm after
    attention at its scale on the corrupted run, frozen)."""
    was, now = writer_outputs(hf, key, clean, None), writer_outputs(hf, key, corrupted, None)
    if READ[key].post_attn:  # heads through the norm after attention, at its scale on the corrupted run, frozen
        scale = post_scales(hf, key, [now[f"post{i}"] for i in range(len(ref.blocks(hf)))])
        was = {**was, **writer_outputs(hf, key, clean, None, post_scale=scale)}
        now = {**now, **writer_outputs(hf, key, corrupted, None, post_scale=scale)}
    return {w: was[w] - now[w] for w in was if not w.startswith("post")}


def edge_scores(hf, key: str, clean: torch.Tensor, corrupted: torch.Tensor, answer, distractor, *, steps: int = 0,
                hooks=None):
    """``{(writer, reader): [pair]}`` for every edge, on pairs of equal length (no padding):
    AtP (``steps=0``) or EAP-IG with ``steps`` midpoints between the corrupted and clean token embeddings.
    ``hooks``: a function returning hooks to hold during the backward's forward (GradDrop's detached block)."""
    if READ[key].post_attn and steps:  # measured on the path's rows (their mean), as the gradient is
        raise NotImplementedError("the reference's post-norm scale along an IG path")
    change = deltas(hf, key, clean, corrupted)
    was, now = writer_outputs(hf, key, clean, None), writer_outputs(hf, key, corrupted, None)
    if steps:
        grads = {}
        for s in range(steps):
            alpha = (s + 0.5) / steps
            g = reader_gradients(hf, key, corrupted, None, answer, distractor,
                                 embeds=now["embed0"] + alpha * (was["embed0"] - now["embed0"]))
            grads = {k: grads.get(k, 0) + v / steps for k, v in g.items()}
    else:
        grads = reader_gradients(hf, key, corrupted, None, answer, distractor, hooks=hooks() if hooks else None)

    def layer(label: str) -> int:  # "L3H1", "L3 MLP", "L3KV0 k"; the logits after the last layer
        return len(ref.blocks(hf)) if label == "logits" else int(label[1:].split("H")[0].split("K")[0].split(" ")[0])

    out = {}
    for w, d in change.items():
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


def edge_ablated_metric(hf, key: str, clean, corrupted, answer, distractor, keep: set, *, zero: bool = False,
                        source=None):
    """The metric ``[pair]`` of the clean prompts with every edge (writer, reader) not in ``keep`` ablated: the
    reader reads that writer's corrupted value (or nothing, ``zero``; ``source``: the mean over the corrupted
    prompts, ``"mean"``, or row ``i`` prompt ``source[i]``'s) in place of its value in this run. Writers
    are recorded by hooks as this forward computes them; each reader adds ``-sum (now - ablated)`` over its
    ablated edges to its own copy of its input (`reader_gradients`'s hooks); heads behind a norm after attention
    (``post_attn``) are summed before it: ``-(norm(a) - norm(a - sum of ablated heads' changes))``, with the
    norm module itself. Equal-length pairs, no padding."""
    nat, read, n_layers = ref.native(hf), READ[key], len(ref.blocks(hf))
    then = writer_outputs(hf, key, corrupted, None)  # writers: "embed0", "embed1", "L0H0", ..., "L0 MLP", ...
    if source is not None:  # "mean": the mean over the corrupted prompts; else row i reads corrupted prompt source[i]
        then = {w: v.mean(0, keepdim=True).expand_as(v) if isinstance(source, str) else v[source]
                for w, v in then.items()}
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
        if read.post_attn:  # the attention output the norm after attention reads, in this run
            hooks.append(block.get_submodule(read.post_attn).register_forward_pre_hook(
                lambda m, a, i=i: now.__setitem__(f"post{i}", a[0].float())))

    def shift(reader):
        lr, out, behind = _layer(reader, n_layers), 0, {}
        for w in (w for w in now if not w.startswith("post")):
            lw = _layer(w, n_layers)
            runs = lw < lr or (lw == lr and reader.endswith("MLP") and "H" in w and not read.parallel)
            if runs and read.post_attn and "H" in w:  # a head behind the norm: its layer's output summed per reader
                ablated = (w, reader) not in keep
                value = (torch.zeros_like(now[w]) if zero else then[w]) if ablated else now[w]
                behind[lw] = behind.get(lw, 0) + value
                behind.setdefault(("any", lw), False)
                behind[("any", lw)] |= ablated
            elif runs and (w, reader) not in keep:
                out = out - (now[w] - (0 if zero else then[w]))
        for layer in [k for k in behind if not isinstance(k, tuple) and behind[("any", k)]]:
            block = ref.blocks(hf)[layer]  # the reader's own attention output (kept heads now, the rest ablated)
            bias = block.get_submodule(ref.native(hf).o_proj).bias
            own = behind[layer] + (0 if bias is None else bias.float())
            norm, a = block.get_submodule(read.post_attn), now[f"post{layer}"]
            out = out - (norm.forward(a) - norm.forward(own)).float()
        return torch.zeros(clean.shape[0], clean.shape[1], hf.config.hidden_size) + out

    return reader_gradients(hf, key, clean, None, answer, distractor, shift=shift, hooks=hooks)


class _Stop(Exception):
    """Raised to end a forward once the layer of interest has computed its queries and keys."""


def _attention_calls(hf, on_call):
    """Wrap the family's eager attention function; ``on_call(i, q, k, v, mask, scaling, weights)`` per call."""
    mod = importlib.import_module(type(hf).__module__)
    original, count = mod.eager_attention_forward, [0]

    def wrapped(module, q, k, v, m, scaling=None, dropout=0.0, **kw):
        out, w = original(module, q, k, v, m, scaling=scaling, dropout=dropout, **kw)
        on_call(count[0], q, k, v, m, scaling, w)
        count[0] += 1
        return out, w

    mod.eager_attention_forward = wrapped
    return lambda: setattr(mod, "eager_attention_forward", original)


def qk_edge_scores(hf, key: str, clean, corrupted, answer, distractor, *, drop: int | None = None,
                   step: float | None = None) -> dict:
    """``{(writer, reader): [pair]}`` for the edges into queries and keys, through the exact softmax (AtP*'s QK
    fix): the corrupted run is rerun with writer ``w``'s change added to the input of layer ``l``'s attention
    pre-norm (the model computes the moved queries and keys itself, rotary embeddings included), and
    ``sum g . (softmax(moved scores) - A)``, ``g = d m / d A`` by autograd, once with the moved queries and the
    run's keys, once the other way round. Exact where queries and keys are affine in the norm's output (no
    QK-norm). ``drop``: the gradient taken with that block's contribution detached (GradDrop). ``step``: queries
    and keys to first order after the pre-norm, by a finite difference of that size on the norm's output (QK-norm
    families; run a float64 model)."""
    read, n_layers = READ[key], len(ref.blocks(hf))
    kv = kv_heads(hf.config)
    seen = {}
    keep = lambda i, q, k, v, m, sc, w: (w.retain_grad() if w.requires_grad else None,  # noqa: E731
                                         seen.__setitem__(i, (q.detach(), k.detach(), m, sc, w)))
    restore = _attention_calls(hf, keep)
    hooks = [] if drop is None else [ref.blocks(hf)[drop].register_forward_hook(
        lambda _, args, out: args[0] + (out - args[0]).detach())]
    try:
        logits = ref.forward(hf, corrupted).logits[:, -1].float()
        rows = torch.arange(corrupted.shape[0])
        (logits[rows, answer] - logits[rows, distractor]).sum().backward()
    finally:
        restore()
        for h in hooks:
            h.remove()

    def moved(layer, add):
        """Layer ``layer``'s queries and keys with ``add(x)`` added to its attention's input stream (before the
        pre-norm), or with ``add`` hooked on the norm's output (``step``)."""
        block, got = ref.blocks(hf)[layer], {}

        def capture(i, q, k, v, m, sc, w):
            if i == layer:
                got["qk"] = q.detach(), k.detach()
                raise _Stop

        attention = block.get_submodule(read.proj.get("q", read.proj.get("qkv")).rsplit(".", 1)[0])
        if step and read.attn_norm:
            hook = block.get_submodule(read.attn_norm).register_forward_hook(lambda m, a, o: o + add(m, a[0], o))
        else:
            target = block.get_submodule(read.attn_norm) if read.attn_norm else attention
            hook = target.register_forward_pre_hook(
                lambda m, a, kw: ((a[0] + add(None, a[0], a[0]), *a[1:]), kw) if a else (a, {
                    **kw, "hidden_states": kw["hidden_states"] + add(None, kw["hidden_states"], None)}),
                with_kwargs=True)
        restore = _attention_calls(hf, capture)
        try:
            with torch.no_grad():
                ref.forward(hf, corrupted)
        except _Stop:
            pass
        finally:
            restore()
            hook.remove()
        return got["qk"]

    out = {}
    for w, d in deltas(hf, key, clean, corrupted).items():
        first = 0 if w.startswith("embed") else int(w[1:].split("H")[0].split(" ")[0]) + 1
        for layer in range(first, n_layers):
            if not step:
                q2, k2 = moved(layer, lambda m, x, o, d=d: d)
            else:  # a central difference of the norm's output along norm(x + d) - norm(x)
                along = lambda m, x, o, d=d, sign=1: sign * step * (d if m is None else m.forward(x + d) - o)  # noqa
                (qa, ka), (qb, kb) = (moved(layer, lambda m, x, o, sign=sign: along(m, x, o, sign=sign))
                                      for sign in (1, -1))
                q, k = seen[layer][:2]
                q2, k2 = q + (qa - qb) / (2 * step), k + (ka - kb) / (2 * step)
            q, k, m, sc, a = seen[layer]
            g = torch.zeros_like(a) if a.grad is None else a.grad
            rep = q.shape[1] // k.shape[1]
            soft = lambda qq, kk: (qq.double() @ kk.double().repeat_interleave(rep, 1).transpose(-1, -2) * sc  # noqa
                                   + (0 if m is None else m.double())).softmax(-1)
            base = soft(q, k)
            for name, qq, kk in (("q", q2, k), ("k", q, k2)):
                per_head = (g.double() * (soft(qq, kk) - base)).sum((-1, -2))  # [pair, head]
                if name == "k":
                    per_head = per_head.unflatten(1, (kv, rep)).sum(-1)
                for h in range(per_head.shape[1]):
                    label = f"L{layer}{'H' if name == 'q' or kv == q.shape[1] else 'KV'}{h} {name}"
                    out[w, label] = per_head[:, h]
    return out


def atp_star_edges(hf, key: str, clean, corrupted, answer, distractor, *, drop: int | None = None,
                   step: float | None = None) -> dict:
    """Every edge's AtP* score: `qk_edge_scores` into queries and keys, `edge_scores` (plain EAP) elsewhere."""
    hooks = None if drop is None else (lambda: [ref.blocks(hf)[drop].register_forward_hook(
        lambda _, args, out: args[0] + (out - args[0]).detach())])
    plain = edge_scores(hf, key, clean, corrupted, answer, distractor, hooks=hooks)
    return {**plain, **qk_edge_scores(hf, key, clean, corrupted, answer, distractor, drop=drop, step=step)}
