"""sensors/health.py: poke against a mocked service and health check; deferral and its event."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_modeldeploy import deployers, health
from airflow_provider_modeldeploy.exceptions import DeploymentFailedError, InvalidParameterError, ServiceNotFoundError
from airflow_provider_modeldeploy.sensors import ServedModelHealthSensor
from airflow_provider_modeldeploy.services import Service, ServiceRecord, ServiceState


def service(uuid: str = "s-1", state: ServiceState = ServiceState.ACTIVE, **values: Any) -> Service:
    base = dict(uuid=uuid, backend="mlflow", endpoint="iris", model_name="iris", model_uri="models:/iris/1", state=state,
                prediction_url="http://h/invocations", health_url="http://h/health")  # fmt: skip
    return Service(ServiceRecord(**{**base, **values}), deployer=None)


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    box: dict[str, Any] = {"services": [service()], "verdict": (True, "healthy"), "checks": [], "filters": []}

    def find_services(**filters: Any) -> list[Service]:
        box["filters"].append(filters)
        return box["services"]

    def check_health(*args: Any) -> tuple[bool, str]:
        box["checks"].append(args)
        return box["verdict"]

    monkeypatch.setattr(deployers, "find_services", find_services)
    monkeypatch.setattr(health, "check_health", check_health)
    return box


def sensor(**kwargs: Any) -> ServedModelHealthSensor:
    return ServedModelHealthSensor(task_id="healthy", **{"service_uuid": "s-1", "deferrable": False, **kwargs})


def test_poke_checks_the_services_urls_with_the_sample(world: dict[str, Any]) -> None:
    assert sensor(sample_input={"inputs": [1]}).poke({}) is True
    assert world["filters"] == [{"service_uuid": "s-1"}]
    assert world["checks"] == [("http://h/health", "http://h/invocations", {"inputs": [1]})]
    world["verdict"] = (False, "health answered HTTP 503")
    assert sensor().poke({}) is False


def test_poke_waits_for_a_pending_service_without_checking(world: dict[str, Any]) -> None:
    world["services"] = [service(state=ServiceState.PENDING)]
    assert sensor().poke({}) is False and world["checks"] == []


def test_a_failed_service_or_a_refused_sample_fails_at_once(world: dict[str, Any]) -> None:
    world["services"] = [service(state=ServiceState.ERROR, last_error="model weights are corrupted")]
    with pytest.raises(DeploymentFailedError, match="corrupted"):
        sensor().poke({})
    world["services"] = [service()]
    world["verdict"] = (False, "sample prediction answered HTTP 422: wrong columns")
    with pytest.raises(DeploymentFailedError, match="wrong columns"):
        sensor().poke({})


def test_by_model_name_the_running_service_is_picked(world: dict[str, Any]) -> None:
    world["services"] = [service("old", ServiceState.INACTIVE), service("new", health_url="http://new/health")]
    assert sensor(service_uuid=None, model_name="iris").poke({}) is True
    assert world["filters"] == [{"model_name": "iris"}] and world["checks"][0][0] == "http://new/health"


def test_nothing_to_wait_on_is_an_error(world: dict[str, Any]) -> None:
    with pytest.raises(InvalidParameterError):
        sensor(service_uuid=None).poke({})
    world["services"] = []
    with pytest.raises(ServiceNotFoundError):
        sensor().poke({})


def test_deferrable_defers_to_the_trigger_with_the_services_urls(world: dict[str, Any]) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    world["verdict"] = (False, "health answered HTTP 503")
    op = sensor(deferrable=True, sample_input={"inputs": [1]}, poke_interval=2, timeout=60)
    with pytest.raises(TaskDeferred) as info:
        op.execute({})
    _, kwargs = info.value.trigger.serialize()
    assert kwargs == {"service_uuid": "s-1", "health_url": "http://h/health", "prediction_url": "http://h/invocations",
                      "sample_input": {"inputs": [1]}, "poll_interval": 2, "timeout": 60}  # fmt: skip
    assert info.value.method_name == "execute_complete" and info.value.timeout.total_seconds() == 60


def test_deferrable_returns_at_once_when_already_healthy(world: dict[str, Any]) -> None:
    assert sensor(deferrable=True).execute({}) is None


def test_execute_complete_turns_each_outcome_into_the_tasks_result() -> None:
    from airflow.sdk.exceptions import AirflowSensorTimeout

    op = sensor()
    op.execute_complete({}, {"status": "success", "service_uuid": "s-1", "message": "healthy"})
    with pytest.raises(DeploymentFailedError, match="service s-1: refused"):
        op.execute_complete({}, {"status": "failed", "service_uuid": "s-1", "message": "refused"})
    with pytest.raises(AirflowSensorTimeout, match="not healthy after 60s"):
        op.execute_complete({}, {"status": "timeout", "service_uuid": "s-1", "message": "not healthy after 60s"})


def test_templated_fields() -> None:
    assert set(ServedModelHealthSensor.template_fields) == {"service_uuid", "model_name", "sample_input"}
