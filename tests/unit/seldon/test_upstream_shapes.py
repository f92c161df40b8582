"""The provider's reading of Seldon Core 1 and MLServer answers and of SeldonDeployment status, fed
the upstream shapes of tests/fixtures/seldon (see its README for the source file and tag of each)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from airflow_provider_modeldeploy.deployers.seldon import SeldonDeployer, _crash_loop
from airflow_provider_modeldeploy.exceptions import DeploymentFailedError
from airflow_provider_modeldeploy.health import answer_message, check_health, is_final, prediction_problem
from airflow_provider_modeldeploy.hooks.seldon import SeldonSettings
from airflow_provider_modeldeploy.services import ServiceRecord, ServiceState

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "seldon"


def text(name: str) -> str:
    return (FIXTURES / name).read_text()


def fixture(name: str) -> Any:
    return json.loads(text(name))


def pod(body: dict[str, Any]) -> Any:
    """A V1Pod as the kubernetes client deserialises it from the API's JSON."""
    from kubernetes.client import ApiClient

    return ApiClient()._ApiClient__deserialize(body, "V1Pod")


@pytest.mark.parametrize(
    "name",
    ["seldon_prediction_ndarray.json", "seldon_prediction_tensor.json", "mlserver_infer.json"],
)
def test_upstream_predictions_are_predictions(name: str) -> None:
    assert prediction_problem(text(name)) is None


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("seldon_wrapper_error_bad_data.json", "Invalid request data type: [] (MICROSERVICE_BAD_DATA)"),
        ("seldon_executor_error.json", "Failed to find model iris"),
        ("mlserver_error_model_not_found.json", "Model iris not found"),
        ("mlserver_error_validation.json", "body.inputs: field required"),
    ],
)
def test_upstream_error_bodies_say_what_went_wrong(name: str, message: str) -> None:
    assert answer_message(text(name)) == message
    assert prediction_problem(text(name)) is not None  # never taken for a prediction


def test_the_wrappers_model_error_names_the_mlflow_error() -> None:
    message = answer_message(text("seldon_wrapper_error_internal.json"))
    assert message.startswith("Failed to enforce schema") and "Model is missing inputs" in message


def test_plain_text_answers_are_reported_as_they_are() -> None:
    # Starlette's bare 500, gorilla/mux's 404, Envoy's 503: not JSON.
    assert answer_message("Internal Server Error") == "Internal Server Error"
    assert answer_message("404 page not found\n") == "404 page not found"
    assert prediction_problem("no healthy upstream") == "the answer is not JSON"


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """httpx clients answer health with an empty body (as the executor does) and the prediction
    with ``box['predict']`` (status, body)."""
    box: dict[str, Any] = {"health": 200, "predict": (200, "")}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(box["health"], content=b"")
        return httpx.Response(box["predict"][0], text=box["predict"][1])

    real = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real(transport=httpx.MockTransport(handler), **kw))
    monkeypatch.setattr(httpx, "get", lambda url, **kw: real(transport=httpx.MockTransport(handler)).get(url))
    monkeypatch.setattr(
        httpx, "post", lambda url, **kw: real(transport=httpx.MockTransport(handler)).post(url, content=kw["content"])
    )
    return box


def test_health_verdicts_on_upstream_answers(served: dict[str, Any]) -> None:
    urls = ("http://i/seldon/m/iris/api/v1.0/health/status", "http://i/seldon/m/iris/api/v1.0/predictions")
    served["predict"] = (200, text("seldon_prediction_ndarray.json"))
    ok, reason = check_health(*urls, {"data": {"ndarray": [[1, 2, 3, 4]]}})
    assert ok and reason.startswith("healthy; sample prediction:")

    served["predict"] = (400, text("seldon_wrapper_error_bad_data.json"))
    ok, reason = check_health(*urls, {"x": 1})
    assert (
        not ok
        and reason == "sample prediction answered HTTP 400: Invalid request data type: [] (MICROSERVICE_BAD_DATA)"
    )
    assert is_final(reason)  # the sample itself is refused: waiting will not help

    served["predict"] = (500, text("seldon_executor_error.json"))
    ok, reason = check_health(*urls, {"x": 1})
    assert (ok, reason) == (False, "sample prediction answered HTTP 500: Failed to find model iris")
    assert not is_final(reason)

    served["predict"] = (422, text("mlserver_error_validation.json"))
    assert check_health(*urls, {"x": 1}) == (False, "sample prediction answered HTTP 422: body.inputs: field required")

    served["health"] = 503  # the executor's checkReady: no body
    assert check_health(*urls, {"x": 1}) == (False, "health answered HTTP 503")


