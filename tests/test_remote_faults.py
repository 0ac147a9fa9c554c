"""Every remote wait is bounded: faults injected into the loopback NDIF server, each one an `NDIFError`
that names the wait, how long it was and how to raise it; and forward-only recipes build no autograd
graph on a server whose weights require grad.

The server is `tests/support/ndif_loopback.py` with its fault switches (``hang``, ``missing_routes``,
``trainable_weights``); the client's waits are made small with `nnattr.remote.timeouts`.
"""

from __future__ import annotations

import socket
import sys
import time

import nnsight
import pytest
import torch
from nnsight.intervention.backends.remote import RemoteBackend

pytest.importorskip(
    "ndif.services.ray.deployments.modeling.nns",
    reason="needs the ndif server core: pip install --no-deps --ignore-requires-python ndif==0.1.2",
)

from nnattr import remote
from nnattr.recipes import attention_rollout, attention_summary, attention_views, direct_logit_attribution, logit_lens
try:
    from tests.support import fixtures, ndif_loopback, tiny
except ModuleNotFoundError:  # plain `pytest` without `pythonpath = ["."]`
    from support import fixtures, ndif_loopback, tiny

pytestmark = pytest.mark.timeout(60)  # each fault is bounded by its own small timeout; this guards the guard

KEY = "6f1c0d3e-8a8b-4f7e-9d55-1f0c2b3a4d5e"
REPO = "nnattr-test/tiny-gpt2-faults"
PROMPTS = tiny.prompts(2)
#: Recipes whose trace runs under torch.no_grad() inside a session, so on the server too.
NO_GRAPH = {
    "dla-head": (direct_logit_attribution, dict(by="head")),
    "dla-head_position": (direct_logit_attribution, dict(by="head_position")),
    "logit_lens": (logit_lens, dict(positions="all")),
    "attention_rollout": (attention_rollout, dict(view="value_weighted")),
    "attention_views": (attention_views, dict(view="norm_based")),
    "attention_summary": (attention_summary, dict(layer_idx="all")),
}


MODEL, _SERVER = fixtures.client_and_server(tiny.hf_model("gpt2"), "gpt2", REPO)
_server = fixtures.loopback_fixture({REPO: _SERVER}, api_key=KEY, api_keys={KEY}, repo_ids=[REPO],
                                    remote_logging=False, session_timeout=20.0)


@pytest.fixture(scope="module")
def ndif(_server):
    with ndif_loopback.offline_repo_ids(REPO):
        remote._CHECKED.clear()
        yield _server
    remote._CHECKED.clear()


@pytest.fixture
def fresh(ndif, monkeypatch):
    """The preflight runs again (its service and version checks are cached per host and model)."""
    import nnsight.ndif

    remote._CHECKED.clear()
    monkeypatch.setattr(nnsight.ndif, "_REMOTE_ENV", None)
    yield ndif
    remote._CHECKED.clear()


def _fails(kind: str, *, preflight: bool = False) -> tuple[remote.NDIFError, float]:
    """The error a remote run raises, and the seconds it took (the preflight only when it is the
    wait under test; otherwise it runs first, untimed)."""
    if not preflight:
        remote.prepare(MODEL)
    started = time.monotonic()
    with pytest.raises(remote.NDIFError) as caught:
        logit_lens.run(MODEL, PROMPTS, remote=True)
    assert caught.value.kind == kind, caught.value
    return caught.value, time.monotonic() - started


# ----------------------------------------------------------------------------- each wait, bounded


def test_subscribe_that_hangs(ndif):
    before = len(ndif.requests)
    with ndif.configure(hang={"subscribe"}), remote.timeouts(subscribe=1):
        error, took = _fails("subscribe_timeout")
    message = str(error)
    assert "was reached, but its /subscribe websocket never sent the session id within 1 s" in message
    assert "Nothing was sent" in message and len(ndif.requests) == before
    assert "NNATTR_NDIF_TIMEOUT_SUBSCRIBE=2" in message and "nnattr.remote.timeouts(subscribe=2)" in message
    assert took < 5


def test_upload_that_hangs(ndif):
    before = len(ndif.requests)
    with ndif.configure(hang={"request"}), remote.timeouts(upload=1):
        error, took = _fails("upload_timeout")
    message = str(error)
    assert "was reached, but sending the request (POST /request) got no answer within 1 s (upload timeout)" in message
    assert "NNATTR_NDIF_TIMEOUT_UPLOAD=2" in message and len(ndif.requests) == before
    assert took < 5


