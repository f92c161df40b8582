"""``airflow served-models``: the real Airflow CLI in subprocesses, over a real model server.

One service is deployed for the module through the Python API; the CLI subprocesses find it because
they get the same AIRFLOW_HOME, registry and MLFLOW_TRACKING_URI. The registry is on the real
PostgreSQL (a schema of the module's own, migrated by the explicit step a shared registry takes): the
CLI on SQLite runs in test_faults.py, test_registry.py and test_ui.py. The read-only commands are
tested first; ``test_stop_start_delete`` changes the service and runs last.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from conftest import (
    _delete_all_services,
    airflow_env,
    iris_payload,
    migrated_pg_registry,
    pg_schema,
    run_airflow,
    server_pids,
    use_airflow_home,
)
from local_http import HTTP

from airflow_provider_modeldeploy.deployers import ServiceConfig, get_model_deployer

MODEL = "iris-cli"
LIST_KEYS = {"uuid", "state", "model_name", "model_version", "dag_id", "task_id", "prediction_url"}
UNKNOWN = "00000000-0000-4000-8000-000000000000"


@pytest.fixture(scope="module")
def cli_home(tmp_path_factory: pytest.TempPathFactory, mlflow_models: dict[str, Any]) -> Iterator[Path]:
    """Like ``airflow_home``, for the whole module (one deployment serves every CLI test), with the
    registry in a PostgreSQL schema of its own."""
    with pytest.MonkeyPatch.context() as mp, pg_schema() as url:
        home = use_airflow_home(tmp_path_factory.mktemp("cli") / "airflow", mp)
        mp.setenv("AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN", migrated_pg_registry(url))
        try:
            yield home
        finally:
            _delete_all_services()


@pytest.fixture(scope="module")
def service(cli_home: Path, mlflow_models: dict[str, Any]) -> Any:
    return get_model_deployer().deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name=MODEL))


def cli(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_airflow(home, "served-models", *args, **env)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stdout


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """A failed command exits 1 with exactly one ``error: ...`` line and no traceback."""
    assert done.returncode == 1, f"exit {done.returncode}\nstdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


def listed(home: Path, *args: str) -> list[dict[str, Any]]:
    data = json.loads(ok(cli(home, "list", "-o", "json", *args)))
    assert isinstance(data, list)
    return data


def cells(line: str) -> list[str]:
    """The words of a row of a plain or rich table (whose columns are separated by '|')."""
    return line.replace("|", " ").split()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_provider_is_registered(cli_home: Path) -> None:
    out = ok(run_airflow(cli_home, "providers", "list", "-o", "json"))
    packages = [p.get("package_name") for p in json.loads(out)]
    assert "airflow-provider-modeldeploy" in packages


def lineage_rows(registry: Any) -> list[Any]:
    """Registry rows (no server) deployed by tasks: ``ct``'s ``deploy`` in every state, stopped ones
    between running ones, and the same DAG's or task's name elsewhere. Newest last."""
    from airflow_provider_modeldeploy.services import ServiceRecord, ServiceState

    a, i, e = ServiceState.ACTIVE, ServiceState.INACTIVE, ServiceState.ERROR
    lineage = [("ct", "deploy", s) for s in (a, i, a, i, i, a, e, a)] + [("ct", "train", a), ("ct_2", "deploy", a)]
    made = []
    for n, (dag_id, task_id, state) in enumerate(lineage):
        record = ServiceRecord(
            uuid=f"0000000{n}-0000-4000-8000-00000000ca9e", backend="mlflow", endpoint=f"paged-{n}",
            model_name=f"paged-{n}", model_uri="models:/paged/1", state=state, dag_id=dag_id, task_id=task_id,
            run_id=f"scheduled__{n}",
        )  # fmt: skip
        made.append(registry.add_service(record))
    return made


def test_list_json_and_filters(cli_home: Path, service: Any) -> None:
    from airflow_provider_modeldeploy.registry import get_registry

    registry = get_registry()
    rows = lineage_rows(registry)
    try:
        everything = listed(cli_home)
        [row] = [r for r in everything if r["uuid"] == service.uuid]
        assert set(row) >= LIST_KEYS
        assert row["state"] == "active"
        assert row["model_name"] == MODEL and row["model_version"] == "1"
        assert row["dag_id"] is None and row["task_id"] is None  # deployed from Python, not by a task
        assert row["prediction_url"] == service.prediction_url
        assert {r["uuid"]: (r["dag_id"], r["task_id"], r["state"]) for r in everything} == {
            service.uuid: (None, None, "active"),
            **{r.uuid: (r.dag_id, r.task_id, r.state) for r in rows},
        }

        assert [r["uuid"] for r in listed(cli_home, "--model", MODEL)] == [service.uuid]
        assert listed(cli_home, "--model", "no-such-model") == []
        # Lineage filters, --running and a page: --running is part of the query, so the page is full
        # (newest first: the 2nd and 3rd running services of ct/deploy), whatever is stopped between.
        running = [r.uuid for r in registry.find_services(dag_id="ct", task_id="deploy") if r.state == "active"]
        assert len(running) == 4
        page = listed(cli_home, "--running", "--dag-id", "ct", "--task-id", "deploy", "--limit", "2", "--offset", "1")
        assert [r["uuid"] for r in page] == running[1:3], (page, running)
    finally:
        for row in rows:
            registry.delete_service(row.uuid)


def test_list_yaml_plain_and_table(cli_home: Path, service: Any) -> None:
    [row] = yaml.safe_load(ok(cli(cli_home, "list", "-o", "yaml")))
    assert set(row) >= LIST_KEYS
    assert row["uuid"] == service.uuid and str(row["model_version"]) == "1"

    for output in ("plain", "table"):
        lines = [line for line in ok(cli(cli_home, "list", "-o", output)).splitlines() if line.strip()]
        header = cells(lines[0])
        assert header[:4] == ["uuid", "state", "model_name", "model_version"], lines
        assert "prediction_url" in header
        [line] = [line for line in lines if service.uuid in line]
        assert "active" in line and MODEL in line and service.prediction_url in line


def test_describe_json_has_history(cli_home: Path, service: Any) -> None:
    [data] = json.loads(ok(cli(cli_home, "describe", service.uuid, "-o", "json")))
    assert data["uuid"] == service.uuid and data["state"] == "active"
    assert data["model_uri"] == "models:/iris/1" and data["served_uri"] == "models:/iris/1"
    assert data["prediction_url"] == service.prediction_url
    assert data["history"], data
    [event] = data["history"]
    assert event["action"] == "deploy" and event["outcome"] == "success"
    assert event["service_uuid"] == service.uuid and service.prediction_url in event["message"]

    # A unique prefix is enough; the table form shows the properties, then the history.
    out = ok(cli(cli_home, "describe", service.uuid[:8]))
    lines = out.splitlines()
    assert cells(lines[0]) == ["property", "value"], lines[:3]
    assert ["uuid", service.uuid] in [cells(line) for line in lines]
    assert ["model_uri", "models:/iris/1"] in [cells(line) for line in lines]
    assert any({"deploy", "success"} <= set(cells(line)) for line in lines), out


def test_get_url_serves_predictions(cli_home: Path, service: Any) -> None:
    url = ok(cli(cli_home, "get-url", service.uuid)).strip()
    assert url == service.prediction_url
    answer = HTTP.post(url, json=iris_payload(), timeout=30)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2
    assert answer.headers["x-model-version"] == "1"


def test_logs_tail(cli_home: Path, service: Any) -> None:
    full = list(get_model_deployer().get_model_server_logs(service.uuid))
    assert any("accepting on" in line for line in full)
    assert ok(cli(cli_home, "logs", service.uuid, "--tail", "5")).splitlines() == full[-5:]
    assert ok(cli(cli_home, "logs", service.uuid[:8], "--tail", "1")).splitlines() == full[-1:]


@pytest.mark.parametrize(
    "args",
    [
        ("describe", UNKNOWN),
        ("logs", UNKNOWN),
        ("get-url", "____"),  # a prefix is matched literally: '_' and '%' are no SQL wildcards
        ("delete", "%%%%", "--yes"),
    ],
    ids=lambda args: " ".join(args),
)
def test_unknown_uuid_is_one_line_error(cli_home: Path, service: Any, args: tuple[str, ...]) -> None:
    error = one_line_error(cli(cli_home, *args))
    assert error.startswith(f"error: uuid={args[1]!r}: "), error
    assert get_model_deployer().get_model_server(service.uuid).is_running


def test_a_service_whose_connection_is_gone_is_listed_unchecked(cli_home: Path, service: Any) -> None:
    from airflow_provider_modeldeploy.registry import get_registry
    from airflow_provider_modeldeploy.services import ServiceRecord, ServiceState

    registry = get_registry()
    orphan = registry.add_service(
        ServiceRecord(
            uuid=UNKNOWN.replace("0000-4000", "0000-4001"), backend="mlflow", endpoint="iris-gone",
            model_name="iris-gone", model_uri="models:/iris/1", conn_id="removed_conn", state=ServiceState.INACTIVE,
        )
    )  # fmt: skip
    try:
        rows = json.loads(ok(cli(cli_home, "list", "--output", "json")))
        assert {r["uuid"]: r["state"] for r in rows} == {service.uuid: "active", orphan.uuid: "inactive"}
        done = cli(cli_home, "describe", orphan.uuid)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert "conn_id='removed_conn'" in done.stderr and "no Airflow connection has this id" in done.stderr
    finally:
        registry.delete_service(orphan.uuid)


class Follower:
    """``airflow served-models logs <uuid> -f`` running, its lines read as they come."""

    def __init__(self, home: Path, uuid: str) -> None:
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "served-models", "logs", uuid, "--tail", "1", "-f"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            env=airflow_env(home, PYTHONUNBUFFERED="1"),
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout or ():
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next line, None at the end of the stream."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no line from logs -f in {timeout}s (exit {self.proc.poll()})")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def test_stop_start_delete(cli_home: Path, service: Any) -> None:
    url, pid = service.prediction_url, service.record.pid

    # logs -f: the stream is open (the last line so far), it goes on with what the server writes while
    # it stops, and ends by itself once the server is gone (exit 0).
    follower = Follower(cli_home, service.uuid)
    try:
        assert follower.next_line(120)

        # stop: listed as inactive, not running, and get-url says so in one line.
        out = ok(cli(cli_home, "stop", service.uuid))
        followed = []
        while (line := follower.next_line(60)) is not None:
            followed.append(line)
        assert follower.proc.wait(30) == 0, (follower.proc.stderr.read() if follower.proc.stderr else "")[-3000:]
    finally:
        follower.close()
    assert any("draining" in line for line in followed), followed
    assert followed and followed[-1].endswith("] stopped"), followed
    assert service.uuid in out and "inactive" in out
    [row] = listed(cli_home)
    assert row["uuid"] == service.uuid and row["state"] == "inactive"
    assert listed(cli_home, "--running") == []
    assert not alive(pid)
    with pytest.raises(httpx.ConnectError):
        HTTP.post(url, json=iris_payload(), timeout=10)
    error = one_line_error(cli(cli_home, "get-url", service.uuid))
    assert error == f"error: uuid={service.uuid!r}: the service is inactive, it has no live prediction URL"

    # start: back at the same URL.
    out = ok(cli(cli_home, "start", service.uuid))
    assert service.uuid in out and "active" in out
    assert ok(cli(cli_home, "get-url", service.uuid)).strip() == url
    assert HTTP.post(url, json=iris_payload(), timeout=30).status_code == 200
    [row] = listed(cli_home, "--running")
    assert row["uuid"] == service.uuid
    started = get_model_deployer().get_model_server(service.uuid)
    new_pid = started.record.pid
    assert new_pid and new_pid != pid and alive(new_pid)

    # delete without --yes, stdin not a TTY: refused, nothing changes.
    error = one_line_error(cli(cli_home, "delete", service.uuid))
    assert "--yes" in error
    [row] = listed(cli_home)
    assert row["uuid"] == service.uuid and row["state"] == "active"
    assert alive(new_pid)

    # delete --yes: gone from the registry, and its server process is gone.
    assert ok(cli(cli_home, "delete", service.uuid, "--yes")).strip() == f"Deleted service {service.uuid}"
    assert listed(cli_home) == []
    assert not alive(new_pid) and new_pid not in server_pids()
    error = one_line_error(cli(cli_home, "describe", service.uuid))
    assert error.startswith(f"error: uuid={service.uuid!r}: ")
    history = get_model_deployer().get_history(MODEL)
    assert [e["action"] for e in history[:4]] == ["delete", "start", "stop", "deploy"]


def test_rollback_and_promote(cli_home: Path, mlflow_models: dict[str, Any]) -> None:
    deployer = get_model_deployer()
    first = deployer.deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-cli-rb"))
    second = deployer.deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v2"], model_name="iris-cli-rb"))
    url = second.prediction_url
    assert first.prediction_url == url

    error = one_line_error(cli(cli_home, "promote", second.uuid))
    assert error == f"error: uuid={second.uuid!r}: has no canary to promote"
    error = one_line_error(cli(cli_home, "rollback", second.uuid, "--to", "f00d"))
    assert error.startswith("error: to_service_uuid='f00d': names no earlier service")

    [row] = json.loads(ok(cli(cli_home, "rollback", second.uuid, "--output", "json")))
    assert row["state"] == "active" and row["prediction_url"] == url and row["model_version"] == "1"
    answer = HTTP.post(url, json=iris_payload(), timeout=30)
    assert answer.status_code == 200 and answer.headers["x-model-version"] == "1"
    event = deployer.get_history("iris-cli-rb")[0]
    assert (event["action"], event["outcome"], event["details"]["previous_uuid"]) == (
        "rollback",
        "success",
        second.uuid,
    )
    deployer.delete_model_server(row["uuid"])


def test_cli_output_masks_credentials(cli_home: Path) -> None:
    """A row whose URIs, error and options carry credentials (as a user may pass them): every output
    format shows them masked."""
    from airflow_provider_modeldeploy.registry import get_registry
    from airflow_provider_modeldeploy.services import ServiceRecord, ServiceState

    secrets = ("Zm9vYmFyc2ln", "hunter2-pw", "tok-123456", "opt-s3cr3t")
    record = get_registry().add_service(
        ServiceRecord(
            uuid="c1e0c1e0-0000-4000-8000-00000000c11d", backend="mlflow", endpoint="masked-cli",
            model_name="masked-cli", state=ServiceState.ERROR, host="elsewhere",
            model_uri="https://store.example/m.tar.gz?sv=2022&sig=Zm9vYmFyc2ln",
            served_uri="s3://alice:hunter2-pw@minio.example/models/m",
            last_error="download failed: token=tok-123456 refused", config={"api_token": "opt-s3cr3t"},
        )
    )  # fmt: skip
    try:
        for output in ("json", "yaml", "table", "plain"):
            shown = ok(cli(cli_home, "list", "-o", output, "--model", "masked-cli"))
            assert "masked-cli" in shown and not [s for s in secrets if s in shown], (output, shown)
        data = listed(cli_home, "--model", "masked-cli")
        assert data[0]["last_error"] == "download failed: token=*** refused"
    finally:
        get_registry().delete_service(record.uuid)
