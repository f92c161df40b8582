"""config.py: where the provider keeps its state, from Airflow's configuration or zero-configuration
defaults; private directories are checked, not trusted."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from airflow_provider_modeldeploy import config
from airflow_provider_modeldeploy.exceptions import InvalidParameterError


def test_defaults_live_under_airflow_home(airflow_home: Path) -> None:
    assert config.registry_url() == f"sqlite:///{airflow_home / 'modeldeploy' / 'registry.db'}"
    assert config.state_dir() == airflow_home / "modeldeploy"
    assert config.logs_dir() == airflow_home / "modeldeploy" / "logs"
    assert config.agent_state_dir() == airflow_home / "modeldeploy" / "agent"
    assert stat.S_IMODE(os.stat(airflow_home / "modeldeploy").st_mode) == 0o700
    assert config.default_conn_id() == "modeldeploy_default" and config.agent_idle_timeout() == 600


def test_environment_settings_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__MODELDEPLOY__REGISTRY_SQL_ALCHEMY_CONN", "postgresql://db/reg")
    monkeypatch.setenv("AIRFLOW__MODELDEPLOY__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AIRFLOW__MODELDEPLOY__DEFAULT_CONN_ID", "md_prod")
    monkeypatch.setenv("AIRFLOW__MODELDEPLOY__AGENT_IDLE_TIMEOUT", "0")
    assert config.registry_url() == "postgresql://db/reg" and config.default_conn_id() == "md_prod"
    assert config.state_dir() == tmp_path / "state" and config.agent_idle_timeout() == 0


@pytest.mark.parametrize(("value", "expected"), [("30", 30.0), ("1.5", 1.5), ("-5", 0.0), ("", 600.0)])
def test_agent_idle_timeout(value: str, expected: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__MODELDEPLOY__AGENT_IDLE_TIMEOUT", value)
    assert config.agent_idle_timeout() == expected


def test_agent_idle_timeout_must_be_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__MODELDEPLOY__AGENT_IDLE_TIMEOUT", "ten minutes")
    with pytest.raises(InvalidParameterError) as info:
        config.agent_idle_timeout()
    assert info.value.field == "agent_idle_timeout"


def test_runtime_dir_default_is_per_user_under_xdg_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = config.runtime_dir()
    assert path == tmp_path / f"modeldeploy-{os.getuid()}" and stat.S_IMODE(path.stat().st_mode) == 0o700
    monkeypatch.setenv("AIRFLOW__MODELDEPLOY__RUNTIME_DIR", str(tmp_path / "rt"))
    assert config.runtime_dir() == tmp_path / "rt"


def test_a_private_dir_is_created_0700_and_accepted_again(tmp_path: Path) -> None:
    path = config.private_dir(tmp_path / "a" / "b", "runtime_dir")
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert config.private_dir(path, "runtime_dir") == path


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701, 0o710])
def test_a_directory_others_can_use_is_refused(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(config.UnsafeDirectoryError, match=f"has mode {mode:04o}; it must be 0700") as info:
        config.private_dir(shared, "runtime_dir")
    assert str(info.value).startswith(f"runtime_dir={str(shared)!r}: ")


def test_a_symlink_or_a_file_is_refused(tmp_path: Path) -> None:
    target = config.private_dir(tmp_path / "real", "runtime_dir")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(config.UnsafeDirectoryError, match="is a symbolic link"):
        config.private_dir(tmp_path / "link", "runtime_dir")
    (tmp_path / "file").write_text("")
    with pytest.raises(config.UnsafeDirectoryError, match="is not a directory"):
        config.private_dir(tmp_path / "file", "agent_state_dir")


def test_a_directory_of_another_user_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = config.private_dir(tmp_path / "mine", "runtime_dir")
    monkeypatch.setattr(os, "getuid", lambda: path.stat().st_uid + 1)
    with pytest.raises(config.UnsafeDirectoryError, match="is owned by uid"):
        config.private_dir(path, "runtime_dir")
