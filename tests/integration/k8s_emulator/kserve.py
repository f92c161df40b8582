"""The emulator's KServe controller stand-in (see ``server.py``): InferenceServices become predictor
"pods" running the chosen runtime for real, and their status is written as KServe writes it.

* Runtimes: ``kserve-sklearnserver`` (modelFormat ``sklearn``) runs ``sklearn_server.py``, which
  loads exactly as KServe's sklearn server does (one .joblib/.pkl/.pickle file, joblib);
  ``kserve-mlserver`` (modelFormat ``mlflow``) runs a real MLflow model server on the downloaded
  MLflow directory, spoken to in MLServer's v2 shapes. The storage initializer copies the
  ``storageUri`` (``file://`` only, here) to the pod's ``/mnt/models`` first.
* Status: ``observedGeneration``, conditions ``IngressReady``/``PredictorReady``/``Ready`` and
  ``Stopped`` (annotation ``serving.kserve.io/stop``), ``url``, ``address``,
  ``components.predictor`` (revisions in Knative mode), ``modelStatus`` with
  ``transitionStatus`` ``InProgress``/``UpToDate``/``BlockedByFailedLoad`` and ``lastFailureInfo``,
  ``canaryStatuses`` for ``spec.canary[]``. During a rolling update the previous pods keep serving
  (and Ready stays True) until the new ones are ready; a failed load keeps them serving.
* Scale to zero (Knative mode, ``minReplicas: 0``): ``POST /emulator/scale-to-zero`` stops the
  pods as Knative's autoscaler does with an idle revision; the next request starts them again and
  gets 503s until the runtime has loaded the model.
* Ingress: ``/serving/<ns>/<name>/<route>``, split by the predictors' traffic, forwarded to the
  runtime's own routes (the sklearn server's v1 and v2; MLServer's v2 only).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

from local_http import HTTP

from k8s_emulator import kubelet

PLURAL = "inferenceservices"
STOP = "serving.kserve.io/stop"
CONTAINER = "kserve-container"


class PredictorPod:
    """One predictor pod: the storage initializer's copy of the model, then the runtime serving it."""

    def __init__(self, workdir: Path, ns: str, isvc: str, predictor: str, model: dict[str, Any]) -> None:
        self.key = str(uuidlib.uuid4())
        self.ns, self.isvc, self.predictor, self.model = ns, isvc, predictor, model
        self.storage_uri = model.get("storageUri", "")
        env = {e.get("name"): e.get("value") for e in model.get("env") or []}
        self.model_version = env.get("MLSERVER_MODEL_VERSION")  # MLServer names it in its v2 answers
        self.runtime = model.get("runtime") or (
            "kserve-mlserver" if (model.get("modelFormat") or {}).get("name") == "mlflow" else "kserve-sklearnserver"
        )
        self.node, self.containers = CONTAINER, [CONTAINER]
        self.pod_name = f"{isvc}-{predictor}-{self.key[:8]}-{self.key[-5:]}"
        self.dir = workdir / "pods" / self.pod_name
        self.log_path = workdir / "logs" / f"{self.pod_name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "state.json"
        self.error: str | None = None
        self.proc: Any = None
        #: Knative mode: the revision the pod belongs to, and its queue-proxy's metrics (see ``knative``)
        self.revision: str | None = None
        self.queue_proxy: Any = None
        self.inner: Any = None
        models = self.dir / "mnt" / "models"
        try:
            self._download(models)
        except Exception as exc:
            self.error = f"storage-initializer: {exc}"
            return
        if self.runtime == "kserve-mlserver":
            from k8s_emulator.server import ModelServer

            self.inner = ModelServer(workdir, isvc, predictor, CONTAINER, "mlserver", str(models))
            self.log_path = self.inner.log_path
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW"))}
        with self.log_path.open("ab") as log:
            self.proc = kubelet.current().run(
                "k8s_emulator.sklearn_server",
                ["--model-dir", str(models), "--model-name", isvc, "--state-file", str(self.state_path)],
                env, os.getcwd(), log.fileno(),
            )  # fmt: skip

    def knative(self, revision: str) -> None:
        """Make this a pod of Knative revision ``revision`` (of configuration and service
        ``<isvc>-predictor``, as KServe names them): its labels, and the queue-proxy in front of the
        runtime, counting what it answers (metrics.py)."""
        from k8s_emulator.metrics import QueueProxyMetrics

        self.revision = revision
        component = f"{self.isvc}-predictor"
        self.queue_proxy = QueueProxyMetrics(self.ns, component, component, revision, self.pod_name)

    def _download(self, target: Path) -> None:
        parts = urlsplit(self.storage_uri)
        if parts.scheme != "file":
            raise RuntimeError(f"cannot download {self.storage_uri} in the emulator (file:// only)")
        source = Path(parts.path)
        if not source.is_dir():
            raise RuntimeError(f"{self.storage_uri} does not exist")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, target)

    @property
    def port(self) -> int | None:
        if self.inner is not None:
            return self.inner.port
        try:
            return json.loads(self.state_path.read_text()).get("port")
        except (OSError, ValueError):
            return None

    def phase(self) -> tuple[str, str | None]:
        if self.error:
            return "failed", self.error
        if self.inner is not None:
            return self.inner.phase()
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("phase") == "failed":
            return "failed", state.get("error")
        if self.proc.poll() is not None:
            return "failed", f"the model server exited with code {self.proc.returncode}"
        return ("ready", None) if state.get("phase") == "ready" else ("loading", None)

    def alive(self) -> bool:
        return (
            self.inner.proc.poll() is None if self.inner is not None else bool(self.proc and self.proc.poll() is None)
        )

    def stop(self) -> None:
        if self.inner is not None:
            self.inner.stop()
        elif self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.queue_proxy is not None:
            self.queue_proxy.close()

    def access_log(self, method: str, path: str, code: int) -> None:
        if self.inner is not None:  # MLServer logs its requests; the sklearn stand-in logs its own
            self.inner.access_log(method, path, code)

    def pod(self, ns: str) -> dict[str, Any]:
        phase, _ = self.phase()
        knative = {}
        if self.queue_proxy is not None:
            resource = self.queue_proxy.resource
            knative = {"serving.knative.dev/revision": self.revision,
                       "serving.knative.dev/configuration": resource["configuration_name"],
                       "serving.knative.dev/service": resource["service_name"]}  # fmt: skip
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.pod_name, "namespace": ns, "uid": self.key,
                         "labels": {"serving.kserve.io/inferenceservice": self.isvc, "component": "predictor",
                                    "app": f"isvc.{self.isvc}-{self.predictor}", **knative}},
            "spec": {"initContainers": [{"name": "storage-initializer", "image": "kserve/storage-initializer",
                                         "args": [self.storage_uri, "/mnt/models"]}],
                     "containers": [{"name": CONTAINER, "image": f"emulated/{self.runtime}"}]},
            "status": {"phase": {"ready": "Running", "loading": "Pending"}.get(phase, "Running"),
                       "conditions": [{"type": "Ready", "status": "True" if phase == "ready" else "False"}]},
        }  # fmt: skip


