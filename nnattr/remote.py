"""Recipes on NDIF: preflight checks, errors that name the fix, bounded waits and non-blocking jobs.

Every recipe takes ``remote=`` and ``backend=`` and runs its traces through
`nnattr.runner`, which calls `prepare` once before the first request, sends each block through
nnattr's own backend (`backend_for`: the block is checked before it is sent, `check_block`) and
wraps each request in `errors`. So a missing API key, a model NDIF does not host or a server that refuses
gradients is reported as a sentence, before anything is sent where that is possible. Every wait
on the server is bounded (`Timeouts`: connect, subscribe, upload, status, job, download; change
them with `timeouts` or ``NNATTR_NDIF_TIMEOUT_*``), and one that runs out is an `NDIFError`
naming the wait, how long it was and how to raise it. See docs/remote.md.

>>> import nnattr, nnattr.remote
>>> from nnattr.recipes import direct_logit_attribution as dla
>>> model = nnattr.load("meta-llama/Llama-3.1-8B")                                  # doctest: +SKIP
>>> result = dla.run(model, "The Eiffel Tower is in", " Paris", remote=True)         # doctest: +SKIP
>>> job = nnattr.remote.submit(dla, model, "The Eiffel Tower is in", " Paris")       # doctest: +SKIP
>>> job.status()                                                                     # doctest: +SKIP
'QUEUED'
>>> job.result(timeout=600).top(5)                                                   # doctest: +SKIP
>>> with nnattr.remote.timeouts(job=7200):                     # a long queue: wait up to 2 hours
...     result = dla.run(model, "The Eiffel Tower is in", " Paris", remote=True)     # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import os
import re
import time
import types
import warnings
from typing import Any, Callable, Iterator

from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

__all__ = ["NDIFError", "NDIFVersionWarning", "Job", "SERVER_IMPORTS", "Timeouts", "add_cli_arguments",
           "backend_for", "check_block", "current_timeouts", "errors", "is_remote", "prepare", "remote_kwargs",
           "submit", "timeouts", "translate"]

DEFAULT_HOST = "https://api.ndif.us"
KEYS_URL = "https://login.ndif.us"
#: Modules the restricted NDIF server lets request code import (besides nnsight's own).
SERVER_IMPORTS = frozenset({"torch", "einops", "math", "typing", "numpy", "collections", "operator", "enum"})
_STAGES = ("ERROR", "RECEIVED", "QUEUED", "PROVISIONING", "DEPLOYING", "DISPATCHED", "RUNNING", "COMPLETED")


class NDIFError(RuntimeError):
    """A remote run that cannot go on. The message says what happened and how to fix it.

    ``kind`` names the failure (``"api_key"``, ``"unreachable"``, ``"not_hosted"``, ``"gradients"``,
    ``"frozen"``, ``"oom"``, ``"timeout"``, ``"module_missing"``, ``"whitelist"``,
    ``"architecture"``, ``"old_client"``, ``"expired"``, ``"dropped"``, ``"pending"``,
    ``"server_code"``, ...); a wait of this client that ran out is ``"<wait>_timeout"``
    (``"connect_timeout"``, ``"subscribe_timeout"``, ``"upload_timeout"``, ``"status_timeout"``,
    ``"job_timeout"``, ``"download_timeout"``: see `Timeouts`), while ``"timeout"`` is the server's
    own execution limit. ``server_message`` is the server's own text, API key removed.
    """

    def __init__(self, message: str, *, kind: str, server_message: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.server_message = kind, server_message


class NDIFVersionWarning(UserWarning):
    """nnsight, transformers or torch differ between this machine and the NDIF server, or the
    server's versions could not be read to compare them."""


class Deferred(Exception):
    """Internal to `submit`: a trace was queued as a non-blocking job instead of run."""


# ----------------------------------------------------------------------------- timeouts

#: ``NNATTR_NDIF_TIMEOUT_<WAIT>`` (e.g. ``NNATTR_NDIF_TIMEOUT_JOB=7200``) sets a wait's default, in seconds.
ENV_PREFIX = "NNATTR_NDIF_TIMEOUT_"
#: The job wait when the server reports no execution limit, and what is added to one it reports.
JOB_DEFAULT, JOB_ALLOWANCE = 3600.0, 600.0


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """How many seconds a remote run waits on NDIF at each step; past one, `NDIFError` with
    ``kind="<wait>_timeout"`` names the wait and how to raise it (docs/remote.md, "Timeouts").

    connect:   opening an HTTP connection to the host (TCP and TLS): the preflight, the upload,
               a download, a non-blocking job's status.
    subscribe: the ``/subscribe`` websocket: its connection, its upgrade and the session id it
               sends first.
    upload:    ``POST /request``: the server's answer (RECEIVED) once the block is sent.
    status:    the preflight's reads (``/status``, ``/env``) and a non-blocking job's status.
    job:       from RECEIVED to the result: the queue, the run and the status stream, shown as it
               goes. None: the execution limit the server reports for the model (``/status``)
               plus `JOB_ALLOWANCE` for the queue, or `JOB_DEFAULT` when it reports none.
    download:  a result sent as a link: the longest the download may stall.

    The waits in force are `current_timeouts`: these defaults, then ``NNATTR_NDIF_TIMEOUT_*``,
    then the innermost ``with timeouts(...)``.
    """

    connect: float = 10.0
    subscribe: float = 30.0
    upload: float = 120.0
    status: float = 30.0
    job: float | None = None
    download: float = 600.0

    def __post_init__(self) -> None:
        for wait, seconds in dataclasses.asdict(self).items():
            if seconds is None and wait == "job":
                continue
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
                raise ValueError(f"timeout {wait}={seconds!r}: give a positive number of seconds"
                                 + (" (or None: the server's execution limit)" if wait == "job" else ""))


