"""The Kubernetes API emulator (see the package docstring). Run: ``python -m k8s_emulator.server``.

Implements, for namespaced objects: create (POST), get, list with ``labelSelector``, replace (PUT),
``application/merge-patch+json`` and ``application/json-patch+json`` PATCH, delete, ``resourceVersion``
optimistic concurrency (409), 404 and 409 AlreadyExists as Kubernetes ``Status`` bodies, and 422
when a SeldonDeployment violates the CRD's openAPIV3Schema (Seldon Core's real CRD). Secrets keep
``stringData`` base64-encoded in ``data``; pod logs need the container's name and stream with
``follow=true`` (chunked, as the log grows, until the pod goes or the client hangs up).

The Seldon operator stand-in starts one real model server
(``airflow_provider_modeldeploy.serving.mlflow_server``) per replica of each predictor, each reported
as a pod like Seldon's (its Deployment's name and labels, the model container beside the executor,
the storage initializer naming the modelUri; a model server that exited is a CrashLoopBackOff, its
log the ``previous`` one), and writes ``status`` as Seldon Core v1.18.2 does (``deploymentStatus``
replica counts, ``replicas``; ``state`` Creating -> Available, Available through a rolling update
while the previous pods serve, Failed with Seldon's own description only once a Deployment stopped
progressing: see ``Cluster.reconcile``). An ingress at ``/seldon/<ns>/<name>/...`` answers the
executor's routes for the deployment's protocol in upstream's shapes (Seldon's ``api/v1.0/...`` as
the MLFLOW_SERVER python wrapper answers, or V2's ``v2/models/<graph node>/...`` as MLServer 1.3.5
does; tests/fixtures/seldon/README.md lists the sources), forwarding to the ready pods split by the
predictors' ``traffic`` weights, the replicas taking turns, and logs each request in the pod's log
as the model container's web server would.

The KServe controller stand-in (``kserve.py``) does the same for InferenceServices
(``serving.kserve.io/v1beta1``, 422s from the shipped KServe CRD), with predictor pods running the
chosen runtime for real and an ingress at ``/serving/<ns>/<name>/...``; ServiceAccounts are stored.

Test control: ``POST /emulator/conflicts {"count": n}`` makes the next n writes that carry a
resourceVersion lose a race to a (simulated) concurrent writer: the object changes and they get 409.
``POST /emulator/scale-to-zero {"namespace": ns, "name": isvc}``: see kserve.py.
``POST /emulator/prometheus-sd {"file": path}``: from then on the emulator keeps ``path`` (Prometheus'
file_sd format) listing its pods' metrics ports (metrics.py: Seldon's executor, Knative's
queue-proxy) with the ``__meta_kubernetes_*`` labels kubernetes_sd would give them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from local_http import HTTP

from k8s_emulator import crd_validation, kserve, kubelet
from k8s_emulator.metrics import SeldonExecutorMetrics, executor_service

SERVER_MODULE = "airflow_provider_modeldeploy.serving.mlflow_server"
SD = ("apis/machinelearning.seldon.io/v1", "seldondeployments", "SeldonDeployment")
KINDS = {
    "seldondeployments": "SeldonDeployment",
    "inferenceservices": "InferenceService",
    "secrets": "Secret",
    "serviceaccounts": "ServiceAccount",
    "pods": "Pod",
}
GROUPS = {"seldondeployments": "machinelearning.seldon.io", "inferenceservices": "serving.kserve.io"}
LOCK = threading.RLock()


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def body(self) -> dict[str, Any]:
        return {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        }  # fmt: skip


def _warning_header(warnings: list[str]) -> dict[str, str]:
    """The API server's ``Warning: 299 - "<text>"`` header (RFC 7234), one value per warning."""
    return {"Warning": ", ".join(f"299 - {json.dumps(w)}" for w in warnings)} if warnings else {}


def match_selector(labels: dict[str, str], selector: str | None) -> bool:
    """Equality-based label selectors (``a=b,c!=d,e``), as the client sends them."""
    if not selector:
        return True
    for term in selector.split(","):
        term = term.strip()
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 (add, remove, replace, test)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = parts[-1]
        kind = op["op"]
        if isinstance(parent, list):
            idx = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(idx, op["value"])
            elif kind == "remove":
                parent.pop(idx)
            elif kind == "replace":
                parent[idx] = op["value"]
            elif kind == "test" and parent[idx] != op["value"]:
                raise ApiError(422, "Invalid", f"test failed at {op['path']}")
        else:
            if kind in ("add", "replace"):
                if kind == "replace" and last not in parent:
                    raise ApiError(422, "Invalid", f"replace: {op['path']} does not exist")
                parent[last] = op["value"]
            elif kind == "remove":
                if last not in parent:
                    raise ApiError(422, "Invalid", f"remove: {op['path']} does not exist")
                del parent[last]
            elif kind == "test" and parent.get(last) != op["value"]:
                raise ApiError(422, "Invalid", f"test failed at {op['path']}")
    return doc


