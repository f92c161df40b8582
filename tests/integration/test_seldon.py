"""The Seldon Core backend end to end: the real hook and kubernetes client, real MLflow models.

By default against the Kubernetes API *emulator* (tests/integration/k8s_emulator), whose Seldon stand-in serves
the models with real model-server processes; with ``MODELDEPLOY_E2E_KUBECONFIG`` the same tests run
against a real cluster with Seldon Core (docker/kind/run-e2e.sh, see tests/integration/seldon_env.py). The tests
read the cluster only as a client can: the kubernetes API and the prediction URLs.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import IRIS_COLUMNS, IRIS_ROWS, ROOT, airflow_env, migrated_airflow_db, run_airflow
from local_http import HTTP
from seldon_env import RACE_ANNOTATION, Cluster, open_cluster

from airflow_provider_modeldeploy.exceptions import DeploymentFailedError, InvalidParameterError
from airflow_provider_modeldeploy.services import Lineage, ServiceConfig, ServiceState

SELDON_PAYLOAD = {"data": {"names": IRIS_COLUMNS, "ndarray": IRIS_ROWS}}
#: conftest's iris v1 (C=1.0) and v2 (C=0.05, strongly regularised) classify this flower
#: differently, each with a wide margin (0.5 and 0.4 in probability): the class a prediction URL
#: answers for it names the version that served the request.
PROBE = [8.0, 4.0, 5.9, 0.8]
VERSION_OF_CLASS = {1: "v1", 2: "v2"}


def v2_payload(rows: list[list[float]]) -> dict[str, Any]:
    """A V2 inference request as MLServer's MLflow runtime takes it for a model whose signature
    names columns: one FP64 tensor per column."""
    return {
        "inputs": [
            {"name": column, "shape": [len(rows)], "datatype": "FP64", "data": [row[i] for row in rows]}
            for i, column in enumerate(IRIS_COLUMNS)
        ]
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with open_cluster(tmp_path_factory.mktemp("k8s-emulator")) as opened:
        yield opened


@pytest.fixture
def seldon(airflow_home: Path, mlflow_models: dict[str, Any], cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Any:
    from airflow_provider_modeldeploy.deployers import get_model_deployer

    monkeypatch.setenv("AIRFLOW_CONN_SELDON", cluster.conn_json())
    return get_model_deployer("seldon")


def predict(url: str) -> httpx.Response:
    return HTTP.post(url, json=SELDON_PAYLOAD, timeout=30)


def version(url: str) -> str:
    """Which iris version answered the Seldon-protocol prediction URL."""
    answer = HTTP.post(url, json={"data": {"names": IRIS_COLUMNS, "ndarray": [PROBE]}}, timeout=30)
    assert answer.status_code == 200, answer.text[:500]
    return VERSION_OF_CLASS[answer.json()["data"]["ndarray"][0]]


def versions(url: str, n: int) -> set[str]:
    return {version(url) for _ in range(n)}


def cfg(uri: str, endpoint: str = "iris", model_name: str = "iris", **options: Any) -> ServiceConfig:
    return ServiceConfig(model_uri=uri, model_name=model_name, endpoint=endpoint, smoke_input=SELDON_PAYLOAD, **options)


def predictors(cluster: Cluster, name: str) -> list[tuple[str, int, str]]:
    """(name, traffic, modelUri) of each predictor of the SeldonDeployment."""
    obj = cluster.sdep(name)
    assert obj is not None, f"no SeldonDeployment {name}"
    return [(p["name"], p["traffic"], p["graph"]["modelUri"]) for p in obj["spec"]["predictors"]]


def wait_for(check: Callable[[], Any], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_deploy_replace_stop_start_delete(seldon: Any, cluster: Cluster, mlflow_models: dict[str, Any]) -> None:
    first = seldon.deploy_model(
        cfg(mlflow_models["iris_v1"]), timeout=cluster.timeout, lineage=Lineage(dag_id="d", run_id="r", task_id="t")
    )
    assert first.status.state == ServiceState.ACTIVE and first.record.model_version == "1"
    url = first.prediction_url
    base = f"{cluster.ingress}/seldon/{cluster.namespace}/iris"
    assert (url, first.health_url) == (f"{base}/api/v1.0/predictions", f"{base}/api/v1.0/health/status")
    answer = predict(url)
    assert answer.status_code == 200 and len(answer.json()["data"]["ndarray"]) == 2
    assert HTTP.get(first.health_url, timeout=30).status_code == 200
    assert version(url) == "v1"
    obj = cluster.sdep("iris")
    labels = obj["metadata"]["labels"]
    assert labels["modeldeploy.airflow.apache.org/service-uuid"] == first.uuid
    assert labels["modeldeploy.airflow.apache.org/dag-id"] == "d"
    lineage = json.loads(obj["metadata"]["annotations"]["modeldeploy.airflow.apache.org/lineage"])
    assert (lineage["run_id"], lineage["task_id"], lineage["model_version"]) == ("r", "t", "1")
    assert obj["metadata"]["generation"] == 1
    uid = obj["metadata"]["uid"]
    [pod] = cluster.pods("iris")  # one replica
    assert pod.metadata.name.startswith("iris-main-")

    # Replace patches the same SeldonDeployment: same URL, new version, one service in the registry.
    # Seldon keeps saying Available through the rolling update: the deploy returns only once v2's
    # pods serve, so v2 answers from then on.
    second = seldon.deploy_model(cfg(mlflow_models["iris_v2"]), timeout=cluster.timeout)
    assert second.prediction_url == url and second.record.model_version == "2"
    cluster.eventually(lambda: versions(url, 10) == {"v2"}, "only v2 answers once the replace returned")
    obj = cluster.sdep("iris")
    assert obj["metadata"]["generation"] == 2 and obj["metadata"]["uid"] == uid
    assert [s.uuid for s in seldon.find_model_server(endpoint="iris")] == [second.uuid]
    # One model pod: its container's log as the cluster has it, lines unprefixed.
    [pod] = cluster.pods("iris")

    def same_log() -> bool:
        direct = cluster.core.read_namespaced_pod_log(pod.metadata.name, cluster.namespace, container="model")
        return list(seldon.get_model_server_logs(second.uuid, tail=50)) == direct.splitlines()[-50:]

    assert cluster.core.read_namespaced_pod_log(pod.metadata.name, cluster.namespace, container="model")
    cluster.eventually(same_log, "the service's log is its model container's")

    # Stop scales to zero (the pods go, the URL stops answering), start restores the replicas.
    stopped = second.stop()
    assert stopped.status.state == ServiceState.INACTIVE
    assert [p["replicas"] for p in cluster.sdep("iris")["spec"]["predictors"]] == [0]
    wait_for(lambda: not cluster.pods("iris"), cluster.timeout)
    wait_for(lambda: predict(url).status_code == 503, max(cluster.settle, 30))
    started = second.start(timeout=cluster.timeout)
    assert started.is_running and predict(url).status_code == 200 and version(url) == "v2"
    assert [p["replicas"] for p in cluster.sdep("iris")["spec"]["predictors"]] == [1]

    second.delete()
    cluster.eventually(lambda: cluster.sdep("iris") is None, "the SeldonDeployment is deleted")
    assert seldon.find_model_server(endpoint="iris") == []


def test_canary_conflict_rollback_promote_failure(seldon: Any, cluster: Cluster, mlflow_models: dict[str, Any]) -> None:
    first = seldon.deploy_model(cfg(mlflow_models["iris_v1"], "iris-canary"), timeout=cluster.timeout)
    url, v1 = first.prediction_url, first.record.served_uri

    # A concurrent writer changes the object between our read and our patch: 409, re-read, re-apply.
    with cluster.lose_write_race(seldon, "iris-canary") as race:
        canary = seldon.deploy_model(
            cfg(mlflow_models["iris_v2"], "iris-canary", canary_traffic_percent=50), timeout=cluster.timeout
        )
    assert race.statuses[0] == 409 and race.statuses[-1] == 200, race.statuses
    v2 = canary.record.served_uri
    assert race.annotation in cluster.sdep("iris-canary")["metadata"]["annotations"]
    assert predictors(cluster, "iris-canary") == [("main", 50, v1), ("canary", 50, v2)]
    assert canary.status.state == ServiceState.ACTIVE and canary.prediction_url == url
    assert versions(url, 40) == {"v1", "v2"}
    assert seldon.get_history(canary.uuid)[0]["action"] == "canary"

    # Two model pods now: each log line names its pod; following streams both, until we stop.
    pods = {p.metadata.name for p in cluster.pods("iris-canary")}
    assert len(pods) == 2
    logs = list(seldon.get_model_server_logs(canary.uuid, tail=3))
    assert {line[1 : line.index("] ")] for line in logs} == pods
    following = seldon.get_model_server_logs(canary.uuid, tail=1, follow=True)
    assert {next(following)[1:].split("] ")[0] for _ in pods} == pods
    following.close()

    # Rollback of a canary: main (v1) alone again, without restarting it.
    back = canary.rollback(timeout=cluster.timeout)
    assert back.record.served_uri == v1 and back.is_running
    assert [name for name, _, _ in predictors(cluster, "iris-canary")] == ["main"]
    cluster.eventually(lambda: versions(url, 10) == {"v1"}, "only v1 answers after the rollback")

    # Canary again (this time a second kubernetes client wins the race), then promote: v2 takes all.
    with cluster.lose_write_race(seldon, "iris-canary", emulator_control=False) as race:
        again = seldon.deploy_model(
            cfg(mlflow_models["iris_v2"], "iris-canary", canary_traffic_percent=30), timeout=cluster.timeout
        )
    assert race.statuses[0] == 409 and race.statuses[-1] == 200, race.statuses
    assert RACE_ANNOTATION in cluster.sdep("iris-canary")["metadata"]["annotations"]
    promoted = again.promote(timeout=cluster.timeout)
    assert "canary_of" not in promoted.record.config
    assert predictors(cluster, "iris-canary") == [("main", 100, v2)]
    cluster.eventually(lambda: versions(url, 10) == {"v2"}, "only v2 answers after the promotion")
    assert seldon.get_history(again.uuid)[0]["action"] == "promote"
    with pytest.raises(InvalidParameterError, match="has no canary to promote"):
        promoted.promote()

    # A model that cannot load: the deploy fails, the spec is restored, v2 keeps serving. The
    # emulator reports Failed with the model server's error at once; a real Seldon Core 1 only after
    # the Deployment's progress deadline (10 min), so there the rollout times out first.
    # A real Seldon Core 1 keeps saying Available while the previous pods serve (and Failed only
    # after the progress deadline for a first deployment): the provider fails the rollout on the
    # new pod's crash loop, with its last log lines (on a real cluster, once the kubelet backs off).
    failure = r"model pod iris-canary-main-0-model-\S+: container model CrashLoopBackOff.*model weights are corrupted"
    failure = failure if cluster.emulated else f"{failure}|did not roll out"
    with pytest.raises(DeploymentFailedError, match=failure):
        seldon.deploy_model(cfg("models:/broken/1", "iris-canary"), timeout=min(cluster.timeout, 300))
    assert predictors(cluster, "iris-canary") == [("main", 100, v2)]
    cluster.eventually(lambda: versions(url, 5) == {"v2"}, "v2 still answers after the failed rollout")
    current = seldon.find_model_server(endpoint="iris-canary")
    assert [s.uuid for s in current] == [again.uuid] and current[0].status.state == ServiceState.ACTIVE


def test_replicas_two_pods_serve_log_roll_and_go(seldon: Any, cluster: Cluster, mlflow_models: dict[str, Any]) -> None:
    """``replicas: 2``: two ready model pods (Seldon's labels, the same model), the requests spread
    over both, logs from both prefixed by pod, a replace that rolls both, a delete that leaves none."""
    name = "iris-pair"
    first = seldon.deploy_model(cfg(mlflow_models["iris_v1"], name, replicas=2), timeout=cluster.timeout)
    url = first.prediction_url
    pods = cluster.pods(name)
    assert len(pods) == 2 and len({p.metadata.name for p in pods}) == 2
    for pod in pods:
        assert pod.metadata.labels["seldon-deployment-id"] == name
        assert pod.metadata.labels["seldon-app"] == f"{name}-main"
        assert any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions)
        [initializer] = [c for c in pod.spec.init_containers if c.name == "model-model-initializer"]
        assert initializer.args[0] == first.record.served_uri  # the same model in both
    assert [p["replicas"] for p in cluster.sdep(name)["spec"]["predictors"]] == [2]

    def counted() -> bool:
        status = cluster.sdep(name).get("status") or {}
        deployment = status.get("deploymentStatus", {}).get(f"{name}-main-0-model", {})
        return (status.get("state"), status.get("replicas"), deployment.get("replicas"),
                deployment.get("availableReplicas")) == ("Available", 2, 2, 2)  # fmt: skip

    cluster.eventually(counted, "Seldon counts 2 replicas, 2 available")

    # The answer and the health route have Seldon's shapes (tests/fixtures/seldon: the python
    # wrapper's construct_response_json behind the executor; checkReady answers without a body).
    fixture = json.loads((ROOT / "tests" / "fixtures" / "seldon" / "seldon_prediction_ndarray.json").read_text())
    answer = predict(url)
    assert answer.status_code == 200 and answer.headers.get("seldon-puid")
    assert set(answer.json()) == set(fixture) and set(answer.json()["data"]) == set(fixture["data"])
    assert answer.json()["data"]["names"] == [] and list(answer.json()["meta"]["requestPath"]) == ["model"]
    health = HTTP.get(first.health_url, timeout=30)
    assert (health.status_code, health.content) == (200, b"")

    # Both pods answer: the requests spread over the replicas (each pod's log has its requests,
    # as the emulated model container logs them; Seldon's servers keep no access log by default).
    assert versions(url, 10) == {"v1"}
    if cluster.emulated:
        for pod in pods:
            text = cluster.core.read_namespaced_pod_log(pod.metadata.name, cluster.namespace, container="model")
            assert '"POST /api/v1.0/predictions HTTP/1.1" 200' in text, pod.metadata.name
    logs = list(seldon.get_model_server_logs(first.uuid, tail=5))
    assert {line[1 : line.index("] ")] for line in logs} == {p.metadata.name for p in pods}

    # A replace rolls both replicas: two new pods serve v2, the old ones are gone.
    second = seldon.deploy_model(cfg(mlflow_models["iris_v2"], name, replicas=2), timeout=cluster.timeout)
    assert second.prediction_url == url
    cluster.eventually(lambda: versions(url, 10) == {"v2"}, "only v2 answers once the replace returned")

    def rolled() -> bool:
        now = cluster.pods(name)
        served = {c.args[0] for p in now for c in p.spec.init_containers if c.name == "model-model-initializer"}
        return (
            len(now) == 2
            and served == {second.record.served_uri}
            and not {p.metadata.name for p in now} & {p.metadata.name for p in pods}
        )

    cluster.eventually(rolled, "two new pods serve v2, the old ones are gone")

    second.delete()
    cluster.eventually(lambda: cluster.sdep(name) is None and not cluster.pods(name), "no SeldonDeployment, no pods")


def test_bad_names_and_manifests_leave_nothing(seldon: Any, cluster: Cluster, mlflow_models: dict[str, Any]) -> None:
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
    assert cluster.sdep("iris-bad") is None

    # The cluster itself answers 422 for an object the CRD schema rejects.
    bad = {"apiVersion": "machinelearning.seldon.io/v1", "kind": "SeldonDeployment",
           "metadata": {"name": "raw"}, "spec": {"predictors": [{"name": "p", "replicas": "two", "graph": {}}]}}  # fmt: skip
    with pytest.raises(ApiException) as raw:
        cluster.custom.create_namespaced_custom_object(
            "machinelearning.seldon.io", "v1", cluster.namespace, "seldondeployments", bad
        )
    assert raw.value.status == 422 and "spec.predictors[0].replicas" in raw.value.body


def test_v2_protocol_end_to_end(
    airflow_home: Path, mlflow_models: dict[str, Any], cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Protocol v2: MLServer's routes behind Seldon's orchestrator, V2 payloads, the health sensor."""
    from airflow_provider_modeldeploy.deployers import get_model_deployer
    from airflow_provider_modeldeploy.sensors import ServedModelHealthSensor

    monkeypatch.setenv("AIRFLOW_CONN_SELDON_V2", cluster.conn_json(protocol="v2"))
    seldon = get_model_deployer("seldon_v2")

    def config(uri: str) -> ServiceConfig:
        return ServiceConfig(model_uri=uri, model_name="iris-v2", smoke_input=v2_payload(IRIS_ROWS))

    def v2_version(url: str) -> str:
        answer = HTTP.post(url, json=v2_payload([PROBE]), timeout=30)
        assert answer.status_code == 200, answer.text[:500]
        return VERSION_OF_CLASS[answer.json()["outputs"][0]["data"][0]]

    first = seldon.deploy_model(config(mlflow_models["iris_v1"]), timeout=cluster.timeout)
    model = f"{cluster.ingress}/seldon/{cluster.namespace}/iris-v2/v2/models/model"  # the graph node's name
    assert (first.prediction_url, first.health_url) == (f"{model}/infer", f"{model}/ready")
    assert cluster.sdep("iris-v2")["spec"]["protocol"] == "v2"

    # The CLI describes it running; the health sensor's check passes with a V2 sample prediction.
    described = run_airflow(airflow_home, "served-models", "describe", first.uuid, "-o", "json", timeout=120)
    assert described.returncode == 0, described.stderr[-3000:]
    [row] = json.loads(described.stdout)
    assert (row["state"], row["prediction_url"], row["health_url"]) == ("active", f"{model}/infer", f"{model}/ready")
    sensor = ServedModelHealthSensor(task_id="wait", model_name="iris-v2", sample_input=v2_payload(IRIS_ROWS))
    assert sensor.poke({}) is True
    assert (
        HTTP.get(f"{cluster.ingress}/seldon/{cluster.namespace}/iris-v2/v2/health/ready", timeout=30).status_code == 200
    )

    # Predictions in MLServer's V2 response shape; the Seldon protocol's route is not served.
    answer = HTTP.post(first.prediction_url, json=v2_payload(IRIS_ROWS), timeout=30).json()
    assert answer["model_name"] == "model"
    [output] = answer["outputs"]
    assert output["datatype"] == "INT64" and output["shape"][0] == 2 and output["data"] == [0, 2]
    assert v2_version(first.prediction_url) == "v1"
    seldon_route = f"{cluster.ingress}/seldon/{cluster.namespace}/iris-v2/api/v1.0/predictions"
    assert predict(seldon_route).status_code == 404
    assert (
        HTTP.post(first.prediction_url.replace("/model/", "/iris-v2/"), json=v2_payload(IRIS_ROWS)).status_code == 404
    )

    # Replace in place: same URL, v2 answers; then delete.
    second = seldon.deploy_model(config(mlflow_models["iris_v2"]), timeout=cluster.timeout)
    assert second.prediction_url == first.prediction_url
    cluster.eventually(lambda: {v2_version(second.prediction_url) for _ in range(10)} == {"v2"}, "v2 answers")
    second.delete()
    cluster.eventually(lambda: cluster.sdep("iris-v2") is None, "the SeldonDeployment is deleted")


def test_logs_follow_cli(seldon: Any, airflow_home: Path, cluster: Cluster, mlflow_models: dict[str, Any]) -> None:
    """``airflow served-models logs <uuid> -f`` streams the model pod's log until Ctrl-C (exit 0);
    in Python, following ends by itself when the pods go away."""
    service = seldon.deploy_model(cfg(mlflow_models["iris_v1"], "iris-logs"), timeout=cluster.timeout)
    # PYTHONFAULTHANDLER: should the follower not end, SIGABRT makes it print where each thread is.
    env = airflow_env(
        airflow_home, AIRFLOW_CONN_SELDON=cluster.conn_json(), PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1"
    )
    # stderr to a file, not a pipe read at the end: a full pipe would hold the follower up at its exit.
    errors = (airflow_home / "follower.stderr").open("w+")
    command = [str(Path(sys.executable).parent / "airflow"), "served-models", "logs", service.uuid, "--tail", "1", "-f"]
    # Started with Ctrl-C's default disposition, as a terminal's shell starts a command: an ignored
    # SIGINT is inherited (a CI job in the background of a shell has one) and Python keeps it ignored.
    default_sigint = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    )
    follower = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", default_sigint, *command],
        stdout=subprocess.PIPE, stderr=errors, stdin=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True)
    reader.start()

    def next_line(timeout: float) -> str:
        try:
            return lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no log line from the follower in {timeout}s (exit {follower.poll()})")

    try:
        next_line(120)  # the tail: the stream is open
        # The emulator logs each request in the pod's log, as a model container with an access log
        # does; Seldon's model servers keep none by default, so a real cluster shows no such line.
        if cluster.emulated:
            assert predict(service.prediction_url).status_code == 200
            while '"POST /api/v1.0/predictions HTTP/1.1" 200' not in next_line(30):
                pass
        follower.send_signal(signal.SIGINT)
        try:
            follower.wait(30)
        except subprocess.TimeoutExpired:
            follower.send_signal(signal.SIGABRT)
            follower.wait(10)
            errors.seek(0)
            pytest.fail(f"the follower did not end on Ctrl-C in 30 s; where it was:\n{errors.read()[-6000:]}")
        errors.seek(0)
        stderr = errors.read()
        assert follower.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr and "error:" not in stderr, stderr[-3000:]
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(10)
        follower.stdout.close()
        errors.close()

    # The pods go away: following ends by itself.
    ended = threading.Event()

    def follow() -> None:
        for _ in seldon.get_model_server_logs(service.uuid, tail=1, follow=True):
            pass
        ended.set()

    threading.Thread(target=follow, daemon=True).start()
    time.sleep(1)  # the streams are open
    assert not ended.is_set()
    service.stop()
    assert ended.wait(max(cluster.settle, 60)), "following did not end when the pods went away"


