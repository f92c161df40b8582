"""The served-models registry on SQLite and on the real PostgreSQL: schema, constraints, leases, queries,
and four processes racing to deploy one endpoint."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid as uuidlib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
import sqlalchemy as sa
from cli_forker import run_python
from conftest import agent_servers, iris_payload, run_airflow
from local_http import HTTP
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from airflow_provider_modeldeploy.exceptions import EndpointBusyError, RegistryUnavailableError, ServiceNotFoundError
from airflow_provider_modeldeploy.registry import get_registry
from airflow_provider_modeldeploy.registry.models import endpoints, metadata
from airflow_provider_modeldeploy.registry.store import HEAD_REVISION, HOSTNAME, VERSION_TABLE, Registry, utcnow
from airflow_provider_modeldeploy.services import ServiceRecord, ServiceState

TABLES = {"modeldeploy_service", "modeldeploy_endpoint", "modeldeploy_event"}
SCRIPT_LOCATION = "airflow_provider_modeldeploy:registry/migrations"


def record(
    endpoint: str = "ep", state: ServiceState = ServiceState.INACTIVE, uuid: str | None = None, **values: Any
) -> ServiceRecord:
    values.setdefault("backend", "mlflow")
    values.setdefault("model_name", endpoint)
    values.setdefault("model_uri", f"models:/{endpoint}/1")
    return ServiceRecord(uuid=uuid or str(uuidlib.uuid4()), endpoint=endpoint, state=state, **values)


def table_names(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


def set_lock(registry: Registry, name: str, **values: Any) -> None:
    with registry.session() as s:
        s.execute(update(endpoints).where(endpoints.c.backend == "mlflow", endpoints.c.name == name).values(**values))


# -- schema ----------------------------------------------------------------------------------------


def test_schema_is_created_by_alembic_at_first_use(registry_url: str) -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    if registry_url.startswith("sqlite"):
        assert not Path(registry_url.split("///", 1)[1]).exists()
    # (PostgreSQL: created by the fixture's explicit upgrade step; see the next test.)

    registry = get_registry()
    assert registry.url == registry_url
    assert registry.count_services() == 0  # first use
    if registry_url.startswith("sqlite"):  # private: lineage, errors and the agents' addresses
        db = Path(registry_url.split("///", 1)[1])
        assert (db.stat().st_mode & 0o777, db.parent.stat().st_mode & 0o777) == (0o600, 0o700)

    assert TABLES | {VERSION_TABLE} <= table_names(registry_url)
    with registry.engine.connect() as conn:
        versions = conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    assert versions == [HEAD_REVISION]

    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    script = ScriptDirectory.from_config(cfg)
    assert script.get_heads() == [HEAD_REVISION], "HEAD_REVISION must be the single head of migrations/versions"
    assert script.get_current_head() == HEAD_REVISION

    # Another process (a fresh Registry) finds the schema current and does not migrate again.
    other = Registry(registry_url)
    try:
        other.ensure_schema()
        assert other.count_services() == 0
    finally:
        other.dispose()


def test_a_shared_registry_is_migrated_by_an_explicit_step_only(pg_registry_url: str, tmp_path: Path) -> None:
    """PostgreSQL: first use does not create tables (no API server request migrates a database other
    hosts use) but says what to run; `airflow served-models db-upgrade` does it; a schema newer than
    the provider's is refused, naming both revisions."""
    registry = Registry(pg_registry_url)
    try:
        with pytest.raises(RegistryUnavailableError, match=r"revision 'none \(no tables\)'.*needs '0002'.*db-upgrade"):
            registry.count_services()
        assert not (TABLES | {VERSION_TABLE}) & table_names(pg_registry_url)
    finally:
        registry.dispose()
    home = tmp_path / "airflow"
    home.mkdir()
    done = run_airflow(
        home, "served-models", "db-upgrade", AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN=pg_registry_url
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"upgraded from no tables to revision {HEAD_REVISION}" in done.stdout
    assert TABLES | {VERSION_TABLE} <= table_names(pg_registry_url)
    again = run_airflow(
        home, "served-models", "db-upgrade", AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN=pg_registry_url
    )
    assert f"already at revision {HEAD_REVISION}" in again.stdout
    engine = sa.create_engine(pg_registry_url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '0099'"))
    engine.dispose()
    newer = Registry(pg_registry_url)
    try:
        with pytest.raises(RegistryUnavailableError, match=r"revision '0099', newer than this provider's '0002'"):
            newer.count_services()
    finally:
        newer.dispose()
    done = run_airflow(home, "served-models", "list", AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN=pg_registry_url)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "newer than this provider's '0002'" in done.stderr and "password" not in done.stderr


def test_models_and_migration_are_in_sync(registry_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    registry = get_registry()
    registry.ensure_schema()
    with registry.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, "compare_type": True})
        diffs = compare_metadata(context, metadata)
    assert diffs == []

    # The partial unique index exists in the database, unique and on (backend, endpoint).
    engine = registry.engine
    indexes = {ix["name"]: ix for ix in sa.inspect(engine).get_indexes("modeldeploy_service")}
    one_active = indexes["uq_modeldeploy_service_one_active"]
    assert one_active["unique"] and one_active["column_names"] == ["backend", "endpoint"]
    if engine.dialect.name == "postgresql":
        assert "active" in one_active["dialect_options"]["postgresql_where"]
    else:
        with engine.connect() as conn:
            ddl = conn.execute(
                sa.text("SELECT sql FROM sqlite_master WHERE name = 'uq_modeldeploy_service_one_active'")
            ).scalar()
        assert "WHERE state = 'active'" in ddl


def test_one_active_service_per_endpoint(registry_url: str) -> None:
    registry = get_registry()
    first = registry.add_service(record("one", ServiceState.ACTIVE))
    with pytest.raises(IntegrityError):
        registry.add_service(record("one", ServiceState.ACTIVE))

    # Inactive, error and pending services of the endpoint are allowed beside it, and actives elsewhere.
    registry.add_service(record("one", ServiceState.INACTIVE))
    registry.add_service(record("one", ServiceState.INACTIVE))
    registry.add_service(record("one", ServiceState.ERROR))
    registry.add_service(record("one", ServiceState.PENDING))
    registry.add_service(record("two", ServiceState.ACTIVE))
    registry.add_service(record("one", ServiceState.ACTIVE, backend="seldon"))
    assert len(registry.find_services(backend="mlflow", endpoint="one")) == 5

    # Updating a second service to active is refused too, and activate() says so without retiring anything.
    pending = registry.find_services(endpoint="one", states=[ServiceState.PENDING])[0]
    with pytest.raises(IntegrityError):
        registry.update_service(pending.uuid, state=ServiceState.ACTIVE)
    inactive = registry.find_services(endpoint="one", states=[ServiceState.INACTIVE])
    with pytest.raises(EndpointBusyError, match=rf"uuid='{pending.uuid}'"):
        registry.activate(pending.uuid, retire=[inactive[0].uuid])
    assert registry.get_service(inactive[0].uuid).state == ServiceState.INACTIVE
    assert registry.get_service(pending.uuid).state == ServiceState.PENDING
    assert [r.uuid for r in registry.find_services(endpoint="one", states=[ServiceState.ACTIVE], backend="mlflow")] == [
        first.uuid
    ]

    # Retiring the active one in the same transaction lets the next one become active.
    active = registry.activate(pending.uuid, retire=[first.uuid], prediction_url="http://x/invocations", pid=1)
    assert active.state == ServiceState.ACTIVE and active.prediction_url == "http://x/invocations"
    with pytest.raises(ServiceNotFoundError):
        registry.get_service(first.uuid)


# -- the endpoint lease ----------------------------------------------------------------------------


def test_lease_serialises_and_times_out(registry_url: str) -> None:
    registry = get_registry()
    with registry.lease("mlflow", "leased", conn_id="c1", wait=5) as held:
        assert held.created
        row = registry.get_endpoint("mlflow", "leased")
        assert (row.lock_owner, row.lock_host, row.lock_pid) == (held.owner, HOSTNAME, os.getpid())
        assert row.conn_id == "c1"
        start = time.monotonic()
        with (
            pytest.raises(EndpointBusyError, match=rf"endpoint='leased'.*{HOSTNAME}:{os.getpid()}"),
            registry.lease("mlflow", "leased", wait=0.6),
        ):
            pytest.fail("a second lease was granted while the first is held")
        assert 0.6 <= time.monotonic() - start < 10
        # Other endpoints are independent.
        with registry.lease("mlflow", "other", wait=0.5):
            pass
    row = registry.get_endpoint("mlflow", "leased")
    assert row.lock_owner is None and row.lock_pid is None and row.lock_expires_at is None
    with registry.lease("mlflow", "leased", wait=0.5) as again:
        assert not again.created

    # A holder alive in another process keeps the lease.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        set_lock(
            registry, "leased", lock_owner="someone", lock_host=HOSTNAME, lock_pid=sleeper.pid,
            lock_expires_at=utcnow() + timedelta(hours=1),
        )  # fmt: skip
        with (
            pytest.raises(EndpointBusyError, match=rf"{HOSTNAME}:{sleeper.pid}"),
            registry.lease("mlflow", "leased", wait=0.5),
        ):
            pass
    finally:
        sleeper.kill()
        sleeper.wait()


