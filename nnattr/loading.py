"""Load any supported causal LM as an aliased nnsight model."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .arch import spec_for

PROBABILITY_ATTENTION = "eager"


def load(
    model: Any,
    tokenizer: Any = None,
    *,
    attn_implementation: str = PROBABILITY_ATTENTION,
    **kwargs: Any,
):
    """An ``nnsight.TransformersModel`` with nnattr's architecture-neutral aliases.

    model: an embedded short name (``"tiny-ioi"``), a local folder, a Hugging Face repo id
    (``"meta-llama/Llama-3.1-70B"``; loaded lazily, so a hosted model never materialises
    locally for ``remote=True``), or an already-built ``PreTrainedModel`` (then pass its
    ``tokenizer``). Eager attention is the default because rollout, flow and head-by-position
    DLA need attention probabilities, which sdpa does not return. Extra keyword arguments go
    to ``from_pretrained`` (``dtype=``, ``device_map=``, ``revision=`` ...).

    >>> import nnattr
    >>> model = nnattr.load("tiny-ioi")
    >>> len(model.layers) > 0
    True
    """
    import nnsight
    from transformers import AutoConfig, PreTrainedModel

    if isinstance(model, PreTrainedModel):
        spec = spec_for(model.config)
        if tokenizer is None:
            raise ValueError(
                "an already-built model needs its tokenizer: nnattr.load(model, tokenizer)"
            )
        current = getattr(model.config, "_attn_implementation", None)
        if attn_implementation and current != attn_implementation:
            warnings.warn(
                f"nnattr.load switched the model from {current!r} to {attn_implementation!r} "
                f"attention, so attention probabilities are available. Pass "
                f"attn_implementation={current!r} to keep it (rollout and per-position DLA "
                f"will then refuse to run).",
                stacklevel=2,
            )
            model.set_attn_implementation(attn_implementation)
        return nnsight.TransformersModel(model, tokenizer=tokenizer, rename=spec.rename())

    if not isinstance(model, (str, Path)):
        raise TypeError(
            f"model must be a name, a folder, a repo id or a PreTrainedModel, got {type(model).__name__}"
        )
    source = _resolve(str(model))
    config = AutoConfig.from_pretrained(source, **_config_kwargs(kwargs))
    spec = spec_for(config)  # refuse an unsupported architecture before loading any weights
    if Path(source).is_dir():
        # A local folder (the embedded models too) is built here and wrapped like any built
        # model: nnsight would take a path for a Hub repo id when picking the pipeline task.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(source, attn_implementation=attn_implementation, **kwargs)
        return load(hf.eval(), tokenizer or AutoTokenizer.from_pretrained(source),
                    attn_implementation=attn_implementation)
    kwargs.setdefault("attn_implementation", attn_implementation)
    return nnsight.TransformersModel(source, tokenizer=tokenizer, rename=spec.rename(), **kwargs)


def _resolve(name: str) -> str:
    from . import embedded

    if name in embedded.MODELS:
        return str(embedded.path(name))
    return name


def _config_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("revision", "trust_remote_code", "token") if k in kwargs}
