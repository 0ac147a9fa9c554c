"""The loopback NDIF server works end to end with nnsight's real client.

Each remote call below goes through `RemoteBackend` (websocket /subscribe, POST
/request, statuses, inline or downloaded result) to `LoopbackNDIF`, which runs it
with the `ndif` package's execution core against a separate, frozen model.
"""

from __future__ import annotations

import socket
import time

import httpx
import nnsight
import pytest
import torch
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

pytest.importorskip(
    "ndif.services.ray.deployments.modeling.nns",
    reason="needs the ndif server core: pip install --no-deps --ignore-requires-python ndif==0.1.2",
)

try:
    from tests.support import fixtures, ndif_loopback
except ModuleNotFoundError:  # plain `pytest` without `pythonpath = ["."]`
    from support import fixtures, ndif_loopback

TINY_REPO_ID = fixtures.TINY_REPO_ID
loopback_fixture, tiny_gpt2, tiny_gpt2_pair = (
    fixtures.loopback_fixture, fixtures.tiny_gpt2, fixtures.tiny_gpt2_pair
)
OLD_SERVER_IMPORT_WHITELIST = ndif_loopback.OLD_SERVER_IMPORT_WHITELIST
LoopbackNDIF, client_config = ndif_loopback.LoopbackNDIF, ndif_loopback.client_config
offline_repo_ids = ndif_loopback.offline_repo_ids

PROMPT = "the cat sat on the mat"
TARGET = 5  # a vocabulary id used as the logit to attribute

client, server_model = tiny_gpt2_pair()
ndif = loopback_fixture({TINY_REPO_ID: server_model})


def _count(server: LoopbackNDIF) -> int:
    return len(server.requests)


# (a) ------------------------------------------------------------------------


def test_remote_trace_matches_local(ndif):
    with client.trace(PROMPT):
        local_h = client.transformer.h[0].output.save()
        local_logits = client.lm_head.output.save()

    before = _count(ndif)
    with client.trace(PROMPT, remote=True):
        remote_h = client.transformer.h[0].output.save()
        remote_logits = client.lm_head.output.save()

    assert _count(ndif) == before + 1
    assert (remote_h - local_h).abs().max().item() <= 1e-6
    assert (remote_logits - local_logits).abs().max().item() <= 1e-6

    record = ndif.last
    assert record.statuses == ["RECEIVED", "QUEUED", "DISPATCHED", "RUNNING", "COMPLETED"]
    assert record.result_route == "inline" and record.blocking
    assert record.compress and record.env["attn_implementation"] == "sdpa"
    assert record.model_key.endswith(f'"repo_id": "{TINY_REPO_ID}", "revision": null, '
                                      '"task": "text-generation"}')
    assert record.headers["nnsight-version"] == nnsight.__version__
    assert 0 < record.request_size and 0 < record.result_size

    served = ndif.model(TINY_REPO_ID)
    assert served is not client and not served._module.training
    assert not any(p.requires_grad for p in served._module.parameters())
    assert all(p.requires_grad for p in client._module.parameters())


def test_request_env_switches_attention_implementation(ndif):
    eager = tiny_gpt2(attn_implementation="eager", state=client._module.state_dict())
    with eager.trace(PROMPT):
        local = eager.transformer.h[1].attn.output[1].save()
    with eager.trace(PROMPT, remote=True):
        remote = eager.transformer.h[1].attn.output[1].save()

    assert ndif.last.env["attn_implementation"] == "eager"
    assert remote is not None and (remote - local).abs().max().item() <= 1e-6


def test_uncompressed_request_and_prints_as_log_lines(ndif, capsys):
    with client.trace(PROMPT):
        local = client.transformer.h[0].output.save()
    with client_config(ndif.host, "loopback-test-key", compress=False, repo_ids=[TINY_REPO_ID]):
        with client.trace(PROMPT, remote=True):
            print("hello from the server")
            remote = client.transformer.h[0].output.save()

    record = ndif.last
    assert not record.compress and record.request_bytes[:2] == b"\x80\x04"  # raw pickle
    assert record.result_bytes[:2] == b"PK"  # torch.save zip, not zstd
    assert (remote - local).abs().max().item() <= 1e-6
    assert record.logs == ["hello from the server"]
    assert "hello from the server" in capsys.readouterr().out  # the client's display


