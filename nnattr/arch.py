"""Architecture specs: one declarative record per model family.

Every architecture difference nnattr knows about lives here. A spec names the native module
paths of a family and produces the nnsight ``rename=`` aliases, so recipes read the same names
on every model:

=====================  ===================================================================
alias                  what it is
=====================  ===================================================================
``embed``              token embedding (its output already carries any embedding scale)
``pos_embed``          learned absolute position embedding (only where the model has one)
``layers``             the decoder blocks
``layers[i].attn``     attention module; ``.output`` is ``(attn_output, attn_weights)``
``layers[i].attn.o_proj``  attention output projection; ``.input`` is ``[batch, pos, head*d_head]``
``layers[i].attn.v_proj``  the module whose output holds the value vectors (see ``value_layout``)
``layers[i].attn_out`` the module whose output is attention's write to the residual stream
``layers[i].mlp_out``  the module whose output is the MLP's write to the residual stream
``ln_f``               final norm
``lm_head``            unembedding
=====================  ===================================================================

Adding an architecture is a new record in ``SPECS``; see ``docs/architectures.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

NormKind = Literal["layernorm", "rmsnorm"]
ValueLayout = Literal["separate", "gpt2_fused", "neox_fused", "qkv_blocks", "grouped_qkv"]


@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one model family, and how its final norm is computed.

    Paths are native module paths (``embed``, ``pos_embed``, ``layers``, ``ln_f`` from the
    root; the rest relative to a decoder block). Head counts come from the Hugging Face config
    through ``dims``, never from here.
    """

    family: str
    model_types: tuple[str, ...]
    embed: str
    layers: str
    attn: str
    o_proj: str
    v_proj: str
    mlp: str
    ln_f: str
    norm: NormKind
    eps_key: str
    pos_embed: str | None = None
    attn_out: str | None = None  # a post-attention norm that writes to the residual (Gemma-2)
    mlp_out: str | None = None  # a post-MLP norm that writes to the residual (Gemma-2)
    o_proj_conv1d: bool = False  # GPT-2's Conv1D stores weight as [in, out]
    value_layout: ValueLayout = "separate"
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + weight)
    head_exact: bool = True  # False where head contributions pass a nonlinearity first
    eps: float | None = None  # the final norm's epsilon where the config has none (OPT: nn.LayerNorm's 1e-5)
    kv_heads: Callable[[Any], int] | None = None  # kv heads from the config, where no config key says (Falcon)
    unsupported: Callable[[Any], str | None] | None = None  # why a config of the family is refused, or None
    experts: str | None = None  # MoE: the experts module, relative to the MLP (see `Arch.n_experts`)
    n_experts_key: str | None = None  # MoE: the config key holding the number of experts
    shared_expert: str | None = None  # MoE: an expert every token uses, relative to the MLP (Qwen2-MoE)
    shared_expert_gate: str | None = None  # its gate, relative to the MLP: sigmoid(gate(x)) scales it (Qwen2-MoE)
    attention_sinks: bool = False  # learned per-head sink logits: returned probabilities sum to < 1
    writes_in_place: bool = False  # a block adds into a write's output tensor after it is returned (Falcon)
    # Where readers read (edge attribution patching): the pre-norms, relative to a block (a function of the config
    # where it depends on it: Falcon); the query and key projections, relative to attention (None: the fused module
    # `v_proj` names); whether the MLP reads the block's input (a parallel block) rather than the stream after
    # attention; `pre_norms=False` for families whose sub-layers read the residual stream unnormalised (OLMo-2).
    attn_norm: str | Callable[[Any], str] | None = None
    mlp_norm: str | Callable[[Any], str] | None = None
    q_proj: str | None = None
    k_proj: str | None = None
    parallel: bool | Callable[[Any], bool] = False
    pre_norms: bool = True
    mlp_in: str | None = None  # the module whose input is what the MLP reads, where not `mlp` (OPT: fc1)
    block_tuple: bool = False  # a decoder block returns (hidden states, ...), not a tensor (Falcon)
    attention_interface: bool = True  # attention calls Hugging Face's attention interface (not Falcon: its own)

    def __post_init__(self) -> None:
        """Refuse values no family has, naming the field and what it takes (before any path is looked up)."""
        if isinstance(self.model_types, str) or not all(isinstance(t, str) for t in self.model_types):
            raise ValueError(f"ArchSpec(family={self.family!r}): model_types={self.model_types!r} must be a tuple of "
                             f"config.model_type strings, e.g. ({self.model_types!r},)"
                             if isinstance(self.model_types, str) else
                             f"ArchSpec(family={self.family!r}): model_types must be a tuple of strings")
        for field, value, allowed in (("norm", self.norm, NormKind.__args__),
                                      ("value_layout", self.value_layout, ValueLayout.__args__)):
            if value not in allowed:
                raise ValueError(f"ArchSpec(family={self.family!r}): {field}={value!r}; expected one of "
                                 f"{', '.join(map(repr, allowed))} (docs/architectures.md says which is which)")

    @property
    def embeddings(self) -> tuple[str, ...]:
        """Aliases of the modules whose outputs start the residual stream."""
        return ("embed", "pos_embed") if self.pos_embed else ("embed",)

    def rename(self, config=None) -> dict[str, str | list[str]]:
        """The ``rename=`` dict for ``nnsight.TransformersModel`` (``config`` resolves the paths that depend on it)."""
        aliases: dict[str, str | list[str]] = {
            self.embed: "embed",
            self.layers: "layers",
            self.ln_f: "ln_f",
        }
        if self.pos_embed:
            aliases[self.pos_embed] = "pos_embed"
        attn_aliases = ["attn"] if self.attn != "attn" else []
        mlp_aliases = ["mlp"] if self.mlp != "mlp" else []
        if self.attn_out:
            aliases[self.attn_out] = "attn_out"
        else:
            attn_aliases.append("attn_out")
        if self.mlp_out:
            aliases[self.mlp_out] = "mlp_out"
        else:
            mlp_aliases.append("mlp_out")
        if attn_aliases:
            aliases[self.attn] = attn_aliases
        if mlp_aliases:
            aliases[self.mlp] = mlp_aliases
        if self.experts and self.experts != "experts":
            aliases[f"{self.mlp}.{self.experts}"] = f"{self.mlp}.experts"
        for native, alias in ((self.shared_expert, "shared_expert"), (self.shared_expert_gate, "shared_expert_gate")):
            if native and native != alias:
                aliases[f"{self.mlp}.{native}"] = f"{self.mlp}.{alias}"
        # A dotted alias binds on the envoy its prefix names (the native attention module).
        fused = self.v_proj if self.value_layout != "separate" else None  # one module computes q, k and v
        for native, alias in ((self.o_proj, "o_proj"), (self.v_proj, "v_proj"), (self.q_proj or fused, "q_proj"),
                              (self.k_proj or fused, "k_proj")):
            if native and native != alias:
                _add(aliases, f"{self.attn}.{native}", f"{self.attn}.{alias}")
        _add(aliases, self.mlp_in or self.mlp, "mlp_in")
        for native, alias in ((self.attn_norm, "attn_norm"), (self.mlp_norm, "mlp_norm")):
            native = native(config) if callable(native) and config is not None else native
            if isinstance(native, str) and native != alias:
                _add(aliases, native, alias)
        return aliases

    def is_parallel(self, config) -> bool:
        """Whether the MLP reads the block's input (not the stream after attention) in this configuration."""
        return bool(self.parallel(config) if callable(self.parallel) else self.parallel)


