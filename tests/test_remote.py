"""Every recipe through nnsight's real client against the loopback NDIF server, and the remote helpers.

The server (`tests/support/ndif_loopback.py`) runs NDIF's own execution core against a separate,
frozen model instance built from the same weights, without nnattr's aliases (as NDIF hosts it),
with sdpa attention (the request switches it to the client's eager), API keys on, nnattr not
installed (`server_packages`) and the older server's import whitelist emulated. Models: the tiny
GPT-2 and a Llama with grouped kv heads from `tests/support/tiny.py`, float32.
"""

from __future__ import annotations

import io
import socket
import time

import nnsight
import pytest
import torch
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

pytest.importorskip(
    "ndif.services.ray.deployments.modeling.nns",
    reason="needs the ndif server core: pip install --no-deps --ignore-requires-python ndif==0.1.2",
)

import nnattr
from nnattr import remote
from nnattr.kernels import first
from nnattr.recipes import attention_rollout, attention_views, direct_logit_attribution, head_attribution, logit_lens
from nnattr.recipes import attention_summary
from nnattr.features import SAE
from nnattr.recipes import feature_attribution
from nnattr.recipes import token_attribution
from nnattr.lens import TunedLens  # a random tuned lens for both tiny models (2 layers, d_model 32)
from nnattr.recipes import token_circulation
try:
    from tests.support import fixtures, ndif_loopback, tiny
except ModuleNotFoundError:  # plain `pytest` without `pythonpath = ["."]`
    from support import fixtures, ndif_loopback, tiny

loopback_fixture, LoopbackNDIF = fixtures.loopback_fixture, ndif_loopback.LoopbackNDIF
client_config, offline_repo_ids = ndif_loopback.client_config, ndif_loopback.offline_repo_ids
OLD_SERVER_IMPORT_WHITELIST = ndif_loopback.OLD_SERVER_IMPORT_WHITELIST

pytestmark = [pytest.mark.timeout(60),  # few IG steps on purpose: parity, not completeness
              pytest.mark.filterwarnings("ignore::nnattr.result.CompletenessWarning")]

KEY = "6f1c0d3e-8a8b-4f7e-9d55-1f0c2b3a4d5e"  # a well-formed key the server accepts
REPOS = {"gpt2": "nnattr-test/tiny-gpt2", "llama": "nnattr-test/tiny-llama-gqa"}
NOT_HOSTED = "nnattr-test/not-hosted"
PROMPTS = tiny.prompts(3)  # 5, 7 and 4 tokens: a left-padded batch
TARGETS, DISTRACTORS = ["w5", "w17", "w42"], ["w9", "w3", "w60"]


def pair(arch: str, repo_id: str):
    """The client's nnattr model and a factory for the server's (`fixtures.client_and_server`)."""
    return fixtures.client_and_server(tiny.hf_model(arch), arch, repo_id)


CLIENTS, SERVERS = {}, {}
for _arch, _repo in REPOS.items():
    CLIENTS[_arch], SERVERS[_repo] = pair(_arch, _repo)

_server = loopback_fixture(SERVERS, api_key=KEY, repo_ids=[*REPOS.values(), NOT_HOSTED], api_keys={KEY},
                           import_whitelist=OLD_SERVER_IMPORT_WHITELIST, remote_logging=False)


@pytest.fixture(scope="module")
def ndif(_server):
    with offline_repo_ids(*REPOS.values(), NOT_HOSTED):
        remote._CHECKED.clear()
        yield _server
    remote._CHECKED.clear()


def same(a, b, tol=1e-6):
    """Two results are equal: values within ``tol`` (NaN padding in the same places), the rest exactly."""
    assert (a.dims, dict(a.labels), a.tokens) == (b.dims, dict(b.labels), b.tokens)
    assert (a.method, a.title, a.by, a.units, a.metric, a.meta) == (b.method, b.title, b.by, b.units, b.metric, b.meta)
    torch.testing.assert_close(a.values, b.values, atol=tol, rtol=0, equal_nan=True)
    assert a.per_prompt.keys() == b.per_prompt.keys()
    for key in a.per_prompt:
        x, y = a.per_prompt[key], b.per_prompt[key]
        if key in ("top_probs", "logit", "metric", "clean_metric", "corrupted_metric"):  # floats, nested and ragged
            torch.testing.assert_close(torch.tensor(_flat(x)), torch.tensor(_flat(y)), atol=tol, rtol=0)
        else:
            assert x == y, key


def _flat(x):
    return [v for item in x for v in _flat(item)] if isinstance(x, (list, tuple)) else [x]


