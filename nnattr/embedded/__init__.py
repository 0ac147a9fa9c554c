"""Small models trained in this repository and shipped with the package.

``tiny-ioi`` is a 3-layer GPT-2 trained on indirect-object identification (IOI) and induction
(see ``docs/embedded_model.md``). Load it offline with plain transformers:

>>> from transformers import AutoTokenizer, GPT2LMHeadModel
>>> from nnattr.embedded import path
>>> model = GPT2LMHeadModel.from_pretrained(path("tiny-ioi"))
>>> tokenizer = AutoTokenizer.from_pretrained(path("tiny-ioi"))
"""

from __future__ import annotations

import pathlib

_HERE = pathlib.Path(__file__).resolve().parent

MODELS: dict[str, pathlib.Path] = {"tiny-ioi": _HERE / "tiny-ioi"}


def path(name: str) -> pathlib.Path:
    """The folder holding the weights, config and tokenizer of embedded model ``name``.

    Raises ``ValueError`` for an unknown name and ``FileNotFoundError`` when the folder is
    missing (for instance a source checkout without the trained artefacts).
    """
    if name not in MODELS:
        known = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown embedded model {name!r}; known models: {known}")
    folder = MODELS[name]
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"embedded model {name!r} has no artefacts in {folder}; "
            f"train it with `python -m nnattr.embedded.train --out {folder}`"
        )
    return folder


__all__ = ["MODELS", "path"]
