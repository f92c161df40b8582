"""Shared fixtures: a real MLflow tracking store with trained models, fresh AIRFLOW_HOMEs, registries
on SQLite and on the machine's real PostgreSQL, and a guard that no model server outlives the suite."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVER_MODULE = "airflow_provider_modeldeploy.serving.mlflow_server"
PG_BASE = os.environ.get("MODELDEPLOY_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
IRIS_COLUMNS = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]
IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]


def iris_payload(rows: list[list[float]] | None = None) -> dict[str, Any]:
    return {"dataframe_split": {"columns": IRIS_COLUMNS, "data": rows or IRIS_ROWS}}


#: The command lines of model servers: exec'd, forked by an agent's fork server, or (the emulator's pods)
#: forked by the emulator's kubelet.
SERVING_MODULES = (SERVER_MODULE, "airflow_provider_modeldeploy.serving.forkserver", "k8s_emulator.kubelet")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run in parallel (scripts/test.sh: pytest-xdist, ``--dist loadgroup``), the tests that share a
    module-scoped fixture (a deployed service, an api-server, a cluster) go to one worker: the fixture
    is set up once, not once per worker. Any other test may run on any worker.

    Tests marked ``long`` (a minute or more on a busy machine) are collected first: xdist hands out
    the groups first (the largest first), then single tests in collection order, and a long test
    handed out last would run alone at the end while the other workers have finished."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info and any(d.scope == "module" for defs in info.name2fixturedefs.values() for d in defs):
            _xdist_group(config, item, item.module.__name__)
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # stable: otherwise in file order


def _xdist_group(config: pytest.Config, item: pytest.Item, name: str) -> None:
    """Mark ``item`` as of the xdist group ``name``. The scheduler groups by a ``@name`` suffix of the
    node id, which pytest-xdist (3.8) writes to ``item._nodeid``; pytest 9.2 reads node ids from
    ``item._id``, so the suffix is written there too (else every group is silently ignored)."""
    item.add_marker(pytest.mark.xdist_group(name))
    if getattr(config.option, "loadgroup", False) and "@" not in item.nodeid and hasattr(item, "_id"):
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(f"{item.nodeid}@{name}")


def server_pids() -> set[int]:
    """Model server processes (masters and workers), started by an agent's fork server or exec'd, and
    the emulator's pods. The fork servers themselves (cwd /) share their command lines and are not."""
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmdline = proc.info.get("cmdline") or []
        if any(module in cmdline for module in SERVING_MODULES) and proc.info.get("cwd") not in (None, "/"):
            pids.add(proc.info["pid"])
    return pids


def service_pids(service_uuid: str) -> set[int]:
    """The processes of one service: its master (as the registry records it) and the master's workers."""
    from airflow_provider_modeldeploy.registry import get_registry

    pid = get_registry().get_service(service_uuid).pid
    try:
        master = psutil.Process(pid)
        return {pid, *(c.pid for c in master.children())}
    except (psutil.Error, TypeError, ValueError):
        return set()


def wait_for(condition: Any, timeout: float, what: str, detail: Any = lambda: "") -> Any:
    """``condition()``'s first true value, polled until ``timeout``; else fail saying what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} {detail()}".rstrip())


def agent_services(endpoint: str | None = None) -> list[dict[str, Any]]:
    """What this host's serving agent runs (every installation's), or one endpoint's."""
    from airflow_provider_modeldeploy.hooks.serving_agent import local_agent

    return [s for s in local_agent().list() if endpoint in (None, s["endpoint"])]


def kill_pids(pids: set[int]) -> None:
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGKILL)
            procs.append(proc)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def servers_under(base: str) -> set[int]:
    """Model servers whose working directory (their agent's state dir) is under ``base``.

    Under it as a path, not as a string: ``/tmp/pytest-of-root/pytest-3`` is a string prefix of another
    session's ``pytest-32``, and ``popen-gw1`` of its worker ``popen-gw10``; their servers are not ours."""
    pids = set()
    for pid in server_pids():
        with contextlib.suppress(psutil.Error):
            if Path(psutil.Process(pid).cwd()).is_relative_to(base):
                pids.add(pid)
    return pids


