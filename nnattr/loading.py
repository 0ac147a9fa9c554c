"""Load any supported causal LM as an aliased nnsight model."""

from __future__ import annotations

import contextlib
import difflib
import warnings
from pathlib import Path
from typing import Any

from .arch import SPECS, ArchSpec, spec_for

PROBABILITY_ATTENTION = "eager"


def load(
    model: Any,
    tokenizer: Any = None,
    *,
    attn_implementation: str = PROBABILITY_ATTENTION,
    prepend_bos: bool | None = None,
    spec: ArchSpec | None = None,
    **kwargs: Any,
):
    """An ``nnsight.TransformersModel`` with nnattr's architecture-neutral aliases.

    model: an embedded short name (``"tiny-ioi"``), a local folder, a Hugging Face repo id
    (``"meta-llama/Llama-3.1-70B"``; loaded lazily, so a hosted model never materialises
    locally for ``remote=True``), or an already-built ``PreTrainedModel`` (then pass its
    ``tokenizer``). Eager attention is the default because rollout, flow and head-by-position
    DLA need attention probabilities, which sdpa does not return. ``prepend_bos`` is every
    recipe's default for this model (`nnattr.batch.Batch.of`): None follows the tokenizer (GPT-2's
    adds no BOS, Llama's does), True puts BOS first as TransformerLens does by default, False
    removes it. Extra keyword arguments go to ``from_pretrained`` (``dtype=``, ``device_map=``,
    ``revision=`` ...). ``spec``: the `ArchSpec` of a family nnattr does not ship (or one to use
    instead of nnattr's for this model); a spec nnattr did not ship, given here or with
    `nnattr.register`, is checked on the model (`nnattr.spec_check`) and remembered on it.

    >>> import nnattr
    >>> model = nnattr.load("tiny-ioi")
    >>> len(model.layers) > 0
    True
    """
    import nnsight
    from transformers import AutoConfig, PreTrainedModel

    if spec is not None and not isinstance(spec, ArchSpec):
        raise TypeError(f"spec= takes an nnattr.ArchSpec, got {type(spec).__name__}")
    if isinstance(model, PreTrainedModel):
        spec = spec or spec_for(model.config)
        if not _shipped(spec, model.config):
            from .spec_check import check_paths

            check_paths(model, spec)  # before nnsight binds the aliases: a path that fails is named
        if tokenizer is None:
            raise ValueError(
                "an already-built model needs its tokenizer: nnattr.load(model, tokenizer)"
            )
        current = getattr(model.config, "_attn_implementation", None)
        if attn_implementation and current != attn_implementation:
            model.set_attn_implementation(attn_implementation)
            if getattr(model.config, "_attn_implementation", None) == attn_implementation:
                warnings.warn(
                    f"nnattr.load switched the model from {current!r} to {attn_implementation!r} "
                    f"attention, so attention probabilities are available. Pass "
                    f"attn_implementation={current!r} to keep it (rollout and per-position DLA "
                    f"will then refuse to run).",
                    stacklevel=2,
                )
            else:  # Falcon: cannot switch (one warning, not a "switched" one and then a "cannot")
                warnings.warn(
                    f"{type(model).__name__} cannot switch its attention implementation at run time: it keeps "
                    f"{current!r}. Build it with attn_implementation={attn_implementation!r} (from_pretrained or "
                    f"from_config) for attention probabilities.",
                    stacklevel=2,
                )
        with _binding(spec, model.config):
            wrapped = nnsight.TransformersModel(model, tokenizer=tokenizer, rename=spec.rename(model.config))
        return _with_spec(_with_bos(wrapped, prepend_bos), spec)

    if not isinstance(model, (str, Path)):
        raise TypeError(
            f"model must be a name, a folder, a repo id or a PreTrainedModel, got {type(model).__name__}"
        )
    source = _resolve(str(model), path=isinstance(model, Path))
    config = AutoConfig.from_pretrained(source, **_config_kwargs(kwargs))
    given, spec = spec, spec or spec_for(config)  # refuse an unsupported architecture before loading any weights
    if Path(source).is_dir():
        # A local folder (the embedded models too) is built here and wrapped like any built
        # model: nnsight would take a path for a Hub repo id when picking the pipeline task.
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf = AutoModelForCausalLM.from_pretrained(source, attn_implementation=attn_implementation, **kwargs)
        return load(hf.eval(), tokenizer or AutoTokenizer.from_pretrained(source),
                    attn_implementation=attn_implementation, prepend_bos=prepend_bos,
                    spec=given)  # None: spec_for again, on the built config (Falcon-RW: eager is refused)
    kwargs.setdefault("attn_implementation", attn_implementation)
    with _binding(spec, config):
        wrapped = nnsight.TransformersModel(source, tokenizer=tokenizer, rename=spec.rename(config), **kwargs)
    return _with_spec(_with_bos(wrapped, prepend_bos), spec)