def _add(aliases: dict[str, str | list[str]], native: str, alias: str) -> None:
    """One more alias of a native path (a path may have several: GPT-2's ``c_attn`` is q, k and v)."""
    have = aliases.get(native)
    aliases[native] = alias if have is None else [*([have] if isinstance(have, str) else have), alias]


_LLAMA_LIKE = dict(
    embed="model.embed_tokens",
    layers="model.layers",
    attn="self_attn",
    o_proj="o_proj",
    v_proj="v_proj",
    mlp="mlp",
    ln_f="model.norm",
    norm="rmsnorm",
    eps_key="rms_norm_eps",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    q_proj="q_proj",
    k_proj="k_proj",
)

SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="GPT-2",
        model_types=("gpt2",),
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        layers="transformer.h",
        attn="attn",
        o_proj="c_proj",
        v_proj="c_attn",
        mlp="mlp",
        ln_f="transformer.ln_f",
        norm="layernorm",
        eps_key="layer_norm_epsilon",
        o_proj_conv1d=True,
        value_layout="gpt2_fused",
        attn_norm="ln_1",
        mlp_norm="ln_2",
    ),
    ArchSpec(
        family="GPT-NeoX (Pythia)",
        model_types=("gpt_neox",),
        embed="gpt_neox.embed_in",
        layers="gpt_neox.layers",
        attn="attention",
        o_proj="dense",
        v_proj="query_key_value",
        mlp="mlp",
        ln_f="gpt_neox.final_layer_norm",
        norm="layernorm",
        eps_key="layer_norm_eps",
        value_layout="neox_fused",
        attn_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
        parallel=lambda config: config.use_parallel_residual,
    ),
    ArchSpec(family="Llama", model_types=("llama",), **_LLAMA_LIKE),
    ArchSpec(family="Mistral", model_types=("mistral",), **_LLAMA_LIKE),
    ArchSpec(family="Qwen2", model_types=("qwen2",), **_LLAMA_LIKE),
    ArchSpec(family="Gemma", model_types=("gemma",), norm_weight_offset=1.0, **_LLAMA_LIKE),
    ArchSpec(
        family="Gemma-2",
        model_types=("gemma2",),
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        norm_weight_offset=1.0,
        head_exact=False,
        **{**_LLAMA_LIKE, "mlp_norm": "pre_feedforward_layernorm"},
    ),
    ArchSpec(family="Qwen3", model_types=("qwen3",), **_LLAMA_LIKE),  # QK-norm: inside attention, DLA unaffected
    ArchSpec(family="Qwen3-MoE", model_types=("qwen3_moe",), experts="experts", n_experts_key="num_experts",
             **_LLAMA_LIKE),
    ArchSpec(family="Mixtral", model_types=("mixtral",), experts="experts", n_experts_key="num_local_experts",
             **_LLAMA_LIKE),
    ArchSpec(family="Qwen2-MoE", model_types=("qwen2_moe",), experts="experts", n_experts_key="num_experts",
             shared_expert="shared_expert", shared_expert_gate="shared_expert_gate",
             **_LLAMA_LIKE),  # routed experts plus a sigmoid-gated shared expert
    ArchSpec(  # norms after each sub-layer, before the residual add; no pre-norms
        family="OLMo-2",
        model_types=("olmo2",),
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        head_exact=False,
        pre_norms=False,
        **{**_LLAMA_LIKE, "attn_norm": None, "mlp_norm": None},
    ),
    ArchSpec(
        family="OLMo-3",
        model_types=("olmo3",),
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        head_exact=False,
        pre_norms=False,
        **{**_LLAMA_LIKE, "attn_norm": None, "mlp_norm": None},
    ),
    ArchSpec(
        family="Gemma-3",
        model_types=("gemma3_text",),
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        norm_weight_offset=1.0,
        head_exact=False,
        **{**_LLAMA_LIKE, "mlp_norm": "pre_feedforward_layernorm"},
    ),
    ArchSpec(family="GPT-OSS", model_types=("gpt_oss",), experts="experts", n_experts_key="num_local_experts",
             attention_sinks=True, **_LLAMA_LIKE),
)