# (b) ------------------------------------------------------------------------


def _gradients(model, remote):
    with model.trace(PROMPT, remote=remote):
        emb = model.transformer.wte.output
        emb.requires_grad_(True)
        h0 = model.transformer.h[0].output
        metric = model.lm_head.output[0, -1, TARGET]
        with metric.backward():
            g_h0 = h0.grad.save()
            g_emb = emb.grad.save()
    return g_h0, g_emb


def test_gradients_against_frozen_server_params(ndif):
    local = _gradients(client, remote=False)
    remote = _gradients(client, remote=True)

    for r, l in zip(remote, local):
        assert r.shape == l.shape and r.abs().sum() > 0
        assert (r - l).abs().max().item() <= 1e-6
    served = ndif.model(TINY_REPO_ID)
    assert all(p.grad is None for p in served._module.parameters())


# (c) ------------------------------------------------------------------------


def test_session_with_two_traces_is_one_request(ndif):
    def run(remote):
        with client.session(remote=remote):
            with client.trace("the cat sat"):
                h = client.transformer.h[0].output
            with client.trace("the dog ran"):
                client.transformer.h[0].output[:] = h
                patched = client.lm_head.output[0, -1].save()
        return patched

    local = run(False)
    before = _count(ndif)
    remote = run(True)

    assert _count(ndif) == before + 1
    assert (remote - local).abs().max().item() <= 1e-6


# (d) ------------------------------------------------------------------------


def test_non_blocking_submit_then_collect(ndif):
    with client.trace(PROMPT):
        local = client.transformer.h[1].output.save()

    with ndif.configure(queue_delay=0.2):
        with client.trace(PROMPT, remote=True, blocking=False) as tracer:
            h1 = client.transformer.h[1].output.save()
        job_id = tracer.backend.job_id
        assert job_id and tracer.backend.status.value == "RECEIVED"

        # A fresh backend that knows only the job id collects it later.
        collector = RemoteBackend(client.to_model_key(), blocking=False, job_id=job_id)
        result, polls, deadline = None, 0, time.monotonic() + 20
        while result is None and time.monotonic() < deadline:
            result = collector()
            polls += 1
            if result is None:
                time.sleep(0.05)

    assert result is not None and polls > 1
    assert (result["h1"] - local).abs().max().item() <= 1e-6
    record = ndif.last
    assert record.id == job_id and not record.blocking
    assert record.result_route == "url" and record.downloads == 1
    assert record.statuses[-1] == "COMPLETED"

    unknown = RemoteBackend(client.to_model_key(), blocking=False, job_id="no-such-job")
    assert unknown() is None  # 404 -> "no status yet"


# (e) ------------------------------------------------------------------------


def test_result_over_download_url(ndif):
    with client.trace(PROMPT):
        local = client.lm_head.output.save()

    with ndif.configure(force_download=True):
        with client.trace(PROMPT, remote=True):
            forced = client.lm_head.output.save()
    assert ndif.last.result_route == "url" and ndif.last.downloads == 1
    assert (forced - local).abs().max().item() <= 1e-6

    with ndif.configure(inline_limit=1024):  # a size threshold, like ndif's 8 MiB
        with client.trace(PROMPT, remote=True):
            big = client.lm_head.output.save()
        assert ndif.last.result_size > 1024 and ndif.last.result_route == "url"
        with client.trace(PROMPT, remote=True):
            small = client.lm_head.output[0, -1, TARGET].item()
            small = nnsight.save(small)
        assert ndif.last.result_size <= 1024 and ndif.last.result_route == "inline"
    assert (big - local).abs().max().item() <= 1e-6
    assert abs(small - local[0, -1, TARGET].item()) <= 1e-6


# (f) ------------------------------------------------------------------------


