"""The Served Models app's answers when the registry fails: a viewer reads that it is unavailable,
never the database's user, host or address (which the registry's own error names, for the log)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from airflow_provider_modeldeploy.exceptions import RegistryUnavailableError
from airflow_provider_modeldeploy.plugins import app as app_module
from airflow_provider_modeldeploy.plugins import authz

# What psycopg2 says when the server is down, as the registry wraps it (its URL's password masked).
FAILURE = (
    "registry_sql_alchemy_conn='postgresql+psycopg2://reg_owner:***@db-prod.internal:5432/registry': database "
    'unreachable (connection to server at "db-prod.internal" (10.20.30.40), port 5432 failed: FATAL:  '
    'password authentication failed for user "reg_owner")'
)
REVEALING = ("reg_owner", "db-prod.internal", "10.20.30.40", "5432", "postgresql")


class _User:
    def get_name(self) -> str:
        return "viewer"


class _AllowAll:
    def __getattr__(self, name: str) -> Any:
        return lambda **kwargs: set() if name == "get_authorized_dag_ids" else True


class _DownRegistry:
    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise RegistryUnavailableError(FAILURE)

        return fail


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> TestClient:
    monkeypatch.setattr(authz, "_auth_manager", lambda: _AllowAll())
    monkeypatch.setattr(app_module, "_registry", lambda: _DownRegistry())
    app = app_module.create_app()
    app.dependency_overrides[authz.current_user] = _User
    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(
    ("method", "path", "accept"),
    [
        ("GET", "/api/services", "application/json"),
        ("GET", "/api/services/abcd1234", "application/json"),
        ("GET", "/api/services/abcd1234/logs", "application/json"),
        ("GET", "/services/abcd1234", "text/html"),
        ("POST", "/api/services/abcd1234/stop", "application/json"),
        ("DELETE", "/api/services/abcd1234", "application/json"),
    ],
)
def test_registry_failure_reveals_no_database_user_or_host(
    client: TestClient, method: str, path: str, accept: str
) -> None:
    body = {} if method == "POST" else None
    resp = client.request(method, path, json=body, headers={"Accept": accept, "X-Served-Models": "1"})
    assert resp.status_code == 503, resp.text
    assert app_module.REGISTRY_DOWN in resp.text
    for word in REVEALING:
        assert word not in resp.text, word
    assert "Traceback" not in resp.text
