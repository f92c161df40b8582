"""What the backend-agnostic deployer decides around a deployment, with a stand-in backend (no
processes): the endpoint lease is renewed while a deployment runs, and once the new server takes
traffic (the commit point) nothing discards it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_modeldeploy.deployers.base import BaseModelDeployer, Launch
from airflow_provider_modeldeploy.exceptions import EndpointBusyError
from airflow_provider_modeldeploy.registry import get_registry
from airflow_provider_modeldeploy.services import ServiceConfig, ServiceState


class Interrupted(BaseException):
    """Stands for what Airflow raises in a task past its execution_timeout (not an Exception)."""


class StandIn(BaseModelDeployer):
    """A backend whose servers are dict entries; ``after_commit`` is raised once traffic has moved."""

    backend = "standin"

    def __init__(self, after_commit: BaseException | None = None) -> None:
        super().__init__()
        self.after_commit = after_commit
        self.serving: set[str] = set()
        self.discarded: list[str] = []

    def _launch(self, record: Any, lease: Any, previous: Any, timeout: float) -> Launch:
        return Launch(pid=1, prediction_url="http://standin/invocations", health_url="http://standin/health")

    def _promote(self, record: Any, launch: Launch, previous: Any, timeout: float) -> None:
        self.serving.add(record.uuid)
        launch.committed = True
        if previous is not None:
            self.serving.discard(previous.uuid)
        if self.after_commit is not None:
            raise self.after_commit

    def _discard(self, record: Any, launch: Any) -> None:
        self.discarded.append(record.uuid)
        self.serving.discard(record.uuid)

    def _stop(self, record: Any, timeout: float, force: bool) -> None:
        self.serving.discard(record.uuid)

    def _probe(self, record: Any) -> None:
        return None

    def _log_lines(self, record: Any, tail: Any, follow: bool) -> Iterator[str]:
        return iter(())


@pytest.fixture
def registry(airflow_home: Path) -> Any:
    return get_registry()


def test_a_failure_after_the_commit_point_keeps_the_new_server_and_records_why(registry: Any) -> None:
    StandIn().deploy_model(ServiceConfig(model_uri="models:/m/1", model_name="ep"))
    deployer = StandIn(after_commit=RuntimeError("the old server did not drain"))
    served = deployer.deploy_model(ServiceConfig(model_uri="models:/m/2", model_name="ep"))
    assert served.is_running and served.uuid in deployer.serving and deployer.discarded == []
    [active] = registry.find_services(backend="standin", endpoint="ep")
    assert active.uuid == served.uuid and active.state == ServiceState.ACTIVE
    event = registry.list_events("standin", "ep", 1)[0]
    assert event["action"] == "replace" and event["outcome"] == "success"
    assert event["details"]["warnings"] == ["RuntimeError: the old server did not drain"]


def test_an_interrupt_after_the_commit_point_fails_the_task_with_the_registry_true(registry: Any) -> None:
    deployer = StandIn(after_commit=Interrupted())
    with pytest.raises(Interrupted):
        deployer.deploy_model(ServiceConfig(model_uri="models:/m/1", model_name="ep"))
    [active] = registry.find_services(backend="standin", endpoint="ep")
    assert active.state == ServiceState.ACTIVE and active.uuid in deployer.serving and deployer.discarded == []


def test_a_failure_before_the_commit_point_discards_the_new_server(registry: Any) -> None:
    class Failing(StandIn):
        def _promote(self, record: Any, launch: Launch, previous: Any, timeout: float) -> None:
            raise RuntimeError("activation refused")

    first = StandIn().deploy_model(ServiceConfig(model_uri="models:/m/1", model_name="ep"))
    failing = Failing()
    with pytest.raises(RuntimeError, match="activation refused"):
        failing.deploy_model(ServiceConfig(model_uri="models:/m/2", model_name="ep"))
    assert len(failing.discarded) == 1
    [kept] = registry.find_services(backend="standin", endpoint="ep")
    assert kept.uuid == first.uuid and kept.state == ServiceState.ACTIVE


def test_the_endpoint_lease_is_renewed_while_held(registry: Any) -> None:
    with registry.lease("standin", "slow", ttl=3, wait=1):
        first = registry.get_endpoint("standin", "slow").lock_expires_at
        time.sleep(4.5)  # longer than the TTL: a lease that is not renewed would be free by now
        assert registry.get_endpoint("standin", "slow").lock_expires_at > first
        with pytest.raises(EndpointBusyError), registry.lease("standin", "slow", wait=0.5):
            pytest.fail("a lease past its first TTL was granted to another deployment")