def test_promote_and_rollback_operators(
    seldon: Any, airflow_home: Path, airflow_db_template: Path, cluster: Cluster, mlflow_models: dict[str, Any]
) -> None:
    """PromoteServedModelOperator and RollbackServedModelOperator run by ``airflow tasks test``."""
    first = seldon.deploy_model(cfg(mlflow_models["iris_v1"], "iris-ops", "iris-ops"), timeout=cluster.timeout)
    canary = seldon.deploy_model(
        cfg(mlflow_models["iris_v2"], "iris-ops", "iris-ops", canary_traffic_percent=50), timeout=cluster.timeout
    )
    url, v1, v2 = first.prediction_url, first.record.served_uri, canary.record.served_uri
    assert versions(url, 40) == {"v1", "v2"}
    env = {
        "AIRFLOW_CONN_SELDON": cluster.conn_json(),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "tests" / "integration" / "dags"),
    }
    migrated_airflow_db(airflow_db_template, airflow_home)

    promoted = airflow_ok(airflow_home, env, "tasks", "test", "modeldeploy_seldon_ops", "promote")
    assert final_state(promoted) == "success", promoted[-3000:]
    assert predictors(cluster, "iris-ops") == [("main", 100, v2)]
    cluster.eventually(lambda: versions(url, 10) == {"v2"}, "only v2 answers after the promotion")
    [serving] = seldon.find_model_server(endpoint="iris-ops")
    assert serving.uuid == canary.uuid and "canary_of" not in serving.record.config
    assert seldon.get_history(canary.uuid)[0]["action"] == "promote"

    rolled = airflow_ok(airflow_home, env, "tasks", "test", "modeldeploy_seldon_ops", "rollback")
    assert final_state(rolled) == "success", rolled[-3000:]
    assert predictors(cluster, "iris-ops") == [("main", 100, v1)]
    cluster.eventually(lambda: versions(url, 10) == {"v1"}, "only v1 answers after the rollback")
    [serving] = seldon.find_model_server(endpoint="iris-ops")
    assert serving.prediction_url == url and serving.record.served_uri == v1 and serving.is_running
    assert seldon.get_history(serving.uuid)[0]["action"] == "rollback"