WAITS = tuple(field.name for field in dataclasses.fields(Timeouts))
_SET: contextvars.ContextVar[dict] = contextvars.ContextVar("nnattr_ndif_timeouts", default={})


def current_timeouts() -> Timeouts:
    """The waits in force here: `Timeouts`' defaults, then each ``NNATTR_NDIF_TIMEOUT_<WAIT>``
    environment variable that is set, then the innermost `timeouts` block (read at each request)."""
    seconds: dict[str, Any] = {}
    unknown = sorted(k for k in os.environ if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):].lower() not in WAITS)
    if unknown:
        warnings.warn(f"{unknown[0]} names no wait, so it is ignored: the waits are "
                      f"{', '.join(ENV_PREFIX + w.upper() for w in WAITS)}", RuntimeWarning, stacklevel=2)
    for wait in WAITS:
        text = os.environ.get(ENV_PREFIX + wait.upper(), "").strip()
        if text:
            try:
                seconds[wait] = float(text)
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{wait.upper()}={text!r}: give a number of seconds") from None
    try:
        return Timeouts(**{**seconds, **_SET.get()})
    except ValueError as error:
        raise ValueError(f"{error} (from {ENV_PREFIX}* or nnattr.remote.timeouts)") from None


@contextlib.contextmanager
def timeouts(**seconds: float | None) -> Iterator[Timeouts]:
    """Change how long remote runs inside the ``with`` wait (seconds per wait, see `Timeouts`);
    yields the waits now in force.

    >>> with nnattr.remote.timeouts(job=7200, download=1800):                          # doctest: +SKIP
    ...     result = dla.run(model, prompts, remote=True)
    """
    unknown = sorted(set(seconds) - set(WAITS))
    if unknown:
        raise TypeError(f"timeouts(): no wait named {', '.join(unknown)}; the waits are {', '.join(WAITS)}")
    Timeouts(**seconds)  # refuse a bad value here, not at the next request
    token = _SET.set({**_SET.get(), **seconds})
    try:
        yield current_timeouts()
    finally:
        _SET.reset(token)


def _longer(wait: str, seconds: float) -> str:
    """How to wait longer for ``wait``: its environment variable, or a `timeouts` block."""
    more = f"{2 * seconds:g}"
    return (f"To wait longer, set {ENV_PREFIX}{wait.upper()}={more} or run it inside "
            f"`with nnattr.remote.timeouts({wait}={more}):`.")


def _timed_out(wait: str, seconds: float, what: str, then: str = "") -> NDIFError:
    """The `NDIFError` for a wait that ran out: what did not happen, in how long, and the fix."""
    return NDIFError(f"{what} within {seconds:g} s ({wait} timeout).{' ' + then if then else ''} "
                     f"{_longer(wait, seconds)}", kind=f"{wait}_timeout")


def _with_http_timeouts(method: Callable, connect: float, read: float) -> Callable:
    """nnsight's ``method`` (a `RemoteBackend` method that makes an HTTP request) reading ``connect``
    and ``read`` seconds where it reads its module's fixed timeouts (``_CONNECT_TIMEOUT``,
    ``_READ_TIMEOUT``: 10 s and 600 s, which nnsight offers no parameter for). A copy of the function
    with its own globals: nothing changes for other callers or threads."""
    code = method.__code__
    if not {"_CONNECT_TIMEOUT", "_READ_TIMEOUT"} <= set(code.co_names):
        warnings.warn(f"nnsight's RemoteBackend.{method.__name__} no longer reads _CONNECT_TIMEOUT and "
                      f"_READ_TIMEOUT: nnattr's connect, upload, status and download timeouts do not apply to it "
                      f"(nnsight's own do)", RuntimeWarning, stacklevel=3)
        return method
    scope = {**method.__globals__, "_CONNECT_TIMEOUT": connect, "_READ_TIMEOUT": read}
    copy = types.FunctionType(code, scope, method.__name__, method.__defaults__, method.__closure__)
    copy.__kwdefaults__ = method.__kwdefaults__
    return copy


def _http_timeout(error: BaseException | None, *, connect: float, wait: str, seconds: float, where: str,
                  doing: str, then: str = "") -> NDIFError | None:
    """The `NDIFError` for an httpx timeout while ``doing`` something at ``where`` ("NDIF at <host>";
    None for any other error): no connection within ``connect`` s, or a reached server silent for
    ``seconds``."""
    import httpx

    if isinstance(error, httpx.ConnectTimeout):
        return _timed_out("connect", connect, f"Could not open a connection to {where} for {doing}",
                          "The host did not answer: check the network and NDIF_HOST; nnsight.status() shows "
                          "whether the service is up.")
    if isinstance(error, httpx.WriteTimeout):
        return _timed_out("connect", connect, f"{where} was reached, but {doing} stalled: it took no data", then)
    if isinstance(error, httpx.TimeoutException):
        return _timed_out(wait, seconds, f"{where} was reached, but {doing} got no answer", then)
    return None


