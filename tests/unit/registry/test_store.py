"""registry/store.py on SQLite in a temporary directory: rows, lookups, one active service per
endpoint, the endpoint lease and the history."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from airflow_provider_modeldeploy.exceptions import (
    EndpointBusyError,
    InvalidParameterError,
    RegistryUnavailableError,
    ServiceNotFoundError,
)
from airflow_provider_modeldeploy.registry.models import endpoints
from airflow_provider_modeldeploy.registry.store import HOSTNAME, Registry, get_registry, safe_url, utcnow
from airflow_provider_modeldeploy.services import ServiceRecord, ServiceState


def record(uuid: str, endpoint: str = "iris", **values: Any) -> ServiceRecord:
    base = dict(backend="mlflow", endpoint=endpoint, model_name=endpoint, model_uri=f"models:/{endpoint}/1")
    return ServiceRecord(uuid=uuid, **{**base, **values})


def test_the_default_registry_is_sqlite_under_airflow_home_and_private(airflow_home: Any) -> None:
    registry = get_registry()
    assert registry.url == f"sqlite:///{airflow_home / 'modeldeploy' / 'registry.db'}"
    assert get_registry() is registry  # one per URL and process
    registry.count_services()  # first use creates the schema
    assert os.stat(airflow_home / "modeldeploy" / "registry.db").st_mode & 0o777 == 0o600


def test_first_use_waits_for_another_process_creating_the_file(airflow_home: Any) -> None:
    """Several processes opening the new zero-configuration registry at once (tasks of a LocalExecutor):
    SQLite's switch to WAL fails at once, without its busy timeout, while another connection holds the
    write lock. A first use meanwhile waits and succeeds instead of 'database is locked'."""
    path = airflow_home / "modeldeploy" / "registry.db"
    path.parent.mkdir()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("CREATE TABLE creating (x)")
    # What the retry is for, as SQLite itself does it: the switch does not wait on the busy timeout.
    plain = sqlite3.connect(path, timeout=5, isolation_level=None)
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        plain.execute("PRAGMA journal_mode=WAL")
    assert time.monotonic() - started < 1
    plain.close()

    release = threading.Timer(0.5, lambda: other.execute("COMMIT"))
    release.start()
    try:
        registry = Registry(f"sqlite:///{path}")
        assert registry.count_services() == 0  # waited for the other connection, then migrated
        with registry.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        registry.dispose()
    finally:
        release.join()
        other.close()


def test_add_get_update_delete(registry: Registry) -> None:
    added = registry.add_service(record("11111111-aaaa", config={"workers": 2}, dag_id="ct"))
    assert added.state == ServiceState.PENDING and added.created_at is not None
    assert added.created_at.tzinfo is not None  # aware datetimes, whatever the database keeps
    updated = registry.update_service("11111111-aaaa", state=ServiceState.ACTIVE, pid=42)
    assert (updated.state, updated.pid, updated.config, updated.dag_id) == (
        ServiceState.ACTIVE,
        42,
        {"workers": 2},
        "ct",
    )
    assert updated.updated_at >= added.updated_at
    registry.delete_service("11111111-aaaa")
    with pytest.raises(ServiceNotFoundError):
        registry.get_service("11111111-aaaa")
    with pytest.raises(ServiceNotFoundError):
        registry.update_service("11111111-aaaa", pid=1)


def test_a_unique_uuid_prefix_of_four_characters_finds_the_service(registry: Registry) -> None:
    registry.add_service(record("abcd1111-0000"))
    registry.add_service(record("abcd2222-0000", endpoint="wine"))
    assert registry.get_service("abcd1").uuid == "abcd1111-0000"
    with pytest.raises(ServiceNotFoundError) as info:
        registry.get_service("abcd")  # two services start so
    assert "abcd1111-0000" in str(info.value) and "abcd2222-0000" in str(info.value)
    registry.add_service(record("fff01111-0000", endpoint="beer"))
    assert registry.get_service("fff0").uuid == "fff01111-0000"
    with pytest.raises(ServiceNotFoundError, match="no served model has this uuid"):
        registry.get_service("fff")  # shorter than 4: never a prefix, even of one service only
    with pytest.raises(ServiceNotFoundError):
        registry.get_service("abcd_")  # '_' is not a LIKE wildcard here


def test_find_services_filters_and_orders_newest_first(registry: Registry) -> None:
    registry.add_service(record("a-1", endpoint="iris", dag_id="ct", task_id="deploy"))
    time.sleep(0.01)
    registry.add_service(record("a-2", endpoint="wine", dag_id="ct", task_id="deploy", conn_id="md_remote"))
    time.sleep(0.01)
    registry.add_service(record("a-3", endpoint="iris", dag_id="other", state=ServiceState.ACTIVE))
    assert [r.uuid for r in registry.find_services()] == ["a-3", "a-2", "a-1"]
    assert [r.uuid for r in registry.find_services(endpoint="iris")] == ["a-3", "a-1"]
    assert [r.uuid for r in registry.find_services(dag_id="ct", task_id="deploy")] == ["a-2", "a-1"]
    assert [r.uuid for r in registry.find_services(states=[ServiceState.ACTIVE])] == ["a-3"]
    assert [r.uuid for r in registry.find_services(limit=1, offset=1)] == ["a-2"]
    assert registry.find_services(backend="seldon") == []
    assert registry.connection_ids() == ["md_remote"] and registry.count_services() == 3


def test_page_services_matches_substrings_and_counts_all(registry: Registry) -> None:
    for i, name in enumerate(["iris-a", "iris-b", "wine", "IRIS-c"]):
        registry.add_service(record(f"p-{i}", endpoint=name.lower(), model_name=name, dag_id=f"Dag_{i}"))
    page, total = registry.page_services(model="iris", sort="model_name", descending=False, limit=2)
    assert total == 3 and [r.model_name for r in page] == ["IRIS-c", "iris-a"]
    page, total = registry.page_services(model="IRIS", sort="model_name", descending=False, limit=2, offset=2)
    assert total == 3 and [r.model_name for r in page] == ["iris-b"]
    assert registry.page_services(dag_id="dag_3")[1] == 1
    with pytest.raises(InvalidParameterError) as info:
        registry.page_services(sort="password")
    assert info.value.field == "sort"


def test_activate_retires_the_previous_service_in_one_step(registry: Registry) -> None:
    registry.add_service(record("old", state=ServiceState.ACTIVE))
    registry.add_service(record("new"))
    active = registry.activate("new", retire=["old"], prediction_url="http://h:1/invocations", pid=7)
    assert active.state == ServiceState.ACTIVE and active.prediction_url == "http://h:1/invocations"
    assert [r.uuid for r in registry.find_services(endpoint="iris")] == ["new"]


def test_an_endpoint_has_one_active_service_at_most(registry: Registry) -> None:
    registry.add_service(record("first", state=ServiceState.ACTIVE))
    registry.add_service(record("second"))
    with pytest.raises(EndpointBusyError):
        registry.activate("second")  # without retiring "first"
    assert registry.get_service("second").state == ServiceState.PENDING
    registry.add_service(record("elsewhere", endpoint="wine"))
    assert registry.activate("elsewhere").state == ServiceState.ACTIVE  # another endpoint: fine


def test_the_lease_is_exclusive_and_released(registry: Registry) -> None:
    with registry.lease("mlflow", "iris", wait=5) as lease:
        assert lease.created and not registry.lease_is_free("mlflow", "iris")
        row = registry.get_endpoint("mlflow", "iris")
        assert (row.lock_host, row.lock_pid, row.lock_owner) == (HOSTNAME, os.getpid(), lease.owner)
        started = time.monotonic()
        with pytest.raises(EndpointBusyError) as info, registry.lease("mlflow", "iris", wait=0.3):
            pass
        assert time.monotonic() - started >= 0.3 and f"{HOSTNAME}:{os.getpid()}" in str(info.value)
    assert registry.lease_is_free("mlflow", "iris")
    with registry.lease("mlflow", "iris", wait=1) as again:
        assert not again.created  # the endpoint row exists since the first lease
    assert registry.lease_is_free("seldon", "iris")  # endpoints are per backend


def test_a_waiting_lease_gets_the_endpoint_once_released(registry: Registry) -> None:
    got: list[float] = []
    with registry.lease("mlflow", "iris", wait=5):
        waiter = threading.Thread(target=lambda: got.append(_timed_lease(registry)))
        waiter.start()
        time.sleep(0.5)
        assert got == []  # still waiting
    waiter.join(10)
    assert got and got[0] >= 0.4


def _timed_lease(registry: Registry) -> float:
    started = time.monotonic()
    with registry.lease("mlflow", "iris", wait=10):
        return time.monotonic() - started


def test_an_expired_lease_or_a_dead_holder_on_this_host_is_taken_over(registry: Registry) -> None:
    with registry.lease("mlflow", "iris", wait=1):
        pass
    with registry.session() as s:  # a holder whose TTL ran out, on another host
        s.execute(
            update(endpoints).values(
                lock_owner="x", lock_host="elsewhere", lock_pid=1, lock_expires_at=utcnow() - timedelta(seconds=1)
            )
        )
    assert registry.lease_is_free("mlflow", "iris")
    with registry.lease("mlflow", "iris", wait=1):
        pass
    with registry.session() as s:  # a live-looking lease of a process of this host that is gone
        s.execute(
            update(endpoints).values(
                lock_owner="y",
                lock_host=HOSTNAME,
                lock_pid=2**22 + 12345,
                lock_expires_at=utcnow() + timedelta(hours=1),
            )
        )
    assert registry.lease_is_free("mlflow", "iris")
    with registry.lease("mlflow", "iris", wait=1) as lease:
        assert registry.get_endpoint("mlflow", "iris").lock_owner == lease.owner
    with registry.session() as s:  # another host's live lease is not: wait, then busy
        s.execute(
            update(endpoints).values(
                lock_owner="z", lock_host="elsewhere", lock_pid=1, lock_expires_at=utcnow() + timedelta(hours=1)
            )
        )
    assert not registry.lease_is_free("mlflow", "iris")
    with pytest.raises(EndpointBusyError), registry.lease("mlflow", "iris", wait=0.2):
        pass


def test_events_are_listed_newest_first_per_endpoint(registry: Registry) -> None:
    registry.add_event("mlflow", "iris", "deploy", service_uuid="s1", actor="a", message="one", details={"v": 1})
    registry.add_event("mlflow", "iris", "replace", outcome="failed", message="two")
    registry.add_event("mlflow", "wine", "deploy", message="other endpoint")
    events = registry.list_events("mlflow", "iris")
    assert [(e["action"], e["outcome"], e["message"]) for e in events] == [
        ("replace", "failed", "two"),
        ("deploy", "success", "one"),
    ]
    assert events[1]["details"] == {"v": 1} and events[1]["created_at"].endswith("+00:00")
    assert len(registry.list_events("mlflow", "iris", limit=1)) == 1


def test_safe_url_hides_the_password() -> None:
    assert safe_url("postgresql+psycopg2://md:s3cret@db:5432/reg") == "postgresql+psycopg2://md:***@db:5432/reg"
    assert safe_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_an_unusable_url_is_a_registry_error_naming_it_without_password() -> None:
    with pytest.raises(RegistryUnavailableError) as info:
        Registry("nosuchdialect://md:s3cret@db/reg").count_services()
    assert "registry_sql_alchemy_conn=" in str(info.value) and "s3cret" not in str(info.value)


def test_get_registry_refuses_a_non_url(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidParameterError):
        get_registry(42)  # type: ignore[arg-type]