_g = torch.Generator().manual_seed(7)  # random SAEs for d_model 32: attn_out of layer 0, a TopK at resid_pre of 1
FEATURE_SAES = [SAE(W_enc=torch.randn(32, 16, generator=_g) / 6, b_enc=torch.randn(16, generator=_g) / 10,
                    W_dec=torch.randn(16, 32, generator=_g) / 3, b_dec=torch.randn(32, generator=_g) / 10, layer=layer,
                    site=site, activation=activation, k=k) for layer, site, activation, k in
                [(0, "attn_out", "relu", None), (1, "resid_pre", "topk", 8)]]


RECIPES = {
    **{f"dla-{by}": (direct_logit_attribution, dict(by=by)) for by in ("component", "layer", "head", "head_position")},
    "dla-pair": (direct_logit_attribution, dict(target=TARGETS, distractor=DISTRACTORS, by="head")),
    "dla-all-at": (direct_logit_attribution,
                   dict(target=TARGETS, distractor=DISTRACTORS, by="all", position=[2, -3, 0])),
    "dla-sources-at": (direct_logit_attribution, dict(by="head_position", position=-2)),
    "dla-head-position-layers": (direct_logit_attribution, dict(by="head_position", layers=[-1])),  # 1 MB rule
    "heads-layers": (head_attribution, dict(by="head_position", layers=[1], target=TARGETS, position=-2)),
    "heads-at": (head_attribution, dict(by="head_position", target=TARGETS, position=[1, 4, -2])),
    "lens-at": (logit_lens, dict(position=[2, -3, 0], k=3)),
    **{f"heads-{by}": (head_attribution, dict(by=by, target=TARGETS, distractor=DISTRACTORS))
       for by in ("head", "head_position")},
    "lens-last": (logit_lens, dict(target=TARGETS)),
    "lens-all": (logit_lens, dict(positions="all", k=3)),
    **{f"rollout-{view}": (attention_rollout, dict(view=view)) for view in ("rollout", "value_weighted", "flow")},
    **{f"views-{view}": (attention_views, dict(view=view, layers=[-1], heads=[1, 3]))
       for view in ("patterns", "value_weighted", "norm_based", "flow")},
    "summary-last": (attention_summary, {}),
    "summary-all": (attention_summary, dict(layer_idx="all", residual=0.3)),
    "features-dla": (feature_attribution, dict(sae=FEATURE_SAES, top_k=5, target=TARGETS, distractor=DISTRACTORS)),
    "features-dla-at": (feature_attribution, dict(sae=FEATURE_SAES[1], top_k=None, position=[2, -3, 0])),
    "tokens-ig": (token_attribution, dict(target=TARGETS, distractor=DISTRACTORS, steps=3, baseline="pad",
                                          position=[2, -1, 1])),
    "tokens-ig-zero": (token_attribution, dict(steps=2)),
    "tokens-grad": (token_attribution, dict(method="grad_x_input", target=TARGETS)),
    "tokens-attention": (token_attribution, dict(method="attention", distractor=DISTRACTORS, position=-2)),
    "lens-tuned": (logit_lens, dict(positions="all", k=3, lens=TunedLens(
        torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(9)) / 8,
        torch.randn(2, 32, generator=torch.Generator().manual_seed(10)) / 8, source="random"))),
    "circulation": (token_circulation, {}),
    "circulation-1layer-pair": (token_circulation, dict(target=TARGETS, distractor=DISTRACTORS, n_layers=1)),
}


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("arch", REPOS)
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_on_ndif_equals_local(ndif, arch, name):
    recipe, kwargs = RECIPES[name]
    model = CLIENTS[arch]
    local = recipe.run(model, PROMPTS, **kwargs)
    before = len(ndif.requests)
    result = recipe.run(model, PROMPTS, remote=True, **kwargs)

    same(result, local)
    assert len(ndif.requests) == before + 1  # all prompts in one request
    record = ndif.last
    assert record.status == "COMPLETED" and record.result_route == "inline"
    assert record.env["attn_implementation"] == "eager"  # the server switched from sdpa
    assert not any(p.requires_grad for p in ndif.model(REPOS[arch])._module.parameters())


def test_chunks_are_one_request_each_and_equal_one_batch(ndif):
    model = CLIENTS["llama"]
    whole = head_attribution.run(model, PROMPTS, remote=True)
    before = len(ndif.requests)
    chunked = head_attribution.run(model, PROMPTS, remote=True, batch_size=2)
    assert len(ndif.requests) == before + 2
    same(chunked, whole)


def _chunks_in_one_session(model, batches, remote):
    # The pattern docs/remote.md gives multi-pass recipes: every chunk a trace of one session.
    with model.session(remote=remote):
        outs = []
        for prompts in batches:
            with model.trace(prompts):
                outs.append(first(model.layers[1].output)[:, -1].norm(dim=-1).cpu())
        outs = nnsight.save(outs)
    return outs