# ----------------------------------------------------------------------------- preflight

#: (host, model key) pairs whose service checks passed: the model's execution limit in seconds, as
#: the server reports it (None: not reported).
_CHECKED: dict[tuple[str, str], float | None] = {}


def is_remote(remote: Any = False, backend: Any = None) -> bool:
    """Whether a recipe call goes to an NDIF server: ``remote=True``, a host URL, or a remote
    ``backend`` (nnsight uses a given backend whatever ``remote`` says). ``remote="local"``,
    nnsight's in-process serialization check, is not remote."""
    if backend is not None:
        return isinstance(backend, RemoteBackend)
    return remote is True or (isinstance(remote, str) and remote.startswith(("http://", "https://")))


def prepare(model, backend=None, *, remote: Any = True) -> None:
    """Make ``model``'s traces ready for NDIF, or raise `NDIFError` before anything is sent.

    1. Ships nnattr's kernels with each request (``nnsight.register``): nnattr is not installed
       on NDIF.
    2. Finds the API key (the backend's, nnsight's config from ``nnsight login``, or
       ``NDIF_API_KEY``, also when set after nnsight was imported; ``NDIF_HOST`` likewise).
    3. Once per process, host and model: checks the host answers, that the model is running
       (``nnsight.is_model_running``), and warns (`NDIFVersionWarning`) where nnsight,
       transformers or torch differ from the server's (``nnsight.compare()``), or where the server's
       versions cannot be read. Each read waits at most `current_timeouts` ``connect`` / ``status``.
    """
    import nnsight

    from nnattr import kernels

    nnsight.register(kernels)
    if isinstance(backend, _Replay):
        return
    _adopt_environment()
    host = _host(backend, remote)
    if backend is not None and not backend.blocking and not isinstance(backend, _Submitter):
        raise NDIFError(
            "A non-blocking backend returns before any result exists, so a recipe cannot use it "
            "directly. Use job = nnattr.remote.submit(recipe, model, ...) and job.result().",
            kind="usage",
        )
    key = _api_key(backend)
    if not key:
        raise NDIFError(
            f"No NDIF API key, so nothing was sent to {host}. Set the NDIF_API_KEY environment "
            f"variable or run `nnsight login` once (get a key at {KEYS_URL}); NDIF_HOST chooses "
            f"the host.",
            kind="api_key",
        )
    if backend is not None and not backend.api_key:
        backend.api_key = key
    model_key = backend.model_key if backend is not None else _model_key(model)
    if (host, model_key) not in _CHECKED:
        _CHECKED[(host, model_key)] = _check_service(host, model_key)


def _adopt_environment() -> None:
    """nnsight reads NDIF_API_KEY and NDIF_HOST once, at import: pick up values set later."""
    from nnsight import CONFIG

    key, host = os.environ.get("NDIF_API_KEY"), os.environ.get("NDIF_HOST")
    if key and not CONFIG.API.APIKEY:
        CONFIG.API.APIKEY = key
    if host and CONFIG.API.HOST == DEFAULT_HOST:
        CONFIG.API.HOST = host


def _api_key(backend=None) -> str | None:
    from nnsight import CONFIG

    return getattr(backend, "api_key", None) or CONFIG.API.APIKEY or os.environ.get("NDIF_API_KEY")


def _host(backend=None, remote: Any = True) -> str:
    from nnsight import CONFIG

    if backend is not None and getattr(backend, "host", None):
        return backend.host
    if isinstance(remote, str) and remote.startswith(("http://", "https://")):
        return remote
    _adopt_environment()
    return CONFIG.API.HOST


def _model_key(model) -> str:
    try:
        return model.to_model_key()
    except Exception as error:
        raise NDIFError(
            f"Could not name this model for NDIF ({type(error).__name__}: {_scrub(str(error))}). NDIF "
            f"serves models by Hugging Face repo id: load it by that id, e.g. "
            f"nnattr.load('meta-llama/Llama-3.1-8B'), with the Hub reachable.",
            kind="model_key",
        ) from None


def _check_service(host: str, model_key: str) -> float | None:
    """Refuse a host that does not answer or a model it does not run; warn about versions.
    Returns the model's execution limit in seconds, as ``/status`` reports it (None: not reported)."""
    import nnsight

    repo = json.loads(model_key.partition(":")[2] or "{}")
    repo_id, revision = repo.get("repo_id"), repo.get("revision") or "main"
    status = _json(_read(host, "/status", "the service status (GET /status)", then="Nothing was sent; the service "
                         "may be overloaded: try again later, or check nnsight.status()."))
    limit = None
    with _pointed_at(host):
        if isinstance(status, dict):  # else the host publishes no status: the request itself will tell
            ours = [d for d in status.get("deployments", {}).values()
                    if d.get("repo_id") == repo_id and (d.get("revision") or "main") == revision
                    and d.get("application_state") == "RUNNING"]
            try:
                running = nnsight.is_model_running(repo_id, revision=revision)
            except Exception:  # the Hub lookup it makes failed: the status we already have decides
                running = False
            if not (running or ours):
                raise NDIFError(
                    f"Model {repo_id!r} is not running on NDIF ({host}), so nothing was sent; "
                    f"print(nnsight.status()) lists the models that are.",
                    kind="not_hosted",
                )
            limit = next((float(d["execution_timeout_seconds"]) for d in ours if d.get("execution_timeout_seconds")),
                         None)
        _check_versions(host)
    return limit


