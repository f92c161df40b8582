"""The adversarial suite: a real model server under abusive clients, over raw sockets.

Each case names its exact input and the safe outcome: the status code the client gets, the worker
still alive (the same pid: a crashed worker would be replaced under a new one), its memory bounded,
and the server still answering a real prediction promptly. The server is deployed once, with small
limits so that the cases run in seconds: 8 MiB bodies, 16 KiB heads, 3 s read and keep-alive
timeouts, 8 requests in progress per worker, one worker.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from conftest import iris_payload, use_airflow_home, wait_for
from local_http import HTTP

from airflow_provider_modeldeploy.deployers import ServiceConfig, get_model_deployer
from airflow_provider_modeldeploy.exceptions import InvalidParameterError

MAX_BODY = 8 * 2**20
MAX_HEAD = 16 * 1024
TIMEOUT = 3  # read_timeout and keep_alive, seconds
MAX_REQUESTS = 8
GIB = 2**30


class Server:
    """The deployed service, its address and its processes."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.url = service.prediction_url
        where = urlsplit(self.url)
        self.address = (where.hostname, where.port)
        self.master = psutil.Process(service.record.pid)
        self.workers = {p.pid for p in self.master.children()}

    def peak_growth(self, action: Any) -> tuple[Any, int]:
        """``action()``'s result, and how far the worker's peak RSS rose above its RSS meanwhile.

        The peak (VmHWM, reset first through /proc/PID/clear_refs), not the RSS after: a refused body is
        freed (and large blocks handed back to the kernel) by the time the answer is read.
        """
        [pid] = self.workers
        proc = Path(f"/proc/{pid}")
        (proc / "clear_refs").write_text("5")
        before = psutil.Process(pid).memory_info().rss
        result = action()
        [peak_kib] = [
            line.split()[1] for line in (proc / "status").read_text().splitlines() if line.startswith("VmHWM:")
        ]
        return result, int(peak_kib) * 1024 - before

    def head(self, method: str = "POST", path: str = "/invocations", **headers: str) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.address[0]}:{self.address[1]}"]
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def assert_healthy(self) -> None:
        """Master and worker are the processes deployed (none died), and a prediction answers in 10 s."""
        assert self.master.is_running() and self.master.status() != psutil.STATUS_ZOMBIE
        assert {p.pid for p in self.master.children()} == self.workers, "a worker died and was replaced"
        answer = HTTP.post(self.url, json=iris_payload(), timeout=10)
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2, answer.text[:300]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, mlflow_models: dict[str, Any]) -> Iterator[Server]:
    with pytest.MonkeyPatch.context() as mp:
        use_airflow_home(tmp_path_factory.mktemp("adversarial") / "airflow", mp)
        deployer = get_model_deployer()
        config = ServiceConfig(
            model_uri=mlflow_models["iris_v1"], model_name="iris-adversarial", workers=1,
            max_body_mb=MAX_BODY >> 20, max_header_kb=MAX_HEAD >> 10, read_timeout=TIMEOUT, keep_alive=TIMEOUT,
            max_concurrent_requests=MAX_REQUESTS,
        )  # fmt: skip
        service = deployer.deploy_model(config)
        try:
            yield Server(service)
        finally:
            deployer.delete_model_server(service.uuid, force=True)


def exchange(server: Server, head: bytes, body: Iterable[bytes] = (), timeout: float = 30) -> bytes:
    """Send ``head`` then ``body`` (lazily: a generator of a gigabyte is never held) while reading the
    server's answer in parallel, until the server closes the connection; the answer.

    Reading while sending: a server that answers early and closes would otherwise reset the
    connection under a client still sending, and the answer would be lost.
    """
    stop = threading.Event()
    sock = socket.create_connection(server.address, timeout=timeout)

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(head)
            for chunk in body:
                if stop.is_set():
                    return
                sock.sendall(chunk)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    answer = b""
    try:
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                answer += data
    finally:
        stop.set()
        sock.close()  # a sender blocked in sendall gets an error and returns
        sender.join(timeout=10)
    return answer


