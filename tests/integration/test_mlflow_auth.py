"""``models:/`` URIs deployed from a real ``mlflow server --app-name basic-auth`` (MLflow's own
authentication app, its user store and permissions): the connection's login and password are what the
model server sends; wrong or missing credentials are one clear error that names the tracking server,
starts nothing and leaves the registry and the served model as they were."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import IRIS_COLUMNS, IRIS_ROWS, agent_servers, wait_for
from local_http import HTTP
from ui_helpers import free_port, stop_process_tree

from airflow_provider_modeldeploy.deployers import ServiceConfig, get_model_deployer
from airflow_provider_modeldeploy.exceptions import ModelDeployError

BIN = Path(sys.executable).parent
ADMIN_PASSWORD = secrets.token_urlsafe(12)
ALICE_PASSWORD = secrets.token_urlsafe(12)
BOB_PASSWORD = secrets.token_urlsafe(12)


@pytest.fixture(scope="module")
def auth_server(mlflow_models: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """MLflow's basic-auth tracking server on a copy of the session's store, with a user ``alice``
    and ``bob`` created through its REST API by the admin; only alice may read ``iris``."""
    workdir = tmp_path_factory.mktemp("mlflow-auth")
    db = workdir / "mlflow.db"
    shutil.copy(mlflow_models["tracking_uri"].removeprefix("sqlite:///"), db)
    config = workdir / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{workdir / 'auth.db'}\n"
        f"admin_username = admin\nadmin_password = {ADMIN_PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MLFLOW_"))}
    env |= {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),  # the auth app's CSRF key, required
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log = workdir / "mlflow-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--backend-store-uri", f"sqlite:///{db}",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    try:

        def up() -> bool:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                return HTTP.get(f"{url}/health", timeout=2).status_code == 200
            return False

        wait_for(up, 180, "MLflow's basic-auth server", lambda: log.read_text(errors="replace")[-3000:])
        # The server really asks for credentials (else the test below proves nothing).
        search = f"{url}/api/2.0/mlflow/registered-models/get"
        assert HTTP.get(search, params={"name": "iris"}, timeout=10).status_code == 401
        for user, password in (("alice", ALICE_PASSWORD), ("bob", BOB_PASSWORD)):
            created = HTTP.post(
                f"{url}/api/2.0/mlflow/users/create",
                json={"username": user, "password": password},
                auth=("admin", ADMIN_PASSWORD),
                timeout=30,
            )
            assert created.status_code == 200, created.text
        assert HTTP.get(search, params={"name": "iris"}, auth=("alice", ALICE_PASSWORD), timeout=10).status_code == 403
        # Least privilege: nobody reads anything unless granted; the admin grants alice READ on iris
        # through MLflow's permissions API, and bob nothing.
        granted = HTTP.post(
            f"{url}/api/3.0/mlflow/users/permissions/grant",
            json={
                "username": "alice",
                "resource_type": "registered_model",
                "resource_id": "iris",
                "permission": "READ",
            },
            auth=("admin", ADMIN_PASSWORD),
            timeout=30,
        )
        assert granted.status_code == 200, granted.text
        assert HTTP.get(search, params={"name": "iris"}, auth=("alice", ALICE_PASSWORD), timeout=10).is_success
        assert HTTP.get(search, params={"name": "iris"}, auth=("bob", BOB_PASSWORD), timeout=10).status_code == 403
        yield url
    finally:
        stop_process_tree(proc.pid)
        text = log.read_text(errors="replace")
        if any(password in text for password in (ADMIN_PASSWORD, ALICE_PASSWORD, BOB_PASSWORD)):
            pytest.fail("a password is in the MLflow server's log")


def use_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, url: str, **auth: str) -> Any:
    conn = {"conn_type": "modeldeploy_mlflow", "host": "127.0.0.1", "extra": {"tracking_uri": url}, **auth}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return get_model_deployer(conn_id)


def predict(url: str) -> list[Any]:
    answer = HTTP.post(url, json={"dataframe_split": {"columns": IRIS_COLUMNS, "data": IRIS_ROWS}}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["predictions"]


def test_models_uris_from_a_basic_auth_server(
    airflow_home: Path, auth_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_provider_modeldeploy.deployers import find_services

    alice = use_connection(monkeypatch, "md_auth_alice", auth_server, login="alice", password=ALICE_PASSWORD)
    service = alice.deploy_model(ServiceConfig(model_uri="models:/iris@champion", model_name="iris-auth"))
    try:
        assert service.is_running and service.record.model_version == "1", service.to_dict()
        served = service.record.prediction_url
        first = predict(served)
        assert len(first) == len(IRIS_ROWS)
        servers = agent_servers()
        before = [s.to_dict() for s in find_services(model_name="iris-auth")]

        # Wrong password, none, then a user without permission on the model: MLflow answers 401, 403; one clear error naming the tracking server and
        # the model URI, no second server, and the served v1 untouched (registry and answers).
        wrong = use_connection(monkeypatch, "md_auth_wrong", auth_server, login="alice", password="not-her-password")
        anonymous = use_connection(monkeypatch, "md_auth_none", auth_server)
        bob = use_connection(monkeypatch, "md_auth_bob", auth_server, login="bob", password=BOB_PASSWORD)
        refusals = (
            (wrong, "refused the connection's credentials for user 'alice' (HTTP 401)"),
            (anonymous, "asks for credentials and the connection has none (HTTP 401): set its login and password"),
            (bob, "refused user 'bob' access to this model (HTTP 403)"),
        )
        for deployer, reason in refusals:
            with pytest.raises(ModelDeployError) as caught:
                deployer.deploy_model(
                    ServiceConfig(model_uri="models:/iris/2", model_name="iris-auth"), replace=True, timeout=120
                )
            message = str(caught.value)
            assert message == f"model_uri='models:/iris/2': the tracking server {auth_server} {reason}", message
            assert agent_servers() == servers, "a refused deploy left a server behind"
            assert [s.to_dict() for s in find_services(model_name="iris-auth")] == before
            assert predict(served) == first
    finally:
        alice.delete_model_server(service.uuid)
    assert not agent_servers()
