"""Every user error gives one clear message naming the field and the value, starts no process and leaves
the registry as it was; and a connection's password never lands anywhere it could be read back."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import sqlalchemy as sa
from conftest import agent_servers

from airflow_provider_modeldeploy.deployers import ServiceConfig, get_model_deployer
from airflow_provider_modeldeploy.exceptions import (
    DeploymentFailedError,
    InvalidParameterError,
    ModelDeployError,
    RegistryUnavailableError,
)
from airflow_provider_modeldeploy.hooks.serving_agent import local_agent
from airflow_provider_modeldeploy.registry import get_registry
from airflow_provider_modeldeploy.services import ServiceRecord, ServiceState

TABLE_ORDER = {"modeldeploy_service": "uuid", "modeldeploy_endpoint": "backend, name", "modeldeploy_event": "id"}
SECRET = "pa55-SECRET"


def snapshot(url: str | None = None) -> dict[str, list[tuple[str, ...]]]:
    """Every row of the registry's three tables, as text."""
    registry = get_registry(url)
    registry.ensure_schema()
    engine = sa.create_engine(registry.url)
    try:
        with engine.connect() as conn:
            return {
                table: [
                    tuple(str(v) for v in row)
                    for row in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY {order}"))
                ]
                for table, order in TABLE_ORDER.items()
            }
    finally:
        engine.dispose()


def our_servers(home: Path) -> set[int]:
    """Model-server processes of the session's agent: every test deletes its services when it ends,
    so what runs now was started by this test."""
    return agent_servers()


@pytest.fixture
def seeded(deployer: Any) -> Any:
    """A registry with content (an endpoint with a stopped service and history), so 'as it was' means something."""
    registry = get_registry()
    with registry.lease("mlflow", "seeded") as lease:
        registry.set_endpoint_address("mlflow", lease.name, {"host": "127.0.0.1", "port": 5399})
    registry.add_service(
        ServiceRecord(
            uuid="5eeded00-0000-4000-8000-000000000000", backend="mlflow", endpoint="seeded", model_name="seeded",
            model_uri="models:/iris/1", model_version="1", state=ServiceState.INACTIVE, config={"workers": 1},
        )
    )  # fmt: skip
    registry.add_event("mlflow", "seeded", "stop", service_uuid="5eeded00-0000-4000-8000-000000000000", message="x")
    return deployer


@contextlib.contextmanager
def leaves_no_trace(home: Path, url: str | None = None) -> Iterator[None]:
    before_pids = our_servers(home)
    before = snapshot(url)
    yield
    assert our_servers(home) == before_pids, "a process was started and left running"
    assert snapshot(url) == before, "the registry changed"


def assert_one_clear_message(exc: BaseException, field: str, value: Any) -> str:
    message = str(exc)
    assert isinstance(exc, ModelDeployError), f"{type(exc).__name__}: {message}"
    assert message.startswith(f"{field}={value!r}: "), message
    assert "\n" not in message and "Traceback" not in message, message
    assert len(message) < 1000, message
    # One error, not a chain of them.
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__), repr(exc.__context__)
    return message


def expect(call: Callable[[], Any], error: type[BaseException], field: str, value: Any) -> str:
    with pytest.raises(error) as info:
        call()
    print(f"{type(info.value).__name__}: {info.value}")  # the message users get, for the record
    return assert_one_clear_message(info.value, field, value)


# -- model URIs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_uri", "error", "reason"),
    [
        ("runs:/0123456789abcdef/model", DeploymentFailedError, "0123456789abcdef"),
        ("models:/iris/99", DeploymentFailedError, "99"),
        ("models:/iris/1/extra", InvalidParameterError, "models:/<name>/<version>"),
        ("models:/", InvalidParameterError, "models:/<name>/<version>"),
        ("models:/iris@", InvalidParameterError, "models:/<name>@<alias>"),
        ("foo://x", InvalidParameterError, "unknown scheme 'foo:'"),
    ],
)
def test_bad_model_uri(seeded: Any, airflow_home: Path, model_uri: str, error: type, reason: str) -> None:
    logs = Path(os.environ["AIRFLOW__MODELDEPLOY__AGENT_STATE_DIR"]) / "logs"  # where the agent keeps them
    kept = set(logs.glob("*.log"))
    with leaves_no_trace(airflow_home):
        message = expect(
            lambda: seeded.deploy_model(ServiceConfig(model_uri=model_uri, model_name="iris-bad"), timeout=120),
            error,
            "model_uri",
            model_uri,
        )
        # A model that does not load had a server process: it exited by itself, none is left.
        assert not our_servers(airflow_home)
    assert reason in message.split(": ", 1)[1], message
    assert set(logs.glob("*.log")) == kept, "the failed server's log was kept"