class ModelServer:
    """One real local model server for one predictor's modelUri (the emulated model pod). The Seldon
    stand-in starts one per replica; each is a pod of its own."""

    def __init__(
        self, workdir: Path, sd: str, predictor: str, node: str, implementation: str, model_uri: str,
        parameters: list[dict[str, Any]] | None = None,
    ) -> None:  # fmt: skip
        self.key = str(uuidlib.uuid4())
        self.sd, self.predictor, self.model_uri = sd, predictor, model_uri
        self.node, self.implementation = node, implementation  # the graph node: container and V2 model name
        self.parameters = {p.get("name"): p.get("value") for p in parameters or []}
        self.started = time.time()
        #: the executor's metrics port (Seldon's pods; see metrics.py), set by the Seldon stand-in
        self.metrics: SeldonExecutorMetrics | None = None
        # Seldon's Deployment is "<sdep>-<predictor>-<componentSpec index>-<container names>"
        # (GetDeploymentName, operator/apis/machinelearning.seldon.io/v1/seldondeployment_types.go,
        # v1.18.2); its ReplicaSet's pods "<deployment>-<pod-template-hash>-<5 chars>" (Kubernetes).
        self.deployment = f"{sd}-{predictor}-0-{node}"
        self.template_hash = _template_hash(model_uri, implementation, self.parameters)
        self.pod_name = f"{self.deployment}-{self.template_hash}-{_suffix(self.key)}"
        run = workdir / "run"
        run.mkdir(parents=True, exist_ok=True)
        self.state_path = run / f"{self.key.replace('-', '')}.state"
        self.log_path = workdir / "logs" / f"{self.pod_name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        sock.set_inheritable(True)
        self.port = sock.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "_AIRFLOW"))}
        with self.log_path.open("ab") as log:
            self.proc = kubelet.current().run(
                SERVER_MODULE,
                ["--service-uuid", self.key, "--model-uri", model_uri, "--model-name", predictor,
                 "--listen-fd", "{listen_fd}", "--runtime-dir", str(run), "--start-timeout", "120"],
                env, str(workdir), log.fileno(), listen=sock.fileno(),
            )  # fmt: skip
        sock.close()

    def phase(self) -> tuple[str, str | None]:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("phase") == "failed":
            return "failed", state.get("error")
        if state.get("phase") in ("ready", "active"):
            if self.proc.poll() is not None:
                return "failed", "the model server exited"
            if state["phase"] == "ready":
                # The server answers on its public socket once told to (as the local backend does it).
                from airflow_provider_modeldeploy.serving import mlflow_server

                try:
                    mlflow_server.control_request(self.state_path.with_suffix(".ctl"), "activate", timeout=30)
                except mlflow_server.ControlError as exc:
                    return "loading", str(exc)
            return "ready", None
        if self.proc.poll() is not None:
            return "failed", f"the model server exited with code {self.proc.returncode}"
        return "loading", None

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.state_path.unlink(missing_ok=True)
        if self.metrics is not None:
            self.metrics.close()

    def access_log(self, method: str, path: str, code: int) -> None:
        """The line the model container's web server logs for a request (uvicorn's format, as
        MLServer prints it): the model server itself runs without an access log."""
        with self.log_path.open("a") as fh:
            fh.write(f'INFO:     127.0.0.1 - "{method} /{path} HTTP/1.1" {code}\n')

    def pod(self, ns: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        """The pod as Seldon's Deployment makes it and Kubernetes reports it: the labels of
        createDeploymentWithoutEngine and addLabelsToDeployment (operator/controllers/
        seldondeployment_controller.go and labels.go, v1.18.2) and the predictor's own, the model
        container beside the orchestrator, the storage initializer (its first argument the
        modelUri); Ready once the model answers. A model server that exited is a crash loop as the
        kubelet shows it: phase Running, the container waiting in CrashLoopBackOff, its last state
        terminated with exit code 1 (Seldon's containers keep no termination message)."""
        phase, _ = self.phase()
        ready = phase == "ready"
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
        image = f"emulated/{self.implementation.lower()}"
        if phase == "failed":
            model_status = {
                "name": self.node, "image": image, "imageID": "", "ready": False, "restartCount": 1, "started": False,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": (
                    f"back-off 10s restarting failed container={self.node} pod={self.pod_name}_{ns}({self.key})")}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "startedAt": since,
                                             "finishedAt": since}},
            }  # fmt: skip
        else:
            model_status = {"name": self.node, "image": image, "imageID": "", "ready": ready, "restartCount": 0, "started": True,
                            "state": {"running": {"startedAt": since}}, "lastState": {}}  # fmt: skip
        engine_status = {"name": "seldon-container-engine", "image": ENGINE_IMAGE, "imageID": "", "ready": True, "restartCount": 0, "started": True,
                         "state": {"running": {"startedAt": since}}, "lastState": {}}  # fmt: skip
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.pod_name, "namespace": ns, "uid": self.key,
                         "labels": {**(labels or {}), "seldon-deployment-id": self.sd, "app": self.deployment,
                                    "fluentd": "true", "seldon-app": f"{self.sd}-{self.predictor}",
                                    f"seldon-app-svc-{self.node}": f"{self.sd}-{self.predictor}-{self.node}",
                                    "seldon.io/model": "true", "app.kubernetes.io/managed-by": "seldon-core",
                                    "pod-template-hash": self.template_hash}},
            "spec": {
                "initContainers": [{"name": f"{self.node}-model-initializer", "image": INITIALIZER_IMAGE,
                                    "args": [self.model_uri, "/mnt/models"]}],
                "containers": [{"name": self.node, "image": f"emulated/{self.implementation.lower()}"},
                               {"name": "seldon-container-engine", "image": ENGINE_IMAGE}],
            },
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"},
                                      {"type": "ContainersReady", "status": "True" if ready else "False"}],
                       "initContainerStatuses": [{"name": f"{self.node}-model-initializer", "ready": True,
                                                  "image": INITIALIZER_IMAGE, "imageID": "",
                                                  "restartCount": 0, "state": {"terminated": {
                                                      "exitCode": 0, "reason": "Completed"}}}],
                       "containerStatuses": [model_status, engine_status]},
        }  # fmt: skip


INITIALIZER_IMAGE = "seldonio/rclone-storage-initializer:1.18.2"
ENGINE_IMAGE = "seldonio/seldon-core-executor:1.18.2"


def _template_hash(*parts: Any) -> str:
    """A pod-template-hash: the same for the replicas of one spec, another for the next spec."""
    import hashlib

    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).digest()
    return "".join("bcdfghjklmnpqrstvwxz2456789"[b % 27] for b in digest[:10])


def _suffix(key: str) -> str:
    return "".join("bcdfghjklmnpqrstvwxz2456789"[int(c, 16) % 27] for c in key.replace("-", "")[-5:])


