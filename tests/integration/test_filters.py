"""Which services a filter picks: the lifecycle operators' ``model_name`` / ``filter_dag_id`` /
``filter_task_id`` act on exactly the services whose lineage matches, real servers included, and
``running=`` is part of the registry query, so that a page of running services is never short (on
SQLite and on the real PostgreSQL). The CLI's ``list --dag-id --task-id --running --limit --offset``
is run for real in test_cli.py."""

from __future__ import annotations

import uuid as uuidlib
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from conftest import iris_payload
from local_http import HTTP

from airflow_provider_modeldeploy.deployers import ServiceConfig, find_services, get_model_deployer
from airflow_provider_modeldeploy.exceptions import ServiceNotFoundError
from airflow_provider_modeldeploy.operators import (
    DeleteServedModelOperator,
    StartServedModelOperator,
    StopServedModelOperator,
)
from airflow_provider_modeldeploy.registry import get_registry
from airflow_provider_modeldeploy.services import Lineage, ServiceRecord, ServiceState


def row(endpoint: str, state: ServiceState, **values: Any) -> ServiceRecord:
    """A registry row without a server (as a stopped service, or one whose state is only recorded)."""
    values.setdefault("model_name", endpoint)
    return get_registry().add_service(
        ServiceRecord(
            uuid=str(uuidlib.uuid4()), backend="mlflow", endpoint=endpoint, model_uri=f"models:/{endpoint}/1",
            state=state, **values,
        )
    )  # fmt: skip


def test_running_is_filtered_in_the_query_so_pages_are_full(registry_url: str) -> None:
    """Services of one DAG task, running and stopped in turn (newest last), plus the same task name in
    another DAG: every page of ``running=True`` holds ``limit`` running services until they run out,
    from ``find_services`` and from a deployer's ``find_model_server`` alike; ``running=False`` the same."""
    a, i, e, p = ServiceState.ACTIVE, ServiceState.INACTIVE, ServiceState.ERROR, ServiceState.PENDING
    for n, state in enumerate((a, i, i, a, e, a, p, a, i, a, i)):
        row(f"paged-{n}", state, dag_id="ct", task_id="deploy", run_id=f"scheduled__{n}")
    row("paged-other", a, dag_id="ct_2", task_id="deploy")
    ordered = get_registry().find_services(dag_id="ct", task_id="deploy")  # newest first, whatever the state
    running = [r.uuid for r in ordered if r.state == a]
    stopped = [r.uuid for r in ordered if r.state != a]
    assert (len(running), len(stopped)) == (5, 6)

    deployer = get_model_deployer()
    for pick in (find_services, deployer.find_model_server):
        for want, expected in ((True, running), (False, stopped)):
            pages = [
                [s.uuid for s in pick(dag_id="ct", task_id="deploy", running=want, limit=2, offset=offset)]
                for offset in range(0, 8, 2)
            ]
            assert pages == [expected[o : o + 2] for o in range(0, 8, 2)], (pick, want)
        assert [s.uuid for s in pick(dag_id="ct", task_id="deploy", running=True)] == running
    for record in get_registry().find_services():  # rows only: no server to stop (faster than the teardown's delete)
        get_registry().delete_service(record.uuid)


def context() -> dict[str, Any]:
    return {"ti": SimpleNamespace(dag_id="ops", run_id="manual__1", task_id="act", map_index=-1, try_number=1)}


def alive(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_lifecycle_operators_act_on_exactly_the_matching_services(deployer: Any, mlflow_models: dict[str, Any]) -> None:
    """Two real servers deployed by the ``deploy`` task of two DAGs, and rows (no server) of another task
    of the first DAG and of a DAG and model whose names start the same: stop by DAG and task, start by
    model name and task, delete by DAG each act on the services of that lineage, and the others keep
    their state and their processes."""

    def deploy(endpoint: str, dag_id: str) -> Any:
        lineage = Lineage(dag_id=dag_id, run_id="manual__1", task_id="deploy", try_number=1)
        config = ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-op", endpoint=endpoint)
        return deployer.deploy_model(config, lineage=lineage)

    one, two = deploy("iris-op-a", "train_a"), deploy("iris-op-b", "train_b")
    evaluate = row("iris-op-c", ServiceState.INACTIVE, model_name="iris-op", dag_id="train_a", task_id="evaluate")
    prefixed = row("iris-op-d", ServiceState.INACTIVE, model_name="iris-op-2", dag_id="train_a_2", task_id="deploy")
    registry = get_registry()

    def states() -> dict[str, str]:
        return {r.uuid: str(r.state) for r in registry.find_services()}

    stopped = StopServedModelOperator(task_id="stop", filter_dag_id="train_a", filter_task_id="deploy", timeout=60)
    assert [(r["uuid"], r["state"]) for r in stopped.execute(context())] == [(one.uuid, "inactive")]
    assert states() == {one.uuid: "inactive", two.uuid: "active", evaluate.uuid: "inactive", prefixed.uuid: "inactive"}
    assert not alive(one.record.pid) and alive(two.record.pid)
    assert HTTP.post(two.prediction_url, json=iris_payload(), timeout=30).status_code == 200

    started = StartServedModelOperator(task_id="start", model_name="iris-op", filter_task_id="deploy", timeout=120)
    result = {r["uuid"]: r["state"] for r in started.execute(context())}
    assert result == {one.uuid: "active", two.uuid: "active"}  # two was running: left as it is
    assert states() == {one.uuid: "active", two.uuid: "active", evaluate.uuid: "inactive", prefixed.uuid: "inactive"}
    restarted = registry.get_service(one.uuid)
    assert alive(restarted.pid) and restarted.pid != one.record.pid
    assert registry.get_service(two.uuid).pid == two.record.pid and alive(two.record.pid)
    assert HTTP.post(one.prediction_url, json=iris_payload(), timeout=30).status_code == 200

    deleted = DeleteServedModelOperator(task_id="delete", filter_dag_id="train_a", timeout=60)
    result = {r["uuid"]: r["state"] for r in deleted.execute(context())}
    assert result == {one.uuid: "deleted", evaluate.uuid: "deleted"}
    assert states() == {two.uuid: "active", prefixed.uuid: "inactive"}
    assert not alive(restarted.pid) and alive(two.record.pid)
    assert HTTP.post(two.prediction_url, json=iris_payload(), timeout=30).status_code == 200

    # Filters that match nothing: an error naming them, or nothing done with missing_ok.
    nothing = {"model_name": "iris-op", "filter_dag_id": "train_a", "filter_task_id": "deploy"}
    assert StopServedModelOperator(task_id="s", missing_ok=True, **nothing).execute(context()) == []
    with pytest.raises(ServiceNotFoundError) as info:
        StopServedModelOperator(task_id="s", **nothing).execute(context())
    assert "model_name='iris-op', dag_id='train_a', task_id='deploy'" in str(info.value)
    assert states() == {two.uuid: "active", prefixed.uuid: "inactive"} and alive(two.record.pid)
