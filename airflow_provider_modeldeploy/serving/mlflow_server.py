"""The model-server process of the local MLflow backend, and the client the deployer drives it with.

One process tree per service::

    master    resolves the model URI (aliases included), downloads and loads the model once, forks
              the workers, then answers control requests on a unix socket. It holds the endpoint's
              listening TCP socket for its whole life and can hand it to the next server.
    workers   run MLflow's own scoring app (``mlflow.pyfunc.scoring_server.init``: /invocations,
              /ping, /health, /version) under uvicorn. They first serve only a private unix socket
              (staging), where the deployer checks health and a smoke prediction; on ``activate``
              they start accepting on the shared TCP socket.

Replacing a model therefore never closes the listening socket: the new server accepts from the same
socket (one accept queue, gunicorn-style) before the old one stops accepting and drains. Nothing is
queued on a socket that closes, as happens with SO_REUSEPORT, and the URL never changes.

Only the standard library is imported at module level: the deployer imports this module for the
client functions, in Airflow task processes that must start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

from airflow_provider_modeldeploy.serving import metrics as server_metrics
from airflow_provider_modeldeploy.serving.fast_path import MAX_BODY, FastPath

SERVER_MODULE = "airflow_provider_modeldeploy.serving.mlflow_server"
#: A worker that dies is replaced; more deaths than this within the window stop the server (the
#: agent then restarts the whole server, with its own backoff).
MAX_WORKER_RESTARTS = 5
RESTART_WINDOW = 60.0
_MAX_MSG = 1 << 20


# ---------------------------------------------------------------------------------------------
# Client side: used by the deployer.
# ---------------------------------------------------------------------------------------------


class ControlError(Exception):
    """The server's control socket did not answer as expected."""


def _recv_line(sock: socket.socket, fds: list[int] | None = None) -> dict[str, Any]:
    buf = b""
    while not buf.endswith(b"\n"):
        if fds is not None:
            data, got, _flags, _addr = socket.recv_fds(sock, 65536, 1)
            fds.extend(got)
        else:
            data = sock.recv(65536)
        if not data:
            raise ControlError("control socket closed before answering")
        buf += data
        if len(buf) > _MAX_MSG:
            raise ControlError("control answer too large")
    return json.loads(buf)


def control_request(path: str | Path, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Send one command to a server's control socket and return its JSON answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            return _recv_line(sock)
        except (OSError, ValueError) as exc:
            raise ControlError(f"{cmd}: {exc}") from exc


def fetch_listener(path: str | Path, timeout: float = 10.0) -> socket.socket:
    """Receive a duplicate of the server's listening TCP socket (SCM_RIGHTS)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        fds: list[int] = []
        try:
            sock.connect(str(path))
            sock.sendall(b'{"cmd": "listener"}\n')
            answer = _recv_line(sock, fds)
        except (OSError, ValueError) as exc:
            raise ControlError(f"listener: {exc}") from exc
        if not answer.get("ok") or not fds:
            for fd in fds:
                os.close(fd)
            raise ControlError(f"listener: {answer.get('error', 'no socket received')}")
        return socket.socket(fileno=fds[0])


def read_state(path: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Server side: runs in the model-server process (``python -m`` this module).
# ---------------------------------------------------------------------------------------------


def _write_state(path: Path, **state: Any) -> None:
    tmp = path.with_suffix(".tmp")
    # 0600 whatever the umask: the state names the model and its addresses, for this user only.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps({"pid": os.getpid(), "time": time.time(), **state}))
    os.replace(tmp, path)


def _log(msg: str) -> None:
    print(
        f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [modeldeploy pid={os.getpid()}] {msg}",
        file=sys.stderr,
        flush=True,
    )


class _Failure(Exception):
    def __init__(self, field: str, value: Any, message: str) -> None:
        super().__init__(f"{field}={value!r}: {message}")
        self.field, self.value = field, value


def _mlflow_refusal(exc: Exception) -> str:
    """MLflow's error in one line; a refusal of the tracking server (401, 403: MLflow's basic-auth
    app, a proxy in front of it) says which server and what the connection gave it."""
    import mlflow

    from airflow_provider_modeldeploy.masking import mask_text

    message = (getattr(exc, "message", None) or str(exc)).splitlines()[0]
    code = getattr(exc, "error_code", None)
    if code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return message
    server = mask_text(mlflow.get_tracking_uri())
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "PERMISSION_DENIED":
        return f"the tracking server {server} refused user {user!r} access to this model (HTTP 403)"
    if user:
        return f"the tracking server {server} refused the connection's credentials for user {user!r} (HTTP 401)"
    return (
        f"the tracking server {server} asks for credentials and the connection has none (HTTP 401): "
        "set its login and password"
    )


def resolve_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """The URI to load, the registered version and the run id. Aliases are resolved here, once."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not model_uri.startswith("models:/"):
        run_id = model_uri.split("/")[1] if model_uri.startswith("runs:/") else None
        return model_uri, None, run_id
    client = MlflowClient()
    body = model_uri[len("models:/") :]
    try:
        if "/" not in body and "@" not in body:  # an MLflow 3 logged model id: models:/m-...
            return model_uri, None, client.get_logged_model(body).source_run_id
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, ref = body.split("/", 1)
            if ref.isdigit():
                mv = client.get_model_version(name, ref)
            elif ref.lower() == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise _Failure("model_uri", model_uri, f"registered model '{name}' has no versions")
                mv = max(versions, key=lambda v: int(v.version))
            else:
                found = client.get_latest_versions(name, stages=[ref])
                if not found:
                    raise _Failure("model_uri", model_uri, f"registered model '{name}' has no version in stage '{ref}'")
                mv = found[0]
    except MlflowException as exc:
        raise _Failure("model_uri", model_uri, _mlflow_refusal(exc)) from None
    return f"models:/{mv.name}/{mv.version}", str(mv.version), mv.run_id


