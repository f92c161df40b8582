"""deployers/base.py with a fake backend (servers are dict entries, no processes): what users see of
deploy, replace, a failed replace, retries, stop/start/delete, rollback, options and sync."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from airflow_provider_modeldeploy.deployers.base import BaseModelDeployer, Launch
from airflow_provider_modeldeploy.exceptions import (
    DeploymentFailedError,
    InvalidParameterError,
    ServiceNotFoundError,
)
from airflow_provider_modeldeploy.registry import Registry
from airflow_provider_modeldeploy.services import Lineage, ServiceConfig, ServiceRecord, ServiceState


class Fake(BaseModelDeployer):
    """Each server is ``running[uuid] = model_uri``; a model URI in ``broken`` never comes up."""

    backend = "fake"
    backend_options = {"workers": int, "label": str}

    def __init__(self) -> None:
        super().__init__()
        self.running: dict[str, str] = {}
        self.broken: set[str] = set()
        self.discovered: list[ServiceRecord] | None = None
        self.calls: list[tuple[str, str]] = []
        self.port = 5200
        self.retire_error: Exception | None = None
        self.registry_when_retired: list[list[str]] = []

    def _launch(self, record: Any, lease: Any, previous: Any, timeout: float) -> Launch:
        self.calls.append(("launch", record.uuid))
        if record.model_uri in self.broken:
            raise DeploymentFailedError(f"{record.model_uri}: model weights are corrupted")
        self.running[record.uuid] = record.model_uri
        url = f"http://fake:{self.port}"  # the endpoint's URL: the same across replaces
        return Launch(pid=1000 + len(self.calls), prediction_url=f"{url}/invocations", health_url=f"{url}/health",
                      model_version=record.model_uri.rsplit("/", 1)[-1])  # fmt: skip

    def _promote(self, record: Any, launch: Launch, previous: Any, timeout: float) -> None:
        self.calls.append(("promote", record.uuid))
        launch.committed = True
        if previous is not None:
            self.running.pop(previous.uuid, None)

    def _discard(self, record: Any, launch: Any) -> None:
        self.calls.append(("discard", record.uuid))
        self.running.pop(record.uuid, None)

    def _stop(self, record: Any, timeout: float, force: bool) -> None:
        self.calls.append(("stop", record.uuid))
        self.running.pop(record.uuid, None)

    def _retired(self, record: Any) -> None:
        self.calls.append(("retired", record.uuid))
        self.registry_when_retired.append([r.uuid for r in self.registry.find_services(endpoint=record.endpoint)])
        if self.retire_error is not None:
            raise self.retire_error

    def _probe(self, record: Any) -> Any:
        if record.state == ServiceState.ACTIVE and record.uuid not in self.running:
            return ServiceState.ERROR, "the server is gone"
        return None

    def _log_lines(self, record: Any, tail: Any, follow: bool) -> Iterator[str]:
        lines = [f"line {i}" for i in range(5)]
        return iter(lines[-tail:] if tail else lines)

    def _discover(self) -> list[ServiceRecord] | None:
        return self.discovered


@pytest.fixture
def fake(registry: Registry) -> Fake:
    return Fake()


def cfg(uri: str = "models:/iris/1", **options: Any) -> ServiceConfig:
    return ServiceConfig(model_uri=uri, model_name="iris", **options)


TASK = Lineage(dag_id="ct", run_id="manual__1", task_id="deploy", try_number=1)


def test_deploy_serves_and_records_lineage_and_history(fake: Fake, registry: Registry) -> None:
    service = fake.deploy_model(cfg(workers=2), lineage=TASK)
    assert service.is_running and service.prediction_url == "http://fake:5200/invocations"
    assert fake.running == {service.uuid: "models:/iris/1"}
    record = registry.get_service(service.uuid)
    assert (record.dag_id, record.run_id, record.task_id, record.config) == (
        "ct",
        "manual__1",
        "deploy",
        {"workers": 2},
    )
    assert record.model_version == "1" and record.backend == "fake"
    [event] = fake.get_history(service.uuid)
    assert event["action"] == "deploy" and event["actor"] == "task ct/manual__1/deploy try 1"
    assert event["details"]["previous_uuid"] is None


def test_replace_keeps_the_url_and_retires_the_old_service(fake: Fake, registry: Registry) -> None:
    old = fake.deploy_model(cfg("models:/iris/1"))
    new = fake.deploy_model(cfg("models:/iris/2"))
    assert new.uuid != old.uuid and new.prediction_url == old.prediction_url
    assert fake.running == {new.uuid: "models:/iris/2"}
    assert [r.uuid for r in registry.find_services(endpoint="iris")] == [new.uuid]
    replace = fake.get_history("iris")[0]
    assert replace["action"] == "replace" and replace["details"]["previous_uuid"] == old.uuid
    assert replace["details"]["previous_model_uri"] == "models:/iris/1"


def test_a_replaced_service_is_retired_at_its_backend_once_the_registry_dropped_it(
    fake: Fake, registry: Registry
) -> None:
    old = fake.deploy_model(cfg("models:/iris/1"))
    assert "retired" not in [call for call, _ in fake.calls]  # a first deployment retires nothing
    fake.retire_error = RuntimeError("the agent is away")
    new = fake.deploy_model(cfg("models:/iris/2"))  # the new server serves: the deployment succeeded
    assert fake.calls[-1] == ("retired", old.uuid) and fake.registry_when_retired == [[new.uuid]]
    details = fake.get_history("iris")[0]["details"]
    assert details["warnings"] == [f"what the backend keeps of replaced service {old.uuid} stays: the agent is away"]


def test_a_failed_replace_keeps_the_old_server_serving_and_the_registry_as_it_was(
    fake: Fake, registry: Registry
) -> None:
    old = fake.deploy_model(cfg("models:/iris/1"))
    fake.broken.add("models:/iris/2")
    with pytest.raises(DeploymentFailedError, match="corrupted"):
        fake.deploy_model(cfg("models:/iris/2"))
    assert fake.running == {old.uuid: "models:/iris/1"}
    [only] = registry.find_services(endpoint="iris")
    assert only.uuid == old.uuid and only.state == ServiceState.ACTIVE
    event = fake.get_history("iris")[0]
    assert event["action"] == "rollback" and event["outcome"] == "failed"
    assert f"service {old.uuid} keeps serving" in event["message"]
    assert "retired" not in [call for call, _ in fake.calls]


def test_a_failed_first_deployment_leaves_no_trace(fake: Fake, registry: Registry) -> None:
    fake.broken.add("models:/iris/1")
    with pytest.raises(DeploymentFailedError):
        fake.deploy_model(cfg())
    assert registry.find_services() == [] and registry.get_endpoint("fake", "iris") is None
    assert ("discard", fake.calls[0][1]) in fake.calls


def test_a_retried_task_gets_its_service_back(fake: Fake) -> None:
    first = fake.deploy_model(cfg(), lineage=TASK)
    retry = Lineage(dag_id="ct", run_id="manual__1", task_id="deploy", try_number=2)
    again = fake.deploy_model(cfg(), lineage=retry)
    assert again.uuid == first.uuid and [c for c, _ in fake.calls].count("launch") == 1
    other_run = Lineage(dag_id="ct", run_id="manual__2", task_id="deploy", try_number=1)
    assert fake.deploy_model(cfg(), lineage=other_run).uuid != first.uuid  # another run: a new server


def test_replace_false_refuses_a_served_endpoint(fake: Fake) -> None:
    served = fake.deploy_model(cfg())
    with pytest.raises(InvalidParameterError) as info:
        fake.deploy_model(cfg("models:/iris/2"), replace=False)
    assert info.value.field == "replace" and served.uuid in str(info.value)
    assert list(fake.running) == [served.uuid]


@pytest.mark.parametrize(
    ("options", "field", "reason"),
    [
        ({"replicas": 2}, "replicas", "not an option of the fake backend (known: label, workers)"),
        ({"workers": "2"}, "workers", "must be an integer"),
        ({"workers": True}, "workers", "must be an integer"),
        ({"label": 3}, "label", "must be of type str"),
    ],
)
def test_unknown_or_mistyped_options_are_refused_before_anything(
    fake: Fake, options: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(InvalidParameterError) as info:
        fake.deploy_model(cfg(**options))
    assert info.value.field == field and info.value.reason == reason
    assert fake.calls == [] and fake.registry.find_services() == []


@pytest.mark.parametrize("timeout", [0, -1, True, "60"])
def test_a_timeout_must_be_a_positive_number(fake: Fake, timeout: Any) -> None:
    with pytest.raises(InvalidParameterError) as info:
        fake.deploy_model(cfg(), timeout=timeout)
    assert info.value.field == "timeout"


def test_stop_start_delete(fake: Fake, registry: Registry) -> None:
    service = fake.deploy_model(cfg())
    stopped = fake.stop_model_server(service.uuid, actor="alice")
    assert stopped.record.state == ServiceState.INACTIVE and stopped.prediction_url is None and not fake.running
    started = fake.start_model_server(service.uuid[:8], actor="alice")  # a uuid prefix is enough
    assert started.uuid == service.uuid and started.is_running and service.uuid in fake.running
    fake.delete_model_server(service.uuid, actor="alice")
    assert registry.find_services() == [] and not fake.running
    actions = [(e["action"], e["actor"]) for e in fake.get_history("iris")]
    assert actions[:3] == [("delete", "alice"), ("start", "alice"), ("stop", "alice")]


def test_start_refuses_while_another_service_serves_the_endpoint(fake: Fake, registry: Registry) -> None:
    old = fake.deploy_model(cfg("models:/iris/1"))
    fake.stop_model_server(old.uuid)
    other = ServiceRecord(uuid="other-0001", backend="fake", endpoint="iris", model_name="iris",
                          model_uri="models:/iris/2", state=ServiceState.ACTIVE)  # fmt: skip
    registry.add_service(other)
    fake.running[other.uuid] = other.model_uri
    with pytest.raises(InvalidParameterError, match="stop it first"):
        fake.start_model_server(old.uuid)


def test_a_server_gone_behind_the_registry_shows_as_failed(fake: Fake) -> None:
    service = fake.deploy_model(cfg())
    fake.running.clear()
    refreshed = fake.get_model_server(service.uuid)
    assert refreshed.is_failed and refreshed.status.last_error == "the server is gone"


def test_rollback_serves_the_replaced_version_again_at_the_same_url(fake: Fake) -> None:
    v1 = fake.deploy_model(cfg("models:/iris/1"))
    v2 = fake.deploy_model(cfg("models:/iris/2"))
    back = fake.rollback_model_server(v2.uuid, actor="bob")
    assert back.record.model_uri == "models:/iris/1" and back.uuid not in (v1.uuid, v2.uuid)
    assert back.prediction_url == v2.prediction_url and fake.running == {back.uuid: "models:/iris/1"}
    assert fake.get_history("iris")[0]["action"] == "rollback"
    with pytest.raises(InvalidParameterError, match="names no earlier service"):
        fake.rollback_model_server(back.uuid, to_service_uuid="ffff")


def test_a_first_version_has_nothing_to_roll_back_to(fake: Fake) -> None:
    only = fake.deploy_model(cfg())
    with pytest.raises(InvalidParameterError, match="no earlier version"):
        fake.rollback_model_server(only.uuid)
    with pytest.raises(InvalidParameterError, match="has no canary"):
        fake.promote_model_server(only.uuid)


def test_logs_check_tail_and_the_backend(fake: Fake, registry: Registry) -> None:
    service = fake.deploy_model(cfg())
    assert list(fake.get_model_server_logs(service.uuid, tail=2)) == ["line 3", "line 4"]
    for tail in (-1, True, "2"):
        with pytest.raises(InvalidParameterError):
            fake.get_model_server_logs(service.uuid, tail=tail)  # type: ignore[arg-type]
    registry.add_service(ServiceRecord(uuid="other-backend-1", backend="seldon", endpoint="x", model_name="x",
                                       model_uri="models:/x/1"))  # fmt: skip
    with pytest.raises(ServiceNotFoundError, match="belongs to the seldon backend"):
        fake.get_model_server("other-backend-1")


def test_sync_marks_lost_servers_and_adopts_unknown_ones(fake: Fake, registry: Registry) -> None:
    kept = fake.deploy_model(cfg("models:/iris/1"))
    lost = fake.deploy_model(cfg("models:/wine/1", endpoint="wine"))
    stray = ServiceRecord(uuid="adopt-me-0001", backend="fake", endpoint="beer", model_name="beer",
                          model_uri="models:/beer/3", state=ServiceState.ACTIVE)  # fmt: skip
    fake.discovered = [registry.get_service(kept.uuid), stray]
    dry = fake.sync_services(dry_run=True)
    assert (dry.lost, dry.adopted, dry.dry_run) == ([lost.uuid], ["adopt-me-0001"], True)
    assert registry.get_service(lost.uuid).state == ServiceState.ACTIVE  # a dry run changes nothing
    report = fake.sync_services()
    assert (report.lost, report.adopted, report.checked) == ([lost.uuid], ["adopt-me-0001"], 2)
    gone = registry.get_service(lost.uuid)
    assert gone.state == ServiceState.INACTIVE and "found by sync" in gone.last_error
    assert registry.get_service("adopt-me-0001").state == ServiceState.ACTIVE
    assert fake.get_history("beer")[0]["action"] == "adopt"


def test_sync_that_cannot_list_the_backend_marks_nothing_lost(fake: Fake, registry: Registry) -> None:
    service = fake.deploy_model(cfg())
    fake.discovered = None
    report = fake.sync_services()
    assert report.lost == [] and registry.get_service(service.uuid).state == ServiceState.ACTIVE
