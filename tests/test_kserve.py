"""The KServe backend end to end: the real hook and kubernetes client, real MLflow models.

By default against the Kubernetes API *emulator* (tests/k8s_emulator), whose KServe stand-in runs
each predictor with the runtime it names, loading models as that runtime does; with
``MODELDEPLOY_E2E_KUBECONFIG`` the same tests run against a real cluster with KServe in Standard
mode (docker/kind/kserve-e2e.sh; ``MODELDEPLOY_E2E_KSERVE_URL_TEMPLATE`` tells where the
InferenceServices answer from this machine). The tests read the cluster only as a client can.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import IRIS_ROWS
from seldon_env import Cluster, open_cluster

from airflow_provider_modeldeploy.exceptions import DeploymentFailedError, InvalidParameterError
from airflow_provider_modeldeploy.services import Lineage, ServiceConfig, ServiceState

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
#: conftest's iris v1 and v2 classify this flower differently (see test_seldon.py).
PROBE = [8.0, 4.0, 5.9, 0.8]
VERSION_OF_CLASS = {1: "v1", 2: "v2"}
V1_PAYLOAD = {"instances": IRIS_ROWS}


def kserve_conn(cluster: Cluster, **extra: object) -> str:
    """An ``AIRFLOW_CONN_*`` value for a ``modeldeploy_kserve`` connection to this cluster. On the
    emulator the pods are processes of this machine: its connection maps local artifact paths."""
    base: dict[str, Any] = {"kube_config_path": str(cluster.kubeconfig), "namespace": cluster.namespace}
    if cluster.emulated:
        base["local_artifact_map"] = {"/": "file:///"}
    elif os.environ.get("MODELDEPLOY_E2E_KSERVE_URL_TEMPLATE"):
        base["url_template"] = os.environ["MODELDEPLOY_E2E_KSERVE_URL_TEMPLATE"]
    return json.dumps({"conn_type": "modeldeploy_kserve", "extra": {**base, **extra}})


def isvc(cluster: Cluster, name: str) -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return cluster.custom.get_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, name)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def isvc_pods(cluster: Cluster, name: str) -> list[Any]:
    pods = cluster.core.list_namespaced_pod(
        cluster.namespace, label_selector=f"serving.kserve.io/inferenceservice={name}"
    )
    return [p for p in pods.items if p.metadata.deletion_timestamp is None]


def unowned(obj: dict[str, Any]) -> dict[str, Any]:
    """An object as its owner wrote it: metadata and spec, without what the controller writes."""
    meta = {k: v for k, v in obj["metadata"].items() if k not in ("resourceVersion", "managedFields")}
    return {"metadata": meta, "spec": obj["spec"]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with open_cluster(tmp_path_factory.mktemp("k8s-emulator")) as opened:
        yield opened


@pytest.fixture
def kserve(airflow_home: Path, mlflow_models: dict[str, Any], cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Any:
    from airflow_provider_modeldeploy.deployers import get_model_deployer

    monkeypatch.setenv("AIRFLOW_CONN_KSERVE", kserve_conn(cluster))
    return get_model_deployer("kserve")


def version(url: str) -> str:
    """Which iris version answered the v1 prediction URL."""
    answer = httpx.post(url, json={"instances": [PROBE]}, timeout=30)
    assert answer.status_code == 200, answer.text[:500]
    return VERSION_OF_CLASS[answer.json()["predictions"][0]]


def versions(url: str, n: int) -> set[str]:
    return {version(url) for _ in range(n)}


def cfg(uri: str, endpoint: str = "iris", model_name: str = "iris", **options: Any) -> ServiceConfig:
    return ServiceConfig(model_uri=uri, model_name=model_name, endpoint=endpoint, smoke_input=V1_PAYLOAD, **options)


def test_deploy_replace_under_load_stop_start_logs_delete(
    kserve: Any, cluster: Cluster, mlflow_models: dict[str, Any]
) -> None:
    lineage = Lineage(dag_id="d", run_id="r", task_id="t")
    first = kserve.deploy_model(cfg(mlflow_models["iris_v1"]), timeout=cluster.timeout, lineage=lineage)
    assert first.status.state == ServiceState.ACTIVE and first.record.model_version == "1"
    obj = isvc(cluster, "iris")
    base = obj["status"]["url"] if cluster.emulated else first.prediction_url.split("/v1/models/")[0]
    assert (first.prediction_url, first.health_url) == (f"{base}/v1/models/iris:predict", f"{base}/v1/models/iris")
    # The runtime's own protocol: v1 instances in, predictions out.
    answer = httpx.post(first.prediction_url, json=V1_PAYLOAD, timeout=30)
    assert answer.status_code == 200 and answer.json()["predictions"] == [0, 2], answer.text[:300]
    assert version(first.prediction_url) == "v1"
    # The manifest: KServe's sklearn server, fed the joblib export written next to the MLflow model.
    model = obj["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "sklearn"} and model["runtime"] == "kserve-sklearnserver"
    assert model["storageUri"].endswith("/kserve-sklearn") and first.record.served_uri.endswith("/kserve-sklearn")
    labels = obj["metadata"]["labels"]
    assert labels["modeldeploy.airflow.apache.org/service-uuid"] == first.uuid
    assert labels["modeldeploy.airflow.apache.org/managed"] == "true"
    assert obj["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"

    # Replace under load: no request fails, and once the deploy returns the new version is what serves.
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                r = httpx.post(first.prediction_url, json=V1_PAYLOAD, timeout=30)
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:100]}")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

    loader = threading.Thread(target=load)
    loader.start()
    try:
        second = kserve.deploy_model(cfg(mlflow_models["iris_v2"]), timeout=cluster.timeout)
        assert versions(second.prediction_url, 20) == {"v2"}
    finally:
        stop.set()
        loader.join(30)
    assert not failures, failures[:5]
    assert second.prediction_url == first.prediction_url and second.record.model_version == "2"
    assert [s.uuid for s in kserve.find_model_server(endpoint="iris")] == [second.uuid]
    assert kserve.get_history(second.uuid)[0]["action"] == "replace"

    # Logs of the predictor pod (the runtime's own lines).
    lines = list(kserve.get_model_server_logs(second.uuid))
    assert any("Registering model: iris" in line for line in lines), lines[-10:]

    # Stop: KServe's stop annotation; the InferenceService stays, its pods go. Start brings v2 back.
    stopped = kserve.stop_model_server(second.uuid)
    assert stopped.status.state == ServiceState.INACTIVE
    obj = isvc(cluster, "iris")
    assert obj["metadata"]["annotations"]["serving.kserve.io/stop"] == "true"
    cluster.eventually(lambda: not isvc_pods(cluster, "iris"), "the predictor pods are gone")
    stopped_condition = {c["type"]: c["status"] for c in isvc(cluster, "iris")["status"]["conditions"]}
    assert stopped_condition["Stopped"] == "True"
    assert httpx.post(first.prediction_url, json=V1_PAYLOAD, timeout=30).status_code != 200
    started = kserve.start_model_server(second.uuid, timeout=cluster.timeout)
    assert started.status.state == ServiceState.ACTIVE
    assert "serving.kserve.io/stop" not in (isvc(cluster, "iris")["metadata"].get("annotations") or {})
    assert versions(started.prediction_url, 5) == {"v2"}

    # Delete removes the InferenceService.
    kserve.delete_model_server(second.uuid)
    cluster.eventually(lambda: isvc(cluster, "iris") is None, "the InferenceService is deleted")
    assert kserve.find_model_server(endpoint="iris") == []


def test_failed_load_restores_the_previous_object_exactly(
    kserve: Any, cluster: Cluster, mlflow_models: dict[str, Any], tmp_path: Path
) -> None:
    first = kserve.deploy_model(cfg(mlflow_models["iris_v1"], "iris-fail"), timeout=cluster.timeout)
    before = unowned(isvc(cluster, "iris-fail"))

    # A directory the sklearn server accepts by its look (one .joblib file) but cannot load: the pod
    # fails, KServe reports BlockedByFailedLoad, the task fails with its reason, the spec is restored.
    if not cluster.emulated:
        pytest.skip("needs a corrupt model in the cluster's artifact store")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.joblib").write_bytes(b"not a pickle at all")
    with pytest.raises(DeploymentFailedError, match=r"BlockedByFailedLoad: ModelLoadFailed: .*"):
        kserve.deploy_model(cfg(corrupt.as_uri(), "iris-fail"), timeout=cluster.timeout)
    after = unowned(isvc(cluster, "iris-fail"))
    after["metadata"].pop("generation"), before["metadata"].pop("generation")
    assert after == before
    cluster.eventually(lambda: versions(first.prediction_url, 5) == {"v1"}, "v1 still answers")
    [current] = kserve.find_model_server(endpoint="iris-fail")
    assert current.uuid == first.uuid and current.status.state == ServiceState.ACTIVE
    assert kserve.get_history(first.uuid)[0]["outcome"] == "failed"

    # Combinations that cannot load are refused before anything is sent.
    with pytest.raises(InvalidParameterError, match=r"model\.skops.*export_joblib"):
        kserve.deploy_model(cfg(mlflow_models["iris_v2"], "iris-fail", export_joblib=False), timeout=30)
    with pytest.raises(InvalidParameterError, match=r"serves scikit-learn models only.*python_function"):
        kserve.deploy_model(cfg("models:/broken/1", "iris-fail"), timeout=30)
    with pytest.raises(InvalidParameterError, match=r"^protocol='v1': runtime kserve-mlserver .* speaks only v2"):
        kserve.deploy_model(cfg(mlflow_models["iris_v2"], "iris-fail", runtime="mlserver", protocol="v1"))
    assert unowned(isvc(cluster, "iris-fail"))["spec"] == before["spec"]
    kserve.delete_model_server(first.uuid)


def test_skops_directory_fails_under_the_sklearn_runtime(cluster: Cluster, mlflow_models: dict[str, Any]) -> None:
    """The emulator loads as KServe's sklearn server does: an MLflow 3 directory (model.skops) fails."""
    if not cluster.emulated:
        pytest.skip("the emulator's own fidelity")
    from airflow_provider_modeldeploy.kserve import storage

    location, _, _ = storage.resolve(mlflow_models["iris_v1"], mlflow_models["tracking_uri"])
    assert "model.skops" in storage._top_files(location)
    raw = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService", "metadata": {"name": "raw-skops"},
           "spec": {"predictor": {"model": {"modelFormat": {"name": "sklearn"}, "storageUri": location}}}}  # fmt: skip
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, raw)
    deadline = time.monotonic() + 60
    while (isvc(cluster, "raw-skops").get("status", {}).get("modelStatus") or {}).get(
        "transitionStatus"
    ) != "BlockedByFailedLoad":
        assert time.monotonic() < deadline, isvc(cluster, "raw-skops").get("status")
        time.sleep(0.2)
    info = isvc(cluster, "raw-skops")["status"]["modelStatus"]["lastFailureInfo"]
    assert info["reason"] == "ModelLoadFailed" and "ModelMissingError" in info["message"]
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "raw-skops")