def test_lease_of_a_dead_holder_is_taken_over(registry_url: str) -> None:
    registry = get_registry()
    with registry.lease("mlflow", "crashed", wait=1):
        pass
    pid = dead_pid()
    set_lock(
        registry, "crashed", lock_owner="dead-owner", lock_host=HOSTNAME, lock_pid=pid,
        lock_expires_at=utcnow() + timedelta(hours=1),
    )  # fmt: skip
    start = time.monotonic()
    with registry.lease("mlflow", "crashed", wait=5) as lease:
        assert time.monotonic() - start < 3, "a dead holder's lease must be taken over at once, not waited for"
        row = registry.get_endpoint("mlflow", "crashed")
        assert row.lock_owner == lease.owner and row.lock_pid == os.getpid()

    # A holder on another host cannot be checked: it keeps the lease until it expires...
    set_lock(
        registry, "crashed", lock_owner="remote", lock_host="elsewhere.example", lock_pid=pid,
        lock_expires_at=utcnow() + timedelta(hours=1),
    )  # fmt: skip
    with pytest.raises(EndpointBusyError, match=r"elsewhere\.example"), registry.lease("mlflow", "crashed", wait=0.5):
        pass
    # ...and an expired lease is free, whoever held it.
    set_lock(registry, "crashed", lock_expires_at=utcnow() - timedelta(seconds=1))
    with registry.lease("mlflow", "crashed", wait=1) as lease:
        assert registry.get_endpoint("mlflow", "crashed").lock_owner == lease.owner


