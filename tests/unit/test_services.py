"""services.py: names and model URIs users give are checked before anything happens; what a service
record and a Service show."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from airflow_provider_modeldeploy.exceptions import InvalidParameterError
from airflow_provider_modeldeploy.services import (
    Lineage,
    Service,
    ServiceConfig,
    ServiceRecord,
    ServiceState,
    states_of,
)

# -- validation helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "iris", "Iris-2", "wine.classifier_v2", "a" * 63, "0", "x-y.z_9", "A1"], ids=lambda n: n[:12]
)
def test_service_config_accepts(name: str) -> None:
    ServiceConfig(model_uri="models:/iris/1", model_name=name).validate()
    ServiceConfig(model_uri="models:/iris/1", model_name="m", endpoint=name).validate()


@pytest.mark.parametrize(
    "name", ["", "-x", "x-", ".x", "x_", "Bad Name!", "a" * 64, "a/b", "é", "a b", None, 7], ids=repr
)
def test_service_config_refuses_names(name: Any) -> None:
    with pytest.raises(InvalidParameterError) as info:
        ServiceConfig(model_uri="models:/iris/1", model_name=name).validate()
    assert info.value.field == "model_name" and info.value.value == name
    assert str(info.value).startswith(f"model_name={name!r}: ")
    if name is not None:  # endpoint=None means "the model name"
        with pytest.raises(InvalidParameterError) as info:
            ServiceConfig(model_uri="models:/iris/1", model_name="ok", endpoint=name).validate()
        assert info.value.field == "endpoint" and info.value.value == name


def test_service_config_endpoint_and_options() -> None:
    config = ServiceConfig(model_uri="models:/iris/1", model_name="iris", workers=2)
    assert config.endpoint_name == "iris" and config.backend_options == {"workers": 2}
    assert ServiceConfig(model_uri="models:/iris/1", model_name="iris", endpoint="prod").endpoint_name == "prod"
    assert "workers=2" in repr(config)


@pytest.mark.parametrize(
    "uri",
    [
        "runs:/0123456789abcdef/model",
        "runs:/abc/nested/model",
        "models:/iris/1",
        "models:/iris/latest",
        "models:/iris/Production",
        "models:/iris@champion",
        "models:/m-0123456789abcdef",
        "/tmp/model",
        "relative/model",
        "file:///tmp/model",
        "mlflow-artifacts:/1/abc/artifacts/model",
        "s3://bucket/model",
        "gs://bucket/model",
        "https://example.com/model",
        "C:/models/iris",
    ],
)
def test_model_uri_accepts(uri: str) -> None:
    ServiceConfig(model_uri=uri, model_name="m").validate()


@pytest.mark.parametrize(
    "uri",
    [
        "",
        " ",
        " models:/iris/1",
        "models:/iris/1 ",
        "models:/",
        "models:/iris/1/extra",
        "models:/iris@",
        "models:/iris/",
        "models:/@alias",
        "runs:/",
        "runs:/abc",
        "runs:/abc/",
        "foo://x",
        "ftpx://x",
        None,
        42,
    ],
    ids=repr,
)
def test_model_uri_refuses(uri: Any) -> None:
    with pytest.raises(InvalidParameterError) as info:
        ServiceConfig(model_uri=uri, model_name="m").validate()
    assert info.value.field == "model_uri" and info.value.value == uri
    assert str(info.value).startswith(f"model_uri={uri!r}: ")


# -- lineage, records, services ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lineage", "expected"),
    [
        (Lineage(dag_id="ct", run_id="manual__1", task_id="deploy", try_number=2), "task ct/manual__1/deploy try 2"),
        (Lineage(dag_id="ct", run_id="r", task_id="deploy", map_index=3, try_number=1), "task ct/r/deploy[3] try 1"),
        (Lineage(actor="alice@host"), "alice@host"),
        (Lineage(dag_id="ct", actor="bob"), "bob"),  # no run_id/task_id: not a task
        (Lineage(), "unknown"),
    ],
)
def test_lineage_describes_who_asked(lineage: Lineage, expected: str) -> None:
    assert lineage.describe() == expected


def record(**values: Any) -> ServiceRecord:
    base = dict(uuid="0" * 8 + "-0000-4000-8000-000000000001", backend="mlflow", endpoint="iris",
                model_name="iris", model_uri="models:/iris/1")  # fmt: skip
    return ServiceRecord(**{**base, **values})


def test_record_to_dict_is_json_ready() -> None:
    created = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    data = record(state=ServiceState.ACTIVE, created_at=created, config={"workers": 2}).to_dict()
    assert data["state"] == "active" and type(data["state"]) is str
    assert data["created_at"] == "2026-01-02T03:04:05+00:00" and data["updated_at"] is None
    assert data["config"] == {"workers": 2} and data["map_index"] == -1


@pytest.mark.parametrize(
    ("state", "running", "failed"),
    [
        (ServiceState.ACTIVE, True, False),
        (ServiceState.PENDING, False, False),
        (ServiceState.INACTIVE, False, False),
        (ServiceState.ERROR, False, True),
    ],
)
def test_a_service_shows_its_urls_only_while_it_runs(state: ServiceState, running: bool, failed: bool) -> None:
    service = Service(
        record(state=state, prediction_url="http://h:1/invocations", health_url="http://h:1/health", last_error="x"),
        deployer=None,
    )
    assert service.is_running is running and service.is_failed is failed
    assert service.prediction_url == ("http://h:1/invocations" if running else None)
    assert service.health_url == ("http://h:1/health" if running else None)
    assert service.status.state == state and service.status.last_error == "x"


def test_service_actions_go_to_its_deployer_with_its_uuid() -> None:
    calls: list[tuple[Any, ...]] = []
    stopped = record(state=ServiceState.INACTIVE)

    class Deployer:
        def stop_model_server(self, uuid: str, timeout: float, force: bool, actor: str | None) -> Service:
            calls.append(("stop", uuid, timeout, force, actor))
            return Service(stopped, self)  # type: ignore[arg-type]

        def delete_model_server(self, uuid: str, timeout: float, force: bool, actor: str | None) -> None:
            calls.append(("delete", uuid, timeout, force, actor))

    service = Service(record(state=ServiceState.ACTIVE), Deployer())  # type: ignore[arg-type]
    assert service.stop(timeout=7, force=True, actor="me") is service
    assert service.record.state == ServiceState.INACTIVE  # the service now shows what the deployer returned
    service.delete(timeout=3)
    uuid = stopped.uuid
    assert calls == [("stop", uuid, 7, True, "me"), ("delete", uuid, 3, False, None)]


def test_service_repr_names_model_version_state_and_url() -> None:
    text = repr(Service(record(model_version="3", state=ServiceState.ACTIVE, prediction_url="http://u"), None))
    assert "model='iris'" in text and "version='3'" in text and "state=active" in text and "'http://u'" in text


def test_states_of_a_running_filter() -> None:
    """``running=`` as registry states, for the query (paging after filtering would give short pages)."""
    assert states_of(None) is None
    assert states_of(True) == [ServiceState.ACTIVE]
    assert states_of(False) == [ServiceState.PENDING, ServiceState.INACTIVE, ServiceState.ERROR]