def _read(host: str, path: str, doing: str, *, then: str = ""):
    """``GET host+path``, each wait bounded (`current_timeouts` connect / status): the response,
    or `NDIFError` when the host cannot be reached or is silent."""
    import httpx

    t = current_timeouts()
    try:
        response = httpx.get(f"{host}{path}", timeout=httpx.Timeout(t.connect, read=t.status))
    except httpx.TimeoutException as error:
        raise _http_timeout(error, connect=t.connect, wait="status", seconds=t.status, where=f"NDIF at {host}",
                            doing=doing, then=then) from None
    except (httpx.TransportError, OSError) as error:
        raise NDIFError(
            f"Cannot reach NDIF at {host} ({type(error).__name__}), so nothing was sent. Check the "
            f"network and NDIF_HOST; nnsight.status() shows whether the service is up.",
            kind="unreachable",
        ) from None
    return response


def _json(response) -> Any:
    """A response's JSON; None for an HTTP error or a body that is not JSON."""
    try:
        return None if response.is_error else response.json()
    except ValueError:
        return None


def _check_versions(host: str) -> None:
    """Warn (`NDIFVersionWarning`) where nnsight, transformers or torch differ from the server's,
    and where the server's versions cannot be read (no ``/env``, a silent one)."""
    import nnsight.ndif as ndif

    cannot = ("The version check did not run, so a difference in nnsight, transformers or torch between here and "
              "the NDIF server (the most common reason a trace that works locally fails remotely) would go "
              "unnoticed; print(nnsight.compare()) tries again. Why: {why}")
    env = ndif._REMOTE_ENV  # nnsight.compare()'s cache, for this host (_pointed_at)
    if env is None:
        try:
            response = _read(host, "/env", "its versions (GET /env)")
        except NDIFError as error:
            return warnings.warn(cannot.format(why=error), NDIFVersionWarning, stacklevel=4)
        env = _json(response)
        if not isinstance(env, dict) or not isinstance(env.get("packages"), dict):
            why = f"NDIF at {host} has no /env route (HTTP {response.status_code})" if response.status_code == 404 \
                else f"GET {host}/env gave no versions (HTTP {response.status_code})"
            return warnings.warn(cannot.format(why=why), NDIFVersionWarning, stacklevel=4)
        ndif._REMOTE_ENV = env
    try:
        mismatches = ndif.EnvComparison(ndif.get_local_env(), env).critical_mismatches
    except Exception as error:
        return warnings.warn(cannot.format(why=f"{type(error).__name__}: {error}"), NDIFVersionWarning, stacklevel=4)
    if mismatches:
        differ = "; ".join(f"{p} {v['local']} here, {v['remote']} on NDIF" for p, v in sorted(mismatches.items()))
        pins = " ".join(f"'{p}=={v['remote']}'" for p, v in sorted(mismatches.items()))
        warnings.warn(
            f"Versions that decide how traces run differ from the NDIF server's: {differ}. Remote "
            f"results may differ from local ones, or requests may fail with an architecture "
            f"mismatch. To match the server: pip install {pins} (print(nnsight.compare()) shows all).",
            NDIFVersionWarning,
            stacklevel=4,
        )


@contextlib.contextmanager
def _pointed_at(host: str) -> Iterator[None]:
    """nnsight's status helpers read the configured host: point them at ``host`` meanwhile."""
    import nnsight.ndif as ndif
    from nnsight import CONFIG

    if CONFIG.API.HOST == host:
        yield
        return
    saved = CONFIG.API.HOST, ndif._REMOTE_ENV
    CONFIG.API.HOST, ndif._REMOTE_ENV = host, None
    try:
        yield
    finally:
        CONFIG.API.HOST, ndif._REMOTE_ENV = saved


# ----------------------------------------------------------------------------- the block