# -- queries ---------------------------------------------------------------------------------------


def test_get_service_by_unique_prefix(registry_url: str) -> None:
    registry = get_registry()
    a = registry.add_service(record(uuid="abcd1234-0000-4000-8000-000000000001"))
    b = registry.add_service(record(uuid="abcd5678-0000-4000-8000-000000000002"))
    c = registry.add_service(record(uuid="ffff0000-0000-4000-8000-000000000003"))
    assert registry.get_service(a.uuid).uuid == a.uuid
    assert registry.get_service("abcd1").uuid == a.uuid
    assert registry.get_service("abcd5").uuid == b.uuid
    assert registry.get_service("ffff").uuid == c.uuid
    for prefix in ("abcd", "fff", "zzzz", "%%%%", "____", ""):
        with pytest.raises(ServiceNotFoundError) as info:
            registry.get_service(prefix)
        assert str(info.value).startswith(f"uuid={prefix!r}: ")
    got = registry.get_service("abcd1")
    assert got.created_at is not None and got.created_at.tzinfo is not None
    # An ambiguous prefix names the candidates, in one line.
    with pytest.raises(ServiceNotFoundError) as info:
        registry.get_service("abcd")
    message = str(info.value)
    assert "several services" in message and a.uuid in message and b.uuid in message and c.uuid not in message
    assert "\n" not in message