def test_model_not_hosted(ndif):
    key = client.to_model_key().replace(TINY_REPO_ID, "nnattr-test/not-hosted")
    with pytest.raises(RemoteError, match=r"^Could not deploy this model\. "):
        with client.trace(PROMPT, backend=RemoteBackend(key)):
            client.lm_head.output.save()
    assert ndif.last.statuses == ["RECEIVED", "PROVISIONING", "ERROR"]


def test_gradients_refused(ndif):
    with ndif.configure(refuse_gradients=True):
        with pytest.raises(RemoteError) as caught:
            _gradients(client, remote=True)
    message = str(caught.value)
    assert "NotImplementedError: This tensor does not require grad" in message
    assert "runs under torch.inference_mode" in message


def test_backward_without_requires_grad_fails_on_frozen_server(ndif):
    with pytest.raises(RemoteError, match="NotImplementedError: This tensor does not require grad"):
        with client.trace(PROMPT, remote=True):
            h0 = client.transformer.h[0].output
            metric = client.lm_head.output[0, -1, TARGET]
            with metric.backward():
                h0.grad.save()


def test_out_of_memory(ndif):
    with ndif.configure(simulate_oom=True):
        with pytest.raises(RemoteError, match="OutOfMemoryError: CUDA out of memory") as caught:
            with client.trace(PROMPT, remote=True) as tracer:
                client.lm_head.output.save()
    assert "Traceback (most recent call last)" in str(caught.value)
    assert "alloc_shortfall_by_gpu" in tracer.backend.meta
    assert "runtime" in tracer.backend.meta


def test_user_error_comes_back_as_traceback(ndif):
    with pytest.raises(RemoteError, match="IndexError") as caught:
        with client.trace(PROMPT, remote=True):
            client.transformer.h[0].output[0, 99].save()
    assert "test_loopback_server.py" in str(caught.value)


def test_execution_timeout(ndif):
    with ndif.configure(execution_timeout=0.5):
        with pytest.raises(RemoteError, match=r"exceeded the execution timeout of 0\.5s"):
            with client.trace(PROMPT, remote=True):
                for _ in range(100):
                    time.sleep(0.05)
                client.lm_head.output.save()


def test_api_key_rejected(ndif):
    with ndif.configure(api_keys={"6f1c0d3e-8a8b-4f7e-9d55-1f0c2b3a4d5e"}):
        with pytest.raises(RemoteError, match=r"^Failed to send request: Invalid API key format"):
            with client.trace(PROMPT, remote=True):
                client.lm_head.output.save()
        with client_config(ndif.host, None):
            with pytest.raises(RemoteError, match=r"^Failed to send request: Missing or invalid API key"):
                with client.trace(PROMPT, remote=True):
                    client.lm_head.output.save()
        with client_config(ndif.host, "00000000-0000-0000-0000-000000000000"):
            with pytest.raises(RemoteError, match=r"^Failed to send request: Invalid API key\.$"):
                with client.trace(PROMPT, remote=True):
                    client.lm_head.output.save()


def test_client_version_gate(ndif):
    with ndif.configure(min_nnsight_version="99.0"):
        with pytest.raises(RemoteError, match=r"nnsight version .* is below the minimum supported 99\.0"):
            with client.trace(PROMPT, remote=True):
                client.lm_head.output.save()


def test_module_not_installed_on_server(ndif):
    import iniconfig  # installed here with pytest, not on an NDIF server

    with pytest.raises(RemoteError, match=r"Your request payload could not be read \(ModuleNotFoundError"):
        with client.trace(PROMPT, remote=True):
            name = nnsight.save(iniconfig.__name__)
            client.lm_head.output.save()


def test_expired_download_link(ndif):
    with ndif.configure(force_download=True, result_url_status=403):
        with pytest.raises(httpx.HTTPStatusError, match="403"):
            with client.trace(PROMPT, remote=True):
                client.lm_head.output.save()


