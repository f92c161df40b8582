"""cli/: ``airflow served-models`` argument parsing (from the provider's command definitions) and the
commands, against a mocked deployer. Errors are one line on stderr and exit code 1."""

from __future__ import annotations

import argparse
import json
from typing import Any
from unittest import mock

import pytest

from airflow_provider_modeldeploy import deployers
from airflow_provider_modeldeploy.cli import commands
from airflow_provider_modeldeploy.cli.definition import SERVED_MODELS_COMMANDS, get_served_models_cli_commands
from airflow_provider_modeldeploy.deployers.base import SyncReport
from airflow_provider_modeldeploy.exceptions import ServiceNotFoundError
from airflow_provider_modeldeploy.metrics import ServiceMetrics
from airflow_provider_modeldeploy.services import Service, ServiceRecord, ServiceState

UUID = "c11c11c1-0000-4000-8000-000000000001"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="airflow served-models")
    sub = parser.add_subparsers(dest="subcommand", required=True)
    for command in SERVED_MODELS_COMMANDS:
        command_parser = sub.add_parser(command.name)
        for arg in command.args:
            arg.add_to_parser(command_parser)
        command_parser.set_defaults(func=command.func)
    return parser.parse_args(argv)


def test_the_group_and_its_commands() -> None:
    [group] = get_served_models_cli_commands()
    assert group.name == "served-models"
    assert {c.name for c in group.subcommands} == {
        "list", "describe", "get-url", "logs", "start", "stop", "delete", "promote", "rollback", "sync",
        "db-upgrade", "agent", "render",
    }  # fmt: skip


def test_defaults_and_options_parse() -> None:
    args = parse("list")
    assert (args.limit, args.offset, args.running, args.output, args.model) == (100, 0, False, "table", None)
    args = parse("list", "--model", "iris", "--running", "--limit", "0", "-o", "json")
    assert (args.model, args.running, args.limit, args.output) == ("iris", True, 0, "json")
    args = parse("stop", UUID, "--timeout", "2.5", "--force")
    assert (args.uuid, args.timeout, args.force) == (UUID, 2.5, True)
    assert parse("logs", "c11c", "--tail", "5", "-f").follow is True
    assert parse("rollback", UUID, "--to", "abcd").to == "abcd"
    assert parse("sync", "--conn-id", "a", "--conn-id", "b", "--dry-run").conn_ids == ["a", "b"]
    assert parse("delete", UUID, "-y").yes is True


