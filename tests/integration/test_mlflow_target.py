"""The ``modeldeploy`` target of MLflow's deployment API, driven by MLflow's own CLI in subprocesses
(``mlflow deployments create|predict|update|get|list|delete -t modeldeploy:/<conn_id>``) against the
local backend: the same registry, endpoint history and model servers as the rest of the provider."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from cli_forker import run_cli
from conftest import IRIS_COLUMNS, IRIS_ROWS, airflow_env
from local_http import HTTP
from mlflow.deployments import get_deploy_client
from mlflow.exceptions import MlflowException

from airflow_provider_modeldeploy.deployers import get_model_deployer

CONN_ID = "md_mlflow_cli"
NAME = "iris-cli"


def mlflow_cli(home: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``mlflow deployments *args`` (the installed console script, forked as the tests' airflow commands are)."""
    return run_cli(["deployments", *args], env, timeout=300, script="mlflow")


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\nstdout: {done.stdout[-3000:]}\nstderr: {done.stderr[-3000:]}"
    return done.stdout


def fields(output: str) -> dict[str, str]:
    """`mlflow deployments get` prints ``key: value`` lines."""
    return dict(line.split(": ", 1) for line in output.splitlines() if ": " in line)


@pytest.fixture
def cli_env(airflow_home: Path, mlflow_models: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A deployer connection given as MLflow users give Airflow ones: an AIRFLOW_CONN_ variable."""
    conn = json.dumps(
        {
            "conn_type": "modeldeploy_mlflow",
            "host": "127.0.0.1",
            "extra": {"tracking_uri": mlflow_models["tracking_uri"]},
        }
    )
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", conn)  # this process reads the registry it writes
    return airflow_env(airflow_home, **{f"AIRFLOW_CONN_{CONN_ID.upper()}": conn})


def predict_version(url: str) -> str:
    answer = HTTP.post(url, json={"dataframe_split": {"columns": IRIS_COLUMNS, "data": IRIS_ROWS}}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.headers["x-model-version"]


@pytest.mark.long
def test_mlflow_cli_create_predict_update_list_delete(
    cli_env: dict[str, str], airflow_home: Path, tmp_path: Path
) -> None:
    """Each step with MLflow's CLI; what it did checked with MLflow's Python client and the provider."""
    target = f"modeldeploy:/{CONN_ID}"
    client = get_deploy_client(target)
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([dict(zip(IRIS_COLUMNS, row, strict=True)) for row in IRIS_ROWS]))

    out = ok(mlflow_cli(airflow_home, "create", "-t", target, "--name", NAME, "-m", "models:/iris/1", env=cli_env))
    assert f"python_function deployment {NAME} is created" in out
    created = client.get_deployment(NAME)
    assert (created["model_version"], created["state"], created["conn_id"]) == ("1", "active", CONN_ID)
    url = created["prediction_url"]
    assert predict_version(url) == "1"

    predicted = ok(
        mlflow_cli(airflow_home, "predict", "-t", target, "--name", NAME, "--input-path", str(rows), env=cli_env)
    )
    expected = HTTP.post(url, json={"dataframe_split": {"columns": IRIS_COLUMNS, "data": IRIS_ROWS}}, timeout=30)
    assert json.loads(predicted.strip().splitlines()[-1]) == expected.json()

    # A second create of the same name is refused with our words; the served model is untouched.
    with pytest.raises(MlflowException, match=f"deployment '{NAME}' already exists") as refused:
        client.create_deployment(NAME, "models:/iris/2")
    assert refused.value.error_code == "RESOURCE_ALREADY_EXISTS"
    assert predict_version(url) == "1"

    out = ok(
        mlflow_cli(
            airflow_home, "update", "-t", target, "--name", NAME, "-m", "models:/iris/2", "-C", "workers=2", env=cli_env
        )
    )
    assert f"Deployment {NAME} is updated (with flavor python_function)" in out
    updated = client.get_deployment(NAME)
    assert updated["model_version"] == "2" and updated["prediction_url"] == url  # replaced in place
    assert updated["uuid"] != created["uuid"]
    assert predict_version(url) == "2"

    listed = ok(mlflow_cli(airflow_home, "list", "-t", target, env=cli_env))
    assert f"'name': '{NAME}'" in listed and "'model_version': '2'" in listed and listed.count("'name': ") == 1

    # The same registry and history as DAGs and `airflow served-models`, with the CLI user as actor.
    deployer = get_model_deployer(CONN_ID)
    [serving] = deployer.find_model_server(endpoint=NAME, running=True)
    assert serving.uuid == updated["uuid"] and serving.record.model_version == "2"
    assert serving.record.config["workers"] == 2  # `-C workers=2` arrives as the option's type
    history = deployer.get_history(NAME)
    assert [e["action"] for e in history[:2]] == ["replace", "deploy"]
    assert all(e["actor"].endswith("(mlflow deployments)") for e in history[:2]), history[:2]

    ok(mlflow_cli(airflow_home, "delete", "-t", target, "--name", NAME, env=cli_env))
    assert deployer.find_model_server(endpoint=NAME) == []
    # Neither server answers at the URL any more. The port is free again: a server another test deploys
    # meanwhile may have it (the agent gives out the first free port of its range), so an answer is
    # acceptable only from a service that is not one of these two.
    try:
        answer = HTTP.post(url, json={"dataframe_split": {"columns": IRIS_COLUMNS, "data": IRIS_ROWS}}, timeout=5)
    except httpx.HTTPError:
        pass
    else:
        assert answer.headers.get("x-modeldeploy-service") not in (created["uuid"], updated["uuid"]), answer.headers
    client.delete_deployment(NAME)  # idempotent
    with pytest.raises(MlflowException, match=f"no deployment named '{NAME}'") as gone:
        client.get_deployment(NAME)
    assert gone.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    assert deployer.get_history(NAME)[0]["action"] == "delete"
    assert client.list_deployments() == []


def test_errors_are_mlflow_exceptions_in_our_words(cli_env: dict[str, str]) -> None:
    """Bad input is an MlflowException naming the field; nothing is started."""
    with pytest.raises(MlflowException, match="conn_id='no_such_conn': no Airflow connection has this id"):
        get_deploy_client("modeldeploy:/no_such_conn").list_deployments()
    client = get_deploy_client(f"modeldeploy:/{CONN_ID}")
    with pytest.raises(MlflowException, match="name='not a name'") as bad_name:
        client.create_deployment("not a name", "models:/iris/1")
    assert bad_name.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException, match="replicas=2: not an option of the mlflow backend"):
        client.create_deployment(NAME, "models:/iris/1", config={"replicas": 2})
    with pytest.raises(MlflowException, match="serves python_function only"):
        client.create_deployment(NAME, "models:/iris/1", flavor="sklearn")
    with pytest.raises(MlflowException, match=f"no deployment named '{NAME}'"):
        client.update_deployment(NAME, "models:/iris/2")
    with pytest.raises(MlflowException, match="deploy_timeout='soon'"):
        client.create_deployment(NAME, "models:/iris/1", config={"deploy_timeout": "soon"})
    assert "modeldeploy:/<conn_id>" in target_help_text()
    assert get_model_deployer(CONN_ID).find_model_server() == []


def target_help_text() -> str:
    from mlflow.deployments import interface

    return interface._target_help("modeldeploy")


def test_run_local_serves_on_this_machine(
    airflow_home: Path, mlflow_models: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`mlflow deployments run-local -t modeldeploy`: the local backend, whatever the connection."""
    from airflow_provider_modeldeploy import mlflow_target

    mlflow_target.run_local("modeldeploy:/md_not_used", "iris-local", "models:/iris/1")
    printed = capsys.readouterr().out
    [service] = get_model_deployer().find_model_server(endpoint="iris-local", running=True)
    assert f"at {service.prediction_url}" in printed and "(version 1)" in printed
    assert predict_version(service.prediction_url) == "1"
    get_deploy_client("modeldeploy").delete_deployment("iris-local")
    assert get_model_deployer().find_model_server(endpoint="iris-local") == []
