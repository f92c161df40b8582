"""Unit tests: in this process only. No subprocess, no server, no network but mocked transports; the
registry is SQLite in a temporary directory. Each test gets a fresh AIRFLOW_HOME and no provider settings
from the environment it runs in."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# croniter (imported by Airflow's models, which SQLAlchemy configures along with the registry's) runs
# `file -b python` once at import to tell a 32-bit interpreter: let it do so here, before any test.
import croniter  # noqa: F401
import psutil
import pytest


@pytest.fixture(autouse=True)
def no_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A unit test that would start a process fails saying so (and starts nothing)."""

    def refuse(self: Any, args: Any, *rest: Any, **kwargs: Any) -> None:
        raise AssertionError(f"a unit test must not start a process: {args!r}")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    yield
    assert not psutil.Process().children(), "a unit test left a child process"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh AIRFLOW_HOME (hence a fresh SQLite registry under it) and no [modeldeploy] settings."""
    for key in list(os.environ):
        if key.startswith("AIRFLOW__MODELDEPLOY__") or key in ("MLFLOW_TRACKING_URI", "XDG_RUNTIME_DIR"):
            monkeypatch.delenv(key)
    home = tmp_path / "airflow"
    home.mkdir()
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    monkeypatch.setenv("_MODELDEPLOY_NO_METASTORE", "1")
    return home


@pytest.fixture
def airflow_home(isolated_env: Path) -> Path:
    return isolated_env


@pytest.fixture
def registry(airflow_home: Path) -> Iterator[Any]:
    """The configured registry: SQLite under this test's AIRFLOW_HOME, migrated at first use."""
    from airflow_provider_modeldeploy.registry import get_registry

    registry = get_registry()
    assert registry.url.startswith("sqlite:///") and str(airflow_home) in registry.url
    yield registry
    registry.dispose()