def deployer(hook: Any, protocol: str = "seldon") -> SeldonDeployer:
    d = SeldonDeployer(conn_id="seldon", hook=hook)
    d._settings = SeldonSettings(namespace="models", ingress_base_url="http://i", protocol=protocol)
    return d


class Hook:
    """The hook's calls the deployer makes, answering with upstream shapes."""

    def __init__(self, status: dict[str, Any], pods: list[dict[str, Any]] | None = None, log: str = "") -> None:
        self.status, self.pods, self.log, self.log_calls = status, pods or [], log, []

    def get_deployment(self, name: str) -> dict[str, Any]:
        return {
            "metadata": {"name": name, "resourceVersion": "7",
                         "labels": {"modeldeploy.airflow.apache.org/service-uuid": "u1",
                                   "modeldeploy.airflow.apache.org/managed": "true"}},
            "spec": {"predictors": [{"name": "main", "replicas": 1, "graph": {"modelUri": "s3://models/iris/3"}}]},
            "status": self.status,
        }  # fmt: skip

    def model_pods(self, name: str) -> list[Any]:
        return [pod(p) for p in self.pods]

    def read_pod_log(self, pod: str, container: str, tail: int | None = None, previous: bool = False) -> str:
        self.log_calls.append((pod, container, tail, previous))
        return self.log


def record() -> ServiceRecord:
    return ServiceRecord(
        uuid="u1", backend="seldon", endpoint="iris", model_name="iris", model_uri="s3://models/iris/3",
        state=ServiceState.ACTIVE,
    )  # fmt: skip


def test_failed_status_is_reported_with_seldons_description() -> None:
    with pytest.raises(
        DeploymentFailedError, match=r"Failed: Deployment is no longer progressing and not available\.$"
    ):
        deployer(Hook(fixture("sdep_status_failed.json")))._wait_available("iris", 5)
    state, error = deployer(Hook(fixture("sdep_status_failed_reconcile.json")))._probe(record())
    assert state == ServiceState.ERROR and error.endswith("not clear where to inject engine")


def test_available_creating_and_stopped_statuses() -> None:
    assert deployer(Hook(fixture("sdep_status_available.json")))._probe(record()) == (ServiceState.ACTIVE, None)
    # Creating (a rollout, or every predictor at 0 replicas): the record's own state stands.
    assert deployer(Hook(fixture("sdep_status_creating.json")))._probe(record()) is None
    assert deployer(Hook(fixture("sdep_status_stopped.json")))._probe(record()) is None


def test_a_crash_looping_model_pod_fails_the_rollout_with_its_last_log_lines() -> None:
    crashing = fixture("pod_crash_loop.json")
    assert _crash_loop(pod(crashing)) == "container model CrashLoopBackOff (exit code 1, Error, 4 restarts)"
    hook = Hook(fixture("sdep_status_available.json"), [crashing], "loading\nValueError: model weights are corrupted\n")
    with pytest.raises(DeploymentFailedError) as info:
        deployer(hook)._wait_available("iris", 5)
    assert "model pod iris-main-0-model-7c9d6b5f48-x2k9p: container model CrashLoopBackOff" in str(info.value)
    assert str(info.value).endswith("its last log lines: loading | ValueError: model weights are corrupted")
    assert hook.log_calls == [("iris-main-0-model-7c9d6b5f48-x2k9p", "model", 5, True)]


def test_a_ready_pod_of_the_spec_completes_the_rollout() -> None:
    ready = fixture("pod_crash_loop.json")
    ready["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    ready["status"]["containerStatuses"][0].update(
        ready=True, restartCount=0, state={"running": {"startedAt": "2025-01-01T00:00:40Z"}}, lastState={}
    )
    assert _crash_loop(pod(ready)) is None
    hook = Hook(fixture("sdep_status_available.json"), [ready])
    assert deployer(hook)._wait_available("iris", 5)["status"]["state"] == "Available"


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        ((200, "seldon_prediction_ndarray.json"), None),
        ((200, "seldon_executor_error.json"), "answered 200 but the answer is an error: Failed to find model iris"),
        (
            (500, "seldon_wrapper_error_internal.json"),
            r"answered 500: Failed to enforce schema .*MICROSERVICE_INTERNAL",
        ),
    ],
)
def test_the_smoke_prediction_reads_upstream_answers(
    served: dict[str, Any], answer: tuple[int, str], match: str | None
) -> None:
    served["predict"] = (answer[0], text(answer[1]))
    rec = record()
    rec.config = {"smoke_input": {"data": {"names": ["a"], "ndarray": [[1]]}}}
    d = deployer(Hook(fixture("sdep_status_available.json")))
    if match is None:
        d._smoke(rec, "http://i/p", "http://i/h", 5)
    else:
        with pytest.raises(DeploymentFailedError, match=match):
            d._smoke(rec, "http://i/p", "http://i/h", 5)
