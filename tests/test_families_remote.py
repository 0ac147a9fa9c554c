"""Every family beyond tests/test_remote.py's two, through nnsight's real client and the loopback
NDIF server: remote == local.

One module-scoped server holds every family's tiny model, built as NDIF hosts it (no nnattr
aliases, sdpa attention where the family has it, frozen parameters), except Falcon, which is
served eager: transformers cannot switch it at run time (it does not follow the attention
interface), so a server holding it as sdpa refuses an eager client's request with that reason
(nnsight's check). Each recipe run is one request for the whole left-padded batch and must equal
the local run to 1e-6. The MoE families also run the per-expert split, whose trace calls the
model's own experts module on the server; GPT-OSS runs rollout (its attention sinks); Falcon runs
exact patching of the MLP write (its cached clean write must not see attention's in-place add).
"""

from __future__ import annotations

import functools

import nnsight
import pytest

pytest.importorskip(
    "ndif.services.ray.deployments.modeling.nns",
    reason="needs the ndif server core: pip install --no-deps --ignore-requires-python ndif==0.1.2",
)

import nnattr  # noqa: E402
from nnattr import remote  # noqa: E402
from nnattr.recipes import (  # noqa: E402
    activation_patching, attention_rollout, attribution_patching, direct_logit_attribution, edge_attribution_patching,
    expert_attribution, logit_lens)
from tests.support import fixtures, ndif_loopback, tiny  # noqa: E402
from tests.test_falcon_rw import falcon_rw  # noqa: E402
from tests.test_remote import DISTRACTORS, PROMPTS, TARGETS, same  # noqa: E402

FAMILIES = ["gpt_neox", "mistral", "qwen2", "gemma", "gemma2",  # the first seven but GPT-2 and Llama
            "qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "olmo2", "olmo3", "gemma3_text", "gpt_oss",
            "gptj", "falcon", "falcon_new", "phi3", "opt"]
MOE = ["qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss"]
EAGER = ["falcon", "falcon_new"]  # served eager (see above)
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


for _arch in EAGER:
    SERVERS[REPOS[_arch]] = functools.partial(_served_eager, _arch, REPOS[_arch])


def _falcon_rw():
    """Falcon-RW (ALiBi) runs with sdpa only (tests/test_falcon_rw.py): client and server both hold it so."""
    hf = falcon_rw("sdpa")  # seeded: the same weights each time
    hf.name_or_path = REPOS["falcon_rw"]
    return hf


REPOS["falcon_rw"] = "nnattr-test/tiny-falcon-rw"
CLIENTS["falcon_rw"] = nnattr.load(_falcon_rw(), tiny.tokenizer(), attn_implementation="sdpa")
SERVERS[REPOS["falcon_rw"]] = lambda: nnsight.TransformersModel(_falcon_rw(), tokenizer=tiny.tokenizer())

_server = fixtures.loopback_fixture(SERVERS, api_key=KEY, repo_ids=list(REPOS.values()), api_keys={KEY},
                                    remote_logging=False)
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def ndif(_server):
    with ndif_loopback.offline_repo_ids(*REPOS.values()):
        remote._CHECKED.clear()
        yield _server
    remote._CHECKED.clear()


def one_request(ndif, recipe, model, *args, tol=1e-6, **kwargs):
    local = recipe.run(model, *args, **kwargs)
    before = len(ndif.requests)
    result = recipe.run(model, *args, remote=True, **kwargs)
    assert len(ndif.requests) == before + 1 and ndif.last.status == "COMPLETED"
    for key in result if isinstance(result, dict) else [None]:
        same(result[key] if key else result, local[key] if key else local, tol=tol)
    return result


@pytest.mark.parametrize("arch", FAMILIES)
def test_dla_and_logit_lens_on_ndif_equal_local(ndif, arch):
    model = CLIENTS[arch]
    result = one_request(ndif, direct_logit_attribution, model, PROMPTS, TARGETS, DISTRACTORS)
    assert result.labels["component"][-1] == "bias" and result.meta["sum_error"] < 1e-4
    one_request(ndif, logit_lens, model, PROMPTS, positions="all", k=3)
    assert ndif.last.env["attn_implementation"] == "eager"  # switched from sdpa where the server had it
    assert not any(p.requires_grad for p in ndif.model(REPOS[arch])._module.parameters())


@pytest.mark.parametrize("arch", MOE)
def test_expert_split_on_ndif_equals_local(ndif, arch):
    result = one_request(ndif, expert_attribution, CLIENTS[arch], PROMPTS, TARGETS, DISTRACTORS, position=-2)
    assert result.meta["n_experts"] == 4


def test_rollout_with_attention_sinks_on_ndif_equals_local(ndif):
    result = one_request(ndif, attention_rollout, CLIENTS["gpt_oss"], PROMPTS)
    assert "attention_sinks" in result.meta


def test_falcon_rw_with_sdpa_on_ndif_equals_local(ndif):
    model = CLIENTS["falcon_rw"]
    one_request(ndif, direct_logit_attribution, model, PROMPTS, TARGETS, DISTRACTORS, by="head")
    one_request(ndif, logit_lens, model, PROMPTS, positions="all", k=3)
    assert ndif.last.env["attn_implementation"] == "sdpa"  # the eager path is refused (ALiBi twice)


@pytest.mark.filterwarnings("ignore:pairs")  # recovery of random tiny models: compared as numbers
def test_falcon_mlp_patching_on_ndif_equals_local(ndif):
    clean, corrupted = tiny.prompts(2, lengths=(5,)), tiny.prompts(2, seed=3, lengths=(5,))
    one_request(ndif, activation_patching, CLIENTS["falcon"], clean, corrupted, TARGETS[:2], DISTRACTORS[:2],
                nodes=("mlp_pos",))


@pytest.mark.filterwarnings("ignore:pairs")
@pytest.mark.parametrize("arch", ["opt", "falcon", "falcon_new", "gptj", "olmo2", "qwen2_moe"])
def test_patching_recipes_on_ndif_equal_local(ndif, arch):
    """The recipes where a family's layout matters most on the server: OPT's flattened MLP write in the gradient
    recipes, Falcon's in-place add and its tuple blocks (skipped by activation patching), parallel blocks, a norm
    after attention, a shared expert: attribution patching (IG), activation patching restarted past layer 0, and
    edge attribution patching, each in one request."""
    clean, corrupted = tiny.prompts(2, lengths=(5,)), tiny.prompts(2, seed=3, lengths=(5,))
    pairs = (clean, corrupted, TARGETS[:2], DISTRACTORS[:2])
    one_request(ndif, attribution_patching, CLIENTS[arch], *pairs, method="ig", steps=2)
    one_request(ndif, activation_patching, CLIENTS[arch], *pairs, nodes=("resid", "mlp"), rows=3,  # 4 forwards
                tol=1e-4)  # recovered fractions: a float32 difference over a small gap
    one_request(ndif, edge_attribution_patching, CLIENTS[arch], *pairs)