def test_unmanaged_objects_are_never_taken_over(
    kserve: Any, cluster: Cluster, mlflow_models: dict[str, Any], airflow_home: Path
) -> None:
    from airflow_provider_modeldeploy.registry import get_registry

    foreign = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService",
               "metadata": {"name": "iris-theirs", "labels": {"team": "fraud"}, "annotations": {"owner": "alice"}},
               "spec": {"predictor": {"model": {"modelFormat": {"name": "sklearn"}, "storageUri": "gs://their/model"}}}}  # fmt: skip
    # One with our labels but another installation's uuid, and no lineage: not ours either.
    lookalike = json.loads(json.dumps(foreign))
    lookalike["metadata"] = {
        "name": "iris-lookalike",
        "labels": {
            "modeldeploy.airflow.apache.org/managed": "true",
            "modeldeploy.airflow.apache.org/service-uuid": "0000-other",
        },
    }
    for body in (foreign, lookalike):
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, body)
    originals = {name: unowned(isvc(cluster, name)) for name in ("iris-theirs", "iris-lookalike")}
    with pytest.raises(
        InvalidParameterError, match=r"InferenceService models/iris-theirs exists .*not created by this provider"
    ):
        kserve.deploy_model(cfg(mlflow_models["iris_v1"], "iris-theirs"), timeout=cluster.timeout)
    with pytest.raises(InvalidParameterError, match=r"iris-lookalike exists .*0000-other is not in the registry"):
        kserve.deploy_model(cfg(mlflow_models["iris_v1"], "iris-lookalike"), timeout=cluster.timeout)
    report = kserve.sync_services()
    assert report.adopted == [] and report.removed == []
    assert get_registry().find_services() == [] and get_registry().list_events("kserve", "iris-theirs", 10) == []
    for name, original in originals.items():
        assert unowned(isvc(cluster, name)) == original, name
    for name in originals:
        cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, name)