def test_chunks_as_traces_of_one_session_are_one_request(ndif):
    model = CLIENTS["llama"]
    batches = [PROMPTS[:2], PROMPTS[2:]]
    local = _chunks_in_one_session(model, batches, remote=False)
    before = len(ndif.requests)
    with remote.errors(model):
        remote.prepare(model)
        outs = _chunks_in_one_session(model, batches, remote=True)
    assert len(ndif.requests) == before + 1
    for a, b in zip(outs, local):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_a_given_backend_runs_remote_too(ndif):
    model = CLIENTS["gpt2"]
    backend = RemoteBackend(model.to_model_key(), host=ndif.host)
    before = len(ndif.requests)
    result = logit_lens.run(model, PROMPTS, backend=backend)
    assert len(ndif.requests) == before + 1
    same(result, logit_lens.run(model, PROMPTS))


def test_bf16_server_returns_float32_scores_that_add_up():
    # NDIF serves bf16 and autocasts request code to it; the kernels turn autocast off, so scores
    # are float32. The model's own arithmetic is bf16 (its residual stream, its logit), so the sum
    # misses the logit by bf16 rounding: measured, reported in meta, and warned about.
    from nnattr.result import PrecisionWarning

    repo = "nnattr-test/tiny-llama-bf16"
    model, factory = pair("llama", repo)
    with LoopbackNDIF({repo: factory}, dtype=torch.bfloat16) as server, offline_repo_ids(repo), \
            client_config(server.host, KEY, repo_ids=[repo], remote_logging=False):
        with pytest.warns(PrecisionWarning, match="miss the model's own value"):
            result = direct_logit_attribution.run(model, PROMPTS, TARGETS, remote=True)
    logit = torch.tensor(result.per_prompt["logit"])
    assert result.values.dtype == torch.float32
    gap = (result.values.double().sum(-1) - logit.double()).abs()
    assert result.per_prompt["sum_error"] == pytest.approx(gap.tolist(), abs=1e-6)
    assert result.meta["sum_error"] == max(result.per_prompt["sum_error"])
    torch.testing.assert_close(result.values.sum(-1), logit, atol=1e-2, rtol=2 ** -7)  # bf16's own rounding
    local = direct_logit_attribution.run(model, PROMPTS, TARGETS)
    torch.testing.assert_close(result.values, local.values, atol=0.05, rtol=0.05)  # bf16 weights, same model


# ----------------------------------------------------------------------------- what crosses the wire


def _modules_in(blob: bytes, model) -> set[str]:
    """Every module the request makes the server import: classes and functions found by
    reference, modules by reference (``subimport``) and modules shipped by value
    (``dynamic_subimport``), recorded while unpickling it the way the server does."""
    import zstandard
    from cloudpickle import cloudpickle as cp
    from nnsight.intervention.serialization import CustomCloudUnpickler

    seen: set[str] = set()

    def subimport(name):
        seen.add(name)
        return cp.subimport(name)

    def dynamic_subimport(name, variables):
        seen.add(name)
        return cp.dynamic_subimport(name, variables)

    class Recording(CustomCloudUnpickler):
        def find_class(self, module, name):
            seen.add(module)
            found = super().find_class(module, name)
            return {cp.subimport: subimport, cp.dynamic_subimport: dynamic_subimport}.get(found, found)

    raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 28)
    Recording(io.BytesIO(raw), model._remoteable_persistent_objects()).load()
    return seen


# Unpickling machinery the server allows while it deserializes (not available to request code).
DESERIALIZATION = {"builtins", "copyreg", "pickle", "cloudpickle", "_operator"}


@pytest.mark.parametrize("name", RECIPES)
def test_request_imports_only_what_the_restricted_server_allows(ndif, name):
    recipe, kwargs = RECIPES[name]
    model = CLIENTS["llama"]
    recipe.run(model, PROMPTS, remote=True, **kwargs)  # would raise under the emulated whitelist
    modules = _modules_in(ndif.last.request_bytes, model)
    roots = {m.split(".")[0] for m in modules}
    assert roots <= remote.SERVER_IMPORTS | DESERIALIZATION | {"nnsight"}, roots
    assert "torch" in roots and not any(m.startswith("nnattr") for m in modules)
    assert ndif.last.request_size < 16_000  # kernels travel as source, only the ones the block calls