def _falcon_kv_heads(config) -> int:
    """Falcon's kv heads: ``num_kv_heads`` groups (new decoder architecture), one (multi-query), or one per head."""
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def _falcon_norms(config) -> tuple[str, str]:
    """The norms Falcon's attention and MLP read through: two (``ln_attn``, ``ln_mlp``), one shared, or sequential."""
    if config.new_decoder_architecture and (config.num_ln_in_parallel_attn or 2) == 2:
        return "ln_attn", "ln_mlp"
    if config.parallel_attn or config.new_decoder_architecture:
        return "input_layernorm", "input_layernorm"
    return "input_layernorm", "post_attention_layernorm"


def _falcon_unsupported(config) -> str | None:
    """Falcon-RW (``alibi=True``) under eager attention, which does not compute the model (the reason below)."""
    if getattr(config, "alibi", False) and getattr(config, "_attn_implementation", None) == "eager":
        return ("alibi=True (Falcon-RW) with eager attention: transformers' FalconModel folds ALiBi into the "
                "attention mask and FalconAttention's eager path adds ALiBi to the scores again, so an eager "
                "Falcon-RW attends with twice the ALiBi bias of its sdpa path and of the original Falcon-RW code "
                "(nnattr would attribute that other model exactly). Build it with attn_implementation='sdpa' "
                "(nnattr.load(..., attn_implementation='sdpa'), from_pretrained or from_config; Falcon cannot switch "
                "at run time): DLA by component and by head, the lenses and patching are exact there; methods that "
                "need attention probabilities (rollout, flow, DLA by head and position) refuse")
    return None


