"""The Kubernetes API emulator (see the package docstring). Run: ``python -m k8s_emulator.server``.

Implements, for namespaced objects: create (POST), get, list with ``labelSelector``, replace (PUT),
``application/merge-patch+json`` and ``application/json-patch+json`` PATCH, delete, ``resourceVersion``
optimistic concurrency (409), 404 and 409 AlreadyExists as Kubernetes ``Status`` bodies, and 422
when a SeldonDeployment violates the CRD's openAPIV3Schema (Seldon Core's real CRD). Secrets keep
``stringData`` base64-encoded in ``data``; pod logs need the container's name and stream with
``follow=true`` (chunked, as the log grows, until the pod goes or the client hangs up).

The Seldon operator stand-in starts one real model server
(``airflow_provider_modeldeploy.serving.mlflow_server``) per predictor and modelUri, reported as a
pod like Seldon's (model container, orchestrator, storage initializer naming the modelUri), moves
``status.state`` Creating -> Available (or Failed with the server's error as
``status.description``) and, as Seldon Core 1 does, keeps reporting Available through a rolling
update while the last Available predictors serve until the new ones are ready. An ingress at
``/seldon/<ns>/<name>/...`` answers the orchestrator's routes for the deployment's protocol (Seldon's
``api/v1.0/...``, or V2's ``v2/models/<graph node>/...`` in MLServer's shapes), forwarding to the
model servers split by the predictors' ``traffic`` weights, and logs each request in the model's pod
log as the model container's web server would.

The KServe controller stand-in (``kserve.py``) does the same for InferenceServices
(``serving.kserve.io/v1beta1``, 422s from the shipped KServe CRD), with predictor pods running the
chosen runtime for real and an ingress at ``/serving/<ns>/<name>/...``; ServiceAccounts are stored.

Test control: ``POST /emulator/conflicts {"count": n}`` makes the next n writes that carry a
resourceVersion lose a race to a (simulated) concurrent writer: the object changes and they get 409.
``POST /emulator/scale-to-zero {"namespace": ns, "name": isvc}``: see kserve.py.
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

import httpx

from k8s_emulator import crd_validation, kserve

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
    """One real local model server for one predictor's modelUri (the emulated model pod)."""

    def __init__(self, workdir: Path, sd: str, predictor: str, node: str, implementation: str, model_uri: str) -> None:
        self.key = str(uuidlib.uuid4())
        self.sd, self.predictor, self.model_uri = sd, predictor, model_uri
        self.node, self.implementation = node, implementation  # the graph node: container and V2 model name
        # Named as Seldon's Deployment "<sdep>-<predictor>-0-<containers>" names its pods.
        self.pod_name = f"{sd}-{predictor}-0-{node}-{self.key[:10].replace('-', '')}-{self.key[-5:]}"
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
            self.proc = subprocess.Popen(
                [sys.executable, "-m", SERVER_MODULE, "--service-uuid", self.key, "--model-uri", model_uri,
                 "--model-name", predictor, "--listen-fd", str(sock.fileno()), "--runtime-dir", str(run),
                 "--start-timeout", "120"],
                pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=str(workdir), env=env, start_new_session=True,
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

    def access_log(self, method: str, path: str, code: int) -> None:
        """The line the model container's web server logs for a request (uvicorn's format, as
        MLServer prints it): the model server itself runs without an access log."""
        with self.log_path.open("a") as fh:
            fh.write(f'INFO:     127.0.0.1 - "{method} /{path} HTTP/1.1" {code}\n')

    def pod(self, ns: str) -> dict[str, Any]:
        """The pod as Seldon's Deployment makes it: the model container beside the orchestrator, the
        storage initializer (its first argument the modelUri), Ready once the model answers."""
        phase, _ = self.phase()
        return {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.pod_name, "namespace": ns, "uid": self.key,
                         "labels": {"seldon-deployment-id": self.sd, "seldon-app": f"{self.sd}-{self.predictor}",
                                    "app": f"{self.sd}-{self.predictor}-0-{self.node}",
                                    "app.kubernetes.io/managed-by": "seldon-core"}},
            "spec": {
                "initContainers": [{"name": f"{self.node}-model-initializer", "image": "seldonio/rclone-storage-initializer",
                                    "args": [self.model_uri, "/mnt/models"]}],
                "containers": [{"name": self.node, "image": f"emulated/{self.implementation.lower()}"},
                               {"name": "seldon-container-engine", "image": "seldonio/seldon-core-executor"}],
            },
            "status": {"phase": {"ready": "Running", "loading": "Pending"}.get(phase, "Failed"),
                       "conditions": [{"type": "Ready", "status": "True" if phase == "ready" else "False"}]},
        }  # fmt: skip


