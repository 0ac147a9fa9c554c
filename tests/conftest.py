"""Fixtures shared by several test modules."""

from __future__ import annotations

import importlib.util
import os

import pytest

#: Test dependencies that pip cannot install from pyproject.toml alone, and how to install them.
#: Without them their tests would skip; the suite refuses to start instead, so a green run means
#: the whole suite ran (NNATTR_TESTS_ALLOW_SKIPS=1 lets them skip, for a quick partial run).
NEEDED = {
    "ndif": "pip install --no-deps --ignore-requires-python ndif==0.1.2   # NDIF's execution core, for the "
            "loopback server (it declares Python >= 3.12 but runs here)",
    "transformer_lens": 'pip install -e ".[test]"   # TransformerLens, the peer the tests compare with',
}


def pytest_configure(config):
    try:  # writes docs/status.md after a run of the architecture tests
        from tests.support.status import StatusPlugin
    except ModuleNotFoundError:  # plain `pytest` without `pythonpath = ["."]`
        from support.status import StatusPlugin

    config.pluginmanager.register(StatusPlugin(config), "nnattr-status")
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing and not os.environ.get("NNATTR_TESTS_ALLOW_SKIPS"):
        raise pytest.UsageError("the test suite needs " + ", ".join(missing) + ":\n  " +
                                "\n  ".join(NEEDED[m] for m in missing) +
                                "\n(the README's test command installs them; NNATTR_TESTS_ALLOW_SKIPS=1 skips "
                                "their tests instead)")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random GPT-2 saved as a Hugging Face folder, loaded by path like any model."""
    from tests.support import tiny

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tiny.hf_model("gpt2").save_pretrained(folder)
    tiny.tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and lose much on a shared machine: one thread for
    the module (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sharp_zoo():
    """``get(arch) -> (hf, model)``: tests/test_patching.py's tiny model of ``arch`` (every matrix sharpened, so
    logits are O(1)) and its nnattr model, built once per test module."""
    import nnattr
    from tests.support import tiny
    from tests.test_patching import build

    cache = {}

    def get(arch):
        if arch not in cache:
            hf = build(arch)
            cache[arch] = hf, nnattr.load(hf, tiny.tokenizer())
        return cache[arch]

    return get
