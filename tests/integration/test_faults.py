"""The fault suite: killed servers, killed deployments, a lost registry, a reboot, a failing replace
under load and bad prediction payloads. Real model-server processes, real signals, the real CLI.

(Four concurrent deployments of one endpoint on SQLite and PostgreSQL are in test_registry.py; an
unreachable registry is in test_errors.py.)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from conftest import agent_servers, agent_services, iris_payload, run_airflow, use_airflow_home, wait_for
from local_http import HTTP

from airflow_provider_modeldeploy.deployers import ServiceConfig, get_model_deployer
from airflow_provider_modeldeploy.exceptions import DeploymentFailedError
from airflow_provider_modeldeploy.hooks.serving_agent import local_agent
from airflow_provider_modeldeploy.registry import get_registry
from airflow_provider_modeldeploy.services import Lineage, ServiceState
from airflow_provider_modeldeploy.serving.agent_api import socket_path


def cli_json(home: Path, *args: str) -> Any:
    done = run_airflow(home, "served-models", *args, "--output", "json")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("[") :])


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a server's master and its workers, as a crash or a reboot would."""
    master = psutil.Process(pid)
    family = [master, *master.children(recursive=True)]
    for proc in family:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=10)
    return [p.pid for p in family]


def gone(pid: int, timeout: float = 10) -> bool:
    """The process exited (a zombie has: an orphan's is reaped by init when init gets to it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def free_port() -> int:
    """A port of the kernel's ephemeral range, for a service that must get its port back after a
    kill: the default range's first ports are what every other deployment on this machine tries."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def predict(url: str, **kwargs: Any) -> httpx.Response:
    return HTTP.post(url, json=iris_payload(), timeout=30, **kwargs)


def test_killed_server_is_restarted_at_the_same_url_and_stays_active(
    deployer: Any, airflow_home: Path, mlflow_models: dict[str, Any]
) -> None:
    """SIGKILL a server's master and workers: its host's agent starts it again on the same socket
    (same URL), the service stays active, and the endpoint's history says what happened."""
    service = deployer.deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-kill"))
    url = service.prediction_url
    killed = kill_tree(service.record.pid)
    wait_for(lambda: get_registry().list_events("mlflow", "iris-kill", 1)[0]["action"] == "restart", 60, "a restart")
    [event] = get_registry().list_events("mlflow", "iris-kill", 1)
    assert event["outcome"] == "success" and f"process {service.record.pid} exited" in event["message"]
    assert event["actor"].startswith("serving agent ")
    [row] = cli_json(airflow_home, "list", "--model", "iris-kill")
    assert row["state"] == "active" and row["prediction_url"] == url and row["uuid"] == service.uuid
    assert get_registry().get_service(service.uuid).pid not in killed
    assert predict(url).status_code == 200


def test_killed_worker_under_load_is_replaced_and_the_service_stays_active(
    deployer: Any, mlflow_models: dict[str, Any]
) -> None:
    """SIGKILL one of two workers while 16 keep-alive clients post: its master forks a new one from
    the loaded model; only requests on the killed worker's connections may fail, none is refused."""
    service = deployer.deploy_model(
        ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-worker", workers=2)
    )
    master = psutil.Process(service.record.pid)
    workers = master.children()
    assert len(workers) == 2
    with Load(service.prediction_url, clients=16) as load:
        wait_for(lambda: sum(load.outcomes.values()) > 200, 60, "load to start")
        workers[0].send_signal(signal.SIGKILL)
        wait_for(lambda: len(master.children()) == 2 and workers[0].pid not in {c.pid for c in master.children()},
                 30, "a new worker")  # fmt: skip
        settled = sum(load.outcomes.values())
        wait_for(lambda: sum(load.outcomes.values()) > settled + 200, 60, "load after the worker was replaced")
    failed = {k: v for k, v in load.outcomes.items() if k != "200"}
    # Connections the killed worker held (at most one per client) may fail once; nothing is refused.
    assert "ConnectionRefusedError" not in failed and sum(failed.values()) <= 16, (load.outcomes, load.errors[:5])
    refreshed = deployer.get_model_server(service.uuid)
    assert refreshed.is_running and refreshed.record.pid == master.pid
    assert predict(service.prediction_url).status_code == 200