class Backend(RemoteBackend):
    """nnsight's `RemoteBackend`, checking each block with `check_block` before it is sent, and
    bounding each of its waits by `current_timeouts` (read per request): a wait that runs out is an
    `NDIFError` (``kind="<wait>_timeout"``) naming it. nnsight's own protocol code does the rest."""

    def _serialize(self, tracer):
        check_block(tracer)
        return super()._serialize(tracer)

    def _post(self, request, blob):
        t = current_timeouts()
        try:
            return _with_http_timeouts(RemoteBackend._post, t.connect, t.upload)(self, request, blob)
        except RemoteError as error:  # nnsight words every failure of the POST as "Failed to send request"
            timed_out = _http_timeout(
                error.__cause__, connect=t.connect, wait="upload", seconds=t.upload, where=f"NDIF at {self.host}",
                doing="sending the request (POST /request)",
                then="The job may or may not have been queued; the service may be overloaded: try again later.")
            if timed_out is None:
                raise
            raise timed_out from None

    def download_result(self, url):
        t = current_timeouts()
        try:
            return _with_http_timeouts(RemoteBackend.download_result, t.connect, t.download)(self, url)
        except Exception as error:
            from urllib.parse import urlsplit

            where = "the result's host" + (f" ({urlsplit(url).netloc})" if isinstance(url, str) else "")
            timed_out = _http_timeout(error, connect=t.connect, wait="download", seconds=t.download, where=where,
                                      doing="the download of the finished job's result",
                                      then="The link stays valid for about an hour.")
            if timed_out is None:
                raise
            raise timed_out from None

    def poll(self, tracer=None):
        t = current_timeouts()
        try:
            return _with_http_timeouts(RemoteBackend.poll, t.connect, t.status)(self, tracer)
        except Exception as error:
            timed_out = _job_status_timeout(error, t, self.host, self.job_id)
            if timed_out is None:
                raise
            raise timed_out from None

    def request(self, request, tracer):
        """nnsight's blocking request with every wait bounded: open ``/subscribe`` and read its
        session id (``subscribe``), POST the block (``upload``), then follow the status stream,
        shown as it goes, until COMPLETED (``job``) and fetch the result (``download``)."""
        t = current_timeouts()
        blob = self._serialize(tracer)
        connection, request.session_id = self._subscribe(t)
        try:
            received = self._post(request, blob)
            self.handle(received)
            return self._follow(connection, t, received)
        finally:
            connection.close()

    def _subscribe(self, t: Timeouts):
        """The open ``/subscribe`` websocket and the session id it sent first, within ``t.subscribe``."""
        import websocket

        started, connection = time.monotonic(), None
        try:
            connection = websocket.create_connection(
                f"{self.ws_host}/subscribe", header={"ndif-api-key": self.api_key} if self.api_key else None,
                timeout=t.subscribe)
            connection.settimeout(max(0.001, t.subscribe - (time.monotonic() - started)))
            return connection, json.loads(connection.recv())["session_id"]
        except websocket.WebSocketTimeoutException:
            what = "answered the upgrade" if connection is None else "sent the session id"
            error = _timed_out("subscribe", t.subscribe,
                               f"NDIF at {self.host} was reached, but its /subscribe websocket never {what}",
                               "Nothing was sent; the service may be overloaded: try again later.")
        except TimeoutError:  # the connection itself did not open
            error = _timed_out("subscribe", t.subscribe,
                               f"Could not open the /subscribe websocket to NDIF at {self.host}",
                               "Nothing was sent. Check the network and NDIF_HOST; nnsight.status() shows whether "
                               "the service is up.")
        if connection is not None:
            connection.close(timeout=1)
        raise error

    def _follow(self, connection, t: Timeouts, received):
        """The status stream until COMPLETED (the result) or ERROR (`RemoteError`), within the
        ``job`` wait; shown as it goes by nnsight's display, queue position included."""
        import websocket
        from nnsight.schema.response import Status

        limit, why = _job_limit(t, self.host, self.model_key)
        started = time.monotonic()
        last, last_at = received, started
        tick = 0.1 if self.display.enabled else 1.0  # wake to animate the display, or to check the clock
        while True:
            left = started + limit - time.monotonic()
            if left <= 0:
                said = f" ({last.description})" if last.description else ""
                raise _timed_out(
                    "job", limit, f"NDIF received the job ({received.id}) but it did not finish",
                    f"{why}Its last status was {last.status.value}{said}, {time.monotonic() - last_at:.0f} s "
                    f"before giving up; it may still be queued or running on the server. For long waits, "
                    f"nnattr.remote.submit(...) queues it and job.result() collects it later.")
            connection.settimeout(min(tick, left))
            try:
                message = connection.recv()
            except websocket.WebSocketTimeoutException:
                self.display.refresh()
                continue
            response = self.parse(message)
            if response.status != Status.LOG:
                last, last_at = response, time.monotonic()
            result = self.handle(response)
            if response.status == Status.COMPLETED:
                return result


def _job_status_timeout(error: BaseException, t: Timeouts, host: str, job_id: str) -> NDIFError | None:
    return _http_timeout(error, connect=t.connect, wait="status", seconds=t.status, where=f"NDIF at {host}",
                         doing=f"the status of job {job_id} (GET /response)",
                         then="The job itself is unaffected: ask again later.")


def _job_limit(t: Timeouts, host: str, model_key: str) -> tuple[float, str]:
    """The ``job`` wait in seconds, and where it comes from in words (empty when set)."""
    if t.job is not None:
        return t.job, ""
    limit = _CHECKED.get((host, model_key))
    if limit:
        return limit + JOB_ALLOWANCE, (f"That is the model's execution limit on this server ({limit:g} s) plus "
                                       f"{JOB_ALLOWANCE:g} s for the queue. ")
    return JOB_DEFAULT, ""


def backend_for(model, remote: Any = True, backend: Any = None):
    """The backend a remote recipe hands nnsight: the given one, or nnattr's checking `Backend`
    for ``remote=True`` / a host URL (built as ``model.trace(remote=...)`` would build nnsight's)."""
    if backend is not None:
        return backend
    return Backend(_model_key(model), host=_host(None, remote), env=model._remoteable_get_env())


