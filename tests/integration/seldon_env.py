"""Where the Seldon end-to-end tests run: the Kubernetes API emulator (default) or a real cluster.

``open_cluster`` starts the emulator (``k8s_emulator``) unless ``MODELDEPLOY_E2E_KUBECONFIG`` names
the kubeconfig of a real cluster with Seldon Core 1 (``docker/kind/run-e2e.sh`` sets it and the
rest): namespace ``MODELDEPLOY_E2E_NAMESPACE`` (default ``models``), ingress
``MODELDEPLOY_E2E_INGRESS``, rollouts allowed ``MODELDEPLOY_E2E_TIMEOUT`` seconds (pods pull images
and download models). Either way the tests see the cluster as a client does: SeldonDeployments,
Secrets and pods through the official kubernetes client with the kubeconfig, predictions through
the ingress; nothing reads the emulator's insides.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local_http import HTTP

TESTS = Path(__file__).resolve().parent
GROUP, VERSION, PLURAL = "machinelearning.seldon.io", "v1", "seldondeployments"
RACE_ANNOTATION = "modeldeploy-e2e/concurrent-writer"


@dataclass
class Storage:
    """What the storage-credentials Secret carries: the S3/MinIO keys, and the endpoint as the
    model pods reach it."""

    access_key: str
    secret_key: str
    endpoint: str


@dataclass
class Race:
    """A write race provoked by ``Cluster.lose_write_race``: the annotation the concurrent writer
    left, and the HTTP status of each of the deployer's patches meanwhile."""

    annotation: str
    statuses: list[int] = field(default_factory=list)