class Cluster:
    """The emulated cluster's objects and the Seldon operator stand-in."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.url = ""  # where this emulator answers (InferenceServices' status.url is under it)
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.rv = 0
        self.conflicts = 0
        #: Seldon's model pods by (ns, sd, predictor, uri, replica index); KServe's by its own keys
        self.servers: dict[tuple[str, ...], Any] = {}
        #: the pods the ingress routes to: per SeldonDeployment, per predictor (replicas, traffic)
        self.serving: dict[tuple[str, str], dict[str, tuple[list[ModelServer], int]]] = {}
        self.unready_since: dict[tuple[str, str, str], float] = {}  # (ns, sd, Deployment): progress clock
        self.progress_deadline = float(os.environ.get("EMULATOR_PROGRESS_DEADLINE", "600"))
        self.stopping = threading.Event()
        #: Test control (POST /emulator/prometheus-sd): where to keep the pods' metrics targets
        self.prometheus_sd: Path | None = None
        self._sd_written = ""

    def next_rv(self) -> str:
        self.rv += 1
        return str(self.rv)

    # -- objects ---------------------------------------------------------------------------------

    def get(self, plural: str, ns: str, name: str) -> dict[str, Any]:
        obj = self.objects.get((plural, ns, name))
        if obj is None:
            raise ApiError(
                404,
                "NotFound",
                f'{plural}.{GROUPS.get(plural, "")} "{name}" not found'.replace(". ", " "),
            )
        return obj

    def validate(
        self, plural: str, obj: dict[str, Any], field_validation: str | None = None, warnings: list[str] | None = None
    ) -> dict[str, Any]:
        """The object as stored (custom resources: unknown fields pruned, or a 400 under Strict; the
        CRD schema's 422s), by crd_validation.py's reading of the CRD, not the provider's."""
        if plural in crd_validation.CRDS:
            try:
                obj, said = crd_validation.admit(plural, obj, field_validation)
            except crd_validation.Rejected as exc:
                raise ApiError(exc.code, exc.reason, exc.message) from None
            if warnings is not None:
                warnings += said
        name = obj.get("metadata", {}).get("name") or ""
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name) or len(name) > 253:
            raise ApiError(
                422, "Invalid", f'metadata.name: Invalid value: "{name}": a lowercase RFC 1123 subdomain must ...'
            )
        return obj

    def create(
        self,
        plural: str,
        ns: str,
        obj: dict[str, Any],
        field_validation: str | None = None,
        warnings: list[str] | None = None,
    ) -> dict[str, Any]:
        obj = _encode_string_data(copy.deepcopy(obj)) if plural == "secrets" else copy.deepcopy(obj)
        obj.setdefault("metadata", {})["namespace"] = ns
        obj = self.validate(plural, obj, field_validation, warnings)
        meta = obj["metadata"]
        key = (plural, ns, meta["name"])
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
        meta.update(
            uid=str(uuidlib.uuid4()),
            resourceVersion=self.next_rv(),
            generation=1,
            creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        if plural == SD[1]:
            obj["status"] = {"state": "Creating"}
        if plural == kserve.PLURAL:
            obj["status"] = {}
        self.objects[key] = obj
        return obj

    def _check_rv(self, current: dict[str, Any], given: str | None) -> None:
        if given and self.conflicts > 0:
            # A concurrent writer wins the race: the object changes under the caller.
            self.conflicts -= 1
            current["metadata"]["resourceVersion"] = self.next_rv()
            current["metadata"].setdefault("annotations", {})["emulator/concurrent-writer"] = current["metadata"][
                "resourceVersion"
            ]
        if given and given != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {current["kind"]} "{current["metadata"]["name"]}": the object has been modified; please apply your changes to the latest version and try again',
            )

    def write(
        self,
        plural: str,
        ns: str,
        name: str,
        new: dict[str, Any],
        given_rv: str | None,
        status: bool = False,
        field_validation: str | None = None,
        warnings: list[str] | None = None,
    ) -> dict[str, Any]:
        current = self.get(plural, ns, name)
        self._check_rv(current, given_rv)
        new = _encode_string_data(copy.deepcopy(new)) if plural == "secrets" else copy.deepcopy(new)
        meta = new.setdefault("metadata", {})
        for k in ("uid", "creationTimestamp", "namespace", "name"):
            meta[k] = current["metadata"][k]
        if status:
            new = {**copy.deepcopy(current), "status": new.get("status", {})}
        else:
            new["status"] = copy.deepcopy(current.get("status", {}))
            new = self.validate(plural, new, field_validation, warnings)
            meta = new["metadata"]
            gen = current["metadata"].get("generation", 1)
            # The status stays as the operator last wrote it (Available, even Failed) until it
            # reconciles the new spec, as on a real API server.
            meta["generation"] = gen + 1 if new.get("spec") != current.get("spec") else gen
        new["metadata"]["resourceVersion"] = self.next_rv()
        self.objects[(plural, ns, name)] = new
        return new

    def delete(self, plural: str, ns: str, name: str) -> dict[str, Any]:
        obj = self.objects.pop((plural, ns, name), None)
        if obj is None:
            self.get(plural, ns, name)
        if plural == SD[1]:
            for key in [k for k in self.servers if k[:2] == (ns, name)]:
                self.servers.pop(key).stop()
            self.serving.pop((ns, name), None)
            for key in [k for k in self.unready_since if k[:2] == (ns, name)]:
                del self.unready_since[key]
        if plural == kserve.PLURAL:
            kserve.forget(self, ns, name)
        return {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": name, "kind": plural}}

    def pods(self, ns: str) -> list[dict[str, Any]]:
        pods = []
        for key, server in self.servers.items():
            if key[0] != ns:
                continue
            labels = None
            if isinstance(server, ModelServer) and len(key) == 5:
                obj = self.objects.get((SD[1], ns, key[1])) or {}
                spec = next((p for p in obj.get("spec", {}).get("predictors", []) if p["name"] == key[2]), {})
                labels = spec.get("labels")
            pods.append(server.pod(ns, labels) if labels else server.pod(ns))
        return pods

    # -- the Seldon operator stand-in ------------------------------------------------------------

    def reconcile(self) -> None:
        """Seldon Core 1's reconcile (operator/controllers/seldondeployment_controller.go, v1.18.2):
        one Deployment per predictor with ``replicas`` pods; a new spec rolls each Deployment (the
        previous pods serve until the new ones are ready). ``status`` as Seldon writes it:
        ``deploymentStatus`` per Deployment (``replicas``/``availableReplicas`` as the Deployment
        reports them, zeros left out: omitempty), ``replicas`` of the first predictor's Deployment,
        and ``state`` Available when every Deployment has a ready pod and none unavailable, Failed
        ("Deployment is no longer progressing and not available.") when one has not progressed for
        its progress deadline (Kubernetes' 600 s, ``EMULATOR_PROGRESS_DEADLINE`` here) and is not
        available, else Creating (a predictor scaled to 0 replicas included)."""
        with LOCK:
            sds = [(k, v) for k, v in self.objects.items() if k[0] == SD[1]]
        for (_, ns, name), obj in sds:
            with LOCK:
                self._reconcile_one(ns, name, obj)

    def _reconcile_one(self, ns: str, name: str, obj: dict[str, Any]) -> None:
        wanted: dict[str, tuple[list[ModelServer], int]] = {}
        deployments: dict[str, tuple[int, list[ModelServer]]] = {}  # name: (spec replicas, new pods)
        for p in obj["spec"].get("predictors", []):
            graph = p["graph"]
            replicas = int(p.get("replicas", 1))
            uri = graph.get("modelUri", "")
            pods = []
            for i in range(replicas):
                key = (ns, name, p["name"], uri, i)
                if key not in self.servers:
                    self.servers[key] = ModelServer(
                        self.workdir,
                        name,
                        p["name"],
                        graph["name"],
                        graph.get("implementation", ""),
                        uri,
                        graph.get("parameters"),
                    )
                    # The executor's labels: executor/api/rest/server.go wrapMetrics (v1.18.2).
                    version = (p.get("annotations") or {}).get("version", "")
                    self.servers[key].metrics = SeldonExecutorMetrics(name, p["name"], version)
                pods.append(self.servers[key])
            deployments[f"{name}-{p['name']}-0-{graph['name']}"] = (replicas, pods)
            if replicas > 0:
                wanted[p["name"]] = (pods, int(p.get("traffic", 100)))
        # Pods of a predictor's earlier spec (or of fewer replicas) are its Deployment's old pods.
        current = {id(s) for pods, _ in wanted.values() for s in pods}
        now = time.monotonic()
        status_deployments: dict[str, dict[str, int]] = {}
        all_ready, failed = True, False
        for dep, (replicas, pods) in deployments.items():
            old = [s for k, s in self.servers.items() if k[:2] == (ns, name) and isinstance(s, ModelServer)
                   and s.deployment == dep and id(s) not in current]  # fmt: skip
            new_ready = sum(1 for s in pods if s.phase()[0] == "ready")
            old_ready = sum(1 for s in old if s.phase()[0] == "ready")
            total, available = len(pods) + len(old), new_ready + old_ready
            status_deployments[dep] = {k: v for k, v in (("replicas", total), ("availableReplicas", available)) if v}
            unavailable = max(replicas - available, 0)
            if available == 0 or unavailable > 0:
                all_ready = False
                since = self.unready_since.setdefault((ns, name, dep), now)
                if now - since > self.progress_deadline and available < replicas:
                    failed = True
            else:
                self.unready_since.pop((ns, name, dep), None)
            if new_ready == len(pods) and old:
                for key in [k for k, s in self.servers.items() if any(s is o for o in old)]:
                    self.servers.pop(key).stop()  # the rollout of this Deployment is done
        # The ingress routes to a predictor's new pods once they are all ready, until then to its
        # previous ones; a predictor gone from the spec keeps its traffic until the rest is ready.
        serving = dict(self.serving.get((ns, name), {}))
        for pn, (pods, weight) in wanted.items():
            if all(s.phase()[0] == "ready" for s in pods):
                serving[pn] = (pods, weight)
        if all_ready or not wanted:
            serving = {pn: v for pn, v in serving.items() if pn in wanted}
        self.serving[(ns, name)] = serving
        if all_ready:
            state, desc = "Available", None
            # The Deployments of predictors no longer in the spec go once the others are ready.
            for key in [k for k, s in self.servers.items() if k[:2] == (ns, name) and isinstance(s, ModelServer)
                        and s.deployment not in deployments]:  # fmt: skip
                self.servers.pop(key).stop()
        elif failed:
            state, desc = "Failed", "Deployment is no longer progressing and not available."
        else:
            state, desc = "Creating", None
        status = {"state": state, "deploymentStatus": status_deployments}
        if desc:
            status["description"] = desc
        first = next(iter(status_deployments.values()), {})
        if first.get("replicas"):
            status["replicas"] = first["replicas"]
        predictors = obj["spec"].get("predictors") or [{}]
        if predictors[0].get("name"):
            # createAddressableResource and utils.GetPredictionPath (operator, v1.18.2): the first
            # predictor's Service, the protocol's prediction path.
            node = (predictors[0].get("graph") or {}).get("name", "")
            path = f"/v2/models/{node}/infer" if obj["spec"].get("protocol") == "v2" else "/api/v1.0/predictions"
            status["address"] = {"url": f"http://{name}-{predictors[0]['name']}.{ns}.svc.cluster.local:8000{path}"}
        if obj.get("status") != status:
            obj["status"] = status
            obj["metadata"]["resourceVersion"] = self.next_rv()

    def run_operator(self) -> None:
        while not self.stopping.is_set():
            try:
                self.reconcile()
                kserve.reconcile(self, LOCK)
                self.write_prometheus_sd()
            except Exception as exc:  # keep the loop alive; the test sees the state not moving
                print(f"operator: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self.stopping.wait(0.1)

    def prometheus_targets(self) -> list[dict[str, Any]]:
        """The metrics ports of the pods as Prometheus' kubernetes_sd (role pod) discovers them: one
        target per container port, with its ``__meta_kubernetes_*`` labels (pod labels sanitized as
        Prometheus does), for the scrape config's relabelling to turn into what a PodMonitor makes."""
        targets = []
        with LOCK:
            for ns in sorted({key[0] for key in self.servers}):
                pods = {p["metadata"]["name"]: p for p in self.pods(ns)}
                for key, server in self.servers.items():
                    endpoint = getattr(server, "metrics", None) or getattr(server, "queue_proxy", None)
                    if key[0] != ns or endpoint is None or server.pod_name not in pods:
                        continue
                    pod = pods[server.pod_name]
                    seldon = isinstance(endpoint, SeldonExecutorMetrics)
                    labels = {
                        "__meta_kubernetes_namespace": ns,
                        "__meta_kubernetes_pod_name": server.pod_name,
                        "__meta_kubernetes_pod_phase": pod["status"]["phase"],
                        "__meta_kubernetes_pod_container_name": "seldon-container-engine" if seldon else "queue-proxy",
                        "__meta_kubernetes_pod_container_port_name": "metrics" if seldon else "http-usermetric",
                    }
                    for k, v in (pod["metadata"].get("labels") or {}).items():
                        name = re.sub(r"[^a-zA-Z0-9_]", "_", k)
                        labels[f"__meta_kubernetes_pod_label_{name}"] = v
                        labels[f"__meta_kubernetes_pod_labelpresent_{name}"] = "true"
                    targets.append({"targets": [f"127.0.0.1:{endpoint.port}"], "labels": labels})
        return sorted(targets, key=lambda t: t["labels"]["__meta_kubernetes_pod_name"])

    def write_prometheus_sd(self) -> None:
        """Keep the file_sd file the test's Prometheus reads up to date (written whole, renamed in)."""
        if self.prometheus_sd is None:
            return
        text = json.dumps(self.prometheus_targets(), indent=1)
        if text != self._sd_written:
            tmp = self.prometheus_sd.with_name(self.prometheus_sd.name + ".tmp")
            tmp.write_text(text)
            tmp.rename(self.prometheus_sd)
            self._sd_written = text

    def shutdown(self) -> None:
        self.stopping.set()
        with LOCK:
            for server in self.servers.values():
                server.stop()
            self.servers.clear()
            kserve.shutdown()
            self.write_prometheus_sd()  # no targets left: Prometheus stops scraping them

    def route(self, ns: str, name: str) -> ModelServer | None:
        """A ready pod of a predictor picked by the traffic weights (Istio's split), the replicas of
        the predictor taking turns (its Service balancing over the pods)."""
        with LOCK:
            serving = self.serving.get((ns, name))
            if (ns, name) not in {(k[1], k[2]) for k in self.objects if k[0] == SD[1]} or not serving:
                return None
            live = [([s for s in pods if s.proc.poll() is None], w) for pods, w in serving.values()]
            live = [(pods, w) for pods, w in live if pods]
            if not live:
                return None
            total = sum(w for _, w in live)
            pick = random.uniform(0, total) if total else 0
            chosen = live[-1][0]
            for pods, weight in live:
                pick -= weight
                if pick <= 0:
                    chosen = pods
                    break
            self.turn = getattr(self, "turn", 0) + 1
            return chosen[self.turn % len(chosen)]


def _tail(data: bytes, query: dict[str, str]) -> list[bytes]:
    lines = data.splitlines(keepends=True)
    if query.get("tailLines") is not None:
        n = int(query["tailLines"])
        lines = lines[-n:] if n else []
    return lines


def _encode_string_data(secret: dict[str, Any]) -> dict[str, Any]:
    """``stringData`` is write-only: the API server merges it into ``data``, base64-encoded."""
    import base64

    plain = secret.pop("stringData", None) or {}
    if plain:
        data = dict(secret.get("data") or {})
        data.update({k: base64.b64encode(str(v).encode()).decode() for k, v in plain.items()})
        secret["data"] = data
    return secret


class Handler(BaseHTTPRequestHandler):
    cluster: Cluster
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        print(f"{self.command} {self.path} -> {fmt % args}", file=sys.stderr, flush=True)

    def _send(self, code: int, body: Any, headers: dict[str, str] | None = None, text: bool = False) -> None:
        data = body.encode() if text else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain" if text else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            if self.path.startswith("/seldon/"):
                return _BadJson()  # the model server judges it
            raise ApiError(400, "BadRequest", "the body is not JSON") from None

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        try:
            body = self._body()
            if parts.path.startswith("/seldon/"):
                return self._ingress(method, parts.path, body)
            if parts.path.startswith("/serving/"):
                return self._send(*kserve.ingress(self.cluster, LOCK, method, parts.path, body))
            if parts.path == "/emulator/scale-to-zero":
                code, answer = kserve.scale_to_zero(self.cluster, body["namespace"], body["name"], LOCK)
                return self._send(code, answer)
            if parts.path == "/emulator/prometheus-sd":
                with LOCK:
                    self.cluster.prometheus_sd = Path(body["file"])
                    self.cluster._sd_written = ""
                return self._send(200, {"file": body["file"]})
            if parts.path == "/emulator/conflicts":
                with LOCK:
                    self.cluster.conflicts = int((body or {}).get("count", 1))
                return self._send(200, {"conflicts": self.cluster.conflicts})
            m = re.fullmatch(
                r"/(api/v1|apis/machinelearning\.seldon\.io/v1|apis/serving\.kserve\.io/v1beta1)/namespaces/([^/]+)/"
                r"(seldondeployments|inferenceservices|secrets|serviceaccounts|pods)"
                r"(?:/([^/]+))?(?:/(status|log))?",
                parts.path,
            )
            if not m:
                raise ApiError(404, "NotFound", f"the server could not find the requested resource {parts.path}")
            _group, ns, plural, name, sub = m.groups()
            # Booleans as Go's strconv.ParseBool reads them (the Python client sends "True").
            if plural == "pods" and sub == "log" and query.get("follow") in ("1", "t", "T", "true", "True", "TRUE"):
                return self._follow_log(self._log_source(ns, name, query), query)  # streams without LOCK
            with LOCK:
                self._api(method, ns, plural, name, sub, query, body)
        except ApiError as exc:
            self._send(exc.code, exc.body())
        except Exception as exc:  # an emulator bug: answer as the API server would, and say what broke
            import traceback

            traceback.print_exc()
            self._send(500, ApiError(500, "InternalError", f"{type(exc).__name__}: {exc}").body())

    def _api(
        self, method: str, ns: str, plural: str, name: str | None, sub: str | None, query: dict, body: Any
    ) -> None:
        c = self.cluster
        if plural == "pods":
            pods = c.pods(ns)
            if name is None:
                items = [p for p in pods if match_selector(p["metadata"]["labels"], query.get("labelSelector"))]
                return self._send(
                    200,
                    {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(c.rv)}, "items": items},
                )
            if sub != "log":
                pod = next((p for p in pods if p["metadata"]["name"] == name), None)
                if pod is None:
                    raise ApiError(404, "NotFound", f'pods "{name}" not found')
                return self._send(200, pod)
            server = self._log_source(ns, name, query)
            lines = _tail(server.log_path.read_bytes() if server and server.log_path.exists() else b"", query)
            return self._send(200, b"".join(lines).decode(errors="replace"), text=True)
        if name is None:
            if method == "GET":
                items = [
                    copy.deepcopy(o)
                    for (p, n, _), o in sorted(c.objects.items())
                    if p == plural
                    and n == ns
                    and match_selector(o["metadata"].get("labels") or {}, query.get("labelSelector"))
                ]
                return self._send(
                    200,
                    {
                        "kind": f"{KINDS[plural]}List",
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(c.rv)},
                        "items": items,
                    },
                )
            if method == "POST":
                if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
                    raise ApiError(422, "Invalid", "metadata.name: Required value")
                warnings: list[str] = []
                created = c.create(plural, ns, body, query.get("fieldValidation"), warnings)
                return self._send(201, created, headers=_warning_header(warnings))
            raise ApiError(405, "MethodNotAllowed", method)
        status = sub == "status"
        if method == "GET":
            return self._send(200, c.get(plural, ns, name))
        if method == "DELETE":
            return self._send(200, c.delete(plural, ns, name))
        current = c.get(plural, ns, name)
        warnings = []
        validation = query.get("fieldValidation")
        if method == "PUT":
            rv = (body.get("metadata") or {}).get("resourceVersion")
            written = c.write(plural, ns, name, body, rv, status, validation, warnings)
            return self._send(200, written, headers=_warning_header(warnings))
        if method == "PATCH":
            ctype = self.headers.get("Content-Type", "")
            if "json-patch" in ctype:
                new = json_patch(current, body)
                rv = None
            elif "merge-patch" in ctype or "strategic-merge" in ctype:
                if not isinstance(body, dict):
                    raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
                new = merge_patch(current, body)
                rv = ((body or {}).get("metadata") or {}).get("resourceVersion")
            else:
                raise ApiError(
                    415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {ctype}"
                )
            if rv is None:
                new.setdefault("metadata", {})["resourceVersion"] = current["metadata"]["resourceVersion"]
            written = c.write(plural, ns, name, new, rv, status, validation, warnings)
            return self._send(200, written, headers=_warning_header(warnings))
        raise ApiError(405, "MethodNotAllowed", method)

    def _log_source(self, ns: str, name: str, query: dict[str, str]) -> ModelServer | None:
        """The model server whose log is container ``query['container']`` of pod ``name`` (None: the
        orchestrator's container, whose log is empty here). As the API server, 400 for a pod of
        several containers when none is named."""
        with LOCK:
            server = next(
                (s for (sns, *_), s in self.cluster.servers.items() if sns == ns and s.pod_name == name), None
            )
        if server is None:
            raise ApiError(404, "NotFound", f'pods "{name}" not found')
        containers = getattr(server, "containers", None) or [server.node, "seldon-container-engine"]
        container = query.get("container")
        if not container:
            raise ApiError(
                400, "BadRequest",
                f"a container name must be specified for pod {name}, choose one of: [{' '.join(containers)}]",
            )  # fmt: skip
        if container not in containers:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        if query.get("previous") in ("1", "t", "T", "true", "True", "TRUE"):
            # The crashed instance's log (a crash-looping model container); none for a live one.
            crashed = container == server.node and isinstance(server, ModelServer) and server.phase()[0] == "failed"
            if not crashed:
                raise ApiError(
                    400, "BadRequest", f'previous terminated container "{container}" in pod "{name}" not found'
                )
        return server if container == server.node else None

    def _follow_log(self, server: ModelServer | None, query: dict[str, str]) -> None:
        """``follow=true``: a chunked response sending the log's lines as they are written, until the
        pod goes away (the stream ends) or the client disconnects."""
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        path = server.log_path if server else None
        data = path.read_bytes() if path and path.exists() else b""
        done = data.rfind(b"\n") + 1  # complete lines only: the rest goes out once its newline is there
        try:
            self._chunk(b"".join(_tail(data[:done], query)))
            while server is not None and not self.cluster.stopping.is_set() and not self._client_gone():
                with path.open("rb") as fh:
                    fh.seek(done)
                    new = fh.read()
                complete = new[: new.rfind(b"\n") + 1]
                if complete:
                    self._chunk(complete)
                    done += len(complete)
                    continue
                with LOCK:
                    gone = server not in self.cluster.servers.values()
                if gone:
                    break
                time.sleep(0.1)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped following

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    def _client_gone(self) -> bool:
        import select

        readable, _, _ = select.select([self.connection], [], [], 0)
        try:
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _ingress(self, method: str, path: str, body: Any) -> None:
        """``/seldon/<ns>/<name>/<route>``: Seldon Core 1's executor routes for the deployment's
        protocol (others are 404, as its router answers), forwarded to a ready pod picked by the
        predictors' traffic weights, the replicas taking turns. Answers carry the executor's
        ``Seldon-Puid`` header (the request's, or a new one: executor/api/rest/middlewares.go
        puidHeader, v1.18.2). With no ready pod the mesh answers Envoy's 503 ``no healthy upstream``.
        The answer does not say which version served it; the pod's log has the request."""
        m = re.fullmatch(r"/seldon/([^/]+)/([^/]+)/(.*)", path)
        if not m:
            raise ApiError(404, "NotFound", path)
        ns, name, route = m.groups()
        with LOCK:
            obj = self.cluster.objects.get((SD[1], ns, name))
            protocol = (obj or {}).get("spec", {}).get("protocol") or "seldon"
        server = self.cluster.route(ns, name)
        if server is None:
            return self._send(503, "no healthy upstream", text=True)
        began = time.perf_counter()
        code, answer = (seldon_route if protocol == "seldon" else seldon_v2_route)(server, method, route, body)
        service = executor_service(protocol, method, route)
        if server.metrics is not None and service is not None:
            server.metrics.observe(service, method, code, time.perf_counter() - began)
        server.access_log(method, route, code)
        headers = {"Seldon-Puid": self.headers.get("Seldon-Puid") or str(uuidlib.uuid4())}
        if answer is None:
            return self._send(code, "404 page not found\n", headers, text=True)
        if answer == EMPTY:
            return self._send(code, "", headers, text=True)
        if isinstance(answer, str):
            return self._send(code, answer, headers, text=True)
        return self._send(code, answer, headers)


