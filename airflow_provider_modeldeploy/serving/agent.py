"""The serving agent: one long-lived supervisor per serving host that owns the host's model servers.

Every Airflow component, on any host, acts on a local model server through the agent of the host it
runs on (its control API is in ``agent_api.py``); nothing else starts, signals or inspects them. The
agent

- starts servers forked from its fork server (``forkserver.py``: the libraries already imported),
  binds each endpoint's listening socket and keeps a duplicate of it, so the URL survives anything;
- checks a new server on its private staging socket (health and a smoke prediction) before it takes
  traffic, and hands the socket over to it on a replace (see ``mlflow_server.py``);
- knows its servers from its own records (pid and process start time, in a private state directory),
  never from command lines; a restarted agent re-adopts the servers it finds alive there;
- restarts a server whose master died (same socket, same URL), with backoff, and records it in the
  endpoint's history (a dead *worker* is replaced by its master, without reloading the model).

Servers outlive the agent: it is their child subreaper while it runs (so it reaps them and sees them
die at once), and if it dies they are re-parented and keep serving.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_modeldeploy.serving import forkserver, mlflow_server

log = logging.getLogger("modeldeploy.agent")

HOSTNAME = socket.gethostname()
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
#: A server whose master died is restarted after 1, 2, 4... s; more restarts than this within the
#: window and the agent gives up (the service shows as failed, with the last reason).
MAX_RESTARTS = 5
RESTART_WINDOW = 600.0
_KEEP_ENV_PREFIXES = ("AIRFLOW", "_AIRFLOW", "MODELDEPLOY_AGENT")


class AgentError(Exception):
    """A request the agent refuses or could not carry out; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422, field: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.status, self.field, self.value = status, field, value


