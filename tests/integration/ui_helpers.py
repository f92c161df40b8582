"""A real ``airflow api-server`` with SimpleAuthManager (admin + viewer) for the Served Models view.

Used by tests/integration/test_ui*.py and by bench/ui_latency.py. The server runs in its own AIRFLOW_HOME with
the provider installed, so it loads the provider's plugin exactly as ``airflow standalone`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
from conftest import airflow_env, migrated_airflow_db
from local_http import HTTP

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "/served-models"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ApiServer:
    home: Path
    port: int
    proc: subprocess.Popen[bytes]
    passwords: dict[str, str]
    env: dict[str, str]
    log_path: Path
    _tokens: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, user: str) -> str:
        if user not in self._tokens:
            resp = HTTP.post(
                f"{self.url}/auth/token", json={"username": user, "password": self.passwords[user]}, timeout=30
            )
            assert resp.status_code in (200, 201), resp.text
            self._tokens[user] = resp.json()["access_token"]
        return self._tokens[user]

    def client(self, user: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token(user)}"} if user else {}
        return httpx.Client(base_url=f"{self.url}{PREFIX}", headers=headers, timeout=600)

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""


SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
USERS = {"admin": "admin", "viewer": "viewer"}


def server_env(home: Path, users: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    extra.setdefault("AIRFLOW__CORE__AUTH_MANAGER", SIMPLE_AUTH_MANAGER)
    return airflow_env(
        home,
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS=",".join(f"{u}:{r}" for u, r in (users or USERS).items()),
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="False",
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(32),
        AIRFLOW__API__SECRET_KEY=secrets.token_hex(16),
        **extra,
    )


@contextlib.contextmanager
def ui_environment(home: Path, registry_url: str, **extra: str) -> Iterator[None]:
    """This process's environment for a module of UI tests (its deploys and registry reads): its
    AIRFLOW_HOME and registry, the repository's DAGs and no examples, and ``extra``; restored on exit."""
    saved = dict(os.environ)
    os.environ.update(
        AIRFLOW_HOME=str(home), AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN=registry_url,
        AIRFLOW__CORE__LOAD_EXAMPLES="False", AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"), **extra,
    )  # fmt: skip
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def running_api_server(
    home: Path,
    startup_timeout: float = 180,
    users: dict[str, str] | None = None,
    migrated: Callable[[Path], None] | None = None,
    template: Path | None = None,
    **extra_env: str,
) -> Iterator[ApiServer]:
    """``airflow db migrate`` then ``airflow api-server`` on a free port; stopped (by pid) on exit.

    ``users``: SimpleAuthManager's users and roles (default admin, viewer); ``migrated``: called with
    AIRFLOW_HOME once the metadata DB exists, before the server starts; ``template``: a metadata DB
    already migrated (conftest's ``airflow_db_template``), copied instead of migrating; ``extra_env``:
    more settings.
    """
    home.mkdir(parents=True, exist_ok=True)
    # Our own passwords file: SimpleAuthManager keeps the passwords it finds and generates the rest.
    passwords = {user: secrets.token_urlsafe(12) for user in users or USERS}
    (home / "simple_auth_manager_passwords.json.generated").write_text(json.dumps(passwords))
    env = server_env(home, users, **extra_env)
    airflow = str(Path(sys.executable).parent / "airflow")
    if template is not None:
        migrated_airflow_db(template, home)
    else:
        migrate = subprocess.run(
            [airflow, "db", "migrate"], env=env, cwd=home, capture_output=True, text=True, timeout=600, check=False
        )
        assert migrate.returncode == 0, migrate.stderr[-3000:]
    if migrated is not None:
        migrated(home)
    port = free_port()
    log_path = home / "api-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [airflow, "api-server", "--port", str(port), "--host", "127.0.0.1", "--workers", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, cwd=home,
        )  # fmt: skip
    server = ApiServer(home, port, proc, passwords, env, log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            assert proc.poll() is None, f"api-server exited: {server.log_tail()}"
            with contextlib.suppress(httpx.HTTPError):
                if HTTP.get(f"{server.url}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"api-server not up after {startup_timeout}s: {server.log_tail()}"
            time.sleep(0.5)
        yield server
    finally:
        stop_process_tree(proc.pid)


def stop_process_tree(pid: int, timeout: float = 20) -> None:
    """SIGTERM a process and its children (uvicorn workers), SIGKILL what is left after ``timeout``."""
    stop_process_trees([pid], timeout)


def stop_process_trees(pids: list[int], timeout: float = 20) -> None:
    """``stop_process_tree`` for several processes at once: all are told to stop, then waited for
    together (components that each take seconds to shut down gracefully do so side by side)."""
    procs: list[psutil.Process] = []
    for pid in pids:
        try:
            parent = psutil.Process(pid)
            procs += [*parent.children(recursive=True), parent]
        except psutil.NoSuchProcess:
            continue
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def seed_rows(registry: Any, count: int, *, prefix: str = "bulk", backend: str = "mlflow") -> list[str]:
    """Registry rows without servers (inactive), for paging and latency: inserted in one transaction."""
    from sqlalchemy import insert

    from airflow_provider_modeldeploy.registry.models import services

    now = datetime.now(UTC)
    rows = []
    for i in range(count):
        rows.append(
            dict(
                uuid=str(uuidlib.uuid4()), backend=backend, endpoint=f"{prefix}-{i:05d}", model_name=f"{prefix}-model-{i % 50}",
                model_uri=f"models:/{prefix}-model-{i % 50}/{1 + i % 7}", model_version=str(1 + i % 7),
                dag_id=f"{prefix}_dag_{i % 20}", run_id=f"scheduled__{i:05d}", task_id="deploy", map_index=-1,
                config={}, state="inactive", created_at=now - timedelta(seconds=i), updated_at=now - timedelta(seconds=i),
            )
        )  # fmt: skip
    with registry.session() as s:
        s.execute(insert(services), rows)
    return [r["uuid"] for r in rows]
