"""The Seldon Core backend end to end, against the Kubernetes API *emulator* (tests/k8s_emulator):
the real hook and kubernetes client, real MLflow models served by real model-server processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import IRIS_COLUMNS, IRIS_ROWS
from seldon_env import Emulator, run_emulator

from airflow_provider_modeldeploy.services import Lineage, ServiceConfig, ServiceState

SELDON_PAYLOAD = {"data": {"names": IRIS_COLUMNS, "ndarray": IRIS_ROWS}}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with run_emulator(tmp_path_factory.mktemp("k8s-emulator")) as emu:
        yield emu


@pytest.fixture
def seldon(
    airflow_home: Path, mlflow_models: dict[str, Any], emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> Any:
    from airflow_provider_modeldeploy.deployers import get_model_deployer

    monkeypatch.setenv("AIRFLOW_CONN_SELDON", emulator.conn_json())
    return get_model_deployer("seldon")


def predict(url: str) -> httpx.Response:
    return httpx.post(url, json=SELDON_PAYLOAD, timeout=30)


def cfg(uri: str, endpoint: str = "iris", **options: Any) -> ServiceConfig:
    return ServiceConfig(model_uri=uri, model_name="iris", endpoint=endpoint, smoke_input=SELDON_PAYLOAD, **options)


def sd(emulator: Emulator, name: str) -> dict[str, Any]:
    return httpx.get(
        f"{emulator.url}/apis/machinelearning.seldon.io/v1/namespaces/models/seldondeployments/{name}", timeout=10
    ).json()


def test_deploy_replace_stop_start_delete(seldon: Any, emulator: Emulator, mlflow_models: dict[str, Any]) -> None:
    first = seldon.deploy_model(cfg(mlflow_models["iris_v1"]), lineage=Lineage(dag_id="d", run_id="r", task_id="t"))
    assert first.status.state == ServiceState.ACTIVE and first.record.model_version == "1"
    url = first.prediction_url
    assert url == f"{emulator.url}/seldon/models/iris/api/v1.0/predictions"
    answer = predict(url)
    assert answer.status_code == 200 and len(answer.json()["data"]["ndarray"]) == 2
    assert answer.headers["x-emulator-model-uri"] == first.record.served_uri
    obj = sd(emulator, "iris")
    labels = obj["metadata"]["labels"]
    assert labels["modeldeploy.airflow.apache.org/service-uuid"] == first.uuid
    assert labels["modeldeploy.airflow.apache.org/dag-id"] == "d"
    lineage = json.loads(obj["metadata"]["annotations"]["modeldeploy.airflow.apache.org/lineage"])
    assert (lineage["run_id"], lineage["task_id"], lineage["model_version"]) == ("r", "t", "1")
    assert obj["metadata"]["generation"] == 1

    # Replace patches the same SeldonDeployment: same URL, new version, one service in the registry.
    second = seldon.deploy_model(cfg(mlflow_models["iris_v2"]))
    assert second.prediction_url == url and second.record.model_version == "2"
    assert predict(url).headers["x-emulator-model-uri"] == second.record.served_uri
    obj = sd(emulator, "iris")
    assert obj["metadata"]["generation"] == 2 and obj["metadata"]["uid"] == lineage_uid(emulator, obj)
    assert [s.uuid for s in seldon.find_model_server(endpoint="iris")] == [second.uuid]
    logs = list(seldon.get_model_server_logs(second.uuid, tail=50))
    assert logs and all(line.startswith("[iris-main-") for line in logs)

    # Stop scales to zero (the URL stops answering), start restores the replicas.
    stopped = second.stop()
    assert stopped.status.state == ServiceState.INACTIVE
    assert [p["replicas"] for p in sd(emulator, "iris")["spec"]["predictors"]] == [0]
    wait_for(lambda: predict(url).status_code == 503)
    started = second.start(timeout=120)
    assert started.is_running and predict(url).status_code == 200
    assert [p["replicas"] for p in sd(emulator, "iris")["spec"]["predictors"]] == [1]

    second.delete()
    assert sd(emulator, "iris")["code"] == 404
    assert seldon.find_model_server(endpoint="iris") == []


def lineage_uid(emulator: Emulator, obj: dict[str, Any]) -> str:
    return obj["metadata"]["uid"]


def wait_for(check: Any, timeout: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)