def airflow_ok(home: Path, env: dict[str, str], *args: str) -> str:
    """Output of a successful ``airflow`` command in ``home``."""
    done = run_airflow(home, *args, timeout=600, PYTHONUNBUFFERED="1", **env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


def test_secrets_never_leak_sensor_cli_and_sync(
    airflow_home: Path,
    airflow_db_template: Path,
    mlflow_models: dict[str, Any],
    cluster: Cluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from airflow_provider_modeldeploy.deployers import get_model_deployer
    from airflow_provider_modeldeploy.registry import get_registry

    storage = cluster.storage
    minio = {"conn_type": "aws", "login": storage.access_key, "password": storage.secret_key,
             "extra": {"endpoint_url": storage.endpoint}}  # fmt: skip
    env = {
        "AIRFLOW_CONN_SELDON": cluster.conn_json(storage_secret="model-storage", storage_conn_id="minio"),
        "AIRFLOW_CONN_MINIO": json.dumps(minio),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "tests" / "integration" / "dags"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    outputs = []

    def ok(*args: str) -> str:
        outputs.append(airflow_ok(airflow_home, env, *args))
        return outputs[-1]

    migrated_airflow_db(airflow_db_template, airflow_home)
    deployed = ok("tasks", "test", "modeldeploy_seldon", "deploy")
    assert final_state(deployed) == "success", deployed[-3000:]
    waited = ok("tasks", "test", "modeldeploy_seldon", "wait")
    assert final_state(waited) == "success", waited[-3000:]
    assert "healthy; sample prediction" in waited, waited[-3000:]

    # The Secret exists with the rclone variables the storage initializer reads, marked as ours.
    secret = cluster.secret("model-storage")
    assert secret is not None
    assert secret["values"]["RCLONE_CONFIG_S3_SECRET_ACCESS_KEY"] == storage.secret_key
    assert secret["values"]["RCLONE_CONFIG_S3_ENDPOINT"] == storage.endpoint
    assert secret["labels"]["modeldeploy.airflow.apache.org/created-by"]

    seldon = get_model_deployer("seldon")
    other = seldon.deploy_model(cfg(mlflow_models["iris_v1"], "iris-two"), timeout=cluster.timeout)
    assert cluster.sdep("iris-two")["spec"]["predictors"][0]["graph"]["envSecretRefName"] == "model-storage"
    listed = ok("served-models", "list", "-o", "json")
    rows = {r["model_name"] + "/" + r["prediction_url"].split("/")[5]: r for r in json.loads(listed)}
    assert {r["backend"] for r in rows.values()} == {"seldon"} and len(rows) == 2
    first_uuid = rows["iris-seldon/iris-seldon"]["uuid"]

    # Nothing holds a credential: CLI and task output (XCom included), the registry, the cluster's
    # SeldonDeployments (only the Secret's name).
    registry_db = airflow_home / "modeldeploy" / "registry.db"
    stored = [registry_db.read_bytes(), (airflow_home / "airflow.db").read_bytes()]  # XCom is in airflow.db
    for text in [*outputs, *(b.decode(errors="replace") for b in stored), json.dumps(cluster.sdep("iris-two"))]:
        assert storage.secret_key not in text and storage.access_key not in text
    assert storage.secret_key not in "\n".join(seldon.get_model_server_logs(other.uuid))

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
    cluster.eventually(lambda: cluster.sdep("iris-seldon") is None, "the SeldonDeployment is deleted")
    assert cluster.secret("model-storage") is not None
    seldon.delete_model_server(other.uuid)  # in-process (each airflow command costs seconds)
    assert cluster.secret("model-storage") is None


def final_state(output: str) -> str:
    """The last state ``airflow tasks test`` recorded for its task instance (it exits 0 either way)."""
    import re

    states = re.findall(r"Task instance state updated.*?new_state=(\w+)", output)
    assert states, output[-3000:]
    return states[-1]


def test_example_dag_parses_without_backend_imports() -> None:
    """The example DAG loads (no kubernetes/mlflow import at parse time) and wires the canary loop."""
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


def test_connection_settings_urls_and_test_connection(cluster: Cluster) -> None:
    from airflow.models.connection import Connection

    from airflow_provider_modeldeploy.deployers.seldon import SeldonDeployer
    from airflow_provider_modeldeploy.hooks.seldon import SeldonDeployerHook
    from airflow_provider_modeldeploy.services import ServiceRecord

    def hook(**extra: Any) -> SeldonDeployerHook:
        conn = Connection.from_json(cluster.conn_json(**extra), conn_id="seldon_test")
        return SeldonDeployerHook(conn_id="seldon_test", connection=conn)

    assert hook().test_connection() == (True, f"SeldonDeployments readable in namespace {cluster.namespace}")
    for field, value in [("protocol", "grpc"), ("replicas", 0), ("namespace", "Models"), ("implementation", "X")]:
        with pytest.raises(InvalidParameterError, match=f"^{field}="):
            hook(**{field: value}).get_settings()
    unreachable = hook(kube_config_path=str(cluster.kubeconfig) + ".missing")
    ok, message = unreachable.test_connection()
    assert not ok and message

    record = ServiceRecord(uuid="u", backend="seldon", endpoint="iris", model_name="iris", model_uri="models:/iris/1")
    base = f"{cluster.ingress}/seldon/{cluster.namespace}/iris"
    v2 = SeldonDeployer(conn_id="seldon_test", hook=hook(protocol="v2"))
    assert v2.urls(record) == (f"{base}/v2/models/model/infer", f"{base}/v2/models/model/ready")
    seldon = SeldonDeployer(conn_id="seldon_test", hook=hook())
    assert seldon.urls(record) == (f"{base}/api/v1.0/predictions", f"{base}/api/v1.0/health/status")


def test_unmanaged_seldon_deployment_is_never_taken_over_and_restores_are_exact(
    seldon: Any, cluster: Cluster, mlflow_models: dict[str, Any]
) -> None:
    """A SeldonDeployment of the endpoint's name that we did not create is an error naming it, left
    byte for byte, never adopted by sync; a failed rollout of ours puts back exactly what was there."""
    from airflow_provider_modeldeploy.registry import get_registry

    foreign = {"apiVersion": "machinelearning.seldon.io/v1", "kind": "SeldonDeployment",
               "metadata": {"name": "iris-theirs", "labels": {"team": "fraud"}},
               "spec": {"predictors": [{"name": "p", "replicas": 0, "graph": {"name": "m", "type": "MODEL",
                        "implementation": "SKLEARN_SERVER", "modelUri": "gs://their/model"}}]}}  # fmt: skip
    created = cluster.custom.create_namespaced_custom_object(
        "machinelearning.seldon.io", "v1", cluster.namespace, "seldondeployments", foreign
    )

    def as_written(obj: dict[str, Any]) -> dict[str, Any]:
        return {"metadata": {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}, "spec": obj["spec"]}

    with pytest.raises(
        InvalidParameterError, match=r"SeldonDeployment models/iris-theirs exists .*not created by this provider"
    ):
        seldon.deploy_model(cfg(mlflow_models["iris_v1"], "iris-theirs"), timeout=cluster.timeout)
    assert seldon.sync_services().adopted == [] and get_registry().find_services() == []
    assert as_written(cluster.sdep("iris-theirs")) == as_written(created)
    cluster.custom.delete_namespaced_custom_object(
        "machinelearning.seldon.io", "v1", cluster.namespace, "seldondeployments", "iris-theirs"
    )

    first = seldon.deploy_model(cfg(mlflow_models["iris_v1"], "iris-exact"), timeout=cluster.timeout)
    before = as_written(cluster.sdep("iris-exact"))
    with pytest.raises(DeploymentFailedError):
        seldon.deploy_model(
            cfg("models:/broken/1", "iris-exact", resources={"requests": {"cpu": "100m"}}),
            timeout=min(cluster.timeout, 300),
        )
    after = as_written(cluster.sdep("iris-exact"))
    after["metadata"].pop("generation", None), before["metadata"].pop("generation", None)
    assert after == before  # the resources the failed spec added are gone too
    first.delete()


def test_metrics_from_a_real_prometheus(
    airflow_home: Path, mlflow_models: dict[str, Any], cluster: Cluster, prometheus: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """A real Prometheus scrapes the executor's histogram (seldon_api_executor_server_requests_seconds,
    as Seldon Core v1.18.2 exposes it) through a PodMonitor's relabelling; the deployer's metrics (what
    ``describe``, the plugin API and the Served Models page show) must count exactly the predictions
    sent: 60 requests, 5 answered 400 and 3 answered 500, the health checks not among them."""
    if not cluster.emulated:
        pytest.skip("a real cluster is scraped by its own Prometheus")
    from prometheus_env import after_a_scrape, send

    from airflow_provider_modeldeploy.deployers import get_model_deployer

    prometheus.watch(cluster)
    monkeypatch.setenv("AIRFLOW_CONN_SELDON_PROM", cluster.conn_json(prometheus_url=prometheus.url))
    seldon = get_model_deployer("seldon_prom")
    served = seldon.deploy_model(cfg(mlflow_models["iris_v1"], "iris-prom"), timeout=cluster.timeout)
    [pod] = cluster.pods("iris-prom")
    job = f'job="seldon-monitoring/seldon-podmonitor",pod="{pod.metadata.name}"'

    def predictions_in_log() -> int:
        log = cluster.core.read_namespaced_pod_log(pod.metadata.name, cluster.namespace, container="model")
        return log.count('"POST /api/v1.0/predictions HTTP/1.1"')

    before = after_a_scrape(prometheus, job, lambda: seldon.metrics(served.uuid, "1h"))
    assert before.available and before.source == "prometheus", before.reason
    # The deploy's smoke prediction(s) only: its health checks (service="status") are no predictions.
    assert before.summary.requests == predictions_in_log() >= 1, before.summary
    [checks] = prometheus.query(f'sum(seldon_api_executor_server_requests_seconds_count{{{job},service="status"}})')
    assert float(checks["value"][1]) >= 1, checks

    bad, failing = {"bogus": 1}, {"data": {"names": IRIS_COLUMNS, "ndarray": [[1.0, 2.0]]}}
    bodies = [bad if i % 12 == 5 else failing if i % 20 == 11 else SELDON_PAYLOAD for i in range(60)]
    traffic = send(served.prediction_url, bodies)
    assert (traffic.statuses.count(200), traffic.statuses.count(400), traffic.statuses.count(500)) == (52, 5, 3)
    after = after_a_scrape(prometheus, job, lambda: seldon.metrics(served.uuid, "1h"))

    # The labels as a kube-prometheus set-up has them: the executor's own (predictor_version is empty:
    # Prometheus keeps no empty label) and the PodMonitor's.
    [series] = prometheus.query(f'seldon_api_executor_server_requests_seconds_count{{{job},code="400"}}')
    assert series["metric"] | {"__name__": "x"} == {
        "__name__": "x", "code": "400", "deployment_name": "iris-prom", "predictor_name": "main",
        "service": "predictions", "method": "post", "namespace": cluster.namespace,
        "pod": pod.metadata.name, "container": "seldon-container-engine", "endpoint": "metrics",
        "job": "seldon-monitoring/seldon-podmonitor", "instance": series["metric"]["instance"],
    } and series["value"][1] == "5"  # fmt: skip
    summary = after.summary
    assert summary.requests - before.summary.requests == 60, (before.summary, summary)
    assert summary.errors - before.summary.errors == 8, (before.summary, summary)
    assert summary.error_rate == pytest.approx(summary.errors / summary.requests)
    day = seldon.metrics(served.uuid, "1d")  # 15-minute steps: the same figures
    assert (day.step_seconds, day.summary.requests, day.summary.errors) == (900, summary.requests, summary.errors)
    [version] = after.versions
    assert (version.model_version, version.role) == ("main", "main")
    points = version.points
    assert sum(p.requests for p in points) == summary.requests == predictions_in_log()
    assert (sum(p.client_errors for p in points), sum(p.server_errors for p in points)) == (5, 3)
    # Latency from the executor's buckets, in seconds: the quantiles (in ms) are Prometheus' own
    # histogram_quantile of the pod's prediction buckets (the pod is this window's only one), and the
    # median lies within the bucket holding the slowest answer the test saw.
    buckets = f'seldon_api_executor_server_requests_seconds_bucket{{{job},service="predictions"}}'
    for q, value in ((0.5, summary.p50_ms), (0.95, summary.p95_ms), (0.99, summary.p99_ms)):
        [own] = prometheus.query(f"histogram_quantile({q}, sum by (le) ({buckets}))")
        assert value == pytest.approx(float(own["value"][1]) * 1000, abs=0.001), (q, summary)
    bound = next(b for b in (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
                 if b >= traffic.slowest)  # fmt: skip
    assert 0 < summary.p50_ms <= bound * 1000, (summary, traffic.slowest)
    served.delete()