def test_scores_come_back_not_activations(ndif):
    model = CLIENTS["llama"]
    d = nnattr.dims(model)
    direct_logit_attribution.run(model, PROMPTS, by="head", remote=True)
    assert ndif.last.result_size < 2_000
    attention_rollout.run(model, PROMPTS, remote=True)
    # One [query, key] map per prompt: 3 x 7 x 7 floats, not per-layer, per-head patterns.
    assert ndif.last.result_size < 4 * 3 * 7 * 7 + 1_500 < 4 * d.n_layers * d.n_heads * 3 * 7 * 7
    attention_views.run(model, PROMPTS, layers=[0], heads=[1], remote=True)  # only what was asked comes back
    assert ndif.last.result_size < 4 * 3 * 7 * 7 + 1_500


# ----------------------------------------------------------------------------- preflight


def test_no_api_key_fails_before_anything_is_sent(ndif, monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    before = len(ndif.requests)
    with client_config(ndif.host, None, repo_ids=REPOS.values()), pytest.raises(remote.NDIFError) as caught:
        direct_logit_attribution.run(CLIENTS["gpt2"], PROMPTS, remote=True)
    assert caught.value.kind == "api_key" and len(ndif.requests) == before
    assert "NDIF_API_KEY" in str(caught.value) and "nnsight login" in str(caught.value)


def test_api_key_set_after_import_is_used(ndif, monkeypatch):
    with client_config(ndif.host, None, repo_ids=REPOS.values()):
        monkeypatch.setenv("NDIF_API_KEY", KEY)  # too late for nnsight, which read it at import
        result = logit_lens.run(CLIENTS["gpt2"], PROMPTS, remote=True)
    assert ndif.last.api_key == KEY and result.values.shape[0] == 3


def test_model_not_hosted_fails_before_anything_is_sent(ndif):
    model, _ = pair("gpt2", NOT_HOSTED)
    before = len(ndif.requests)
    with pytest.raises(remote.NDIFError, match=f"'{NOT_HOSTED}' is not running on NDIF") as caught:
        logit_lens.run(model, PROMPTS, remote=True)
    assert caught.value.kind == "not_hosted" and len(ndif.requests) == before
    assert "nnsight.status()" in str(caught.value)


def test_unreachable_host_fails_before_anything_is_sent():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with client_config(f"http://127.0.0.1:{port}", KEY, repo_ids=REPOS.values()):
        with pytest.raises(remote.NDIFError, match="Cannot reach NDIF at http://127.0.0.1") as caught:
            logit_lens.run(CLIENTS["gpt2"], PROMPTS, remote=True)
    assert caught.value.kind == "unreachable"


def test_preflight_runs_once_per_model(ndif, monkeypatch):
    calls = []
    running = nnsight.is_model_running
    monkeypatch.setattr(nnsight, "is_model_running", lambda *a, **k: calls.append(a) or running(*a, **k))
    remote._CHECKED.clear()
    for _ in range(2):
        logit_lens.run(CLIENTS["gpt2"], PROMPTS, remote=True, batch_size=2)
    assert calls == [(REPOS["gpt2"],)]


def test_version_skew_warns(ndif, monkeypatch):
    import nnsight.ndif

    env = nnsight.ndif.get_remote_env()
    skewed = {**env, "packages": {**env["packages"], "torch": "0.0.1", "transformers": "0.0.2"}}
    monkeypatch.setattr(nnsight.ndif, "_REMOTE_ENV", skewed)
    remote._CHECKED.clear()
    with pytest.warns(remote.NDIFVersionWarning, match=r"torch .* here, 0\.0\.1 on NDIF") as caught:
        remote.prepare(CLIENTS["gpt2"])
    assert "pip install 'torch==0.0.1' 'transformers==0.0.2'" in str(caught[0].message)


# ----------------------------------------------------------------------------- errors


def test_gradients_refused(ndif):
    with ndif.configure(refuse_gradients=True), pytest.raises(remote.NDIFError) as caught:
        head_attribution.run(CLIENTS["gpt2"], PROMPTS, remote=True)
    assert caught.value.kind == "gradients" and "direct_logit_attribution" in str(caught.value)
    assert "inference_mode" in caught.value.server_message


def test_out_of_memory_names_a_smaller_batch(ndif):
    with ndif.configure(simulate_oom=True), pytest.raises(remote.NDIFError, match="batch_size=1") as caught:
        direct_logit_attribution.run(CLIENTS["llama"], PROMPTS, remote=True, batch_size=2)
    assert caught.value.kind == "oom"


def test_whitelist_refusal(ndif):
    def body():
        import json

        nnsight.save(json.dumps([1]))

    model = CLIENTS["gpt2"]
    with pytest.raises(remote.NDIFError, match="refused module 'json'") as caught:
        with remote.errors(model):
            with model.trace(PROMPTS[0], remote=True):
                body()
    assert caught.value.kind == "whitelist"


def test_module_not_on_the_server(ndif):
    import iniconfig  # installed here with pytest, not on NDIF

    model = CLIENTS["gpt2"]
    with pytest.raises(remote.NDIFError, match=r"nnsight.register\(iniconfig\)") as caught:
        with remote.errors(model):
            with model.trace(PROMPTS[0], remote=True):
                nnsight.save(iniconfig.__name__)
    assert caught.value.kind == "module_missing"


def test_not_hosted_reported_by_the_server(ndif):
    model = CLIENTS["gpt2"]
    backend = RemoteBackend(model.to_model_key().replace(REPOS["gpt2"], NOT_HOSTED), host=ndif.host)
    with pytest.raises(remote.NDIFError, match="is not hosted on NDIF") as caught:
        with remote.errors(model):
            with model.trace(PROMPTS[0], backend=backend):
                model.output.logits.save()
    assert caught.value.kind == "not_hosted"


def test_client_too_old(ndif):
    with ndif.configure(min_nnsight_version="99.0"), pytest.raises(remote.NDIFError) as caught:
        logit_lens.run(CLIENTS["gpt2"], PROMPTS, remote=True)
    assert caught.value.kind == "old_client" and "pip install --upgrade nnsight" in str(caught.value)


def test_expired_download_link(ndif):
    with ndif.configure(force_download=True, result_url_status=403), pytest.raises(remote.NDIFError) as caught:
        logit_lens.run(CLIENTS["gpt2"], PROMPTS, remote=True)
    assert caught.value.kind == "expired"


def test_error_in_trace_code_keeps_the_server_traceback(ndif):
    model = CLIENTS["gpt2"]  # a block ships every object it names: not the dict holding both models
    with pytest.raises(remote.NDIFError, match="IndexError") as caught:
        with remote.errors(model):
            with model.trace(PROMPTS[0], remote=True):
                model.layers[0].output[0, 99].save()
    assert caught.value.kind == "server_code" and "Server traceback" in str(caught.value)


@pytest.mark.parametrize("text, kind, fix", [
    ("Your job exceeded the execution timeout of 3600.0s.", "timeout", "batch_size"),
    ("Traceback (most recent call last):\n  ...\nnnsight.intervention.interleaver.OutOfOrderError: "
     "'model.model.layers.1.self_attn.o_proj.input.grad' was requested but the model already ran past it",
     "gradients", "forward-only recipe"),
    ("Traceback (most recent call last):\n  ...\nnnsight.tracing.tracer.WithBlockNotFoundError: nnsight found no `with` "
     "statement at /home/me/my_patching.py:42, the line the trace was entered from", "stale_source", "fresh server"),
    ("Traceback (most recent call last):\n  ...\nRuntimeError: the metric does not require grad: this process runs the "
     "trace under torch.inference_mode, so gradients are unavailable here", "gradients", "forward-only recipe"),
    ("Traceback (most recent call last):\n  ...\nRuntimeError: the metric does not require grad: the trace started no "
     "graph: frozen (hosted) parameters never require grad", "frozen", "requires_grad_"),
    ("The model architecture on this server doesn't match the one your code was traced against: it has no "
     "module at 'model.layers.0.mlp.gate'.", "architecture", "transformers"),
])
def test_server_texts_become_fixes(text, kind, fix):
    error = remote.translate(RemoteError(text), host="https://api.ndif.us")
    assert error.kind == kind and fix in str(error)


def test_dropped_socket_and_unknown_errors():
    from pydantic import BaseModel

    class M(BaseModel):
        x: int

    try:
        M.model_validate_json("")
    except Exception as error:  # what the client raises when the server drops the socket
        assert remote.translate(error).kind == "dropped"
    assert remote.translate(ValueError("local bug")) is None


# ----------------------------------------------------------------------------- the key stays secret


@pytest.mark.parametrize("key", ["not-a-uuid-SECRET-0123", "00000000-1111-2222-3333-444444444444"])
def test_rejected_api_key_never_shows(ndif, key, capsys):
    with client_config(ndif.host, key, repo_ids=REPOS.values()), pytest.raises(remote.NDIFError) as caught:
        logit_lens.run(CLIENTS["gpt2"], PROMPTS, remote=True)
    error = caught.value
    assert error.kind == "api_key"
    shown = [str(error), repr(error), error.server_message, str(error.__context__), str(error.__cause__),
             *capsys.readouterr()]
    assert not any(key in text for text in shown)


def test_api_key_is_not_in_requests_results_or_logs(ndif, capsys):
    result = head_attribution.run(CLIENTS["llama"], PROMPTS, remote=True)
    record = ndif.last
    import zstandard

    wire = zstandard.ZstdDecompressor().decompress(record.request_bytes, max_output_size=1 << 28) + \
        zstandard.ZstdDecompressor().decompress(record.result_bytes, max_output_size=1 << 28)
    assert KEY.encode() not in wire and record.headers["ndif-api-key"] == KEY  # header only
    texts = [repr(result), result.to_json(), *record.logs, *record.descriptions, *capsys.readouterr()]
    assert not any(KEY in t for t in texts)


# ----------------------------------------------------------------------------- non-blocking jobs


def test_submit_then_collect_gives_the_same_result(ndif):
    model = CLIENTS["llama"]
    blocking = direct_logit_attribution.run(model, PROMPTS, TARGETS, by="head", remote=True, batch_size=2)
    before = len(ndif.requests)
    with ndif.configure(queue_delay=0.3):  # jobs wait while the client is still submitting
        job = remote.submit(direct_logit_attribution, model, PROMPTS, TARGETS, by="head", batch_size=2)
        assert len(job.ids) == 2 and len(ndif.requests) == before + 2
        assert all(not r.blocking for r in ndif.requests[before:])
        assert job.status() in ("RECEIVED", "QUEUED", "DISPATCHED", "RUNNING")
        result = job.result(timeout=30, poll_interval=0.05)
    same(result, blocking)
    assert job.status() == "COMPLETED" and job.done()
    assert len(ndif.requests) == before + 2  # collecting sent no trace
    assert KEY not in repr(job)


def test_collecting_with_no_time_left_looks_once(ndif):
    model = CLIENTS["llama"]
    job = remote.submit(direct_logit_attribution, model, PROMPTS, TARGETS)
    with pytest.raises(ValueError, match=r"timeout=-1: give the seconds to wait \(0: look once\)"):
        job.result(timeout=-1)
    deadline = time.monotonic() + 30
    while job.status() != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.05)
    same(job.result(timeout=0), direct_logit_attribution.run(model, PROMPTS, TARGETS))  # finished: fetched, not "pending"


