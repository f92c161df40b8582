"""hooks/mlflow_local.py: the local MLflow backend's connection settings, parsed and checked."""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_modeldeploy.exceptions import InvalidParameterError
from airflow_provider_modeldeploy.hooks.mlflow_local import parse_port_range, strip_credentials


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5200-5399", (5200, 5399)),
        (" 5200 - 5399 ", (5200, 5399)),
        ("5200", (5200, 5200)),
        (5200, (5200, 5200)),
        ("1-65535", (1, 65535)),
        ("65535-65535", (65535, 65535)),
        ("80-80", (80, 80)),
    ],
)
def test_parse_port_range(value: Any, expected: tuple[int, int]) -> None:
    assert parse_port_range(value) == expected


@pytest.mark.parametrize(
    "value",
    ["5399-5200", "0-10", "0", "1-65536", "70000", "abc", "", None, "1-2-3", "-5", "5200-", "5200:5300", "1.5-2", True],
    ids=repr,
)
def test_parse_port_range_refuses(value: Any) -> None:
    with pytest.raises(InvalidParameterError) as info:
        parse_port_range(value)
    assert info.value.field == "port_range" and info.value.value == value
    assert str(info.value).startswith(f"port_range={value!r}: ")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("https://alice:pw@mlflow.example:5000/path?q=1", "https://mlflow.example:5000/path?q=1"),
        ("http://token@mlflow.example/", "http://mlflow.example/"),
        ("http://mlflow.example:5000", "http://mlflow.example:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        (None, None),
        ("", ""),
    ],
)
def test_strip_credentials(uri: Any, expected: Any) -> None:
    assert strip_credentials(uri) == expected


class Conn:
    """What the hook reads of an Airflow connection."""

    def __init__(self, host: str | None = None, login: str | None = None, password: str | None = None, **extra: Any):
        self.host, self.login, self.password, self.extra_dejson = host, login, password, extra


def test_settings_without_a_connection_are_the_documented_defaults(airflow_home: Any) -> None:
    from airflow_provider_modeldeploy.hooks.mlflow_local import MlflowDeployerHook

    settings = MlflowDeployerHook().get_settings()
    assert (settings.host, settings.port_range, settings.workers, settings.timeout) == (
        "127.0.0.1",
        (5200, 5399),
        1,
        60,
    )
    assert settings.tracking_uri == f"sqlite:///{airflow_home / 'mlflow' / 'mlflow.db'}"
    assert settings.agent_url is None and settings.agent_token is None


def test_settings_from_a_connection_keep_credentials_out_of_what_is_stored() -> None:
    from airflow_provider_modeldeploy.hooks.mlflow_local import MlflowDeployerHook

    conn = Conn(
        host="0.0.0.0", login="alice", password="s3cret", port_range="6000-6009", workers="3", timeout=30,
        tracking_uri="https://alice:s3cret@mlflow.example", agent_url="http://serving:7400/", agent_token="Tkn-93f1",
    )  # fmt: skip
    settings = MlflowDeployerHook(connection=conn).get_settings()
    assert settings.port_range == (6000, 6009) and settings.workers == 3 and settings.timeout == 30
    assert settings.agent_url == "http://serving:7400" and settings.agent_token == "Tkn-93f1"
    env = settings.server_env()
    assert env["MLFLOW_TRACKING_USERNAME"] == "alice" and env["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    assert env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] == "30"
    public = settings.public()
    assert "s3cret" not in repr(public) and "Tkn-93f1" not in repr(public)
    assert "Tkn-93f1" not in repr(settings) and "password='s3cret'" not in repr(settings)
    assert public["tracking_uri"] == "https://mlflow.example" and public["port_range"] == "6000-6009"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"workers": 0}, "workers"),
        ({"workers": "two"}, "workers"),
        ({"timeout": -5}, "timeout"),
        ({"port_range": "9-1"}, "port_range"),
        ({"agent_url": "serving:7400"}, "agent_url"),
        ({"agent_url": "ftp://serving"}, "agent_url"),
    ],
)
def test_bad_connection_settings_name_the_field(extra: dict[str, Any], field: str) -> None:
    from airflow_provider_modeldeploy.hooks.mlflow_local import MlflowDeployerHook

    hook = MlflowDeployerHook(connection=Conn(**extra))
    with pytest.raises(InvalidParameterError) as info:
        hook.get_settings()
    assert info.value.field == field
    ok, message = hook.test_connection()
    assert not ok and message.startswith(f"{field}=")
