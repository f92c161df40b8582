"""Airflow's parts on different hosts, acting on one model server through its host's serving agent.

Four hosts made of Linux namespaces (``multihost.py``: own hostname, network and private /tmp each),
one registry on the machine's real PostgreSQL, reached by all of them:

- ``serving`` runs ``airflow served-models agent --listen`` (TCP, with a shared token);
- ``worker`` deploys with ``airflow tasks test`` (a real task of tests/integration/dags);
- ``api`` runs a real ``airflow api-server`` (SimpleAuthManager), the Served Models page's actions;
- ``cli`` runs ``airflow served-models ...`` and predicts.

Every scenario checks the registry *and* reality: does the URL answer, from another host?
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from cli_forker import BIN, Forker, NotStarted, forking_enabled
from conftest import PG_BASE, ROOT, iris_payload, migrated_airflow_db, wait_for
from local_http import HTTP
from multihost import Network, available

AGENT_PORT = 7400
API_PORT = 8080
TEST_DAGS = ROOT / "tests" / "integration" / "dags"
DAG, MODEL = "modeldeploy_health_sensor", "iris-sensor"
PREDICT = (
    "import httpx, json, sys; r = httpx.post(sys.argv[1], json=json.loads(sys.argv[2]), timeout=10); "
    "print(json.dumps({'status': r.status_code, 'version': r.headers.get('x-model-version')}))"
)

pytestmark = pytest.mark.skipif(available() is not None, reason=f"no namespaces here: {available()}")


@dataclass
class Cluster:
    net: Network
    base: Path
    registry_url: str  # as the hosts reach it
    local_registry_url: str  # as this test process reaches it
    token: str
    agent: Any = None  # the serving host's agent process
    #: per host, a fork server started in it (cli_forker.py): its one-shot commands fork from it
    forkers: dict[str, Forker] = field(default_factory=dict)

    def env(self, host: str, **extra: str) -> dict[str, str]:
        serving = self.net["serving"].address
        home = self.base / host
        conn = {
            "conn_type": "modeldeploy_mlflow",
            "host": serving,  # model servers bind the serving host's address, reachable by the others
            "extra": {"agent_url": f"http://{serving}:{AGENT_PORT}", "tracking_uri": os.environ["MLFLOW_TRACKING_URI"]},
        }
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(home),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(TEST_DAGS),
            "AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN": self.registry_url,
            "AIRFLOW__MODELDEPLOY__AGENT_TOKEN": self.token,
            "AIRFLOW_CONN_MODELDEPLOY_DEFAULT": json.dumps(conn),
            "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
            "PYTHONUNBUFFERED": "1",
        }
        for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "LANG"):
            if key in os.environ:
                env[key] = os.environ[key]
        env.update(extra)
        return env

    def airflow(self, host: str, *args: str, timeout: float = 300, **extra: str) -> Any:
        """``airflow *args`` on ``host``, forked from the host's own fork server (so in its namespaces)
        where it can serve, else exec'd there."""
        env = self.env(host, **extra)
        if host not in self.forkers and forking_enabled():

            def spawn(argv: list[str], env: dict[str, str], fd: int) -> Any:
                return self.net[host].popen(argv, env=env, cwd="/", pass_fds=(fd,))

            self.forkers[host] = Forker(self.env(host), spawn)
        forker = self.forkers.get(host)
        if forker is not None and forker.serves(env):
            with contextlib.suppress(NotStarted):
                return forker.run(list(args), env, timeout, BIN / "airflow", cwd=str(self.base))
        return self.net[host].run([str(BIN / "airflow"), *args], env=env, cwd=str(self.base), timeout=timeout)

    def predict(self, host: str, url: str) -> dict[str, Any]:
        done = self.net[host].run(
            [sys.executable, "-c", PREDICT, url, json.dumps(iris_payload())], env=self.env(host), timeout=60
        )
        if done.returncode != 0:
            return {"status": None, "error": done.stderr.strip().splitlines()[-1:]}
        return json.loads(done.stdout)

    def start_agent(self) -> None:
        log = open(self.base / "serving" / "agent.out", "ab")  # noqa: SIM115 - the agent's for its life
        self.agent = self.net["serving"].popen(
            [str(Path(sys.executable).parent / "airflow"), "served-models", "agent", "--listen", f"0.0.0.0:{AGENT_PORT}",
             "--advertise-url", f"http://{self.net['serving'].address}:{AGENT_PORT}"],
            env=self.env("serving"), cwd=str(self.base), stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        wait_for(lambda: self._agent_answers(), 120, "the serving agent", self.agent_log)

    def _agent_answers(self) -> bool:
        assert self.agent.poll() is None, self.agent_log()
        with contextlib.suppress(httpx.HTTPError):
            url = f"http://{self.net['serving'].address}:{AGENT_PORT}/v1/health"
            return HTTP.get(url, headers={"Authorization": f"Bearer {self.token}"}, timeout=2).status_code == 200
        return False

    def agent_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.base / "serving" / "agent.out").read_text(errors="replace")[-4000:]
        return ""

    def registry(self) -> Any:
        from airflow_provider_modeldeploy.registry.store import Registry

        return Registry(self.local_registry_url)