def test_a_misspelt_timeout_variable_is_named(monkeypatch):
    monkeypatch.setenv("NNATTR_NDIF_TIMEOUT_JOBS", "60")
    with pytest.warns(RuntimeWarning, match="NNATTR_NDIF_TIMEOUT_JOBS names no wait.*NNATTR_NDIF_TIMEOUT_JOB"):
        assert remote.current_timeouts().job is None


def test_submitted_job_that_fails_raises_on_collect(ndif):
    with ndif.configure(refuse_gradients=True, queue_delay=0.1):
        job = remote.submit(head_attribution, CLIENTS["gpt2"], PROMPTS)
        with pytest.raises(remote.NDIFError) as caught:
            job.result(timeout=30, poll_interval=0.05)
    assert caught.value.kind == "gradients" and job.status() == "ERROR"


def test_job_result_times_out(ndif):
    with ndif.configure(queue_delay=1.0):
        job = remote.submit(logit_lens, CLIENTS["gpt2"], PROMPTS)
        started = time.monotonic()
        with pytest.raises(remote.NDIFError, match="not finished") as caught:
            job.result(timeout=0.2, poll_interval=0.05)
        assert caught.value.kind == "pending" and time.monotonic() - started < 1.0
        assert job.result(timeout=30, poll_interval=0.05).values.shape[0] == 3


