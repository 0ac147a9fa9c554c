"""Check an `ArchSpec` against the model it describes, before any recipe trusts it.

`nnattr.load` runs `check` on a spec it did not ship (``nnattr.load(model, spec=...)`` or one
added with `nnattr.register`):

1. **Paths.** Every native path of the spec resolves in the model's module tree (in every
   decoder block), the final norm's epsilon is in the config, and there is an ``lm_head``.
2. **The residual stream is the sum of the named writes** (one prompt, one forward): the
   embedding output(s) plus each block's ``attn_out`` and ``mlp_out`` outputs equal the block's
   output, block by block, and the final norm's input.
3. **The final norm is what the spec says**: ``norm`` (LayerNorm or RMSNorm), the epsilon from
   ``eps_key`` and ``norm_weight_offset`` recompute ``ln_f``'s output from its input.
4. **The DLA identity**: direct logit attribution's components sum to the model's logit.

A failure is a `SpecError` that names the alias (``attn_out``, ``ln_f`` ...), the spec field and
what to change. Steps 2-4 need real weights: a model whose parameters are still on the meta device
(a Hub model loaded lazily for NDIF) gets step 1 only.

>>> import nnattr
>>> model = nnattr.load(hf_model, tokenizer, spec=nnattr.ArchSpec(...))   # doctest: +SKIP
"""

from __future__ import annotations

import difflib

import torch

from .arch import ArchSpec

#: Largest relative error of the checks (error / max |value|) by the model's dtype: float32
#: arithmetic rounds at ~1e-7 per operation; bf16/fp16 round the residual at every addition.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class SpecError(ValueError):
    """An `ArchSpec` that does not describe its model. ``alias`` names the failing alias."""

    def __init__(self, message: str, *, alias: str) -> None:
        super().__init__(message)
        self.alias = alias


def check(model, spec: ArchSpec, *, tolerance: float | None = None) -> None:
    """Check ``spec`` on ``model`` (an nnsight model built with ``rename=spec.rename()``);
    raise `SpecError` naming the failing alias. See the module doc for the four checks."""
    hf = model._module
    check_paths(hf, spec)
    parameter = next(hf.parameters(), None)
    if parameter is None or parameter.is_meta:
        return  # no weights here (yet): the forward checks cannot run
    tol = tolerance if tolerance is not None else TOLERANCE.get(parameter.dtype, 1e-2)
    _check_forward(model, spec, tol)
    _check_heads(model, spec, tol)


def check_paths(hf, spec: ArchSpec) -> None:
    """Every native path of ``spec`` resolves in ``hf`` (a Hugging Face model), in every block."""
    where = f"ArchSpec(family={spec.family!r})"
    for field, alias in (("embed", "embed"), ("pos_embed", "pos_embed"), ("layers", "layers"), ("ln_f", "ln_f")):
        if getattr(spec, field) is not None:
            _resolve(hf, getattr(spec, field), field, alias, where, "the model")
    _resolve(hf, "lm_head", "lm_head", "lm_head", where, "the model")
    blocks = _resolve(hf, spec.layers, "layers", "layers", where, "the model")
    if not isinstance(blocks, torch.nn.ModuleList):
        raise SpecError(f"{where}: layers={spec.layers!r} (alias 'layers') is a {type(blocks).__name__}, not the "
                        f"list of decoder blocks (a ModuleList)", alias="layers")
    for i, block in enumerate(blocks):
        here = f"layers[{i}] ({spec.layers}.{i})"
        attn = _resolve(block, spec.attn, "attn", "attn", where, here)
        mlp = _resolve(block, spec.mlp, "mlp", "mlp", where, here)
        for field in ("experts", "shared_expert", "shared_expert_gate"):  # mixture-of-experts parts, in the MLP
            if getattr(spec, field) is not None:
                _resolve(mlp, getattr(spec, field), field, f"mlp.{field}", where, f"{here}.{spec.mlp}")
        for field, alias in (("attn_out", "attn_out"), ("mlp_out", "mlp_out")):
            if getattr(spec, field) is not None:
                _resolve(block, getattr(spec, field), field, alias, where, here)
        for field, alias in (("o_proj", "attn.o_proj"), ("v_proj", "attn.v_proj")):
            _resolve(attn, getattr(spec, field), field, alias, where, f"{here}.{spec.attn}")
    if spec.n_experts_key and not isinstance(getattr(hf.config, spec.n_experts_key, None), int):
        raise SpecError(f"{where}: n_experts_key={spec.n_experts_key!r} (the number of alias 'mlp.experts') is not an "
                        f"int key of the {type(hf.config).__name__}", alias="mlp.experts")
    if spec.eps is None and getattr(hf.config, spec.eps_key, None) is None:
        keys = sorted(k for k in hf.config.to_dict() if "eps" in k)
        raise SpecError(f"{where}: eps_key={spec.eps_key!r} (the epsilon of alias 'ln_f') is not in the "
                        f"{type(hf.config).__name__}; its epsilon keys: {keys}", alias="ln_f")