#: Columns of a signature kept for the UI's request example; a wider model gets none (the example
#: would be unreadable, and the state file stays small).
MAX_INPUT_COLUMNS = 200


def input_columns(meta: Any) -> list[dict[str, str]] | None:
    """The model's input columns (name, MLflow type) from its signature: what the Served Models page
    builds its ``curl`` example from. None for a model without a column signature (tensors, none)."""
    signature = getattr(meta, "signature", None)
    if signature is None or signature.inputs is None:
        return None
    columns = []
    for spec in signature.inputs.to_dict():
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("type"), str):
            return None  # a tensor or unnamed column: not a dataframe the example can name
        columns.append({"name": spec["name"], "type": spec["type"]})
    return columns if 0 < len(columns) <= MAX_INPUT_COLUMNS else None


def _load(served_uri: str, model_uri: str) -> tuple[Any, str | None, list[dict[str, str]] | None]:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    try:
        local_path = mlflow.artifacts.download_artifacts(artifact_uri=served_uri)
    except (MlflowException, OSError) as exc:
        raise _Failure("model_uri", model_uri, f"cannot download the model: {_mlflow_refusal(exc)}") from None
    if not (Path(local_path) / "MLmodel").exists():
        raise _Failure("model_uri", model_uri, "not an MLflow model (no MLmodel file)")
    try:
        model = mlflow.pyfunc.load_model(local_path)
    except Exception as exc:
        raise _Failure("model_uri", model_uri, f"cannot load the model: {type(exc).__name__}: {exc}") from None
    example, columns = None, None
    with contextlib.suppress(Exception):
        meta = Model.load(local_path)
        columns = input_columns(meta)
        example = meta.get_serving_input(local_path)
    return model, example, columns


#: Error bodies above this size are cut: MLflow echoes the whole request in some error messages.
MAX_ERROR_BODY = 8 * 1024


def _shorten_error(body: bytes) -> bytes:
    try:
        error = json.loads(body)
        error["message"] = f"{str(error.get('message'))[:2000]} ... (cut: the error was {len(body)} bytes)"
        return json.dumps(error).encode()
    except (ValueError, AttributeError, TypeError):
        return body[:2000] + f" ... (cut: the error was {len(body)} bytes)".encode()


#: Request bodies larger than this are refused (413) before they are read: MLflow's app reads a whole
#: body into memory, several times over while parsing it.
DEFAULT_MAX_BODY = 32 * 1024 * 1024