def test_bad_model_uri_keeps_the_served_model(deployer: Any, airflow_home: Path, mlflow_models: dict) -> None:
    """With a server at the endpoint, a bad URI fails the same way and the old server keeps serving."""
    served = deployer.deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-kept"))
    pids = our_servers(airflow_home)
    expect(
        lambda: deployer.deploy_model(ServiceConfig(model_uri="models:/iris/99", model_name="iris-kept")),
        DeploymentFailedError,
        "model_uri",
        "models:/iris/99",
    )
    assert our_servers(airflow_home) == pids
    [still] = deployer.find_model_server(model_name="iris-kept")
    assert still.uuid == served.uuid and still.is_running
    assert deployer.get_history("iris-kept")[0]["action"] == "rollback"
    deployer.delete_model_server(served.uuid)


# -- connections -------------------------------------------------------------------------------------


def test_unknown_conn_id(seeded: Any, airflow_home: Path) -> None:
    with leaves_no_trace(airflow_home):
        message = expect(lambda: get_model_deployer("nope"), InvalidParameterError, "conn_id", "nope")
    assert "no Airflow connection" in message


def test_connection_of_the_wrong_type(seeded: Any, airflow_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk import BaseHook

    monkeypatch.setenv("AIRFLOW_CONN_WRONGTYPE", json.dumps({"conn_type": "http", "host": "example.com"}))
    # Environment connections are seen outside a task too (by the CLI and by plain Python).
    assert BaseHook.get_connection("wrongtype").conn_type == "http"
    with leaves_no_trace(airflow_home):
        message = expect(lambda: get_model_deployer("wrongtype"), InvalidParameterError, "conn_id", "wrongtype")
    assert "'http'" in message and "modeldeploy_mlflow" in message


def held_port_pair() -> tuple[int, list[socket.socket]]:
    """Two consecutive ports, both bound and listening on 127.0.0.1 by this test."""
    for _ in range(200):
        first = random.randint(20000, 60000)
        held: list[socket.socket] = []
        try:
            for port in (first, first + 1):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind(("127.0.0.1", port))
                sock.listen(1)
            return first, held
        except OSError:
            for sock in held:
                sock.close()
    raise RuntimeError("no two consecutive free ports found")


def test_exhausted_port_range(
    seeded: Any, airflow_home: Path, mlflow_models: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, held = held_port_pair()
    try:
        conn = {
            "conn_type": "modeldeploy_mlflow",
            "host": "127.0.0.1",
            "extra": {"port_range": f"{first}-{first + 1}", "tracking_uri": mlflow_models["tracking_uri"]},
        }
        monkeypatch.setenv("AIRFLOW_CONN_MD_PORTS", json.dumps(conn))
        deployer = get_model_deployer("md_ports")
        assert deployer.settings.port_range == (first, first + 1)
        with leaves_no_trace(airflow_home):
            message = expect(
                lambda: deployer.deploy_model(
                    ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-ports")
                ),
                InvalidParameterError,
                "port_range",
                f"{first}-{first + 1}",
            )
        assert "in use" in message
    finally:
        for sock in held:
            sock.close()


# -- the registry database ---------------------------------------------------------------------------


def test_unreachable_registry(
    seeded: Any, airflow_home: Path, mlflow_models: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = "postgresql+psycopg2://u:s3cret@127.0.0.1:1/x"
    local = get_registry().url
    before = snapshot(local)
    pids = our_servers(airflow_home)
    monkeypatch.setenv("AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN", url)
    deployer = get_model_deployer()
    calls = {
        "deploy": lambda: deployer.deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-x")),
        "find": lambda: deployer.find_model_server(model_name="iris-x"),
        "get": lambda: deployer.get_model_server("5eeded00"),
        "history": lambda: deployer.get_history("iris-x"),
    }
    for name, call in calls.items():
        with pytest.raises(RegistryUnavailableError) as info:
            call()
        message = str(info.value)
        assert message.startswith("registry_sql_alchemy_conn='postgresql+psycopg2://u:"), (name, message)
        assert "127.0.0.1:1/x" in message and "unreachable" in message, (name, message)
        assert "s3cret" not in message and "s3cret" not in repr(info.value), (name, message)
        assert_one_clear_message(info.value, "registry_sql_alchemy_conn", message.split("=", 1)[1].split("'")[1])
    assert our_servers(airflow_home) == pids
    assert snapshot(local) == before


# -- parameters --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Bad Name!", "-x", "x-", "a" * 64, ""])
def test_invalid_model_name(seeded: Any, airflow_home: Path, mlflow_models: dict, name: str) -> None:
    with leaves_no_trace(airflow_home):
        message = expect(
            lambda: seeded.deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name=name)),
            InvalidParameterError,
            "model_name",
            name,
        )
    assert "1-63 letters" in message


def test_invalid_endpoint_name(seeded: Any, airflow_home: Path, mlflow_models: dict) -> None:
    with leaves_no_trace(airflow_home):
        expect(
            lambda: seeded.deploy_model(
                ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="ok", endpoint="a b")
            ),
            InvalidParameterError,
            "endpoint",
            "a b",
        )


