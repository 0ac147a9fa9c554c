"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random GPT-2 saved as a Hugging Face folder, loaded by path like any model."""
    from tests.support import tiny

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny.hf_model("gpt2").save_pretrained(folder)
    tiny.tokenizer().save_pretrained(folder)
    return str(folder)