async def _refuse(send: Any, status: int, message: str, extra: list) -> None:
    body = json.dumps({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), *extra]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def _replaying(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives the app the body already read, then whatever ``receive`` gives."""
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _bounded(scope: dict, receive: Any, send: Any, limit: int, extra: list) -> Any:
    """A ``receive`` for the request's body if it is within ``limit`` bytes; None once a 413 is sent.

    A declared length over the limit is refused before a byte of the body is read; a body without a
    length (chunked) is read up to the limit only, so a client streaming gigabytes costs at most that.
    """
    length = dict(scope["headers"]).get(b"content-length")
    if length is not None:
        if length.isdigit() and int(length) > limit:
            await _refuse(
                send, 413, f"the request body ({int(length)} bytes) is over this server's limit of {limit} bytes", extra
            )
            return None
        return receive
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            return receive
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            await _refuse(send, 413, f"the request body is over this server's limit of {limit} bytes", extra)
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return _replaying(b"".join(chunks), receive)


def _build_app(
    model: Any, headers: dict[str, str], fast_path: bool = True, example: str | None = None,
    max_body: int = DEFAULT_MAX_BODY, metrics: server_metrics.ServerMetrics | None = None,
) -> Any:  # fmt: skip
    from fastapi.responses import JSONResponse
    from mlflow.pyfunc import scoring_server

    if metrics is not None:
        model.predict = server_metrics.count_rows(model.predict)  # rows scored by MLflow's app
    app = scoring_server.init(model)
    extra = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

    async def unparseable(_request: Any, exc: Exception) -> Any:
        # MLflow turns JSONDecodeError into a 400 but lets other parse errors through as a 500:
        # an integer of more than 4300 digits (ValueError), JSON nested too deep (RecursionError).
        return JSONResponse(
            {"error_code": "BAD_REQUEST", "message": f"Ensure that input is a valid JSON formatted string. "
             f"Error: {type(exc).__name__}: {str(exc)[:300]}"},
            status_code=400,
        )  # fmt: skip

    app.add_exception_handler(ValueError, unparseable)
    app.add_exception_handler(RecursionError, unparseable)
    fast = FastPath.for_model(model, log=_log) if fast_path else None
    why_not = fast.disagreement(model, example) if fast is not None and example else None
    if fast is not None and why_not:
        if fast.off_reason is None:  # else answer() logged it
            _log(f"fast path off: {why_not}")
        fast = None
    elif fast is not None:
        _log("fast path on: plain dataframe_split / dataframe_records rows skip pandas")
    json_headers = [(b"content-type", b"application/json"), *extra]

    async def with_headers(scope: dict, receive: Any, send: Any) -> None:
        # Tells callers which model version answered: the URL stays the same across replaces.
        if scope["type"] != "http":
            return await app(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            receive = await _bounded(scope, receive, send, max_body, extra)
            if receive is None:
                return None
        if scope["path"] == "/invocations" and scope["method"] == "POST":
            if not any(name == b"content-type" for name, _ in scope["headers"]):
                # MLflow's app fails on it with a 500 (it splits the missing header).
                body = (f"This predictor only supports the following content types: Types: "
                        f"{scoring_server.CONTENT_TYPES}. Got no Content-Type header.").encode()  # fmt: skip
                headers = [(b"content-type", b"text/plain; charset=utf-8"), *extra]
                await send({"type": "http.response.start", "status": 415,
                            "headers": [*headers, (b"content-length", str(len(body)).encode())]})  # fmt: skip
                return await send({"type": "http.response.body", "body": body})
            if fast is not None:
                answered, receive = await _try_fast(fast, scope, receive, send, json_headers)
                if answered:
                    return None
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
                if message["status"] >= 400:
                    held["start"] = message  # sent with the (possibly cut) body
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = b"".join(chunks)
                if len(body) > MAX_ERROR_BODY:
                    body = _shorten_error(body)
                start = held.pop("start")
                start["headers"] = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                start["headers"].append((b"content-length", str(len(body)).encode()))
                await send(start)
                message = {"type": "http.response.body", "body": body, "more_body": False}
            await send(message)

        return await app(scope, receive, send_with_headers)

    if metrics is None:
        return with_headers
    metrics_headers = [(b"content-type", b""), *extra]

    async def with_metrics(scope: dict, receive: Any, send: Any) -> None:
        # Only prediction requests from clients are counted: not the agent's smoke prediction on the
        # staging socket (a unix socket: no port), nor the pages; /metrics is answered by every worker.
        server = scope.get("server")
        if (
            scope["type"] != "http" or scope["path"] != server_metrics.PREDICTION_PATH or not metrics.started
            or server is None or server[1] is None
        ):  # fmt: skip
            if scope["type"] == "http" and scope["path"] == server_metrics.METRICS_PATH and metrics.started:
                body, content_type = metrics.page()
                metrics_headers[0] = (b"content-type", content_type.encode())
                await send({"type": "http.response.start", "status": 200,
                            "headers": [*metrics_headers, (b"content-length", str(len(body)).encode())]})  # fmt: skip
                return await send({"type": "http.response.body", "body": body})
            return await with_headers(scope, receive, send)
        status = [0]

        async def noting(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        holder, token = metrics.rows_holder()
        started = metrics.begin()
        try:
            await with_headers(scope, receive, noting)
        finally:
            # 0: no answer was sent (the client went away, or the protocol answered a timeout itself)
            metrics.end(started, status[0] or scope.get("modeldeploy.status", 0), holder[0])
            metrics.reset_rows(token)

    return with_metrics


async def _try_fast(fast: FastPath, scope: dict, receive: Any, send: Any, headers: list) -> tuple[bool, Any]:
    """Answer from the fast path if it takes the request; else a ``receive`` that replays the body."""
    request_headers = dict(scope["headers"])
    length = request_headers.get(b"content-length")
    if length is None or not length.isdigit() or int(length) > MAX_BODY:
        return False, receive
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return True, receive
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    answer = fast.answer(body, request_headers.get(b"content-type"))
    if answer is not None:
        server_metrics.note_rows(fast.last_rows)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*headers, (b"content-length", str(len(answer)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": answer})
        return True, receive
    return False, _replaying(body, receive)


def _set_pdeathsig(sig: int = signal.SIGKILL) -> None:
    """This process gets ``sig`` when its parent dies. Workers die at once with their master: without
    it nobody supervises them or owns the service, and a worker left behind would keep the endpoint's
    port. (The fork server, with SIGTERM, goes with its agent.)"""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG


#: Request line and header fields over this many bytes get 431 (uvicorn's httptools protocol reads
#: headers of any size into memory; h11's default limit is 16 KiB, nginx's 32 KiB).
DEFAULT_MAX_HEADER = 64 * 1024
#: Seconds a request's line and headers may take from their first byte, a body may pause, and a client
#: may stop reading its answer.
DEFAULT_READ_TIMEOUT = 10.0
#: Requests a worker handles at once; more get 503. Idle connections do not count (see below).
DEFAULT_MAX_REQUESTS = 64


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops parsing, and uvicorn calls send_400_response."""


def _limit_response(status: int, message: str) -> bytes:
    """A whole error response, for the protocol to write itself where no ASGI app runs."""
    body = json.dumps({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": message}).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
    return head.encode() + body


async def _busy(scope: dict, receive: Any, send: Any) -> None:
    """The app for a request over the worker's concurrency limit."""
    await _refuse(
        send, 503, "this model server is answering too many requests at once; retry", [(b"retry-after", b"1")]
    )


def _limited_protocol(base: type, args: Any) -> type:
    """uvicorn's httptools protocol class, bounded against abusive clients.

    - Request line and headers over ``--max-header-bytes`` get 431 and the connection is closed,
      before more than that (plus one read) is held: httptools itself has no limit.
    - A request's head must arrive within ``--read-timeout`` seconds of its first byte (slowloris),
      and its body may not pause longer than that, or the request gets 408 and the connection is
      closed. A connection that never sends a byte is closed after the keep-alive timeout, as an
      idle keep-alive one is (uvicorn arms no timer before a connection's first request). A client
      that stops reading its answers for ``--read-timeout`` seconds is disconnected.
    - At most ``--max-concurrent-requests`` requests in progress per worker; more get 503 at once. Unlike
      uvicorn's ``limit_concurrency``, which counts open connections too (so 500 idle connections
      would get every real request a 503), only requests whose headers arrived count.
    """
    max_head, read_timeout, max_requests = args.max_header_bytes, args.read_timeout, args.max_concurrent_requests
    metrics: server_metrics.ServerMetrics | None = getattr(args, "server_metrics", None)

    async def busy(scope: dict, receive: Any, send: Any) -> None:
        if metrics is not None and scope["path"] == server_metrics.PREDICTION_PATH:
            metrics.refused(503)
        await _busy(scope, receive, send)

    class LimitedProtocol(base):  # type: ignore[misc,valid-type]
        _in_head = True  # awaiting a request's line and headers
        _head_bytes = 0  # bytes received since that head began (some may still be unparsed)
        _head_size = 0  # its request target and header fields, as parsed
        _in_body = False
        _last_read = 0.0  # when the body last moved
        _app_paused = False
        _read_timer: Any = None
        _write_timer: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            # uvicorn arms the keep-alive timer only after a response: a connection that never sends
            # a byte would be held (and drain would wait for it) forever.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._write_timer is not None:
                self._write_timer.cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self.transport.is_closing():
                return
            # Timers only for what a read left incomplete: a request that came whole in one read (most
            # do) costs none.
            if self._in_head and self._head_bytes:
                # A head still incomplete after more than the limit (one huge header line, which
                # httptools buffers whole before calling on_header) is refused here.
                if self._head_bytes > max_head:
                    self._close_with(
                        431, f"the request line and headers are over this server's limit of {max_head} bytes"
                    )
                elif self._read_timer is None:  # from the head's first byte: more bytes do not extend it
                    self._arm(self._head_timed_out)
            elif self._in_body:
                self._last_read = self.loop.time()  # the body moves: its pause starts again
                if self._read_timer is None:
                    self._arm(self._body_timed_out)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_size = 0

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _count(self, size: int) -> None:
            self._head_size += size
            if self._head_size > max_head:
                raise _HeadTooLarge

        def send_400_response(self, msg: str) -> None:
            if self._head_size <= max_head:
                return super().send_400_response(msg)
            self._close_with(431, f"the request line and headers are over this server's limit of {max_head} bytes")

        def on_headers_complete(self) -> None:
            self._in_head, self._head_bytes, self._in_body = False, 0, True
            self._disarm()
            # Read per request: uvicorn takes the app from self.app at each request.
            self.app = busy if len(self.tasks) >= max_requests else self.config.loaded_app
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._in_body = True, False
            self._disarm()

        def pause_writing(self) -> None:
            # The client stopped reading its answers (uvicorn's send waits, holding a request slot,
            # until the transport's buffer drains): it gets as long as a body may pause.
            super().pause_writing()
            self._write_timer = self.loop.call_later(read_timeout, self._write_timed_out)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _write_timed_out(self) -> None:
            self._write_timer = None
            self.transport.abort()  # not close(): that would wait for the buffer to drain

        def _arm(self, handler: Any, delay: float = read_timeout) -> None:
            self._disarm()
            self._read_timer = self.loop.call_later(delay, handler)

        def _disarm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
                self._read_timer = None

        def _head_timed_out(self) -> None:
            self._read_timer = None
            if self._in_head and not self.transport.is_closing():
                self._close_with(408, f"the request's line and headers took over {read_timeout:g}s to arrive")

        def _body_timed_out(self) -> None:
            self._read_timer = None
            if not self._in_body or self.transport.is_closing():
                return
            now = self.loop.time()
            if self.flow.read_paused or self._app_paused:
                # The app stopped reading (uvicorn pauses the socket while it holds 64 KiB unread): the
                # client's pause counts only from now on, and again once reading went on.
                self._app_paused = self.flow.read_paused
                self._last_read = now
            paused = now - self._last_read
            if paused < read_timeout:
                self._arm(self._body_timed_out, read_timeout - paused)
                return
            self._close_with(408, f"the request body paused for over {read_timeout:g}s")

        def _close_with(self, status: int, message: str) -> None:
            """Answer ``status`` if no response is under way on this connection, and close it."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete or not cycle.response_started:
                self.transport.write(_limit_response(status, message))
            if metrics is not None:
                if cycle is None or cycle.response_complete:  # between requests: no app counts it
                    metrics.refused(status)
                elif not cycle.response_started:  # the app's request: counted when it returns
                    cycle.scope["modeldeploy.status"] = status
            if cycle is not None and not cycle.response_complete:
                # As if the client went away: the app's receive() says so, its send() is dropped.
                cycle.disconnected = True
                cycle.message_event.set()
            self._in_head = self._in_body = False
            self._disarm()
            self.transport.close()

    return LimitedProtocol


def _run_worker(app: Any, staging: socket.socket, listener: socket.socket, ack_fd: int, args: Any) -> int:
    import asyncio
    import functools

    import uvicorn

    if getattr(args, "server_metrics", None) is not None:
        args.server_metrics.start_worker()  # this worker's own metric files

    class WorkerServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGUSR1, lambda: loop.create_task(self.activate()))
            # SIGUSR1 was blocked since the fork: one sent early is delivered now, to the handler.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
            os.write(ack_fd, b"s")

        async def activate(self) -> None:
            if getattr(self, "_active", False):
                os.write(ack_fd, b"a")
                return
            base = self.config.http_protocol_class
            worker = self

            class NoDelayProtocol(base):  # type: ignore[misc,valid-type]
                # Set on every accepted connection: keep-alive answers must not wait for Nagle.
                def connection_made(self, transport: Any) -> None:
                    sock = transport.get_extra_info("socket")
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    super().connection_made(transport)
                    if worker.should_exit:  # accepted while shutting down: shutdown() missed it
                        self._draining = True

                def shutdown(self) -> None:
                    # uvicorn closes idle keep-alive connections at once on shutdown; a client that is
                    # sending its next request on one at that moment gets a reset (a failed request on
                    # every replace under load). Instead the next request on each connection is still
                    # answered, with "Connection: close", and the client reconnects through the shared
                    # listener to the new server; a connection that stays idle is closed by the
                    # keep-alive timeout, as always.
                    if not hasattr(base, "on_headers_complete"):  # not the httptools protocol
                        return super().shutdown()
                    self._draining = True
                    # Only a response whose headers are not written yet can still say "Connection:
                    # close". One already started (MLflow's middleware streams the body from another
                    # task, so shutdown can fall between headers and body) promised keep-alive: it
                    # must not be closed after its body, or the client's next request on it gets a
                    # reset. Its next request is answered with "Connection: close" instead.
                    cycle = self.cycle
                    if cycle is not None and not cycle.response_complete and not cycle.response_started:
                        cycle.keep_alive = False

                def on_headers_complete(self) -> None:
                    super().on_headers_complete()
                    if getattr(self, "_draining", False) and self.cycle is not None:
                        self.cycle.keep_alive = False

            factory = functools.partial(
                NoDelayProtocol,
                config=self.config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
            )
            server = await asyncio.get_running_loop().create_server(factory, sock=listener, backlog=self.config.backlog)
            self.servers.append(server)
            self._active = True
            os.write(ack_fd, b"a")

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    config = uvicorn.Config(
        app,
        # httptools, named (not "auto"): the limits above are written against its parser callbacks.
        http=_limited_protocol(HttpToolsProtocol, args),
        ws="none",  # MLflow's app has no websocket route: no upgrade is ever taken
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=args.keep_alive,
        timeout_graceful_shutdown=args.drain_timeout,
        backlog=2048,
    )
    server = WorkerServer(config)
    try:
        asyncio.run(server.serve(sockets=[staging]))
    finally:
        if getattr(args, "server_metrics", None) is not None and args.server_metrics.started:
            args.server_metrics.flush()  # the requests of its last second (drained, answered) count too
    return 0


class _Master:
    def __init__(self, args: Any, listener: socket.socket, staging_path: Path, state_path: Path) -> None:
        self.args = args
        self.listener = listener
        self.staging_path = staging_path
        self.state_path = state_path
        self.workers: dict[int, int] = {}
        self.gone: dict[int, int] = {}  # pid -> worker index, of workers reaped and not yet replaced
        self.active = False
        self.draining = False
        self.info: dict[str, Any] = {}

    def spawn(self, app: Any, staging: socket.socket, ctl: socket.socket) -> None:
        self.app, self.staging, self.ctl = app, staging, ctl
        self.ack_r, ack_w = os.pipe()
        for index in range(self.args.workers):
            self._fork_worker(index, ack_w)
        os.close(ack_w)

    def _fork_worker(self, index: int, ack_w: int) -> int:
        pid = os.fork()
        if pid == 0:  # worker
            code = 1
            try:
                _set_pdeathsig()
                if os.getppid() != self.master_pid:
                    os._exit(1)
                signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
                self.ctl.close()
                os.close(self.ack_r)
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                code = _run_worker(self.app, self.staging, self.listener, ack_w, self.args)
            except BaseException as exc:  # a worker must never return into the master's code
                _log(f"worker {index} failed: {type(exc).__name__}: {exc}")
            finally:
                os._exit(code)
        self.workers[pid] = index
        return pid

    def replace_worker(self, index: int) -> str | None:
        """Fork a worker in place of one that died (from the loaded model: no reload); it takes traffic
        at once if the server does. The reason when it could not, or when workers die too often."""
        now = time.monotonic()
        self.deaths = [t for t in getattr(self, "deaths", []) if now - t < RESTART_WINDOW] + [now]
        if len(self.deaths) > MAX_WORKER_RESTARTS:
            return f"{len(self.deaths)} workers died within {RESTART_WINDOW:.0f}s"
        time.sleep(min(2.0, 0.1 * 2 ** (len(self.deaths) - 1)))  # back off when they keep dying
        ack_r, ack_w = os.pipe()
        saved, self.ack_r = self.ack_r, ack_r
        try:
            pid = self._fork_worker(index, ack_w)
            os.close(ack_w)
            waiting = {p: i for p, i in self.workers.items() if p == pid}
            others, self.workers = self.workers, waiting
            try:
                error = self.wait_acks(b"s", self.args.start_timeout)
                if error is None and self.active:
                    os.kill(pid, signal.SIGUSR1)
                    error = self.wait_acks(b"a", 30)
            finally:
                self.workers = {**others, **self.workers}
        finally:
            os.close(ack_r)
            self.ack_r = saved
        if error is None:
            _log(f"worker {index} replaced by {pid}")
            self.write_state("active" if self.active else "ready", worker_restarts=len(self.deaths))
        return error

    def wait_acks(self, kind: bytes, timeout: float) -> str | None:
        """Wait until every worker wrote ``kind`` to the ack pipe; the reason when they did not."""
        acks, deadline = 0, time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.ack_r, selectors.EVENT_READ)
            while acks < len(self.workers):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return f"{acks} of {len(self.workers)} workers answered within {timeout:.0f}s"
                if sel.select(remaining):
                    data = os.read(self.ack_r, 64)
                    if not data:
                        return "every worker exited"
                    acks += data.count(kind)
                for pid, status in self.reap():
                    return f"worker {pid} {_exit_reason(status)}"
        return None

    def activate(self, timeout: float) -> dict[str, Any]:
        for pid in self.workers:
            os.kill(pid, signal.SIGUSR1)
        error = self.wait_acks(b"a", timeout)
        if error:
            return {"ok": False, "error": f"activation failed: {error}"}
        self.active = True
        self.write_state("active")
        _log(f"accepting on {self.listener.getsockname()}")
        return {"ok": True}

    def drain(self, timeout: float) -> dict[str, Any]:
        self.draining = True
        _log(f"draining (timeout {timeout}s)")
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.workers and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.02)
        for pid in list(self.workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while self.workers:
            self.reap(block=True)
        return {"ok": True}

    def reap(self, block: bool = False) -> list[tuple[int, int]]:
        gone = []
        while self.workers:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                self.workers.clear()
                break
            if pid == 0:
                break
            self.gone[pid] = self.workers.pop(pid, 0)
            if getattr(self.args, "server_metrics", None) is not None:
                self.args.server_metrics.worker_gone(pid)
            gone.append((pid, status))
            if block:
                break
        return gone

    def write_state(self, phase: str, **extra: Any) -> None:
        _write_state(
            self.state_path, phase=phase, active=self.active, workers=sorted(self.workers),
            staging=str(self.staging_path), **self.info, **extra,
        )  # fmt: skip

    def handle(self, conn: socket.socket) -> bool:
        """Answer one control request; True when the master should exit afterwards."""
        conn.settimeout(30)
        try:
            request = _recv_line(conn)
        except (ControlError, OSError, ValueError) as exc:
            _log(f"bad control request: {exc}")
            return False
        cmd = request.get("cmd")
        if cmd == "status":
            answer = {"ok": True, "active": self.active, "workers": sorted(self.workers), **self.info}
        elif cmd == "activate":
            answer = self.activate(float(request.get("activate_timeout", 30)))
        elif cmd == "listener":
            payload = json.dumps({"ok": True}).encode() + b"\n"
            socket.send_fds(conn, [payload], [self.listener.fileno()])
            return False
        elif cmd == "drain":
            answer = self.drain(float(request.get("drain_timeout", self.args.drain_timeout)))
            self.write_state("stopped")
            conn.sendall(json.dumps(answer).encode() + b"\n")
            return True
        else:
            answer = {"ok": False, "error": f"unknown command {cmd!r}"}
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(answer).encode() + b"\n")
        return False

    def serve_control(self, ctl: socket.socket) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        terminate = []
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, lambda *_: terminate.append(True))
        signal.signal(signal.SIGINT, lambda *_: terminate.append(True))
        sel = selectors.DefaultSelector()
        sel.register(ctl, selectors.EVENT_READ, "ctl")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        while True:
            for key, _ in sel.select(timeout=5):
                if key.data == "wake":
                    os.read(wake_r, 512)
                else:
                    conn, _ = ctl.accept()
                    with conn:
                        if self.handle(conn):
                            return 0
            if terminate:
                self.drain(self.args.drain_timeout)
                self.write_state("stopped")
                return 0
            for pid, status in self.reap():
                index = self.gone.pop(pid, 0)
                reason = _exit_reason(status)
                _log(f"worker {pid} {reason}; replacing it")
                error = self.replace_worker(index)
                if error:
                    _log(f"giving up: {error}; stopping the server")
                    self.drain(5)
                    self.write_state("failed", error=f"model server worker {pid} {reason}; {error}")
                    return 1


def _exit_reason(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=SERVER_MODULE, description="Serve one MLflow model (one service).")
    parser.add_argument("--service-uuid", required=True)
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--runtime-dir", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--keep-alive", type=int, default=5)
    parser.add_argument("--drain-timeout", type=float, default=30)
    parser.add_argument("--start-timeout", type=float, default=120)
    parser.add_argument(
        "--fast-path", choices=("on", "off"), default="on",
        help="answer plain rows of scikit-learn models without pandas (same answers; see fast_path.py)",
    )  # fmt: skip
    parser.add_argument(
        "--metrics", choices=("on", "off"), default="on",
        help="count prediction requests and serve GET /metrics (see serving/metrics.py)",
    )  # fmt: skip
    parser.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="larger request bodies get 413, unread"
    )
    parser.add_argument(
        "--max-header-bytes", type=int, default=DEFAULT_MAX_HEADER,
        help="a larger request line and headers get 431, and the connection is closed",
    )  # fmt: skip
    parser.add_argument(
        "--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT,
        help="seconds a request's line and headers may take from their first byte, and its body may pause (408), "
        "and a client may stop reading its answer (disconnected)",
    )  # fmt: skip
    parser.add_argument(
        "--max-concurrent-requests", type=int, default=DEFAULT_MAX_REQUESTS,
        help="requests in progress at once per worker; more get 503 (idle connections do not count)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    # The directory (0700) a model MLflow copies goes to (_copies_into): removed when the server ends.
    own_tmp = tempfile.mkdtemp(prefix=_own_tmp_prefix(args.service_uuid))
    try:
        return _serve(args, own_tmp)
    finally:
        shutil.rmtree(own_tmp, ignore_errors=True)


def _own_tmp_prefix(service_uuid: str) -> str:
    return f"modeldeploy-{service_uuid.replace('-', '')}-"


@contextlib.contextmanager
def _copies_into(own_tmp: str) -> Iterator[None]:
    """MLflow copies a model it cannot read in place (a runs:/ URI, any remote artifact store) into a
    new temporary directory that nothing removes: a copy of the model per server start. While the model
    is resolved and loaded, temporary files go to ``own_tmp`` instead, removed at once if nothing was
    copied there (so a server killed later leaves nothing), else when the server ends."""
    tempfile.tempdir = own_tmp
    try:
        yield
    finally:
        tempfile.tempdir = None  # the default again, for whatever the workers write
        with contextlib.suppress(OSError):
            os.rmdir(own_tmp)  # only if empty


def remove_own_tmp(service_uuid: str) -> None:
    """Remove the temporary directories of a service's servers (they are stopped): a server removes its
    own as it ends, unless it was killed. The agent's temporary directory is its servers'."""
    for path in Path(tempfile.gettempdir()).glob(f"{_own_tmp_prefix(service_uuid)}*"):
        shutil.rmtree(path, ignore_errors=True)


def _serve(args: argparse.Namespace, own_tmp: str) -> int:
    """Load the model, start the workers, then answer control requests until told to stop."""
    run = Path(args.runtime_dir)
    key = args.service_uuid.replace("-", "")
    state_path, ctl_path, staging_path = run / f"{key}.state", run / f"{key}.ctl", run / f"{key}.sock"
    listener = socket.socket(fileno=args.listen_fd)
    _log(f"service {args.service_uuid}: loading {args.model_uri}")
    _write_state(state_path, phase="loading")
    started = time.monotonic()
    try:
        with _copies_into(own_tmp):
            served_uri, version, run_id = resolve_model_uri(args.model_uri)
            resolved = time.monotonic()
            model, example, columns = _load(served_uri, args.model_uri)
        _log(f"resolved in {resolved - started:.2f}s, loaded in {time.monotonic() - resolved:.2f}s")
        headers = {"x-modeldeploy-service": args.service_uuid, "x-model-name": args.model_name}
        if version:
            headers["x-model-version"] = version
        args.server_metrics = (
            server_metrics.ServerMetrics(server_metrics.make_dir(run, args.service_uuid), version)
            if args.metrics == "on" else None
        )  # fmt: skip
        app = _build_app(
            model, headers, fast_path=args.fast_path == "on", example=example, max_body=args.max_body_bytes,
            metrics=args.server_metrics,
        )  # fmt: skip
    except _Failure as exc:
        _remove_metrics(args)
        _log(f"failed: {exc}")
        _write_state(state_path, phase="failed", error=str(exc), field=exc.field)
        return 2
    except Exception as exc:
        _remove_metrics(args)
        _log(f"failed: {type(exc).__name__}: {exc}")
        _write_state(state_path, phase="failed", error=f"model_uri={args.model_uri!r}: {type(exc).__name__}: {exc}")
        return 2

    for path in (ctl_path, staging_path):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    old_umask = os.umask(0o077)
    try:
        staging = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staging.bind(str(staging_path))
        staging.listen(128)
        ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ctl.bind(str(ctl_path))
        ctl.listen(16)
    finally:
        os.umask(old_umask)

    master = _Master(args, listener, staging_path, state_path)
    master.master_pid = os.getpid()
    master.info = {
        "served_uri": served_uri, "model_version": version, "model_run_id": run_id,
        "input_example": example, "input_columns": columns, "port": listener.getsockname()[1],
    }  # fmt: skip
    import gc

    gc.collect()
    gc.freeze()  # the model and the app, shared with the workers, are not copied by their collections
    master.spawn(app, staging, ctl)  # the master keeps the staging socket to replace a worker that dies
    error = master.wait_acks(b"s", args.start_timeout)
    if error:
        _log(f"failed: {error}")
        master.drain(5)
        master.write_state("failed", error=f"model server did not start: {error}")
        _remove_metrics(args)
        return 3
    master.write_state("ready")
    _log(
        f"ready in {time.monotonic() - started:.2f}s: {served_uri} (version {version}), workers {sorted(master.workers)}"
    )
    try:
        return master.serve_control(ctl)
    finally:
        for path in (ctl_path, staging_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        _remove_metrics(args)
        _log("stopped")


def _remove_metrics(args: Any) -> None:
    """This generation's metric files go with it (the agent samples them while it runs)."""
    if getattr(args, "server_metrics", None) is not None:
        args.server_metrics.remove()


if __name__ == "__main__":
    sys.exit(main())
