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

from airflow_provider_modeldeploy.exceptions import DeploymentFailedError, InvalidParameterError
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


def uris_answering(url: str, n: int) -> set[str]:
    return {predict(url).headers["x-emulator-model-uri"] for _ in range(n)}


def test_canary_conflict_rollback_promote_failure(
    seldon: Any, emulator: Emulator, mlflow_models: dict[str, Any]
) -> None:
    first = seldon.deploy_model(cfg(mlflow_models["iris_v1"], "iris-canary"))
    url, v1 = first.prediction_url, first.record.served_uri

    # A concurrent writer changes the object between our read and our patch: 409, re-read, re-apply.
    emulator.inject_conflicts(1)
    canary = seldon.deploy_model(cfg(mlflow_models["iris_v2"], "iris-canary", canary_traffic_percent=50))
    v2 = canary.record.served_uri
    obj = sd(emulator, "iris-canary")
    assert "emulator/concurrent-writer" in obj["metadata"]["annotations"]
    assert [(p["name"], p["traffic"], p["graph"]["modelUri"]) for p in obj["spec"]["predictors"]] == [
        ("main", 50, v1), ("canary", 50, v2),
    ]  # fmt: skip
    assert canary.status.state == ServiceState.ACTIVE and canary.prediction_url == url
    assert uris_answering(url, 40) == {v1, v2}
    assert seldon.get_history(canary.uuid)[0]["action"] == "canary"

    # Rollback of a canary: main (v1) alone again, without restarting it.
    back = canary.rollback()
    assert back.record.served_uri == v1 and back.is_running
    assert [p["name"] for p in sd(emulator, "iris-canary")["spec"]["predictors"]] == ["main"]
    assert uris_answering(url, 10) == {v1}

    # Canary again, then promote: v2 takes all traffic.
    again = seldon.deploy_model(cfg(mlflow_models["iris_v2"], "iris-canary", canary_traffic_percent=30))
    promoted = again.promote()
    assert "canary_of" not in promoted.record.config
    preds = sd(emulator, "iris-canary")["spec"]["predictors"]
    assert [(p["name"], p["traffic"], p["graph"]["modelUri"]) for p in preds] == [("main", 100, v2)]
    assert uris_answering(url, 10) == {v2}
    assert seldon.get_history(again.uuid)[0]["action"] == "promote"
    with pytest.raises(InvalidParameterError, match="has no canary to promote"):
        promoted.promote()

    # A model that cannot load: Failed with Seldon's description; the spec is restored, v2 keeps serving.
    with pytest.raises(DeploymentFailedError, match=r"Failed: predictor main: .*model weights are corrupted"):
        seldon.deploy_model(cfg("models:/broken/1", "iris-canary"))
    assert sd(emulator, "iris-canary")["spec"]["predictors"][0]["graph"]["modelUri"] == v2
    assert uris_answering(url, 5) == {v2}
    current = seldon.find_model_server(endpoint="iris-canary")
    assert [s.uuid for s in current] == [again.uuid] and current[0].status.state == ServiceState.ACTIVE


def test_bad_names_and_manifests_leave_nothing(seldon: Any, emulator: Emulator, mlflow_models: dict[str, Any]) -> None:
    from kubernetes.client.exceptions import ApiException

    from airflow_provider_modeldeploy.registry import get_registry

    with pytest.raises(InvalidParameterError, match=r"endpoint='Iris_Prod': is not a valid Kubernetes name"):
        seldon.deploy_model(cfg(mlflow_models["iris_v1"], "Iris_Prod"))
    with pytest.raises(InvalidParameterError) as info:
        seldon.deploy_model(cfg(mlflow_models["iris_v1"], "iris-bad", resources={"requests": "lots"}))
    assert info.value.field == "spec.predictors[0].componentSpecs[0].spec.containers[0].resources.requests"
    assert "rejected by the SeldonDeployment CRD schema" in str(info.value) and "'lots'" in str(info.value)
    with pytest.raises(InvalidParameterError, match="canary_traffic_percent=150"):
        seldon.deploy_model(cfg(mlflow_models["iris_v1"], "iris-bad", canary_traffic_percent=150))
    with pytest.raises(InvalidParameterError, match="a canary needs a version serving"):
        seldon.deploy_model(cfg(mlflow_models["iris_v1"], "iris-bad", canary_traffic_percent=10))
    assert get_registry().find_services() == []
    assert sd(emulator, "iris-bad")["code"] == 404

    # The emulator itself answers 422 for an object the CRD schema rejects, as the API server does.
    bad = {"apiVersion": "machinelearning.seldon.io/v1", "kind": "SeldonDeployment",
           "metadata": {"name": "raw"}, "spec": {"predictors": [{"name": "p", "replicas": "two", "graph": {}}]}}  # fmt: skip
    with pytest.raises(ApiException) as raw:
        seldon.api.create_namespaced_custom_object(
            "machinelearning.seldon.io", "v1", "models", "seldondeployments", bad
        )
    assert raw.value.status == 422 and "spec.predictors[0].replicas" in raw.value.body


