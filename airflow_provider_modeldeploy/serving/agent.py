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
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from airflow_provider_modeldeploy.serving import mlflow_server
from airflow_provider_modeldeploy.serving.metrics_store import DEFAULT_INTERVAL, Sampler
from airflow_provider_modeldeploy.serving.server_processes import (
    HOSTNAME,
    AgentError,
    Managed,
    ServerProcesses,
    _set_child_subreaper,
    _tail,
    _write_private,
)

__all__ = ["HOSTNAME", "Agent", "AgentError", "Managed", "_set_child_subreaper"]

log = logging.getLogger("modeldeploy.agent")

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
#: A server whose master died is restarted after 0.5, 2, 4... s; more restarts than this within the
#: window and the agent gives up (the service shows as failed, with the last reason).
MAX_RESTARTS = 5
RESTART_WINDOW = 600.0


def _check_uuid(uuid: Any) -> None:
    """Uuids name files in the agent's directories: only the canonical form is taken."""
    if not isinstance(uuid, str) or not UUID_RE.match(uuid):
        raise AgentError(f"uuid={uuid!r}: not a service uuid", 400, "uuid", uuid)


#: The model's input example kept with a service (for the Served Models page's request example) when
#: its JSON is at most this long; a larger one is left out, not cut.
MAX_KEPT_EXAMPLE = 16 * 1024


def _small_example(example: Any) -> str | None:
    return example if isinstance(example, str) and len(example) <= MAX_KEPT_EXAMPLE else None


def _limit_args(options: dict[str, Any]) -> list[str]:
    """The model server's arguments for the deployer's limits against abusive clients; an option not
    given is left out, so the server's own default (documented there) applies."""
    args = []
    for option, flag, scale in (
        ("max_header_kb", "--max-header-bytes", 1024), ("read_timeout", "--read-timeout", 1),
        ("keep_alive", "--keep-alive", 1), ("max_concurrent_requests", "--max-concurrent-requests", 1),
    ):  # fmt: skip
        if options.get(option):
            args += [flag, str(int(options[option]) * scale)]
    return args


class Agent(ServerProcesses):
    """The supervisor. Thread-safe: the API calls it from one thread per request."""

    def __init__(
        self, state_dir: Path, run_dir: Path, *, idle_timeout: float = 0, auto: bool = False,
        metrics_interval: float = DEFAULT_INTERVAL,
    ) -> None:  # fmt: skip
        super().__init__(state_dir, run_dir)
        self.idle_timeout, self.auto = idle_timeout, auto
        self.agent_id = self._agent_id()
        self.services: dict[str, Managed] = {}
        self.locks: dict[str, threading.RLock] = {}
        self.stopping = threading.Event()
        self.last_request = time.monotonic()
        self.advertise_url: str | None = None
        self.sampler = Sampler(self, metrics_interval)

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

    def service_lock(self, uuid: str) -> threading.RLock:
        with self.lock:
            return self.locks.setdefault(uuid, threading.RLock())

    def get(self, uuid: str) -> Managed:
        _check_uuid(uuid)
        with self.lock:
            m = self.services.get(uuid)
        if m is None:
            raise AgentError(f"uuid={uuid!r}: no model server of this service on host {HOSTNAME!r}", 404, "uuid", uuid)
        return m

    # -- the operations the API offers -----------------------------------------------------------

    def deploy(self, req: dict[str, Any]) -> dict[str, Any]:
        """Start a server for a service and check it on its staging socket; it takes no traffic yet."""
        uuid = req.get("uuid")
        _check_uuid(uuid)
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
                    "--metrics", "on" if options.get("metrics", True) else "off",
                    "--max-body-bytes", str(int(options.get("max_body_mb") or 32) * 1024 * 1024),
                    *_limit_args(options),
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
                m.info = {k: state.get(k) for k in ("served_uri", "model_version", "model_run_id", "input_columns")}
                m.info["input_example"] = _small_example(state.get("input_example"))
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
        if proc is not None and m.phase == "active":
            with contextlib.suppress(Exception):  # its last figures, before its files go with it
                self.sampler.sample(m)
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
        for name in ("ctl", "staging", "state"):
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
        _check_uuid(uuid)
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
                # Until the server is gone, not merely asked to stop: what it writes while it stops
                # (draining, stopped) is the end of the stream, never cut off.
                gone = m.phase in ("stopped", "failed") or (m.wanted == "stopped" and not self.alive(m))
                if gone or self.services.get(uuid) is not m:
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