def status(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer[9:12])


def error_message(answer: bytes) -> str:
    return json.loads(answer.partition(b"\r\n\r\n")[2])["message"]


def chunked(total: int, size: int = 2**20) -> Iterator[bytes]:
    """A chunked-encoded body of ``total`` bytes, made as it is sent."""
    piece = b"7" * size
    for _ in range(total // size):
        yield f"{size:x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


# -- oversized request heads -----------------------------------------------------------------------


HEADS: dict[str, bytes] = {
    # one header line of 100 KiB
    "one 100 KiB header": b"X-Junk: " + b"j" * 100 * 1024 + b"\r\n\r\n",
    # 3000 small header lines (about 60 KiB)
    "3000 headers": b"".join(b"X-Junk-%d: jjjjjjjjjj\r\n" % i for i in range(3000)) + b"\r\n",
}


@pytest.mark.parametrize("path", ["/invocations", "/ping"])
@pytest.mark.parametrize("case", list(HEADS))
def test_oversized_headers_get_431(server: Server, case: str, path: str) -> None:
    """Input: a request to ``path`` whose headers are over 16 KiB. Outcome: 431 and the connection
    closed, on the prediction path (fast path and MLflow's app) and MLflow's own routes alike."""
    method = "POST" if path == "/invocations" else "GET"
    head = server.head(method, path, Content_Type="application/json", Content_Length="2")[:-2] + HEADS[case]
    answer = exchange(server, head, [b"{}"])
    assert status(answer) == 431, answer[:300]
    assert f"limit of {MAX_HEAD} bytes" in error_message(answer)
    server.assert_healthy()


def test_an_oversized_request_target_gets_431(server: Server) -> None:
    """Input: ``GET /<100 KiB of path>``. Outcome: 431 (the request line counts with the headers)."""
    answer = exchange(server, server.head("GET", "/" + "p" * 100 * 1024))
    assert status(answer) == 431
    server.assert_healthy()


def test_an_endless_header_line_gets_431_with_bounded_memory(server: Server) -> None:
    """Input: a header line of 256 MiB without end, streamed. Outcome: 431 once the head passes 16 KiB,
    the rest never read; the worker's peak memory grows by less than 1 MiB."""
    junk = b"j" * 2**20
    head = server.head("GET", "/ping")[:-2] + b"X-Junk: "
    answer, grown = server.peak_growth(lambda: exchange(server, head, (junk for _ in range(256))))
    assert status(answer) == 431
    assert grown < 2**20, f"the worker's peak memory grew by {grown >> 10} KiB for a refused header"
    server.assert_healthy()


def test_headers_within_the_limit_are_answered(server: Server) -> None:
    """Input: a prediction with 12 KiB of extra headers. Outcome: 200 (the limit is not over-eager)."""
    headers = {f"x-pad-{i}": "p" * 100 for i in range(100)}
    answer = HTTP.post(server.url, json=iris_payload(), headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text[:300]


# -- slow and idle connections ---------------------------------------------------------------------


def closed_by_server(sock: socket.socket) -> bytes | None:
    """What the server sent before closing ``sock``; None while it sent nothing (a non-blocking check).
    Once something came, it is read up to the close: the server closes right after answering."""
    if not select.select([sock], [], [], 0)[0]:
        return None
    answer = b""
    sock.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        while data := sock.recv(65536):
            answer += data
    return answer


def test_500_idle_connections_do_not_stop_the_server_and_are_closed(server: Server) -> None:
    """Input: 500 connections held open, 250 sending nothing and 250 a partial request (request line
    and one header, no end). Outcome: a prediction on a new connection answers within 10 s while they
    are all open; the server closes every one of them after the 3 s timeouts (408 for the partial
    ones); the worker survives."""
    partial = server.head()[:-2]
    idle: list[socket.socket] = []
    try:
        for i in range(500):
            sock = socket.create_connection(server.address, timeout=10)
            if i % 2:
                sock.sendall(partial)
            idle.append(sock)
        opened = time.monotonic()
        server.assert_healthy()  # within 10 s, with 500 connections open
        assert time.monotonic() - opened < TIMEOUT, "the prediction was not answered while they were open"

        answers: dict[int, bytes] = {}

        def all_closed() -> bool:
            for i, sock in enumerate(idle):
                if i not in answers and (answer := closed_by_server(sock)) is not None:
                    answers[i] = answer
            return len(answers) == len(idle)

        wait_for(all_closed, 4 * TIMEOUT, "the server to close the idle connections", lambda: len(answers))
        assert time.monotonic() - opened >= TIMEOUT - 1, "closed before the timeout"
        assert all(answers[i] == b"" for i in range(0, 500, 2)), "a silent connection got an answer"
        assert all(status(answers[i]) == 408 for i in range(1, 500, 2))
    finally:
        for sock in idle:
            sock.close()
    server.assert_healthy()


def test_a_slowloris_head_gets_408(server: Server) -> None:
    """Input: a request head sent one byte every 0.2 s (it would take over a minute). Outcome: 408
    about 3 s after its first byte, although bytes keep coming."""
    head = server.head(Content_Type="application/json", X_Padding="s" * 300)
    started = time.monotonic()

    def trickle() -> Iterator[bytes]:
        for byte in head:
            time.sleep(0.2)
            yield bytes([byte])

    answer = exchange(server, b"", trickle())
    assert status(answer) == 408 and "line and headers" in error_message(answer)
    assert time.monotonic() - started < 3 * TIMEOUT
    server.assert_healthy()


def test_a_stalled_body_gets_408(server: Server) -> None:
    """Input: a prediction announcing 1000 bytes of body, sending 10, then nothing. Outcome: 408 after
    the 3 s read timeout."""
    started = time.monotonic()
    answer = exchange(server, server.head(Content_Type="application/json", Content_Length="1000"), [b'{"dataframe'])
    assert status(answer) == 408 and "body paused" in error_message(answer)
    assert TIMEOUT - 1 <= time.monotonic() - started < 3 * TIMEOUT
    server.assert_healthy()


def test_requests_over_the_concurrency_limit_get_503_until_the_stalled_ones_time_out(server: Server) -> None:
    """Input: 8 predictions (the limit) whose bodies stall, then a 9th. Outcome: the 9th gets 503 with
    Retry-After at once; once the stalled ones got their 408, predictions are answered again."""
    stalled = []
    try:
        for _ in range(MAX_REQUESTS):
            sock = socket.create_connection(server.address, timeout=10)
            sock.sendall(server.head(Content_Type="application/json", Content_Length="1000") + b"{")
            stalled.append(sock)
        time.sleep(0.5)  # their headers are parsed: they hold the worker's request slots
        answer = HTTP.post(server.url, json=iris_payload(), timeout=10)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text[:300]
        wait_for(lambda: all(closed_by_server(s) is not None for s in stalled), 4 * TIMEOUT, "the stalled to end")
    finally:
        for sock in stalled:
            sock.close()
    server.assert_healthy()


# -- oversized bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["application/json", "text/csv"])
def test_a_streamed_gigabyte_gets_413_with_bounded_memory(server: Server, content_type: str) -> None:
    """Input: a 1 GiB chunked body (no Content-Length), generated while sent, as JSON (a fast-path
    candidate) and as CSV (MLflow's app). Outcome: 413 once the body passes 8 MiB; the worker's peak
    memory grows by less than twice the limit; the server still answers."""
    head = server.head(Content_Type=content_type, Transfer_Encoding="chunked")
    started = time.monotonic()
    answer, grown = server.peak_growth(lambda: exchange(server, head, chunked(GIB)))
    assert status(answer) == 413 and f"limit of {MAX_BODY} bytes" in error_message(answer)
    assert time.monotonic() - started < 20, "the server read far more than its limit"
    assert grown < 2 * MAX_BODY, f"the worker's peak memory grew by {grown >> 20} MiB for a refused body"
    server.assert_healthy()


def test_a_declared_gigabyte_gets_413_unread(server: Server) -> None:
    """Input: a prediction announcing Content-Length 1 GiB, then 1 KiB of it. Outcome: 413 at once
    (well before the gigabyte could be sent), with nothing of the body read."""
    head = server.head(Content_Type="application/json", Content_Length=str(GIB))
    started = time.monotonic()
    answer = exchange(server, head, [b"[" * 1024])
    assert status(answer) == 413 and f"({GIB} bytes)" in error_message(answer)
    assert time.monotonic() - started < 10
    server.assert_healthy()


# -- the options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["max_header_kb", "read_timeout", "keep_alive", "max_concurrent_requests"])
@pytest.mark.parametrize("value", [0, -5, "64"])
def test_limits_are_positive_integers(deployer: Any, mlflow_models: dict[str, Any], option: str, value: Any) -> None:
    """Input: a limit of 0, negative or not an integer. Outcome: the deploy is refused naming the
    option, before any server starts."""
    config = ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-limits", **{option: value})
    with pytest.raises(InvalidParameterError, match=option):
        deployer.deploy_model(config)
    assert deployer.find_model_server(model_name="iris-limits") == []


# -- a client that stops reading (the protocol alone, under uvicorn, with an app answering 16 MiB) ---


@pytest.fixture
def big_answer_server() -> Iterator[tuple[tuple[str, int], Any]]:
    """uvicorn with the model server's protocol (1 s read timeout) in a thread of this process, and an
    app answering 16 MiB: no prediction of the model answers enough to fill the kernel's buffers."""
    import types

    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from airflow_provider_modeldeploy.serving.mlflow_server import _limited_protocol

    async def app(scope: dict, receive: Any, send: Any) -> None:
        # In 1 MiB pieces, as a streamed answer: each send waits while the client does not read.
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % (16 << 20))]})
        for left in range(15, -1, -1):
            await send({"type": "http.response.body", "body": b"b" * (1 << 20), "more_body": left > 0})

    args = types.SimpleNamespace(max_header_bytes=MAX_HEAD, read_timeout=1.0, max_concurrent_requests=MAX_REQUESTS)
    config = uvicorn.Config(
        app, http=_limited_protocol(HttpToolsProtocol, args), ws="none", lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, "uvicorn to start")
    try:
        yield listener.getsockname(), server
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