SECRET_KEY = "s3cr3t-Value-42-never-shown"
ACCESS_KEY = "AKIAEMULATORACCESSKEY"


def test_secrets_never_leak_sensor_cli_and_sync(
    airflow_home: Path, mlflow_models: dict[str, Any], emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import ROOT, run_airflow

    from airflow_provider_modeldeploy.deployers import get_model_deployer
    from airflow_provider_modeldeploy.registry import get_registry

    minio = {"conn_type": "aws", "login": ACCESS_KEY, "password": SECRET_KEY,
             "extra": {"endpoint_url": "http://minio.emulated:9000"}}  # fmt: skip
    env = {
        "AIRFLOW_CONN_SELDON": emulator.conn_json(storage_secret="model-storage", storage_conn_id="minio"),
        "AIRFLOW_CONN_MINIO": json.dumps(minio),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "tests" / "dags"),
        "PYTHONUNBUFFERED": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    outputs = []

    def ok(*args: str) -> str:
        done = run_airflow(airflow_home, *args, timeout=300, **env)
        outputs.append(done.stdout + done.stderr)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return done.stdout + done.stderr

    ok("db", "migrate")
    ok("dags", "reserialize")
    deployed = ok("tasks", "test", "modeldeploy_seldon", "deploy")
    assert final_state(deployed) == "success", deployed[-3000:]
    waited = ok("tasks", "test", "modeldeploy_seldon", "wait")
    assert final_state(waited) == "success", waited[-3000:]
    assert "healthy; sample prediction" in waited, waited[-3000:]

    # The Secret exists with the rclone variables the storage initializer reads, marked as ours.
    secret_url = f"{emulator.url}/api/v1/namespaces/models/secrets/model-storage"
    secret = httpx.get(secret_url, timeout=10).json()
    assert secret["stringData"]["RCLONE_CONFIG_S3_SECRET_ACCESS_KEY"] == SECRET_KEY
    assert secret["stringData"]["RCLONE_CONFIG_S3_ENDPOINT"] == "http://minio.emulated:9000"
    assert secret["metadata"]["labels"]["modeldeploy.airflow.apache.org/created-by"]

    seldon = get_model_deployer("seldon")
    other = seldon.deploy_model(cfg(mlflow_models["iris_v1"], "iris-two"))
    assert sd(emulator, "iris-two")["spec"]["predictors"][0]["graph"]["envSecretRefName"] == "model-storage"
    listed = ok("served-models", "list", "-o", "json")
    rows = {r["model_name"] + "/" + r["prediction_url"].split("/")[5]: r for r in json.loads(listed)}
    assert {r["backend"] for r in rows.values()} == {"seldon"} and len(rows) == 2
    first_uuid = rows["iris-seldon/iris-seldon"]["uuid"]

    # Nothing holds a credential: CLI and task output (XCom included), the registry, the cluster's
    # SeldonDeployments (only the Secret's name).
    registry_db = airflow_home / "modeldeploy" / "registry.db"
    stored = [registry_db.read_bytes(), (airflow_home / "airflow.db").read_bytes()]  # XCom is in airflow.db
    for text in [*outputs, *(b.decode(errors="replace") for b in stored), json.dumps(sd(emulator, "iris-two"))]:
        assert SECRET_KEY not in text and ACCESS_KEY not in text
    assert SECRET_KEY not in "\n".join(seldon.get_model_server_logs(other.uuid))

    # The registry is lost: sync rebuilds it from the cluster's labels and annotations.
    get_registry().dispose()
    registry_db.unlink()
    synced = json.loads(ok("served-models", "sync", "--conn-id", "seldon", "-o", "json"))
    [report] = [r for r in synced if r["backend"] == "seldon"]
    assert sorted(report["adopted"]) == sorted([first_uuid, other.uuid])
    rows = json.loads(ok("served-models", "list", "-o", "json"))
    restored = {r["uuid"]: r for r in rows}
    assert restored[first_uuid]["dag_id"] == "modeldeploy_seldon" and restored[first_uuid]["task_id"] == "deploy"
    assert restored[first_uuid]["model_version"] == "1" and restored[first_uuid]["state"] == "active"
    assert restored[other.uuid]["prediction_url"] == other.prediction_url

    # Delete removes the SeldonDeployment; our Secret goes with the last deployment that uses it.
    ok("served-models", "delete", first_uuid, "--yes")
    assert sd(emulator, "iris-seldon")["code"] == 404
    assert httpx.get(secret_url, timeout=10).status_code == 200
    seldon.delete_model_server(other.uuid)  # in-process (each airflow command costs seconds)
    assert httpx.get(secret_url, timeout=10).status_code == 404


def final_state(output: str) -> str:
    """The last state ``airflow tasks test`` recorded for its task instance (it exits 0 either way)."""
    import re

    states = re.findall(r"Task instance state updated.*?new_state=(\w+)", output)
    assert states, output[-3000:]
    return states[-1]


def test_example_dag_parses_without_backend_imports() -> None:
    """The example DAG loads (no kubernetes/mlflow import at parse time) and wires the canary loop."""
    import subprocess
    import sys

    from conftest import ROOT

    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]);"
        "heavy = [m for m in ('kubernetes', 'mlflow', 'sklearn') if m in sys.modules]; print(heavy)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "dags" / "continuous_deployment_seldon.py")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / "continuous_deployment_seldon.py"))
    assert not bag.import_errors
    dag = bag.dags["continuous_deployment_seldon"]
    assert dag.get_task("promote").upstream_task_ids == {"smoke_predict"}
    assert dag.get_task("rollback_canary").upstream_task_ids == {"wait_canary", "smoke_predict"}