def check_block(tracer) -> None:
    """Refuse, before sending, a traced block that names an nnattr object NDIF cannot load.

    NDIF runs the block's source against names shipped with it. nnattr is not installed there:
    only `nnattr.kernels` travels (by value, `prepare`). So a block that uses, say, a `Batch`
    or a helper from ``nnattr.arch`` inside the ``with`` would fail on the server after its
    queue wait. Raises `NDIFError` (``kind="unshippable"``) naming the file, the line and the fix.
    """
    import ast

    node, info = getattr(tracer, "node", None), getattr(tracer, "info", None)
    if node is None or info is None:
        return
    frame = info.frame
    scopes = (frame.f_locals, frame.f_globals)
    for name in ast.walk(ast.Module(body=node.body, type_ignores=[])):
        if not isinstance(name, ast.Name) or not isinstance(name.ctx, ast.Load):
            continue
        value = next((scope[name.id] for scope in scopes if name.id in scope), None)
        origin = _nnattr_origin(value)
        if origin is None:
            continue
        where = f"{frame.f_code.co_filename}, line {name.lineno}"
        raise NDIFError(
            f"{where}: the trace uses {name.id!r} ({origin}) inside the `with` block. NDIF runs that block "
            f"without nnattr installed (only nnattr.kernels travels with a request), so the request would fail "
            f"on the server. Read what the trace needs from {name.id!r} before the `with` (plain numbers, strings "
            f"and tensors travel), or use a function from nnattr.kernels. Nothing was sent.",
            kind="unshippable",
        )


def _nnattr_origin(value, depth: int = 1) -> str | None:
    """``"a Batch from nnattr.batch"`` when ``value`` (or an item of a container) comes from an
    nnattr module other than the kernels; None otherwise."""
    import types

    if isinstance(value, (dict, list, tuple, set)) and depth:
        items = value.values() if isinstance(value, dict) else value
        return next((o for o in (_nnattr_origin(v, depth - 1) for v in items) if o), None)
    if isinstance(value, types.ModuleType):  # an nnattr module, the kernels too: call functions by name
        name = value.__name__
        return f"the module {name} (call its functions by name: from {name} import ...)" \
            if name.split(".")[0] == "nnattr" else None
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        module, what = getattr(value, "__module__", "") or "", "a class" if isinstance(value, type) else "a function"
    else:
        module, what = type(value).__module__, f"a {type(value).__name__}"
    if module.split(".")[0] == "nnattr" and not module.startswith("nnattr.kernels"):
        return f"{what} from {module}"
    return None


# ----------------------------------------------------------------------------- errors


@contextlib.contextmanager
def errors(model=None, backend=None, *, remote: Any = True, batch_size: int | None = None) -> Iterator[None]:
    """Turn a failed remote request into an `NDIFError` that names the fix (API key removed).

    >>> with nnattr.remote.errors(model):                                               # doctest: +SKIP
    ...     with model.trace("Hello", remote=True):
    ...         logits = model.output.logits.save()
    """
    try:
        yield
    except (NDIFError, Deferred):
        raise
    except Exception as error:
        translated = translate(error, host=_host(backend, remote), repo_id=getattr(model, "repo_id", None),
                               batch_size=batch_size)
        if translated is None:
            raise
        error.args = tuple(_scrub(a) if isinstance(a, str) else a for a in error.args)
        raise translated from None


# (kind, pattern in the server's text, message): the first match wins. Messages use {model},
# {where}, {batch}, {smaller}, {last}, {text} and the pattern's named groups.
_SERVER_ERRORS = [
    ("not_hosted", r"Could not deploy this model\.\s*(?P<reason>.*)",
     "{model} is not hosted on NDIF ({where}): {reason} print(nnsight.status()) lists the models that are."),
    ("gradients", r"(?=.*does not require grad)(?=.*inference_mode)|OutOfOrderError: '[^']*\.grad'",
     "This NDIF deployment refuses gradients (its runner executes without autograd, as NDIF's sandboxed "
     "runner does), so gradient recipes (head_attribution, attribution_patching) cannot run on it. Use a "
     "forward-only recipe (direct_logit_attribution, logit_lens, attention_rollout), a deployment that "
     "allows gradients, or run locally."),
    ("frozen", r"does not require grad",
     "The backward found no gradient path: hosted models have frozen parameters, so a trace must call "
     ".requires_grad_(True) on its earliest activation (the recipes do it on model.embed.output)."),
    ("oom", r"OutOfMemoryError|CUDA out of memory",
     "NDIF ran out of GPU memory on this request{batch}. Pass {smaller} (each chunk is one request) or use "
     "shorter prompts."),
    ("timeout", r"exceeded the execution timeout of (?P<limit>[\d.]+s)",
     "The job ran past NDIF's execution time limit ({limit}). Send fewer prompts per request (batch_size=...) "
     "or shorter prompts."),
    ("module_missing", r"payload could not be read \(ModuleNotFoundError: No module named '(?P<name>[^']+)'",
     "NDIF could not load the request: module {name!r} is not installed on the server. Ship it by value "
     "before the trace: nnsight.register({name}) (nnattr.remote.prepare does this for nnattr.kernels)."),
    ("whitelist", r"Module (?P<name>\S+) is not whitelisted",
     "This NDIF server refused module {name!r}: code that runs in a trace may only use "
     + ", ".join(sorted(SERVER_IMPORTS)) + " and nnsight. Keep trace code within those, and call your own "
     "helpers by name (registered with nnsight.register), never through a module object."),
    ("architecture", r"doesn't match the one your code was traced against: it has no module at '(?P<path>[^']+)'",
     "The server's model has no module {path!r}: its transformers version builds a different module tree. "
     "print(nnsight.compare()) shows the versions; install the server's transformers."),
    ("api_key", r"^Failed to send request: (?P<detail>[^.]*API key[^.]*)",
     "NDIF rejected the API key ({detail}). Set NDIF_API_KEY to a valid key or run `nnsight login` "
     f"(get a key at {KEYS_URL})."),
    ("old_client", r"nnsight version .*(below the minimum|not provided)",
     "NDIF no longer accepts this nnsight version: pip install --upgrade nnsight, then check the rest with "
     "print(nnsight.compare())."),
    ("send", r"^Failed to send request: (?P<detail>.*)", "The request could not be sent to {where}: {detail}"),
    ("stale_source", r"WithBlockNotFoundError: nnsight found no `with` statement at (?P<line>\S+:\d+)",
     "The server looked for a nested `with` (an inner trace of a session, a backward) at {line} in a stale "
     "copy of that file's source: it keeps source caches from other requests, or shares a process with this "
     "client. NDIF's own servers do not. Run it again in a fresh server process, or remove the comment and "
     "blank lines above nested `with` statements in the trace."),
    ("server_code", r"Traceback \(most recent call last\)",
     "The trace failed on the server: {last}\nServer traceback:\n{text}"),
]