def _with_spec(model, spec: ArchSpec):
    """The model, remembering a spec nnattr does not ship (`nnattr.arch.spec_for` reads it) once
    `nnattr.spec_check.check` passes on it: paths, then (with real weights) a one-prompt forward."""
    if _shipped(spec, model.config):
        return model
    from .spec_check import check

    model._nnattr_spec = spec
    with _binding(spec, model.config, stage="run its one-prompt check"):
        check(model, spec)
    return model


@contextlib.contextmanager
def _binding(spec: ArchSpec, config, *, stage: str = "bind its aliases"):
    """nnsight's own errors about a spec nnattr does not ship (an alias that would shadow another, a
    module read out of forward order) as a `SpecError` that says what in the spec to look at."""
    from .spec_check import SpecError

    try:
        yield
    except SpecError:
        raise
    except Exception as error:
        if _shipped(spec, config):
            raise
        raise SpecError(
            f"ArchSpec(family={spec.family!r}): nnsight could not {stage}: {type(error).__name__}: {error}. "
            f"Each path must name the module whose output is that alias: `attn` and `mlp` the block's own "
            f"attention and MLP modules (not a projection inside them, e.g. mlp='mlp', not 'mlp.down_proj'), "
            f"`o_proj` and `v_proj` two different modules of the attention, and `ln_f` the final norm, which runs "
            f"after the last block", alias="spec") from error


def _with_bos(model, prepend_bos: bool | None):
    """The model, remembering its ``prepend_bos`` for `nnattr.batch.Batch.of`."""
    if prepend_bos is not None and not isinstance(prepend_bos, bool):
        raise TypeError(f"prepend_bos={prepend_bos!r}: give True, False or None (the tokenizer's behaviour)")
    model._nnattr_prepend_bos = prepend_bos
    return model


def _resolve(name: str, *, path: bool = False) -> str:
    """An embedded model's folder, a local folder, or a repo id for the Hub; a name that can only
    be a path and is no folder, or a near miss of an embedded name, is refused without the network."""
    from . import embedded

    if name in embedded.MODELS:
        return str(embedded.path(name))
    folder = Path(name).expanduser()
    if folder.is_dir():
        return str(folder)
    known = ", ".join(repr(m) for m in sorted(embedded.MODELS))
    if path or name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or folder.exists():
        what = "is a file, not a folder" if folder.exists() else f"no such folder ({folder.absolute()})"
        raise FileNotFoundError(f"model {name!r}: {what}. A local model is a folder holding config.json and the "
                                f"weights; a Hugging Face repo id looks like 'org/name'; embedded models: {known}")
    lower = {m.lower(): m for m in embedded.MODELS}  # a near miss: tiny-iio, Tiny_IOI
    close = [] if "/" in name else [lower[m] for m in difflib.get_close_matches(name.lower(), lower, n=3, cutoff=0.75)]
    if close:
        raise ValueError(f"model {name!r}: no such model; did you mean the embedded {' or '.join(map(repr, close))}? "
                         f"(a Hugging Face repo id looks like 'org/name'; a local folder like './my-model')")
    return name


def _config_kwargs(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in ("revision", "trust_remote_code", "token") if k in kwargs}


def _shipped(spec: ArchSpec, config) -> bool:
    """Whether ``spec`` is nnattr's own for this config's family (then nnattr's tests check it)."""
    return spec in SPECS and getattr(config, "model_type", None) in spec.model_types
