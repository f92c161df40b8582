"""Real Airflow runs: the example CT/CD DAG with ``airflow dags test``, the operator and the deferrable
health sensor with ``airflow tasks test``, and the health trigger itself."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
from cli_forker import run_python
from conftest import ROOT, airflow_env, iris_payload, migrated_airflow_db, run_airflow
from local_http import HTTP

from airflow_provider_modeldeploy.deployers import find_services, get_model_deployer
from airflow_provider_modeldeploy.triggers.health import HealthOutcome, ServedModelHealthTrigger

CT_DAG = "continuous_training_mlflow"
WINE = "wine-classifier"
SEED = 1  # a fixed data split: a retrained model scores exactly like the served one
WORSE_C = 0.003  # on that split: accuracy 0.963 against the default C's 0.981, above the default threshold
SERVED_ASSET = "served_model_wine_classifier"
TEST_DAGS = ROOT / "tests" / "integration" / "dags"
SENSOR_DAG = "modeldeploy_health_sensor"
SENSOR_MODEL = "iris-sensor"


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    return done.stdout + done.stderr


def airflow_db(home: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(home / "airflow.db")) as db:
        return db.execute(query, params).fetchall()


def gate_accepts(trained: dict[str, Any], threshold: float) -> bool:
    """The DAG's gate rule: above the threshold and not worse than the served champion."""
    champion = trained["champion_accuracy"]
    return trained["accuracy"] >= threshold and (champion is None or trained["accuracy"] >= champion)


class DagRun:
    """One ``airflow dags test`` run of the CT DAG, as recorded in Airflow's metadata database."""

    def __init__(self, home: Path, conf: dict[str, Any]) -> None:
        before = {r for (r,) in airflow_db(home, "SELECT run_id FROM dag_run WHERE dag_id = ?", CT_DAG)}
        self.output = ok(run_airflow(home, "dags", "test", CT_DAG, "-c", json.dumps(conf), timeout=900))
        [(self.run_id, self.state, stored_conf)] = [
            row
            for row in airflow_db(home, "SELECT run_id, state, conf FROM dag_run WHERE dag_id = ?", CT_DAG)
            if row[0] not in before
        ]
        assert json.loads(stored_conf) == conf
        self.states = dict(
            airflow_db(
                home, "SELECT task_id, state FROM task_instance WHERE dag_id = ? AND run_id = ?", CT_DAG, self.run_id
            )
        )
        self.xcom = {
            task: json.loads(value)
            for task, value in airflow_db(
                home,
                "SELECT task_id, value FROM xcom WHERE dag_id = ? AND run_id = ? AND key = 'return_value'",
                CT_DAG,
                self.run_id,
            )
        }

    def served(self) -> dict[str, Any]:
        return self.xcom["deploy"]