def test_job_that_never_finishes_shows_its_queue_position(ndif, capsys):
    with ndif_loopback.client_config(ndif.host, KEY, repo_ids=[REPO], remote_logging=True), \
            ndif.configure(hang={"job"}), remote.timeouts(job=1.5):
        error, took = _fails("job_timeout")
    message, shown = str(error), capsys.readouterr().out
    assert f"NDIF received the job ({ndif.last.id}) but it did not finish within 1.5 s (job timeout)" in message
    assert "last status was QUEUED (Added to Queue at position 1.)" in message
    assert "nnattr.remote.submit" in message and "NNATTR_NDIF_TIMEOUT_JOB=3" in message
    assert "QUEUED" in shown and "Added to Queue at position 1." in shown  # nnsight's status line, as it waits
    assert ndif.last.status == "QUEUED" and took < 6


def test_job_wait_defaults_to_the_servers_execution_limit(fresh, monkeypatch):
    monkeypatch.setattr(remote, "JOB_ALLOWANCE", 0.5)  # NDIF's limit plus 10 minutes, made small
    with fresh.configure(hang={"job"}, execution_timeout=1.0):
        error, took = _fails("job_timeout")
    assert "did not finish within 1.5 s" in str(error)
    assert "the model's execution limit on this server (1 s) plus 0.5 s for the queue" in str(error)
    assert took < 6


def test_status_that_hangs_says_the_server_was_reached(fresh):
    before = len(fresh.requests)
    with fresh.configure(hang={"status"}), remote.timeouts(status=1):
        error, took = _fails("status_timeout", preflight=True)
    message = str(error)
    assert f"NDIF at {fresh.host} was reached, but the service status (GET /status) got no answer within 1 s" \
        in message
    assert "Cannot reach" not in message and "NNATTR_NDIF_TIMEOUT_STATUS=2" in message
    assert len(fresh.requests) == before and took < 5


@pytest.mark.skipif(sys.platform != "linux", reason="a full listen backlog stalls a connect on Linux")
def test_a_host_that_never_accepts_the_connection():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        queued = [socket.socket() for _ in range(3)]  # fill the backlog: the next connect stalls
        for s in queued:
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
        try:
            with ndif_loopback.client_config(f"http://127.0.0.1:{port}", KEY, repo_ids=[REPO]), \
                    remote.timeouts(connect=0.5):
                remote._CHECKED.clear()
                error, took = _fails("connect_timeout", preflight=True)
        finally:
            for s in queued:
                s.close()
    assert "Could not open a connection to NDIF at http://127.0.0.1" in str(error)
    assert "within 0.5 s (connect timeout)" in str(error) and "NNATTR_NDIF_TIMEOUT_CONNECT=1" in str(error)
    assert took < 5


def test_download_that_hangs(ndif):
    with ndif.configure(force_download=True, hang={"download"}), remote.timeouts(download=1):
        error, took = _fails("download_timeout")
    assert "the download of the finished job's result got no answer within 1 s (download timeout)" in str(error)
    assert "NNATTR_NDIF_TIMEOUT_DOWNLOAD=2" in str(error) and ndif.last.status == "COMPLETED"
    assert took < 5


def test_a_submitted_jobs_download_is_bounded_too(ndif):
    job = remote.submit(logit_lens, MODEL, PROMPTS)
    with ndif.configure(hang={"download"}), remote.timeouts(download=1), pytest.raises(remote.NDIFError) as caught:
        job.result(timeout=10, poll_interval=0.05)
    assert caught.value.kind == "download_timeout"


# ----------------------------------------------------------------------------- a version check that cannot run


def test_no_env_route_is_a_warning(fresh):
    with fresh.configure(missing_routes={"/env"}), \
            pytest.warns(remote.NDIFVersionWarning, match="version check did not run") as caught:
        result = logit_lens.run(MODEL, PROMPTS, remote=True)
    assert f"NDIF at {fresh.host} has no /env route (HTTP 404)" in str(caught[0].message)
    assert result.values.shape[0] == 2 and fresh.last.status == "COMPLETED"


def test_env_that_hangs_is_a_warning(fresh):
    with fresh.configure(hang={"env"}), remote.timeouts(status=1), \
            pytest.warns(remote.NDIFVersionWarning, match="version check did not run") as caught:
        result = logit_lens.run(MODEL, PROMPTS, remote=True)
    assert "its versions (GET /env) got no answer within 1 s (status timeout)" in str(caught[0].message)
    assert result.values.shape[0] == 2