@dataclass
class Managed:
    """One model server of this host: what was asked (wanted) kept apart from what runs (observed)."""

    uuid: str
    installation: str
    endpoint: str
    model_name: str
    model_uri: str
    args: list[str]
    record: dict[str, Any] = field(default_factory=dict)  # the registry's public record, for adoption
    env: dict[str, str] = field(default_factory=dict, repr=False)  # may hold tracking credentials
    registry_url: str | None = field(default=None, repr=False)
    wanted: str = "running"  # running | stopped
    phase: str = "loading"  # loading | ready | active | restarting | stopped | failed
    pid: int | None = None
    started: float | None = None  # the process's start time: with the pid, its identity
    address: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # served_uri, model_version, model_run_id
    error: str | None = None
    restarts: list[float] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        """What the API shows: never the environment or the registry URL."""
        data = asdict(self)
        for key in ("env", "registry_url", "args"):
            data.pop(key)
        data["host"] = HOSTNAME
        return data


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024 * max(1, lines // 200 + 1)))
            data = fh.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    return data[-lines:] if lines else []


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _set_child_subreaper() -> None:
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


class Agent:
    """The supervisor. Thread-safe: the API calls it from one thread per request."""

    def __init__(self, state_dir: Path, run_dir: Path, *, idle_timeout: float = 0, auto: bool = False) -> None:
        self.state_dir, self.run_dir = state_dir, run_dir
        self.records_dir = state_dir / "services"
        self.logs_dir = state_dir / "logs"
        for path in (self.records_dir, self.logs_dir):
            path.mkdir(mode=0o700, exist_ok=True)
        self.idle_timeout, self.auto = idle_timeout, auto
        self.agent_id = self._agent_id()
        self.services: dict[str, Managed] = {}
        self.listeners: dict[str, socket.socket] = {}  # uuid -> the endpoint's socket (a duplicate)
        self.locks: dict[str, threading.RLock] = {}
        self.lock = threading.RLock()
        self.fork_lock = threading.Lock()
        self.forkserver: subprocess.Popen | None = None
        self.channel: socket.socket | None = None
        self.forkserver_ready = threading.Event()
        self.stopping = threading.Event()
        self.last_request = time.monotonic()
        self.advertise_url: str | None = None

    # -- records ---------------------------------------------------------------------------------

    def _agent_id(self) -> str:
        path = self.state_dir / "agent-id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            import uuid

            value = f"{HOSTNAME}-{uuid.uuid4().hex[:8]}"
            _write_private(path, value)
            return value

    def _save(self, m: Managed) -> None:
        _write_private(self.records_dir / f"{m.uuid}.json", json.dumps(asdict(m)))

    def _paths(self, uuid: str) -> dict[str, Path]:
        key = uuid.replace("-", "")
        return {
            "state": self.run_dir / f"{key}.state",
            "ctl": self.run_dir / f"{key}.ctl",
            "staging": self.run_dir / f"{key}.sock",
            "log": self.logs_dir / f"{uuid}.log",
            "record": self.records_dir / f"{uuid}.json",
        }

    def service_lock(self, uuid: str) -> threading.RLock:
        with self.lock:
            return self.locks.setdefault(uuid, threading.RLock())

    def get(self, uuid: str) -> Managed:
        if not isinstance(uuid, str) or not UUID_RE.match(uuid):
            raise AgentError(f"uuid={uuid!r}: not a service uuid", 400, "uuid", uuid)
        with self.lock:
            m = self.services.get(uuid)
        if m is None:
            raise AgentError(f"uuid={uuid!r}: no model server of this service on host {HOSTNAME!r}", 404, "uuid", uuid)
        return m

    # -- processes -------------------------------------------------------------------------------

    def _process(self, m: Managed) -> Any:
        """The service's live master process, identified by pid *and* start time; else None."""
        import psutil

        if not m.pid or m.started is None:
            return None
        try:
            proc = psutil.Process(m.pid)
            if abs(proc.create_time() - m.started) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
        except psutil.Error:
            return None
        return proc

    def alive(self, m: Managed) -> bool:
        return self._process(m) is not None

    def _reap(self) -> None:
        """Collect exited children: the fork server's servers are ours while we are their subreaper."""
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def _terminate(self, m: Managed, grace: float) -> None:
        """Stop the master and its workers (SIGTERM, then SIGKILL after ``grace``)."""
        import psutil

        proc = self._process(m)
        if proc is None:
            return
        family = [proc]
        with contextlib.suppress(psutil.Error):
            family += proc.children(recursive=True)
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM if grace > 0 else signal.SIGKILL)
        deadline = time.monotonic() + max(grace, 0.1)
        while time.monotonic() < deadline and any(self._running(p) for p in family):
            self._reap()
            time.sleep(0.02)
        for p in family:
            if self._running(p):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(self._running(p) for p in family):
            self._reap()
            time.sleep(0.02)
        self._reap()

    @staticmethod
    def _running(p: Any) -> bool:
        import psutil

        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    # -- the fork server -------------------------------------------------------------------------

    def start_forkserver(self) -> None:
        """Start the fork server in the background; ``forkserver_ready`` is set once it has imported."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {k: v for k, v in os.environ.items() if not k.startswith(_KEEP_ENV_PREFIXES)}
        self.forkserver = subprocess.Popen(
            [sys.executable, "-m", forkserver.MODULE, "--fd", str(child.fileno())],
            pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env, cwd="/",
        )  # fmt: skip
        child.close()
        self.channel = parent

        def wait_ready() -> None:
            try:
                line = b""
                while not line.endswith(b"\n"):
                    data = parent.recv(64)
                    if not data:
                        raise OSError("the fork server exited while importing")
                    line += data
                self.forkserver_ready.set()
                log.info("fork server %s ready", self.forkserver.pid if self.forkserver else "?")
            except OSError as exc:
                log.warning("fork server unavailable (%s): servers start as new interpreters", exc)
                self.channel = None
                self.forkserver_ready.set()

        threading.Thread(target=wait_ready, name="forkserver-ready", daemon=True).start()

    def _spawn(self, m: Managed, listener: socket.socket, timeout: float) -> None:
        """Start the server process of ``m``; sets its pid and start time."""
        import psutil

        paths = self._paths(m.uuid)
        paths["state"].unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(_KEEP_ENV_PREFIXES)}
        env.update(m.env)
        fd = os.open(paths["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.forkserver_ready.wait(timeout)
            pid = None
            if self.channel is not None:
                try:
                    with self.fork_lock:
                        pid = forkserver.request_fork(
                            self.channel, m.args, env, str(self.state_dir), [fd, fd, listener.fileno()]
                        )
                except forkserver.ForkServerError as exc:
                    log.warning("fork server failed (%s): starting the server as a new interpreter", exc)
            if pid is None:
                argv = [str(listener.fileno()) if a == "{fd2}" else a for a in m.args]
                proc = subprocess.Popen(
                    [sys.executable, "-m", mlflow_server.SERVER_MODULE, *argv], pass_fds=(listener.fileno(),),
                    stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True, env=env,
                    cwd=str(self.state_dir),
                )  # fmt: skip
                pid = proc.pid
        finally:
            os.close(fd)
        m.pid = pid
        try:
            m.started = psutil.Process(pid).create_time()
        except psutil.Error:
            m.started = None

    def _wait_ready(self, m: Managed, timeout: float) -> dict[str, Any]:
        paths = self._paths(m.uuid)
        deadline = time.monotonic() + timeout
        while True:
            state = mlflow_server.read_state(paths["state"])
            if state and state.get("pid") == m.pid:
                if state["phase"] == "ready":
                    return state
                if state["phase"] == "failed":
                    raise AgentError(state.get("error") or "the model server failed to start", 422, state.get("field"))
            self._reap()
            if not self.alive(m):
                last = " | ".join(_tail(paths["log"], 3))
                raise AgentError(f"model_uri={m.model_uri!r}: the model server exited before it was ready: {last}")
            if time.monotonic() > deadline:
                raise AgentError(f"timeout={timeout!r}: the model server did not load {m.model_uri} in time")
            time.sleep(0.02)

    def _check_staging(self, m: Managed, smoke_input: Any) -> None:
        import httpx

        staging = str(self._paths(m.uuid)["staging"])
        with httpx.Client(transport=httpx.HTTPTransport(uds=staging), base_url="http://staging", timeout=60) as c:
            try:
                health = c.get("/health")
                if health.status_code != 200:
                    raise AgentError(f"model_uri={m.model_uri!r}: /health answered {health.status_code}")
                if smoke_input is None:
                    return
                body = smoke_input if isinstance(smoke_input, str) else json.dumps(smoke_input)
                answer = c.post("/invocations", content=body, headers={"content-type": "application/json"})
            except httpx.HTTPError as exc:
                raise AgentError(f"model_uri={m.model_uri!r}: health check failed ({exc})") from None
        if answer.status_code != 200:
            raise AgentError(
                f"model_uri={m.model_uri!r}: the smoke prediction failed with HTTP {answer.status_code}: "
                f"{answer.text[:300]}"
            )

    # -- sockets ---------------------------------------------------------------------------------

    @staticmethod
    def _bind(host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(2048)
        except BaseException:
            sock.close()
            raise
        return sock

    def _listener(self, m: Managed, bind: dict[str, Any], previous: str | None) -> socket.socket:
        """The endpoint's socket: the previous server's (a replace keeps the URL), else a new one."""
        if previous:
            with self.lock:
                held = self.listeners.get(previous)
            if held is not None:
                # Not socket.dup(): it sets the duplicate's timeout, i.e. O_NONBLOCK off on the file
                # description every process of the endpoint shares, and the serving workers' accept
                # loops would then block in accept().
                return socket.socket(held.family, held.type, held.proto, fileno=os.dup(held.fileno()))
        host = str(bind.get("host") or "127.0.0.1")
        port = bind.get("port")
        if port:
            deadline = time.monotonic() + 10
            while True:  # a server that is exiting may still hold the port for a moment
                try:
                    return self._bind(host, int(port))
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                        raise AgentError(
                            f"port={port!r}: the port of endpoint '{m.endpoint}' on {host} is unavailable "
                            f"({os.strerror(exc.errno or 0) or exc}); stop whatever else listens there",
                            409, "port", port,
                        ) from None  # fmt: skip
                time.sleep(0.2)
        first, last = bind.get("port_range") or (5200, 5399)
        for candidate in range(int(first), int(last) + 1):
            try:
                return self._bind(host, candidate)
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise AgentError(
                        f"host={host!r}: is not an address of host {HOSTNAME!r}", 422, "host", host
                    ) from None
                if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
        raise AgentError(
            f"port_range='{first}-{last}': no free port on {host}: all {int(last) - int(first) + 1} ports are in use",
            409, "port_range", f"{first}-{last}",
        )  # fmt: skip

    def _address(self, listener: socket.socket) -> dict[str, Any]:
        host, port = listener.getsockname()[:2]
        public = socket.getfqdn() if host in ("0.0.0.0", "::") else host
        url_host = f"[{public}]" if ":" in public else public
        return {
            "host": host, "port": port, "prediction_url": f"http://{url_host}:{port}/invocations",
            "health_url": f"http://{url_host}:{port}/health",
        }  # fmt: skip

    # -- the operations the API offers -----------------------------------------------------------

    def deploy(self, req: dict[str, Any]) -> dict[str, Any]:
        """Start a server for a service and check it on its staging socket; it takes no traffic yet."""
        uuid = req.get("uuid")
        if not isinstance(uuid, str) or not UUID_RE.match(uuid):
            raise AgentError(f"uuid={uuid!r}: not a service uuid", 400, "uuid", uuid)
        for key in ("endpoint", "model_uri", "model_name", "installation"):
            if not isinstance(req.get(key), str) or not req[key]:
                raise AgentError(f"{key}={req.get(key)!r}: required", 400, key, req.get(key))
        timeout = float(req.get("timeout") or 300)
        options = req.get("options") or {}
        with self.service_lock(uuid):
            with self.lock:
                old = self.services.get(uuid)
            if old is not None:  # a service that ran before (start): stop what is left of that run
                self._stop_process(old, 0, force=True)
            m = Managed(
                uuid=uuid, installation=req["installation"], endpoint=req["endpoint"], model_name=req["model_name"],
                model_uri=req["model_uri"], record=req.get("record") or {}, env=dict(req.get("env") or {}),
                registry_url=req.get("registry_url"),
                args=[
                    "--service-uuid", uuid, "--model-uri", req["model_uri"], "--model-name", req["model_name"],
                    "--listen-fd", "{fd2}", "--runtime-dir", str(self.run_dir),
                    "--workers", str(int(options.get("workers") or 1)), "--start-timeout", str(int(timeout)),
                    "--fast-path", "on" if options.get("fast_path", True) else "off",
                ],
            )  # fmt: skip
            listener = self._listener(m, req.get("bind") or {}, req.get("previous_uuid"))
            m.address = self._address(listener)
            with self.lock:
                self.services[uuid] = m
            try:
                self._spawn(m, listener, timeout)
                self._save(m)
                state = self._wait_ready(m, timeout)
                m.info = {k: state.get(k) for k in ("served_uri", "model_version", "model_run_id")}
                self._check_staging(m, options.get("smoke_input") or state.get("input_example"))
            except BaseException as exc:
                self._discard(m, listener)
                if isinstance(exc, AgentError):
                    raise
                raise AgentError(f"model_uri={m.model_uri!r}: {type(exc).__name__}: {exc}", 500) from None
            with self.lock:
                self.listeners[uuid] = listener
            m.phase, m.error = "ready", None
            self._save(m)
            log.info("service %s: %s ready (pid %s) at %s", uuid, m.model_uri, m.pid, m.address["prediction_url"])
            return {
                "service": m.public(),
                "agent_id": self.agent_id,
                "host": HOSTNAME,
                "advertise_url": self.advertise_url,
            }

    def _discard(self, m: Managed, listener: socket.socket | None) -> None:
        self._terminate(m, grace=2)
        if listener is not None:
            listener.close()
        with self.lock:
            self.services.pop(m.uuid, None)
            held = self.listeners.pop(m.uuid, None)
        if held is not None and held is not listener:
            held.close()
        paths = self._paths(m.uuid)
        for name in ("record", "ctl", "staging", "state"):
            paths[name].unlink(missing_ok=True)

    def activate(self, uuid: str, previous_uuid: str | None, drain_timeout: float) -> dict[str, Any]:
        """Let the new server accept from the endpoint's socket; then drain the previous one. Once the
        new one takes traffic nothing undoes it: a failure to stop the previous one is reported only."""
        m = self.get(uuid)
        with self.service_lock(uuid):
            try:
                answer = mlflow_server.control_request(self._paths(uuid)["ctl"], "activate", timeout=30)
            except mlflow_server.ControlError as exc:
                raise AgentError(f"uuid={uuid!r}: the new server could not be activated ({exc})", 500) from None
            if not answer.get("ok"):
                raise AgentError(f"uuid={uuid!r}: {answer.get('error')}", 500)
            m.phase, m.wanted, m.error = "active", "running", None
            self._save(m)
        previous_error = None
        if previous_uuid and previous_uuid != uuid:
            try:
                self.stop(previous_uuid, drain_timeout, force=False)
            except AgentError as exc:
                previous_error = None if exc.status == 404 else str(exc)
            except Exception as exc:
                previous_error = f"{type(exc).__name__}: {exc}"
        return {"service": m.public(), "previous_error": previous_error}

    def _stop_process(self, m: Managed, timeout: float, force: bool) -> None:
        proc = self._process(m)
        if proc is not None and not force:
            with contextlib.suppress(mlflow_server.ControlError):
                mlflow_server.control_request(
                    self._paths(m.uuid)["ctl"], "drain", timeout=timeout + 5, drain_timeout=timeout
                )
        self._terminate(m, grace=0 if force else 5)
        with self.lock:
            held = self.listeners.pop(m.uuid, None)
        if held is not None:
            held.close()
        for name in ("ctl", "staging"):
            self._paths(m.uuid)[name].unlink(missing_ok=True)

    def stop(self, uuid: str, timeout: float, force: bool) -> dict[str, Any]:
        m = self.get(uuid)
        with self.service_lock(uuid):
            m.wanted = "stopped"  # first, so that the supervisor does not restart it meanwhile
            self._save(m)
            self._stop_process(m, timeout, force)
            m.phase, m.pid, m.started = "stopped", None, None
            self._save(m)
        return {"service": m.public()}

    def delete(self, uuid: str, force: bool) -> dict[str, Any]:
        """Stop the service's server and remove all that is kept of it (a service this agent no longer
        runs, e.g. one whose deployment failed, may still have a log)."""
        if not isinstance(uuid, str) or not UUID_RE.match(uuid):
            raise AgentError(f"uuid={uuid!r}: not a service uuid", 400, "uuid", uuid)
        with self.service_lock(uuid):
            with self.lock:
                m = self.services.get(uuid)
            if m is not None:
                m.wanted = "stopped"
                self._stop_process(m, 10, force)
                with self.lock:
                    self.services.pop(uuid, None)
            paths = self._paths(uuid)
            for name in ("record", "state", "log"):
                paths[name].unlink(missing_ok=True)
        return {"deleted": uuid}

    def status(self, uuid: str) -> dict[str, Any]:
        m = self.get(uuid)
        return {"service": self._observed(m)}

    def _observed(self, m: Managed) -> dict[str, Any]:
        data = m.public()
        data["alive"] = self.alive(m)
        return data

    def list(self, installation: str | None) -> dict[str, Any]:
        with self.lock:
            found = [m for m in self.services.values() if installation in (None, m.installation)]
        return {"services": [self._observed(m) for m in found], "agent_id": self.agent_id, "host": HOSTNAME}

    def logs(self, uuid: str, tail: int | None, follow: bool) -> Iterator[str]:
        m = self.get(uuid)
        path = self._paths(uuid)["log"]
        if not follow:
            if tail is not None:
                yield from _tail(path, tail)
            elif path.exists():
                with path.open(errors="replace") as fh:
                    yield from (line.rstrip("\n") for line in fh)
            return
        yield from _tail(path, tail if tail is not None else 10)
        with contextlib.suppress(FileNotFoundError), path.open(errors="replace") as fh:
            fh.seek(0, os.SEEK_END)
            while not self.stopping.is_set():
                line = fh.readline()
                if line:
                    yield line.rstrip("\n")
                    continue
                if m.wanted == "stopped" or m.phase == "failed" or self.services.get(uuid) is not m:
                    return
                time.sleep(0.25)

    # -- supervision -----------------------------------------------------------------------------

    def adopt(self) -> None:
        """Take back the servers of the records a previous agent left (after a crash or an upgrade)."""
        for path in sorted(self.records_dir.glob("*.json")):
            try:
                m = Managed(**json.loads(path.read_text()))
            except (ValueError, TypeError) as exc:
                log.warning("ignoring unreadable record %s (%s)", path.name, exc)
                continue
            alive = self.alive(m)
            if not alive and m.phase in ("loading", "ready"):
                # Its deployment died with the previous agent: it never took traffic.
                path.unlink(missing_ok=True)
                continue
            with self.lock:
                self.services[m.uuid] = m
            if alive and m.phase == "active":
                try:
                    self.listeners[m.uuid] = mlflow_server.fetch_listener(self._paths(m.uuid)["ctl"])
                except mlflow_server.ControlError as exc:
                    log.warning("service %s: could not take its socket back (%s)", m.uuid, exc)
            log.info("adopted service %s (%s, pid %s, %s)", m.uuid, m.model_uri, m.pid, "alive" if alive else "dead")

    def supervise(self) -> None:
        """Reap, restart servers that died, and exit when idle (an agent started on first use)."""
        while not self.stopping.is_set():
            self._reap()
            with self.lock:
                services = list(self.services.values())
            for m in services:
                if m.wanted == "running" and m.phase in ("active", "restarting") and not self.alive(m):
                    lock = self.service_lock(m.uuid)
                    if lock.acquire(blocking=False):  # else an operation on it is under way
                        try:
                            if m.wanted == "running" and not self.alive(m):
                                self._restart(m)
                        finally:
                            lock.release()
            idle = time.monotonic() - self.last_request > self.idle_timeout
            if self.auto and self.idle_timeout > 0 and idle and not any(self.alive(m) for m in services):
                log.info("idle for %.0fs with no model server; exiting", self.idle_timeout)
                self.stopping.set()
                return
            self.stopping.wait(0.2)

    def _restart(self, m: Managed) -> None:
        now = time.time()
        m.restarts = [t for t in m.restarts if now - t < RESTART_WINDOW]
        state = mlflow_server.read_state(self._paths(m.uuid)["state"]) or {}
        reason = state.get("error") if state.get("pid") == m.pid and state.get("phase") == "failed" else None
        reason = reason or f"the model server process {m.pid} exited"
        if len(m.restarts) >= MAX_RESTARTS:
            m.phase, m.error = "failed", f"{reason}; gave up after {len(m.restarts)} restarts in {RESTART_WINDOW:.0f}s"
            self._save(m)
            self._event(m, "restart", m.error, outcome="failed")
            return
        delay = min(30.0, 2.0 ** len(m.restarts)) if m.restarts else 0.5
        m.phase, m.error = "restarting", reason
        m.restarts.append(now)
        self._save(m)
        log.warning("service %s: %s; restarting in %.1fs", m.uuid, reason, delay)
        if self.stopping.wait(delay):
            return
        with self.lock:
            listener = self.listeners.get(m.uuid)
        try:
            if listener is None:
                bound = self._bind(str(m.address["host"]), int(m.address["port"]))
                with self.lock:
                    self.listeners[m.uuid] = listener = bound
            self._spawn(m, listener, 300)
            self._save(m)
            self._wait_ready(m, 300)
            self._check_staging(m, None)
            answer = mlflow_server.control_request(self._paths(m.uuid)["ctl"], "activate", timeout=30)
            if not answer.get("ok"):
                raise AgentError(str(answer.get("error")))
        except Exception as exc:
            self._terminate(m, grace=1)
            m.error = f"{reason}; the restart failed: {exc}"
            self._save(m)
            log.warning("service %s: %s", m.uuid, m.error)
            return
        m.phase = "active"
        self._save(m)
        self._event(m, "restart", f"{reason}; restarted as pid {m.pid} at {m.address.get('prediction_url')}")

    def _event(self, m: Managed, action: str, message: str, outcome: str = "success") -> None:
        """Record what the agent did in the endpoint's history (best effort: serving comes first)."""
        if not m.registry_url:
            return
        try:
            from airflow_provider_modeldeploy.registry.store import Registry

            registry = Registry(m.registry_url)
            try:
                registry.add_event(
                    "mlflow", m.endpoint, action, outcome=outcome, service_uuid=m.uuid,
                    actor=f"serving agent {self.agent_id}", message=message,
                )  # fmt: skip
                if outcome == "success":
                    registry.update_service(m.uuid, pid=m.pid)
            finally:
                registry.dispose()
        except Exception as exc:
            log.warning("service %s: could not record '%s' in the registry: %s", m.uuid, action, exc)

    def shutdown(self) -> None:
        """Stop supervising. The servers keep serving; the next agent adopts them from the records."""
        self.stopping.set()
