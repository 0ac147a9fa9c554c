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
from typing import Literal

NormKind = Literal["layernorm", "rmsnorm"]
ValueLayout = Literal["separate", "gpt2_fused", "neox_fused"]


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

    @property
    def embeddings(self) -> tuple[str, ...]:
        """Aliases of the modules whose outputs start the residual stream."""
        return ("embed", "pos_embed") if self.pos_embed else ("embed",)

    def rename(self) -> dict[str, str | list[str]]:
        """The ``rename=`` dict for ``nnsight.TransformersModel``."""
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
        # A dotted alias binds on the envoy its prefix names (the native attention module).
        for native, alias in ((self.o_proj, "o_proj"), (self.v_proj, "v_proj")):
            if native != alias:
                aliases[f"{self.attn}.{native}"] = f"{self.attn}.{alias}"
        return aliases


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
        **_LLAMA_LIKE,
    ),
)

_BY_TYPE = {t: spec for spec in SPECS for t in spec.model_types}


def supported() -> list[str]:
    """The ``model_type`` values nnattr supports."""
    return sorted(_BY_TYPE)


def spec_for(model_or_config) -> ArchSpec:
    """The spec of a model, an nnsight model, or a Hugging Face config.

    >>> from transformers import GPT2Config
    >>> spec_for(GPT2Config()).family
    'GPT-2'
    """
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_TYPE:
        raise ValueError(
            f"nnattr does not support model_type={model_type!r}. Supported: "
            f"{', '.join(supported())}. Adding one is a single ArchSpec record in nnattr/arch.py: "
            f"follow the checklist in docs/architectures.md."
        )
    return _BY_TYPE[model_type]


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
    spec = spec_for(config)
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    return Dims(
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        d_head=getattr(config, "head_dim", None) or d_model // n_heads,
        d_model=d_model,
        d_vocab=config.vocab_size,
        eps=float(getattr(config, spec.eps_key)),
        logit_softcap=getattr(config, "final_logit_softcapping", None),
    )


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

    def require_probabilities(self, method: str) -> None:
        """Refuse to compute from attention probabilities a model does not return (sdpa)."""
        if self.attention != "eager":
            raise ValueError(
                f"{method} needs attention probabilities, but this model uses {self.attention!r} attention, "
                f"which does not return them. Load it with nnattr.load(..., attn_implementation='eager') "
                f"or call model._module.set_attn_implementation('eager') first."
            )


def arch_of(model) -> Arch:
    """The `Arch` of an nnsight model (or a Hugging Face config)."""
    config = getattr(model, "config", model)
    spec = spec_for(config)
    return Arch(
        **vars(dims(config)), family=spec.family, norm=spec.norm, norm_weight_offset=spec.norm_weight_offset,
        value_layout=spec.value_layout, o_proj_conv1d=spec.o_proj_conv1d, embeddings=spec.embeddings,
        head_exact=spec.head_exact, attention=getattr(config, "_attn_implementation", None),
    )