def test_find_services_filters_and_paging(registry_url: str) -> None:
    registry = get_registry()
    made = [
        registry.add_service(record("alpha", ServiceState.ACTIVE, dag_id="d1", task_id="t1", run_id="r1")),
        registry.add_service(record("alpha", ServiceState.INACTIVE, dag_id="d1", task_id="t2", run_id="r1")),
        registry.add_service(record("alpha", ServiceState.ERROR, dag_id="d2", task_id="t1", run_id="r2")),
        registry.add_service(record("beta", ServiceState.ACTIVE, model_name="bm", dag_id="d2", task_id="t1")),
        registry.add_service(record("beta", ServiceState.PENDING, model_name="bm")),
        registry.add_service(record("gamma", ServiceState.ACTIVE, backend="seldon", dag_id="d1", task_id="t1")),
        registry.add_service(record("delta", ServiceState.INACTIVE, conn_id="c")),
    ]
    ids = [r.uuid for r in made]

    def found(**filters: Any) -> set[str]:
        return {r.uuid for r in registry.find_services(**filters)}

    assert registry.count_services() == 7
    assert found() == set(ids)
    assert found(endpoint="alpha") == set(ids[:3])
    assert found(model_name="bm") == {ids[3], ids[4]}
    assert found(backend="seldon") == {ids[5]}
    assert found(backend="mlflow") == set(ids) - {ids[5]}
    assert found(dag_id="d1") == {ids[0], ids[1], ids[5]}
    assert found(dag_id="d1", task_id="t1") == {ids[0], ids[5]}
    assert found(dag_id="d1", task_id="t1", backend="mlflow") == {ids[0]}
    assert found(run_id="r2") == {ids[2]}
    assert found(states=[ServiceState.ACTIVE]) == {ids[0], ids[3], ids[5]}
    assert found(states=[ServiceState.PENDING, ServiceState.ERROR]) == {ids[2], ids[4]}
    assert found(states=[]) == set()
    assert found(endpoint="alpha", states=[ServiceState.INACTIVE]) == {ids[1]}
    assert found(service_uuid=ids[6][:8]) == {ids[6]}
    assert found(endpoint="nope") == set()

    # Newest first (ties broken by uuid); pages tile the full list exactly.
    everything = registry.find_services()
    keys = [(r.updated_at, r.uuid) for r in everything]
    assert keys == sorted(keys, key=lambda k: (-k[0].timestamp(), k[1]))
    assert everything[0].uuid == ids[6]
    pages = [registry.find_services(limit=3, offset=offset) for offset in (0, 3, 6, 9)]
    assert [len(p) for p in pages] == [3, 3, 1, 0]
    assert [r.uuid for p in pages for r in p] == [r.uuid for r in everything]
    assert [r.uuid for r in registry.find_services(endpoint="alpha", limit=2, offset=1)] == [
        r.uuid for r in everything if r.endpoint == "alpha"
    ][1:3]
    assert registry.find_services(limit=0) == []

    # An update moves a service to the front.
    registry.update_service(ids[0], last_error="touched")
    assert registry.find_services(limit=1)[0].uuid == ids[0]


# -- four processes deploy one endpoint at once ---------------------------------------------------