def test_server_unreachable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with client_config(f"http://127.0.0.1:{port}", "k", repo_ids=[TINY_REPO_ID]):
        with pytest.raises(ConnectionRefusedError):
            with client.trace(PROMPT, remote=True):
                client.lm_head.output.save()
        assert nnsight.is_model_running(TINY_REPO_ID) is False  # prints "Down" to stderr


# (g) ------------------------------------------------------------------------


def test_imports_not_restricted_by_ndif_core(ndif):
    # ndif 0.1.2 enforces no import whitelist: `import json` in a block runs.
    with client.trace(PROMPT, remote=True):
        import json

        shape = nnsight.save(json.dumps(list(client.lm_head.output.shape)))
    assert shape == "[1, 6, 100]"


def test_old_server_import_whitelist_emulation(ndif):
    with ndif.configure(import_whitelist=OLD_SERVER_IMPORT_WHITELIST):
        with pytest.raises(RemoteError, match="ImportError: Module json is not whitelisted"):
            with client.trace(PROMPT, remote=True):
                import json

                nnsight.save(json.dumps([1]))
        # Whitelisted imports and library-internal imports still work.
        with client.trace(PROMPT, remote=True):
            import math

            top = nnsight.save(math.floor(client.lm_head.output.argmax().item()))
    assert isinstance(top, int)


# status endpoints ---------------------------------------------------------------


def test_status_endpoints(ndif):
    with offline_repo_ids(TINY_REPO_ID):
        assert nnsight.is_model_running(TINY_REPO_ID)
    status = nnsight.status()
    assert TINY_REPO_ID in status and status.status.value == "UP"
    assert status[TINY_REPO_ID]["model_class"] == "TransformersModel"
    comparison = nnsight.compare()
    assert comparison.python_matches and not comparison.critical_mismatches
    assert nnsight.whoami() == {"email": None, "tags": []}


def test_bfloat16_server_autocasts_user_ops():
    client16, factory = tiny_gpt2_pair(seed=1)
    with LoopbackNDIF({TINY_REPO_ID: factory}, dtype=torch.bfloat16) as server16:
        with client_config(server16.host, "k", repo_ids=[TINY_REPO_ID]):
            with client16.trace(PROMPT, remote=True):
                h = client16.transformer.ln_f.output
                # A float32 matmul against the served (bf16) unembedding.
                scores = (h.float() @ client16.lm_head.weight.T).save()
                logits = client16.lm_head.output.save()
    assert logits.dtype == torch.bfloat16 and scores.dtype == torch.bfloat16
    with client16.trace(PROMPT):
        local = client16.lm_head.output.save()
    assert (logits.float() - local).abs().max().item() < 0.1


# nnsight serialization: the server recompiles the block it was sent ---------------


def test_nested_with_after_blank_and_comment_lines_runs_remotely(ndif):
    # The server recompiles the block from ast.unparse(body), which drops blank and comment
    # lines, and finds a nested `with` (invoke, backward, inner trace) in that recompiled
    # source. A server process never saw the client's file, so line numbers agree there;
    # the loopback hides the client's source caches to behave the same (a shared cache made
    # this fail here, although it runs on NDIF).
    with client.trace(remote=True) as tracer:
        x = 1

        # a comment line, then a nested `with`
        with tracer.invoke(PROMPT):
            remote_logits = client.lm_head.output.save()
    with client.trace(PROMPT):
        local_logits = client.lm_head.output.save()
    torch.testing.assert_close(remote_logits, local_logits)


def test_session_timeout_bounds_a_waiting_client(ndif):
    with ndif.configure(session_timeout=0.3, execution_timeout=1.0):
        with pytest.raises(RemoteError, match="session_timeout=0.3s"):
            with client.trace(PROMPT, remote=True):
                for _ in range(100):
                    time.sleep(0.05)
        assert ndif.last.wait(10)  # the job itself still ends (execution timeout)
    assert ndif.last.error.startswith("Your job exceeded the execution timeout")


def test_zz_server_hit_no_internal_errors(ndif):
    assert ndif.internal_errors == []
    assert all(record.done.is_set() for record in ndif.requests)
