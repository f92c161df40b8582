"""The local MLflow backend end to end: real MLflow models, real server processes, real HTTP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid as uuidlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
from conftest import agent_servers, agent_services, iris_payload, service_pids, wait_for
from local_http import HTTP

from airflow_provider_modeldeploy.deployers import ServiceConfig, get_model_deployer
from airflow_provider_modeldeploy.exceptions import DeploymentFailedError, InvalidParameterError
from airflow_provider_modeldeploy.registry import get_registry
from airflow_provider_modeldeploy.services import Lineage, ServiceState


def predict(url: str) -> httpx.Response:
    return HTTP.post(url, json=iris_payload(), timeout=30)


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
        assert HTTP.get(url.replace("/invocations", path), timeout=10).status_code == 200

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


def test_another_installations_agent_is_used_not_restarted(
    deployer: Any, mlflow_models: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two installations of one user (two AIRFLOW_HOMEs, other code: a wheel and a checkout) share the
    runtime directory's agent socket. A client of the other one never restarts the agent: the new agent
    would keep that client's records and know none of the running servers. A client of the same
    installation with newer code does restart it, and the new agent adopts the servers."""
    from airflow_provider_modeldeploy.hooks.serving_agent import local_agent
    from airflow_provider_modeldeploy.serving import agent_api

    service = deployer.deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-two-installs"))
    try:
        pid, own = local_agent().health()["pid"], os.environ["AIRFLOW__MODELDEPLOY__AGENT_STATE_DIR"]
        monkeypatch.setattr(agent_api, "code_stamp", lambda: "other code")
        monkeypatch.setenv("AIRFLOW__MODELDEPLOY__AGENT_STATE_DIR", str(tmp_path / "other-installation"))
        assert local_agent().health()["pid"] == pid
        assert local_agent().status(service.uuid)["phase"] == "active"

        monkeypatch.setenv("AIRFLOW__MODELDEPLOY__AGENT_STATE_DIR", own)  # this installation's records
        assert local_agent().health()["pid"] != pid
        assert local_agent().status(service.uuid)["phase"] == "active"
        assert HTTP.post(service.prediction_url, json=iris_payload(), timeout=30).status_code == 200
    finally:
        monkeypatch.undo()
        deployer.delete_model_server(service.uuid)


# -- README promises of the local backend: model URI forms, a failed smoke prediction, replace=False,
# -- and the connection's fields, each observed on the running server --------------------------------

#: A pyfunc model that loads, answers each row with the pid of the worker process that scored it after
#: sleeping the row's ``sleep`` seconds, and raises on a negative one, as its own input example (-1) is.
PROBE_MODEL = textwrap.dedent(
    """
    import os
    import time

    import mlflow


    class Probe(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            seconds = [float(s) for s in model_input["sleep"]]
            if min(seconds) < 0:
                raise ValueError("this model refuses a negative sleep")
            time.sleep(max(seconds))
            return [os.getpid()] * len(seconds)


    mlflow.models.set_model(Probe())
    """
)


def probe_payload(seconds: float) -> dict[str, Any]:
    return {"dataframe_split": {"columns": ["sleep"], "data": [[seconds]]}}


@pytest.fixture(scope="module")
def probe_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The probe model, saved by MLflow as a plain model directory (no tracking store involved)."""
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    base = tmp_path_factory.mktemp("probe")
    (base / "probe_model.py").write_text(PROBE_MODEL)
    mlflow.pyfunc.save_model(
        str(base / "model"), python_model=str(base / "probe_model.py"),
        input_example=pd.DataFrame({"sleep": [-1.0]}),
        signature=ModelSignature(inputs=Schema([ColSpec("double", "sleep")]), outputs=Schema([ColSpec("long")])),
        pip_requirements=mlflow.pyfunc.get_default_pip_requirements(),
    )  # fmt: skip
    yield base / "model"
    shutil.rmtree(base, ignore_errors=True)


def listening(pid: int) -> set[tuple[str, int]]:
    """The addresses a server's TCP sockets listen on, as the kernel has them."""
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("tcp") if c.status == "LISTEN"}


