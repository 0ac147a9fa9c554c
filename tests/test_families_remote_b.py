"""Issue-14 families (famB) through nnsight's real client and the loopback NDIF server: remote == local.

One module-scoped server holds GPT-J, Falcon (Falcon-7B's multi-query layout and the new decoder
architecture) and Phi-3 (and the first families that tests/test_remote.py does not serve: GPT-NeoX,
Mistral, Qwen2, Gemma, Gemma-2), each built as NDIF hosts it (no nnattr aliases, sdpa attention, frozen
parameters), except that Falcon is served eager: transformers cannot switch it at run time (it does
not follow the attention interface), so a server holding it as sdpa refuses an eager client's
request with that reason (nnsight's check), and one holding it eager serves every recipe. DLA by
component and the logit lens are one request each for the whole left-padded
batch and must equal the local run to 1e-6; on Falcon, exact activation patching of the MLP write
too (its cached clean write must not see the in-place add of attention, on the server either).
"""

from __future__ import annotations

import functools

import nnsight
import pytest

pytest.importorskip(
    "ndif.services.ray.deployments.modeling.nns",
    reason="needs the ndif server core: pip install --no-deps --ignore-requires-python ndif==0.1.2",
)

from nnattr import remote  # noqa: E402
from nnattr.recipes import activation_patching, direct_logit_attribution, logit_lens  # noqa: E402
from tests.support import fixtures, ndif_loopback, tiny  # noqa: E402
from tests.test_remote import DISTRACTORS, PROMPTS, TARGETS, same  # noqa: E402

FAMILIES = ["gptj", "falcon", "falcon_new", "phi3", "gpt_neox", "mistral", "qwen2", "gemma", "gemma2"]  # + the first 7
REPOS = {arch: f"nnattr-test/tiny-{arch.replace('_', '-')}" for arch in FAMILIES}
KEY = "6f1c0d3e-8a8b-4f7e-9d55-1f0c2b3a4d5e"

CLIENTS, SERVERS = {}, {}
for _arch, _repo in REPOS.items():
    CLIENTS[_arch], SERVERS[_repo] = fixtures.client_and_server(tiny.hf_model(_arch), _arch, _repo)


def _served_eager(arch: str, repo: str):
    """The server's Falcon: a plain nnsight model over eager attention, the client's weights."""
    served = tiny.hf_model(arch)
    served.load_state_dict(CLIENTS[arch]._module.state_dict())
    served.name_or_path = repo
    return nnsight.TransformersModel(served, tokenizer=tiny.tokenizer())


for _arch in ("falcon", "falcon_new"):
    SERVERS[REPOS[_arch]] = functools.partial(_served_eager, _arch, REPOS[_arch])

_server = fixtures.loopback_fixture(SERVERS, api_key=KEY, repo_ids=list(REPOS.values()), api_keys={KEY},
                                    remote_logging=False)
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def ndif(_server):
    with ndif_loopback.offline_repo_ids(*REPOS.values()):
        remote._CHECKED.clear()
        yield _server
    remote._CHECKED.clear()


def one_request(ndif, recipe, model, *args, **kwargs):
    local = recipe.run(model, *args, **kwargs)
    before = len(ndif.requests)
    result = recipe.run(model, *args, remote=True, **kwargs)
    assert len(ndif.requests) == before + 1 and ndif.last.status == "COMPLETED"
    if isinstance(result, dict):
        for key in result:
            same(result[key], local[key])
    else:
        same(result, local)
    return result


@pytest.mark.parametrize("arch", FAMILIES)
def test_dla_and_logit_lens_on_ndif_equal_local(ndif, arch):
    model = CLIENTS[arch]
    result = one_request(ndif, direct_logit_attribution, model, PROMPTS, TARGETS, DISTRACTORS)
    assert result.labels["component"][-1] == "bias" and result.meta["sum_error"] < 1e-4
    one_request(ndif, logit_lens, model, PROMPTS, positions="all", k=3)
    assert not any(p.requires_grad for p in ndif.model(REPOS[arch])._module.parameters())


@pytest.mark.filterwarnings("ignore:pairs")  # recovery of random tiny models: compared as numbers
def test_falcon_mlp_patching_on_ndif_equals_local(ndif):
    clean, corrupted = tiny.prompts(2, lengths=(5,)), tiny.prompts(2, seed=3, lengths=(5,))
    one_request(ndif, activation_patching, CLIENTS["falcon"], clean, corrupted, TARGETS[:2], DISTRACTORS[:2],
                nodes=("mlp_pos",))
