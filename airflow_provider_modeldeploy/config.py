"""Where the provider keeps its state: the registry URL, log and runtime directories.

Values come from the ``[modeldeploy]`` section of Airflow's configuration (so
``AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN`` works), with zero-configuration defaults under
AIRFLOW_HOME.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from airflow_provider_modeldeploy.exceptions import ModelDeployError

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
    path.mkdir(mode=0o700, parents=True, exist_ok=True)  # the SQLite registry and the agent's records
    return path


def logs_dir() -> Path:
    path = state_dir() / "logs"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


class UnsafeDirectoryError(ModelDeployError):
    """A directory the provider keeps sockets or secrets in is not private to this user."""


def private_dir(path: Path, what: str) -> Path:
    """``path`` created 0700 if missing, else checked: a real directory (not a symlink), owned by
    this user, with no access for group or others. Anyone who could create it first could plant a
    socket there and receive model servers' environments (tracking credentials) or their sockets."""
    import stat

    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    info = path.lstat()
    problem = None
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a directory"
    elif info.st_uid != os.getuid():
        problem = f"is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
    elif info.st_mode & 0o077:
        problem = f"has mode {stat.S_IMODE(info.st_mode):04o}; it must be 0700"
    if problem:
        raise UnsafeDirectoryError(
            f"{what}={str(path)!r}: {problem}. Refusing to use it: whoever controls it could plant sockets "
            f"there. Remove it, or set [modeldeploy] {what} to a directory only this user can use."
        )
    return path


def runtime_dir() -> Path:
    """Private directory for unix sockets (the serving agent's, the model servers' control sockets);
    short on purpose, as socket paths are limited to 107 bytes."""
    configured = get_option("runtime_dir")
    if configured:
        return private_dir(Path(configured).expanduser(), "runtime_dir")
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return private_dir(Path(base) / f"modeldeploy-{os.getuid()}", "runtime_dir")


def agent_state_dir() -> Path:
    """The serving agent's own records (pid and start time of each server it runs) and server logs."""
    configured = get_option("agent_state_dir")
    path = Path(configured).expanduser() if configured else state_dir() / "agent"
    return private_dir(path, "agent_state_dir")


def agent_idle_timeout() -> float:
    """Seconds an agent started on first use lives with no model server and no request (0: forever)."""
    value = get_option("agent_idle_timeout", "600") or "600"
    try:
        return max(0.0, float(value))
    except ValueError:
        from airflow_provider_modeldeploy.exceptions import InvalidParameterError

        raise InvalidParameterError("agent_idle_timeout", value, "must be a number of seconds") from None


def metrics_interval() -> float:
    """Seconds between the serving agent's readings of its servers' /metrics."""
    value = get_option("metrics_interval", "15") or "15"
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0.5 <= seconds <= 3600:
        from airflow_provider_modeldeploy.exceptions import InvalidParameterError

        raise InvalidParameterError("metrics_interval", value, "must be a number of seconds from 0.5 to 3600")
    return seconds


def ui_max_concurrent_actions() -> int:
    """Threads the Served Models page's start / stop / rollback / delete run in (per API server process)."""
    value = get_option("ui_max_concurrent_actions", "4") or "4"
    if not value.strip().isdigit() or not 1 <= int(value) <= 64:
        from airflow_provider_modeldeploy.exceptions import InvalidParameterError

        raise InvalidParameterError("ui_max_concurrent_actions", value, "must be a whole number from 1 to 64")
    return int(value)


def registry_url() -> str:
    url = get_option("registry_sql_alchemy_conn")
    if url:
        return url
    return f"sqlite:///{state_dir() / 'registry.db'}"


def default_conn_id() -> str:
    return get_option("default_conn_id", DEFAULT_CONN_ID) or DEFAULT_CONN_ID
