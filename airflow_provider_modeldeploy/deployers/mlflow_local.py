"""The local MLflow backend (the embedded default): each service is a model-server process tree.

The servers outlive the Airflow task that starts them (own session, no parent-death signal). The
endpoint's listening socket is bound here, on a port of the connection's range (bind is the test
for a free port, so there is no race), and handed to the server; a replacement server receives it
from the running one, so the URL and the accept queue survive every replace. See
``serving/mlflow_server.py`` for the process side.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from airflow_provider_modeldeploy import config
from airflow_provider_modeldeploy.deployers.base import BaseModelDeployer, Launch
from airflow_provider_modeldeploy.exceptions import DeploymentFailedError, InvalidParameterError
from airflow_provider_modeldeploy.hooks.mlflow_local import MlflowDeployerHook, MlflowServingSettings
from airflow_provider_modeldeploy.registry import EndpointLease, Registry
from airflow_provider_modeldeploy.registry.store import HOSTNAME
from airflow_provider_modeldeploy.services import ServiceRecord, ServiceState
from airflow_provider_modeldeploy.serving import mlflow_server, warm_host

log = logging.getLogger(__name__)


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


#: What a service file may give an adopted record; its state and times come from what runs now.
_ADOPTABLE_FIELDS = frozenset(ServiceRecord.__dataclass_fields__) - {"created_at", "updated_at", "state"}


def _wait_exited(procs: list[Any], timeout: float) -> list[Any]:
    """The processes still running after at most ``timeout`` seconds.

    A zombie has exited (its sockets are closed): it is not waited for. A server outlives the task
    that started it, so its parent is pid 1, and some container inits reap orphans only every second
    or so; ``psutil.wait_procs`` would wait for that on every replace and stop.
    """
    import psutil

    def running(p: Any) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in procs if running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


class MLflowLocalDeployer(BaseModelDeployer):
    """Serves MLflow pyfunc models as local processes with MLflow's scoring protocol.

    Backend options (``ServiceConfig(..., **options)``): ``workers`` (processes sharing the socket),
    ``timeout`` (per-request seconds), ``port`` (pin the endpoint's port), ``smoke_input`` (a JSON
    body for the smoke prediction; default: the model's logged input example), ``fast_path``
    (default true: plain rows for a scikit-learn model with a column signature are answered without
    pandas, with the answers MLflow's app gives; false sends every request through MLflow's app).
    """

    backend = "mlflow"
    backend_options: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "workers": int,
        "timeout": int,
        "port": int,
        "smoke_input": (str, dict, list),
        "fast_path": bool,
    }

    def __init__(
        self,
        conn_id: str | None = None,
        registry: Registry | None = None,
        hook: MlflowDeployerHook | None = None,
    ) -> None:
        super().__init__(conn_id=conn_id, registry=registry)
        self.hook = hook or MlflowDeployerHook(conn_id=conn_id)
        self._settings: MlflowServingSettings | None = None

    @classmethod
    def from_connection(cls, conn_id: str, connection: Any) -> MLflowLocalDeployer:
        return cls(conn_id=conn_id, hook=MlflowDeployerHook(conn_id=conn_id, connection=connection))

    @property
    def settings(self) -> MlflowServingSettings:
        if self._settings is None:
            self._settings = self.hook.get_settings()
        return self._settings

    def _validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        clean = super()._validate_options(options)
        for key in ("workers", "timeout"):
            if key in clean and clean[key] < 1:
                raise InvalidParameterError(key, clean[key], "must be a positive integer")
        if "port" in clean and not 1 <= clean["port"] <= 65535:
            raise InvalidParameterError("port", clean["port"], "must be between 1 and 65535")
        if isinstance(clean.get("smoke_input"), str):
            try:
                json.loads(clean["smoke_input"])
            except ValueError as exc:
                raise InvalidParameterError("smoke_input", clean["smoke_input"], f"is not JSON ({exc})") from None
        public = self.settings.public()
        return {**public, **{k: v for k, v in clean.items()}}

    # -- paths -----------------------------------------------------------------------------------

    @staticmethod
    def _paths(service_uuid: str) -> dict[str, Path]:
        key = service_uuid.replace("-", "")
        run = config.runtime_dir()
        return {
            "state": run / f"{key}.state",
            "ctl": run / f"{key}.ctl",
            "staging": run / f"{key}.sock",
            "log": config.logs_dir() / f"{service_uuid}.log",
            # What the registry knows of the service, kept beside its log so that `sync` can adopt
            # a running server whose registry row was lost (never a secret: config is public).
            "record": config.logs_dir() / f"{service_uuid}.service.json",
        }

    # -- process identity ------------------------------------------------------------------------

    @staticmethod
    def _server_process(record: ServiceRecord, pid: int | None = None) -> Any:
        """The live server process of this service, checked by pid *and* command line, else None."""
        import psutil

        pid = pid or record.pid
        if not pid or (record.host and record.host != HOSTNAME):
            return None
        try:
            proc = psutil.Process(pid)
            cmdline = proc.cmdline()
            if proc.status() == psutil.STATUS_ZOMBIE:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return None
        if mlflow_server.SERVER_MODULE in cmdline and record.uuid in cmdline:
            return proc
        return None  # the pid was reused by an unrelated process: never signal it

    @staticmethod
    def _service_processes(record: ServiceRecord) -> list[Any]:
        """Every process of this service (master and forked workers share its command line)."""
        import psutil

        if record.host and record.host != HOSTNAME:
            return []
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info.get("cmdline") or []
            if mlflow_server.SERVER_MODULE in cmdline and record.uuid in cmdline:
                found.append(proc)
        return found

    def _terminate(self, record: ServiceRecord, pid: int | None, grace: float) -> None:
        import psutil

        proc = self._server_process(record, pid)
        family = [proc, *proc.children(recursive=True)] if proc is not None else []
        # Workers orphaned by a master that was killed are found by their command line.
        family += [p for p in self._service_processes(record) if p.pid not in {f.pid for f in family}]
        if not family:
            return
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM if grace > 0 else signal.SIGKILL)
        alive = _wait_exited(family, timeout=max(grace, 0.1))
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _wait_exited(alive, timeout=5)
        for p in family:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(p.pid, os.WNOHANG)

    # -- the listening socket --------------------------------------------------------------------

    def _bind(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(2048)
        except BaseException:
            sock.close()
            raise
        sock.set_inheritable(True)
        return sock

    def _bind_released(self, host: str, port: int) -> socket.socket:
        """Bind the endpoint's own port, waiting a little for a process that is exiting to let go of it.

        A killed server's workers close their sockets only at the end of their exit, after their
        command line (by which we find them) is already gone.
        """
        from tenacity import retry, retry_if_exception, stop_after_delay, wait_fixed

        in_use = retry_if_exception(lambda exc: isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE)
        bind = retry(retry=in_use, stop=stop_after_delay(10), wait=wait_fixed(0.2), reraise=True)(self._bind)
        return bind(host, port)

    def _listener(self, record: ServiceRecord, lease: EndpointLease, previous: ServiceRecord | None) -> socket.socket:
        host = lease.address.get("host") or self.settings.host
        if previous is not None and self._server_process(previous) is not None:
            try:
                sock = mlflow_server.fetch_listener(self._paths(previous.uuid)["ctl"])
                sock.set_inheritable(True)
                return sock
            except mlflow_server.ControlError as exc:
                log.warning("Could not take the socket over from service %s (%s); binding anew", previous.uuid, exc)
        port = lease.address.get("port") or record.config.get("port")
        if port:
            try:
                return self._bind_released(host, int(port))
            except OSError as exc:
                raise DeploymentFailedError(
                    f"port={port!r}: the port of endpoint '{record.endpoint}' on {host} is unavailable "
                    f"({os.strerror(exc.errno or 0) or exc}); stop whatever else listens there"
                ) from None
        first, last = self.settings.port_range
        for candidate in range(first, last + 1):
            try:
                return self._bind(host, candidate)
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise InvalidParameterError("host", host, "is not an address of this machine") from None
                if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
        raise InvalidParameterError(
            "port_range",
            f"{first}-{last}",
            f"no free port on {host}: all {last - first + 1} ports are in use",
        )

    # -- lifecycle -------------------------------------------------------------------------------

    def _launch(
        self, record: ServiceRecord, lease: EndpointLease, previous: ServiceRecord | None, timeout: float
    ) -> Launch:
        paths = self._paths(record.uuid)
        if record.pid is not None:  # a service that ran before: stop what is left of that run
            self._terminate(record, None, grace=0)
        paths["state"].unlink(missing_ok=True)
        paths["record"].write_text(json.dumps(record.to_dict()))
        opts = record.config
        listener = self._listener(record, lease, previous)
        host, port = listener.getsockname()[:2]
        public_host = socket.getfqdn() if host in ("0.0.0.0", "::") else host
        url_host = f"[{public_host}]" if ":" in public_host else public_host
        cmd = [
            sys.executable, "-m", mlflow_server.SERVER_MODULE,
            "--service-uuid", record.uuid, "--model-uri", record.model_uri, "--model-name", record.model_name,
            "--listen-fd", "{fd2}", "--runtime-dir", str(config.runtime_dir()),
            "--workers", str(opts.get("workers", self.settings.workers)),
            "--start-timeout", str(int(timeout)),
            "--fast-path", "on" if opts.get("fast_path", True) else "off",
        ]  # fmt: skip
        env = {**os.environ, **self.settings.server_env()}
        if "timeout" in opts:
            env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(opts["timeout"])
        # The server never imports Airflow: none of Airflow's settings, connections (with their
        # passwords) or task context may leak into a long-lived process.
        for key in [k for k in env if k.startswith(("AIRFLOW", "_AIRFLOW"))]:
            env.pop(key)
        try:
            with paths["log"].open("ab") as logfile:
                pid, handle = self._spawn(cmd, env, listener, logfile)
        finally:
            listener.close()
        self.registry.update_service(record.uuid, pid=pid)
        launch = Launch(
            pid=pid, handle=handle, address={"host": host, "port": port},
            prediction_url=f"http://{url_host}:{port}/invocations", health_url=f"http://{url_host}:{port}/health",
        )  # fmt: skip
        state = self._wait_ready(record, pid, handle, paths, timeout)
        launch.served_uri = state.get("served_uri")
        launch.model_version = state.get("model_version")
        launch.model_run_id = state.get("model_run_id")
        self._check_staging(record, paths["staging"], opts.get("smoke_input") or state.get("input_example"))
        return launch

    @staticmethod
    def _warm_host_idle_timeout() -> float:
        """Seconds a warm serving host lives without requests; 0 disables it (every server is exec'd)."""
        value = config.get_option("warm_host_idle_timeout", "600")
        try:
            return max(0.0, float(value))
        except ValueError:
            raise InvalidParameterError("warm_host_idle_timeout", value, "must be a number of seconds") from None

    def _spawn(
        self, cmd: list[str], env: dict[str, str], listener: socket.socket, logfile: Any
    ) -> tuple[int, subprocess.Popen | None]:
        """Start the server: forked from the warm serving host when one runs (its libraries are
        already imported), else as a new interpreter, starting a warm host for the next deploy."""
        idle = self._warm_host_idle_timeout()
        run = config.runtime_dir()
        if idle > 0:
            try:
                fds = [logfile.fileno(), logfile.fileno(), listener.fileno()]
                return warm_host.spawn(run, cmd, env, str(config.state_dir()), fds), None
            except warm_host.HostUnavailable as exc:
                log.debug("No warm serving host (%s): starting the server directly", exc)
                # The host is shared by every connection: it never gets one's credentials or settings.
                own = set(self.settings.server_env()) | {"MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"}
                host_env = {k: v for k, v in env.items() if k not in own and not k.startswith("MLFLOW_TRACKING_")}
                with contextlib.suppress(OSError):
                    warm_host.start(run, warm_host.socket_path(run).with_suffix(".log"), host_env, idle)
        cmd = [str(listener.fileno()) if arg == "{fd2}" else arg for arg in cmd]
        proc = subprocess.Popen(
            cmd, pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL, stdout=logfile,
            stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=str(config.state_dir()),
        )  # fmt: skip
        return proc.pid, proc

    def _wait_ready(
        self, record: ServiceRecord, pid: int, proc: subprocess.Popen | None, paths: dict[str, Path], timeout: float
    ) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            state = mlflow_server.read_state(paths["state"])
            if state and state.get("pid") == pid:
                if state["phase"] == "ready":
                    return state
                if state["phase"] == "failed":
                    if proc is not None:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(10)
                    raise DeploymentFailedError(state.get("error") or "the model server failed to start")
            exited = self._exit_code(pid, proc)
            if exited is not None:
                last = " | ".join(_tail(paths["log"], 3))
                raise DeploymentFailedError(
                    f"model_uri={record.model_uri!r}: the model server {exited} before it was ready: {last}"
                )
            if time.monotonic() > deadline:
                raise DeploymentFailedError(
                    f"timeout={timeout!r}: the model server did not load {record.model_uri} in time"
                )
            time.sleep(0.02)

    @staticmethod
    def _exit_code(pid: int, proc: subprocess.Popen | None) -> str | None:
        """How the server exited (None: it runs). A server forked by the warm host is not our child."""
        if proc is not None:
            code = proc.poll()
            return None if code is None else f"exited with code {code}"
        import psutil

        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return None
        except psutil.NoSuchProcess:
            pass
        return "exited"

    @staticmethod
    def _check_staging(record: ServiceRecord, staging: Path, smoke_input: Any) -> None:
        import httpx

        with httpx.Client(transport=httpx.HTTPTransport(uds=str(staging)), base_url="http://staging", timeout=60) as c:
            try:
                health = c.get("/health")
                if health.status_code != 200:
                    raise DeploymentFailedError(
                        f"model_uri={record.model_uri!r}: /health answered {health.status_code}"
                    )
                if smoke_input is None:
                    return
                body = smoke_input if isinstance(smoke_input, str) else json.dumps(smoke_input)
                answer = c.post("/invocations", content=body, headers={"content-type": "application/json"})
            except httpx.HTTPError as exc:
                raise DeploymentFailedError(f"model_uri={record.model_uri!r}: health check failed ({exc})") from None
        if answer.status_code != 200:
            raise DeploymentFailedError(
                f"model_uri={record.model_uri!r}: the smoke prediction failed with HTTP {answer.status_code}: "
                f"{answer.text[:300]}"
            )

    def _promote(self, record: ServiceRecord, launch: Launch, previous: ServiceRecord | None, timeout: float) -> None:
        paths = self._paths(record.uuid)
        try:
            answer = mlflow_server.control_request(paths["ctl"], "activate", timeout=30)
        except mlflow_server.ControlError as exc:
            raise DeploymentFailedError(
                f"uuid={record.uuid!r}: the new server could not be activated ({exc})"
            ) from None
        if not answer.get("ok"):
            raise DeploymentFailedError(f"uuid={record.uuid!r}: {answer.get('error')}")
        if previous is not None and previous.uuid != record.uuid:
            self._stop(previous, timeout=min(timeout, 60), force=False)

    def _discard(self, record: ServiceRecord, launch: Launch | None) -> None:
        pid = launch.pid if launch else None
        self._terminate(record, pid, grace=2)
        if launch is not None and isinstance(launch.handle, subprocess.Popen):
            with contextlib.suppress(subprocess.TimeoutExpired):
                launch.handle.wait(5)
        self._remove_runtime_files(record.uuid)

    def _stop(self, record: ServiceRecord, timeout: float, force: bool) -> None:
        proc = self._server_process(record)
        if proc is not None and not force:
            with contextlib.suppress(mlflow_server.ControlError):
                mlflow_server.control_request(
                    self._paths(record.uuid)["ctl"], "drain", timeout=timeout + 5, drain_timeout=timeout
                )
            _wait_exited([proc], timeout=10)
        self._terminate(record, record.pid, grace=0 if force else 5)
        self._remove_runtime_files(record.uuid)

    def _forget(self, record: ServiceRecord) -> None:
        paths = self._paths(record.uuid)
        for name in ("state", "log", "record"):
            paths[name].unlink(missing_ok=True)

    def _remove_runtime_files(self, service_uuid: str) -> None:
        for name in ("ctl", "staging"):
            self._paths(service_uuid)[name].unlink(missing_ok=True)

    def _probe(self, record: ServiceRecord) -> tuple[ServiceState, str | None] | None:
        if record.state != ServiceState.ACTIVE or (record.host and record.host != HOSTNAME):
            return None
        if self._server_process(record) is not None:
            return None
        paths = self._paths(record.uuid)
        state = mlflow_server.read_state(paths["state"]) or {}
        if state.get("pid") == record.pid and state.get("phase") == "failed":
            reason = state.get("error")
        else:
            reason = f"the model server process {record.pid} is gone (killed or crashed)"
        last = " | ".join(line.strip() for line in _tail(paths["log"], 2))
        return ServiceState.ERROR, f"{reason}; last log lines: {last}" if last else reason

    def _discover(self) -> list[ServiceRecord]:
        """The model servers running on this host for this installation (same state directory)."""
        import psutil

        here = str(config.state_dir().resolve())
        masters: dict[str, Any] = {}
        for proc in psutil.process_iter(["cmdline", "cwd", "ppid"]):
            cmdline = proc.info.get("cmdline") or []
            if mlflow_server.SERVER_MODULE not in cmdline or "--service-uuid" not in cmdline:
                continue
            if proc.info.get("cwd") != here:
                continue
            uuid = cmdline[cmdline.index("--service-uuid") + 1]
            try:
                parent = psutil.Process(proc.info["ppid"]).cmdline()
            except (psutil.Error, TypeError):
                parent = []
            if uuid in parent:
                continue  # a forked worker: its master stands for the service
            masters[uuid] = (proc, cmdline)
        found = []
        for uuid, (proc, cmdline) in masters.items():
            paths = self._paths(uuid)
            try:
                data = json.loads(paths["record"].read_text())
            except (FileNotFoundError, ValueError):
                arg = dict(itertools.pairwise(cmdline))
                data = {"uuid": uuid, "backend": self.backend, "endpoint": arg.get("--model-name"),
                        "model_name": arg.get("--model-name"), "model_uri": arg.get("--model-uri")}  # fmt: skip
            if not data.get("endpoint") or not data.get("model_uri"):
                continue
            record = ServiceRecord(**{k: v for k, v in data.items() if k in _ADOPTABLE_FIELDS})
            record.pid, record.host = proc.pid, HOSTNAME
            state = mlflow_server.read_state(paths["state"]) or {}
            if state.get("pid") == proc.pid:
                record.served_uri = state.get("served_uri") or record.served_uri
                record.model_version = state.get("model_version") or record.model_version
                record.model_run_id = state.get("model_run_id") or record.model_run_id
            host = next(
                (c.laddr.ip for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN), "127.0.0.1"
            )
            port = state.get("port")
            if state.get("active") and port:
                url_host = f"[{host}]" if ":" in host else host
                record.state = ServiceState.ACTIVE
                record.prediction_url = f"http://{url_host}:{port}/invocations"
                record.health_url = f"http://{url_host}:{port}/health"
            else:
                record.state = ServiceState.PENDING  # never activated: a deployment that died midway
            found.append(record)
        return found

    def _adopt_conflict(self, found: ServiceRecord, current: ServiceRecord | None) -> None:
        self._terminate(found, found.pid, grace=2)
        self._forget(found)

    def _log_lines(self, record: ServiceRecord, tail: int | None, follow: bool) -> Iterator[str]:
        path = self._paths(record.uuid)["log"]
        if not follow:
            if tail is not None:
                yield from _tail(path, tail)
                return
            if path.exists():
                with path.open(errors="replace") as fh:
                    yield from (line.rstrip("\n") for line in fh)
            return
        lines: deque[str] = deque(_tail(path, tail if tail is not None else 10))
        yield from lines
        with contextlib.suppress(FileNotFoundError), path.open(errors="replace") as fh:
            fh.seek(0, os.SEEK_END)
            while True:
                line = fh.readline()
                if line:
                    yield line.rstrip("\n")
                    continue
                if self._server_process(self.registry.get_service(record.uuid)) is None:
                    return
                time.sleep(0.25)