def dag_task(dag_id: str, task_id: str) -> Any:
    """A task of an example DAG, its file imported as the DAG processor would."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{dag_id}", ROOT / "dags" / f"{dag_id}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag.get_task(task_id)


def served_version(url: str, sample: dict[str, Any]) -> str:
    body = {"dataframe_split": {"columns": sample["columns"], "data": sample["data"]}}
    answer = HTTP.post(url, json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["predictions"]) == len(sample["data"])
    return answer.headers["x-model-version"]


def processes_of(service_uuid: str) -> list[int]:
    return [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"]) if service_uuid in (p.info["cmdline"] or [])]


@pytest.mark.long
@pytest.mark.timeout(1800)
def test_continuous_training_dag_replaces_in_place_and_gates(
    airflow_home: Path,
    airflow_db_template: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The DAG's own defaults: MLflow's store and the registry both live under this AIRFLOW_HOME.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    migrated_airflow_db(airflow_db_template, airflow_home)

    # Run 1: nothing served yet and the default threshold (0.85): version 1 is deployed.
    first = DagRun(airflow_home, {"seed": SEED})
    assert first.state == "success", first.output[-3000:]
    trained = first.xcom["train"]
    assert trained["version"] == "1" and trained["champion_accuracy"] is None
    assert gate_accepts(trained, 0.85) and "Accepted:" in first.output
    assert first.states["deploy"] == "success" and first.states["keep_serving"] == "skipped"
    assert first.states["wait_healthy"] == first.states["promote_champion"] == "success"
    url = first.served()["prediction_url"]
    assert url.startswith("http://") and first.served()["model_version"] == "1"
    assert served_version(url, trained["sample"]) == "1"

    # Run 2: same data split, no threshold: the challenger scores exactly as the champion, so the
    # gate must accept it, and version 2 replaces version 1 at the same URL.
    second = DagRun(airflow_home, {"seed": SEED, "accuracy_threshold": 0})
    assert second.state == "success", second.output[-3000:]
    trained = second.xcom["train"]
    assert trained["version"] == "2" and trained["champion_uuid"] == first.served()["uuid"]
    assert trained["champion_accuracy"] == pytest.approx(first.xcom["train"]["accuracy"])
    assert trained["accuracy"] == trained["champion_accuracy"]
    assert gate_accepts(trained, 0) and "Accepted:" in second.output and "Refused:" not in second.output
    assert second.states["deploy"] == "success" and second.states["keep_serving"] == "skipped"
    served = second.served()
    assert served["prediction_url"] == url and served["model_version"] == "2"
    assert served["uuid"] != first.served()["uuid"]
    assert served_version(url, trained["sample"]) == "2"
    assert processes_of(first.served()["uuid"]) == []  # the old server was drained and stopped

    # Run 3: a worse challenger (stronger regularisation, same split), above the default threshold
    # (0.85): the gate must refuse it as worse than the served champion, which it scored for real
    # (version 2, served: the accuracy run 2 measured), and version 2 keeps serving.
    third = DagRun(airflow_home, {"seed": SEED, "C": WORSE_C})
    assert third.state == "success", third.output[-3000:]
    trained = third.xcom["train"]
    assert trained["version"] == "3" and trained["champion_uuid"] == served["uuid"]
    assert trained["champion_accuracy"] == pytest.approx(second.xcom["train"]["accuracy"])
    assert 0.85 <= trained["accuracy"] < trained["champion_accuracy"] and not gate_accepts(trained, 0.85)
    accuracy, champion = trained["accuracy"], trained["champion_accuracy"]
    assert f"Refused: accuracy {accuracy:.4f} is worse than the served champion's {champion:.4f}" in third.output
    assert "Accepted:" not in third.output and "below the threshold" not in third.output
    assert third.states["keep_serving"] == "success"
    assert {third.states[t] for t in ("deploy", "wait_healthy", "smoke_predict", "promote_champion")} == {"skipped"}
    assert "deploy" not in third.xcom
    assert served_version(url, trained["sample"]) == "2"

    # The CLI sees exactly one active server for the model: version 2, deployed by run 2, same URL.
    rows = json.loads(ok(run_airflow(airflow_home, "served-models", "list", "-o", "json")))
    [row] = [r for r in rows if r["model_name"] == WINE]
    assert row["state"] == "active" and row["model_version"] == "2" and row["prediction_url"] == url
    assert (row["uuid"], row["dag_id"], row["task_id"], row["run_id"]) == (
        served["uuid"],
        CT_DAG,
        "deploy",
        second.run_id,
    )

    # MLflow's alias follows the served version; refused version 3 is registered but not champion.
    from mlflow import MlflowClient

    tracking_uri = f"sqlite:///{airflow_home / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=tracking_uri)
    assert str(client.get_model_version_by_alias(WINE, "champion").version) == "2"
    assert str(client.get_model_version(WINE, "3").version) == "3"

    # What the trained model declares it needs, in the files MLflow keeps for it: what loading it takes
    # (its format is skops), pinned to the versions that trained it, nothing the task merely had imported.
    files = Path(urlsplit(client.get_model_version_download_uri(WINE, "2")).path)
    requirements = (files / "requirements.txt").read_text().split()
    assert sorted(requirements) == sorted(
        f"{name}=={importlib.metadata.version(name)}" for name in ("mlflow", "scikit-learn", "skops")
    ), requirements

    # The served model's asset: one event per deployment (runs 1 and 2, from promote_champion) carrying
    # what was served; none for the refused run 3.
    events = airflow_db(
        airflow_home,
        "SELECT e.source_dag_id, e.source_task_id, e.source_run_id, e.extra FROM asset_event e "
        "JOIN asset a ON a.id = e.asset_id WHERE a.name = ? ORDER BY e.id",
        SERVED_ASSET,
    )
    assert [(dag, task, run) for dag, task, run, _ in events] == [
        (CT_DAG, "promote_champion", first.run_id),
        (CT_DAG, "promote_champion", second.run_id),
    ], events
    assert [json.loads(extra) for *_, extra in events] == [
        {k: run.served()[k] for k in ("uuid", "model_name", "model_version", "prediction_url")}
        for run in (first, second)
    ]

    # The gate's other refusal, by the DAG's own gate function on run 3's real figures: a threshold the
    # challenger does not reach is refused before the champion is compared.
    gate = dag_task(CT_DAG, "gate").python_callable
    capsys.readouterr()
    params = {"accuracy_threshold": 0.99, "deploy_through_alias": False}
    assert gate(trained, params) == "keep_serving"
    assert capsys.readouterr().out == f"Refused: accuracy {accuracy:.4f} is below the threshold 0.99\n"
    assert gate(second.xcom["train"], {**params, "accuracy_threshold": 0}) == "deploy"


def final_state(output: str) -> str:
    """The last state ``airflow tasks test`` recorded for its task instance."""
    states = re.findall(r"Task instance state updated.*?new_state=(\w+)", output)
    assert states, output[-3000:]
    return states[-1]


def first_event(trigger: ServedModelHealthTrigger) -> dict[str, Any]:
    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(first())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.long
@pytest.mark.timeout(1500)
def test_tasks_test_deploy_then_deferrable_sensor(
    airflow_home: Path, airflow_db_template: Path, mlflow_models: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(TEST_DAGS))
    # The service is stopped, then started again at its URL: on a port no other deployment tries.
    env = {
        "AIRFLOW__CORE__DAGS_FOLDER": str(TEST_DAGS),
        "PYTHONUNBUFFERED": "1",
        "MODELDEPLOY_TEST_PORT": str(free_port()),
    }
    migrated_airflow_db(airflow_db_template, airflow_home)

    # NB: `airflow tasks test` exits 0 even when the task fails: check the state it recorded too.
    missing = ok(run_airflow(airflow_home, "tasks", "test", SENSOR_DAG, "wait_missing", **env))
    assert final_state(missing) == "failed"
    assert "model_name='no-such-model': no served model matches" in missing

    deployed = ok(run_airflow(airflow_home, "tasks", "test", SENSOR_DAG, "deploy", **env))
    assert final_state(deployed) == "success", deployed[-3000:]
    [service] = find_services(model_name=SENSOR_MODEL, running=True)
    assert (service.record.dag_id, service.record.task_id) == (SENSOR_DAG, "deploy")
    assert service.record.model_uri == mlflow_models["iris_v1"] and service.record.model_version == "1"
    url = service.prediction_url
    assert HTTP.post(url, json=iris_payload(), timeout=30).status_code == 200

    # A healthy service: the sensor's first poke succeeds, nothing is deferred.
    waited = ok(run_airflow(airflow_home, "tasks", "test", SENSOR_DAG, "wait", **env))
    assert final_state(waited) == "success", waited[-3000:]
    assert f"Service {service.uuid} at {service.record.health_url}: healthy; sample prediction" in waited
    assert "running trigger in line" not in waited

    # A stopped service: the sensor defers; `tasks test` runs the trigger in line, which fires once
    # the service is started again, and the task resumes in execute_complete.
    deployer = get_model_deployer()
    deployer.stop_model_server(service.uuid)
    log = airflow_home / "wait-deferred.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "airflow"), "tasks", "test", SENSOR_DAG, "wait"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            env=airflow_env(airflow_home, **env),
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while "running trigger in line" not in log.read_text():
            assert proc.poll() is None, f"exited {proc.returncode} before deferring:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        started = deployer.start_model_server(service.uuid)
        assert started.prediction_url == url
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deferred = log.read_text()
    assert final_state(deferred) == "success", deferred[-3000:]
    assert "Trigger completed" in deferred
    assert f"Service {service.uuid}: healthy; sample prediction" in deferred  # execute_complete's message

    # The trigger itself against the live service: healthy, and failed at once when the sample is refused.
    running = deployer.get_model_server(service.uuid)
    event = first_event(
        ServedModelHealthTrigger(
            service_uuid=service.uuid, health_url=running.health_url, prediction_url=url,
            sample_input=iris_payload(), poll_interval=0.5, timeout=30,
        )
    )  # fmt: skip
    assert event["status"] == "success" and event["service_uuid"] == service.uuid
    assert event["message"].startswith("healthy; sample prediction")
    event = first_event(
        ServedModelHealthTrigger(
            service_uuid=service.uuid, health_url=running.health_url, prediction_url=url,
            sample_input={"not": "a dataframe"}, poll_interval=0.5, timeout=60,
        )
    )  # fmt: skip
    assert event["status"] == HealthOutcome.FAILED == "failed"
    assert event["message"].startswith("sample prediction answered HTTP 4")


def test_trigger_times_out_on_a_dead_url() -> None:
    health = f"http://127.0.0.1:{free_port()}/health"
    trigger = ServedModelHealthTrigger(service_uuid="dead", health_url=health, poll_interval=0.5, timeout=2)
    started = time.monotonic()
    event = first_event(trigger)
    assert 2 <= time.monotonic() - started < 30
    assert event["status"] == "timeout" and event["service_uuid"] == "dead"
    assert event["message"].startswith("not healthy after 2s: ") and "ConnectError" in event["message"]


def test_the_sensor_defers_by_default_when_airflow_says_so() -> None:
    """``deferrable`` defaults to ``[operators] default_deferrable``, as for Airflow's own operators."""
    code = (
        "from airflow_provider_modeldeploy.sensors import ServedModelHealthSensor; "
        "print(ServedModelHealthSensor(task_id='w', model_name='m').deferrable)"
    )
    for value in ("True", "False"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        done = run_python(code, [], {**env, "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": value}, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split()[-1] == value


def test_trigger_serialize_round_trips() -> None:
    from airflow.sdk._shared.module_loading import import_string
    from airflow.sdk.serde import deserialize, serialize

    trigger = ServedModelHealthTrigger(
        service_uuid="0f0e", health_url="http://127.0.0.1:5200/health",
        prediction_url="http://127.0.0.1:5200/invocations", sample_input=iris_payload(),
        poll_interval=1.5, timeout=90,
    )  # fmt: skip
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_provider_modeldeploy.triggers.health.ServedModelHealthTrigger"
    # As the triggerer (and `dags test`) does: serde-encode the kwargs, decode, re-instantiate.
    again = import_string(classpath)(**deserialize(serialize(kwargs)))
    assert isinstance(again, ServedModelHealthTrigger)
    assert again.serialize() == (classpath, kwargs)
    assert again.sample_input == iris_payload() and again.timeout == 90
