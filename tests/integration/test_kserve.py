"""The KServe backend end to end: the real hook and kubernetes client, real MLflow models.

By default against the Kubernetes API *emulator* (tests/integration/k8s_emulator), whose KServe stand-in runs
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
from conftest import IRIS_ROWS, run_airflow
from local_http import HTTP
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
    else:  # docker/kind/kserve-e2e.sh: path routes on the ingress, MinIO's keys through an account
        base["url_template"] = os.environ["MODELDEPLOY_E2E_KSERVE_URL_TEMPLATE"]
        base["service_account"] = os.environ.get("MODELDEPLOY_E2E_KSERVE_SERVICE_ACCOUNT", "")
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
    answer = HTTP.post(url, json={"instances": [PROBE]}, timeout=30)
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
    answer = HTTP.post(first.prediction_url, json=V1_PAYLOAD, timeout=30)
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
                r = HTTP.post(first.prediction_url, json=V1_PAYLOAD, timeout=30)
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
    assert HTTP.post(first.prediction_url, json=V1_PAYLOAD, timeout=30).status_code != 200
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
    # Written where the session's models are (MinIO on a real cluster), through MLflow.
    import mlflow
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    corrupt = f"{mlflow.get_experiment_by_name('tests').artifact_location}/corrupt-{first.uuid[:8]}"
    (tmp_path / "model.joblib").write_bytes(b"not a pickle at all")
    get_artifact_repository(corrupt).log_artifact(str(tmp_path / "model.joblib"))
    failure = (
        r"BlockedByFailedLoad: ModelLoadFailed: .*" if cluster.emulated else "BlockedByFailedLoad|did not roll out"
    )
    with pytest.raises(DeploymentFailedError, match=failure):
        kserve.deploy_model(cfg(corrupt, "iris-fail"), timeout=min(cluster.timeout, 300))
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

    # Ours once, replaced behind our back by someone else's: stop and delete leave theirs alone.
    ours = kserve.deploy_model(cfg(mlflow_models["iris_v1"], "iris-swap"), timeout=cluster.timeout)
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "iris-swap")
    cluster.eventually(lambda: isvc(cluster, "iris-swap") is None, "ours is gone")
    swapped = {**json.loads(json.dumps(foreign)), "metadata": {"name": "iris-swap", "labels": {"team": "fraud"}}}
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, swapped)
    theirs = unowned(isvc(cluster, "iris-swap"))
    kserve.stop_model_server(ours.uuid)
    kserve.delete_model_server(ours.uuid)
    assert unowned(isvc(cluster, "iris-swap")) == theirs
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "iris-swap")


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


def v2_columns(rows: list[list[float]]) -> dict[str, Any]:
    """A v2 request as MLServer's MLflow runtime takes it for a model with a column signature."""
    from conftest import IRIS_COLUMNS

    return {"inputs": [{"name": c, "shape": [len(rows)], "datatype": "FP64", "data": [r[i] for r in rows]}
                       for i, c in enumerate(IRIS_COLUMNS)]}  # fmt: skip