def test_a_non_blocking_backend_is_refused_with_advice(ndif):
    model = CLIENTS["gpt2"]
    backend = RemoteBackend(model.to_model_key(), host=ndif.host, blocking=False)
    with pytest.raises(remote.NDIFError, match="nnattr.remote.submit"):
        logit_lens.run(model, PROMPTS, backend=backend)


# ----------------------------------------------------------------------------- command line


def test_cli_arguments():
    import argparse

    parser = argparse.ArgumentParser()
    remote.add_cli_arguments(parser)
    assert remote.remote_kwargs(parser.parse_args([])) == {}
    assert remote.remote_kwargs(parser.parse_args(["--remote"])) == {"remote": True}
    args = parser.parse_args(["--remote", "--ndif-host", "http://127.0.0.1:9"])
    assert remote.remote_kwargs(args) == {"remote": "http://127.0.0.1:9"}
    assert remote.is_remote(**remote.remote_kwargs(args)) and not remote.is_remote("local")


def test_zz_server_hit_no_internal_errors(ndif):
    assert ndif.internal_errors == []
    assert all(record.wait(10) for record in ndif.requests)


# ----------------------------------------------------------------------------- edited copies


CORRUPTED = [" ".join(p.split()[:-2] + ["w1", p.split()[-1]]) for p in PROMPTS]  # one word changed, same length
COPY_ARGS = {
    "logit_lens": dict(args=(PROMPTS,), kwargs=dict(positions="all", k=3)),
    "direct_logit_attribution": dict(args=(PROMPTS, TARGETS, DISTRACTORS),
                                     kwargs=dict(by="head_position", position=-2)),
    "head_attribution": dict(args=(PROMPTS, TARGETS, DISTRACTORS), kwargs={}),
    "attention_rollout": dict(args=(PROMPTS,), kwargs=dict(view="value_weighted")),
    "attention_views": dict(args=(PROMPTS,), kwargs=dict(view="norm_based", layers=[0, 1], heads=[2])),
    "attention_summary": dict(args=(PROMPTS,), kwargs=dict(layer_idx="all")),
    "attribution_patching": dict(args=(PROMPTS, CORRUPTED, TARGETS, DISTRACTORS), kwargs=dict(method="ig", steps=2)),
    "edge_attribution_patching": dict(args=(PROMPTS, CORRUPTED, TARGETS, DISTRACTORS),
                                      kwargs=dict(method="ig", steps=2)),
    "activation_patching": dict(args=(PROMPTS, CORRUPTED, TARGETS, DISTRACTORS), kwargs=dict(nodes=("attn", "head"), rows=4)),
    "feature_attribution": dict(args=(PROMPTS, TARGETS, DISTRACTORS), kwargs=dict(sae=FEATURE_SAES, top_k=4,
                                                                                  position=-2)),
    "feature_patching": dict(args=(PROMPTS, CORRUPTED, TARGETS, DISTRACTORS),
                             kwargs=dict(sae=FEATURE_SAES, top_k=4, per_position=True)),
    "token_attribution": dict(args=(PROMPTS, TARGETS, DISTRACTORS), kwargs=dict(steps=2, baseline="bos")),
    "token_circulation": dict(args=(PROMPTS, TARGETS, DISTRACTORS), kwargs=dict(n_layers=2)),
}
# What a user changes in a copy of the trace: a variable renamed, and an extra value saved.
EDITS = {
    "logit_lens": [("cells", "per_layer"),
                   ("            final = read_at(model.output.logits, at).float()  # [batch, vocab]\n",
                    "            final = read_at(model.output.logits, at).float()  # [batch, vocab]\n"
                    "            final_seen = nnsight.save(final)\n")],
    "direct_logit_attribution": [("writes", "residual_writes"),
                                 ("            scale = norm_scale(",
                                  "            scale_seen = nnsight.save(model.ln_f.weight)\n            scale = norm_scale(")],
    "head_attribution": [("grads", "gradients_of_z"), ("        metric = final.gather(", "        answer_seen = "
                                                       "nnsight.save(answer)\n        metric = final.gather(")],
    "attention_rollout": [("state", "running"),
                          ("                pattern = layer.attn.output[1]  # [batch, head, query, key]\n",
                           "                pattern = layer.attn.output[1]  # [batch, head, query, key]\n"
                           "                last_pattern = nnsight.save(pattern)\n")],
    "attention_views": [("wanted", "kept_heads"),
                        ("                pattern = layer.attn.output[1]  # [batch, head, query, key]\n",
                         "                pattern = layer.attn.output[1]  # [batch, head, query, key]\n"
                         "                raw_seen = nnsight.save(pattern)\n")],
    "attention_summary": [("state", "running"),
                          ("                pattern = model.layers[i].attn.output[1]  # [batch, head, query, key]\n",
                           "                pattern = model.layers[i].attn.output[1]  # [batch, head, query, key]\n"
                           "                pattern_seen = nnsight.save(pattern)\n")],
    "attribution_patching": [("base", "clean_acts"), ("            values = value(model.output.logits, max(steps, 1))  # [rows]\n",
                                                      "            values = value(model.output.logits, max(steps, 1))  # [rows]\n"
                                                      "            values_seen = nnsight.save(values.detach())\n")],
    "edge_attribution_patching": [
        ("stream", "read_streams"),
        ("            values = value(model.output.logits, max(steps, 1))  # [rows]\n",
         "            values = value(model.output.logits, max(steps, 1))  # [rows]\n"
         "            values_seen = nnsight.save(values.detach())\n")],
    "activation_patching": [("patches", "patches_by_layer"), ("                outs.append(value(model.output.logits, owners).cpu())\n",
                                                   "                outs.append(value(model.output.logits, owners).cpu())\n"
                                                   "                metric_seen = nnsight.save(outs[-1])\n")],
    "token_circulation": [("scales", "norm_scales"),
                          ("            u = residual_direction(",
                           "            unembed_seen = nnsight.save(model.lm_head.weight[:3])\n"
                           "            u = residual_direction(")],
    "token_attribution": [("grads", "path_grads"), ("        model.layers[0].input = path\n",
                                                   "        model.layers[0].input = path\n"
                                                   "        start_seen = nnsight.save(base.detach())\n")],
    "feature_attribution": [("constant", "bias_share"),
                            ("            resid = read_at(model.ln_f.input, at)  # [batch, d_model]\n",
                             "            resid = read_at(model.ln_f.input, at)  # [batch, d_model]\n"
                             "            resid_seen = nnsight.save(resid)\n")],
    "feature_patching": [("clean_metric", "clean_value"),
                         ("            values = value(model.output.logits)  # [pair]\n",
                          "            values = value(model.output.logits)  # [pair]\n"
                          "            values_seen = nnsight.save(values.detach())\n")],
}