def _health(server: ModelServer) -> int:
    return HTTP.get(f"http://127.0.0.1:{server.port}/health", timeout=10).status_code


#: An answer without a body (the executor's health routes, MLServer's ready routes).
EMPTY = b""
#: The model container's image as the python wrapper names it in ``meta.requestPath``
#: (PREDICTIVE_UNIT_IMAGE; helm-charts/seldon-core-operator/values.yaml predictor_servers, v1.18.2).
WRAPPER_IMAGES = {"MLFLOW_SERVER": "seldonio/mlflowserver:1.18.2", "SKLEARN_SERVER": "seldonio/sklearnserver:1.18.2",
                  "XGBOOST_SERVER": "seldonio/xgboostserver:1.18.2"}  # fmt: skip


def wrapper_error(message: str, status_code: int = 400, reason: str = "MICROSERVICE_BAD_DATA") -> tuple[int, Any]:
    """The python wrapper's error body: SeldonMicroserviceException.to_dict
    (python/seldon_core/flask_utils.py, v1.18.2; 400 MICROSERVICE_BAD_DATA, or 500
    MICROSERVICE_INTERNAL_ERROR for any other exception, wrapper.py handle_generic_exception). The
    executor passes the model's status and body on (executor/api/rest/server.go respondWithError)."""
    return status_code, {"status": {"status": 1, "info": message, "code": -1, "reason": reason}}