def test_a_client_that_stops_reading_its_answer_is_disconnected(big_answer_server: Any) -> None:
    """Input: a request for a 16 MiB answer, from a client that then reads nothing (4 KiB receive
    buffer). Outcome: about 1 s (the read timeout) after the server's buffers filled, the connection is
    dropped and the request's slot is freed; the client never gets the whole answer."""
    address, server = big_answer_server
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(address)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        wait_for(lambda: server.server_state.tasks, 10, "the request to start")
        wait_for(lambda: not server.server_state.tasks, 10, "the stalled answer's request to end")
        received = 0
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(1 << 20):
                received += len(data)
        assert received < 16 << 20, "the whole answer was kept for a client that did not read it"


# -- what the provider leaves on disk ---------------------------------------------------------------


def test_files_the_provider_writes_are_private(server: Server) -> None:
    """With a server deployed: the registry, the agent's records and logs, the runtime directory's
    sockets and locks: every file 0600 (or stricter), every directory 0700, nothing a group or other
    users may read."""
    import os
    import stat

    from airflow_provider_modeldeploy import config

    roots = {config.state_dir(), config.agent_state_dir(), config.runtime_dir()}
    seen: dict[str, int] = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
                continue
            seen[str(path)] = stat.S_IMODE(info.st_mode)
    assert any(p.endswith("registry.db") for p in seen) and any(p.endswith(".log") for p in seen), sorted(seen)
    exposed = {p: f"{m:04o}" for p, m in seen.items() if m & 0o077}
    assert not exposed, exposed
    for path, mode in seen.items():
        if Path(path).is_dir():
            assert mode == 0o700, (path, f"{mode:04o}")
