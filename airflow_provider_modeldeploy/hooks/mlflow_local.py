"""The ``modeldeploy_mlflow`` connection: MLflow models served as local processes.

Fields: host (bind address, default 127.0.0.1), login / password (MLflow tracking server basic
auth, handed to model servers through their environment, never stored), and extras
``tracking_uri``, ``registry_uri``, ``port_range`` (``FIRST-LAST``), ``workers``, ``timeout``, and
``agent_url`` / ``agent_token`` (the serving agent of another host; default: this host's own).
When the connection is not defined, these defaults apply: zero configuration.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from airflow.sdk import BaseHook

from airflow_provider_modeldeploy import config
from airflow_provider_modeldeploy.exceptions import InvalidParameterError
from airflow_provider_modeldeploy.hooks.serving_agent import agent_token

DEFAULT_PORT_RANGE = "5200-5399"


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite store under AIRFLOW_HOME (the embedded default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{config.airflow_home() / 'mlflow' / 'mlflow.db'}"


def strip_credentials(uri: str | None) -> str | None:
    """The URI without user:password, for anything that is stored or shown."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def parse_port_range(value: Any) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d{1,5})\s*-\s*(\d{1,5})\s*", str(value)) or re.fullmatch(
        r"\s*(\d{1,5})()\s*", str(value)
    )
    if match:
        first = int(match[1])
        last = int(match[2] or first)
        if 1 <= first <= last <= 65535:
            return first, last
    raise InvalidParameterError("port_range", value, "use FIRST-LAST with 1 <= FIRST <= LAST <= 65535")


def _agent_url(value: Any) -> str | None:
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not re.fullmatch(r"(https?://[^/\s]+/?|unix:///\S+)", value):
        raise InvalidParameterError(
            "agent_url", value, "use http://HOST:PORT (an agent's TCP listener) or unix:///PATH"
        )
    return value.rstrip("/")


def _positive_int(name: str, value: Any, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise InvalidParameterError(name, value, "must be a positive integer")
    return number


@dataclass
class MlflowServingSettings:
    host: str = "127.0.0.1"
    port_range: tuple[int, int] = (5200, 5399)
    workers: int = 1
    timeout: int = 60
    tracking_uri: str = field(default_factory=default_tracking_uri)
    registry_uri: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in logs or tracebacks
    #: The serving agent that runs this connection's servers: ``http://host:port`` (another host's,
    #: with ``agent_token``) or None for this host's own (started on first use).
    agent_url: str | None = None
    agent_token: str | None = field(default=None, repr=False)

    def server_env(self) -> dict[str, str]:
        """Environment of a model server: where MLflow is, with credentials (never on argv)."""
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri}
        if self.registry_uri:
            env["MLFLOW_REGISTRY_URI"] = self.registry_uri
        if self.username:
            env["MLFLOW_TRACKING_USERNAME"] = self.username
        if self.password:
            env["MLFLOW_TRACKING_PASSWORD"] = self.password
        env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(self.timeout)
        return env

    def public(self) -> dict[str, Any]:
        """What may be stored in the registry or shown: no credentials."""
        return {
            "host": self.host,
            "port_range": f"{self.port_range[0]}-{self.port_range[1]}",
            "workers": self.workers,
            "timeout": self.timeout,
            "tracking_uri": strip_credentials(self.tracking_uri),
            "registry_uri": strip_credentials(self.registry_uri),
            **({"agent_url": strip_credentials(self.agent_url)} if self.agent_url else {}),
        }


class MlflowDeployerHook(BaseHook):
    """Settings for serving MLflow models as local processes, from a ``modeldeploy_mlflow`` connection.

    :param conn_id: the connection; None for the defaults (no connection needed).
    """

    conn_name_attr = "conn_id"
    default_conn_name = config.DEFAULT_CONN_ID
    conn_type = "modeldeploy_mlflow"
    hook_name = "Model Deploy: MLflow (local model servers)"

    def __init__(self, conn_id: str | None = None, connection: Any = None) -> None:
        super().__init__()
        self.conn_id = conn_id
        self._connection = connection

    def get_settings(self) -> MlflowServingSettings:
        conn = self._connection
        if conn is None and self.conn_id is not None:
            conn = self.get_connection(self.conn_id)
        if conn is None:
            return MlflowServingSettings(
                port_range=parse_port_range(DEFAULT_PORT_RANGE),
                agent_url=_agent_url(config.get_option("agent_url")),
                agent_token=agent_token(),
            )
        extra = conn.extra_dejson if hasattr(conn, "extra_dejson") else {}
        return MlflowServingSettings(
            host=conn.host or "127.0.0.1",
            port_range=parse_port_range(extra.get("port_range") or DEFAULT_PORT_RANGE),
            workers=_positive_int("workers", extra.get("workers"), 1),
            timeout=_positive_int("timeout", extra.get("timeout"), 60),
            tracking_uri=extra.get("tracking_uri") or default_tracking_uri(),
            registry_uri=extra.get("registry_uri") or None,
            username=conn.login or None,
            password=conn.password or None,
            agent_url=_agent_url(extra.get("agent_url") or config.get_option("agent_url")),
            agent_token=agent_token(extra),
        )

    def get_conn(self) -> MlflowServingSettings:
        return self.get_settings()

    def test_connection(self) -> tuple[bool, str]:
        try:
            settings = self.get_settings()
        except Exception as exc:
            return False, str(exc)
        return True, f"serving on {settings.host}, ports {settings.port_range[0]}-{settings.port_range[1]}"
