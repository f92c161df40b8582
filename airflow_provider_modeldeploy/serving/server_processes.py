"""How the serving agent runs model-server processes: the fork server, binding and handing over the
endpoint's socket, waiting for a server to load, checking it on its staging socket, and stopping it.

A process is known by its pid *and* its start time (as recorded in ``Managed``), never by its command
line: a pid reused by another process is never signalled. See ``agent.py`` for what is done with them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_modeldeploy.serving import forkserver, mlflow_server
from airflow_provider_modeldeploy.serving import metrics as server_metrics

log = logging.getLogger("modeldeploy.agent")

HOSTNAME = socket.gethostname()
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


class ServerProcesses:
    """The process side of the agent (``Agent`` adds its records, operations and supervision)."""

    def __init__(self, state_dir: Path, run_dir: Path) -> None:
        self.state_dir, self.run_dir = state_dir, run_dir
        self.records_dir = state_dir / "services"
        self.logs_dir = state_dir / "logs"
        for path in (self.records_dir, self.logs_dir):
            path.mkdir(mode=0o700, exist_ok=True)
        self.listeners: dict[str, socket.socket] = {}  # uuid -> the endpoint's socket (a duplicate)
        self.lock = threading.RLock()
        self.fork_lock = threading.Lock()
        self.forkserver: subprocess.Popen | None = None
        self.channel: socket.socket | None = None
        self.forkserver_ready = threading.Event()

    def _paths(self, uuid: str) -> dict[str, Path]:
        key = uuid.replace("-", "")
        return {
            "state": self.run_dir / f"{key}.state",
            "ctl": self.run_dir / f"{key}.ctl",
            "staging": self.run_dir / f"{key}.sock",
            "log": self.logs_dir / f"{uuid}.log",
            "record": self.records_dir / f"{uuid}.json",
        }

    def staging_client(self, m: Managed, timeout: float) -> Any:
        """An httpx client of ``m``'s staging socket (only the agent talks to a server there)."""
        import httpx

        from airflow_provider_modeldeploy.hooks.tls import default_tls

        transport = httpx.HTTPTransport(uds=str(self._paths(m.uuid)["staging"]), verify=default_tls())
        return httpx.Client(transport=transport, base_url="http://staging", timeout=timeout)

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
            self._remove_leftovers(m.uuid)
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
        self._remove_leftovers(m.uuid)  # the master removes them, unless it was killed

    def _remove_leftovers(self, uuid: str) -> None:
        """A stopped service's metrics directories and temporary directory (its master's to remove)."""
        server_metrics.remove_dirs(self.run_dir, uuid)
        mlflow_server.remove_own_tmp(uuid)

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
        self._remove_leftovers(m.uuid)  # of a previous generation killed before it could
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

        with self.staging_client(m, timeout=60) as c:
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