def test_canary_dark_launch_promote_rollback(kserve: Any, cluster: Cluster, mlflow_models: dict[str, Any]) -> None:
    """Standard mode canaries (v0.20 ``spec.canary[]``); the serving predictor is never restarted."""
    first = kserve.deploy_model(cfg(mlflow_models["iris_v1"], "iris-canary"), timeout=cluster.timeout)
    url = first.prediction_url
    main = isvc(cluster, "iris-canary")["spec"]["predictor"]
    main_pods = {p.metadata.name for p in isvc_pods(cluster, "iris-canary")}

    if cluster.emulated:  # a concurrent writer changes the object between our read and our patch: 409, re-applied
        HTTP.post(f"{cluster.emulator_url}/emulator/conflicts", json={"count": 1}, timeout=10).raise_for_status()
    canary = kserve.deploy_model(
        cfg(mlflow_models["iris_v2"], "iris-canary", canary_traffic_percent=50), timeout=cluster.timeout
    )
    obj = isvc(cluster, "iris-canary")
    if cluster.emulated:
        assert "emulator/concurrent-writer" in obj["metadata"]["annotations"]
    assert obj["spec"]["predictor"] == main  # the serving predictor, untouched
    [entry] = obj["spec"]["canary"]
    assert entry["trafficPercent"] == 50 and entry["predictor"]["model"]["storageUri"] != main["model"]["storageUri"]
    assert canary.prediction_url == url and versions(url, 40) == {"v1", "v2"}
    assert kserve.get_history(canary.uuid)[0]["action"] == "canary"
    pods = {p.metadata.name for p in isvc_pods(cluster, "iris-canary")}
    assert main_pods < pods and len(pods) == 2
    logs = list(kserve.get_model_server_logs(canary.uuid, tail=2))
    assert {line[1 : line.index("] ")] for line in logs} == pods

    # Rollback of a canary: the serving predictor alone again, the same pods.
    back = canary.rollback(timeout=cluster.timeout)
    assert back.is_running and back.record.served_uri == first.record.served_uri
    assert back.record.model_version == "1"  # recorded from the history: a storage URI does not say it
    obj = isvc(cluster, "iris-canary")
    assert obj["spec"]["predictor"] == main and "canary" not in obj["spec"]
    cluster.eventually(lambda: {p.metadata.name for p in isvc_pods(cluster, "iris-canary")} == main_pods, "main only")
    assert versions(url, 10) == {"v1"}

    # A dark launch (0 %): its pods run, it gets no traffic; promoted, it takes all, without a restart.
    dark = kserve.deploy_model(
        cfg(mlflow_models["iris_v2"], "iris-canary", canary_traffic_percent=0), timeout=cluster.timeout
    )
    assert isvc(cluster, "iris-canary")["spec"]["canary"][0]["trafficPercent"] == 0
    dark_pods = {p.metadata.name for p in isvc_pods(cluster, "iris-canary")} - main_pods
    assert len(dark_pods) == 1 and versions(url, 20) == {"v1"}
    promoted = dark.promote(timeout=cluster.timeout)
    assert "canary_of" not in promoted.record.config
    obj = isvc(cluster, "iris-canary")
    assert "canary" not in obj["spec"] and obj["spec"]["predictor"]["name"] != main["name"]
    cluster.eventually(
        lambda: {p.metadata.name for p in isvc_pods(cluster, "iris-canary")} == dark_pods, "the canary's pods serve"
    )
    assert versions(url, 10) == {"v2"}
    assert kserve.get_history(dark.uuid)[0]["action"] == "promote"
    with pytest.raises(InvalidParameterError, match="has no canary to promote"):
        promoted.promote()
    kserve.delete_model_server(promoted.uuid)