def edited_copy(name: str, folder) -> object:
    """A copy of ``recipes/<name>.py`` as a user edits it, imported under another name: a comment and
    a blank line above every ``with``, gradient and save line of the trace, a variable renamed in the
    trace, and an extra ``nnsight.save``."""
    import importlib.util
    import re
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py").read_text()
    head, rest = source.split("def trace(", 1)
    body, tail = rest.split("\ndef run(", 1)
    (old, new), (anchor, extra) = EDITS[name]
    assert re.search(rf"\b{old}\b", body) and anchor in body, f"EDITS[{name!r}] no longer matches the recipe"
    body = re.sub(rf"\b{old}\b", new, body).replace(anchor, extra)
    lines = []
    for line in body.splitlines(keepends=True):
        stripped = line.lstrip()
        if stripped.startswith(("with ", "grads", "gradients_of_z", "out = nnsight.save", "outs = nnsight.save")):
            indent = line[: len(line) - len(stripped)]
            lines += [f"{indent}# a note the user added\n", "\n"]
        lines.append(line)
    path = Path(folder) / f"users_{name}.py"
    path.write_text(head + "def trace(" + "".join(lines) + "\ndef run(" + tail)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", COPY_ARGS)
def test_an_edited_copy_runs_on_ndif_and_equals_local(ndif, name, tmp_path):
    module = edited_copy(name, tmp_path)
    model, call = CLIENTS["llama"], COPY_ARGS[name]
    local = module.run(model, *call["args"], **call["kwargs"])
    before = len(ndif.requests)
    far = module.run(model, *call["args"], remote=True, **call["kwargs"])
    assert len(ndif.requests) == before + 1 and ndif.last.status == "COMPLETED"
    for key in (local if isinstance(local, dict) else {None: local}):
        same(far[key] if key else far, local[key] if key else local, tol=1e-5)