def translate(error: BaseException, *, host: str | None = None, repo_id: str | None = None,
              batch_size: int | None = None) -> NDIFError | None:
    """The `NDIFError` for an exception a remote request raised, or None if it is not one."""
    import httpx

    text = _scrub(str(error))
    where = host or "NDIF"
    if isinstance(error, RemoteError):
        context = dict(
            text=text, where=where, model=f"Model {repo_id!r}" if repo_id else "This model",
            batch=f" ({batch_size} prompts)" if batch_size else "", last=(text.strip().splitlines() or [""])[-1],
            smaller=f"batch_size={max(1, batch_size // 2)}" if batch_size else "a smaller batch_size",
        )
        for kind, pattern, message in _SERVER_ERRORS:
            found = re.search(pattern, text, re.S)
            if found:
                return NDIFError(message.format(**context, **found.groupdict()), kind=kind, server_message=text)
        return NDIFError(f"NDIF reported an error: {text}", kind="server", server_message=text)
    if isinstance(error, httpx.HTTPStatusError) and "/response/" not in str(error.request.url) \
            and error.response.status_code in (403, 404, 410):
        return NDIFError("The result's download link has expired (NDIF keeps a result for about an hour): run "
                         "the request again, and collect non-blocking jobs within the hour.",
                         kind="expired", server_message=text)
    if isinstance(error, (ConnectionError, TimeoutError, httpx.TransportError)) or \
            type(error).__module__.startswith("websocket"):
        return NDIFError(f"Could not reach NDIF at {where} ({type(error).__name__}). Check the network and "
                         f"NDIF_HOST; nnsight.status() shows whether the service is up.",
                         kind="unreachable", server_message=text)
    if type(error).__name__ == "ValidationError" and "EOF while parsing" in text:
        return NDIFError(f"NDIF ({where}) closed the connection before the job finished. Run it again; for "
                         f"long jobs, nnattr.remote.submit survives a dropped connection.",
                         kind="dropped", server_message=text)
    return None


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _scrub(text: str) -> str:
    """``text`` without any API key: the configured ones, quoted ones and key-shaped UUIDs."""
    from nnsight import CONFIG

    for key in {CONFIG.API.APIKEY, os.environ.get("NDIF_API_KEY")} - {None, ""}:
        text = text.replace(key, "<api key>")
    text = re.sub(r"(Invalid API key format: )'[^']*'", r"\1'<api key>'", text)
    return _UUID.sub("<api key>", text)


# ----------------------------------------------------------------------------- non-blocking jobs


def submit(recipe, model, *args: Any, **kwargs: Any) -> "Job":
    """Queue a recipe on NDIF without waiting; ``job.result()`` later gives the same `Attribution`.

    ``recipe`` is a recipe module (or its ``run``); the other arguments are the recipe's own
    (``remote`` may name a host URL). Each chunk of prompts (``batch_size``) is one NDIF job.
    NDIF keeps finished results for about an hour.
    """
    run = getattr(recipe, "run", recipe)
    if "backend" in kwargs:
        raise TypeError("submit() makes its own non-blocking backend; pass remote=<host URL> to pick a host")
    remote = kwargs.pop("remote", True)
    backend = _Submitter(model, _host(None, remote))
    try:
        run(model, *args, remote=remote, backend=backend, **kwargs)
    except Deferred:
        return Job(run, model, args, {**kwargs, "remote": remote}, tuple(backend.ids), backend.host,
                   backend.model_key)
    raise NDIFError(f"{run.__module__}.run finished without sending a trace: nothing to submit.", kind="usage")