def executor_error(message: str) -> tuple[int, Any]:
    """The executor's own error (not an answer of the model): 500 with a SeldonMessage status
    (JSONRestClient.CreateErrorPayload, executor/api/rest/client.go, v1.18.2)."""
    return 500, {"status": {"code": 500, "info": message, "status": "FAILURE"}}


def seldon_route(server: ModelServer, method: str, route: str, body: Any) -> tuple[int, Any]:
    """The Seldon protocol's routes of Seldon Core 1's executor (executor/api/rest/server.go
    Initialise, v1.18.2): (status, JSON answer; EMPTY for no body; None for a route that does not
    exist, gorilla/mux's text 404). Health (checkReady) is 200 or 503 without a body."""
    if route in ("api/v1.0/health/status", "api/v1.0/status", "ready") and method == "GET":
        return (200 if _health(server) == 200 else 503), EMPTY
    if route == "live" and method == "GET":
        return 200, EMPTY
    if route in ("api/v1.0/predictions", "api/v0.1/predictions"):
        if method != "POST":
            return 405, EMPTY  # mux's MethodNotAllowed
        return mlflow_server_predict(server, body)
    return 404, None


def mlflow_server_predict(server: ModelServer, body: Any) -> tuple[int, Any]:
    """What Seldon's MLFLOW_SERVER answers (servers/mlflowserver/mlflowserver/MLFlowServer.py and
    python/seldon_core/utils.py construct_response_json, v1.18.2): the request's ``data``
    (``ndarray`` or ``tensor``) goes to the model as an array, or as ``pd.DataFrame(X,
    columns=names)`` with ``xtype: DataFrame``; the answer has the request's data kind for a
    numeric result (``ndarray``, or ``tensor`` for a tensor request), ``names`` as
    client_class_names computes them (``[]`` for a 1-d result, ``t:0``... per column otherwise,
    the data frame's columns for a data frame result) and ``meta.requestPath`` naming the container
    and its image (with the request's ``meta`` puid, tags, metrics and requestPath carried over)."""
    if isinstance(body, _BadJson):
        return wrapper_error("Can't find JSON in data")
    if not isinstance(body, dict) or not any(k in body for k in ("data", "jsonData", "strData", "binData")):
        return wrapper_error(f"Invalid request data type: {body}")
    if "data" not in body:
        # What MLFlowServer makes of jsonData/strData/binData is not modelled here.
        return wrapper_error(f"emulator: {next(iter(body))} is not modelled", 500, "MICROSERVICE_INTERNAL_ERROR")
    data = body["data"] if isinstance(body["data"], dict) else {}
    try:
        if "tensor" in data:
            flat, shape = data["tensor"]["values"], data["tensor"]["shape"]
            rows = _reshape(flat, shape)
        else:
            rows = data.get("ndarray", [])
    except (KeyError, TypeError, ValueError) as exc:
        return wrapper_error(f"{type(exc).__name__}: {exc}", 500, "MICROSERVICE_INTERNAL_ERROR")
    names = data.get("names") or []
    if server.parameters.get("xtype", "ndarray") == "ndarray":
        request: dict[str, Any] = {"inputs": rows}
    else:
        request = {"dataframe_split": {"data": rows, **({"columns": names} if names else {})}}
    answer = HTTP.post(f"http://127.0.0.1:{server.port}/invocations", json=request, timeout=60)
    if answer.status_code != 200:
        try:
            message = answer.json().get("message") or answer.text
        except ValueError:
            message = answer.text
        return wrapper_error(message[:2000], 500, "MICROSERVICE_INTERNAL_ERROR")
    predictions = answer.json().get("predictions")
    columns: list[str] | None = None
    if isinstance(predictions, list) and predictions and all(isinstance(r, dict) for r in predictions):
        columns = list(predictions[0])  # a data frame result
        predictions = [[r[c] for c in columns] for r in predictions]
    if not isinstance(predictions, list):
        predictions = [predictions]
    two_d = bool(predictions) and all(isinstance(r, list) for r in predictions)
    flat = _flatten(predictions)
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat)
    out: dict[str, Any] = {}
    if numeric and "tensor" in data:
        shape = [len(predictions), len(predictions[0])] if two_d else [len(predictions)]
        out["tensor"] = {"values": flat, "shape": shape}
    else:
        out["ndarray"] = predictions
    if two_d:
        out["names"] = columns or [f"t:{i}" for i in range(len(predictions[0]))]
    else:
        out["names"] = []
    request_meta = body.get("meta") if isinstance(body.get("meta"), dict) else {}
    meta: dict[str, Any] = {}
    if request_meta.get("tags"):
        meta["tags"] = request_meta["tags"]
    if request_meta.get("metrics"):
        meta["metrics"] = request_meta["metrics"]
    if request_meta.get("puid"):
        meta["puid"] = request_meta["puid"]
    image = WRAPPER_IMAGES.get(server.implementation, f"emulated/{server.implementation.lower()}")
    meta["requestPath"] = {server.node: image, **(request_meta.get("requestPath") or {})}
    return 200, {"data": out, "meta": meta}