def _resolve(root, path: str, field: str, alias: str, where: str, what: str):
    module = root
    for depth, part in enumerate(path.split(".")):
        children = dict(module.named_children())
        if part not in children:
            close = difflib.get_close_matches(part, children, n=1)
            done = ".".join(path.split(".")[:depth])
            raise SpecError(
                f"{where}: {field}={path!r} (alias {alias!r}) does not resolve: {what}"
                f"{'.' + done if done else ''} has no submodule {part!r}"
                f"{f'; did you mean {close[0]!r}?' if close else ''} (it has: {', '.join(children) or 'none'})",
                alias=alias)
        module = children[part]
    return module


def _check_forward(model, spec: ArchSpec, tol: float) -> None:
    import nnsight

    from .arch import dims
    from .kernels import first

    config, d = model._module.config, dims(model)
    ids = (torch.arange(8) * 7 + 3) % d.d_vocab  # one prompt of 8 tokens
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    with torch.no_grad(), model.trace(inputs):
        embeds = [first(getattr(model, name).output) for name in spec.embeddings]
        start = model.layers[0].input  # the residual the first block reads
        writes, blocks = [], []
        for layer in model.layers:
            writes.append((first(layer.attn_out.output).clone(), first(layer.mlp_out.output).clone()))  # Falcon adds
            # attention into its MLP's output in place: keep the values as written
            blocks.append(first(layer.output))
            tuples = isinstance(layer.output, (tuple, list))  # what a skipped block must return
        seen = nnsight.save({"embeds": embeds, "start": start, "writes": writes, "blocks": blocks, "tuple": tuples,
                             "norm_in": model.ln_f.input, "norm_out": first(model.ln_f.output)})
    where = f"ArchSpec(family={spec.family!r})"
    if seen["tuple"] != spec.block_tuple:
        raise SpecError(f"{where}: its decoder blocks return {'a tuple' if seen['tuple'] else 'a tensor'}, so set "
                        f"block_tuple={seen['tuple']} (activation patching skips blocks with what they return)",
                        alias="block_tuple")
    resid = sum(e.double() for e in seen["embeds"])
    error = _relative(resid, seen["start"])
    if error > tol:
        raise SpecError(f"{where}: the embedding output(s) {' + '.join(spec.embeddings)} (embed={spec.embed!r}, "
                        f"pos_embed={spec.pos_embed!r}) miss the residual stream layers[0] reads by {error:.2g} "
                        f"(relative): name the token embedding, and a learned position embedding as pos_embed",
                        alias="pos_embed" if spec.pos_embed else "embed")
    for i, ((attn, mlp), block) in enumerate(zip(seen["writes"], seen["blocks"])):
        resid = resid + attn.double() + mlp.double()
        error = _relative(resid, block)
        if error > tol:
            raise SpecError(
                f"{where}: the residual stream is not the sum of the writes the spec names: the embeddings plus the "
                f"attn_out and mlp_out outputs of layers 0..{i} miss layers[{i}]'s output by {error:.2g} (relative). "
                f"Name in attn_out / mlp_out the modules whose outputs are added to the residual (now "
                f"{spec.attn_out or spec.attn!r} / {spec.mlp_out or spec.mlp!r}); a write the spec cannot name needs "
                f"a new spec field.", alias=f"layers[{i}].attn_out / mlp_out")
    if _relative(resid, seen["norm_in"]) > tol:
        raise SpecError(f"{where}: ln_f={spec.ln_f!r} (alias 'ln_f') does not read the residual stream after the "
                        f"last block (relative error {_relative(resid, seen['norm_in']):.2g}): name the final norm",
                        alias="ln_f")
    eps = float(spec.eps if spec.eps is not None else getattr(config, spec.eps_key))
    norm = model._module.get_submodule(spec.ln_f)
    error = _relative(_norm(seen["norm_in"], norm, spec.norm, eps, spec.norm_weight_offset), seen["norm_out"])
    if error > tol:
        other = "rmsnorm" if spec.norm == "layernorm" else "layernorm"
        fits = [f"norm={k!r}, norm_weight_offset={o:g}" for k in (spec.norm, other) for o in (0.0, 1.0)
                if _relative(_norm(seen["norm_in"], norm, k, eps, o), seen["norm_out"]) <= tol]
        raise SpecError(
            f"{where}: ln_f={spec.ln_f!r} (alias 'ln_f') is not norm={spec.norm!r} with eps={eps:g} (from "
            f"eps_key={spec.eps_key!r}) and norm_weight_offset={spec.norm_weight_offset:g}: recomputed from its input, "
            f"its output misses by {error:.2g} (relative), so DLA's components would not sum to the logit. "
            + (f"It matches {fits[0]}." if fits else "Check norm, eps_key and norm_weight_offset."), alias="ln_f")
    import warnings

    from nnattr.recipes import direct_logit_attribution

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the error is measured below, and named
        result = direct_logit_attribution.run(model, ids)
    logit = result.per_prompt["logit"][0]
    error = result.meta["sum_error"] / max(1.0, abs(logit))
    if error > tol:
        raise SpecError(f"{where}: DLA's components miss the model's logit {logit:+.5g} by {error:.2g} (relative) "
                        f"although the residual and the final norm check out: the unembedding (alias 'lm_head') "
                        f"or a logit soft-cap does something the spec does not describe", alias="lm_head")


