"""The local MLflow backend end to end: real MLflow models, real server processes, real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from conftest import iris_payload

from airflow_provider_modeldeploy.deployers import ServiceConfig, get_model_deployer
from airflow_provider_modeldeploy.exceptions import DeploymentFailedError, InvalidParameterError
from airflow_provider_modeldeploy.registry import get_registry
from airflow_provider_modeldeploy.services import Lineage, ServiceState


def predict(url: str) -> httpx.Response:
    return httpx.post(url, json=iris_payload(), timeout=30)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_deploy_replace_rollback_stop_start_delete(deployer: Any, mlflow_models: dict[str, Any]) -> None:
    # An alias is resolved at deploy time and the resolved version recorded.
    first = deployer.deploy_model(ServiceConfig(model_uri="models:/iris@champion", model_name="iris"))
    assert first.is_running and first.status.state == ServiceState.ACTIVE
    assert first.record.model_version == "1"
    assert first.record.served_uri == "models:/iris/1"
    assert first.record.model_run_id == mlflow_models["iris_runs"][0]
    url = first.prediction_url
    assert url.startswith("http://127.0.0.1:")
    answer = predict(url)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == 2
    assert answer.headers["x-model-version"] == "1"
    for path in ("/ping", "/health", "/version"):
        assert httpx.get(url.replace("/invocations", path), timeout=10).status_code == 200

    # Replace keeps the URL; the old server is drained and gone.
    second = deployer.deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v2"], model_name="iris"))
    assert second.uuid != first.uuid and second.prediction_url == url
    assert predict(url).headers["x-model-version"] == "2"
    assert not alive(first.record.pid)
    services = deployer.find_model_server(model_name="iris")
    assert [s.uuid for s in services] == [second.uuid]

    # A model that cannot load: the task fails naming the cause, the old server keeps serving.
    with pytest.raises(DeploymentFailedError, match="model weights are corrupted"):
        deployer.deploy_model(ServiceConfig(model_uri="models:/broken/1", model_name="iris"))
    assert predict(url).headers["x-model-version"] == "2"
    [still] = deployer.find_model_server(model_name="iris")
    assert still.uuid == second.uuid and still.is_running
    history = deployer.get_history(second.uuid)
    assert [e["action"] for e in history[:3]] == ["rollback", "replace", "deploy"]
    assert history[0]["outcome"] == "failed" and "corrupted" in history[0]["message"]

    # Rollback brings the replaced version back at the same URL, recorded with the acting user;
    # rolling back again returns to the version it replaced.
    back = second.rollback(actor="alice (Airflow UI)")
    assert back.prediction_url == url and back.record.served_uri == "models:/iris/1"
    assert predict(url).headers["x-model-version"] == "1"
    assert [s.uuid for s in deployer.find_model_server(model_name="iris")] == [back.uuid]
    event = deployer.get_history("iris")[0]
    assert (event["action"], event["outcome"], event["actor"]) == ("rollback", "success", "alice (Airflow UI)")
    assert event["details"]["previous_uuid"] == second.uuid
    with pytest.raises(InvalidParameterError, match="already serves the endpoint"):
        deployer.rollback_model_server(back.uuid, to_service_uuid=back.uuid)
    with pytest.raises(InvalidParameterError, match="to_service_uuid='nope'"):
        deployer.rollback_model_server(back.uuid, to_service_uuid="nope")
    second = deployer.rollback_model_server(back.uuid)  # back to the version it replaced
    assert second.prediction_url == url and predict(url).headers["x-model-version"] == "2"

    # Logs, stop, start at the same URL.
    lines = list(deployer.get_model_server_logs(second.uuid, tail=5))
    assert any("accepting on" in line for line in lines)
    stopped = deployer.stop_model_server(second.uuid)
    assert stopped.status.state == ServiceState.INACTIVE and stopped.prediction_url is None
    assert not alive(second.record.pid)
    with pytest.raises(httpx.ConnectError):
        predict(url)
    started = deployer.start_model_server(second.uuid)
    assert started.prediction_url == url and predict(url).status_code == 200

    # A killed server is restarted by its host's serving agent at the same URL; the service stays
    # active and the endpoint's history says what happened.
    os.kill(started.record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        events = deployer.get_history("iris", limit=1)
        if events[0]["action"] == "restart":
            break
        time.sleep(0.2)
    assert events[0]["action"] == "restart" and events[0]["outcome"] == "success", events[0]
    assert f"process {started.record.pid} exited" in events[0]["message"]
    restarted = deployer.get_model_server(second.uuid)
    assert restarted.is_running and restarted.record.pid != started.record.pid and alive(restarted.record.pid)
    assert restarted.prediction_url == url and predict(url).headers["x-model-version"] == "2"

    deployer.delete_model_server(second.uuid)
    assert not alive(restarted.record.pid)
    assert deployer.find_model_server() == []
    assert deployer.get_history("iris")[0]["action"] == "delete"


def test_retried_task_gets_its_server_back(deployer: Any, mlflow_models: dict[str, Any]) -> None:
    lineage = Lineage(dag_id="ct", run_id="manual__1", task_id="deploy", try_number=1)
    config = ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-retry")
    first = deployer.deploy_model(config, lineage=lineage)
    retry = Lineage(dag_id="ct", run_id="manual__1", task_id="deploy", try_number=2)
    again = deployer.deploy_model(config, lineage=retry)
    assert again.uuid == first.uuid and again.record.pid == first.record.pid
    assert len(deployer.find_model_server(model_name="iris-retry")) == 1


def test_server_outlives_the_process_that_deployed_it(airflow_home: Any, mlflow_models: dict[str, Any]) -> None:
    code = (
        "from airflow_provider_modeldeploy.deployers import get_model_deployer, ServiceConfig\n"
        f"s = get_model_deployer().deploy_model(ServiceConfig(model_uri={mlflow_models['iris_v1']!r}, model_name='iris-detached'))\n"
        "print(s.prediction_url)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    url = done.stdout.strip().splitlines()[-1]
    assert predict(url).status_code == 200  # the deploying process has exited
    [service] = get_model_deployer().find_model_server(model_name="iris-detached", running=True)
    proc = psutil.Process(service.record.pid)
    assert proc.ppid() != os.getpid()
    assert service.record.host and get_registry().get_service(service.uuid).pid == proc.pid


def test_one_installation_keeps_its_agent_whatever_its_interpreter_is_called(deployer: Any) -> None:
    """`python` and `python3` of one venv are one installation: neither restarts the other's agent
    (an agent of another installation, or of older code, would be restarted by a deploy)."""
    from airflow_provider_modeldeploy.hooks.serving_agent import local_agent

    pid = local_agent().health()["pid"]
    here = Path(sys.executable)
    other = here.with_name("python3" if here.name == "python" else "python")
    assert other.exists() and other.name != here.name
    code = (
        "from airflow_provider_modeldeploy.hooks.serving_agent import local_agent; print(local_agent().health()['pid'])"
    )
    done = subprocess.run([str(other), "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == str(pid) and local_agent().health()["pid"] == pid