def _opt_layout(config) -> str | None:
    """OPT configurations whose residual stream is not a sum of writes read through one final norm.

    The released OPT-125m and OPT-1.3b ... OPT-66b pass; OPT-350m is refused (post-norm, and its
    embeddings are projected).
    """
    if not config.do_layer_norm_before:
        return ("do_layer_norm_before=False (post-norm, OPT-350m): each sub-layer's sum passes a LayerNorm, so the "
                "residual stream is not a sum of writes and DLA, patching and the lens would not be exact. Use "
                "OPT-125m or OPT-1.3b and larger (pre-norm)")
    if getattr(config, "_remove_final_layer_norm", False):
        return "_remove_final_layer_norm=True: there is no final norm for DLA and the lens to read through"
    if config.word_embed_proj_dim != config.hidden_size:
        return (f"word_embed_proj_dim={config.word_embed_proj_dim} != hidden_size={config.hidden_size}: "
                f"project_in/project_out sit between the residual stream and the (un)embedding")
    return None


SPECS += (  # issue 14, group B: parallel blocks (GPT-J, Falcon), OPT, Phi-3
    ArchSpec(  # parallel block: attn(ln_1(h)) + mlp(ln_1(h)) + h; the writes are still attn and mlp outputs
        family="GPT-J",
        model_types=("gptj",),
        embed="transformer.wte",
        layers="transformer.h",
        attn="attn",
        o_proj="out_proj",
        v_proj="v_proj",
        mlp="mlp",
        ln_f="transformer.ln_f",
        norm="layernorm",
        eps_key="layer_norm_epsilon",
        attn_norm="ln_1",
        mlp_norm="ln_1",  # one norm for both
        q_proj="q_proj",
        k_proj="k_proj",
        parallel=True,
    ),
    ArchSpec(  # fused query_key_value, per kv group [queries | k | v]; parallel (or sequential) block
        family="Falcon",
        model_types=("falcon",),
        embed="transformer.word_embeddings",
        layers="transformer.h",
        attn="self_attention",
        o_proj="dense",
        v_proj="query_key_value",
        mlp="mlp",
        ln_f="transformer.ln_f",
        norm="layernorm",
        eps_key="layer_norm_epsilon",
        value_layout="grouped_qkv",
        kv_heads=_falcon_kv_heads,
        unsupported=_falcon_unsupported,  # Falcon-RW (ALiBi) only with sdpa attention
        writes_in_place=True,  # mlp_output += attention_output: a kept MLP write must be a copy
        block_tuple=True,  # FalconDecoderLayer returns (output, attention weights)
        attention_interface=False,  # FalconAttention computes its scores itself
        attn_norm=lambda config: _falcon_norms(config)[0],
        mlp_norm=lambda config: _falcon_norms(config)[1],
        parallel=lambda config: config.parallel_attn or config.new_decoder_architecture,
    ),
    ArchSpec(  # no MLP module: fc1 -> act -> fc2 in the layer on the stream flattened to [batch * pos, d_model];
        family="OPT",  # fc2's output is the MLP's write, which `kernels.first(output, rows)` unflattens
        model_types=("opt",),
        embed="model.decoder.embed_tokens",
        pos_embed="model.decoder.embed_positions",
        layers="model.decoder.layers",
        attn="self_attn",
        o_proj="out_proj",
        v_proj="v_proj",
        mlp="fc2",
        ln_f="model.decoder.final_layer_norm",
        norm="layernorm",
        eps_key="layer_norm_eps",
        eps=1e-5,
        unsupported=_opt_layout,
        attn_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
        q_proj="q_proj",
        k_proj="k_proj",
        mlp_in="fc1",
    ),
    ArchSpec(family="Phi-3", model_types=("phi3",), value_layout="qkv_blocks",
             **{**_LLAMA_LIKE, "v_proj": "qkv_proj", "q_proj": None, "k_proj": None}),  # fused [q | k | v], gate_up
)

