"""operators/served_models.py: execute() with a mocked deployer; what is templated; what reaches XCom."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest

from airflow_provider_modeldeploy import deployers
from airflow_provider_modeldeploy.exceptions import InvalidParameterError, ServiceNotFoundError
from airflow_provider_modeldeploy.operators import (
    DeleteServedModelOperator,
    DeployModelOperator,
    PromoteServedModelOperator,
    RollbackServedModelOperator,
    StartServedModelOperator,
    StopServedModelOperator,
)
from airflow_provider_modeldeploy.services import Service, ServiceRecord, ServiceState

UUID = "5e77ice0-0000-4000-8000-000000000001"


def service(**values: Any) -> Service:
    base = dict(uuid=UUID, backend="mlflow", endpoint="iris", model_name="iris", model_uri="models:/iris/2",
                model_version="2", state=ServiceState.ACTIVE, prediction_url="http://h:5200/invocations",
                health_url="http://h:5200/health", config={"api_token": "never-in-xcom"}, conn_id="md")  # fmt: skip
    return Service(ServiceRecord(**{**base, **values}), deployer=None)


def context(map_index: int = -1) -> dict[str, Any]:
    ti = SimpleNamespace(dag_id="ct", run_id="manual__7", task_id="deploy", map_index=map_index, try_number=3)
    return {"ti": ti}


@pytest.fixture
def deployer(monkeypatch: pytest.MonkeyPatch) -> mock.Mock:
    fake = mock.Mock(backend="mlflow")
    fake.deploy_model.return_value = service()
    got: list[Any] = []
    monkeypatch.setattr(deployers, "get_model_deployer", lambda conn_id=None: got.append(conn_id) or fake)
    fake.asked_for = got
    return fake


def test_deploy_passes_config_lineage_and_options_and_returns_the_xcom_record(deployer: mock.Mock) -> None:
    op = DeployModelOperator(task_id="deploy", model_uri="models:/iris@champion", model_name="iris", conn_id="md",
                             endpoint="iris-prod", backend_options={"workers": 2}, timeout=120, replace=False)  # fmt: skip
    result = op.execute(context(map_index=4))
    assert deployer.asked_for == ["md"]
    [call] = deployer.deploy_model.call_args_list
    config, kwargs = call.args[0], call.kwargs
    assert (config.model_uri, config.model_name, config.endpoint_name, config.backend_options) == (
        "models:/iris@champion", "iris", "iris-prod", {"workers": 2},
    )  # fmt: skip
    assert kwargs["replace"] is False and kwargs["timeout"] == 120
    lineage = kwargs["lineage"]
    assert (lineage.dag_id, lineage.run_id, lineage.task_id, lineage.map_index, lineage.try_number) == (
        "ct", "manual__7", "deploy", 4, 3,
    )  # fmt: skip
    deployer.wait_until_healthy.assert_called_once_with(deployer.deploy_model.return_value, timeout=120)
    assert result["uuid"] == UUID and result["prediction_url"] == "http://h:5200/invocations"
    assert result["state"] == "active" and result["model_version"] == "2" and result["conn_id"] == "md"
    assert "config" not in result and "never-in-xcom" not in repr(result)


def test_deploy_without_the_health_wait(deployer: mock.Mock) -> None:
    DeployModelOperator(task_id="d", model_uri="models:/iris/1", model_name="iris", wait_for_healthy=False).execute(
        context()
    )
    deployer.wait_until_healthy.assert_not_called()
    assert deployer.asked_for == [None]  # no conn_id: the default connection


def test_templated_fields() -> None:
    assert set(DeployModelOperator.template_fields) == {
        "model_uri",
        "model_name",
        "endpoint",
        "conn_id",
        "backend_options",
        "reason",
    }
    for op in (
        StartServedModelOperator,
        StopServedModelOperator,
        DeleteServedModelOperator,
        PromoteServedModelOperator,
    ):
        assert set(op.template_fields) == {"service_uuid", "model_name", "filter_dag_id", "filter_task_id"}
    assert "to_service_uuid" in RollbackServedModelOperator.template_fields


def test_templates_render_from_the_context() -> None:
    from jinja2 import Environment

    op = DeployModelOperator(task_id="d", model_uri="models:/{{ params.m }}/{{ params.v }}", model_name="{{ params.m }}",
                             backend_options={"workers": "{{ params.w }}"})  # fmt: skip
    op.render_template_fields({"params": {"m": "iris", "v": 3, "w": 2}}, jinja_env=Environment())
    assert (op.model_uri, op.model_name, op.backend_options) == ("models:/iris/3", "iris", {"workers": "2"})


@pytest.fixture
def found(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    box: dict[str, Any] = {"services": [], "filters": None}

    def find_services(**filters: Any) -> list[Service]:
        box["filters"] = filters
        return box["services"]

    monkeypatch.setattr(deployers, "find_services", find_services)
    return box


def test_lifecycle_operators_need_a_filter(found: dict[str, Any]) -> None:
    with pytest.raises(InvalidParameterError) as info:
        StopServedModelOperator(task_id="stop").execute(context())
    assert info.value.field == "service_uuid" and found["filters"] is None  # nothing looked up


def test_lifecycle_operators_fail_when_nothing_matches_unless_missing_ok(found: dict[str, Any]) -> None:
    with pytest.raises(ServiceNotFoundError, match="model_name='iris'"):
        StopServedModelOperator(task_id="stop", model_name="iris").execute(context())
    assert found["filters"] == {"service_uuid": None, "model_name": "iris", "dag_id": None, "task_id": None}
    assert StopServedModelOperator(task_id="stop", model_name="iris", missing_ok=True).execute(context()) == []


def test_stop_and_delete_act_on_every_match(found: dict[str, Any]) -> None:
    a, b = mock.Mock(wraps=None), mock.Mock(wraps=None)
    for m, uuid in ((a, "a" * 8), (b, "b" * 8)):
        m.to_dict.return_value = service(uuid=uuid).to_dict()
        m.record = service(uuid=uuid).record
        m.stop.return_value = service(uuid=uuid, state=ServiceState.INACTIVE, prediction_url=None)
    found["services"] = [a, b]
    result = StopServedModelOperator(task_id="stop", filter_dag_id="ct", force=True, timeout=9).execute(context())
    a.stop.assert_called_once_with(timeout=9, force=True)
    assert [(r["uuid"], r["state"]) for r in result] == [("a" * 8, "inactive"), ("b" * 8, "inactive")]
    result = DeleteServedModelOperator(task_id="delete", filter_dag_id="ct").execute(context())
    b.delete.assert_called_once_with(timeout=300, force=False)
    assert [(r["uuid"], r["state"]) for r in result] == [("a" * 8, "deleted"), ("b" * 8, "deleted")]


def test_start_promote_rollback_call_the_service(found: dict[str, Any]) -> None:
    svc = mock.Mock()
    svc.to_dict.return_value = service().to_dict()
    svc.record = service().record
    for method in ("start", "promote", "rollback"):
        getattr(svc, method).return_value = service()
    found["services"] = [svc]
    StartServedModelOperator(task_id="s", service_uuid=UUID, timeout=5).execute(context())
    PromoteServedModelOperator(task_id="p", service_uuid=UUID, timeout=6).execute(context())
    RollbackServedModelOperator(task_id="r", service_uuid=UUID, to_service_uuid="earlier", timeout=7).execute(context())
    svc.start.assert_called_once_with(timeout=5)
    svc.promote.assert_called_once_with(timeout=6)
    svc.rollback.assert_called_once_with("earlier", timeout=7)