def test_connection_settings_urls_and_test_connection(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.models.connection import Connection

    from airflow_provider_modeldeploy.deployers.seldon import SeldonDeployer
    from airflow_provider_modeldeploy.hooks.seldon import SeldonDeployerHook
    from airflow_provider_modeldeploy.services import ServiceRecord

    def hook(**extra: Any) -> SeldonDeployerHook:
        conn = Connection.from_json(emulator.conn_json(**extra), conn_id="seldon_test")
        return SeldonDeployerHook(conn_id="seldon_test", connection=conn)

    assert hook().test_connection() == (True, "SeldonDeployments readable in namespace models")
    for field, value in [("protocol", "grpc"), ("replicas", 0), ("namespace", "Models"), ("implementation", "X")]:
        with pytest.raises(InvalidParameterError, match=f"^{field}="):
            hook(**{field: value}).get_settings()
    unreachable = hook(kube_config_path=str(emulator.kubeconfig) + ".missing")
    ok, message = unreachable.test_connection()
    assert not ok and message

    deployer = SeldonDeployer(conn_id="seldon_test", hook=hook(protocol="v2"))
    record = ServiceRecord(uuid="u", backend="seldon", endpoint="iris", model_name="iris", model_uri="models:/iris/1")
    base = f"{emulator.url}/seldon/models/iris"
    assert deployer.urls(record) == (f"{base}/v2/models/iris/infer", f"{base}/v2/health/ready")