_BY_TYPE = {t: spec for spec in SPECS for t in spec.model_types}  # `register` adds to it: the one lookup


#: Multimodal wrappers whose text model is a supported family.
_TEXT_MODELS = {"gemma3": "Gemma3ForCausalLM, model_type 'gemma3_text'"}


def register(spec: ArchSpec, *, replace: bool = False) -> ArchSpec:
    """Make ``spec`` the spec of its ``model_types`` in this process, without editing nnattr.

    `nnattr.load` validates a registered spec on the model it loads (`nnattr.spec_check`). A
    ``model_type`` nnattr already knows keeps its spec unless ``replace=True``. To use a spec for
    one model only, pass it to ``nnattr.load(model, spec=...)`` instead. See docs/architectures.md.
    """
    if not isinstance(spec, ArchSpec):
        raise TypeError(f"register() takes an ArchSpec, got {type(spec).__name__}")
    if not spec.model_types or not all(isinstance(t, str) for t in spec.model_types):
        raise ValueError(f"ArchSpec(family={spec.family!r}) needs model_types: a tuple of config.model_type strings")
    taken = sorted(t for t in spec.model_types if _BY_TYPE.get(t, spec) != spec)
    if taken and not replace:
        raise ValueError(f"model_type {taken[0]!r} already has the spec {_BY_TYPE[taken[0]].family!r}: pass "
                         f"replace=True to use yours in this process, or nnattr.load(model, spec=...) for one model")
    _BY_TYPE.update(dict.fromkeys(spec.model_types, spec))
    return spec


def supported() -> list[str]:
    """The ``model_type`` values nnattr supports (some refuse particular configurations, with the reason)."""
    return sorted(_BY_TYPE)


def spec_for(model_or_config) -> ArchSpec:
    """The spec of a model, an nnsight model, or a Hugging Face config.

    >>> from transformers import GPT2Config
    >>> spec_for(GPT2Config()).family
    'GPT-2'
    """
    given = getattr(model_or_config, "_nnattr_spec", None)  # nnattr.load(model, spec=...)
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if not isinstance(given, ArchSpec) and model_type not in _BY_TYPE:
        hint = _TEXT_MODELS.get(model_type)
        raise ValueError(
            f"nnattr does not support model_type={model_type!r}"
            + (f": a multimodal wrapper; load its language model ({hint}) instead" if hint else "") + ". Supported: "
            f"{', '.join(supported())}. Describe it from Python without editing nnattr: "
            f"nnattr.load(model, spec=nnattr.ArchSpec(...)) or nnattr.register(nnattr.ArchSpec(...)) "
            f"(checked on the model when it is loaded); see the walkthrough in docs/architectures.md."
        )
    spec = given if isinstance(given, ArchSpec) else _BY_TYPE[model_type]
    reason = spec.unsupported(config) if spec.unsupported else None
    if reason:
        raise ValueError(f"nnattr does not support this {spec.family} configuration: {reason}")
    return spec