def outside_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (None on a machine without one)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def files_named_after(uuid: str) -> list[Path]:
    """What the session's agent keeps of a service: runtime files (sockets, state, metrics) and records, logs."""
    names = (uuid, uuid.replace("-", ""))
    roots = (os.environ["AIRFLOW__MODELDEPLOY__RUNTIME_DIR"], os.environ["AIRFLOW__MODELDEPLOY__AGENT_STATE_DIR"])
    return [p for root in roots for p in Path(root).rglob("*") if any(n in p.name for n in names)]


def test_uri_forms_replace_in_place_and_a_failed_smoke_or_replace_false_changes_nothing(
    deployer: Any, mlflow_models: dict[str, Any], probe_model: Path, tmp_path: Path
) -> None:
    """``runs:/``, ``models:/<name>/latest``, ``models:/m-<logged model id>`` and a plain path each serve
    (in sequence on one endpoint, each replacing the last at the same URL), bound to 127.0.0.1 by
    default; a new model that loads but fails its smoke prediction is discarded and the old server
    keeps serving; ``replace=False`` on the served endpoint is one clear error that changes nothing."""
    run_1, run_2 = mlflow_models["iris_runs"]
    logged_1, logged_2 = mlflow_models["iris_models"]  # MLflow 3's logged models of those runs
    assert logged_1["id"].startswith("m-"), logged_1
    location = urlsplit(logged_2["location"])
    if location.scheme == "file":  # the model directory itself, on this machine's disk
        path = location.path
    else:  # a remote artifact store (MODELDEPLOY_E2E_ARTIFACT_ROOT): a local copy of it
        import mlflow

        path = mlflow.artifacts.download_artifacts(artifact_uri=logged_2["location"], dst_path=str(tmp_path / "iris"))
    assert Path(path, "MLmodel").is_file(), path
    forms = [  # model_uri: the URI served, the version and the run recorded
        (f"runs:/{run_1}/model", f"runs:/{run_1}/model", None, run_1),
        ("models:/iris/latest", "models:/iris/2", "2", run_2),
        (f"models:/{logged_1['id']}", f"models:/{logged_1['id']}", None, run_1),
        (path, path, None, None),
    ]
    url = None
    for uri, served_uri, version, run_id in forms:
        service = deployer.deploy_model(ServiceConfig(model_uri=uri, model_name="iris-forms"))
        record = service.record
        assert (record.served_uri, record.model_version, record.model_run_id) == (served_uri, version, run_id), uri
        url = url or service.prediction_url
        assert service.prediction_url == url and service.is_running, uri
        answer = predict(url)
        # Both rows' true classes (setosa, virginica), answered by this service.
        assert answer.status_code == 200 and answer.json() == {"predictions": [0, 2]}, (uri, answer.text)
        assert answer.headers["x-modeldeploy-service"] == service.uuid
        assert answer.headers.get("x-model-version") == version
    history = deployer.get_history("iris-forms")
    assert [e["action"] for e in reversed(history)] == ["deploy", "replace", "replace", "replace"]
    assert [e["details"]["model_uri"] for e in reversed(history)] == [form[0] for form in forms]
    # The replaced services are gone from the registry and from the agent too: no record or log of
    # theirs is left, which a sync would take for services and adopt.
    replaced = [e["service_uuid"] for e in reversed(history[1:])]
    assert [s["uuid"] for s in agent_services("iris-forms")] == [service.uuid]
    assert [p for uuid in replaced for p in files_named_after(uuid)] == []
    assert deployer.sync_services(dry_run=True).adopted == []

    # The default bind address: 127.0.0.1 only (no other address of the machine reaches the server).
    port = urlsplit(url).port
    assert urlsplit(url).hostname == "127.0.0.1" and listening(record.pid) == {("127.0.0.1", port)}
    outside = outside_address()
    if outside is not None:
        with pytest.raises(httpx.ConnectError):
            HTTP.post(f"http://{outside}:{port}/invocations", json=iris_payload(), timeout=10)

    # A replace whose model loads but fails the smoke prediction (the probe raises on its own input
    # example): the task fails naming the cause; the old server serves on, and nothing is left of the new.
    kept = get_registry().get_service(service.uuid)
    pids, tree = agent_servers(), service_pids(service.uuid)
    with pytest.raises(DeploymentFailedError) as failed:
        deployer.deploy_model(ServiceConfig(model_uri=str(probe_model), model_name="iris-forms"))
    message = str(failed.value)
    assert message.startswith(f"model_uri={str(probe_model)!r}: the smoke prediction failed with HTTP 400"), message
    assert "\n" not in message
    [event, *_] = deployer.get_history("iris-forms")
    assert (event["action"], event["outcome"]) == ("rollback", "failed"), event
    assert "smoke prediction failed" in event["message"] and f"service {service.uuid} keeps serving" in event["message"]
    assert event["details"] == {"model_uri": str(probe_model), "kept_uuid": service.uuid}
    discarded = event["service_uuid"]
    assert discarded and discarded != service.uuid
    now = get_registry().get_service(service.uuid)
    assert (now.state, now.last_error, now.prediction_url, now.pid) == (ServiceState.ACTIVE, None, url, kept.pid)
    assert [s.uuid for s in deployer.find_model_server(endpoint="iris-forms")] == [service.uuid]  # nothing pending
    answer = predict(url)
    assert answer.status_code == 200 and answer.headers["x-modeldeploy-service"] == service.uuid
    assert agent_servers() == pids and service_pids(service.uuid) == tree
    assert [s["uuid"] for s in agent_services("iris-forms")] == [service.uuid]
    assert files_named_after(discarded) == []

    # replace=False on the served endpoint: one clear error; the service, its processes and the
    # endpoint's history are as they were.
    before = (get_registry().get_service(service.uuid).to_dict(), deployer.get_history("iris-forms"), agent_servers())
    with pytest.raises(InvalidParameterError) as refused:
        deployer.deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-forms"), replace=False)
    assert str(refused.value) == (
        f"replace=False: endpoint 'iris-forms' is already served by service {service.uuid} (active); "
        "pass replace=True or choose another endpoint"
    )
    after = (get_registry().get_service(service.uuid).to_dict(), deployer.get_history("iris-forms"), agent_servers())
    assert after == before
    assert predict(url).headers["x-modeldeploy-service"] == service.uuid