class Job:
    """A recipe queued on NDIF (`submit`): ``status()``, ``done()``, ``result()``.

    ``ids`` are the NDIF job ids, one per chunk of prompts. ``result()`` downloads each chunk's
    saved scores and runs the recipe's own post-processing on them (the traces are not sent
    again), so it returns exactly what the blocking call returns.
    """

    def __init__(self, run: Callable, model, args: tuple, kwargs: dict, ids: tuple[str, ...], host: str,
                 model_key: str) -> None:
        self._run, self._model, self._args, self._kwargs = run, model, args, kwargs
        self.ids, self.host, self.model_key = ids, host, model_key
        self._saves: dict[str, dict] = {}

    def __repr__(self) -> str:
        return f"<nnattr.remote.Job {self._run.__module__} on {self.host}: {len(self.ids)} request(s) {list(self.ids)}>"

    def status(self) -> str:
        """The least advanced status over the job's requests (``ERROR`` first): ``RECEIVED``,
        ``QUEUED``, ``DISPATCHED``, ``RUNNING``, ``COMPLETED`` ..."""
        import httpx
        from nnsight.schema.response import ResponseModel

        found = []
        for job_id in self.ids:
            if job_id in self._saves:
                found.append("COMPLETED")
                continue
            key, t = _api_key(), current_timeouts()
            wait = httpx.Timeout(t.connect, read=t.status)
            with errors(self._model, remote=self.host):
                try:
                    response = httpx.get(f"{self.host}/response/{job_id}", timeout=wait,
                                         headers={"ndif-api-key": key} if key else None)
                except httpx.TimeoutException as error:
                    raise _job_status_timeout(error, t, self.host, job_id) from None
                if response.status_code == 404:
                    found.append("RECEIVED")  # no status stored yet
                    continue
                response.raise_for_status()
            found.append(ResponseModel.model_validate_json(response.text).status.value)
        return min(found, key=lambda s: _STAGES.index(s) if s in _STAGES else 0)

    def done(self) -> bool:
        """Whether every request finished (completed or failed)."""
        return self.status() in ("COMPLETED", "ERROR")

    def result(self, timeout: float | None = None, poll_interval: float = 1.0):
        """Wait (at most ``timeout`` seconds, if given) and return the recipe's result. Each poll
        and the download are bounded as `current_timeouts` says (``status``, ``download``)."""
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not 0 <= timeout < math.inf):
            raise ValueError(f"timeout={timeout!r}: give the seconds to wait (0: look once), or None to wait "
                             f"until the job finishes")
        deadline = None if timeout is None else time.monotonic() + timeout
        with errors(self._model, remote=self.host):
            for job_id in self.ids:
                last_look = False
                while job_id not in self._saves:
                    saves = Backend(self.model_key, host=self.host, blocking=False, job_id=job_id)()
                    if saves is not None:
                        self._saves[job_id] = saves
                    elif deadline is not None and time.monotonic() > deadline:
                        status = self.status()
                        if status == "COMPLETED" and not last_look:  # it finished as the time ran out: fetch it
                            last_look = True
                            continue
                        raise NDIFError(f"Job not finished after {timeout:g} s (status {status}): call result() "
                                        f"again later; NDIF keeps results about an hour.", kind="pending")
                    else:
                        time.sleep(poll_interval)
        replay = _Replay(self.model_key, self.host, [self._saves[i] for i in self.ids])
        return self._run(self._model, *self._args, backend=replay, **self._kwargs)


class _Submitter(Backend):
    """Posts each trace as a non-blocking NDIF job, then stops the recipe with `Deferred`."""

    def __init__(self, model, host: str) -> None:
        super().__init__(_model_key(model), host=host, env=model._remoteable_get_env(), blocking=False)
        self.ids: list[str] = []

    def __call__(self, tracer=None):
        self.job_id = None
        self.submit(tracer)
        self.ids.append(self.job_id)
        raise Deferred(self.job_id)


class _Replay(RemoteBackend):
    """Hands a recipe's traces the saves its submitted jobs returned, in order, sending nothing."""

    def __init__(self, model_key: str, host: str, saves: list[dict]) -> None:
        super().__init__(model_key, host=host)
        self.saves = list(saves)

    def __call__(self, tracer=None):
        result = self.saves.pop(0)
        self._push(result, tracer)
        return result


# ----------------------------------------------------------------------------- command line


def add_cli_arguments(parser) -> None:
    """Add ``--remote`` and ``--ndif-host`` to an argparse parser. The API key never goes on a
    command line: NDIF_API_KEY or ``nnsight login``. The waits are set by environment variables,
    ``NNATTR_NDIF_TIMEOUT_<WAIT>`` (`Timeouts`), which reach every command without a flag each."""
    parser.add_argument("--remote", action="store_true",
                        help="run on NDIF (API key: NDIF_API_KEY or `nnsight login`; longer waits: "
                             "NNATTR_NDIF_TIMEOUT_JOB=<seconds>, ..._CONNECT, _SUBSCRIBE, _UPLOAD, _STATUS, _DOWNLOAD)")
    parser.add_argument("--ndif-host", metavar="URL", default=None,
                        help="NDIF host for --remote (default: NDIF_HOST, else https://api.ndif.us)")


def remote_kwargs(args) -> dict:
    """The recipe keyword arguments for parsed `add_cli_arguments` flags: ``{}`` locally,
    ``{"remote": True}`` or ``{"remote": host}``."""
    if not getattr(args, "remote", False):
        return {}
    host = getattr(args, "ndif_host", None)
    return {"remote": host or True}
