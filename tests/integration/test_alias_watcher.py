"""Redeploy when an MLflow alias moves, end to end: a real ``mlflow server`` (SQLite backend), a real
Airflow (api-server, scheduler, dag-processor, triggerer on a SQLite metadata DB) running
``dags/deploy_on_alias_move.py``, whose ``AssetWatcher`` polls ``models:/iris@champion``; the alias is
moved from other processes, as a person in the MLflow UI or a notebook would."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import IRIS_COLUMNS, IRIS_ROWS, ROOT, airflow_env, migrated_airflow_db, wait_for
from cryptography.fernet import Fernet
from local_http import HTTP
from ui_helpers import free_port, stop_process_tree, stop_process_trees

from airflow_provider_modeldeploy.deployers import get_model_deployer
from airflow_provider_modeldeploy.triggers.alias_watcher import MlflowAliasTrigger

CONN_ID = "md_alias_watch"
PASSWORD = "alias-watch-pw-8c1f"  # must never show in a log, an event or the serialized trigger
DAG_ID = "deploy_on_alias_move"
BIN = Path(sys.executable).parent


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


class TrackingServer:
    """``mlflow server`` on a copy of the session's store (the alias moves stay in this module)."""

    def __init__(self, workdir: Path, source_db: Path) -> None:
        self.workdir = workdir
        self.db = workdir / "mlflow.db"
        shutil.copy(source_db, self.db)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.mover: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start the server (``wait_up`` waits for it: Airflow's migration runs meanwhile)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MLFLOW_"))}
        # Without the job runner MLflow 3 starts by default (eight more Pythons importing MLflow, for
        # server-side jobs: none here); the tracking and registry API the watcher polls is the same.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.proc = start(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.db}", "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1", "--default-artifact-root", (self.workdir / "art").as_uri()],
            self.workdir / "mlflow-server.log", env, self.workdir,
        )  # fmt: skip

    def wait_up(self) -> None:
        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            with contextlib.suppress(httpx.HTTPError):
                return HTTP.get(f"{self.url}/health", timeout=2).status_code == 200
            return False

        wait_for(up, 180, "the MLflow tracking server", self.log)

    def stop(self) -> None:
        if self.mover is not None:
            self.mover.kill()
            self.mover.wait(10)
        if self.proc is not None:
            stop_process_tree(self.proc.pid)
            self.proc = None

    def log(self) -> str:
        path = self.workdir / "mlflow-server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def set_alias(self, version: str | None) -> None:
        """Move (or, with None, delete) alias champion of iris from another process, over HTTP, as a
        notebook would: one process for all the moves (MLflow imported once), told what to do on stdin."""
        if self.mover is None:
            script = (
                "import sys\nfrom mlflow import MlflowClient\n"
                f"client = MlflowClient({self.url!r})\n"
                "for line in sys.stdin:\n"
                "    v = line.strip()\n"
                "    if v == '-': client.delete_registered_model_alias('iris', 'champion')\n"
                "    else: client.set_registered_model_alias('iris', 'champion', v)\n"
                "    print('moved', v, flush=True)\n"
            )
            self.mover = subprocess.Popen(
                [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
            )  # fmt: skip
        assert self.mover.stdin is not None and self.mover.stdout is not None
        self.mover.stdin.write(f"{version or '-'}\n")
        self.mover.stdin.flush()
        assert self.mover.stdout.readline().strip() == f"moved {version or '-'}", "the alias mover failed"


@pytest.fixture(scope="module")
def tracking(mlflow_models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    source = Path(mlflow_models["tracking_uri"].removeprefix("sqlite:///"))
    server = TrackingServer(tmp_path_factory.mktemp("tracking"), source)
    server.start()
    yield server
    server.stop()


def connection(tracking_url: str) -> str:
    return json.dumps(
        {"conn_type": "modeldeploy_mlflow", "host": "127.0.0.1", "login": "alice", "password": PASSWORD,
         "extra": {"tracking_uri": tracking_url}}
    )  # fmt: skip


def airflow_db(home: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(home / "airflow.db", timeout=30)) as db:
        return db.execute(query, params).fetchall()


class Airflow:
    """The four Airflow components on one SQLite metadata DB, each stopped by its pid at the end."""

    def __init__(self, home: Path, tracking_url: str) -> None:
        self.home = home
        dags = home / "dags"
        dags.mkdir()
        shutil.copy(ROOT / "dags" / f"{DAG_ID}.py", dags)  # only this DAG: the others are not under test
        api_port = free_port()
        self.fernet_key = Fernet.generate_key()
        self.env = airflow_env(
            home,
            AIRFLOW__CORE__DAGS_FOLDER=str(dags),
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__CORE__PARALLELISM="2",
            AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{api_port}/execution/",
            AIRFLOW__API_AUTH__JWT_SECRET="alias-watcher-test-jwt-secret",
            # One key for all four, as a deployment configures it: left to Airflow, each component
            # writes a new airflow.cfg on its first start, and one starting meanwhile can read the file
            # empty (no key: the triggerer could not read the kwargs the scheduler encrypted, and died).
            AIRFLOW__CORE__FERNET_KEY=self.fernet_key.decode(),
            AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="1",
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
            AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC="1",
            MODELDEPLOY_ALIAS_URI="models:/iris@champion",
            MODELDEPLOY_CONN_ID=CONN_ID,
            MODELDEPLOY_ALIAS_POLL_INTERVAL="1",
            **{f"AIRFLOW_CONN_{CONN_ID.upper()}": connection(tracking_url)},
        )
        self.env.pop("MLFLOW_TRACKING_URI", None)  # the connection says where MLflow is
        self.api_port = api_port
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def run(self, *args: str, timeout: float = 600) -> str:
        done = subprocess.run(
            [str(BIN / "airflow"), *args], env=self.env, cwd=self.home, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"airflow {' '.join(args)}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    def start(self, component: str) -> None:
        args = {"api-server": ["api-server", "--host", "127.0.0.1", "--port", str(self.api_port), "--workers", "1"]}
        self.procs[component] = start(
            [str(BIN / "airflow"), *args.get(component, [component])], self.log_path(component), self.env, self.home
        )

    def stop(self, component: str) -> None:
        proc = self.procs.pop(component, None)
        if proc is not None:
            stop_process_tree(proc.pid)

    def log_path(self, component: str) -> Path:
        return self.home / f"{component}.log"

    def log(self, component: str) -> str:
        path = self.log_path(component)
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"--- {c}\n{self.log(c)[-2500:]}" for c in ("triggerer", "scheduler", "dag-processor"))

    def watcher_owner(self) -> int | None:
        """The triggerer job running the alias watcher's trigger."""
        rows = airflow_db(self.home, "SELECT triggerer_id FROM trigger WHERE classpath LIKE '%MlflowAliasTrigger'")
        return rows[0][0] if rows else None

    def runs(self) -> list[tuple[str, str]]:
        return airflow_db(self.home, "SELECT run_id, state FROM dag_run WHERE dag_id = ? ORDER BY id", DAG_ID)


@pytest.fixture
def airflow(
    airflow_home: Path, airflow_db_template: Path, tracking: TrackingServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Airflow]:
    stack = Airflow(airflow_home, tracking.url)
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", connection(tracking.url))  # for this process's checks
    migrated_airflow_db(airflow_db_template, airflow_home)
    tracking.wait_up()
    tracking.set_alias(None)  # the watcher starts with nothing to deploy
    try:
        for component in ("api-server", "scheduler", "dag-processor", "triggerer"):
            stack.start(component)
        yield stack
    finally:
        stop_process_trees([proc.pid for proc in stack.procs.values()])


def predict_version(url: str) -> str:
    answer = HTTP.post(url, json={"dataframe_split": {"columns": IRIS_COLUMNS, "data": IRIS_ROWS}}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.headers["x-model-version"]


def test_alias_moves_are_deployed_in_place(airflow: Airflow, tracking: TrackingServer) -> None:
    deployer = get_model_deployer(CONN_ID)

    wait_for(lambda: airflow.watcher_owner() is not None, 240, "the triggerer to run the alias watcher", airflow.logs)
    time.sleep(3)  # a few polls: no alias yet, nothing fires
    assert airflow.runs() == []

    url = None
    moves = [("1", "- -> 1", "deploy"), ("2", "1 -> 2", "replace"), ("1", "2 -> 1", "replace")]
    for count, (version, words, action) in enumerate(moves, start=1):
        tracking.set_alias(version)

        def deployed(count: int = count) -> bool:
            runs = airflow.runs()
            assert all(state in ("queued", "running", "success") for _, state in runs), (runs, airflow.logs())
            assert len(runs) <= count, f"a move fired twice: {runs}"  # the watcher polls all along
            return len(runs) == count and runs[-1][1] == "success"

        wait_for(deployed, 240, f"DAG run {count} (alias champion -> {version}) to succeed", airflow.logs)
        [serving] = deployer.find_model_server(endpoint="iris", running=True)
        assert serving.record.model_version == version
        url = url or serving.prediction_url
        assert serving.prediction_url == url  # the same URL after every move
        assert predict_version(url) == version
        [event] = [e for e in deployer.get_history("iris") if e["service_uuid"] == serving.uuid]
        assert event["action"] == action
        assert (
            event["actor"].startswith(f"task {DAG_ID}/") and f"(alias champion of iris moved {words})" in event["actor"]
        )

    # Three moves, three deploys: no event fired twice (the watcher polled all along each run, and
    # does through the restart below).
    assert len(airflow.runs()) == 3
    assert len(deployer.find_model_server(endpoint="iris")) == 1  # one server: replaced, never added
    events = airflow_db(airflow.home, "SELECT extra FROM asset_event ORDER BY id")
    payloads = [json.loads(extra)["payload"] for (extra,) in events]
    assert [(p["previous_version"], p["version"]) for p in payloads] == [(None, "1"), ("1", "2"), ("2", "1")]
    assert {p["tracking_uri"] for p in payloads} == {tracking.url} and payloads[0]["run_id"]

    # A restarted triggerer compares with the served version (the registry): nothing fires again.
    before = airflow.watcher_owner()
    airflow.stop("triggerer")
    airflow.start("triggerer")
    wait_for(lambda: airflow.watcher_owner() not in (None, before), 180, "the restarted triggerer", airflow.logs)
    time.sleep(3)
    assert len(airflow.runs()) == 3 and len(airflow_db(airflow.home, "SELECT id FROM asset_event")) == 3
    [state] = airflow_db(airflow.home, "SELECT key, value FROM asset_state_store")
    assert state == ("modeldeploy.alias_version:models:/iris@champion", '"1"')  # what the restart started from

    # A rollback done in Airflow, not in MLflow, is not undone: the alias did not move.
    [serving] = deployer.find_model_server(endpoint="iris", running=True)
    rolled = serving.rollback(actor="alice")
    assert rolled.record.model_version == "2" and predict_version(url) == "2"
    time.sleep(3)  # three polls
    assert len(airflow.runs()) == 3 and predict_version(url) == "2"

    # The tracking credentials never show: not in the trigger's stored kwargs, the events, or a log.
    fernet = Fernet(airflow.fernet_key)  # the kwargs as stored, decrypted: what the triggerer reads
    stored = " ".join(fernet.decrypt(row).decode() for (row,) in airflow_db(airflow.home, "SELECT kwargs FROM trigger"))
    assert "models:/iris@champion" in stored
    task_logs = " ".join(p.read_text(errors="replace") for p in (airflow.home / "logs").rglob("*") if p.is_file())
    shown = stored + json.dumps(payloads) + " ".join(airflow.log(c) for c in airflow.procs) + task_logs
    assert PASSWORD not in shown


def test_unreachable_tracking_server_is_retried_with_one_line_per_failure(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], airflow_home: Path
) -> None:
    """Nothing listens at the tracking URI: each poll fails, is logged once, and the next waits longer."""
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AIRFLOW_CONN_MD_UNREACHABLE", connection(closed))
    trigger = MlflowAliasTrigger(
        "models:/iris@champion", conn_id="md_unreachable", poll_interval=0.25, max_backoff=1, request_timeout=2
    )

    output = ""
    events: list[Any] = []

    async def collect() -> None:
        """Run the trigger until it logged three failures (or 60 s passed)."""
        nonlocal output

        async def consume() -> None:
            async for event in trigger.run():
                events.append(event)

        running = asyncio.ensure_future(consume())
        deadline = time.monotonic() + 60
        while output.count("Alias watcher") < 3 and time.monotonic() < deadline and not running.done():
            await asyncio.sleep(0.2)
            output += "\n".join(capfd.readouterr())  # the triggerer's structlog lines
        assert not running.done(), running.exception()  # still polling: a failure never ends the trigger
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running

    asyncio.run(collect())
    assert events == []
    assert PASSWORD not in output
    lines = [line[line.index("Alias watcher") :] for line in output.splitlines() if "Alias watcher" in line]
    assert len(lines) >= 3, output[-3000:]
    for number, line in enumerate(lines[:3], start=1):
        expected = f"Alias watcher: cannot read models:/iris@champion from {closed}: connection failed ("
        assert line.startswith(expected), line
        assert f"; retrying in {'0.5s' if number == 1 else '1s'} (failure {number})" in line, line
        assert len(line) < 400, line


def test_trigger_serializes_without_secrets_and_round_trips() -> None:
    from airflow.sdk._shared.module_loading import import_string
    from airflow.sdk.serde import deserialize, serialize

    trigger = MlflowAliasTrigger(["models:/iris@champion"], conn_id=CONN_ID, endpoint="iris-prod", poll_interval=5)
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_provider_modeldeploy.triggers.alias_watcher.MlflowAliasTrigger"
    again = import_string(classpath)(**deserialize(serialize(kwargs)))
    assert again.serialize() == (classpath, kwargs)
    assert [t.endpoint for t in again.targets] == ["iris-prod"]
    assert MlflowAliasTrigger.hash(classpath, kwargs) == MlflowAliasTrigger.hash(*again.serialize())
    assert "password" not in json.dumps(kwargs)
    for bad, match in [
        ({"model_uris": "models:/iris/1"}, "use models:/<name>@<alias>"),
        ({"model_uris": ["models:/a@x", "models:/b@y"], "endpoint": "e"}, "one trigger per alias"),
        ({"model_uris": "models:/my model@x"}, "pass endpoint="),
        ({"model_uris": "models:/iris@x", "poll_interval": 0}, "positive number"),
    ]:
        with pytest.raises(ValueError, match=match):
            MlflowAliasTrigger(**bad)


class _RegistryStub(http.server.BaseHTTPRequestHandler):
    """The one MLflow REST route the watcher reads, behind basic auth (alice / PASSWORD)."""

    def do_GET(self) -> None:
        expected = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self._answer(401, {"error_code": "UNAUTHENTICATED", "message": "You are not authenticated."})
        elif self.path.startswith("/api/2.0/mlflow/registered-models/alias?name=iris&alias=champion"):
            self._answer(200, {"model_version": {"name": "iris", "version": "7", "run_id": "r7", "user_id": "bob"}})
        else:
            self._answer(404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such alias"})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_read_alias_sends_the_connections_basic_auth() -> None:
    from airflow_provider_modeldeploy.hooks.mlflow_local import MlflowServingSettings
    from airflow_provider_modeldeploy.mlflow_aliases import AliasReadError, AliasTarget, AliasURI, read_alias

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RegistryStub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        champion = AliasURI.parse("models:/iris@champion")
        settings = MlflowServingSettings(tracking_uri=url, username="alice", password=PASSWORD)
        assert read_alias(settings, champion) == AliasTarget("7", "r7", "bob")
        assert read_alias(settings, AliasURI.parse("models:/iris@nope")) is None
        wrong = MlflowServingSettings(tracking_uri=url, username="alice", password="not-it")
        with pytest.raises(AliasReadError, match=r"refused the connection's credentials \(HTTP 401\)"):
            read_alias(wrong, champion)
        # credentials in the URI itself are used too, and never shown
        inline = MlflowServingSettings(tracking_uri=f"http://alice:{PASSWORD}@127.0.0.1:{server.server_address[1]}")
        assert read_alias(inline, champion) == AliasTarget("7", "r7", "bob")
    finally:
        server.shutdown()
        server.server_close()


def test_read_alias_through_mlflows_client_for_a_local_store(mlflow_models: dict[str, Any]) -> None:
    """A SQLite (or file) store has no REST API: MLflow's client reads it."""
    from airflow_provider_modeldeploy.hooks.mlflow_local import MlflowServingSettings
    from airflow_provider_modeldeploy.mlflow_aliases import AliasURI, read_alias

    settings = MlflowServingSettings(tracking_uri=mlflow_models["tracking_uri"])
    named = read_alias(settings, AliasURI.parse("models:/iris@champion"))
    assert named is not None and named.version == "1" and named.run_id == mlflow_models["iris_runs"][0]
    assert read_alias(settings, AliasURI.parse("models:/iris@no_such_alias")) is None
    assert read_alias(settings, AliasURI.parse("models:/no-such-model@champion")) is None


def test_what_counts_as_a_move(monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision of one poll, given what the alias names and what the endpoint serves."""
    from airflow_provider_modeldeploy.hooks.mlflow_local import MlflowServingSettings
    from airflow_provider_modeldeploy.mlflow_aliases import AliasTarget
    from airflow_provider_modeldeploy.triggers import alias_watcher

    state = {"alias": "1", "served": "1"}
    monkeypatch.setattr(
        "airflow_provider_modeldeploy.mlflow_aliases.read_alias",
        lambda settings, target, timeout: (
            AliasTarget(state["alias"], f"run{state['alias']}") if state["alias"] else None
        ),
    )
    monkeypatch.setattr(alias_watcher, "_served_version", lambda backend, endpoint: state["served"])
    trigger = MlflowAliasTrigger("models:/iris@champion", conn_id=CONN_ID)
    settings = MlflowServingSettings(tracking_uri=f"http://alice:{PASSWORD}@mlflow:5000")

    def poll(alias: str | None, served: str | None) -> tuple[str | None, str] | None:
        state.update(alias=alias, served=served)
        move = trigger._check(trigger.targets[0], settings, "mlflow")
        if move is not None:
            assert move["tracking_uri"] == "http://mlflow:5000" and PASSWORD not in json.dumps(move)
            assert move["run_id"] == f"run{alias}" and move["endpoint"] == "iris"
        return (move["previous_version"], move["version"]) if move else None

    assert poll("1", "1") is None  # first look: the alias names what is served
    assert poll("2", "1") == ("1", "2")  # a move
    assert poll("2", "1") is None  # the same move, its deployment still running: once
    assert poll("2", "2") is None  # deployed
    assert poll("2", "1") is None  # rolled back in Airflow: the alias did not move, not undone
    assert poll("1", "1") is None  # moved to the version served: nothing to deploy
    assert poll("3", "1") == ("1", "3")
    assert poll(None, "3") is None  # alias deleted: nothing to deploy
    assert poll("1", "3") == (None, "1")  # set again: a move
    # A fresh trigger (a restart without state) compares with the served version.
    trigger = MlflowAliasTrigger("models:/iris@champion", conn_id=CONN_ID)
    assert poll("1", "1") is None
    trigger = MlflowAliasTrigger("models:/iris@champion", conn_id=CONN_ID)
    assert poll("4", "1") == ("1", "4")  # moved while no triggerer watched