def _check_heads(model, spec: ArchSpec, tol: float) -> None:
    """The fields a component-level check cannot see, on the same prompt: the heads' writes sum to the
    attention write (``head_exact``, ``o_proj_conv1d``); each head's output is its attention row times the
    values ``value_layout`` finds (and the kv heads); rows sum to 1 unless ``attention_sinks``; no write changes
    after its module returns unless ``writes_in_place``; a mixture of experts leaves no rest (``shared_expert``)."""
    import nnsight

    from .arch import arch_of
    from .kernels import expand_kv, first, o_proj_per_head, split_heads, split_values

    a, where = arch_of(model), f"ArchSpec(family={spec.family!r})"
    layout = dict(layout=a.value_layout, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, d_head=a.d_head)
    ids = (torch.arange(8) * 7 + 3) % a.d_vocab
    with torch.no_grad(), model.trace({"input_ids": ids[None], "attention_mask": torch.ones(1, 8, dtype=torch.long)}):
        seen = []
        for layer in model.layers:
            values, z = layer.attn.v_proj.output, layer.attn.o_proj.input
            pattern = layer.attn.output[1] if a.attention == "eager" else None
            attn = first(layer.attn_out.output, 1)
            kept = attn.clone()
            mlp = first(layer.mlp_out.output, 1)
            seen.append(dict(values=values, z=z, pattern=pattern, attn=attn, attn_kept=kept, mlp=mlp,
                             mlp_kept=mlp.clone(), W=layer.attn.o_proj.weight, b=layer.attn.o_proj.bias))
        seen = nnsight.save(seen)
    changed = any(_relative(s["attn"], s["attn_kept"]) > tol or _relative(s["mlp"], s["mlp_kept"]) > tol for s in seen)
    if changed and not spec.writes_in_place:
        raise SpecError(f"{where}: a block adds into a write's tensor after its module returns it (the value read "
                        f"then is not the value kept): set writes_in_place=True, so the recipes keep copies",
                        alias="writes_in_place")
    for i, s in enumerate(seen):
        W = o_proj_per_head(s["W"].detach(), n_heads=a.n_heads, conv1d=spec.o_proj_conv1d)  # [head, d_head, d_model]
        heads = torch.einsum("...he,hed->...d", split_heads(s["z"].double(), n_heads=a.n_heads), W.double())
        heads = heads + (0 if s["b"] is None else s["b"].double())
        if spec.head_exact and _relative(heads, s["attn_kept"]) > tol:
            raise SpecError(f"{where}: layers[{i}]'s heads (the output projection's input times its weight, "
                            f"o_proj_conv1d={spec.o_proj_conv1d}) do not add up to its attention write (relative "
                            f"error {_relative(heads, s['attn_kept']):.2g}): check o_proj_conv1d (GPT-2's Conv1D "
                            f"stores [in, out]), and set head_exact=False if a norm follows attention",
                            alias="head_exact / o_proj_conv1d")
        if s["pattern"] is None:
            continue  # no probabilities (sdpa): the layout and the sinks cannot be checked here
        v = expand_kv(split_values(s["values"].double(), **layout), n_heads=a.n_heads)  # [1, key, head, d_head]
        mixed = torch.einsum("bhqk,bkhd->bqhd", s["pattern"].double(), v)
        if _relative(mixed, split_heads(s["z"].double(), n_heads=a.n_heads)) > tol:
            raise SpecError(f"{where}: layers[{i}]'s head outputs are not their attention rows times the values "
                            f"value_layout={spec.value_layout!r} reads from v_proj={spec.v_proj!r} "
                            f"({a.n_kv_heads} kv heads): pick the layout the module's forward uses",
                            alias="value_layout")
        short = float((1 - s["pattern"].double().sum(-1)).abs().max())
        if (short > tol) != spec.attention_sinks:
            raise SpecError(f"{where}: attention rows sum to 1 - {short:.2g}: set attention_sinks="
                            f"{short > tol} (a learned sink takes part of each row)", alias="attention_sinks")
    if spec.experts:
        import warnings

        from nnattr.recipes import expert_attribution

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = expert_attribution.run(model, ids)
        rest = [j for j, label in enumerate(result.labels[result.dims[1]]) if label.endswith("_mlp_rest")]
        left = float(result.values[0, rest].abs().max()) / max(1.0, abs(result.per_prompt["logit"][0]))
        if left > tol:
            raise SpecError(f"{where}: the experts leave {left:.2g} of the logit (relative) in each MLP's rest: "
                            f"the MLP writes more than its routed experts (a shared expert? name it and its gate: "
                            f"shared_expert=, shared_expert_gate=)", alias="shared_expert")


def _norm(x: torch.Tensor, module, kind: str, eps: float, offset: float) -> torch.Tensor:
    x = x.detach().double()
    if kind == "layernorm":
        x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
    else:
        x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is not None:
        x = x * (weight.detach().double() + offset)
    return x if bias is None else x + bias.detach().double()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


__all__ = ["SpecError", "TOLERANCE", "check", "check_paths"]