def test_a_model_copied_to_be_served_goes_with_its_server(deployer: Any, mlflow_models: dict[str, Any]) -> None:
    """MLflow copies a model it cannot read in place (a ``runs:/`` URI, a remote artifact store) into a
    new temporary directory that nothing removes: each server start used to leave a copy of its model
    there. The copy goes to the server's own temporary directory (0700), removed as the server ends,
    or by the agent when the server was killed; a model read in place (a registered version of a
    local store) leaves no directory at all."""

    def own_dirs(served: Any) -> list[Path]:
        """The service's directories in its servers' temporary directory (the agent's, hence theirs)."""
        base = Path(psutil.Process(served.record.pid).environ().get("TMPDIR") or tempfile.gettempdir())
        return list(base.glob(f"modeldeploy-{served.uuid.replace('-', '')}-*"))

    in_place = deployer.deploy_model(ServiceConfig(model_uri=mlflow_models["iris_v1"], model_name="iris-in-place"))
    assert predict(in_place.prediction_url).status_code == 200 and own_dirs(in_place) == []
    deployer.delete_model_server(in_place.uuid)
    run_1 = mlflow_models["iris_runs"][0]
    served = deployer.deploy_model(ServiceConfig(model_uri=f"runs:/{run_1}/model", model_name="iris-copied"))
    assert predict(served.prediction_url).status_code == 200
    [own] = own_dirs(served)
    assert own.stat().st_mode & 0o777 == 0o700
    [copied] = [p.parent for p in own.rglob("MLmodel")]  # MLflow's copy of the model
    assert f"run_id: {run_1}" in (copied / "MLmodel").read_text()
    deployer.delete_model_server(served.uuid)
    wait_for(lambda: not own.exists(), 30, f"{own} to be removed with its server")

    # A server killed (SIGKILL: it cannot remove anything): the agent removes its directory.
    killed = deployer.deploy_model(ServiceConfig(model_uri=f"runs:/{run_1}/model", model_name="iris-killed"))
    [own] = own_dirs(killed)
    os.kill(killed.record.pid, signal.SIGKILL)
    deployer.delete_model_server(killed.uuid)
    assert list(own.parent.glob(f"modeldeploy-{killed.uuid.replace('-', '')}-*")) == []