def test_mlserver_v2_health_sensor_failed_load_and_log_follow(
    airflow_home: Path, mlflow_models: dict[str, Any], cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MLServer runtime: the MLflow directory itself, protocol v2 only, MLServer's shapes."""
    from airflow_provider_modeldeploy.deployers import get_model_deployer
    from airflow_provider_modeldeploy.sensors import ServedModelHealthSensor

    monkeypatch.setenv("AIRFLOW_CONN_KSERVE_V2", kserve_conn(cluster, runtime="mlserver"))
    mls = get_model_deployer("kserve_v2")

    def config(uri: str) -> ServiceConfig:
        return ServiceConfig(model_uri=uri, model_name="iris-mls", smoke_input=v2_columns(IRIS_ROWS))

    first = mls.deploy_model(config(mlflow_models["iris_v1"]), timeout=cluster.timeout)
    base = first.prediction_url.split("/v2/models/")[0]
    assert (first.prediction_url, first.health_url) == (
        f"{base}/v2/models/iris-mls/infer",
        f"{base}/v2/models/iris-mls/ready",
    )
    model = isvc(cluster, "iris-mls")["spec"]["predictor"]["model"]
    assert (model["modelFormat"], model["runtime"], model["protocolVersion"]) == (
        {"name": "mlflow"},
        "kserve-mlserver",
        "v2",
    )
    assert not model["storageUri"].endswith("kserve-sklearn")
    sensor = ServedModelHealthSensor(task_id="wait", model_name="iris-mls", sample_input=v2_columns(IRIS_ROWS))
    assert sensor.poke({}) is True
    answer = HTTP.post(first.prediction_url, json=v2_columns([PROBE]), timeout=30).json()
    assert answer["model_name"] == "iris-mls" and VERSION_OF_CLASS[answer["outputs"][0]["data"][0]] == "v1"
    # MLServer names the registered version in its answers: the deploy waits until it is the new one.
    assert model["env"] == [{"name": "MLSERVER_MODEL_VERSION", "value": "1"}] and answer["model_version"] == "1"
    assert HTTP.post(f"{base}/v1/models/iris-mls:predict", json=V1_PAYLOAD, timeout=30).status_code == 404

    # Following the log streams new lines as they come.
    following = mls.get_model_server_logs(first.uuid, tail=1, follow=True)
    next(following)
    if cluster.emulated:
        HTTP.post(first.prediction_url, json=v2_columns(IRIS_ROWS), timeout=30)
        while "POST /v2/models/iris-mls/infer" not in next(following):
            pass
    following.close()

    second = mls.deploy_model(config(mlflow_models["iris_v2"]), timeout=cluster.timeout)
    answer = HTTP.post(first.prediction_url, json=v2_columns([PROBE]), timeout=30).json()
    assert answer["model_version"] == "2" and VERSION_OF_CLASS[answer["outputs"][0]["data"][0]] == "v2"

    # A model MLServer cannot load: KServe's reason, the previous spec restored, v2 keeps serving.
    before = unowned(isvc(cluster, "iris-mls"))
    failure = (
        r"BlockedByFailedLoad: ModelLoadFailed: .*model weights are corrupted"
        if cluster.emulated
        else "did not roll out"
    )
    with pytest.raises(DeploymentFailedError, match=failure):
        mls.deploy_model(config("models:/broken/1"), timeout=min(cluster.timeout, 300))
    after = unowned(isvc(cluster, "iris-mls"))
    after["metadata"].pop("generation"), before["metadata"].pop("generation")
    assert after == before
    [current] = mls.find_model_server(endpoint="iris-mls")
    assert current.uuid == second.uuid and current.status.state == ServiceState.ACTIVE
    assert sensor.poke({}) is True
    mls.delete_model_server(second.uuid)


def test_secrets_never_leak_cli_sync_and_cleanup(
    airflow_home: Path, mlflow_models: dict[str, Any], cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubernetes import client

    from airflow_provider_modeldeploy.deployers import get_model_deployer
    from airflow_provider_modeldeploy.registry import get_registry

    storage = cluster.storage
    minio = {"conn_type": "aws", "login": storage.access_key, "password": storage.secret_key,
             "extra": {"endpoint_url": storage.endpoint}}  # fmt: skip
    env = {"AIRFLOW_CONN_KSERVE": kserve_conn(cluster, storage_conn_id="minio", storage_secret="md-e2e-storage", service_account=""),
           "AIRFLOW_CONN_MINIO": json.dumps(minio)}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    kserve = get_model_deployer("kserve")

    # A Secret of that name which is not ours is neither used nor changed.
    theirs = client.V1Secret(metadata=client.V1ObjectMeta(name="md-e2e-storage"), string_data={"k": "v"})
    cluster.core.create_namespaced_secret(cluster.namespace, theirs)
    with pytest.raises(InvalidParameterError, match=r"^storage_secret='md-e2e-storage': a Secret of this name exists"):
        kserve.deploy_model(cfg(mlflow_models["iris_v1"], "iris-sec"), timeout=cluster.timeout)
    assert cluster.secret("md-e2e-storage") == {"labels": {}, "values": {"k": "v"}}
    assert isvc(cluster, "iris-sec") is None
    cluster.core.delete_namespaced_secret("md-e2e-storage", cluster.namespace)

    lineage = Lineage(dag_id="ct_dag", run_id="run-1", task_id="deploy")
    first = kserve.deploy_model(cfg(mlflow_models["iris_v1"], "iris-sec"), timeout=cluster.timeout, lineage=lineage)
    other = kserve.deploy_model(cfg(mlflow_models["iris_v2"], "iris-sec2"), timeout=cluster.timeout)
    # The KServe way: the keys in a Secret with the s3 annotations, listed by a ServiceAccount the predictor names.
    secret = cluster.core.read_namespaced_secret("md-e2e-storage", cluster.namespace)
    assert secret.metadata.annotations["serving.kserve.io/s3-endpoint"] == "minio.emulated:9000"
    assert cluster.secret("md-e2e-storage")["values"]["AWS_SECRET_ACCESS_KEY"] == storage.secret_key
    account = cluster.core.read_namespaced_service_account("modeldeploy-storage", cluster.namespace)
    assert [s.name for s in account.secrets] == ["md-e2e-storage"]
    assert isvc(cluster, "iris-sec")["spec"]["predictor"]["serviceAccountName"] == "modeldeploy-storage"

    outputs = []
    for args in (("served-models", "list", "-o", "json"), ("served-models", "describe", first.uuid, "-o", "json")):
        done = run_airflow(airflow_home, *args, timeout=300, **env)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(done.stdout + done.stderr)
    rows = {r["uuid"]: r for r in json.loads(outputs[0])}
    assert set(rows) == {first.uuid, other.uuid} and {r["backend"] for r in rows.values()} == {"kserve"}

    registry_db = airflow_home / "modeldeploy" / "registry.db"
    texts = [*outputs, registry_db.read_bytes().decode(errors="replace"), json.dumps(isvc(cluster, "iris-sec")),
             "\n".join(kserve.get_model_server_logs(first.uuid))]  # fmt: skip
    for text in texts:
        assert storage.secret_key not in text and storage.access_key not in text

    # The registry is lost: sync rebuilds it from the labels and the lineage annotation.
    get_registry().dispose()
    registry_db.unlink()
    done = run_airflow(airflow_home, "served-models", "sync", "--conn-id", "kserve", "-o", "json", timeout=300, **env)
    assert done.returncode == 0, done.stderr[-3000:]
    [report] = [r for r in json.loads(done.stdout) if r["backend"] == "kserve"]
    assert sorted(report["adopted"]) == sorted([first.uuid, other.uuid])
    for text in (done.stdout, done.stderr):
        assert storage.secret_key not in text
    kserve = get_model_deployer("kserve")
    [restored] = kserve.find_model_server(endpoint="iris-sec")
    assert (restored.record.dag_id, restored.record.task_id, restored.record.model_version) == ("ct_dag", "deploy", "1")
    assert restored.prediction_url == first.prediction_url and restored.is_running

    # Our Secret and ServiceAccount go with the last InferenceService that uses them.
    kserve.delete_model_server(first.uuid)
    assert isvc(cluster, "iris-sec") is None and cluster.secret("md-e2e-storage") is not None
    kserve.delete_model_server(other.uuid)
    assert cluster.secret("md-e2e-storage") is None


def test_render_prints_the_validated_manifest_and_sends_nothing(
    airflow_home: Path, mlflow_models: dict[str, Any], cluster: Cluster
) -> None:
    import yaml

    from airflow_provider_modeldeploy.registry import get_registry

    env = {"AIRFLOW_CONN_KSERVE": kserve_conn(cluster)}
    done = run_airflow(
        airflow_home, "served-models", "render", mlflow_models["iris_v1"], "--model-name", "iris-render",
        "--conn-id", "kserve", "--option", "replicas=2", timeout=300, **env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = yaml.safe_load(done.stdout)
    assert (manifest["kind"], manifest["metadata"]["name"]) == ("InferenceService", "iris-render")
    predictor = manifest["spec"]["predictor"]
    assert predictor["minReplicas"] == 2 and predictor["model"]["storageUri"].endswith("/kserve-sklearn")
    assert (
        json.loads(manifest["metadata"]["annotations"]["modeldeploy.airflow.apache.org/lineage"])["model_version"]
        == "1"
    )
    assert isvc(cluster, "iris-render") is None and get_registry().find_services() == []

    bad = run_airflow(
        airflow_home, "served-models", "render", mlflow_models["iris_v1"], "--model-name", "iris-render",
        "--conn-id", "kserve", "--option", 'resources={"requests": "lots"}', timeout=300, **env,
    )  # fmt: skip
    assert bad.returncode == 1 and "spec.predictor.model.resources.requests" in bad.stderr, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr


def test_knative_mode_revisions_and_canary(
    airflow_home: Path, mlflow_models: dict[str, Any], cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Knative mode: the deploy waits for latestReadyRevision == latestCreatedRevision; a canary is
    ``canaryTrafficPercent`` (the previous ready revision keeps the rest), promoted by removing it."""
    if not cluster.emulated:
        pytest.skip("docker/kind runs KServe in Standard mode")
    from airflow_provider_modeldeploy.deployers import get_model_deployer

    monkeypatch.setenv("AIRFLOW_CONN_KSERVE_KN", kserve_conn(cluster, deployment_mode="Knative"))
    kn = get_model_deployer("kserve_kn")
    first = kn.deploy_model(cfg(mlflow_models["iris_v1"], "iris-kn"), timeout=cluster.timeout)
    obj = isvc(cluster, "iris-kn")
    assert obj["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    predictor = obj["status"]["components"]["predictor"]
    assert predictor["latestReadyRevision"] == predictor["latestCreatedRevision"] == "iris-kn-predictor-00001"
    with pytest.raises(InvalidParameterError, match="canary_traffic_percent=0: must be between 1 and 99"):
        kn.deploy_model(cfg(mlflow_models["iris_v2"], "iris-kn", canary_traffic_percent=0))

    canary = kn.deploy_model(
        cfg(mlflow_models["iris_v2"], "iris-kn", canary_traffic_percent=30), timeout=cluster.timeout
    )
    obj = isvc(cluster, "iris-kn")
    assert obj["spec"]["predictor"]["canaryTrafficPercent"] == 30 and "canary" not in obj["spec"]
    assert obj["status"]["components"]["predictor"]["latestReadyRevision"] == "iris-kn-predictor-00002"
    assert versions(first.prediction_url, 40) == {"v1", "v2"}
    promoted = canary.promote(timeout=cluster.timeout)
    assert "canaryTrafficPercent" not in isvc(cluster, "iris-kn")["spec"]["predictor"]
    cluster.eventually(lambda: versions(first.prediction_url, 10) == {"v2"}, "only v2 answers")
    kn.delete_model_server(promoted.uuid)


def test_knative_scale_from_zero_warm_up_503s_are_not_failures(
    airflow_home: Path, mlflow_models: dict[str, Any], cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``minReplicas: 0`` in Knative mode: an idle revision has no pods, and the first requests get
    503s while one starts and loads the model. The sensor and its trigger wait through them within
    their timeout; a timeout shorter than the warm-up ends as timed out, naming what it saw."""
    if not cluster.emulated:
        pytest.skip("docker/kind runs KServe in Standard mode (no Knative autoscaler)")
    import asyncio

    from airflow_provider_modeldeploy.deployers import get_model_deployer
    from airflow_provider_modeldeploy.sensors import ServedModelHealthSensor
    from airflow_provider_modeldeploy.triggers.health import HealthOutcome, ServedModelHealthTrigger

    monkeypatch.setenv("AIRFLOW_CONN_KSERVE_ZERO", kserve_conn(cluster, deployment_mode="Knative", replicas=0))
    kz = get_model_deployer("kserve_zero")
    served = kz.deploy_model(cfg(mlflow_models["iris_v1"], "iris-zero"), timeout=cluster.timeout)
    assert isvc(cluster, "iris-zero")["spec"]["predictor"]["minReplicas"] == 0

    def scale_to_zero() -> None:
        idle = HTTP.post(f"{cluster.emulator_url}/emulator/scale-to-zero",
                          json={"namespace": cluster.namespace, "name": "iris-zero"}, timeout=30)  # fmt: skip
        assert idle.status_code == 200, idle.text
        assert isvc_pods(cluster, "iris-zero") == []
        ready = {c["type"]: c["status"] for c in isvc(cluster, "iris-zero")["status"]["conditions"]}
        assert ready["Ready"] == "True"  # Knative: a revision scaled to zero is still Ready

    def first_event(timeout: float) -> dict[str, Any]:
        trigger = ServedModelHealthTrigger(served.uuid, served.health_url, served.prediction_url, V1_PAYLOAD,
                                           poll_interval=0.1, timeout=timeout)  # fmt: skip

        async def run() -> dict[str, Any]:
            async for event in trigger.run():
                return event.payload
            raise AssertionError("the trigger ended without an event")

        return asyncio.run(run())

    # The first request after idling starts a pod: with no time to wait, the trigger times out on the 503.
    scale_to_zero()
    event = first_event(timeout=0)
    assert event["status"] == HealthOutcome.TIMED_OUT and "health answered HTTP 503" in event["message"], event
    scale_to_zero()
    assert first_event(timeout=cluster.timeout)["status"] == HealthOutcome.HEALTHY

    # The sensor in poke mode: a 503 is "not yet", never a failure.
    scale_to_zero()
    sensor = ServedModelHealthSensor(task_id="wait", service_uuid=served.uuid, sample_input=V1_PAYLOAD)
    assert sensor.poke({}) is False
    deadline = time.monotonic() + cluster.timeout
    while not sensor.poke({}):
        assert time.monotonic() < deadline, "the predictor never came back from zero"
        time.sleep(0.2)
    answer = HTTP.post(served.prediction_url, json={"instances": [PROBE]}, timeout=30).json()
    assert VERSION_OF_CLASS[answer["predictions"][0]] == "v1"

    # Where KServe keeps pods (minReplicas 1), the emulated autoscaler refuses to scale to zero.
    kz.delete_model_server(served.uuid)
    monkeypatch.setenv("AIRFLOW_CONN_KSERVE_ONE", kserve_conn(cluster, deployment_mode="Knative"))
    one = get_model_deployer("kserve_one").deploy_model(
        cfg(mlflow_models["iris_v1"], "iris-one"), timeout=cluster.timeout
    )
    refused = HTTP.post(f"{cluster.emulator_url}/emulator/scale-to-zero",
                         json={"namespace": cluster.namespace, "name": "iris-one"}, timeout=30)  # fmt: skip
    assert refused.status_code == 409 and len(isvc_pods(cluster, "iris-one")) == 1
    get_model_deployer("kserve_one").delete_model_server(one.uuid)


def test_example_dag_parses_without_backend_imports() -> None:
    """The example DAG loads (no kubernetes/mlflow import at parse time) and wires the canary loop."""
    import subprocess
    import sys

    from conftest import ROOT

    path = ROOT / "dags" / "continuous_deployment_kserve.py"
    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]);"
        "heavy = [m for m in ('kubernetes', 'mlflow', 'sklearn') if m in sys.modules]; print(heavy)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(path))
    assert not bag.import_errors
    dag = bag.dags["continuous_deployment_kserve"]
    assert dag.get_task("deploy_canary").conn_id == "modeldeploy_kserve"
    assert dag.get_task("promote").upstream_task_ids == {"smoke_predict"}
    assert dag.get_task("rollback_canary").upstream_task_ids == {"wait_canary", "smoke_predict"}


def test_knative_metrics_from_a_real_prometheus(
    airflow_home: Path, mlflow_models: dict[str, Any], cluster: Cluster, prometheus: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A real Prometheus scrapes the predictor pod's Knative queue-proxy (revision_app_request_count
    and revision_app_request_latencies in milliseconds, as knative-v1.18 exports them) through a
    PodMonitor's relabelling; the deployer's metrics must count exactly what the pod answered: 60
    requests sent, 5 answered 400 and 3 answered 500, on top of the deploy's own health checks and
    smoke prediction (the queue-proxy counts every request, whatever its route)."""
    if not cluster.emulated:
        pytest.skip("docker/kind runs KServe in Standard mode (no queue-proxy)")
    from prometheus_env import after_a_scrape, send

    from airflow_provider_modeldeploy.deployers import get_model_deployer

    prometheus.watch(cluster)
    conn = kserve_conn(cluster, deployment_mode="Knative", prometheus_url=prometheus.url)
    monkeypatch.setenv("AIRFLOW_CONN_KSERVE_PROM", conn)
    kn = get_model_deployer("kserve_prom")
    served = kn.deploy_model(cfg(mlflow_models["iris_v1"], "iris-prom"), timeout=cluster.timeout)
    [pod] = isvc_pods(cluster, "iris-prom")
    job = f'job="monitoring/knative-queue-proxy",pod="{pod.metadata.name}"'

    def answered(name: str = pod.metadata.name) -> int:
        """The requests a pod's runtime answered (its access log, one line each)."""
        log = cluster.core.read_namespaced_pod_log(name, cluster.namespace, container="kserve-container")
        return log.count(' HTTP/1.1" ')

    before = after_a_scrape(prometheus, job, lambda: kn.metrics(served.uuid, "1h"))
    assert before.available and before.source == "prometheus", before.reason
    assert before.summary.requests == answered() >= 2, before.summary  # health check(s) and smoke prediction

    bad, failing = {"instances": "not a list"}, {"instances": [[1.0, 2.0]]}
    bodies = [bad if i % 12 == 5 else failing if i % 20 == 11 else V1_PAYLOAD for i in range(60)]
    traffic = send(served.prediction_url, bodies)
    assert (traffic.statuses.count(200), traffic.statuses.count(400), traffic.statuses.count(500)) == (52, 5, 3)
    after = after_a_scrape(prometheus, job, lambda: kn.metrics(served.uuid, "1h"))

    # The queue-proxy's labels and the PodMonitor's, as a kube-prometheus set-up has them.
    [series] = prometheus.query(f'revision_app_request_count{{{job},response_code="500"}}')
    assert series["metric"] == {
        "__name__": "revision_app_request_count", "response_code": "500", "response_code_class": "5xx",
        "namespace_name": cluster.namespace, "service_name": "iris-prom-predictor",
        "configuration_name": "iris-prom-predictor", "revision_name": "iris-prom-predictor-00001",
        "pod_name": pod.metadata.name, "container_name": "queue-proxy", "namespace": cluster.namespace,
        "pod": pod.metadata.name, "container": "queue-proxy", "endpoint": "http-usermetric",
        "job": "monitoring/knative-queue-proxy", "instance": series["metric"]["instance"],
    } and series["value"][1] == "3"  # fmt: skip
    summary = after.summary
    assert summary.requests - before.summary.requests == 60, (before.summary, summary)
    assert summary.errors - before.summary.errors == 8, (before.summary, summary)
    assert summary.error_rate == pytest.approx(summary.errors / summary.requests)
    day = kn.metrics(served.uuid, "1d")  # 15-minute steps: the same figures
    assert (day.step_seconds, day.summary.requests, day.summary.errors) == (900, summary.requests, summary.errors)
    [version] = after.versions  # one Knative revision
    assert (version.model_version, version.role) == ("iris-prom-predictor-00001", "main")
    points = version.points
    assert sum(p.requests for p in points) == summary.requests == answered()
    assert (sum(p.client_errors for p in points), sum(p.server_errors for p in points)) == (5, 3)
    # Latency from the queue-proxy's buckets, in milliseconds: the quantiles are Prometheus' own
    # histogram_quantile of the pod's buckets (the pod is this window's only one), and the median
    # lies within the bucket holding the slowest answer the test saw.
    for q, value in ((0.5, summary.p50_ms), (0.95, summary.p95_ms), (0.99, summary.p99_ms)):
        [own] = prometheus.query(
            f"histogram_quantile({q}, sum by (le) (revision_app_request_latencies_bucket{{{job}}}))"
        )
        assert value == pytest.approx(float(own["value"][1]), abs=0.001), (q, summary)
    bound = next(b for b in (5, 10, 20, 40, 60, 80, 100, 150, 200, 250, 300, 350, 400, 450, 500, 600, 700, 800,
                             900, 1000, 2000, 5000, 10000) if b >= traffic.slowest * 1000)  # fmt: skip
    assert 0 < summary.p50_ms <= bound, (summary, traffic.slowest)

    # A canary (30 %) beside main: a series per Knative revision, its role from the InferenceService's
    # traffic split, each counting exactly what its own pod answered.
    canary = kn.deploy_model(
        cfg(mlflow_models["iris_v2"], "iris-prom", canary_traffic_percent=30), timeout=cluster.timeout
    )
    pods = {p.metadata.labels["serving.knative.dev/revision"]: p.metadata.name for p in isvc_pods(cluster, "iris-prom")}
    assert sorted(pods) == ["iris-prom-predictor-00001", "iris-prom-predictor-00002"], pods
    assert send(served.prediction_url, [V1_PAYLOAD] * 40).statuses == [200] * 40
    both = f'job="monitoring/knative-queue-proxy",pod=~"{"|".join(pods.values())}"'
    # One InferenceService: the canary's service now stands for the endpoint (see the canary test).
    split = after_a_scrape(prometheus, both, lambda: kn.metrics(canary.uuid, "1h"), targets=len(pods))
    roles = {v.model_version: v.role for v in split.versions}
    assert roles == {"iris-prom-predictor-00001": "main", "iris-prom-predictor-00002": "canary"}, roles
    counted = {v.model_version: sum(p.requests for p in v.points) for v in split.versions}
    assert counted == {revision: answered(name) for revision, name in pods.items()}
    assert counted["iris-prom-predictor-00002"] > 2, counted  # more than its own health check and smoke test
    kn.delete_model_server(canary.uuid)