class Cluster:
    """The emulated cluster's objects and the Seldon operator stand-in."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.url = ""  # where this emulator answers (InferenceServices' status.url is under it)
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.rv = 0
        self.conflicts = 0
        self.servers: dict[tuple[str, str, str, str], ModelServer] = {}  # (ns, sd, predictor, uri)
        self.serving: dict[tuple[str, str], dict[str, tuple[ModelServer, int]]] = {}
        self.stopping = threading.Event()

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
        if plural == kserve.PLURAL:
            kserve.forget(self, ns, name)
        return {"kind": "Status", "apiVersion": "v1", "status": "Success", "details": {"name": name, "kind": plural}}

    def pods(self, ns: str) -> list[dict[str, Any]]:
        return [server.pod(ns) for (sns, *_), server in self.servers.items() if sns == ns]

    # -- the Seldon operator stand-in ------------------------------------------------------------

    def reconcile(self) -> None:
        with LOCK:
            sds = [(k, v) for k, v in self.objects.items() if k[0] == SD[1]]
        for (_, ns, name), obj in sds:
            with LOCK:
                wanted: dict[str, tuple[ModelServer, int]] = {}
                for p in obj["spec"].get("predictors", []):
                    if int(p.get("replicas", 1)) < 1:
                        continue
                    graph = p["graph"]
                    uri = graph.get("modelUri", "")
                    key = (ns, name, p["name"], uri)
                    if key not in self.servers:
                        self.servers[key] = ModelServer(
                            self.workdir, name, p["name"], graph["name"], graph.get("implementation", ""), uri
                        )
                    wanted[p["name"]] = (self.servers[key], int(p.get("traffic", 100)))
                phases = {pn: s.phase() for pn, (s, _) in wanted.items()}
                failed = [(pn, err) for pn, (ph, err) in phases.items() if ph == "failed"]
                status = dict(obj.get("status") or {})
                if failed:
                    pn, err = failed[0]
                    state, desc = "Failed", f"predictor {pn}: {err}"
                    # The failed pods stay until the spec changes (as in a crash loop); the previous
                    # ones keep serving.
                elif all(ph == "ready" for ph, _ in phases.values()):
                    state, desc = "Available", None
                    self.serving[(ns, name)] = wanted
                    keep = {id(s) for s, _ in wanted.values()}
                    for key in [k for k, s in self.servers.items() if k[:2] == (ns, name) and id(s) not in keep]:
                        self.servers.pop(key).stop()
                elif self.serving.get((ns, name)):
                    # A rolling update: the previous pods keep the Deployments available, and Seldon
                    # Core 1 keeps saying so (it has no observedGeneration to tell the specs apart).
                    state, desc = "Available", None
                else:
                    state, desc = "Creating", None
                if status.get("state") != state or status.get("description") != desc:
                    status["state"] = state
                    if desc:
                        status["description"] = desc
                    else:
                        status.pop("description", None)
                    status["replicas"] = sum(1 for _ in wanted)
                    obj["status"] = status
                    obj["metadata"]["resourceVersion"] = self.next_rv()

    def run_operator(self) -> None:
        while not self.stopping.is_set():
            try:
                self.reconcile()
                kserve.reconcile(self, LOCK)
            except Exception as exc:  # keep the loop alive; the test sees the state not moving
                print(f"operator: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self.stopping.wait(0.1)

    def shutdown(self) -> None:
        self.stopping.set()
        with LOCK:
            for server in self.servers.values():
                server.stop()
            self.servers.clear()
            kserve.shutdown()

    def route(self, ns: str, name: str) -> ModelServer | None:
        with LOCK:
            serving = self.serving.get((ns, name))
            if (ns, name) not in {(k[1], k[2]) for k in self.objects if k[0] == SD[1]} or not serving:
                return None
            live = [(s, w) for s, w in serving.values() if s.proc.poll() is None]
        if not live:
            return None
        total = sum(w for _, w in live)
        pick = random.uniform(0, total) if total else 0
        for server, weight in live:
            pick -= weight
            if pick <= 0:
                return server
        return live[-1][0]


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


def seldon_to_mlflow(body: dict[str, Any]) -> dict[str, Any]:
    data = body.get("data") or {}
    rows = data.get("ndarray") if "ndarray" in data else (data.get("tensor") or {}).get("values")
    if rows is None:
        raise ApiError(400, "BadRequest", "expected data.ndarray")
    if data.get("names"):
        return {"dataframe_split": {"columns": data["names"], "data": rows}}
    return {"inputs": rows}


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
        """``/seldon/<ns>/<name>/<route>``: Seldon Core 1's orchestrator routes for the deployment's
        protocol (others are 404, as its router answers), forwarded to a model server picked by the
        predictors' traffic weights. The answer does not say which version served it."""
        m = re.fullmatch(r"/seldon/([^/]+)/([^/]+)/(.*)", path)
        if not m:
            raise ApiError(404, "NotFound", path)
        ns, name, route = m.groups()
        with LOCK:
            obj = self.cluster.objects.get((SD[1], ns, name))
            protocol = (obj or {}).get("spec", {}).get("protocol") or "seldon"
        server = self.cluster.route(ns, name)
        if server is None:
            return self._send(503, {"status": {"code": 503, "info": f"no ready predictor for {ns}/{name}"}})
        code, answer = (seldon_route if protocol == "seldon" else v2_route)(server, method, route, body)
        server.access_log(method, route, code)
        if answer is None:
            return self._send(code, "404 page not found\n", text=True)
        return self._send(code, answer)


def _health(server: ModelServer) -> int:
    return httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=10).status_code


def seldon_route(server: ModelServer, method: str, route: str, body: Any) -> tuple[int, Any]:
    """The Seldon protocol's routes: (status, JSON answer; None for a route that does not exist)."""
    if method == "GET" and route in ("api/v1.0/health/status", "ready", "live"):
        code = _health(server)
        return code, {"status": "ok" if code == 200 else "not ready"}
    if method == "POST" and route in ("api/v1.0/predictions", "api/v0.1/predictions"):
        try:
            request = seldon_to_mlflow(body or {})
        except ApiError as exc:
            return 400, {"status": {"code": 400, "info": exc.message, "status": "FAILURE"}}
        answer = httpx.post(f"http://127.0.0.1:{server.port}/invocations", json=request, timeout=60)
        if answer.status_code != 200:
            return answer.status_code, {"status": {"code": answer.status_code, "info": answer.text[:500]}}
        preds = answer.json().get("predictions")
        return 200, {"data": {"names": [], "ndarray": preds},
                     "meta": {"requestPath": {server.node: f"emulated/{server.implementation.lower()}"}}}  # fmt: skip
    return 404, None


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
    answer = httpx.post(f"http://127.0.0.1:{server.port}/invocations", json=request, timeout=60)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