def test_connection_fields_host_workers_timeout_and_registry_uri(
    airflow_home: Path,
    mlflow_models: dict[str, Any],
    probe_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ``modeldeploy_mlflow`` connection's fields, each observed on the running server: ``host``
    0.0.0.0 binds every address of the machine; ``workers`` 2 server processes share the socket (the
    probe model answers with the pid of the worker that scored the request); ``timeout`` cuts a longer
    request (504); ``registry_uri`` is where ``models:/`` is looked up (the tracking server named is
    not even up)."""
    from mlflow import MlflowClient

    # The model registry: this worker's copy of the session's store; the tracking server: none (a port
    # nobody listens on), so that models:/ resolves from the registry or not at all.
    registry = mlflow_models["tracking_uri"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        tracking = f"http://127.0.0.1:{sock.getsockname()[1]}"
    name = f"probe-{uuidlib.uuid4().hex[:8]}"
    client = MlflowClient(tracking_uri=tracking, registry_uri=registry)  # as the connection says
    client.create_registered_model(name)
    client.create_model_version(name, source=str(probe_model))
    extra = {"tracking_uri": tracking, "registry_uri": registry, "workers": 2, "timeout": 2}
    monkeypatch.setenv(
        "AIRFLOW_CONN_MD_FIELDS", json.dumps({"conn_type": "modeldeploy_mlflow", "host": "0.0.0.0", "extra": extra})
    )
    deployer = get_model_deployer("md_fields")
    service = deployer.deploy_model(
        ServiceConfig(model_uri=f"models:/{name}/1", model_name="probe-fields", smoke_input=probe_payload(0)),
        timeout=120,
    )
    record = service.record
    assert (record.conn_id, record.served_uri, record.model_version) == ("md_fields", f"models:/{name}/1", "1")
    assert {k: record.config[k] for k in ("host", "workers", "timeout", "tracking_uri", "registry_uri")} == {
        "host": "0.0.0.0",
        **extra,
    }

    # host: the endpoint's socket is bound to every address; loopback and the machine's own answer.
    port = urlsplit(record.prediction_url).port
    assert listening(record.pid) == {("0.0.0.0", port)}
    for host in ("127.0.0.1", outside_address()):
        if host is not None:
            answer = HTTP.post(f"http://{host}:{port}/invocations", json=probe_payload(0), timeout=30)
            assert answer.status_code == 200, (host, answer.text)
    url = f"http://127.0.0.1:{port}/invocations"

    # workers: two processes under the master, and both score requests arriving on the one socket.
    workers = {child.pid for child in psutil.Process(record.pid).children()}
    assert len(workers) == 2, workers

    def scored_by() -> int:
        answer = HTTP.post(url, json=probe_payload(0.05), headers={"connection": "close"}, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()["predictions"][0]

    seen: dict[int, int] = {}

    def both_answered() -> bool:
        with ThreadPoolExecutor(4) as pool:
            for pid in pool.map(lambda _: scored_by(), range(8)):
                seen[pid] = seen.get(pid, 0) + 1
        return set(seen) == workers

    wait_for(both_answered, 60, "both workers to answer requests", lambda: seen)
    assert set(seen) == workers, seen

    # timeout: a request longer than 2 s is cut at 2 s with 504; a shorter one is answered.
    started = time.monotonic()
    cut = HTTP.post(url, json=probe_payload(4), timeout=30)
    took = time.monotonic() - started
    assert cut.status_code == 504 and "exceeded" in cut.text, cut.text
    assert 1.9 <= took < 3.9, took
    assert HTTP.post(url, json=probe_payload(0.2), timeout=30).status_code == 200

    tree = service_pids(service.uuid)
    deployer.delete_model_server(service.uuid, force=True)  # the cut request's model call still sleeps
    assert not any(alive(pid) for pid in tree)