def test_bad_names_and_manifests_leave_nothing(kserve: Any, cluster: Cluster, mlflow_models: dict[str, Any]) -> None:
    from kubernetes.client.exceptions import ApiException

    from airflow_provider_modeldeploy.registry import get_registry

    for name in ("Iris_Prod", "9iris", "iris.prod"):
        with pytest.raises(InvalidParameterError, match=r"^endpoint=.*is not a valid InferenceService name"):
            kserve.deploy_model(cfg(mlflow_models["iris_v1"], name))
    with pytest.raises(InvalidParameterError) as info:
        kserve.deploy_model(cfg(mlflow_models["iris_v1"], "iris-bad", resources={"requests": "lots"}))
    assert info.value.field == "spec.predictor.model.resources.requests"
    assert "rejected by the InferenceService CRD schema" in str(info.value) and "'lots'" in str(info.value)
    with pytest.raises(InvalidParameterError, match="canary_traffic_percent=150"):
        kserve.deploy_model(cfg(mlflow_models["iris_v1"], "iris-bad", canary_traffic_percent=150))
    with pytest.raises(InvalidParameterError, match="a canary needs a version serving"):
        kserve.deploy_model(cfg(mlflow_models["iris_v1"], "iris-bad", canary_traffic_percent=10))
    if cluster.emulated:  # the emulator's pods read this machine's disk only through the connection's map
        from airflow_provider_modeldeploy.deployers.kserve import KServeDeployer

        unmapped = KServeDeployer(conn_id="kserve", hook=_hook(cluster, local_artifact_map={}))
        with pytest.raises(InvalidParameterError, match=r"on this machine's disk.*S3, GCS or PVC artifact store"):
            unmapped.deploy_model(cfg(mlflow_models["iris_v1"], "iris-bad"))
    assert get_registry().find_services() == []
    assert isvc(cluster, "iris-bad") is None

    # The cluster itself answers 422 for an object the CRD schema rejects, naming the field.
    bad = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "InferenceService", "metadata": {"name": "raw"},
           "spec": {"predictor": {"minReplicas": "two"}}}  # fmt: skip
    with pytest.raises(ApiException) as raw:
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, bad)
    assert raw.value.status == 422 and "spec.predictor.minReplicas" in raw.value.body


def _hook(cluster: Cluster, **extra: Any) -> Any:
    from airflow.models.connection import Connection

    from airflow_provider_modeldeploy.hooks.kserve import KServeDeployerHook

    conn = Connection.from_json(kserve_conn(cluster, **extra), conn_id="kserve_test")
    return KServeDeployerHook(conn_id="kserve_test", connection=conn)


def test_connection_settings_and_test_connection(cluster: Cluster) -> None:
    assert _hook(cluster).test_connection() == (True, f"InferenceServices readable in namespace {cluster.namespace}")
    for field, value in [("protocol", "grpc"), ("deployment_mode", "Serverless"), ("runtime", "triton"),
                         ("namespace", "Models"), ("replicas", -1), ("url_template", "ftp://x")]:  # fmt: skip
        with pytest.raises(InvalidParameterError, match=f"^{field}="):
            _hook(cluster, **{field: value}).get_settings()
    with pytest.raises(InvalidParameterError, match="speaks only v2"):
        _hook(cluster, runtime="mlserver", protocol="v1").get_settings()
    ok, message = _hook(cluster, kube_config_path=str(cluster.kubeconfig) + ".missing").test_connection()
    assert not ok and message