def _describe(pid: int) -> str:
    """A model server for a message: pid, working directory (which agent) and command line (which service)."""
    try:
        proc = psutil.Process(pid)
        return f"{pid} in {proc.cwd()}: {' '.join(proc.cmdline())[:300]}"
    except psutil.Error:
        return f"{pid} (gone)"


def agent_servers() -> set[int]:
    """Model-server processes of the session's serving agent (they run in its state directory)."""
    return servers_under(os.environ["AIRFLOW__MODELDEPLOY__AGENT_STATE_DIR"])


def stop_agents(run_dir: Path) -> None:
    """Stop the serving agent of ``run_dir`` (it leaves its servers running: they are killed apart)."""
    from airflow_provider_modeldeploy.hooks.serving_agent import AgentClient
    from airflow_provider_modeldeploy.serving.agent_api import socket_path

    path = socket_path(run_dir)
    if path.exists():
        with contextlib.suppress(Exception):
            AgentClient(f"unix://{path}").shutdown()
        deadline = time.monotonic() + 15
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture(scope="session", autouse=True)
def no_server_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One serving agent for the session (private runtime and state directories of its own), stopped
    at the end; fails the session if a model server it started is still running then.

    Servers run in the agent's state dir, under this session's temporary directory: other people's
    servers on the same machine are neither counted nor touched.
    """
    base = tmp_path_factory.getbasetemp()
    run_dir = Path(tempfile.mkdtemp(prefix="md-run-"))  # short: unix socket paths are limited
    saved = {
        k: os.environ.get(k) for k in ("AIRFLOW__MODELDEPLOY__RUNTIME_DIR", "AIRFLOW__MODELDEPLOY__AGENT_STATE_DIR")
    }
    os.environ["AIRFLOW__MODELDEPLOY__RUNTIME_DIR"] = str(run_dir)
    os.environ["AIRFLOW__MODELDEPLOY__AGENT_STATE_DIR"] = str(base / "agent")
    yield
    stop_agents(run_dir)
    left = servers_under(str(base))
    described = sorted(_describe(pid) for pid in left)  # which server, before it is killed
    kill_pids(left)
    shutil.rmtree(run_dir, ignore_errors=True)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    assert not left, "model server processes left running after the suite:\n" + "\n".join(described)


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Prometheus (tests/integration/prometheus_env.py), one per session and xdist worker. Without
    the binary the test is skipped saying so, unless it had to be there: scripts/test.sh installs it where
    it can (as root with apt, as in CI) and then sets ``MODELDEPLOY_TEST_PROMETHEUS=required``."""
    from prometheus_env import INSTALL_HINT, binary, running_prometheus

    if binary() is None:
        if os.environ.get("MODELDEPLOY_TEST_PROMETHEUS") == "required" or os.environ.get("CI"):
            pytest.fail(f"prometheus is not installed, and these tests must run here: {INSTALL_HINT}")
        pytest.skip(f"prometheus is not installed: {INSTALL_HINT}")
    with running_prometheus(tmp_path_factory.mktemp("prometheus")) as running:
        yield running


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    # Not under /tmp: the multi-host tests' hosts each have a private /tmp, and read the MLflow store here.
    path = Path(tempfile.mkdtemp(prefix="modeldeploy-tests-", dir="/var/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


BROKEN_MODEL = textwrap.dedent(
    """
    import mlflow


    class CorruptedModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            raise RuntimeError("model weights are corrupted")

        def predict(self, context, model_input, params=None):
            return model_input


    mlflow.models.set_model(CorruptedModel())
    """
)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _train_models(store: Path) -> dict[str, Any]:
    """Train and log the session's models into ``store`` (its ``mlflow.db`` and artifacts)."""
    tracking = f"sqlite:///{store / 'mlflow.db'}"
    remote = os.environ.get("MODELDEPLOY_E2E_ARTIFACT_ROOT", "").rstrip("/")
    artifacts = f"{remote}/{store.name}" if remote else (store / "artifacts").as_uri()
    script = textwrap.dedent(
        f"""
        import json, mlflow
        from mlflow import MlflowClient
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression
        mlflow.set_tracking_uri({tracking!r})
        exp = mlflow.create_experiment("tests", artifact_location={artifacts!r})
        mlflow.set_experiment("tests")
        X, y = load_iris(return_X_y=True, as_frame=True)
        # The flavors' default requirements, given: MLflow would otherwise infer them by loading each
        # model again in a subprocess (seconds of CPU per model), for a requirements.txt nothing reads here.
        sklearn_reqs = mlflow.sklearn.get_default_pip_requirements()
        out = {{}}
        for c in (1.0, 0.05):
            with mlflow.start_run() as run:
                model = LogisticRegression(C=c, max_iter=500).fit(X, y)
                info = mlflow.sklearn.log_model(model, name="model", input_example=X.head(2),
                                                registered_model_name="iris", pip_requirements=sklearn_reqs)
                out.setdefault("iris_runs", []).append(run.info.run_id)
                # MLflow 3's logged model (models:/m-<id>) and where its files are
                out.setdefault("iris_models", []).append(
                    {{"id": info.model_id, "location": mlflow.get_logged_model(info.model_id).artifact_location}})
        with mlflow.start_run() as run:
            mlflow.pyfunc.log_model(name="model", python_model={str(store / "broken_model.py")!r},
                                    registered_model_name="broken",
                                    pip_requirements=mlflow.pyfunc.get_default_pip_requirements())
        MlflowClient().set_registered_model_alias("iris", "champion", "1")
        print(json.dumps(out))
        """
    )
    (store / "broken_model.py").write_text(BROKEN_MODEL)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=store, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def _trained_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The session's trained models, trained once for all its xdist workers: the first worker to need
    them trains them (under a lock), the others reuse them; the last one done removes them.

    In /var/tmp, as ``session_dir``: the multi-host tests' hosts read the artifacts there."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # pytest's, for this session only
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex
    store = Path("/var/tmp") / f"modeldeploy-tests-models-{run_id[:16]}"
    users = shared / "mlflow-models.users"
    with _locked(shared / "mlflow-models.lock"):
        if not (store / "runs.json").exists():
            shutil.rmtree(store, ignore_errors=True)
            store.mkdir(mode=0o755)
            (store / "runs.json").write_text(json.dumps(_train_models(store)))
        users.write_text(str(int(users.read_text()) + 1 if users.exists() else 1))
        runs = json.loads((store / "runs.json").read_text())
    try:
        yield store, runs
    finally:
        with _locked(shared / "mlflow-models.lock"):
            left = int(users.read_text()) - 1
            users.write_text(str(left))
            if left == 0:
                shutil.rmtree(store, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_models(session_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A real MLflow tracking store (SQLite) with registered models, trained once per session.

    iris v1 and v2 (alias ``champion`` -> 1; ``iris_runs``: their runs, ``iris_models``: their logged
    models' ids and artifact locations), and ``broken`` v1 whose loading always fails.
    Artifacts are local files, or under ``MODELDEPLOY_E2E_ARTIFACT_ROOT`` (an ``s3://`` prefix in
    the kind cluster's MinIO, set by docker/kind/run-e2e.sh) where a real Seldon Core can fetch them.
    Each worker has its own copy of the store's database (what its tests register or move there stays
    its own); the artifacts of the session's models are shared, read only.
    """
    tracking = f"sqlite:///{session_dir / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    with _trained_store(tmp_path_factory) as (store, runs):
        shutil.copyfile(store / "mlflow.db", session_dir / "mlflow.db")
        os.environ["MLFLOW_TRACKING_URI"] = tracking
        yield {"tracking_uri": tracking, "iris_v1": "models:/iris/1", "iris_v2": "models:/iris/2", **runs}
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def _delete_all_services() -> None:
    """Delete every service of this process's registry (many tests leave rows no backend can delete:
    seeded, or of a registry made unreachable). A model server still running after its delete failed
    is killed by its pid, with a warning naming the error, so that no later test trips on it."""
    from airflow_provider_modeldeploy.deployers import find_services

    try:
        services = find_services()
    except Exception:
        return
    for service in services:
        try:
            service.delete(force=True)
        except Exception as exc:
            left: set[int] = set()
            with contextlib.suppress(psutil.Error):  # only model servers: a recorded pid may be reused
                if service.record.pid:
                    master = psutil.Process(service.record.pid)
                    left = {master.pid, *(child.pid for child in master.children(recursive=True))} & server_pids()
            if left:
                why = f"teardown: deleting service {service.uuid} failed ({exc}); killed {sorted(left)}"
                warnings.warn(why, stacklevel=1)
                kill_pids(left)


def use_airflow_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make ``home`` (created here) this process's AIRFLOW_HOME, hence its SQLite registry."""
    home.mkdir()
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
    monkeypatch.setenv("_MODELDEPLOY_NO_METASTORE", "1")
    monkeypatch.delenv("AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN", raising=False)
    return home


@pytest.fixture
def airflow_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh AIRFLOW_HOME (hence a fresh SQLite registry); every server deployed in it is deleted after."""
    yield use_airflow_home(tmp_path / "airflow", monkeypatch)
    _delete_all_services()


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """The URL of a private schema in the real PostgreSQL's ``test`` database, dropped afterwards."""
    import sqlalchemy as sa

    schema = f"md_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(PG_BASE)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    except sa.exc.OperationalError as exc:  # pragma: no cover - the machine's PostgreSQL is required
        pytest.fail(f"PostgreSQL at {PG_BASE} is not reachable: {exc}")
    try:
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


def migrated_pg_registry(url: str) -> str:
    """Migrate the registry at ``url`` by the explicit step a shared registry takes (``db-upgrade``)."""
    from airflow_provider_modeldeploy.registry.store import Registry

    migrating = Registry(url)
    migrating.upgrade()
    migrating.dispose()
    return url


@pytest.fixture
def pg_registry_url() -> Iterator[str]:
    """A private schema in the real PostgreSQL's ``test`` database, dropped afterwards."""
    with pg_schema() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, airflow_home: Path) -> Iterator[str]:
    """The registry URL on each database, set as the provider's configuration."""
    if request.param == "sqlite":
        url = f"sqlite:///{airflow_home / 'modeldeploy' / 'registry.db'}"
        os.environ["AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN"] = url
        yield url
    else:
        # A shared registry is migrated by an explicit step, as `airflow served-models db-upgrade` does.
        url = migrated_pg_registry(request.getfixturevalue("pg_registry_url"))
        os.environ["AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN"] = url
        yield url
        _delete_all_services()
    os.environ.pop("AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN", None)


@pytest.fixture
def deployer(airflow_home: Path, mlflow_models: dict[str, Any]) -> Any:
    from airflow_provider_modeldeploy.deployers import get_model_deployer

    return get_model_deployer()


def airflow_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for an ``airflow`` subprocess using this home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def airflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A metadata DB made by a real ``airflow db migrate``, once for the whole session: its xdist workers
    share it (the first to get here migrates, under a lock; the others wait for it and reuse it).

    Migrating costs an Airflow CLI start and hundreds of migrations each time, and the result does not
    depend on the AIRFLOW_HOME it is made in (default pool, log templates). Tests whose subject is not
    the migration copy it with ``migrated_airflow_db`` instead of migrating again."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # xdist: pytest-N/popen-gwK
    home = shared / "airflow-db-template"
    with open(shared / "airflow-db-template.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / "migrated").exists():
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir()
            url = f"sqlite:///{home / 'airflow.db'}"
            done = run_airflow(home, "db", "migrate", timeout=900, AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=url)
            assert done.returncode == 0, f"airflow db migrate: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            (home / "migrated").touch()
    return home / "airflow.db"


def migrated_airflow_db(template: Path, home: Path) -> Path:
    """Give ``home`` a migrated metadata DB (``airflow.db``, where Airflow's default SQLite URL points):
    a copy of the session's ``airflow_db_template``, as if ``airflow db migrate`` had just run there."""
    home.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(template, home / "airflow.db"))


def run_airflow(home: Path, *args: str, timeout: float = 600, **extra: str) -> subprocess.CompletedProcess[str]:
    """``airflow *args`` in ``home``, as ``subprocess.run`` with its output captured: the installed
    console script, forked from an interpreter with Airflow's libraries imported (cli_forker.py)."""
    from cli_forker import run_cli

    return run_cli(list(args), airflow_env(home, **extra), timeout)