@dataclass
class Cluster:
    kubeconfig: Path
    namespace: str
    ingress: str
    #: seconds a rollout may take
    timeout: float
    #: seconds the cluster may take to show the effect of a finished call (0: at once)
    settle: float
    storage: Storage
    #: connection extras every test connection carries (on a real cluster: the storage Secret)
    extra: dict[str, Any] = field(default_factory=dict)
    emulator_url: str | None = None

    @property
    def emulated(self) -> bool:
        return self.emulator_url is not None

    def conn_json(self, **extra: object) -> str:
        """An ``AIRFLOW_CONN_*`` value for a ``modeldeploy_seldon`` connection to this cluster."""
        return json.dumps({
            "conn_type": "modeldeploy_seldon",
            "extra": {"kube_config_path": str(self.kubeconfig), "namespace": self.namespace,
                      "ingress_base_url": self.ingress, **self.extra, **extra},
        })  # fmt: skip

    # -- reading the cluster with the official client -------------------------------------------

    @functools.cached_property
    def api_client(self) -> Any:
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    @property
    def custom(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.api_client)

    @property
    def core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    def sdep(self, name: str) -> dict[str, Any] | None:
        """The SeldonDeployment ``name``, None when there is none."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def secret(self, name: str) -> dict[str, Any] | None:
        """``{"labels": ..., "values": {key: decoded value}}`` of the Secret ``name``, or None."""
        from kubernetes.client.exceptions import ApiException

        try:
            secret = self.core.read_namespaced_secret(name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        values = {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
        return {"labels": secret.metadata.labels or {}, "values": values}

    def pods(self, name: str) -> list[Any]:
        """The live model pods of SeldonDeployment ``name`` (Seldon labels them with its name)."""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"seldon-deployment-id={name}")
        return sorted((p for p in pods.items if p.metadata.deletion_timestamp is None), key=lambda p: p.metadata.name)

    def eventually(self, check: Callable[[], Any], what: str) -> None:
        """Assert ``check()``: at once on the emulator, within ``settle`` seconds on a real cluster
        (routes and deletions propagate asynchronously there)."""
        deadline = time.monotonic() + self.settle
        while not check():
            assert time.monotonic() < deadline, f"not the case: {what}"
            time.sleep(1)

    # -- provoking a write conflict ---------------------------------------------------------------

    @contextlib.contextmanager
    def lose_write_race(self, deployer: Any, name: str, *, emulator_control: bool = True) -> Iterator[Race]:
        """The deployer's next write of SeldonDeployment ``name`` loses a race: 409 Conflict.

        With ``emulator_control`` on the emulator, its test control makes the concurrent write.
        Otherwise (and always on a real cluster) a second client annotates the object between the
        deployer's read and its patch, so that the patch carries a stale resourceVersion: a genuine
        conflict for the API server. Either way the deployer's patches are only watched, not changed.
        """
        from kubernetes.client.exceptions import ApiException

        via_emulator = emulator_control and self.emulated
        race = Race("emulator/concurrent-writer" if via_emulator else RACE_ANNOTATION)
        if via_emulator:
            HTTP.post(f"{self.emulator_url}/emulator/conflicts", json={"count": 1}, timeout=10).raise_for_status()
        hook = deployer.hook
        patch = hook.patch_deployment

        def watched(*args: Any, **kwargs: Any) -> Any:
            if not race.statuses and not via_emulator:
                marker = {"metadata": {"annotations": {RACE_ANNOTATION: str(time.time())}}}
                self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, marker)
            try:
                answer = patch(*args, **kwargs)
            except ApiException as exc:
                race.statuses.append(exc.status)
                raise
            race.statuses.append(200)
            return answer

        hook.patch_deployment = watched  # on this hook object only
        try:
            yield race
        finally:
            del hook.patch_deployment


def _real_cluster(kubeconfig: str) -> Cluster:
    """The cluster ``docker/kind/run-e2e.sh`` prepared (see docker/kind/README.md)."""
    storage = Storage(
        access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        endpoint=os.environ.get("MODELDEPLOY_E2E_STORAGE_ENDPOINT", "http://minio.models.svc.cluster.local:9000"),
    )  # fmt: skip
    return Cluster(
        kubeconfig=Path(kubeconfig), namespace=os.environ.get("MODELDEPLOY_E2E_NAMESPACE", "models"),
        ingress=os.environ["MODELDEPLOY_E2E_INGRESS"].rstrip("/"),
        timeout=float(os.environ.get("MODELDEPLOY_E2E_TIMEOUT", "1200")), settle=120, storage=storage,
        extra={"storage_secret": os.environ.get("MODELDEPLOY_E2E_STORAGE_SECRET", "e2e-model-storage")},
    )  # fmt: skip


@contextlib.contextmanager
def open_cluster(workdir: Path) -> Iterator[Cluster]:
    """The real cluster of ``MODELDEPLOY_E2E_KUBECONFIG``, else a fresh emulator in ``workdir``."""
    kubeconfig = os.environ.get("MODELDEPLOY_E2E_KUBECONFIG")
    if kubeconfig:
        yield _real_cluster(kubeconfig)
    else:
        with run_emulator(workdir) as cluster:
            yield cluster


@contextlib.contextmanager
def run_emulator(workdir: Path) -> Iterator[Cluster]:
    """The emulator in a subprocess (its own session, stopped by pid with its model servers)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port"
    log = (workdir / "emulator.log").open("ab")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW"))}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-m", "k8s_emulator.server", "--workdir", str(workdir), "--port-file", str(port_file)],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(workdir), env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            assert proc.poll() is None, (workdir / "emulator.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the emulator did not start"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text()}"
        kubeconfig = workdir / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": url}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": "models"}}],
            "users": [{"name": "tester", "user": {"token": "emulator-token-not-secret"}}],
        }))  # fmt: skip
        storage = Storage("AKIAEMULATORACCESSKEY", "s3cr3t-Value-42-never-shown", "http://minio.emulated:9000")
        yield Cluster(kubeconfig, "models", url, timeout=300, settle=0, storage=storage, emulator_url=url)
    finally:
        # SIGTERM: the emulator stops its model servers itself; then make sure of its whole group.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()
