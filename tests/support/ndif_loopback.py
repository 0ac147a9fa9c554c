"""A loopback NDIF server for tests: nnsight's real client against NDIF's own core.

`LoopbackNDIF` binds 127.0.0.1 on a free port and speaks the wire protocol of
nnsight 0.8's `RemoteBackend` as served by the `ndif` 0.1.2 API app
(`ndif/services/api/app.py`):

- ``GET /subscribe`` upgrades to a plain RFC 6455 websocket (not socket.io); the
  first frame is the text ``{"session_id": ...}``, then every status update for
  requests posted with that session id: JSON text frames, and a COMPLETED that
  carries the result inline as one binary frame (``ResponseModel.pickle()``).
- ``POST /request`` takes multipart form field ``data`` (the `RequestModel` JSON)
  and file ``blob`` (the serialized block), answers RECEIVED over HTTP, and
  queues the request for the single model replica.
- ``GET /response/{id}``: latest status JSON of a non-blocking request (404
  until its first status lands).
- ``GET /results/{id}.pt``: the "presigned" download url a COMPLETED carries
  when the result is too big to go inline, or has no websocket to go to.
- ``GET /status``, ``/env``, ``/ping``, ``/connected``, ``/whoami``: what
  `nnsight.status`, `is_model_running`, `compare` and `whoami` read.

A request runs the way the model actor in ``ndif/services/ray/deployments/
modeling/base.py`` runs it: apply the request env (`_remoteable_set_env`, which
switches ``attn_implementation``), deserialize with
`BackendRequestModel.deserialize` inside `block_scope`, run with
`prepare_traced_block` / `execute_traced_block`, `torch.save` the saves with
ndif's `cpu_pickle_module`, zstd-compress at level 3 when the request was
compressed, format failures like the actor's ``format_error``. The served model
is a separate instance, in eval mode with ``requires_grad_(False)``.

Faults on demand (each off by default, see `LoopbackNDIF`): ``hang`` makes a
route or the job accept the client and then answer nothing (a hung subscribe,
upload, status, env or download, a job that never finishes), ``missing_routes``
answers 404 on routes an older server lacks (``/env``), and
``trainable_weights`` serves parameters that require grad, as a self-hosted
server that never froze its model does.

Test support code, not public API. Runs in-process (background threads), so do
not run client traces concurrently with a non-blocking job still executing:
nnsight patches process-global state (``Tensor.grad``, its source caches) while
a block runs.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import queue
import re
import select
import socket
import struct
import sys
import threading
import time
import traceback
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch

__all__ = [
    "DEFAULT_SERVER_PACKAGES",
    "HANGS",
    "INLINE_LIMIT_BYTES",
    "OLD_SERVER_IMPORT_WHITELIST",
    "LoopbackNDIF",
    "RequestRecord",
    "client_config",
    "offline_repo_ids",
]

#: Largest result sent back inline on the websocket. ndif derives it from the
#: Redis pubsub output-buffer limits; its conservative default is Redis's stock
#: soft limit, 8 MiB (`ndif.common.providers.redis.STOCK_PUBSUB_SOFT_LIMIT_BYTES`).
INLINE_LIMIT_BYTES = 8 * 1024 * 1024

#: Import roots the *older* NDIF server allowed in user code. ndif 0.1.2 has no
#: import whitelist; pass this as ``import_whitelist=`` to emulate the old one.
OLD_SERVER_IMPORT_WHITELIST = frozenset(
    {
        "torch", "numpy", "math", "collections", "typing", "einops", "operator",
        "enum", "time", "pandas", "sympy", "nnsight", "__future__",
    }
)

#: Top-level packages (besides the standard library) installed on an NDIF
#: server. A payload that refers *by reference* to anything else (a pip-installed
#: library not registered with `nnsight.register`) fails to unpickle there with
#: ModuleNotFoundError; the loopback reproduces that. ``server_packages=None``
#: turns the check off.
DEFAULT_SERVER_PACKAGES = frozenset(
    {
        "torch", "numpy", "transformers", "accelerate", "diffusers", "einops",
        "peft", "nnsight", "ndif", "cloudpickle", "pydantic", "pydantic_core",
        "safetensors", "tokenizers", "huggingface_hub", "zstandard", "greenlet",
        "sympy", "mpmath", "packaging", "yaml", "regex", "tqdm", "filelock",
        "fsspec", "jinja2", "typing_extensions", "networkx",
    }
)

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OOM_MESSAGE = (
    "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
    "of 79.19 GiB of which 3.06 GiB is free. Including non-PyTorch memory, this "
    "process has 76.12 GiB memory in use. Of the allocated memory 74.02 GiB is "
    "allocated by PyTorch, and 1.27 GiB is reserved by PyTorch but unallocated. "
    "(simulated by LoopbackNDIF)"
)


def _forget_client_sources() -> None:
    """Empty nnsight's source caches and ``linecache``, as in a fresh server process.

    The server recompiles a block from the source the client sent and registers it in
    ``linecache``; a nested ``with`` (``backward()``, an inner trace of a session) is then found
    in that source. In this process the caches still hold the client's own files, which would
    be read instead: a block with a comment or blank line above a nested ``with`` would fail
    here although it runs on NDIF. `block_scope` (entered first) restores them afterwards.
    """
    import linecache

    from nnsight.tracing.globals import BLOCKS, SOURCES

    SOURCES.clear()
    BLOCKS.clear()
    linecache.cache.clear()


def _ndif():
    """The pieces of the `ndif` package the loopback runs (imported lazily, so a
    missing install fails at `start()` with a clear message, not at collection)."""
    try:
        from ndif.common.errors import RequestError
        from ndif.common.schema.request import BackendRequestModel
        from ndif.common.schema.response import Status
        from ndif.services.ray.deployments.modeling.nns import (
            block_scope,
            execute_traced_block,
            prepare_traced_block,
        )
        from ndif.services.ray.deployments.modeling.util import (
            cpu_pickle_module,
            kill_thread,
            request_meta,
        )
    except ImportError as error:  # pragma: no cover - environment problem
        raise RuntimeError(
            "LoopbackNDIF needs the ndif server package: "
            "pip install --no-deps --ignore-requires-python ndif==0.1.2"
        ) from error
    return types.SimpleNamespace(**locals())


# --------------------------------------------------------------------------
# What a test can read back
# --------------------------------------------------------------------------


@dataclasses.dataclass
class RequestRecord:
    """One request as it crossed the wire, and what the server did with it."""

    id: str
    model_key: str
    session_id: str
    compress: bool
    env: dict
    api_key: Optional[str]
    headers: dict
    #: The ``blob`` exactly as posted (zstd-compressed when ``compress``).
    request_bytes: bytes
    #: The result exactly as sent back (compressed when ``compress``), or None.
    result_bytes: Optional[bytes] = None
    #: "inline" (binary websocket frame), "url" (download), or None (no result).
    result_route: Optional[str] = None
    #: Lifecycle statuses in order, RECEIVED first (LOG lines are in ``logs``).
    statuses: list = dataclasses.field(default_factory=list)
    descriptions: list = dataclasses.field(default_factory=list)
    logs: list = dataclasses.field(default_factory=list)
    #: The ERROR description the client was sent, if the job failed.
    error: Optional[str] = None
    meta: Optional[dict] = None
    downloads: int = 0
    #: With ``trainable_weights``: whether a module's output required grad while the block ran (the
    #: request built an autograd graph on the server); None otherwise.
    built_graph: Optional[bool] = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    @property
    def blocking(self) -> bool:
        return bool(self.session_id)

    @property
    def status(self) -> Optional[str]:
        return self.statuses[-1] if self.statuses else None

    @property
    def request_size(self) -> int:
        return len(self.request_bytes)

    @property
    def result_size(self) -> int:
        return len(self.result_bytes) if self.result_bytes is not None else 0

    def wait(self, timeout: float = 30.0) -> bool:
        """Block until the job reached COMPLETED or ERROR (bounded)."""
        return self.done.wait(timeout)


class _Channel:
    """The outbound side of one ``/subscribe`` websocket."""

    def __init__(self, session_id: str, opened: float) -> None:
        self.session_id = session_id
        self.opened = opened
        self.frames: "queue.Queue[tuple[int, bytes]]" = queue.Queue()

    def put_text(self, text: str) -> None:
        self.frames.put((0x1, text.encode()))

    def put_binary(self, data: bytes) -> None:
        self.frames.put((0x2, data))


@dataclasses.dataclass
class _Job:
    record: RequestRecord
    request: Any  # BackendRequestModel
    model: Any  # the served nnsight model, or None when not hosted


# --------------------------------------------------------------------------
# HTTP + websocket plumbing (stdlib only)
# --------------------------------------------------------------------------


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, unfragmented server->client frame."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return head + payload


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = sock.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _ws_read_frame(sock: socket.socket) -> tuple[int, bytes]:
    first, second = _recv_exact(sock, 2)
    opcode, size = first & 0x0F, second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", _recv_exact(sock, 2))
    elif size == 127:
        (size,) = struct.unpack("!Q", _recv_exact(sock, 8))
    mask = _recv_exact(sock, 4) if second & 0x80 else None
    payload = _recv_exact(sock, size) if size else b""
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return opcode, payload


def _multipart(body: bytes, content_type: str) -> dict:
    """Split a multipart/form-data body into ``{field name: raw bytes}``."""
    match = re.search(r'boundary="?([^";]+)"?', content_type or "")
    if match is None:
        raise ValueError("multipart body without a boundary")
    delimiter = b"--" + match.group(1).encode()
    fields = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):
            break
        if part.startswith(b"\r\n"):
            part = part[2:]
        head, _, data = part.partition(b"\r\n\r\n")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        name = re.search(rb'name="([^"]*)"', head)
        if name is not None:
            fields[name.group(1).decode()] = data
    return fields


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, ndif: "LoopbackNDIF") -> None:
        self.ndif = ndif
        self.live: set = set()
        self.live_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address):
        with self.live_lock:
            self.live.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.live_lock:
            self.live.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        # A connection dropped by the client or by stop(): nothing to report.
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, OSError)):
            self.ndif.internal_errors.append(error)

    def abort_connections(self) -> None:
        with self.live_lock:
            live = list(self.live)
        for sock in live:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackNDIF/0.1"
    rbufsize = 0  # unbuffered: the websocket reads the raw socket after the upgrade
    timeout = 30  # bounds every blocking read on a connection

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- helpers ------------------------------------------------------------

    @property
    def ndif(self) -> "LoopbackNDIF":
        return self.server.ndif

    def _send(self, code: int, body: bytes = b"", content_type: str = "application/json",
              head_only: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if body and not head_only:
            self.wfile.write(body)
        self.close_connection = True

    def _json(self, code: int, value: Any, head_only: bool = False) -> None:
        self._send(code, json.dumps(value).encode(), head_only=head_only)

    def _detail(self, code: int, detail: Any) -> None:
        # FastAPI's shape for an HTTPException, which the client unwraps.
        self._json(code, {"detail": detail})

    def _body(self) -> bytes:
        size = int(self.headers.get("Content-Length") or 0)
        return _recv_exact(self.connection, size) if size else b""

    # -- routes -------------------------------------------------------------

    def do_HEAD(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/connected":
            self._json(200, {"status": "connected"}, head_only=True)
        else:
            self._json(404, {"detail": "Not Found"}, head_only=True)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in self.ndif.missing_routes:
            return self._detail(404, "Not Found")
        if path == "/subscribe":
            return self._subscribe()
        if path == "/ping":
            return self._json(200, "pong")
        if path == "/connected":
            return self._json(200, {"status": "connected"})
        if path == "/status":
            return self._hold() if "status" in self.ndif.hang else self._json(200, self.ndif._status_json())
        if path == "/env":
            return self._hold() if "env" in self.ndif.hang else self._json(200, self.ndif._env_json())
        if path == "/whoami":
            return self._json(200, self.ndif._whoami(self.headers.get("ndif-api-key")))
        if path.startswith("/response/"):
            data = self.ndif._responses.get(path[len("/response/"):])
            if data is None:
                return self._detail(404, f"No response for request {path[len('/response/'):]}.")
            return self._send(200, data)
        if path.startswith("/results/"):
            return self._download(path[len("/results/"):])
        return self._detail(404, "Not Found")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/request" or path in self.ndif.missing_routes:
            return self._detail(404, "Not Found")
        body = self._body()
        if "request" in self.ndif.hang:  # read the upload, never answer it (nothing is queued)
            return self._hold()
        try:
            status, payload = self.ndif._accept(self.headers, body)
        except Exception as error:  # FastAPI's unhandled-exception answer
            self.ndif.internal_errors.append(error)
            return self._detail(500, "Internal server error.")
        if status != 200:
            return self._detail(status, payload)
        self._send(200, payload.encode())

    def _download(self, name: str) -> None:
        ndif = self.ndif
        if "download" in ndif.hang:
            return self._hold()
        if ndif.result_url_status is not None:
            # What an expired presigned S3 link answers.
            return self._send(
                ndif.result_url_status,
                b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied"
                b"</Code><Message>Request has expired</Message></Error>",
                content_type="application/xml",
            )
        request_id = name[:-3] if name.endswith(".pt") else name
        blob = ndif._results.get(request_id)
        if blob is None:
            return self._send(404, b"", content_type="application/xml")
        record = ndif._records.get(request_id)
        if record is not None:
            record.downloads += 1
        self._send(200, blob, content_type="application/octet-stream")

    def _hold(self) -> None:
        """Fault injection: answer nothing, holding the connection until the client closes it,
        the server stops, or ``session_timeout`` passes."""
        self.close_connection = True
        ndif, sock = self.ndif, self.connection
        deadline = time.monotonic() + ndif.session_timeout
        while not ndif._stopping.is_set() and time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0.05)
            try:
                if readable and not sock.recv(1 << 16):
                    return  # the client gave up
            except OSError:
                return

    def _subscribe(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key")
        if (self.headers.get("Upgrade") or "").lower() != "websocket" or not key:
            return self._detail(400, "Expected a websocket upgrade.")
        accept = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.close_connection = True

        ndif = self.ndif
        sock = self.connection
        channel = ndif._open_channel()
        silent = "subscribe" in ndif.hang  # fault: upgraded, then no session id and no updates
        try:
            # Like the real app: the channel exists before the id is handed out.
            if not silent:
                sock.sendall(_ws_frame(0x1, json.dumps({"session_id": channel.session_id}).encode()))
            while True:
                if ndif._stopping.is_set():
                    return self._ws_give_up(sock, channel, "LoopbackNDIF was stopped.", 1001)
                if time.monotonic() - channel.opened > ndif.session_timeout:
                    # Bounds a client that would otherwise wait forever.
                    return self._ws_give_up(
                        sock, channel,
                        f"LoopbackNDIF closed this session after session_timeout="
                        f"{ndif.session_timeout}s.", 1011,
                    )
                while not silent:
                    try:
                        opcode, data = channel.frames.get_nowait()
                    except queue.Empty:
                        break
                    sock.sendall(_ws_frame(opcode, data))
                readable, _, _ = select.select([sock], [], [], 0.02)
                if readable:
                    opcode, data = _ws_read_frame(sock)
                    if opcode == 0x8:  # close: answer it, or the client waits 3 s
                        sock.sendall(_ws_frame(0x8, data[:2]))
                        return
                    if opcode == 0x9:
                        sock.sendall(_ws_frame(0xA, data))
        except (OSError, ConnectionError, ValueError):
            return
        finally:
            ndif._close_channel(channel)

    def _ws_give_up(self, sock: socket.socket, channel: _Channel, reason: str, code: int) -> None:
        """Loopback-only: end a waiting client with an ERROR it raises as
        RemoteError(reason), then close. (A real server that just drops the
        socket makes the client fail parsing an empty frame: pydantic
        ValidationError "Invalid JSON: EOF while parsing a value".)"""
        error = json.dumps({"id": f"loopback-{channel.session_id}", "status": "ERROR",
                            "description": reason})
        sock.sendall(_ws_frame(0x1, error.encode()))
        sock.sendall(_ws_frame(0x8, struct.pack("!H", code)))


# --------------------------------------------------------------------------
# Server-side execution guards (emulations, each off unless asked for)
# --------------------------------------------------------------------------


def _is_user_frame(frame: types.FrameType) -> bool:
    """Code that arrived in the request (the block, by-value helpers) runs with
    globals that are no importable module's namespace; library code does not."""
    glbls = frame.f_globals
    name = dict.get(glbls, "__name__") if isinstance(glbls, dict) else None
    module = sys.modules.get(name) if isinstance(name, str) else None
    return module is None or getattr(module, "__dict__", None) is not glbls