@dataclass(frozen=True)
class Dims:
    """Sizes read from the Hugging Face config (TransformerLens vocabulary)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_vocab: int
    eps: float
    logit_softcap: float | None


def dims(model_or_config) -> Dims:
    """Sizes of a model, read through its config."""
    config = getattr(model_or_config, "config", model_or_config)
    spec = spec_for(model_or_config)
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    return Dims(
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=spec.kv_heads(config) if spec.kv_heads else getattr(config, "num_key_value_heads", None) or n_heads,
        d_head=getattr(config, "head_dim", None) or d_model // n_heads,
        d_model=d_model,
        d_vocab=config.vocab_size,
        eps=float(spec.eps if spec.eps is not None else getattr(config, spec.eps_key)),
        logit_softcap=getattr(config, "final_logit_softcapping", None),
    )


SINKS = ("a learned sink per head takes part of each row's probability mass and has no value vector: its mass "
         "is dropped and rows are renormalised over real keys (rollout after mixing in the identity); "
         "mean_attention keeps the raw mass, n * mean_attention = 1 - mean sink mass. See docs/architectures.md")


@dataclass(frozen=True)
class Arch(Dims):
    """What a recipe's trace needs to know about a model, as plain values (they travel to NDIF).

    The sizes of `Dims` (from the Hugging Face config), layout and norm from the family's
    `ArchSpec`, and ``attention``, the attention implementation the model runs.
    """

    family: str
    norm: NormKind
    norm_weight_offset: float
    value_layout: ValueLayout
    o_proj_conv1d: bool
    embeddings: tuple[str, ...]
    head_exact: bool
    attention: str | None
    n_experts: int = 0  # experts per MoE MLP (`layers[i].mlp.experts`); 0 for a dense MLP
    shared_expert: bool = False  # `layers[i].mlp.shared_expert` writes too (its input: the experts')
    shared_expert_gate: bool = False  # sigmoid(`layers[i].mlp.shared_expert_gate`) scales the shared expert
    attention_sinks: bool = False  # probabilities over real keys sum to < 1 (the sink takes the rest)
    writes_in_place: bool = False  # a write's tensor changes after the module returns it: keep copies
    parallel: bool = False  # the MLP reads the block's input, not the stream after attention
    pre_norms: bool = True  # attention and MLP read the stream through `attn_norm` / `mlp_norm` (not OLMo-2)
    readers_missing: str | None = None  # what the spec lacks for edge attribution (None: nothing)
    block_tuple: bool = False  # a decoder block returns (hidden states, ...): skipping one must return that too
    softmax_missing: str | None = None  # why the queries and keys the softmax reads cannot be recomputed (AtP*)

    def require_readers(self, method: str) -> None:
        """Refuse an edge-level method where the spec does not say where each reader reads."""
        if self.readers_missing:
            raise ValueError(f"{method} needs to know where {self.family}'s readers read: {self.readers_missing}. "
                             f"Add it to the ArchSpec (see docs/architectures.md)")

    def require_softmax(self, method: str, instead: str) -> None:
        """Refuse a method that recomputes each head's softmax from the queries and keys Hugging Face's attention
        interface receives, where the model's softmax is not that (``instead``: what to use)."""
        if self.softmax_missing:
            raise ValueError(f"{method} recomputes each head's softmax from its queries and keys, which it cannot do "
                             f"on {self.family}: {self.softmax_missing}. Use {instead} on this model")

    @property
    def qkv_shape(self) -> dict:
        """The keyword arguments of `nnattr.kernels.split_qkv` (and `reader_gradients`) for this model."""
        return dict(layout=self.value_layout, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, d_head=self.d_head)

    @property
    def norm_shape(self) -> dict:
        """The keyword arguments of `nnattr.kernels.norm_vjp` for this model's norms."""
        return dict(norm=self.norm, eps=self.eps, weight_offset=self.norm_weight_offset)

    @property
    def sink_meta(self) -> dict[str, str]:
        """What a result computed from attention probabilities says about learned sinks ({} without)."""
        return {"attention_sinks": SINKS} if self.attention_sinks else {}

    def require(self, method: str, *, exact_heads: bool = False, probabilities: bool = False) -> None:
        """`require_exact_heads` and `require_probabilities`, where asked, in one call."""
        if exact_heads:
            self.require_exact_heads(method)
        if probabilities:
            self.require_probabilities(method)

    def require_exact_heads(self, method: str) -> None:
        """Refuse a head-level method where heads pass their own norm before the residual stream."""
        if not self.head_exact:
            raise ValueError(
                f"{method} is not exact on {self.family}: each attention output passes through "
                f"its own norm before the residual stream, so per-head contributions do not add "
                f"up. Use the component-level method instead (direct_logit_attribution with "
                f"by='component'); see docs/architectures.md."
            )

    def pick(self, given, what: Literal["layers", "heads"] = "layers") -> list[int]:
        """Indices in ``[0, n)``, in model order, of the layers (or heads) ``given`` names: None for
        all, negative from the end (-1 the last). An empty list, a repeat or an index out of range
        is refused, naming the valid range."""
        n, one = (self.n_layers, "layer") if what == "layers" else (self.n_heads, "head")
        if given is None:
            return list(range(n))
        items = None if isinstance(given, (str, bytes)) or not hasattr(given, "__iter__") else list(given)
        if items is None or any(isinstance(i, bool) or not hasattr(i, "__index__") for i in items):
            raise ValueError(f"{what}={given!r}: give a list of {one} indices, e.g. {what}=[0, -1]")
        given = [i.__index__() for i in items]
        if not given:
            raise ValueError(f"{what}=[]: give at least one {one} index, or {what}=None for all {n}")
        if any(not -n <= i < n for i in given):
            raise ValueError(f"{what}={given}: {[i for i in given if not -n <= i < n]} out of range; the model has "
                             f"{n} {what}, indexed {-n} to {n - 1} (-1 the last)")
        picked = [i % n for i in given]
        if len(set(picked)) < len(picked):
            repeated = sorted({i for i in picked if picked.count(i) > 1})
            raise ValueError(f"{what}={given}: {one} {', '.join(map(str, repeated))} named more than once "
                             f"(negative indices count back from {n}); give each once")
        return sorted(picked)

    def require_probabilities(self, method: str) -> None:
        """Refuse to compute from attention probabilities a model does not return (sdpa)."""
        if self.attention != "eager":
            raise ValueError(
                f"{method} needs attention probabilities, but this model uses {self.attention!r} attention, "
                f"which does not return them. Load it with nnattr.load(..., attn_implementation='eager') "
                f"or call model._module.set_attn_implementation('eager') first"
                + (f". {self.family} cannot switch at run time: build it eager (from_pretrained or from_config with "
                   f"attn_implementation='eager'); Falcon-RW (ALiBi) has no exact eager path in transformers, so "
                   f"its probabilities are not available (docs/architectures.md)." if self.family == "Falcon" else ".")
            )