@pytest.mark.parametrize(
    ("options", "field", "value", "reason"),
    [
        ({"replicas": 2}, "replicas", 2, "not an option of the mlflow backend"),
        ({"workers": "2"}, "workers", "2", "must be an integer"),
        ({"workers": 0}, "workers", 0, "positive"),
        ({"port": 70000}, "port", 70000, "between 1 and 65535"),
        ({"smoke_input": "{not json"}, "smoke_input", "{not json", "not JSON"),
    ],
)
def test_invalid_backend_option(
    seeded: Any, airflow_home: Path, mlflow_models: dict, options: dict, field: str, value: Any, reason: str
) -> None:
    config = ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-opt", **options)
    with leaves_no_trace(airflow_home):
        message = expect(lambda: seeded.deploy_model(config), InvalidParameterError, field, value)
    assert reason in message
    if field == "replicas":
        assert "workers" in message  # the known options are listed


@pytest.mark.parametrize("timeout", [0, -1, 0.0, -0.5, True, "60"])
def test_invalid_timeout(seeded: Any, airflow_home: Path, mlflow_models: dict, timeout: Any) -> None:
    config = ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-timeout")
    with leaves_no_trace(airflow_home):
        message = expect(
            lambda: seeded.deploy_model(config, timeout=timeout), InvalidParameterError, "timeout", timeout
        )
    assert "positive" in message


# -- secrets -----------------------------------------------------------------------------------------


def registry_dump() -> str:
    return json.dumps(snapshot())


def test_connection_password_is_never_stored_or_shown(
    airflow_home: Path, mlflow_models: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_provider_modeldeploy.operators.served_models import service_record

    conn = {
        "conn_type": "modeldeploy_mlflow",
        "host": "127.0.0.1",
        "login": "alice",
        "password": SECRET,
        "extra": {"tracking_uri": mlflow_models["tracking_uri"]},
    }
    monkeypatch.setenv("AIRFLOW_CONN_MD_SECRET", json.dumps(conn))
    deployer = get_model_deployer("md_secret")
    assert deployer.settings.password == SECRET and deployer.settings.username == "alice"
    assert SECRET not in repr(deployer.settings), "the settings' repr (logs, tracebacks) shows the password"

    service = deployer.deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-secret"))
    try:
        assert service.is_running and service.record.conn_id == "md_secret"
        assert SECRET not in registry_dump()
        assert SECRET not in json.dumps(service.to_dict())
        assert SECRET not in json.dumps(service_record(service))
        assert SECRET not in repr(service)
        assert SECRET not in json.dumps(deployer.get_history(service.uuid))
        log_lines = list(deployer.get_model_server_logs(service.uuid))
        assert any("loading" in line for line in log_lines), log_lines
        assert not any(SECRET in line for line in log_lines)

        # No process shows it: not on a command line, not in /proc/<pid>/environ (a forked server's is
        # its fork server's; the credentials reach MLflow in the server's memory, from the agent).
        master = psutil.Process(service.record.pid)
        agent = psutil.Process(local_agent().health()["pid"])
        family = {master, *master.children(recursive=True), agent, *agent.children(recursive=True)}
        for proc in family:
            assert not any(SECRET in arg for arg in proc.cmdline()), proc.cmdline()
            environ = proc.environ()
            assert not [k for k, v in environ.items() if SECRET in v], f"the password is in {proc.pid}'s environment"
            assert not [k for k in environ if k.startswith("AIRFLOW")], proc.pid
        # The agent keeps it, to restart the server, only in a file no one else may read.
        record = Path(os.environ["AIRFLOW__MODELDEPLOY__AGENT_STATE_DIR"]) / "services" / f"{service.uuid}.json"
        assert json.loads(record.read_text())["env"]["MLFLOW_TRACKING_PASSWORD"] == SECRET
        assert stat.S_IMODE(record.stat().st_mode) == 0o600 and stat.S_IMODE(record.parent.stat().st_mode) == 0o700
    finally:
        deployer.delete_model_server(service.uuid)
    assert not our_servers(airflow_home)
    assert SECRET not in registry_dump()