@dataclass
class IsvcState:
    serving: dict[str, tuple[PredictorPod, int]] = field(default_factory=dict)
    #: Knative mode: the previous ready revision's pods, which keep the traffic a canary does not get
    stable: dict[str, tuple[PredictorPod, int]] = field(default_factory=dict)
    revision: int = 0
    revision_spec: str | None = None
    ready_revision: str | None = None
    #: Knative mode, minReplicas 0, scaled to zero: predictor name -> (server key, model spec); the
    #: revision stays Ready with no pods until a request comes (scale_to_zero, activate).
    zeroed: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = field(default_factory=dict)


STATES: dict[tuple[str, str], IsvcState] = {}
#: Pods a rollout replaced: out of the routes at once, stopped after a grace period, as Kubernetes
#: takes a terminating pod out of the Service's endpoints before it signals it (in-flight requests end).
RETIRING: list[tuple[float, PredictorPod]] = []
GRACE_SECONDS = 3.0


def _key(ns: str, name: str) -> tuple[str, str]:
    return ns, f"isvc:{name}"


def _conditions(old: list[dict[str, Any]], wanted: dict[str, tuple[str, str | None]]) -> list[dict[str, Any]]:
    """Conditions with their lastTransitionTime kept while the status does not change."""
    previous = {c["type"]: c for c in old or []}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = []
    for kind, (status, reason) in wanted.items():
        c = {"type": kind, "status": status}
        if reason:
            c["reason"] = reason
        before = previous.get(kind)
        c["lastTransitionTime"] = before["lastTransitionTime"] if before and before["status"] == status else now
        out.append(c)
    return out