def test_a_kernel_called_through_its_module_is_refused_before_sending(ndif, tmp_path):
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "recipes" / "head_attribution.py").read_text()
    edited = source.replace("from nnattr.kernels import gradients, read_at, split_heads",
                            "from nnattr import kernels\nfrom nnattr.kernels import gradients, read_at, split_heads")
    assert "from nnattr import kernels" in edited and "kernels.split_heads(" not in source
    edited = edited.replace("scores = torch.stack([split_heads(", "scores = torch.stack([kernels.split_heads(")
    path = tmp_path / "through_the_module.py"
    path.write_text(edited)
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = len(ndif.requests)
    with pytest.raises(remote.NDIFError, match=r"the module nnattr.kernels \(call its functions by name") as caught:
        module.run(CLIENTS["gpt2"], PROMPTS, remote=True)
    assert caught.value.kind == "unshippable" and len(ndif.requests) == before


def test_an_nnattr_object_in_the_trace_is_refused_before_sending(ndif, tmp_path):
    from pathlib import Path

    source = (Path(__file__).resolve().parents[1] / "recipes" / "head_attribution.py").read_text()
    line = ("        z = [model.layers[i].attn.o_proj.input for i in layers]  # [batch, pos, head * d_head], "
            "in layer order\n")
    assert line in source
    edited = source.replace(line, line.replace("in layers]", "in range(batch.arch.n_layers)]"))
    path = tmp_path / "uses_the_batch.py"
    path.write_text(edited)
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    local = module.run(CLIENTS["gpt2"], PROMPTS)  # fine locally: the Batch is right here
    assert local.values.shape[0] == 3
    before = len(ndif.requests)
    with pytest.raises(remote.NDIFError) as caught:
        module.run(CLIENTS["gpt2"], PROMPTS, remote=True)
    number = edited.splitlines().index(line.rstrip("\n").replace("in layers]", "in range(batch.arch.n_layers)]")) + 1
    message = str(caught.value)
    assert caught.value.kind == "unshippable" and len(ndif.requests) == before
    assert f"uses_the_batch.py, line {number}" in message and "'batch'" in message and "before the `with`" in message
