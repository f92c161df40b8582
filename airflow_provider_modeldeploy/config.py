"""Where the provider keeps its state: the registry URL, log and runtime directories.

Values come from the ``[modeldeploy]`` section of Airflow's configuration (so
``AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN`` works), with zero-configuration defaults under
AIRFLOW_HOME.
"""

from __future__ import annotations

import os
from pathlib import Path

SECTION = "modeldeploy"
DEFAULT_CONN_ID = "modeldeploy_default"


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow").expanduser()


def get_option(key: str, fallback: str = "") -> str:
    env = os.environ.get(f"AIRFLOW__{SECTION.upper()}__{key.upper()}")
    if env is not None:
        return env
    try:
        from airflow.configuration import conf
    except ImportError:  # pragma: no cover - Airflow is a dependency; only absent in odd embeddings
        return fallback
    value = conf.get(SECTION, key, fallback=fallback)
    return fallback if value is None else str(value)


def state_dir() -> Path:
    path = Path(get_option("state_dir") or airflow_home() / "modeldeploy").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def logs_dir() -> Path:
    path = state_dir() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def runtime_dir() -> Path:
    """Directory for unix sockets; short on purpose, as socket paths are limited to 107 bytes."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    path = Path(base) / f"modeldeploy-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def registry_url() -> str:
    url = get_option("registry_sql_alchemy_conn")
    if url:
        return url
    return f"sqlite:///{state_dir() / 'registry.db'}"


def default_conn_id() -> str:
    return get_option("default_conn_id", DEFAULT_CONN_ID) or DEFAULT_CONN_ID