# ----------------------------------------------------------------------------- no autograd graph on the server


def test_trainable_server_weights_build_a_graph_unless_the_session_turns_it_off(ndif):
    # What the fault is: torch.no_grad() around a remote trace turns gradients off here, not there.
    inputs = {"input_ids": torch.tensor([[3, 4, 5]])}
    with ndif.configure(trainable_weights=True):
        with torch.no_grad(), MODEL.trace(inputs, remote=True):
            plain = nnsight.save(MODEL.output.logits[:, -1].cpu())
        with MODEL.session(remote=True):
            with torch.no_grad(), MODEL.trace(inputs):
                inside = nnsight.save(MODEL.output.logits[:, -1].cpu())
    built = [r.built_graph for r in ndif.requests[-2:]]
    assert plain.requires_grad and not inside.requires_grad and built == [True, False]
    torch.testing.assert_close(plain.detach(), inside)


@pytest.mark.parametrize("name", NO_GRAPH)
def test_forward_only_recipes_build_no_graph_on_trainable_weights(ndif, name):
    recipe, kwargs = NO_GRAPH[name]
    local = recipe.run(MODEL, PROMPTS, **kwargs)
    before = len(ndif.requests)
    with ndif.configure(trainable_weights=True):
        far = recipe.run(MODEL, PROMPTS, remote=True, **kwargs)
    assert len(ndif.requests) == before + 1 and ndif.last.built_graph is False  # one request, no graph there
    assert not far.values.requires_grad and far.values.numpy() is not None
    torch.testing.assert_close(far.values, local.values, atol=1e-6, rtol=0, equal_nan=True)
    assert not any(p.requires_grad for p in ndif.model(REPO)._module.parameters())  # frozen again


def test_report_runs_on_a_server_with_trainable_weights(ndif, tmp_path):
    from nnattr import report

    with ndif.configure(trainable_weights=True):
        built = report.build(MODEL, PROMPTS, out=tmp_path, options={"remote": True})
    assert not built.failed, [(s.title, s.note) for s in built.failed]
    assert (tmp_path / "index.html").exists()


# ----------------------------------------------------------------------------- configuration


def test_timeouts_come_from_defaults_environment_and_blocks(monkeypatch):
    assert remote.current_timeouts() == remote.Timeouts()
    assert remote.Timeouts().connect == 10 and remote.Timeouts().job is None
    monkeypatch.setenv("NNATTR_NDIF_TIMEOUT_JOB", "7200")
    monkeypatch.setenv("NNATTR_NDIF_TIMEOUT_CONNECT", " 3 ")
    assert (remote.current_timeouts().job, remote.current_timeouts().connect) == (7200, 3)
    with remote.timeouts(job=60, upload=5) as outer:
        assert (outer.job, outer.upload, outer.connect) == (60, 5, 3)
        with remote.timeouts(upload=9):
            assert (remote.current_timeouts().job, remote.current_timeouts().upload) == (60, 9)
        assert remote.current_timeouts().upload == 5
    assert remote.current_timeouts().job == 7200


def test_bad_timeouts_are_refused_where_they_are_given(monkeypatch):
    with pytest.raises(TypeError, match="no wait named jobs; the waits are connect, subscribe"):
        with remote.timeouts(jobs=5):
            pass
    for bad in (0, -1, float("inf"), "5", True):
        with pytest.raises(ValueError, match="give a positive number of seconds"):
            with remote.timeouts(upload=bad):
                pass
    monkeypatch.setenv("NNATTR_NDIF_TIMEOUT_STATUS", "soon")
    with pytest.raises(ValueError, match="NNATTR_NDIF_TIMEOUT_STATUS='soon'"):
        remote.current_timeouts()


def test_nnsight_still_reads_the_http_timeouts_nnattr_sets():
    # nnattr bounds nnsight's own HTTP calls by handing them these two names (remote._with_http_timeouts).
    for method in (RemoteBackend._post, RemoteBackend.download_result, RemoteBackend.poll):
        assert {"_CONNECT_TIMEOUT", "_READ_TIMEOUT"} <= set(method.__code__.co_names), method.__name__


def test_zz_server_hit_no_internal_errors(ndif):
    assert ndif.internal_errors == []