# -- a deploying task killed in the middle ---------------------------------------------------------

DEPLOY_SCRIPT = """
import sys
from airflow_provider_modeldeploy.deployers import ServiceConfig, find_services, get_model_deployer
from airflow_provider_modeldeploy.services import Lineage
lineage = Lineage(dag_id="ct", run_id="scheduled__1", task_id="deploy", try_number=1)
get_model_deployer().deploy_model(ServiceConfig(model_uri=sys.argv[1], model_name=sys.argv[2]), lineage=lineage)
"""


def start_deploy(model_uri: str, name: str, home: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.Popen(
        [sys.executable, "-c", DEPLOY_SCRIPT, model_uri, name],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def test_deploying_task_killed_midway_leaves_nothing_unaccounted(
    airflow_home: Path, mlflow_models: dict[str, Any]
) -> None:
    """SIGKILL the deploying process once its server runs but before it takes traffic; `sync` then
    stops that server and removes the pending service; the next deploy works."""
    registry = get_registry()
    deploying = start_deploy(mlflow_models["iris_v1"], "iris-midway", airflow_home)
    try:
        wait_for(lambda: agent_services("iris-midway"), 120, "the new server on the agent")
        [pending] = registry.find_services(endpoint="iris-midway")
        assert pending.state == ServiceState.PENDING and pending.agent_url
    finally:
        deploying.send_signal(signal.SIGKILL)
        deploying.wait(10)
    wait_for(lambda: agent_services("iris-midway")[0]["phase"] == "ready", 120, "the orphan server")
    [served] = agent_services("iris-midway")  # now with its pid (the agent lists a service before it forks)
    assert psutil.pid_exists(served["pid"]), "the server outlives the task that started it"

    [report] = cli_json(airflow_home, "sync")
    assert report["removed"] == [pending.uuid] and report["adopted"] == []
    assert registry.find_services(endpoint="iris-midway") == []
    assert agent_services("iris-midway") == []
    assert gone(served["pid"])
    assert registry.list_events("mlflow", "iris-midway")[0]["action"] == "cleanup"

    service = get_model_deployer().deploy_model(
        ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-midway")
    )
    assert service.is_running and predict(service.prediction_url).status_code == 200


def test_sync_adopts_servers_of_a_lost_registry(airflow_home: Path, mlflow_models: dict[str, Any]) -> None:
    lineage = Lineage(dag_id="ct", run_id="scheduled__2", task_id="deploy", try_number=1)
    service = get_model_deployer().deploy_model(
        ServiceConfig(model_uri="models:/iris@champion", model_name="iris-lost"), lineage=lineage
    )
    db = Path(get_registry().url.removeprefix("sqlite:///"))
    get_registry().dispose()
    for path in db.parent.glob(db.name + "*"):  # the database and its WAL files
        path.unlink()

    assert cli_json(airflow_home, "list") == []
    [preview] = cli_json(airflow_home, "sync", "--dry-run")  # says what it would do, does nothing
    assert (preview["adopted"], preview["lost"], preview["removed"]) == ([service.uuid], [], [])
    assert str(preview["dry_run"]) == "True"  # Airflow's console renders scalars as text
    assert cli_json(airflow_home, "list") == []
    [report] = cli_json(airflow_home, "sync")
    assert report["adopted"] == [service.uuid] and report["lost"] == [] and report["removed"] == []
    assert str(report["dry_run"]) == "False"
    [row] = cli_json(airflow_home, "list")
    assert {k: row[k] for k in ("uuid", "state", "model_name", "model_version", "dag_id", "task_id")} == {
        "uuid": service.uuid, "state": "active", "model_name": "iris-lost", "model_version": "1",
        "dag_id": "ct", "task_id": "deploy",
    }  # fmt: skip
    assert row["prediction_url"] == service.prediction_url and row["run_id"] == "scheduled__2"
    # Adopted services are managed as before: a second sync changes nothing, stop works.
    [again] = cli_json(airflow_home, "sync")
    assert (again["adopted"], again["lost"], again["removed"]) == ([], [], [])
    get_model_deployer().stop_model_server(service.uuid)
    assert gone(service.record.pid)


def kill_agent_and_servers(services: list[Any]) -> None:
    """What a power cut does to a serving host: the agent, its fork server and every server die."""
    agent = psutil.Process(local_agent().health()["pid"])
    family = [agent, *agent.children()]
    for proc in family:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=10)
    for service in services:
        with contextlib.suppress(psutil.NoSuchProcess):
            kill_tree(service.record.pid)


def test_killed_agent_leaves_servers_serving_and_a_new_one_adopts_them(
    deployer: Any, mlflow_models: dict[str, Any]
) -> None:
    service = deployer.deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-orphan"))
    agent = psutil.Process(local_agent().health()["pid"])
    agent.send_signal(signal.SIGKILL)
    agent.wait(10)
    assert predict(service.prediction_url).status_code == 200  # no agent: the server serves on
    # The next use starts an agent, which takes the server back from its records: stop works.
    fresh = get_model_deployer()
    assert fresh.get_model_server(service.uuid).is_running
    assert local_agent().health()["pid"] != agent.pid
    fresh.stop_model_server(service.uuid)
    assert gone(service.record.pid)
    with pytest.raises(httpx.ConnectError):
        predict(service.prediction_url)


def test_an_agent_started_on_first_use_exits_when_idle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``[modeldeploy] agent_idle_timeout``: an agent of its own (runtime and state directories), serving
    nothing, exits once that long has passed since its last request, not before; its socket and its
    fork server go with it."""
    run_dir = Path(tempfile.mkdtemp(prefix="md-idle-"))  # short: unix socket paths are limited
    monkeypatch.setenv("AIRFLOW__MODELDEPLOY__RUNTIME_DIR", str(run_dir))
    monkeypatch.setenv("AIRFLOW__MODELDEPLOY__AGENT_STATE_DIR", str(tmp_path / "agent"))
    monkeypatch.setenv("AIRFLOW__MODELDEPLOY__AGENT_IDLE_TIMEOUT", "1")
    family: list[psutil.Process] = []
    try:
        client = local_agent()  # starts it
        agent = psutil.Process(client.health()["pid"])
        family = [agent, *agent.children()]  # and its fork server
        asked = time.monotonic()
        client.health()  # a request: idle from now on
        assert gone(agent.pid, timeout=30), "the idle agent did not exit"
        assert time.monotonic() - asked >= 1, "the agent exited before its idle timeout"
        assert len(family) == 2 and all(gone(p.pid) for p in family) and not socket_path(run_dir).exists()
        assert "idle for 1s with no model server; exiting" in (tmp_path / "agent" / "agent.log").read_text()
    finally:
        for proc in family:  # should it not have exited (psutil never signals a pid reused since)
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(run_dir, ignore_errors=True)


def take_pid(pid: int) -> subprocess.Popen[bytes] | None:
    """An unrelated program (``sleep``) started as process ``pid``, which is free: a pid the kernel gave
    to someone else, as it does once pids wrap. Through ``/proc/sys/kernel/ns_last_pid`` (root); None
    where that is not allowed, or when another process of the machine took the pid first."""
    for _ in range(50):
        if psutil.pid_exists(pid):
            return None
        try:
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        except OSError:
            return None
        proc = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL, start_new_session=True)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


@pytest.mark.long
def test_reboot_like_restart(airflow_home: Path, mlflow_models: dict[str, Any]) -> None:
    """Every process of the serving host gone. With the agent's records kept, the next agent starts
    each server again at its URL; with them lost too, sync marks the services inactive and start
    restores each at its recorded URL. Meanwhile an unrelated program got a dead server's pid (pids are
    reused): the agents tell it from the server by its start time and never signal it, not when they
    restart the service, nor when they stop and delete it."""
    deployer = get_model_deployer()
    services = [
        deployer.deploy_model(ServiceConfig(model_uri=mlflow_models[uri], model_name=name, port=free_port()))
        for uri, name in (("iris_v1", "iris-reboot-a"), ("iris_v2", "iris-reboot-b"))
    ]
    kill_agent_and_servers(services)
    old_pid = services[0].record.pid
    wait_for(lambda: not psutil.pid_exists(old_pid), 30, f"pid {old_pid} to be free (its zombie reaped)")
    squatter = take_pid(old_pid)
    try:
        restart_then_lose_the_records(airflow_home, deployer, services)
        [restart] = [e for e in get_registry().list_events("mlflow", "iris-reboot-a") if e["action"] == "restart"]
        assert restart["message"].startswith(f"the model server process {old_pid} exited; restarted as pid ")
        for service in services:  # an agent's stop, as delete does it, does not reach the squatter either
            deployer.delete_model_server(service.uuid)
        if squatter is None:
            pytest.skip(f"pid {old_pid} could not be given to another process here (ns_last_pid needs root)")
        assert squatter.poll() is None, f"the process given pid {old_pid} was signalled ({squatter.returncode})"
        assert psutil.Process(old_pid).cmdline() == ["sleep", "600"]
    finally:
        if squatter is not None:
            squatter.kill()
            squatter.wait(10)


def restart_then_lose_the_records(airflow_home: Path, deployer: Any, services: list[Any]) -> None:
    """The reboot: the next agent restarts the servers from its records; then all dies again with the
    records, and sync and start take over."""
    [report] = cli_json(airflow_home, "sync")  # starts an agent, which restores what it supervised
    assert report["lost"] == [] and report["adopted"] == []
    for service in services:
        wait_for(lambda s=service: deployer.get_model_server(s.uuid).record.pid != s.record.pid, 60, "a restart")
        answer = predict(service.prediction_url)
        assert answer.status_code == 200 and answer.headers["x-model-version"] == service.record.model_version
        assert deployer.get_model_server(service.uuid).record.pid in agent_servers()  # the registry names it

    services = [deployer.get_model_server(s.uuid) for s in services]
    kill_agent_and_servers(services)
    shutil.rmtree(Path(os.environ["AIRFLOW__MODELDEPLOY__AGENT_STATE_DIR"]) / "services")
    [preview] = cli_json(airflow_home, "sync", "--dry-run")
    assert sorted(preview["lost"]) == sorted(s.uuid for s in services)
    assert {get_registry().get_service(uuid).state for uuid in preview["lost"]} == {ServiceState.ACTIVE}
    [report] = cli_json(airflow_home, "sync")
    assert sorted(report["lost"]) == sorted(s.uuid for s in services) and report["adopted"] == []
    rows = {r["uuid"]: r for r in cli_json(airflow_home, "list")}
    for service in services:
        assert rows[service.uuid]["state"] == "inactive"
        assert "not running in the mlflow backend any more" in rows[service.uuid]["last_error"]
    for service in services:
        [started] = cli_json(airflow_home, "start", service.uuid)
        assert started["prediction_url"] == service.prediction_url
        answer = predict(service.prediction_url)
        assert answer.status_code == 200 and answer.headers["x-model-version"] == service.record.model_version


# -- a replace that fails, under load --------------------------------------------------------------


class Load:
    """Keep-alive clients posting predictions in threads, counting every outcome.

    Each client keeps one ``http.client`` connection and reuses it until the server says
    ``Connection: close``, without checking it first (as httpx and urllib3 do): a server that closes
    a connection it promised to keep open fails the next request here, as it would for many clients.
    """

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self._where = urlsplit(url)
        self._body = json.dumps(iris_payload()).encode()
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        headers = {"Content-Type": "application/json"}
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self._where.hostname, self._where.port, timeout=30)
                conn.request("POST", self._where.path, body=self._body, headers=headers)
                answer = conn.getresponse()
                text = answer.read()
                outcome = str(answer.status)
                if answer.status != 200:
                    self.errors.append(f"{answer.status}: {text[:200]!r}")
                if answer.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                    conn = None
            with self._lock:
                self.outcomes[outcome] += 1
        if conn is not None:
            conn.close()

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


@pytest.mark.long
@pytest.mark.parametrize(("fast_path", "replaces"), [(False, 20), (True, 10)], ids=["mlflow-app", "fast-path"])
def test_replaces_under_load_lose_no_request(
    deployer: Any, mlflow_models: dict[str, Any], fast_path: bool, replaces: int
) -> None:
    """Twenty replaces (ten on the fast path) while 16 keep-alive clients post: not one failed or
    refused request.

    Through MLflow's app (its middleware sends the body in a task of its own), a worker used to be
    told to shut down between a response's headers and its body, and closed a connection whose
    headers had promised keep-alive: the client's next request got a reset, a few per 20 replaces.
    The fast path answers without that middleware; its replaces drain the same way.
    """
    name = f"iris-replaces-{'fast' if fast_path else 'app'}"

    def config(version: int) -> ServiceConfig:
        return ServiceConfig(model_uri=mlflow_models[f"iris_v{version}"], model_name=name, fast_path=fast_path)

    served = deployer.deploy_model(config(1))
    with Load(served.prediction_url, clients=16) as load:
        wait_for(lambda: sum(load.outcomes.values()) > 100, 60, "load to start")
        for i in range(replaces):
            replaced = deployer.deploy_model(config(2 - i % 2), replace=True)
            assert replaced.prediction_url == served.prediction_url
        settled = sum(load.outcomes.values())
        wait_for(lambda: sum(load.outcomes.values()) > settled + 100, 60, "load after the replaces")
    assert set(load.outcomes) == {"200"}, (load.outcomes, load.errors[:5])
    assert len(deployer.find_model_server(model_name=name, running=True)) == 1
    assert [e["action"] for e in deployer.get_history(name)].count("replace") == replaces


def test_failed_replace_under_load_keeps_the_old_server_serving(deployer: Any, mlflow_models: dict[str, Any]) -> None:
    served = deployer.deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-load"))
    with Load(served.prediction_url, clients=16) as load:
        wait_for(lambda: sum(load.outcomes.values()) > 50, 60, "load to start")
        with pytest.raises(DeploymentFailedError, match="model weights are corrupted"):
            deployer.deploy_model(ServiceConfig(model_uri="models:/broken/1", model_name="iris-load"))
        settled = sum(load.outcomes.values())
        wait_for(lambda: sum(load.outcomes.values()) > settled + 50, 60, "load after the failed replace")
    assert set(load.outcomes) == {"200"}, (load.outcomes, load.errors[:5])
    [still] = deployer.find_model_server(model_name="iris-load")
    assert still.uuid == served.uuid and still.is_running
    event = deployer.get_history("iris-load")[0]
    assert (event["action"], event["outcome"]) == ("rollback", "failed")
    assert "corrupted" in event["message"] and served.uuid in event["message"]


# -- bad prediction payloads -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def payload_server(tmp_path_factory: pytest.TempPathFactory, mlflow_models: dict[str, Any]) -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as mp:
        use_airflow_home(tmp_path_factory.mktemp("payloads") / "airflow", mp)
        deployer = get_model_deployer()
        service = deployer.deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-payload"))
        try:
            yield service
        finally:
            deployer.delete_model_server(service.uuid, force=True)


TEN_MB = 10 * 1024 * 1024
BAD_PAYLOADS: dict[str, tuple[bytes, str]] = {
    "wrong columns": (
        json.dumps({"dataframe_split": {"columns": ["a", "b", "c", "d"], "data": [[1, 2, 3, 4]]}}).encode(),
        "application/json",
    ),
    "wrong types": (
        json.dumps(
            {
                "dataframe_split": {
                    "columns": iris_payload()["dataframe_split"]["columns"],
                    "data": [["x", "y", "z", "w"]],
                }
            }
        ).encode(),
        "application/json",
    ),
    "not json": (b"{this is not json", "application/json"),
    "unknown format": (json.dumps({"rows": [[1, 2, 3, 4]]}).encode(), "application/json"),
    "unsupported content type": (b"<xml/>", "application/xml"),
    "no content type": (json.dumps(iris_payload()).encode(), ""),
    "10 MB number": (b"[" + b"9" * TEN_MB + b"]", "application/json"),
    "10 MB of junk": (b"{" + b"x" * TEN_MB, "application/json"),
    "nested too deep": (b"[" * 100_000 + b"]" * 100_000, "application/json"),
    "10 MB of wrong columns": (
        json.dumps({"dataframe_split": {"columns": ["a"], "data": [[1.5]] * (TEN_MB // 7)}}).encode(),
        "application/json",
    ),
}


@pytest.mark.parametrize("name", list(BAD_PAYLOADS))
def test_bad_payload_gets_a_4xx_with_mlflows_error_body(payload_server: Any, name: str) -> None:
    body, content_type = BAD_PAYLOADS[name]
    url = payload_server.prediction_url
    headers = {"content-type": content_type} if content_type else {}
    answer = HTTP.post(url, content=body, headers=headers, timeout=120)
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:500])
    assert len(answer.content) < 16 * 1024, "the error echoes the whole request"
    if answer.status_code == 415:  # MLflow's own answer to a content type it does not read
        assert answer.text.startswith("This predictor only supports the following content types"), answer.text
    else:
        error = answer.json()
        assert error["error_code"] in {"BAD_REQUEST", "INVALID_PARAMETER_VALUE"} and error["message"], error
        assert "Traceback" not in error["message"]
    # The server is alive and still answers good requests, on a new connection and on its pid.
    assert predict(url).status_code == 200
    assert psutil.Process(payload_server.record.pid).status() != psutil.STATUS_ZOMBIE


def _raw_post(url: str, head: bytes, body_chunks: Iterator[bytes], timeout: float = 60) -> bytes:
    """POST over a raw socket, sending ``body_chunks`` until the server answers or closes; its answer."""
    import select
    import socket

    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in body_chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered before the body was sent: stop sending
            try:
                sock.sendall(chunk)
            except OSError:
                break
        answer = b""
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                answer += data
    return answer


def test_a_declared_body_over_the_limit_is_refused_unread(payload_server: Any) -> None:
    url = payload_server.prediction_url
    where = urlsplit(url)
    head = (
        f"POST {where.path} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {8 * 1024**3}\r\n\r\n"
    ).encode()
    started = time.monotonic()
    answer = _raw_post(url, head, iter([b"{" * 1024]))  # 1 KiB of the 8 GiB it announces
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"over this server's limit" in answer and time.monotonic() - started < 30
    assert predict(url).status_code == 200


def test_a_streamed_gigabyte_is_refused_with_bounded_memory(payload_server: Any) -> None:
    url = payload_server.prediction_url
    where = urlsplit(url)
    workers = psutil.Process(payload_server.record.pid).children()
    before = max(w.memory_info().rss for w in workers)
    head = (
        f"POST {where.path} HTTP/1.1\r\nHost: {where.netloc}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    mib = b"7" * 2**20
    chunks = (f"{len(mib):x}\r\n".encode() + mib + b"\r\n" for _ in range(1024))  # 1 GiB, never all sent
    answer = _raw_post(url, head, chunks)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    grown = max(w.memory_info().rss for w in workers) - before
    assert grown < 200 * 2**20, f"the worker grew by {grown >> 20} MiB for a refused body"
    assert predict(url).status_code == 200
