"""The provider as Airflow sees it: metadata, connection type, CLI, import cost, validation helpers, the DAG."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import inspect
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from airflow_provider_modeldeploy import __version__
from airflow_provider_modeldeploy.exceptions import InvalidParameterError
from airflow_provider_modeldeploy.get_provider_info import get_provider_info
from airflow_provider_modeldeploy.hooks.mlflow_local import MlflowDeployerHook, parse_port_range
from airflow_provider_modeldeploy.services import ServiceConfig

PACKAGE = "airflow-provider-modeldeploy"
CONN_TYPE = "modeldeploy_mlflow"
HOOK_CLASS = "airflow_provider_modeldeploy.hooks.mlflow_local.MlflowDeployerHook"
#: Top-level modules that DAG parsing must not pay for.
HEAVY = ("mlflow", "sklearn", "pandas", "kubernetes")


def run_python(code: str, env_home: Path) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(AIRFLOW_HOME=str(env_home), AIRFLOW__CORE__LOAD_EXAMPLES="False")
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
        cwd=str(env_home),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- metadata ----------------------------------------------------------------------------------------


def test_provider_info_validates_against_airflows_schema() -> None:
    import jsonschema

    schema = json.loads((importlib.resources.files("airflow") / "provider_info.schema.json").read_text())
    info = get_provider_info()
    jsonschema.validate(info, schema)
    assert info["package-name"] == PACKAGE
    assert info["versions"][0] == __version__ == importlib.metadata.version(PACKAGE)
    # Every module and class it names exists.
    for section in ("operators", "sensors", "hooks", "triggers"):
        for entry in info[section]:
            for module in entry["python-modules"]:
                importlib.import_module(module)
    entry_points = importlib.metadata.entry_points(group="apache_airflow_provider")
    [ours] = [ep for ep in entry_points if ep.value.startswith("airflow_provider_modeldeploy")]
    assert ours.load()() == info


def providers_manager() -> Any:
    from airflow.providers_manager import ProvidersManager

    return ProvidersManager()


def test_providers_manager_lists_the_provider_and_its_connection_type() -> None:
    manager = providers_manager()
    provider = manager.providers[PACKAGE]
    assert provider.version == __version__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hooks = manager.hooks
        hook = hooks[CONN_TYPE]
    assert hook is not None, "the hook of modeldeploy_mlflow could not be imported"
    assert hook.hook_class_name == HOOK_CLASS
    assert hook.package_name == PACKAGE
    assert hook.connection_type == CONN_TYPE
    assert hook.hook_name == MlflowDeployerHook.hook_name
    assert hook.connection_id_attribute_name == MlflowDeployerHook.conn_name_attr == "conn_id"
    assert hook.connection_testable  # the hook has test_connection
    assert MlflowDeployerHook.conn_type == CONN_TYPE

    behaviour = manager.field_behaviours[CONN_TYPE]
    assert set(behaviour["hidden_fields"]) == {"schema", "port", "extra"}
    assert behaviour["relabeling"] == {
        "host": "Serving host (bind address)",
        "login": "MLflow tracking username",
        "password": "MLflow tracking password",
    }
    # Placeholders of extra fields are prefixed by Airflow, standard fields are not.
    assert behaviour["placeholders"] == {
        "host": "127.0.0.1",
        f"extra__{CONN_TYPE}__tracking_uri": "http://mlflow:5000",
        f"extra__{CONN_TYPE}__port_range": "5200-5399",
    }

    widgets = {k: v for k, v in manager.connection_form_widgets.items() if k.startswith(f"extra__{CONN_TYPE}__")}
    assert set(widgets) == {
        f"extra__{CONN_TYPE}__{name}" for name in ("tracking_uri", "registry_uri", "port_range", "workers", "timeout")
    }
    for widget in widgets.values():
        assert widget.hook_class_name == HOOK_CLASS and widget.package_name == PACKAGE
        assert widget.field["schema"]["title"]
        assert not widget.is_sensitive
    port_range = widgets[f"extra__{CONN_TYPE}__port_range"]
    assert port_range.field["value"] == "5200-5399" and port_range.field["schema"]["title"] == "Port range"
    assert widgets[f"extra__{CONN_TYPE}__workers"].field["schema"]["minimum"] == 1
    assert widgets[f"extra__{CONN_TYPE}__timeout"].field["value"] == 60


def test_cli_entry_resolves_to_commands() -> None:
    from airflow_provider_modeldeploy.cli.definition import get_served_models_cli_commands

    manager = providers_manager()
    assert PACKAGE in manager.cli_command_providers
    assert get_served_models_cli_commands in manager.cli_command_functions
    [group] = get_served_models_cli_commands()
    assert group.name == "served-models"
    names = {cmd.name: cmd for cmd in group.subcommands}
    assert set(names) == {
        "list", "describe", "get-url", "logs", "start", "stop", "delete", "sync", "promote", "rollback", "agent",
        "db-upgrade",
    }  # fmt: skip
    for cmd in group.subcommands:
        # Commands are lazy; each names a function that exists.
        target = getattr(importlib.import_module("airflow_provider_modeldeploy.cli.commands"), cmd.func.__name__)
        assert callable(target), cmd.name

    # Airflow's own parser knows the group and its arguments.
    from airflow.cli import cli_parser

    parser = cli_parser.get_parser()
    args = parser.parse_args(["served-models", "list", "--model", "iris", "--limit", "5", "--running"])
    assert args.func.__name__ == "list_services"
    assert (args.model, args.limit, args.offset, args.running) == ("iris", 5, 0, True)
    args = parser.parse_args(["served-models", "rollback", "abcd", "--to", "ef01"])
    assert (args.func.__name__, args.uuid, args.to) == ("rollback_service", "abcd", "ef01")
    args = parser.parse_args(["served-models", "delete", "abcd", "--yes", "--force", "--timeout", "12.5"])
    assert (args.func.__name__, args.uuid, args.yes, args.force, args.timeout) == (
        "delete_service",
        "abcd",
        True,
        True,
        12.5,
    )
    for bad in (["served-models", "list", "--limit", "-1"], ["served-models", "stop", "abcd", "--timeout", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


# -- import cost -------------------------------------------------------------------------------------


def test_importing_operators_and_sensors_is_cheap(tmp_path: Path) -> None:
    found = run_python(
        f"""
        import json, sys
        heavy = {HEAVY!r}
        def loaded():
            return sorted(m for m in sys.modules if m.split(".")[0] in heavy)
        import airflow.sdk
        baseline = loaded()
        from airflow_provider_modeldeploy.operators import DeployModelOperator
        from airflow_provider_modeldeploy.sensors import ServedModelHealthSensor
        print(json.dumps({{"baseline": baseline, "after": loaded()}}))
        """,
        tmp_path,
    )
    added = sorted(set(found["after"]) - set(found["baseline"]))
    assert added == [], f"importing the operators and sensors imports {added}"


# -- validation helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "iris", "Iris-2", "wine.classifier_v2", "a" * 63, "0", "x-y.z_9", "A1"], ids=lambda n: n[:12]
)
def test_service_config_accepts(name: str) -> None:
    ServiceConfig(model_uri="models:/iris/1", model_name=name).validate()
    ServiceConfig(model_uri="models:/iris/1", model_name="m", endpoint=name).validate()


@pytest.mark.parametrize(
    "name", ["", "-x", "x-", ".x", "x_", "Bad Name!", "a" * 64, "a/b", "é", "a b", None, 7], ids=repr
)
def test_service_config_refuses_names(name: Any) -> None:
    with pytest.raises(InvalidParameterError) as info:
        ServiceConfig(model_uri="models:/iris/1", model_name=name).validate()
    assert info.value.field == "model_name" and info.value.value == name
    assert str(info.value).startswith(f"model_name={name!r}: ")
    if name is not None:  # endpoint=None means "the model name"
        with pytest.raises(InvalidParameterError) as info:
            ServiceConfig(model_uri="models:/iris/1", model_name="ok", endpoint=name).validate()
        assert info.value.field == "endpoint" and info.value.value == name


def test_service_config_endpoint_and_options() -> None:
    config = ServiceConfig(model_uri="models:/iris/1", model_name="iris", workers=2)
    assert config.endpoint_name == "iris" and config.backend_options == {"workers": 2}
    assert ServiceConfig(model_uri="models:/iris/1", model_name="iris", endpoint="prod").endpoint_name == "prod"
    assert "workers=2" in repr(config)


@pytest.mark.parametrize(
    "uri",
    [
        "runs:/0123456789abcdef/model",
        "runs:/abc/nested/model",
        "models:/iris/1",
        "models:/iris/latest",
        "models:/iris/Production",
        "models:/iris@champion",
        "models:/m-0123456789abcdef",
        "/tmp/model",
        "relative/model",
        "file:///tmp/model",
        "mlflow-artifacts:/1/abc/artifacts/model",
        "s3://bucket/model",
        "gs://bucket/model",
        "https://example.com/model",
        "C:/models/iris",
    ],
)
def test_model_uri_accepts(uri: str) -> None:
    ServiceConfig(model_uri=uri, model_name="m").validate()


@pytest.mark.parametrize(
    "uri",
    [
        "",
        " ",
        " models:/iris/1",
        "models:/iris/1 ",
        "models:/",
        "models:/iris/1/extra",
        "models:/iris@",
        "models:/iris/",
        "models:/@alias",
        "runs:/",
        "runs:/abc",
        "runs:/abc/",
        "foo://x",
        "ftpx://x",
        None,
        42,
    ],
    ids=repr,
)
def test_model_uri_refuses(uri: Any) -> None:
    with pytest.raises(InvalidParameterError) as info:
        ServiceConfig(model_uri=uri, model_name="m").validate()
    assert info.value.field == "model_uri" and info.value.value == uri
    assert str(info.value).startswith(f"model_uri={uri!r}: ")


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


# -- the example DAG ---------------------------------------------------------------------------------


def test_dag_file_parses_without_heavy_imports(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # airflow.models.dagbag.DagBag is a deprecated alias in Airflow 3.3
        from airflow.models.dagbag import DagBag

    # Airflow 3.3 dropped include_examples (examples come from the config, off here); pass it where it exists.
    include_examples = "include_examples" in inspect.signature(DagBag.__init__).parameters
    found = run_python(
        f"""
        import json, sys, warnings
        warnings.simplefilter("ignore")
        from airflow.models.dagbag import DagBag
        heavy = {HEAVY!r}
        bag = DagBag(dag_folder={str(ROOT / "dags")!r}{", include_examples=False" if include_examples else ""})
        dag = bag.dags.get("continuous_training_mlflow")
        print(json.dumps({{
            "import_errors": {{str(k): str(v) for k, v in bag.import_errors.items()}},
            "dag_ids": sorted(bag.dag_ids),
            "tasks": sorted(dag.task_ids) if dag else [],
            "heavy": sorted(m for m in sys.modules if m.split(".")[0] in heavy),
        }}))
        """,
        tmp_path,
    )
    assert found["import_errors"] == {}
    assert found["dag_ids"] == ["continuous_deployment_seldon", "continuous_training_mlflow"]
    assert {"train", "gate", "keep_serving", "deploy", "wait_healthy", "smoke_predict", "promote_champion"} <= set(
        found["tasks"]
    )
    assert found["heavy"] == [], f"parsing the DAG file imports {found['heavy']}"
