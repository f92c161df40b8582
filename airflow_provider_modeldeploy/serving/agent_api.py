"""The serving agent's control API (version 1): JSON over HTTP, on a unix socket and optionally TCP.

- The unix socket lives in the private runtime directory (checked: owned by this user, 0700, not a
  symlink) and answers only peers of the same uid (SO_PEERCRED).
- The TCP listener, for other hosts, exists only with a shared token, sent as ``Authorization:
  Bearer <token>``; a request without the right one gets 401 and nothing is done. The token comes
  from the environment or Airflow's configuration, never from the command line.

Routes::

    GET    /v1/health                         the agent: id, host, pid, code stamp, services
    GET    /v1/services?installation=ID       its services (one installation's, by registry id)
    POST   /v1/services                       start and check a server (no traffic yet)
    GET    /v1/services/<uuid>                one service, observed now
    POST   /v1/services/<uuid>/activate       it takes the endpoint's traffic; the previous drains
    POST   /v1/services/<uuid>/stop           drain and stop (``{"timeout": s, "force": bool}``)
    DELETE /v1/services/<uuid>                stop and forget, log included
    GET    /v1/services/<uuid>/logs           ``?tail=N&follow=1`` (plain text, streamed)
    GET    /v1/services/<uuid>/metrics        ``?start=EPOCH&end=EPOCH``: per-minute figures (metrics_store.py)
    POST   /v1/metrics/sample                 read every active server's /metrics now
    POST   /v1/shutdown                       the agent exits; its servers keep serving
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.server
import json
import logging
import os
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from airflow_provider_modeldeploy.serving.agent import HOSTNAME, Agent, AgentError

MODULE = "airflow_provider_modeldeploy.serving.agent_api"
API_VERSION = "v1"
TOKEN_ENV = "MODELDEPLOY_AGENT_TOKEN"
log = logging.getLogger("modeldeploy.agent")


def socket_path(run_dir: Path) -> Path:
    return run_dir / "agent.sock"


def code_stamp() -> str:
    """Changes when the installed provider does: a client restarts an agent started on first use that
    runs older code (its servers keep serving and the new agent adopts them)."""
    here = Path(__file__).resolve().parent
    # The interpreter as a file, not as spelled: `python` and `python3` of one venv are the same agent.
    stamp = [os.path.realpath(sys.executable), str(here)]
    for path in sorted(here.glob("*.py")):
        with contextlib.suppress(OSError):
            stamp.append(f"{path.name}:{path.stat().st_mtime_ns}")
    return hashlib.sha256("\0".join(stamp).encode()).hexdigest()[:16]


def state_stamp(state_dir: Path) -> str:
    """Which records an agent keeps (its state directory), without showing the path: a client restarts
    an agent of older code only if the new agent, started with the client's state directory, would
    find the old one's servers there."""
    return hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:16]


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "modeldeploy-agent/1"
    protocol_version = "HTTP/1.0"  # one request per connection; a streamed log ends with the connection

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.command, self.path)

    @property
    def agent(self) -> Agent:
        return self.server.agent  # type: ignore[attr-defined]

    def _authorized(self) -> bool:
        token = self.server.token  # type: ignore[attr-defined]
        if token is None:  # the unix socket: its peer was checked when accepted
            return True
        given = self.headers.get("Authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 1 << 20:
            raise AgentError("the request body is larger than 1 MiB", 413)
        if not length:
            return {}
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError as exc:
            raise AgentError(f"the request body is not JSON ({exc})", 400) from None
        if not isinstance(body, dict):
            raise AgentError("the request body must be a JSON object", 400)
        return body

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        if not self._authorized():
            self._send(401, {"error": "a valid agent token is required (Authorization: Bearer ...)"})
            return
        self.agent.last_request = time.monotonic()
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        try:
            if not parts or parts[0] != API_VERSION:
                raise AgentError(f"path={url.path!r}: unknown API version (this agent speaks {API_VERSION})", 404)
            route = (method, *parts[1:2], *(["*"] if len(parts) > 2 else []), *parts[3:])
            if route == ("GET", "health"):
                self._send(200, self._health())
            elif route == ("GET", "services"):
                self._send(200, self.agent.list(query.get("installation")))
            elif route == ("POST", "services"):
                self._send(200, self.agent.deploy(self._body()))
            elif route == ("GET", "services", "*"):
                self._send(200, self.agent.status(parts[2]))
            elif route == ("POST", "services", "*", "activate"):
                body = self._body()
                self._send(
                    200, self.agent.activate(parts[2], body.get("previous_uuid"), _number(body, "drain_timeout", 30))
                )
            elif route == ("POST", "services", "*", "stop"):
                body = self._body()
                self._send(200, self.agent.stop(parts[2], _number(body, "timeout", 60), bool(body.get("force"))))
            elif route == ("DELETE", "services", "*"):
                self._send(200, self.agent.delete(parts[2], query.get("force") in ("1", "true")))
            elif route == ("GET", "services", "*", "logs"):
                self._logs(parts[2], query)
            elif route == ("GET", "services", "*", "metrics"):
                self._send(200, self._metrics(parts[2], query))
            elif route == ("POST", "metrics", "*") and parts[2] == "sample":
                self._send(200, {"sampled": self.agent.sampler.sample_all()})
            elif route == ("POST", "shutdown"):
                self._send(200, {"stopping": True})
                self.agent.shutdown()
            else:
                raise AgentError(f"{method} {url.path}: no such route", 404)
        except AgentError as exc:
            self._send(exc.status, {"error": str(exc), "field": exc.field, "value": _jsonable(exc.value)})
        except BrokenPipeError:
            pass
        except Exception as exc:
            log.exception("%s %s failed", method, url.path)
            self._send(500, {"error": f"{type(exc).__name__}: {exc}"})

    def _health(self) -> dict[str, Any]:
        agent = self.agent
        return {
            "agent_id": agent.agent_id, "host": HOSTNAME, "pid": os.getpid(), "api": API_VERSION,
            "stamp": code_stamp(), "auto": agent.auto, "advertise_url": agent.advertise_url,
            "forkserver_ready": agent.forkserver_ready.is_set(), "services": len(agent.services),
            "state": state_stamp(agent.state_dir),
        }  # fmt: skip

    def _metrics(self, uuid: str, query: dict[str, str]) -> dict[str, Any]:
        from airflow_provider_modeldeploy.serving.agent import _check_uuid

        _check_uuid(uuid)  # kept after the service is gone: no need for it to run here
        now = time.time()
        bounds = {}
        for key, default in (("start", now - 3600), ("end", now)):
            try:
                bounds[key] = float(query.get(key, default))
            except ValueError:
                raise AgentError(f"{key}={query.get(key)!r}: must be a Unix time", 400, key, query.get(key)) from None
        sampler = self.agent.sampler
        return {
            "uuid": uuid, "interval": sampler.interval, "sampled_since": sampler.since,
            "points": sampler.store.query(uuid, bounds["start"], bounds["end"]),
        }  # fmt: skip

    def _logs(self, uuid: str, query: dict[str, str]) -> None:
        tail = query.get("tail")
        if tail is not None and not tail.isdigit():
            raise AgentError(f"tail={tail!r}: must be a non-negative integer", 400, "tail", tail)
        lines = self.agent.logs(uuid, int(tail) if tail is not None else None, query.get("follow") in ("1", "true"))
        first = next(lines, None)  # raises for an unknown service before the answer starts
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if first is not None:
                self.wfile.write(first.encode() + b"\n")
                self.wfile.flush()
            for line in lines:
                self.wfile.write(line.encode() + b"\n")
                self.wfile.flush()


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise AgentError(f"{key}={value!r}: must be a non-negative number of seconds", 400, key, value)
    return float(value)


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | type(None)) else str(value)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    token = None

    def verify_request(self, request: Any, client_address: Any) -> bool:
        creds = request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            log.warning("refused a control connection from uid %s", uid)
            return False
        return True

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)  # the handler logs a client address; a unix peer has none