@pytest.mark.parametrize(
    "argv",
    [
        ("stop", UUID, "--timeout", "0"),
        ("stop", UUID, "--timeout", "soon"),
        ("list", "--limit", "-1"),
        ("logs", UUID, "--tail", "x"),
        ("stop",),  # no uuid
        ("list", "-o", "xml"),
    ],
)
def test_bad_arguments_are_usage_errors(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == 2 and "error:" in capsys.readouterr().err


def service(state: ServiceState = ServiceState.ACTIVE, deployer: Any = None, **values: Any) -> Service:
    base = dict(uuid=UUID, backend="mlflow", endpoint="iris", model_name="iris", model_uri="models:/iris/1",
                model_version="1", state=state, prediction_url="http://h:5200/invocations", dag_id="ct")  # fmt: skip
    return Service(ServiceRecord(**{**base, **values}), deployer)


@pytest.fixture
def deployer(monkeypatch: pytest.MonkeyPatch) -> mock.Mock:
    fake = mock.Mock()
    fake.get_model_server.side_effect = lambda uuid: service(deployer=fake)
    fake.get_history.return_value = [
        {"created_at": "2026-01-01T00:00:00+00:00", "action": "deploy", "outcome": "success", "actor": "me",
         "message": "serving models:/iris/1"},
    ]  # fmt: skip
    fake.metrics.return_value = ServiceMetrics.unavailable(UUID, "1h", "the seldon backend reports no metrics")
    asked: list[str] = []
    monkeypatch.setattr(deployers, "deployer_for_service", lambda uuid: asked.append(uuid) or fake)
    fake.asked = asked
    return fake


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = parse(*argv)
    code = 0
    try:
        args.func(args)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_get_url_prints_the_live_url(deployer: mock.Mock, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "get-url", "c11c") == (0, "http://h:5200/invocations\n", "")
    assert deployer.asked == ["c11c"]
    deployer.get_model_server.side_effect = lambda uuid: service(ServiceState.INACTIVE, deployer)
    code, out, err = run(capsys, "get-url", UUID)
    assert code == 1 and out == ""
    assert err == f"error: uuid={UUID!r}: the service is inactive, it has no live prediction URL\n"


def test_a_provider_error_is_one_line_and_exit_1(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    def missing(uuid: str) -> Any:
        raise ServiceNotFoundError("uuid", uuid, "no served model has this uuid")

    monkeypatch.setattr(deployers, "deployer_for_service", missing)
    assert run(capsys, "describe", "dead") == (1, "", "error: uuid='dead': no served model has this uuid\n")


def test_describe_json_has_the_properties_and_the_history(deployer: mock.Mock, capsys: Any) -> None:
    code, out, _ = run(capsys, "describe", UUID, "--history", "3", "-o", "json")
    [data] = json.loads(out)
    assert code == 0 and data["uuid"] == UUID and data["state"] == "active" and data["model_version"] == "1"
    assert [e["action"] for e in data["history"]] == ["deploy"]
    deployer.get_history.assert_called_once_with(UUID, limit=3)
    assert data["metrics"] == {
        "window": "1h",
        "available": "False",  # Airflow's console prints values as text
        "source": None,
        "reason": "the seldon backend reports no metrics",
    }


def test_describe_shows_the_last_hour(deployer: mock.Mock, capsys: Any) -> None:
    from airflow_provider_modeldeploy.metrics import build

    slices = [{"t": 1_000_020, "model_version": "1", "series": {
        "requests:2xx": 190, "requests:4xx": 10, "bucket:0.001": 100, "bucket:0.01": 200, "bucket:+Inf": 200,
        "rows": 380, "in_flight": 0}}]  # fmt: skip
    deployer.metrics.return_value = build(UUID, "1h", slices, source="serving-agent", role_of=str, now=1_000_030)
    code, out, _ = run(capsys, "describe", UUID, "-o", "plain")
    assert code == 0 and "requests per minute" in out and "5.00% (10 errors)" in out, out
    assert "1.0 ms / 9.1 ms / 9.8 ms" in out, out
    deployer.metrics.assert_called_once_with(UUID, "1h")


def test_list_passes_the_filters_and_prints_the_fields(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    seen: dict[str, Any] = {}

    def find_services(**filters: Any) -> list[Service]:
        seen.update(filters)
        return [service()]

    monkeypatch.setattr(deployers, "find_services", find_services)
    code, out, _ = run(capsys, "list", "--model", "iris", "--running", "--limit", "5", "--offset", "2", "-o", "json")
    assert seen == {"model_name": "iris", "dag_id": None, "task_id": None, "running": True, "limit": 5, "offset": 2}
    [row] = json.loads(out)
    assert (
        code == 0 and list(row) == list(commands.LIST_FIELDS) and row["prediction_url"] == "http://h:5200/invocations"
    )


def test_stop_passes_timeout_and_force(deployer: mock.Mock, capsys: Any) -> None:
    deployer.stop_model_server.return_value = service(ServiceState.INACTIVE, deployer)
    code, out, _ = run(capsys, "stop", UUID, "--timeout", "9", "--force", "-o", "json")
    deployer.stop_model_server.assert_called_once_with(UUID, timeout=9.0, force=True, actor=None)
    assert code == 0 and json.loads(out)[0]["state"] == "inactive"


def test_delete_asks_for_confirmation(deployer: mock.Mock, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.setattr("sys.stdin", mock.Mock(isatty=lambda: False))
    code, _, err = run(capsys, "delete", UUID)
    assert code == 1 and "refusing to delete without confirmation; pass --yes" in err
    deployer.delete_model_server.assert_not_called()
    monkeypatch.setattr("sys.stdin", mock.Mock(isatty=lambda: True))
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert run(capsys, "delete", UUID)[1] == "Cancelled.\n"
    deployer.delete_model_server.assert_not_called()
    assert run(capsys, "delete", UUID, "--yes", "--force") == (0, f"Deleted service {UUID}\n", "")
    deployer.delete_model_server.assert_called_once_with(UUID, timeout=300.0, force=True, actor=None)


def test_logs_print_each_line(deployer: mock.Mock, capsys: Any) -> None:
    deployer.get_model_server_logs.return_value = iter(["one", "two"])
    assert run(capsys, "logs", UUID, "--tail", "2") == (0, "one\ntwo\n", "")
    deployer.get_model_server_logs.assert_called_once_with(UUID, tail=2, follow=False)


def test_ctrl_c_ends_following_logs_with_exit_0(deployer: mock.Mock, capsys: Any) -> None:
    def lines() -> Any:
        yield "one"
        raise KeyboardInterrupt

    deployer.get_model_server_logs.side_effect = lambda *a, **k: lines()
    assert run(capsys, "logs", UUID, "-f") == (0, "one\n", "")
    deployer.get_model_server_logs.side_effect = lambda *a, **k: lines()
    assert run(capsys, "logs", UUID) == (1, "one\n", "error: interrupted\n")  # not following: an interruption


def test_sync_reports_each_connection(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    asked: list[Any] = []
    report = SyncReport("mlflow", "md", checked=2, adopted=["a1"], lost=["l1", "l2"], dry_run=True)
    monkeypatch.setattr(deployers, "sync_all", lambda conn_ids, dry_run: asked.append((conn_ids, dry_run)) or [report])
    code, out, _ = run(capsys, "sync", "--conn-id", "md", "--dry-run", "-o", "json")
    assert code == 0 and asked == [(["md"], True)]
    # (Airflow's console prints scalars as strings in JSON, lists as lists.)
    assert json.loads(out) == [{"backend": "mlflow", "conn_id": "md", "checked": "2", "adopted": ["a1"],
                                "lost": ["l1", "l2"], "removed": [], "dry_run": "True"}]  # fmt: skip


@pytest.mark.parametrize("listen", ["7400", "host:", "host:0", "host:70000", ":7400"])
def test_agent_listen_must_be_host_and_port(listen: str, capsys: Any) -> None:
    code, _, err = run(capsys, "agent", "--listen", listen)
    assert code == 1 and err.startswith(f"error: listen={listen!r}: use HOST:PORT")


def test_agent_listener_needs_a_token(capsys: Any) -> None:
    code, _, err = run(capsys, "agent", "--listen", "0.0.0.0:7400")
    assert code == 1 and "a TCP listener needs a token" in err