def ok(done: Any) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def cluster(mlflow_models: dict[str, Any]) -> Iterator[Cluster]:
    import sqlalchemy as sa

    schema = f"mh_{uuidlib.uuid4().hex[:10]}"
    engine = sa.create_engine(PG_BASE)
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    base = Path(os.environ["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).parent / "hosts"
    try:
        # The venv and the checkout stay visible to every host, even in a clone under /tmp.
        with Network(["serving", "worker", "api", "cli"], prefix="md", share=(sys.prefix, ROOT)) as net:
            gateway, port = net.forward(5432)
            options = f"?options=-csearch_path%3D{schema}"
            cluster = Cluster(
                net, base, f"postgresql+psycopg2://postgres@{gateway}:{port}/test{options}",
                f"{PG_BASE}{options}", secrets.token_urlsafe(24),
            )  # fmt: skip
            for host in ("serving", "worker", "api", "cli"):
                (base / host).mkdir(parents=True, mode=0o700)
            ok(cluster.airflow("worker", "served-models", "db-upgrade"))  # the deployment step, once
            cluster.start_agent()
            try:
                yield cluster
            finally:
                with contextlib.suppress(Exception):
                    cluster.registry().dispose()
                for forker in cluster.forkers.values():
                    forker.close()
                stop_served(cluster)
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


def stop_served(cluster: Cluster) -> None:
    """Every model server the agent runs, stopped by its pid (the agent leaves them running when it stops)."""
    pids = set()
    with contextlib.suppress(Exception):
        url = f"http://{cluster.net['serving'].address}:{AGENT_PORT}/v1/services"
        answer = HTTP.get(url, headers={"Authorization": f"Bearer {cluster.token}"}, timeout=5).json()
        pids = {s["pid"] for s in answer["services"] if s.get("pid")}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            for p in [*proc.children(recursive=True), proc]:
                p.kill()


@pytest.fixture(scope="module")
def api(cluster: Cluster, airflow_db_template: Path) -> Iterator[dict[str, Any]]:
    """A real api-server on the ``api`` host, with SimpleAuthManager's admin."""
    home = cluster.base / "api"
    password = secrets.token_urlsafe(12)
    (home / "simple_auth_manager_passwords.json.generated").write_text(json.dumps({"admin": password}))
    env = {
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
    }
    migrated_airflow_db(airflow_db_template, home)
    log = open(home / "api-server.out", "ab")  # noqa: SIM115
    proc = cluster.net["api"].popen(
        [str(Path(sys.executable).parent / "airflow"), "api-server", "--host", "0.0.0.0", "--port", str(API_PORT),
         "--workers", "1"],
        env=cluster.env("api", **env), cwd=str(home), stdout=log, stderr=log,
    )  # fmt: skip
    log.close()
    url = f"http://{cluster.net['api'].address}:{API_PORT}"

    def up() -> bool:
        assert proc.poll() is None, (home / "api-server.out").read_text()[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            return HTTP.get(f"{url}/api/v2/monitor/health", timeout=5).status_code == 200
        return False

    wait_for(up, 300, "the api-server", lambda: (home / "api-server.out").read_text()[-3000:])
    token = HTTP.post(f"{url}/auth/token", json={"username": "admin", "password": password}, timeout=30).json()
    client = httpx.Client(
        base_url=f"{url}/served-models/api", headers={"Authorization": f"Bearer {token['access_token']}"}, timeout=600
    )
    try:
        yield {"client": client, "proc": proc}
    finally:
        client.close()
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(Exception):
            proc.wait(20)


@pytest.fixture(scope="module")
def deployed(cluster: Cluster, airflow_db_template: Path) -> dict[str, Any]:
    """The test DAG's deploy task, run by ``airflow tasks test`` on the worker host."""
    migrated_airflow_db(airflow_db_template, cluster.base / "worker")
    ok(cluster.airflow("worker", "dags", "reserialize"))
    out = ok(cluster.airflow("worker", "tasks", "test", DAG, "deploy", timeout=600))
    assert "new_state=success" in out.replace(" ", ""), out[-3000:]
    [record] = cluster.registry().find_services(endpoint=MODEL)
    return {"uuid": record.uuid, "url": record.prediction_url}


def cli_json(cluster: Cluster, *args: str) -> Any:
    out = ok(cluster.airflow("cli", "served-models", *args, "--output", "json"))
    return json.loads(out[out.index("[") : out.rindex("]") + 1])


def test_deploy_from_worker_serves_on_serving_and_predicts_from_cli(cluster: Cluster, deployed: dict) -> None:
    record = cluster.registry().get_service(deployed["uuid"])
    serving = cluster.net["serving"]
    assert record.state == "active" and record.host == "serving"
    assert record.agent_url == f"http://{serving.address}:{AGENT_PORT}"
    assert record.prediction_url == f"http://{serving.address}:5200/invocations"
    assert record.pid in serving.pids(), "the model server runs on the serving host, not on the worker"
    assert cluster.predict("cli", record.prediction_url) == {"status": 200, "version": "1"}
    [row] = cli_json(cluster, "list", "--model", MODEL)
    assert row["state"] == "active" and row["prediction_url"] == record.prediction_url


def test_stop_and_start_from_the_cli_host(cluster: Cluster, deployed: dict) -> None:
    [stopped] = cli_json(cluster, "stop", deployed["uuid"])
    assert stopped["state"] == "inactive"
    assert cluster.predict("cli", deployed["url"])["status"] is None  # refused: nothing serves
    [started] = cli_json(cluster, "start", deployed["uuid"])
    assert started["state"] == "active" and started["prediction_url"] == deployed["url"]
    assert cluster.predict("cli", deployed["url"])["status"] == 200
    actors = [e["actor"] for e in cluster.registry().list_events("mlflow", MODEL, 2)]
    assert all(actor.endswith("@cli") for actor in actors), actors  # who, and from which host


def test_ui_actions_from_the_api_host_act_on_the_serving_host(cluster: Cluster, deployed: dict, api: dict) -> None:
    client = api["client"]
    api_pids = {p.pid for p in [psutil.Process(api["proc"].pid), *psutil.Process(api["proc"].pid).children(True)]}
    # wait: the answer carries the outcome (a slower machine would get 202 and a status to poll)
    answer = client.post(f"/services/{deployed['uuid']}/stop", json={"wait": 30})
    assert answer.status_code == 200, answer.text
    assert cluster.registry().get_service(deployed["uuid"]).state == "inactive"
    assert cluster.predict("cli", deployed["url"])["status"] is None
    answer = client.post(f"/services/{deployed['uuid']}/start", json={"wait": 30})
    assert answer.status_code == 200, answer.text
    record = cluster.registry().get_service(deployed["uuid"])
    assert record.state == "active" and record.prediction_url == deployed["url"]
    assert record.pid in cluster.net["serving"].pids() and record.pid not in api_pids
    assert cluster.predict("cli", deployed["url"]) == {"status": 200, "version": "1"}

    # A second version from the worker, then a rollback from the UI: the agent of the serving host
    # serves version 1 again at the same URL; the API server never loads a model.
    replace = (
        "from airflow_provider_modeldeploy.deployers import ServiceConfig, get_model_deployer; "
        f"get_model_deployer().deploy_model(ServiceConfig(model_uri='models:/iris/2', model_name='{MODEL}'))"
    )
    ok(cluster.net["worker"].run([sys.executable, "-c", replace], env=cluster.env("worker"), timeout=300))
    assert cluster.predict("cli", deployed["url"]) == {"status": 200, "version": "2"}
    [current] = cluster.registry().find_services(endpoint=MODEL)
    answer = client.post(f"/services/{current.uuid}/rollback", json={"wait": 30})
    assert answer.status_code == 200, answer.text
    assert cluster.predict("cli", deployed["url"]) == {"status": 200, "version": "1"}
    [restored] = cluster.registry().find_services(endpoint=MODEL)
    assert restored.pid in cluster.net["serving"].pids() and restored.host == "serving"
    event = cluster.registry().list_events("mlflow", MODEL, 1)[0]
    assert event["action"] == "rollback" and event["actor"] == "admin (Airflow UI on api)"
    for pid in api_pids:  # no model code ran in the API server: no scikit-learn in its memory
        with contextlib.suppress(psutil.Error):
            assert not any("sklearn" in m.path for m in psutil.Process(pid).memory_maps()), pid
    deployed["uuid"] = restored.uuid


def test_unreachable_agent_is_a_clear_error_and_changes_nothing(cluster: Cluster, deployed: dict) -> None:
    serving = cluster.net["serving"]
    serving.cut()
    try:
        done = cluster.airflow("cli", "served-models", "stop", deployed["uuid"])
        assert done.returncode != 0 and "Traceback" not in done.stderr
        [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert "serving agent of host 'serving'" in line and f"{serving.address}:{AGENT_PORT}" in line, line
        assert "nothing was changed" in line
        assert cluster.registry().get_service(deployed["uuid"]).state == "active"
        assert cluster.predict("serving", deployed["url"])["status"] == 200  # still serving, on its host
    finally:
        serving.restore()
    assert cluster.predict("cli", deployed["url"])["status"] == 200


def test_killed_agent_leaves_the_server_serving_and_a_restarted_one_adopts_it(cluster: Cluster, deployed: dict) -> None:
    cluster.agent.send_signal(signal.SIGKILL)
    cluster.agent.wait(10)
    assert cluster.predict("cli", deployed["url"])["status"] == 200
    cluster.start_agent()
    [row] = cli_json(cluster, "list", "--model", MODEL)
    assert row["state"] == "active"
    [stopped] = cli_json(cluster, "stop", deployed["uuid"])  # the new agent knows the server
    assert stopped["state"] == "inactive" and cluster.predict("cli", deployed["url"])["status"] is None
    cli_json(cluster, "start", deployed["uuid"])
    assert cluster.predict("cli", deployed["url"])["status"] == 200


def test_squatted_runtime_directory_is_refused(cluster: Cluster) -> None:
    """Someone else created the cli host's runtime directory, world-writable, with a socket in it:
    nothing is sent to that socket, and the error says why."""
    cli = cluster.net["cli"]
    run_dir = cli.path(f"/tmp/modeldeploy-{os.getuid()}")
    run_dir.mkdir()
    os.chown(run_dir, 65534, 65534)
    run_dir.chmod(0o777)
    planted = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    planted.bind(str(run_dir / "agent.sock"))
    planted.listen(8)
    planted.setblocking(False)
    try:
        done = cluster.airflow("cli", "served-models", "agent", "--check")  # this host's own agent
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert f"runtime_dir='/tmp/modeldeploy-{os.getuid()}'" in done.stderr
        assert "owned by uid 65534" in done.stderr and "Refusing to use it" in done.stderr
        with pytest.raises(BlockingIOError):
            planted.accept()  # nobody connected
    finally:
        planted.close()