class _TcpServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _take_lock(run_dir: Path) -> int | None:
    """An exclusive lock held for the agent's life: one agent per runtime directory, even when two
    deployments start one at the same moment. None: another agent holds it."""
    import fcntl

    fd = os.open(run_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def serve(
    state_dir: Path,
    run_dir: Path,
    *,
    listen: tuple[str, int] | None = None,
    token: str | None = None,
    advertise_url: str | None = None,
    idle_timeout: float = 0,
    auto: bool = False,
    metrics_interval: float = 15.0,
) -> int:
    """Run an agent until it is told to stop (SIGTERM, SIGINT, /v1/shutdown) or, started on first use,
    until it is idle. Returns the exit code."""
    from airflow_provider_modeldeploy.serving.agent import _set_child_subreaper

    if listen is not None and not token:
        print("a TCP listener needs a token: set [modeldeploy] agent_token or MODELDEPLOY_AGENT_TOKEN", file=sys.stderr)
        return 2
    lock = _take_lock(run_dir)
    if lock is None:
        log.info("another serving agent runs for %s; exiting", run_dir)
        return 0
    _set_child_subreaper()
    agent = Agent(state_dir, run_dir, idle_timeout=idle_timeout, auto=auto, metrics_interval=metrics_interval)
    agent.advertise_url = advertise_url or (f"http://{listen[0]}:{listen[1]}" if listen else None)
    agent.start_forkserver()
    agent.adopt()
    path = socket_path(run_dir)
    path.unlink(missing_ok=True)
    old_umask = os.umask(0o077)
    try:
        servers: list[socketserver.BaseServer] = [_UnixServer(str(path), _Handler)]
    finally:
        os.umask(old_umask)
    if listen is not None:
        tcp = _TcpServer(listen, _Handler)
        tcp.token = token  # type: ignore[attr-defined]
        servers.append(tcp)
    for server in servers:
        server.agent = agent  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    threading.Thread(target=agent.sampler.run, name="metrics-sampler", daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.shutdown())
    log.info(
        "serving agent %s (pid %s) ready at %s%s", agent.agent_id, os.getpid(), path,
        f" and {agent.advertise_url}" if listen else "",
    )  # fmt: skip
    try:
        agent.supervise()
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        with contextlib.suppress(OSError):
            path.unlink()
        if agent.forkserver is not None:
            agent.forkserver.terminate()
            with contextlib.suppress(Exception):
                agent.forkserver.wait(10)
        os.close(lock)
        agent.sampler.store.close()
        log.info("serving agent stopped; its model servers keep serving")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The agent started on first use by a deployer (``python -m`` this module)."""
    import argparse

    parser = argparse.ArgumentParser(prog=MODULE, description="The serving agent of this host.")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--idle-timeout", type=float, default=600)
    parser.add_argument("--metrics-interval", type=float, default=15)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [agent pid=%(process)d] %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return serve(
        Path(args.state_dir), Path(args.run_dir), idle_timeout=args.idle_timeout, auto=True,
        metrics_interval=args.metrics_interval,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