def arch_of(model) -> Arch:
    """The `Arch` of an nnsight model (or a Hugging Face config)."""
    config = getattr(model, "config", model)
    spec = spec_for(model)
    return Arch(
        **vars(dims(model)), family=spec.family, norm=spec.norm, norm_weight_offset=spec.norm_weight_offset,
        value_layout=spec.value_layout, o_proj_conv1d=spec.o_proj_conv1d, embeddings=spec.embeddings,
        head_exact=spec.head_exact, attention=getattr(config, "_attn_implementation", None),
        n_experts=int(getattr(config, spec.n_experts_key)) if spec.n_experts_key else 0,
        attention_sinks=spec.attention_sinks, writes_in_place=spec.writes_in_place,
        shared_expert=bool(spec.shared_expert), shared_expert_gate=bool(spec.shared_expert_gate),
        parallel=spec.is_parallel(config), pre_norms=spec.pre_norms, readers_missing=_readers_missing(spec),
        block_tuple=spec.block_tuple, softmax_missing=_softmax_missing(spec, config),
    )


def _softmax_missing(spec: ArchSpec, config) -> str | None:
    """Why AtP*'s QK fix cannot recompute a family's softmax from the attention interface's inputs (None: it can)."""
    implementation = getattr(config, "_attn_implementation", None)
    if not spec.attention_interface:
        return "its attention computes its scores itself, not through Hugging Face's attention interface"
    if implementation not in (None, "eager", "sdpa"):
        return (f"under {implementation!r} attention the interface receives a mask the fix does not read; load the "
                f"model with attn_implementation='sdpa' or 'eager'")
    if getattr(config, "reorder_and_upcast_attn", False) and implementation == "eager":
        return ("GPT-2 with reorder_and_upcast_attn=True computes its eager scores itself, not through the attention "
                "interface; load the model with attn_implementation='sdpa'")
    if spec.attention_sinks:
        return "its learned attention sinks take part in the softmax"
    if getattr(config, "attn_logit_softcapping", None):
        return "it soft-caps its attention scores (attn_logit_softcapping), which the fix does not model"
    return None


def _readers_missing(spec: ArchSpec) -> str | None:
    """What a spec lacks for edge attribution: the pre-norms, or the query and key projections."""
    missing = [name for name in ("attn_norm", "mlp_norm") if spec.pre_norms and getattr(spec, name) is None]
    if spec.value_layout == "separate":
        missing += [name for name in ("q_proj", "k_proj") if getattr(spec, name) is None]
    return f"the spec names no {' or '.join(missing)}" if missing else None
