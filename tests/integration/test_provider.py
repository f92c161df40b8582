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
from airflow_provider_modeldeploy.get_provider_info import get_provider_info
from airflow_provider_modeldeploy.hooks.mlflow_local import MlflowDeployerHook

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


def test_kserve_connection_type_and_its_widgets() -> None:
    """modeldeploy_kserve: its hook, the kube config as a password field, the deployer it picks."""
    from airflow_provider_modeldeploy.deployers import DEPLOYERS
    from airflow_provider_modeldeploy.hooks.kserve import KServeDeployerHook

    manager = providers_manager()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hook = manager.hooks["modeldeploy_kserve"]
    assert hook is not None and hook.hook_class_name == "airflow_provider_modeldeploy.hooks.kserve.KServeDeployerHook"
    assert hook.connection_testable and KServeDeployerHook.conn_type == "modeldeploy_kserve"
    widgets = {
        k.split("__")[-1]: v
        for k, v in manager.connection_form_widgets.items()
        if k.startswith("extra__modeldeploy_kserve__")
    }
    for name in ("kube_config_path", "kube_config", "cluster_context", "in_cluster", "namespace", "deployment_mode",
                 "protocol", "runtime", "url_template", "service_account", "storage_conn_id", "replicas"):  # fmt: skip
        assert name in widgets, name
    assert widgets["kube_config"].is_sensitive and not widgets["kube_config_path"].is_sensitive
    assert DEPLOYERS["modeldeploy_kserve"].endswith("deployers.kserve:KServeDeployer")


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
        "db-upgrade", "render",
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
    assert found["dag_ids"] == [
        "continuous_deployment_kserve", "continuous_deployment_seldon", "continuous_training_mlflow",
        "deploy_on_alias_move",
    ]  # fmt: skip
    assert {"train", "gate", "keep_serving", "deploy", "wait_healthy", "smoke_predict", "promote_champion"} <= set(
        found["tasks"]
    )
    assert found["heavy"] == [], f"parsing the DAG file imports {found['heavy']}"