def _module_roots(value: Any, seen: set) -> Iterator[tuple[str, str]]:
    """(root, name) of modules a deserialized value refers to: module objects,
    and the globals of by-value functions, recursively."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, types.ModuleType):
        yield value.__name__.split(".")[0], value.__name__
    elif isinstance(value, types.FunctionType):
        module = sys.modules.get(value.__module__ or "")
        if module is not None and getattr(module, "__dict__", None) is value.__globals__:
            yield value.__module__.split(".")[0], value.__module__
        else:
            for item in list(value.__globals__.values()):
                yield from _module_roots(item, seen)


def _restricted_unpickler(allowed: frozenset):
    """nnsight's unpickler, refusing modules the server does not have installed."""
    from cloudpickle import cloudpickle as _cp
    from nnsight.intervention.serialization import CustomCloudUnpickler

    def check(module: str) -> None:
        root = module.split(".")[0]
        if root not in allowed and root not in sys.stdlib_module_names:
            raise ModuleNotFoundError(f"No module named '{root}'", name=root)

    def subimport(name: str) -> Any:
        check(name)
        return _cp.subimport(name)

    class LoopbackUnpickler(CustomCloudUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            check(module)
            found = super().find_class(module, name)
            return subimport if found is _cp.subimport else found

    return LoopbackUnpickler


class _ThreadStream(io.TextIOBase):
    """sys.stdout/stderr stand-in: writes from the executing thread become LOG
    updates (like the actor's LogStream), everyone else's go where they went."""

    def __init__(self, original: Any, thread: threading.Thread, emit: Callable[[str], None]):
        self.original, self.thread, self.emit, self.buffer_ = original, thread, emit, ""

    def write(self, text: str) -> int:
        if threading.current_thread() is not self.thread:
            return self.original.write(text)
        self.buffer_ += text
        while "\n" in self.buffer_:
            line, self.buffer_ = self.buffer_.split("\n", 1)
            self.emit(line)
        return len(text)

    def flush(self) -> None:
        if threading.current_thread() is self.thread or not hasattr(self.original, "flush"):
            return
        self.original.flush()

    def drain(self) -> None:
        if self.buffer_:
            self.emit(self.buffer_)
            self.buffer_ = ""


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------

_OPTIONS = (
    "api_keys", "inline_limit", "force_download", "refuse_gradients", "simulate_oom",
    "import_whitelist", "server_packages", "execution_timeout", "session_timeout",
    "min_nnsight_version", "undeployable_reason", "result_url_status", "queue_delay",
    "hang", "missing_routes", "trainable_weights",
)

#: What ``hang=`` can name: the routes and the job a faulty server never answers.
HANGS = frozenset({"subscribe", "request", "status", "env", "download", "job"})


def _hangs(names: Iterable[str]) -> frozenset:
    names = frozenset([names] if isinstance(names, str) else names)
    if not names <= HANGS:
        raise ValueError(f"hang={sorted(names)}: each one of {sorted(HANGS)}")
    return names


class LoopbackNDIF:
    """A loopback NDIF server on 127.0.0.1 for nnsight's real client.

    Args:
        models: ``{key: model_or_factory}``. A key is a repo id (matched against
            the ``repo_id`` in the client's model key) or a full model key
            (``"nnsight.modeling.transformers.TransformersModel:{...}"``, matched
            exactly). A value is an nnsight model (e.g. ``TransformersModel``) or
            a zero-argument callable returning one. It must be a *separate*
            instance from the client's: the server puts it in eval mode and
            freezes it (``requires_grad_(False)``), as NDIF does.
        api_keys: None (auth off, like ndif without Postgres) or the set of keys
            to accept; then a missing key gets 401, a non-UUID key 400, an
            unknown one 403, with ndif's messages.
        inline_limit: results up to this many bytes go back inline on the
            websocket; larger ones (and every non-blocking result) by url.
        force_download: send every result by url.
        refuse_gradients: run blocks under ``torch.inference_mode()``, so a
            backward fails the way nnsight words it for a gradient-less backend
            (stand-in for the sandboxed runner, which cannot backprop).
        simulate_oom: the model's forward raises ``torch.OutOfMemoryError``.
        import_whitelist: None (ndif 0.1.2: no whitelist) or the import roots
            user code may import, emulating the older server
            (`OLD_SERVER_IMPORT_WHITELIST`).
        server_packages: packages "installed" server-side; a payload referring
            by reference to anything else fails to unpickle (None: no check).
        execution_timeout: seconds a block may run; then ERROR, as ndif's.
        session_timeout: seconds a websocket may stay open; then the server
            closes it, so a waiting client raises instead of hanging.
        min_nnsight_version: gate clients like ``NDIF_MIN_NNSIGHT_VERSION``.
        undeployable_reason: the reason in "Could not deploy this model. ..."
            sent for a model key this server does not host.
        result_url_status: answer downloads with this HTTP status (e.g. 403,
            what an expired presigned link gives).
        queue_delay: seconds a request waits in the queue before it runs.
        hang: what the server accepts and then never answers (`HANGS`):
            ``"subscribe"`` (the websocket upgrades, then sends no session id),
            ``"request"`` (``POST /request`` is read, never answered, nothing
            queued), ``"status"``, ``"env"``, ``"download"`` (those GETs), or
            ``"job"`` (a request is QUEUED, then never runs nor ends). A held
            connection ends when the client closes it, at ``stop()``, or after
            ``session_timeout``.
        missing_routes: paths answered 404 as by a server without them, e.g.
            ``{"/env"}`` (an older server: no version comparison).
        trainable_weights: the served parameters require grad while a block
            runs (a server that never froze its model), so a forward that does
            not turn gradients off builds an autograd graph there.
        dtype: cast the served model to this dtype (e.g. ``torch.bfloat16``,
            as NDIF serves); user ops then run under autocast to it (CUDA
            autocast when available, as ndif does, else CPU autocast).

    Every option except ``models`` and ``dtype`` is a plain attribute read per
    request, so a test may change it, or use ``with server.configure(...)``.
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        *,
        api_keys: Optional[Iterable[str]] = None,
        inline_limit: int = INLINE_LIMIT_BYTES,
        force_download: bool = False,
        refuse_gradients: bool = False,
        simulate_oom: bool = False,
        import_whitelist: Optional[Iterable[str]] = None,
        server_packages: Optional[Iterable[str]] = DEFAULT_SERVER_PACKAGES,
        execution_timeout: float = 30.0,
        session_timeout: float = 60.0,
        min_nnsight_version: Optional[str] = None,
        undeployable_reason: str = "This model is not hosted on this server.",
        result_url_status: Optional[int] = None,
        queue_delay: float = 0.0,
        hang: Iterable[str] = (),
        missing_routes: Iterable[str] = (),
        trainable_weights: bool = False,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        self._sources = dict(models)
        self.api_keys = set(api_keys) if api_keys is not None else None
        self.inline_limit = inline_limit
        self.force_download = force_download
        self.refuse_gradients = refuse_gradients
        self.simulate_oom = simulate_oom
        self.import_whitelist = frozenset(import_whitelist) if import_whitelist is not None else None
        self.server_packages = frozenset(server_packages) if server_packages is not None else None
        self.execution_timeout = execution_timeout
        self.session_timeout = session_timeout
        self.min_nnsight_version = min_nnsight_version
        self.undeployable_reason = undeployable_reason
        self.result_url_status = result_url_status
        self.queue_delay = queue_delay
        self.hang = _hangs(hang)
        self.missing_routes = frozenset(missing_routes)
        self.trainable_weights = trainable_weights
        self.dtype = dtype
        self._defaults = {name: getattr(self, name) for name in _OPTIONS}

        #: Every request, in arrival order.
        self.requests: list[RequestRecord] = []
        #: Exceptions the loopback itself hit (a test can assert it stays empty).
        self.internal_errors: list[BaseException] = []
        self._records: dict[str, RequestRecord] = {}
        self._models: dict[str, Any] = {}
        self._served_keys: dict[str, str] = {}
        self._channels: dict[str, _Channel] = {}
        self._responses: dict[str, bytes] = {}
        self._results: dict[str, bytes] = {}
        self._jobs: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: Optional[_HTTPServer] = None
        self._threads: list[threading.Thread] = []
        self._exec_thread: Optional[threading.Thread] = None
        self.host: Optional[str] = None

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> "LoopbackNDIF":
        if self._httpd is not None:
            return self
        self._core = _ndif()
        # ndif logs every status change (ERROR at WARNING); without a handler
        # Python's last-resort handler would print those to stderr.
        ndif_logger = logging.getLogger("ndif")
        if not any(isinstance(h, logging.NullHandler) for h in ndif_logger.handlers):
            ndif_logger.addHandler(logging.NullHandler())
        for key, source in self._sources.items():
            if key in self._models:  # restarted: keep the instance already served
                continue
            model = source() if callable(source) and not hasattr(source, "_remoteable_persistent_objects") else source
            if not hasattr(model, "_remoteable_persistent_objects"):
                raise TypeError(f"models[{key!r}] is not an nnsight model: {type(model).__name__}")
            # What the actor does after loading: inference only, frozen.
            model._module.eval()
            model._module.requires_grad_(False)
            if self.dtype is not None:
                model._module.to(self.dtype)
            self._models[key] = model
        self._stopping.clear()
        self._jobs = queue.Queue()
        self._httpd = _HTTPServer(self)
        self.port = self._httpd.server_address[1]
        self.host = f"http://127.0.0.1:{self.port}"
        serve = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name="loopback-ndif-http", daemon=True,
        )
        work = threading.Thread(target=self._worker, name="loopback-ndif-replica", daemon=True)
        self._threads = [serve, work]
        serve.start()
        work.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: close websockets and connections, fail the running job.
        Idempotent, and safe to call from any thread (e.g. a watchdog timer)."""
        with self._stop_lock:
            httpd, self._httpd = self._httpd, None
            if httpd is None:
                return
            self._stopping.set()
            self._jobs.put(None)
            running = self._exec_thread
            if running is not None and running.is_alive():
                self._core.kill_thread(running.ident)
            httpd.shutdown()
            time.sleep(0.05)  # let websocket loops send their close frames
            httpd.abort_connections()
            httpd.server_close()
            deadline = time.monotonic() + timeout
            for thread in self._threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            self._threads = []

    def __enter__(self) -> "LoopbackNDIF":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- test conveniences ----------------------------------------------------

    @property
    def ws_host(self) -> str:
        return "ws" + self.host[len("http"):]

    @property
    def last(self) -> RequestRecord:
        return self.requests[-1]

    def model(self, key: str) -> Any:
        """The served model instance for ``key`` (as given to ``models``)."""
        return self._models[key]

    @contextlib.contextmanager
    def configure(self, **options: Any) -> Iterator["LoopbackNDIF"]:
        """Temporarily change options (see the class docstring)."""
        unknown = set(options) - set(_OPTIONS)
        if unknown:
            raise TypeError(f"unknown LoopbackNDIF options: {sorted(unknown)}")
        if "hang" in options:
            options["hang"] = _hangs(options["hang"])
        if "missing_routes" in options:
            options["missing_routes"] = frozenset(options["missing_routes"])
        saved = {name: getattr(self, name) for name in options}
        for name, value in options.items():
            setattr(self, name, value)
        try:
            yield self
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    def reset(self) -> None:
        """Restore constructor options and forget recorded requests."""
        for name, value in self._defaults.items():
            setattr(self, name, value)
        with self._lock:
            self.internal_errors.clear()
            self.requests.clear()
            self._records.clear()
            self._responses.clear()
            self._results.clear()

    # -- channels -------------------------------------------------------------

    def _open_channel(self) -> _Channel:
        import uuid

        channel = _Channel(uuid.uuid4().hex, time.monotonic())
        with self._lock:
            self._channels[channel.session_id] = channel
        return channel

    def _close_channel(self, channel: _Channel) -> None:
        with self._lock:
            self._channels.pop(channel.session_id, None)

    # -- ingress (POST /request) ------------------------------------------------

    def _accept(self, headers: Any, body: bytes) -> tuple[int, Any]:
        core = self._core
        try:
            fields = _multipart(body, headers.get("Content-Type"))
            data = fields["data"].decode()
            blob = fields["blob"]
        except (KeyError, ValueError, UnicodeDecodeError) as error:
            return 422, f"Malformed multipart request: {error}"

        failure = self._check_versions(headers.get("nnsight-version"), headers.get("python-version"))
        if failure:
            return 400, failure

        try:
            request = core.BackendRequestModel.model_validate_json(data)
        except Exception as error:  # pydantic ValidationError / JSON error
            return 422, str(error)
        client_set_trusted = "trusted" in request.model_fields_set
        api_key = headers.get("ndif-api-key")
        if api_key:
            request.api_key = api_key
        failure = self._check_key(request.api_key)
        if failure:
            return failure
        if not client_set_trusted:
            request.trusted = True  # auth-off default of ndif's validate_request
        request.payload = blob

        record = RequestRecord(
            id=request.id,
            model_key=request.model_key,
            session_id=request.session_id,
            compress=request.compress,
            env=dict(request.env),
            api_key=request.api_key,
            headers={k.lower(): v for k, v in headers.items()},
            request_bytes=blob,
        )
        response = request.response(
            core.Status.RECEIVED, "Your job has been received and is waiting to be queued."
        )
        record.statuses.append(response.status.value)
        record.descriptions.append(response.description)
        with self._lock:
            self.requests.append(record)
            self._records[record.id] = record
        self._jobs.put(_Job(record, request, self._lookup(request.model_key)))
        return 200, response.model_dump_json()

    def _check_key(self, api_key: Optional[str]) -> Optional[tuple[int, str]]:
        if self.api_keys is None:
            return None
        if not api_key:
            return 401, ("Missing or invalid API key. Please visit "
                         "https://login.ndif.us/ to create a new one.")
        import uuid

        try:
            uuid.UUID(api_key)
        except (ValueError, TypeError):
            return 400, (f"Invalid API key format: '{api_key}'. API keys must be in the "
                         "format: xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx. You can obtain a "
                         "valid API key from https://login.ndif.us")
        if api_key not in self.api_keys:
            return 403, "Invalid API key."
        return None

    def _check_versions(self, nnsight_version: Optional[str], python_version: Optional[str]) -> Optional[str]:
        if self.min_nnsight_version is None:
            return None
        from packaging.version import InvalidVersion, Version

        if not nnsight_version:
            return ("Client nnsight version was not provided. This usually means an "
                    "outdated nnsight; please `pip install --upgrade nnsight` and retry.")
        try:
            if Version(nnsight_version) < Version(self.min_nnsight_version):
                return (f"Client nnsight version {nnsight_version} is below the minimum "
                        f"supported {self.min_nnsight_version}. Please "
                        "`pip install --upgrade nnsight`.")
        except InvalidVersion:
            return f"Malformed nnsight version '{nnsight_version}'."
        return None

    def _lookup(self, model_key: str) -> Any:
        if model_key in self._models:
            return self._models[model_key]
        _, _, suffix = model_key.partition(":")
        try:
            repo_id = json.loads(suffix).get("repo_id")
        except (ValueError, AttributeError):
            return None
        model = self._models.get(repo_id)
        if model is not None:
            self._served_keys.setdefault(repo_id, model_key)
        return model

    # -- responses ------------------------------------------------------------

    def _respond(self, job: _Job, status: Any, description: str = "", data: Any = None,
                 pickled: bool = False, meta: Optional[dict] = None) -> None:
        """`BackendRequestModel.respond`, with the loopback's channels standing in
        for Redis pub/sub and the object store."""
        Status = self._core.Status
        request, record = job.request, job.record
        response = request.response(status, description, data, meta)
        if status == Status.LOG:
            record.logs.append(description)
        else:
            record.statuses.append(status.value)
            record.descriptions.append(description)
        if status == Status.ERROR:
            record.error = description
        if meta is not None:
            record.meta = meta
        if request.session_id:
            with self._lock:
                channel = self._channels.get(request.session_id)
            if channel is None:
                return  # nobody subscribed (the client left): published to nobody
            if pickled:
                channel.put_binary(response.pickle())
            else:
                channel.put_text(response.model_dump_json())
        elif status != Status.LOG:
            self._responses[request.id] = response.model_dump_json().encode()

    # -- the replica ------------------------------------------------------------

    def _worker(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self._jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            if job is None:
                break
            try:
                self._run(job)
            except Exception as error:  # never let the replica die silently
                self.internal_errors.append(error)
                with contextlib.suppress(Exception):
                    self._respond(job, self._core.Status.ERROR,
                                  f"LoopbackNDIF internal error: {error!r}")
            finally:
                job.record.done.set()

    def _run(self, job: _Job) -> None:
        core = self._core
        Status = core.Status
        request = job.request

        if job.model is None:
            # ndif's processor provisions on demand; the controller refuses a
            # model it cannot deploy and the queue errors the request with that.
            self._respond(job, Status.PROVISIONING, "Model Provisioning...")
            self._respond(job, Status.ERROR, f"Could not deploy this model. {self.undeployable_reason}")
            return

        self._respond(job, Status.QUEUED, f"Added to Queue at position {self._jobs.qsize() + 1}.")
        if "job" in self.hang:  # fault: the job is lost, queued for ever; the replica moves on
            return
        if self.queue_delay:
            self._stopping.wait(self.queue_delay)
        self._respond(job, Status.DISPATCHED, "Your job has been sent to the model deployment.")
        self._respond(job, Status.RUNNING, "Your job has started running.")

        model = job.model
        scope = core.block_scope()
        scope.__enter__()
        # A real server is another process: it has never read the client's files. Here the
        # client's nnsight caches (the source of the files it traced, the blocks it parsed) share
        # the process, so hide them for the request; block_scope restores them afterwards.
        _forget_client_sources()
        started = time.time()
        try:
            model._remoteable_set_env(request.env)
            outcome: dict = {}
            thread = threading.Thread(
                target=self._execute_into, args=(request, model, outcome),
                name="loopback-ndif-exec", daemon=True,
            )
            emit = functools.partial(self._respond, job, Status.LOG)
            streams = (_ThreadStream(sys.stdout, thread, emit), _ThreadStream(sys.stderr, thread, emit))
            saved_streams = (sys.stdout, sys.stderr)
            sys.stdout, sys.stderr = streams
            unfrozen = self._unfrozen(model, job.record) if self.trainable_weights else contextlib.nullcontext()
            try:
                self._exec_thread = thread
                with unfrozen:
                    thread.start()
                    thread.join(self.execution_timeout)
            finally:
                self._exec_thread = None
                if sys.stdout is streams[0]:
                    sys.stdout = saved_streams[0]
                if sys.stderr is streams[1]:
                    sys.stderr = saved_streams[1]
                for stream in streams:
                    stream.drain()
            exec_ms = (time.time() - started) * 1000
            if thread.is_alive():
                core.kill_thread(thread.ident)
                # Let the block unwind on its own thread before cleanup touches
                # the interleaver (its greenlets cannot be switched to from here).
                thread.join(5.0)
                self._respond(
                    job, Status.ERROR,
                    f"Your job exceeded the execution timeout of {self.execution_timeout}s.",
                    meta=core.request_meta({}, {}, exec_ms),
                )
                return
            if "error" in outcome:
                raise outcome["error"]
            blob = outcome["blob"]
            if request.compress:
                import zstandard

                blob = zstandard.ZstdCompressor(level=3).compress(blob)
        except BaseException as exception:  # incl. SystemExit from a kill on stop()
            exec_ms = (time.time() - started) * 1000
            self._respond(
                job, Status.ERROR, self._format_error(exception),
                meta=core.request_meta({}, {}, exec_ms, exception),
            )
            return
        finally:
            scope.__exit__(None, None, None)
            with contextlib.suppress(Exception):
                model.interleaver.cancel()

        job.record.result_bytes = blob
        meta = core.request_meta({}, {}, exec_ms)
        if request.session_id and not self.force_download and len(blob) <= self.inline_limit:
            job.record.result_route = "inline"
            self._respond(job, Status.COMPLETED, "Your job has been completed.",
                          data=blob, pickled=True, meta=meta)
        else:
            self._results[request.id] = blob
            job.record.result_route = "url"
            self._respond(job, Status.COMPLETED, "Your job has been completed.",
                          data=f"{self.host}/results/{request.id}.pt", meta=meta)

    def _execute_into(self, request: Any, model: Any, outcome: dict) -> None:
        try:
            outcome["blob"] = self._execute(request, model)
        except BaseException as error:  # SystemExit from kill_thread included
            outcome["error"] = error

    def _execute(self, request: Any, model: Any) -> bytes:
        """The actor's ``execute``: deserialize, run the block, torch.save the saves."""
        core = self._core
        deserialize = core.BackendRequestModel.deserialize
        if self.server_packages is not None:
            deserialize = functools.partial(
                deserialize, unpickler=_restricted_unpickler(self.server_packages)
            )
        tracer, _ = core.prepare_traced_block(model, request.payload, request.compress, deserialize)

        whitelist = self.import_whitelist
        if whitelist is not None:
            frame = tracer.info.frame
            seen: set = set()
            for value in [*frame.f_globals.values(), *frame.f_locals.values()]:
                for root, name in _module_roots(value, seen):
                    if root not in whitelist:
                        raise core.RequestError(f"Module {name} is not whitelisted")

        dtype = self.dtype or next(model._module.parameters()).dtype
        with contextlib.ExitStack() as stack:
            if self.refuse_gradients:
                stack.enter_context(torch.inference_mode())
            if self.simulate_oom:
                stack.enter_context(self._oom(model))
            if whitelist is not None:
                stack.enter_context(self._import_guard(whitelist))
            if (self.dtype in (torch.bfloat16, torch.float16)
                    and not torch.cuda.is_available()):
                # ndif autocasts user ops to the model dtype on CUDA; on a CPU
                # machine emulate that with CPU autocast.
                stack.enter_context(torch.autocast("cpu", dtype=self.dtype, cache_enabled=False))
            saved = core.execute_traced_block(tracer, dtype)

        buffer = io.BytesIO()
        torch.save(saved, buffer, pickle_module=core.cpu_pickle_module())
        return buffer.getvalue()

    @staticmethod
    @contextlib.contextmanager
    def _unfrozen(model: Any, record: RequestRecord) -> Iterator[None]:
        """The parameters require grad while the block runs (then frozen again, gradients dropped);
        ``record.built_graph`` says whether any module's output required grad meanwhile."""
        parameters = list(model._module.parameters())
        record.built_graph = False

        def hook(module: Any, args: Any, output: Any) -> None:
            outputs = [output] if isinstance(output, torch.Tensor) else list(output.values()) \
                if isinstance(output, Mapping) else list(output) if isinstance(output, (tuple, list)) else []
            if any(isinstance(t, torch.Tensor) and t.requires_grad for t in outputs):
                record.built_graph = True

        handles = [module.register_forward_hook(hook) for module in model._module.modules()]
        for parameter in parameters:
            parameter.requires_grad_(True)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for parameter in parameters:
                parameter.requires_grad_(False)
                parameter.grad = None

    @staticmethod
    @contextlib.contextmanager
    def _oom(model: Any) -> Iterator[None]:
        def hook(module: Any, args: Any) -> None:
            raise torch.OutOfMemoryError(_OOM_MESSAGE)

        handle = model._module.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @staticmethod
    @contextlib.contextmanager
    def _import_guard(whitelist: frozenset) -> Iterator[None]:
        """Refuse ``import x`` in request code for roots not in the whitelist
        (only on the executing thread; library-internal imports are left alone)."""
        original = builtins.__import__
        ident = threading.get_ident()

        def guarded(name, globals=None, locals=None, fromlist=(), level=0):
            if level == 0 and threading.get_ident() == ident and _is_user_frame(sys._getframe(1)):
                if name.split(".")[0] not in whitelist:
                    raise ImportError(f"Module {name} is not whitelisted")
            return original(name, globals, locals, fromlist, level)

        builtins.__import__ = guarded
        try:
            yield
        finally:
            builtins.__import__ = original

    def _format_error(self, exception: BaseException) -> str:
        """The actor's ``format_error``: a sentence for a rejected request, else
        the traceback with nnsight internals and the actor's frames dropped."""
        if isinstance(exception, self._core.RequestError):
            return str(exception)
        from nnsight.tracing.util import clean_traceback, filter_traceback

        tb = clean_traceback(exception.__traceback__)
        tb = filter_traceback(tb, lambda frame: frame.f_code.co_filename != __file__)
        return "".join(traceback.format_exception(type(exception), exception, tb))

    # -- read-only endpoints ------------------------------------------------------

    def _deployment_key(self, key: str, model: Any) -> str:
        if ":" in key:
            return key
        if key in self._served_keys:
            return self._served_keys[key]
        from nnsight.util import to_import_path

        data = {"repo_id": key, "revision": getattr(model, "revision", None)}
        if getattr(model, "task", None):
            data["task"] = model.task
        return f"{to_import_path(model._remoteable_class())}:{json.dumps(data)}"

    def _status_json(self) -> dict:
        deployments = {}
        for index, (key, model) in enumerate(self._models.items()):
            model_key = self._deployment_key(key, model)
            try:
                suffix = json.loads(model_key.partition(":")[2])
            except ValueError:
                suffix = {}
            deployments[f"ModelActor:{model_key}:{index}"] = {
                "application_state": "RUNNING",
                "deployment_level": "HOT",
                "model_key": model_key,
                "repo_id": suffix.get("repo_id", key),
                "task": suffix.get("task"),
                "revision": suffix.get("revision"),
                "trusted": True,
                "dtype": str(self.dtype or next(model._module.parameters()).dtype).removeprefix("torch."),
                "execution_timeout_seconds": self.execution_timeout,
                "n_params": sum(p.numel() for p in model._module.parameters()),
            }
        return {"deployments": deployments, "cluster": {"nodes": {}}}

    def _env_json(self) -> dict:
        from nnsight.ndif import get_local_env

        packages = {
            name: version
            for name, version in get_local_env()["packages"].items()
            if version != "local"
        }
        return {"python_version": sys.version, "packages": packages}

    def _whoami(self, api_key: Optional[str]) -> dict:
        if self.api_keys is None or not api_key or api_key not in self.api_keys:
            return {"email": None, "tags": []}
        return {"email": "loopback@example.com", "tags": []}


# --------------------------------------------------------------------------
# Pointing nnsight's client at a host
# --------------------------------------------------------------------------

_MISSING = object()


@contextlib.contextmanager
def client_config(
    host: str,
    api_key: Optional[str],
    *,
    compress: Optional[bool] = None,
    remote_logging: Optional[bool] = None,
    repo_ids: Iterable[str] = (),
) -> Iterator[None]:
    """Point nnsight's client at ``host`` with ``api_key``; restore on exit.

    nnsight 0.8 reads ``NDIF_HOST`` / ``NDIF_API_KEY`` only once, when
    ``nnsight.CONFIG`` is built at import; afterwards the client reads
    ``CONFIG.API.HOST`` / ``CONFIG.API.APIKEY`` (each `RemoteBackend` at
    construction; `status` / `compare` / `whoami` per call). This sets both the
    config and the environment variables (for code that inspects them), clears
    `nnsight.ndif`'s cached remote env, and seeds the repo-id cache for
    ``repo_ids`` so `to_model_key()` never asks the Hub. ``api_key=None`` means
    no key at all. ``compress`` / ``remote_logging`` override
    ``CONFIG.API.COMPRESS`` / ``CONFIG.APP.REMOTE_LOGGING`` when given.
    """
    import nnsight.ndif as ndif_module
    from nnsight import CONFIG
    from nnsight.modeling.huggingface import _ID_CACHE

    saved_config = (CONFIG.API.HOST, CONFIG.API.APIKEY, CONFIG.API.COMPRESS, CONFIG.APP.REMOTE_LOGGING)
    saved_env = {name: os.environ.get(name, _MISSING) for name in ("NDIF_HOST", "NDIF_API_KEY")}
    saved_remote_env = ndif_module._REMOTE_ENV
    seeded = [repo for repo in repo_ids if repo not in _ID_CACHE]

    CONFIG.API.HOST = host
    CONFIG.API.APIKEY = api_key
    os.environ["NDIF_HOST"] = host
    if api_key is None:
        os.environ.pop("NDIF_API_KEY", None)
    else:
        os.environ["NDIF_API_KEY"] = api_key
    if compress is not None:
        CONFIG.API.COMPRESS = compress
    if remote_logging is not None:
        CONFIG.APP.REMOTE_LOGGING = remote_logging
    ndif_module._REMOTE_ENV = None
    for repo in seeded:
        _ID_CACHE[repo] = repo
    try:
        yield
    finally:
        (CONFIG.API.HOST, CONFIG.API.APIKEY, CONFIG.API.COMPRESS, CONFIG.APP.REMOTE_LOGGING) = saved_config
        for name, value in saved_env.items():
            if value is _MISSING:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        ndif_module._REMOTE_ENV = saved_remote_env
        for repo in seeded:
            _ID_CACHE.pop(repo, None)


@contextlib.contextmanager
def offline_repo_ids(*repo_ids: str) -> Iterator[None]:
    """Resolve ``repo_ids`` without the Hugging Face Hub; restore on exit.

    Seeds ``nnsight.modeling.huggingface._ID_CACHE`` (read by
    ``to_model_key()``) and patches ``huggingface_hub.HfApi.model_info``, which
    `nnsight.is_model_running` calls on every use with no cache: known ids
    answer with themselves, anything else raises at once instead of going to
    the network.
    """
    import huggingface_hub
    from nnsight.modeling.huggingface import _ID_CACHE

    known = set(repo_ids)
    seeded = [repo for repo in known if repo not in _ID_CACHE]
    original = huggingface_hub.HfApi.model_info

    def model_info(self, repo_id, *args, **kwargs):
        if repo_id in known:
            return types.SimpleNamespace(id=repo_id, sha=None)
        raise OSError(f"offline_repo_ids: {repo_id!r} is not a known offline repo id")

    for repo in seeded:
        _ID_CACHE[repo] = repo
    huggingface_hub.HfApi.model_info = model_info
    try:
        yield
    finally:
        huggingface_hub.HfApi.model_info = original
        for repo in seeded:
            _ID_CACHE.pop(repo, None)