def _reshape(flat: list[Any], shape: list[int]) -> Any:
    size = 1
    for d in shape:
        size *= d
    if len(flat) != size:
        raise ValueError(f"cannot reshape array of size {len(flat)} into shape {tuple(shape)}")
    if len(shape) <= 1:
        return list(flat)
    step = size // shape[0]
    return [_reshape(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


class _BadJson:
    """A request body that is not JSON (the ingress passes it on as it is)."""


def seldon_v2_route(server: ModelServer, method: str, route: str, body: Any) -> tuple[int, Any]:
    """Protocol v2 behind Seldon Core 1's executor (executor/api/rest/server.go, v1.18.2): its own
    health routes (200/503, no body), ``/v2/models/<name>/ready`` and ``/v2/models/<name>`` for a
    graph node only (another name: the executor's 500 "Failed to find model <name>"), and
    ``/v2/models/<name>/infer`` (or ``/v2/models/infer``, the graph's node) passed to MLServer with
    the name as given: MLServer answers 404 ``Model <name> not found`` for another."""
    if route in ("v2/health/ready", "ready") and method == "GET":
        return (200 if _health(server) == 200 else 503), EMPTY
    if route == "live" and method == "GET":
        return 200, EMPTY
    found = re.fullmatch(r"v2/models/([^/]+)/(ready|infer)", route) or re.fullmatch(r"v2/models/([^/]+)", route)
    if found is None:
        return 404, None
    name = found.group(1)
    action = found.group(2) if found.lastindex == 2 else ("infer" if name == "infer" else "metadata")
    if action == "infer":
        if method != "POST":
            return 405, EMPTY
        return mlserver_infer(server, server.node if name == "infer" else name, body)
    if method != "GET":
        return 405, EMPTY
    if name != server.node:
        return executor_error(f"Failed to find model {name}")
    if action == "ready":
        # MLServer's model_ready: 200, or 400 (to_status_code) while the model is not ready.
        return (200 if _health(server) == 200 else 400), EMPTY
    return 200, mlserver_metadata(server)


def mlserver_error(message: str, status_code: int = 400) -> tuple[int, Any]:
    """MLServer's error body for its own errors (MLServerError: mlserver/rest/errors.py,
    APIErrorResponse, MLServer 1.3.5, the version Seldon Core v1.18.2 deploys)."""
    return status_code, {"error": message}


def mlserver_infer(server: ModelServer, name: str, body: Any) -> tuple[int, Any]:
    """MLServer 1.3.5's ``infer`` with its MLflow runtime: 404 for another model's name, 422
    (FastAPI's validation ``detail``) for a body that is no InferenceRequest, the request decoded
    with the model's content type (``pd`` for a column signature: one input per column), a failure
    of the model a bare 500 (Starlette's ``Internal Server Error``: not an MLServerError), and the
    answer of NumpyRequestCodec.encode_response (mlserver/codecs/utils.py, numpy.py: one
    ``output-1`` tensor, a batch dimension injected into 1-d shapes, ``content_type`` ``np``),
    ``model_version`` ``v1`` (the operator's MLSERVER_MODEL_VERSION, operator/controllers/mlserver.go,
    v1.18.2) and the request's ``id`` or a new one."""
    if name != server.node:
        return mlserver_error(f"Model {name} not found", 404)
    missing = _v2_request_errors(body)
    if missing:
        return 422, {"detail": missing}
    try:
        request = v2_to_mlflow(body)
    except ApiError:
        return 500, INTERNAL_ERROR
    answer = HTTP.post(f"http://127.0.0.1:{server.port}/invocations", json=request, timeout=60)
    if answer.status_code != 200:
        return 500, INTERNAL_ERROR
    out = mlflow_to_v2(server.node, answer.json().get("predictions"))
    out["id"] = body.get("id") or out["id"]
    return 200, {k: out[k] for k in ("model_name", "model_version", "id", "parameters", "outputs")}


#: Starlette's answer to an exception nobody handles (text/plain).
INTERNAL_ERROR = "Internal Server Error"


def _v2_request_errors(body: Any) -> list[dict[str, Any]]:
    """pydantic (v1, as MLServer 1.3.5 uses it) errors of an InferenceRequest, in FastAPI's shape."""
    if not isinstance(body, dict):
        return [{"loc": ["body"], "msg": "value is not a valid dict", "type": "type_error.dict"}]
    if "inputs" not in body:
        return [{"loc": ["body", "inputs"], "msg": "field required", "type": "value_error.missing"}]
    if not isinstance(body["inputs"], list):
        return [{"loc": ["body", "inputs"], "msg": "value is not a valid list", "type": "type_error.list"}]
    errors = []
    for i, tensor in enumerate(body["inputs"]):
        for field in ("name", "shape", "datatype", "data"):
            if not isinstance(tensor, dict) or field not in tensor:
                errors.append({"loc": ["body", "inputs", i, field], "msg": "field required",
                               "type": "value_error.missing"})  # fmt: skip
    return errors


def mlserver_metadata(server: ModelServer) -> dict[str, Any]:
    """MLServer 1.3.5's model metadata (MLModel.metadata, MetadataModelResponse) as its MLflow
    runtime fills it from the signature (runtimes/mlflow/mlserver_mlflow/metadata.py: a column is
    an input of shape [-1], a tensor keeps its shape; unnamed ones ``input-<i>``/``output-<i>``;
    the request content type ``pd`` for a column signature, ``np`` for an unnamed tensor)."""
    meta: dict[str, Any] = {"name": server.node, "versions": [], "platform": ""}
    signature = _signature(server.model_uri)
    if signature is not None:
        inputs, outputs = signature
        meta["inputs"] = [_metadata_tensor(spec, f"input-{i}") for i, spec in enumerate(inputs)]
        meta["outputs"] = [_metadata_tensor(spec, f"output-{i}") for i, spec in enumerate(outputs)]
        tensor = all(spec.get("type") == "tensor" for spec in inputs)
        named = all(spec.get("name") for spec in inputs)
        meta["parameters"] = {"content_type": ("dict" if named else "np") if tensor else "pd"}
    return meta


_MLFLOW_TO_V2 = {"boolean": ("BOOL", "np"), "integer": ("INT32", "np"), "long": ("INT64", "np"),
                 "float": ("FP32", "np"), "double": ("FP64", "np"), "string": ("BYTES", "str"),
                 "binary": ("BYTES", "base64"), "datetime": ("BYTES", "datetime")}  # fmt: skip
_NUMPY_TO_V2 = {"bool": "BOOL", "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64",
                "uint8": "UINT8", "float16": "FP16", "float32": "FP32", "float64": "FP64"}  # fmt: skip


def _metadata_tensor(spec: dict[str, Any], default_name: str) -> dict[str, Any]:
    if spec.get("type") == "tensor":
        tensor = spec.get("tensor-spec") or {}
        datatype, content_type, shape = _NUMPY_TO_V2.get(tensor.get("dtype"), "BYTES"), "np", tensor.get("shape")
    else:
        (datatype, content_type), shape = _MLFLOW_TO_V2.get(spec.get("type"), ("BYTES", "str")), [-1]
    return {"name": spec.get("name") or default_name, "datatype": datatype, "shape": list(shape or [-1]),
            "parameters": {"content_type": content_type}}  # fmt: skip


def _signature(model_uri: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """The MLflow model's signature (inputs, outputs) from its MLmodel file, None without one."""
    import yaml

    path = Path(model_uri[len("file://") :] if model_uri.startswith("file://") else model_uri) / "MLmodel"
    try:
        signature = (yaml.safe_load(path.read_text()) or {}).get("signature") or {}
    except (OSError, yaml.YAMLError):
        return None
    if not signature.get("inputs"):
        return None
    return json.loads(signature["inputs"]), json.loads(signature.get("outputs") or "[]")


V2_DATATYPES = {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
                "FP64", "BYTES"}  # fmt: skip


def v2_route(server: ModelServer, method: str, route: str, body: Any) -> tuple[int, Any]:
    """The V2 (open inference) protocol's routes, as the orchestrator passes them to MLServer, which
    serves the model under the graph node's name."""
    if method == "GET" and route in ("v2/health/ready", "ready", "live"):
        return _health(server), {}
    model = re.fullmatch(r"v2/models(?:/([^/]+))?/(infer|ready)", route) or re.fullmatch(r"v2/models/([^/]+)", route)
    if model is None:
        return 404, None
    name = model.group(1) or server.node  # /v2/models/infer: Seldon's extension, the graph's model
    if name != server.node:
        return 404, {"error": f"Model {name} not found"}
    action = model.group(2) if model.lastindex and model.lastindex > 1 else "metadata"
    if method == "GET" and action == "ready":
        return _health(server), {}
    if method == "GET" and action == "metadata":
        return 200, {"name": server.node, "versions": ["v1"], "platform": "mlflow", "inputs": [], "outputs": []}
    if method != "POST" or action != "infer":
        return 404, None
    try:
        request = v2_to_mlflow(body)
    except ApiError as exc:
        return 400, {"error": exc.message}
    answer = HTTP.post(f"http://127.0.0.1:{server.port}/invocations", json=request, timeout=60)
    if answer.status_code != 200:
        return answer.status_code, {"error": answer.text[:500]}
    return 200, mlflow_to_v2(server.node, answer.json().get("predictions"))


def v2_to_mlflow(body: Any) -> dict[str, Any]:
    """A V2 inference request as MLServer's MLflow runtime decodes it, for ``/invocations``: one
    input per column (shape ``[n]`` or ``[n, 1]``, MLServer's pandas codec, the form a model with a
    column signature needs) makes a data frame; a single ``[n, m]`` input is a tensor of n rows."""
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise ApiError(400, "BadRequest", "inputs: expected a non-empty list of tensors")
    columns: list[tuple[str, list[Any]]] = []
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise ApiError(400, "BadRequest", f"inputs[{i}]: expected an object with name, shape, datatype, data")
        name, shape, datatype, data = (tensor.get(k) for k in ("name", "shape", "datatype", "data"))
        if not isinstance(name, str) or not name:
            raise ApiError(400, "BadRequest", f"inputs[{i}].name: expected a string, got {name!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or not shape:
            raise ApiError(400, "BadRequest", f"inputs[{i}].shape: expected a list of sizes, got {shape!r}")
        if datatype not in V2_DATATYPES:
            raise ApiError(400, "BadRequest", f"inputs[{i}].datatype: unknown datatype {datatype!r}")
        flat = _flatten(data)
        size = 1
        for d in shape:
            size *= d
        if len(flat) != size:
            raise ApiError(400, "BadRequest", f"inputs[{i}].data: {len(flat)} values do not fill shape {shape}")
        if len(inputs) == 1 and len(shape) == 2 and shape[1] > 1:
            return {"inputs": [flat[r * shape[1] : (r + 1) * shape[1]] for r in range(shape[0])]}
        if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
            raise ApiError(400, "BadRequest", f"inputs[{i}].shape: {shape} is not one column ([n] or [n, 1])")
        columns.append((name, flat))
    rows = {len(values) for _, values in columns}
    if len(rows) != 1:
        raise ApiError(400, "BadRequest", f"inputs: the columns have different lengths {sorted(rows)}")
    data = [list(row) for row in zip(*(values for _, values in columns), strict=True)]
    return {"dataframe_split": {"columns": [name for name, _ in columns], "data": data}}


def mlflow_to_v2(model: str, predictions: Any) -> dict[str, Any]:
    """MLflow's predictions in MLServer's V2 response: one ``output-1`` tensor with a batch dimension."""
    if not isinstance(predictions, list):
        predictions = [predictions]
    rows = [p if isinstance(p, list) else [p] for p in predictions]
    flat = _flatten(rows)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        datatype = "INT64"
    elif all(isinstance(v, bool) for v in flat):
        datatype = "BOOL"
    elif all(isinstance(v, int | float) for v in flat):
        datatype = "FP64"
    else:
        datatype, flat = "BYTES", [str(v) for v in flat]
    shape = [len(rows), len(rows[0]) if rows else 1]
    return {
        "model_name": model, "model_version": "v1", "id": str(uuidlib.uuid4()), "parameters": {"content_type": "np"},
        "outputs": [{"name": "output-1", "shape": shape, "datatype": datatype,
                     "parameters": {"content_type": "np"}, "data": flat}],
    }  # fmt: skip


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    return [v for item in data for v in _flatten(item)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args(argv)
    cluster = Cluster(Path(args.workdir))
    kubelet.current()  # imports the model servers' libraries while the first objects are created
    Handler.cluster = cluster
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    cluster.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.daemon_threads = True
    operator = threading.Thread(target=cluster.run_operator, daemon=True)
    operator.start()

    def stop(*_: Any) -> None:
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    tmp = Path(args.port_file + ".tmp")
    tmp.write_text(str(httpd.server_address[1]))
    tmp.rename(args.port_file)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        cluster.shutdown()
        kubelet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