RACE_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path

    from airflow_provider_modeldeploy.deployers import ServiceConfig, get_model_deployer
    from airflow_provider_modeldeploy.exceptions import ModelDeployError
    from airflow_provider_modeldeploy.services import Lineage

    index, model_uri, workdir = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    deployer = get_model_deployer()
    (workdir / f"ready-{index}").touch()
    while not (workdir / "go").exists():
        if (workdir / "abandon").exists():
            sys.exit(3)
        time.sleep(0.005)
    started = time.time()
    lineage = Lineage(dag_id="race", run_id=f"run_{index}", task_id="deploy", try_number=1)
    try:
        service = deployer.deploy_model(ServiceConfig(model_uri=model_uri, model_name="iris-race"), lineage=lineage)
        # When the deployment began under the endpoint's lease: its service's row was made then.
        out = {"ok": True, "uuid": service.uuid, "version": service.record.model_version,
               "url": service.prediction_url, "created_at": service.record.created_at.timestamp()}
    except ModelDeployError as exc:
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    out.update(index=index, started=started, ended=time.time())
    print("RESULT " + json.dumps(out), flush=True)
    sys.exit(0 if out["ok"] else 1)
    """
)


def our_servers(home: Path) -> set[int]:
    """Model-server processes of the session's agent: every test deletes its services when it ends,
    so what runs now was started by this test."""
    return agent_servers()


def test_four_processes_deploy_one_endpoint_at_once(
    registry_url: str, airflow_home: Path, mlflow_models: dict[str, Any], tmp_path: Path
) -> None:
    workdir = tmp_path / "race"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(
        MLFLOW_TRACKING_URI=mlflow_models["tracking_uri"],
        AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN=registry_url,
        AIRFLOW_HOME=str(airflow_home),
        _MODELDEPLOY_NO_METASTORE="1",
    )
    uris = [mlflow_models["iris_v1"], mlflow_models["iris_v2"]]
    # Four processes (`python -c`, forked from the preloaded interpreter of cli_forker.py where it can).
    done: dict[int, subprocess.CompletedProcess[str]] = {}

    def racer(index: int) -> None:
        done[index] = run_python(RACE_SCRIPT, [str(index), uris[index % 2], str(workdir)], env, timeout=480)

    threads = [threading.Thread(target=racer, args=(index,), daemon=True) for index in range(4)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 180
        while not all((workdir / f"ready-{i}").exists() for i in range(4)):
            assert all(t.is_alive() for t in threads), f"a racer died before the start: {done}"
            assert time.monotonic() < deadline, "the racers did not get ready"
            time.sleep(0.05)
        (workdir / "go").touch()
    finally:
        if not (workdir / "go").exists():
            (workdir / "abandon").touch()  # each racer exits (a timeout kills one that does not)
        for thread in threads:
            thread.join(500)
    assert sorted(done) == [0, 1, 2, 3], done

    results = []
    for index in range(4):
        code, text = done[index].returncode, done[index].stdout + done[index].stderr
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        assert lines, f"racer {index} exited {code} without a result:\n{text[-3000:]}"
        result = json.loads(lines[-1][len("RESULT ") :])
        assert code == (0 if result["ok"] else 1), text[-3000:]
        if not result["ok"]:
            # A failure is allowed only as one clear, single-line ModelDeployError message.
            assert "\n" not in result["error"] and "Traceback" not in text, text[-3000:]
        results.append(result)
    print(f"race on {registry_url.split(':')[0]}: " + json.dumps(results, indent=1))
    # Every racer succeeds: the endpoint's lease serialises them, each waiting for the one before.
    assert all(r["ok"] for r in results), f"a racer failed: {results}"
    succeeded = sorted(results, key=lambda r: r["ended"])

    # Exactly one active service for the endpoint, the one of the racer that finished last.
    registry = get_registry(registry_url)
    services = registry.find_services(endpoint="iris-race")
    assert len(services) == 1, services
    [active] = services
    assert active.state == ServiceState.ACTIVE and active.uuid == succeeded[-1]["uuid"]
    assert len({r["url"] for r in succeeded}) == 1, "the endpoint's URL changed between replaces"
    answer = HTTP.post(active.prediction_url, json=iris_payload(), timeout=30)
    assert answer.status_code == 200 and answer.headers["x-model-version"] == active.model_version

    # Exactly one server process tree: the active service's master and its workers.
    pids = our_servers(airflow_home)
    master = psutil.Process(active.pid)
    tree = {master.pid} | {c.pid for c in master.children(recursive=True)}
    assert pids == tree, f"server processes {sorted(pids)} besides the active tree {sorted(tree)}"

    # The history: one deploy, then one replace per later racer, chained in order.
    events = list(reversed(registry.list_events("mlflow", "iris-race")))
    assert [e["action"] for e in events] == ["deploy"] + ["replace"] * (len(succeeded) - 1), events
    assert all(e["outcome"] == "success" for e in events)
    assert [e["service_uuid"] for e in events] == [r["uuid"] for r in succeeded]
    assert events[0]["details"]["previous_uuid"] is None
    for before, after in itertools.pairwise(events):
        assert after["details"]["previous_uuid"] == before["service_uuid"]
    assert len({e["actor"] for e in events}) == len(events)
    # One deployment at a time: each one's interval, from its service's creation under the lease to
    # its deploy/replace event (both written by the registry), ends before the next one begins.
    intervals = [
        (r["created_at"], datetime.fromisoformat(e["created_at"]).timestamp())
        for r, e in zip(succeeded, events, strict=True)
    ]
    assert all(start < end for start, end in intervals), intervals
    for (_, end), (start, _) in itertools.pairwise(intervals):
        assert end <= start, f"deployments overlapped: {intervals}"
    endpoint = registry.get_endpoint("mlflow", "iris-race")
    assert endpoint.lock_owner is None and endpoint.address["port"] == urlsplit(active.prediction_url).port

    from airflow_provider_modeldeploy.deployers import get_model_deployer

    get_model_deployer().delete_model_server(active.uuid)
    assert not our_servers(airflow_home)
