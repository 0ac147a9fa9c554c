"""Pytest helpers for remote tests: a tiny offline GPT-2 and a loopback-server fixture.

Usage in a test module::

    from tests.support.fixtures import TINY_REPO_ID, loopback_fixture, tiny_gpt2_pair

    client_model, server_model = tiny_gpt2_pair()
    ndif = loopback_fixture({TINY_REPO_ID: server_model})

    def test_remote(ndif):
        with client_model.trace("the cat sat", remote=True):
            ...

Everything is built from configs with a word-level tokenizer: no Hub access.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import pytest

from .ndif_loopback import LoopbackNDIF, client_config

__all__ = [
    "client_and_server",
    "offline_server",
    "TINY_REPO_ID",
    "WORDS",
    "loopback_fixture",
    "tiny_gpt2",
    "tiny_gpt2_pair",
    "word_tokenizer",
]

#: The repo id the tiny model is known by on both sides (never looked up).
TINY_REPO_ID = "nnattr-test/tiny-gpt2"

_NAMED = (
    "the a cat dog sat on mat ran to park and when mary john went store gave "
    "drink milk book is in of tower paris city big small red blue"
).split()
#: The tokenizer's vocabulary: [PAD], [UNK], some words, then w0, w1, ...
WORDS = ["[PAD]", "[UNK]", *_NAMED] + [f"w{i}" for i in range(100 - 2 - len(_NAMED))]


def word_tokenizer() -> Any:
    """A 100-token whitespace word-level tokenizer (``[PAD]`` = 0, also EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[PAD]",
        padding_side="left",
    )


def _hf_gpt2(seed: int, attn_implementation: Optional[str], state: Optional[dict] = None) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=len(WORDS), n_positions=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    config._name_or_path = TINY_REPO_ID
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(config)
    if state is not None:
        hf.load_state_dict(state)
    return hf.eval()


def tiny_gpt2(seed: int = 0, attn_implementation: Optional[str] = None, state: Optional[dict] = None) -> Any:
    """A 2-layer, 2-head, d_model 16 GPT-2 as an nnsight ``TransformersModel``
    (text-generation task), random weights from ``seed`` (or ``state``)."""
    import nnsight

    return nnsight.TransformersModel(
        _hf_gpt2(seed, attn_implementation, state), tokenizer=word_tokenizer(),
        task="text-generation",
    )


def tiny_gpt2_pair(
    seed: int = 0,
    attn_implementation: Optional[str] = None,
    server_attn_implementation: Optional[str] = None,
) -> tuple[Any, Callable[[], Any]]:
    """The client's model and a factory for the server's: separate instances
    with identical weights, as with a model you load locally and NDIF hosts."""
    client = tiny_gpt2(seed, attn_implementation)
    state = copy.deepcopy(client._module.state_dict())
    return client, lambda: tiny_gpt2(seed, server_attn_implementation, state)


def client_and_server(hf: Any, arch: str, repo_id: str) -> tuple[Any, Callable[[], Any]]:
    """The client's nnattr model over the built ``hf`` (a ``tests.support.tiny`` ``arch``) and a
    factory for the server's: separate instances, same weights; the server's is a plain nnsight
    model (no nnattr aliases) with sdpa attention, as NDIF serves it."""
    import nnsight

    import nnattr

    from . import tiny

    hf.name_or_path = repo_id
    state = copy.deepcopy(hf.state_dict())

    def server():
        sdpa = getattr(type(hf), "_supports_sdpa", True)  # GPT-OSS has no sdpa path: served eager
        served = tiny.hf_model(arch, attn_implementation="sdpa" if sdpa else "eager")
        served.load_state_dict(state)
        served.name_or_path = repo_id
        return nnsight.TransformersModel(served, tokenizer=tiny.tokenizer())

    return nnattr.load(hf, tiny.tokenizer()), server


def offline_server(hf: Any, arch: str, repo_id: str, api_key: str) -> tuple[Any, Any]:
    """``(client model, fixture)``: the client's nnattr model over ``hf`` and a module-scoped pytest fixture
    (assign it to ``server``) yielding a started `LoopbackNDIF` that serves a copy of it as ``repo_id``
    (`client_and_server`), with nnsight's client pointed at it, ``repo_id`` known offline, the server's
    older import whitelist, and nnattr's hosted-model checks forgotten before and after."""
    from .ndif_loopback import OLD_SERVER_IMPORT_WHITELIST, offline_repo_ids

    client, factory = client_and_server(hf, arch, repo_id)

    @pytest.fixture(scope="module")
    def server() -> Any:
        from nnattr import remote

        loop = LoopbackNDIF({repo_id: factory}, api_keys={api_key}, import_whitelist=OLD_SERVER_IMPORT_WHITELIST)
        with loop, client_config(loop.host, api_key, remote_logging=False, repo_ids=[repo_id]), \
                offline_repo_ids(repo_id):
            remote._CHECKED.clear()
            yield loop
        remote._CHECKED.clear()

    return client, server


def loopback_fixture(
    models: Union[Mapping[str, Any], Callable[[], Mapping[str, Any]]],
    *,
    scope: str = "module",
    api_key: Optional[str] = "loopback-test-key",
    repo_ids: Iterable[str] = (TINY_REPO_ID,),
    compress: Optional[bool] = None,
    remote_logging: Optional[bool] = None,
    **options: Any,
) -> Any:
    """A pytest fixture yielding a started `LoopbackNDIF` with nnsight's client
    pointed at it (`client_config`), stopped and restored afterwards.

    ``models`` is the server's ``{key: model_or_factory}`` (or a callable
    returning it, evaluated when the fixture is first set up); ``options`` go to
    `LoopbackNDIF`. Assign the result to a module-level name: that name is the
    fixture. Every wait is bounded server-side (``execution_timeout``,
    ``session_timeout``), so a misbehaving request fails instead of hanging.
    """

    @pytest.fixture(scope=scope)
    def _loopback() -> Any:
        server = LoopbackNDIF(models() if callable(models) else models, **options)
        with server, client_config(
            server.host, api_key, compress=compress, remote_logging=remote_logging,
            repo_ids=repo_ids,
        ):
            yield server

    return _loopback