def reconcile(cluster: Any, lock: Any) -> None:
    with lock:
        isvcs = [(k, v) for k, v in cluster.objects.items() if k[0] == PLURAL]
        due = [pod for deadline, pod in RETIRING if deadline <= time.monotonic()]
        RETIRING[:] = [(d, pod) for d, pod in RETIRING if pod not in due]
    for pod in due:
        pod.stop()
    for (_, ns, name), obj in isvcs:
        with lock:
            if cluster.objects.get((PLURAL, ns, name)) is not obj:
                continue
            _reconcile_one(cluster, ns, name, obj)


def _reconcile_one(cluster: Any, ns: str, name: str, obj: dict[str, Any]) -> None:
    meta, spec = obj["metadata"], obj["spec"]
    st = STATES.setdefault((ns, name), IsvcState())
    mode = (meta.get("annotations") or {}).get("serving.kserve.io/deploymentMode", "Standard")
    mine = [k for k in cluster.servers if k[:2] == _key(ns, name)]
    status: dict[str, Any] = {
        "observedGeneration": meta.get("generation", 1), "deploymentMode": mode,
        "url": f"{cluster.url}/serving/{ns}/{name}",
        "address": {"url": f"http://{name}-predictor.{ns}.svc.cluster.local"},
    }  # fmt: skip
    old = obj.get("status") or {}
    if (meta.get("annotations") or {}).get(STOP) == "true":
        for k in mine:
            cluster.servers.pop(k).stop()
        st.serving = {}
        status["conditions"] = _conditions(old.get("conditions"), {
            "IngressReady": ("False", "Stopped"), "PredictorReady": ("False", "Stopped"),
            "Ready": ("False", "Stopped"), "Stopped": ("True", None)})  # fmt: skip
        status["modelStatus"] = {"transitionStatus": "UpToDate", "states": {"activeModelState": ""}}
        return _write(cluster, obj, old, status)
    if st.zeroed and _revision_spec(spec) == st.revision_spec:
        return  # scaled to zero: no pods, the status as it was (Ready) until a request activates it
    st.zeroed = {}
    predictors = [(spec["predictor"], None)] + [
        (c["predictor"], int(c["trafficPercent"])) for c in spec.get("canary") or []
    ]
    wanted: dict[str, tuple[PredictorPod, int]] = {}
    fresh: list[PredictorPod] = []
    canary_total = sum(pct for _, pct in predictors if pct is not None)
    for p, pct in predictors:
        model = p.get("model") or {}
        pname = p.get("name") or "predictor"
        key = (*_key(ns, name), pname, f"{model.get('runtime')}|{model.get('modelFormat')}|{model.get('storageUri')}")
        if key not in cluster.servers:
            cluster.servers[key] = PredictorPod(cluster.workdir, ns, name, pname, model)
            fresh.append(cluster.servers[key])
        wanted[pname] = (cluster.servers[key], 100 - canary_total if pct is None else pct)
    revision_spec = _revision_spec(spec)
    if revision_spec != st.revision_spec:
        st.revision, st.revision_spec = st.revision + 1, revision_spec
    created = f"{name}-predictor-{st.revision:05d}"
    if mode == "Knative":
        for pod in fresh:
            pod.knative(created)
    phases = {pn: s.phase() for pn, (s, _) in wanted.items()}
    failed = [(pn, err) for pn, (ph, err) in phases.items() if ph == "failed"]
    if failed:
        pn, err = failed[0]
        serving = bool(st.serving)
        status["modelStatus"] = {
            "transitionStatus": "BlockedByFailedLoad",
            "states": {"activeModelState": "Loaded" if serving else "FailedToLoad", "targetModelState": "FailedToLoad"},
            "lastFailureInfo": {"reason": "ModelLoadFailed", "message": err, "location": wanted[pn][0].pod_name,
                                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        }  # fmt: skip
        ready = "True" if serving else "False"
        status["conditions"] = _conditions(old.get("conditions"), {
            "IngressReady": (ready, None), "PredictorReady": (ready, None if serving else "ModelLoadFailed"),
            "Ready": (ready, None if serving else "ModelLoadFailed")})  # fmt: skip
    elif all(ph == "ready" for ph, _ in phases.values()):
        new = {id(s) for s, _ in wanted.values()}
        if mode == "Knative" and st.ready_revision not in (None, created):
            st.stable = {k: v for k, v in st.serving.items() if id(v[0]) not in new} or st.stable
        pct = spec["predictor"].get("canaryTrafficPercent") if mode == "Knative" else None
        serving = wanted
        if pct is not None and st.stable:  # the latest revision gets pct, the previous ready one the rest
            serving = {f"stable-{k}": (s, 100 - int(pct)) for k, (s, _) in st.stable.items()}
            serving.update({k: (s, int(pct)) for k, (s, _) in wanted.items()})
        else:
            st.stable = {}
        st.serving, st.ready_revision = serving, created
        keep = {id(s) for s, _ in serving.values()}
        for k in mine:
            if id(cluster.servers[k]) not in keep:
                RETIRING.append((time.monotonic() + GRACE_SECONDS, cluster.servers.pop(k)))
        status["modelStatus"] = {"transitionStatus": "UpToDate",
                                 "states": {"activeModelState": "Loaded", "targetModelState": ""}}  # fmt: skip
        status["conditions"] = _conditions(old.get("conditions"), {
            "IngressReady": ("True", None), "PredictorReady": ("True", None), "Ready": ("True", None)})  # fmt: skip
    else:
        serving = bool(st.serving)  # a rolling update: the previous pods keep the predictor ready
        status["modelStatus"] = {"transitionStatus": "InProgress",
                                 "states": {"activeModelState": "Loaded" if serving else "Pending",
                                            "targetModelState": "Loading"}}  # fmt: skip
        ready = "True" if serving else "False"
        status["conditions"] = _conditions(old.get("conditions"), {
            "IngressReady": (ready, None), "PredictorReady": (ready, None), "Ready": (ready, None)})  # fmt: skip
    predictor_status: dict[str, Any] = {"url": status["address"]["url"]}
    if mode == "Knative":
        traffic = [{"revisionName": st.ready_revision, "percent": 100, "latestRevision": True}]
        pct = spec["predictor"].get("canaryTrafficPercent")
        if pct is not None and st.stable and st.ready_revision == created:
            traffic = [{"revisionName": created, "percent": int(pct), "latestRevision": True, "tag": "latest"},
                       {"revisionName": f"{name}-predictor-{st.revision - 1:05d}", "percent": 100 - int(pct),
                        "latestRevision": False, "tag": "prev"}]  # fmt: skip
        predictor_status.update(latestCreatedRevision=created, latestReadyRevision=st.ready_revision, traffic=traffic)
    status["components"] = {"predictor": predictor_status}
    if spec.get("canary"):
        status["canaryStatuses"] = [
            {"name": c["predictor"].get("name", ""), "trafficPercent": int(c["trafficPercent"]),
             "ready": phases.get(c["predictor"].get("name", ""), ("", None))[0] == "ready"}
            for c in spec["canary"]
        ]  # fmt: skip
    _write(cluster, obj, old, status)


def _revision_spec(spec: dict[str, Any]) -> str:
    """What makes a new Knative revision: the predictor, its traffic split aside."""
    return json.dumps({k: v for k, v in spec["predictor"].items() if k != "canaryTrafficPercent"}, sort_keys=True)


def scale_to_zero(cluster: Any, ns: str, name: str, lock: Any) -> tuple[int, dict[str, Any]]:
    """Test control: what Knative's autoscaler does to an idle revision whose ``minReplicas`` is 0
    (the pods go; the InferenceService stays Ready). Refused (409) where KServe would keep pods."""
    with lock:
        obj = cluster.objects.get((PLURAL, ns, name))
        st = STATES.get((ns, name))
        if obj is None or st is None or not st.serving:
            return 404, {"error": f"no serving InferenceService {ns}/{name}"}
        mode = (obj["metadata"].get("annotations") or {}).get("serving.kserve.io/deploymentMode", "Standard")
        predictor = obj["spec"]["predictor"]
        if mode != "Knative" or int(predictor.get("minReplicas", 1)) != 0 or obj["spec"].get("canary"):
            return 409, {"error": "only a Knative-mode predictor with minReplicas 0 scales to zero"}
        for key in [k for k in cluster.servers if k[:2] == _key(ns, name)]:
            pod = cluster.servers.pop(key)
            st.zeroed[pod.predictor] = (key, pod.model)
            pod.stop()
        st.serving, st.stable = {}, {}
        return 200, {"scaledToZero": sorted(st.zeroed)}


def _activate(cluster: Any, ns: str, name: str) -> None:
    """A request to a revision scaled to zero: Knative's activator has the autoscaler start its pods
    (the caller holds the lock); the ingress answers 503 until one is ready."""
    st = STATES[(ns, name)]
    for pname, (key, model) in st.zeroed.items():
        cluster.servers[key] = PredictorPod(cluster.workdir, ns, name, pname, model)
        cluster.servers[key].knative(st.ready_revision or f"{name}-predictor-{st.revision:05d}")
        st.serving[pname] = (cluster.servers[key], 100)
    st.zeroed = {}


def _write(cluster: Any, obj: dict[str, Any], old: dict[str, Any], status: dict[str, Any]) -> None:
    if status != old:
        obj["status"] = status
        obj["metadata"]["resourceVersion"] = cluster.next_rv()


def shutdown() -> None:
    for _, pod in RETIRING:
        pod.stop()
    RETIRING.clear()


def forget(cluster: Any, ns: str, name: str) -> None:
    for key in [k for k in cluster.servers if k[:2] == _key(ns, name)]:
        cluster.servers.pop(key).stop()
    STATES.pop((ns, name), None)


def pick(cluster: Any, ns: str, name: str, lock: Any) -> PredictorPod | None:
    with lock:
        if (PLURAL, ns, name) not in cluster.objects:
            return None
        st = STATES.get((ns, name))
        if st is not None and st.zeroed:
            # The pods this request has started were not there when it came: the mesh answers it 503
            # (however fast the runtime then loads: the emulator's containers start in milliseconds).
            _activate(cluster, ns, name)
            return None
        live = [(s, w) for s, w in (st.serving.values() if st else []) if s.alive()]
    if not live:
        return None
    total = sum(w for _, w in live)
    if not total:
        return live[0][0]
    at = random.uniform(0, total)
    for server, weight in live:
        at -= weight
        if at <= 0 and weight:
            return server
    return next(s for s, w in reversed(live) if w)


def ingress(cluster: Any, lock: Any, method: str, path: str, body: Any) -> tuple[int, Any]:
    """(status, JSON answer) of ``/serving/<ns>/<name>/<route>``, as the runtime behind it answers;
    in Knative mode counted by the pod's queue-proxy (not the mesh's 503s: no pod answered them)."""
    import re

    found = re.fullmatch(r"/serving/([^/]+)/([^/]+)/(.*)", path)
    if not found:
        return 404, {"error": path}
    ns, name, route = found.groups()
    server = pick(cluster, ns, name, lock)
    if server is None or server.port is None or server.phase()[0] != "ready":
        # What the mesh answers while no pod of the revision is ready (a scale-up from zero, a restart).
        return 503, {"error": "no healthy upstream"}
    began = time.perf_counter()
    code, answer = _forward(server, name, method, route, body)
    if server.queue_proxy is not None:
        server.queue_proxy.observe(code, time.perf_counter() - began)
    return code, answer


def _forward(server: PredictorPod, name: str, method: str, route: str, body: Any) -> tuple[int, Any]:
    """The runtime's answer to ``route`` (the pod's own routes)."""
    from k8s_emulator.server import v2_route

    if server.inner is not None:  # MLServer: v2 only, the model under the InferenceService's name
        if not route.startswith("v2/"):
            return 404, {"detail": "Not Found"}
        code, answer = v2_route(SimpleNamespace(node=name, port=server.port), method, route, body)
        if isinstance(answer, dict) and "model_version" in answer:
            answer["model_version"] = server.model_version
        server.access_log(method, route, code)
        return code, answer if answer is not None else {"detail": "Not Found"}
    answer = HTTP.request(
        method, f"http://127.0.0.1:{server.port}/{route}", timeout=60,
        content=json.dumps(body) if body is not None else None, headers={"content-type": "application/json"},
    )  # fmt: skip
    try:
        return answer.status_code, answer.json()
    except ValueError:
        return answer.status_code, {"error": answer.text[:500]}
