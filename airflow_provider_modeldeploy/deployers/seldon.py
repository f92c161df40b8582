"""The Seldon Core backend: each endpoint is one ``SeldonDeployment`` (machinelearning.seldon.io/v1).

Deploy creates it; a replace patches it (Kubernetes rolls the model pods, the URL stays); a deploy
with ``canary_traffic_percent`` keeps the serving version as predictor ``main`` and adds the new one
as predictor ``canary`` with that share of traffic, until ``promote`` (the canary takes 100%) or
``rollback`` (``main`` alone again). The lineage rides on the resource's labels and annotations, so
``sync`` can rebuild the registry from the cluster. The kubernetes client comes from the
cncf-kubernetes ``KubernetesHook`` on the same connection; it is imported only when used.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any, ClassVar

from airflow_provider_modeldeploy.deployers.base import BaseModelDeployer, Launch, default_actor
from airflow_provider_modeldeploy.deployers.kubernetes_common import check_ours, follow_logs, owner, restore_patch
from airflow_provider_modeldeploy.exceptions import DeploymentFailedError, InvalidParameterError
from airflow_provider_modeldeploy.hooks.kubernetes_cluster import api_message
from airflow_provider_modeldeploy.hooks.seldon import (
    IMPLEMENTATIONS,
    SeldonDeployerHook,
    SeldonSettings,
    check_dns1123,
)
from airflow_provider_modeldeploy.registry import EndpointLease, Registry
from airflow_provider_modeldeploy.seldon import manifests as m
from airflow_provider_modeldeploy.services import (
    EventAction,
    Lineage,
    Service,
    ServiceConfig,
    ServiceRecord,
    ServiceState,
)

log = logging.getLogger(__name__)

LINEAGE_ANNOTATION = f"{m.LABEL_PREFIX}/lineage"
CREATED_SECRET_LABEL = f"{m.LABEL_PREFIX}/created-by"
CANARY_KEYS = ("canary_traffic_percent", "canary_of")


class SeldonDeployer(BaseModelDeployer):
    """Serves models with Seldon Core prepackaged servers on Kubernetes.

    Backend options (``ServiceConfig(..., **options)``): ``replicas``, ``implementation`` (one of
    MLFLOW_SERVER, SKLEARN_SERVER, XGBOOST_SERVER, TENSORFLOW_SERVER, TRITON_SERVER,
    HUGGINGFACE_SERVER), ``resources`` (``{"requests": {...}, "limits": {...}}``),
    ``service_account``, ``canary_traffic_percent`` (1-99: deploy as a canary beside the serving
    version), ``smoke_input`` (a JSON body in the connection's protocol for the smoke prediction).
    """

    backend = "seldon"
    backend_options: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "replicas": int,
        "implementation": str,
        "resources": dict,
        "service_account": str,
        "canary_traffic_percent": int,
        "smoke_input": (str, dict, list),
    }

    def __init__(
        self, conn_id: str | None = None, registry: Registry | None = None, hook: SeldonDeployerHook | None = None
    ) -> None:
        super().__init__(conn_id=conn_id, registry=registry)
        self.hook = hook or SeldonDeployerHook(conn_id=conn_id)
        self._restored: set[str] = set()

    @classmethod
    def from_connection(cls, conn_id: str, connection: Any) -> SeldonDeployer:
        return cls(conn_id=conn_id, hook=SeldonDeployerHook(conn_id=conn_id, connection=connection))

    @property
    def settings(self) -> SeldonSettings:
        return self.hook.settings

    def _metrics(self, record: ServiceRecord, window: str) -> Any:
        """From the connection's Prometheus (``prometheus_url``), else not available, saying why."""
        from airflow_provider_modeldeploy.deployers.kubernetes_common import kubernetes_metrics

        return kubernetes_metrics(self, record, window, self.settings.namespace)

    # -- options and names -----------------------------------------------------------------------

    def deploy_model(
        self, config: ServiceConfig, replace: bool = True, timeout: float = 300, *, lineage: Lineage | None = None
    ) -> Service:
        config.validate()
        check_dns1123("endpoint", config.endpoint_name)  # the SeldonDeployment's name
        return super().deploy_model(config, replace=replace, timeout=timeout, lineage=lineage)

    def _validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        clean = super()._validate_options(options)
        if "replicas" in clean and clean["replicas"] < 1:
            raise InvalidParameterError("replicas", clean["replicas"], "must be a positive integer")
        if "implementation" in clean and clean["implementation"] not in IMPLEMENTATIONS:
            raise InvalidParameterError(
                "implementation", clean["implementation"], f"use one of {', '.join(IMPLEMENTATIONS)}"
            )
        pct = clean.get("canary_traffic_percent")
        if pct is not None and not 1 <= pct <= 99:
            raise InvalidParameterError("canary_traffic_percent", pct, "must be between 1 and 99")
        if "service_account" in clean:
            check_dns1123("service_account", clean["service_account"], 253)
        if isinstance(clean.get("smoke_input"), str):
            try:
                json.loads(clean["smoke_input"])
            except ValueError as exc:
                raise InvalidParameterError("smoke_input", clean["smoke_input"], f"is not JSON ({exc})") from None
        return {**self.settings.public(), **clean}

    # -- URLs ------------------------------------------------------------------------------------

    def urls(self, record: ServiceRecord) -> tuple[str, str]:
        """(prediction URL, health URL) of the endpoint, for the connection's protocol.

        These are the routes Seldon Core 1's service orchestrator serves behind the ingress. In V2
        the model is the graph node (the orchestrator passes the name on to MLServer, which loads
        the model under the node's name), not the registered model's name.
        """
        s = self.settings
        base = f"{s.ingress_base_url}/seldon/{s.namespace}/{record.endpoint}"
        if record.config.get("protocol", s.protocol) == "v2":
            model = f"{base}/v2/models/{m.MODEL_NODE}"
            return f"{model}/infer", f"{model}/ready"
        return f"{base}/api/v1.0/predictions", f"{base}/api/v1.0/health/status"

    # -- the kubernetes API ----------------------------------------------------------------------

    def _read(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.hook.get_deployment(name)
        except ApiException as exc:
            raise self._api_error(exc, name) from None

    def _api_error(self, exc: Any, name: str) -> Exception:
        message = api_message(exc)
        if exc.status == 422:
            return InvalidParameterError("manifest", name, f"the cluster rejected the SeldonDeployment: {message}")
        return DeploymentFailedError(f"endpoint={name!r}: Kubernetes API answered {exc.status}: {message}")

    def _owners(self, record: ServiceRecord, previous: ServiceRecord | None) -> set[str]:
        """Service uuids whose SeldonDeployment this deployment may change: this endpoint's services."""
        known = {r.uuid for r in self.registry.find_services(backend=self.backend, endpoint=record.endpoint)}
        return known | {record.uuid} | ({previous.uuid} if previous else set())

    def _apply(self, manifest: dict[str, Any], owners: set[str]) -> dict[str, Any]:
        """Create the SeldonDeployment, or merge-patch the existing one with our resourceVersion; on a
        409 conflict (someone wrote in between) re-read and re-apply, a few times."""
        from kubernetes.client.exceptions import ApiException
        from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

        name, ns = manifest["metadata"]["name"], self.settings.namespace

        def conflict(exc: BaseException) -> bool:
            return isinstance(exc, ApiException) and exc.status == 409

        @retry(retry=retry_if_exception(conflict), stop=stop_after_attempt(5), wait=wait_exponential(0.05, max=1),
               reraise=True)  # fmt: skip
        def attempt() -> dict[str, Any]:
            current = self._read(name)
            if current is None:
                return self.hook.create_deployment(manifest)
            check_ours(current, owners, "SeldonDeployment", ns)
            patch = {
                "metadata": {
                    "labels": manifest["metadata"]["labels"], "annotations": manifest["metadata"]["annotations"],
                    "resourceVersion": current["metadata"]["resourceVersion"],
                },
                "spec": manifest["spec"],
            }  # fmt: skip
            return self.hook.patch_deployment(name, patch)

        try:
            return attempt()
        except ApiException as exc:
            raise self._api_error(exc, name) from None

    def _wait_available(self, name: str, timeout: float, written: dict[str, Any] | None = None) -> dict[str, Any]:
        """Wait until Seldon reports the SeldonDeployment Available *and* its model pods run the spec.

        Seldon Core 1 keeps ``status.state`` Available through a rolling update (the previous pods
        keep the Deployment available) and sets no ``observedGeneration``, so the state alone cannot
        tell that the new spec serves: the pods' storage initializers name the modelUri they serve.
        ``written`` is the object as our write returned it: a Failed state counts only once the
        operator has written the status since (a Failed left from before would fail a good rollout).
        """
        written_rv = ((written or {}).get("metadata") or {}).get("resourceVersion")
        deadline = time.monotonic() + timeout
        while True:
            obj = self._read(name)
            if obj is None:
                raise DeploymentFailedError(f"endpoint={name!r}: the SeldonDeployment disappeared while rolling out")
            status = obj.get("status") or {}
            state = status.get("state") or "unreported"
            if state == "Failed" and obj["metadata"].get("resourceVersion") != written_rv:
                raise DeploymentFailedError(
                    f"endpoint={name!r}: Seldon reports the deployment Failed: {status.get('description') or 'no description'}"
                )
            if state == "Available":
                rolled_out, detail = self._rolled_out(obj)
                if rolled_out:
                    return obj
            else:
                detail = f"state {state}"
            if time.monotonic() > deadline:
                raise DeploymentFailedError(f"timeout={timeout!r}: SeldonDeployment {name} did not roll out ({detail})")
            time.sleep(0.2)

    def _pods(self, name: str) -> list[Any]:
        """The model pods of a SeldonDeployment (Seldon labels them with its name), by name."""
        return self.hook.model_pods(name)

    def _rolled_out(self, obj: dict[str, Any]) -> tuple[bool, str]:
        """(whether exactly the spec's model pods run and are ready, what is missing)."""
        from collections import Counter

        from kubernetes.client.exceptions import ApiException

        wanted: Counter[str | None] = Counter()
        for p in obj["spec"].get("predictors", []):
            if int(p.get("replicas", 1)) > 0:
                wanted[(p.get("graph") or {}).get("modelUri")] += int(p.get("replicas", 1))
        try:
            pods = self._pods(obj["metadata"]["name"])
        except ApiException as exc:
            if exc.status == 403:  # may not list pods: Seldon's state is all there is to go by
                log.warning("Cannot list pods in %s (403): trusting Seldon's state alone", self.settings.namespace)
                return True, ""
            raise self._api_error(exc, obj["metadata"]["name"]) from None
        live = [
            p for p in pods if p.metadata.deletion_timestamp is None and p.status.phase not in ("Succeeded", "Failed")
        ]
        for p in live:
            if _pod_model_uri(p) in wanted or set(wanted) == {None}:
                crash = _crash_loop(p)
                if crash:
                    raise DeploymentFailedError(
                        f"endpoint={obj['metadata']['name']!r}: model pod {p.metadata.name}: {crash}"
                        + self._previous_log(p.metadata.name)
                    )
        serving: Counter[str | None] = Counter(_pod_model_uri(p) for p in live)
        ready = sum(1 for p in live if _pod_ready(p))
        # Without a storage initializer naming the modelUri (e.g. a PVC model), count the pods only.
        matches = len(live) == sum(wanted.values()) if set(serving) == {None} else serving == wanted
        if matches and ready == len(live):
            return True, ""
        return False, f"{ready} of {len(live)} model pods ready, {sum(wanted.values())} wanted with the new spec"

    def _previous_log(self, pod: str, lines: int = 5) -> str:
        """The last lines the crashed model container wrote (``previous=true``), or nothing."""
        try:
            text = self.hook.read_pod_log(pod, m.MODEL_NODE, lines, previous=True)
        except Exception as exc:  # the log is a courtesy: the failure stands without it
            log.warning("No previous log from pod %s: %s", pod, exc)
            return ""
        tail = [line for line in (text or "").splitlines() if line.strip()][-lines:]
        return ("; its last log lines: " + " | ".join(tail)) if tail else ""

    # -- manifests -------------------------------------------------------------------------------

    def _lineage(self, record: ServiceRecord) -> dict[str, Any]:
        return {
            "uuid": record.uuid, "endpoint": record.endpoint, "model_name": record.model_name,
            "model_uri": record.model_uri, "served_uri": record.served_uri, "model_version": record.model_version,
            "model_run_id": record.model_run_id, "dag_id": record.dag_id, "run_id": record.run_id,
            "task_id": record.task_id, "map_index": record.map_index, "try_number": record.try_number,
            "config": {k: v for k, v in record.config.items() if k != "smoke_input"},
        }  # fmt: skip

    def _manifest(self, record: ServiceRecord, replicas: int | None = None) -> dict[str, Any]:
        cfg, s = record.config, self.settings
        res = cfg.get("resources")
        typed = (
            isinstance(res, dict)
            and set(res) <= {"requests", "limits"}
            and all(isinstance(v, dict) for v in res.values())
        )
        resources = m.Resources(**res) if typed else None
        common = {
            "implementation": cfg.get("implementation", s.implementation),
            "replicas": cfg.get("replicas", s.replicas) if replicas is None else replicas,
            "env_secret_ref_name": cfg.get("storage_secret") or s.storage_secret,
            "service_account_name": cfg.get("service_account") or s.service_account,
            "resources": resources,
        }  # fmt: skip
        canary = cfg.get("canary_of")
        if canary:
            pct = int(cfg["canary_traffic_percent"])
            predictors = [
                m.Predictor(m.MAIN_PREDICTOR, canary["served_uri"], traffic=100 - pct, **common),
                m.Predictor(m.CANARY_PREDICTOR, record.served_uri or record.model_uri, traffic=pct, **common),
            ]
        else:
            predictors = [m.Predictor(m.MAIN_PREDICTOR, record.served_uri or record.model_uri, **common)]
        labels = {
            m.MANAGED_LABEL: "true", m.SERVICE_LABEL: record.uuid,
            f"{m.LABEL_PREFIX}/model-name": _label_value(record.model_name),
            f"{m.LABEL_PREFIX}/model-version": _label_value(record.model_version or ""),
            f"{m.LABEL_PREFIX}/dag-id": _label_value(record.dag_id or ""),
        }  # fmt: skip
        spec = m.SeldonDeploymentSpec(
            name=record.endpoint, namespace=s.namespace, predictors=predictors,
            protocol=cfg.get("protocol", s.protocol), labels=labels,
            annotations={LINEAGE_ANNOTATION: json.dumps(self._lineage(record), sort_keys=True)},
        )  # fmt: skip
        if resources is None and res is not None:
            # Not the shape Resources knows: hand it to the schema as given, so it names the field.
            manifest = spec.to_dict()
            for p in manifest["spec"]["predictors"]:
                p["componentSpecs"][0]["spec"]["containers"][0]["resources"] = res
            m.validate_manifest(manifest)
            return manifest
        return spec.build()

    def render(self, config: ServiceConfig) -> dict[str, Any]:
        """The SeldonDeployment a deploy of ``config`` would send, validated; nothing is sent or recorded."""
        import uuid as uuidlib

        config.validate()
        check_dns1123("endpoint", config.endpoint_name)
        record = ServiceRecord(
            uuid=str(uuidlib.uuid4()), backend=self.backend, endpoint=config.endpoint_name, conn_id=self.conn_id,
            model_name=config.model_name, model_uri=config.model_uri,
            config=self._validate_options(config.backend_options), state=ServiceState.PENDING,
        )  # fmt: skip
        record.served_uri, record.model_version, record.model_run_id = self._resolve(record.model_uri)
        current = self._current(record.endpoint)
        self._prepare_canary(
            record, current if current and current.state == ServiceState.ACTIVE else None, persist=False
        )
        return self._manifest(record)

    def _resolve(self, model_uri: str) -> tuple[str, str | None, str | None]:
        """(storage URI Seldon downloads, registered version, run id) of an MLflow model URI."""
        if not model_uri.startswith(("models:/", "runs:/")):
            return model_uri, None, None
        import mlflow

        from airflow_provider_modeldeploy.serving import mlflow_server

        if self.settings.tracking_uri:
            mlflow.set_tracking_uri(self.settings.tracking_uri)
        try:
            served, version, run_id = mlflow_server.resolve_model_uri(model_uri)
        except mlflow_server._Failure as exc:
            raise InvalidParameterError("model_uri", model_uri, str(exc)) from None
        if served.startswith("models:/"):
            from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

            storage = ModelsArtifactRepository.get_underlying_uri(served)
        else:
            from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

            storage = RunsArtifactRepository.get_underlying_uri(served)
        return storage, version, run_id

    # -- lifecycle -------------------------------------------------------------------------------

    def _prepare_canary(self, record: ServiceRecord, previous: ServiceRecord | None, persist: bool = True) -> None:
        cfg = dict(record.config)
        canary = cfg.get("canary_of")
        if canary and canary.get("canary_uuid") != record.uuid:
            # Inherited by a rollback from the canary's config: the rolled-back version is no canary.
            for key in CANARY_KEYS:
                cfg.pop(key, None)
        elif cfg.get("canary_traffic_percent") and not canary:
            if previous is None or previous.state != ServiceState.ACTIVE or not previous.served_uri:
                raise InvalidParameterError(
                    "canary_traffic_percent", cfg["canary_traffic_percent"],
                    f"a canary needs a version serving endpoint '{record.endpoint}' already",
                )  # fmt: skip
            stable = previous.config.get("canary_of") or {}
            # Canary over a canary: the new one is compared with what main serves.
            cfg["canary_of"] = {
                "canary_uuid": record.uuid, "uuid": stable.get("uuid") or previous.uuid,
                "served_uri": stable.get("served_uri") or previous.served_uri,
                "model_uri": stable.get("model_uri") or previous.model_uri,
                "model_version": stable.get("model_version") if stable else previous.model_version,
            }  # fmt: skip
        if cfg != record.config:
            record.config = cfg
            if persist:
                self.registry.update_service(record.uuid, config=cfg)

    def _launch(
        self, record: ServiceRecord, lease: EndpointLease, previous: ServiceRecord | None, timeout: float
    ) -> Launch:
        owners = self._owners(record, previous)
        before = self._read(record.endpoint)
        check_ours(before, owners, "SeldonDeployment", self.settings.namespace)  # before anything is written
        storage, version, run_id = self._resolve(record.model_uri)
        record.served_uri, record.model_version, record.model_run_id = storage, version or record.model_version, run_id
        self._prepare_canary(record, previous)
        manifest = self._manifest(record)
        self._ensure_secret(record)
        try:
            self._wait_available(record.endpoint, timeout, self._apply(manifest, owners))
            prediction_url, health_url = self.urls(record)
            self._smoke(record, prediction_url, health_url, timeout)
        except BaseException:
            self._restore(record, before)
            raise
        return Launch(
            prediction_url=prediction_url, health_url=health_url, served_uri=storage,
            model_version=record.model_version, model_run_id=run_id,
        )  # fmt: skip

    def _restore(self, record: ServiceRecord, before: dict[str, Any] | None) -> None:
        """Put the SeldonDeployment back as it was before a failed rollout (previous version serves)."""
        self._restored.add(record.uuid)
        try:
            if before is None:
                current = self._read(record.endpoint)
                if current is not None and _owner(current) == record.uuid:
                    self._delete_resource(record.endpoint)
                return
            # Labels, annotations and spec exactly as they were (a merge patch of the old spec would
            # keep what the failed one added), guarded by the resourceVersion, re-read on a 409.
            from kubernetes.client.exceptions import ApiException

            for _ in range(5):
                current = self._read(record.endpoint)
                if current is None or _owner(current) is None:
                    return  # gone, or no longer ours: left as it is
                try:
                    written = self.hook.patch_deployment(record.endpoint, restore_patch(current, before))
                except ApiException as exc:
                    if exc.status == 409:
                        continue
                    raise
                self._settle(record.endpoint, written)
                return
        except Exception:
            log.exception("Could not restore SeldonDeployment %s after a failed rollout", record.endpoint)

    def _settle(self, name: str, written: dict[str, Any], timeout: float = 30) -> None:
        """After the previous spec is put back, wait (briefly) for Seldon to drop the Failed state of
        the failed rollout: its pods never stopped serving, and a status read meanwhile would mark
        the serving service failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            obj = self._read(name)
            if obj is None or (obj.get("status") or {}).get("state") != "Failed":
                return
            if obj["metadata"].get("resourceVersion") != written["metadata"].get("resourceVersion"):
                return  # the operator looked at the restored spec and still says Failed: its verdict
            time.sleep(0.2)

    def _smoke(self, record: ServiceRecord, prediction_url: str, health_url: str, timeout: float) -> None:
        import httpx

        from airflow_provider_modeldeploy.hooks.tls import default_tls

        deadline = time.monotonic() + min(timeout, 60)
        while True:  # the ingress may take a moment to route to the new pods
            try:
                health = httpx.get(health_url, timeout=10, verify=default_tls())
                if health.status_code == 200:
                    break
                reason = f"HTTP {health.status_code}"
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise DeploymentFailedError(f"endpoint={record.endpoint!r}: {health_url} does not answer ({reason})")
            time.sleep(0.2)
        body = record.config.get("smoke_input")
        if body is None:
            return
        answer = httpx.post(
            prediction_url, content=body if isinstance(body, str) else json.dumps(body),
            headers={"content-type": "application/json"}, timeout=60, verify=default_tls(),
        )  # fmt: skip
        from airflow_provider_modeldeploy.health import answer_message, prediction_problem

        if answer.status_code != 200:
            raise DeploymentFailedError(
                f"model_uri={record.model_uri!r}: smoke prediction answered {answer.status_code}: "
                f"{answer_message(answer.text)}"
            )
        problem = prediction_problem(answer.text)
        if problem:
            raise DeploymentFailedError(f"model_uri={record.model_uri!r}: smoke prediction answered 200 but {problem}")

    def _promote(self, record: ServiceRecord, launch: Launch, previous: ServiceRecord | None, timeout: float) -> None:
        """Nothing to do: Kubernetes already rolled the pods behind the same URL."""

    def _discard(self, record: ServiceRecord, launch: Launch | None) -> None:
        if record.uuid in self._restored:
            return
        obj = self._read(record.endpoint)
        if obj is not None and _owner(obj) == record.uuid:
            self._delete_resource(record.endpoint)

    def _stop(self, record: ServiceRecord, timeout: float, force: bool) -> None:
        """Scale every predictor to zero (JSON patch); ``start`` re-applies the configured replicas."""
        from kubernetes.client.exceptions import ApiException

        obj = self._read(record.endpoint)
        if obj is None or _owner(obj) != record.uuid:
            return
        # The tests pin each index to the predictor read (the operator's status writes in between
        # do not matter; a concurrent change of the predictors makes the patch fail instead).
        ops: list[dict[str, Any]] = []
        for i, predictor in enumerate(obj["spec"]["predictors"]):
            ops += [{"op": "test", "path": f"/spec/predictors/{i}/name", "value": predictor["name"]},
                    {"op": "replace", "path": f"/spec/predictors/{i}/replicas", "value": 0}]  # fmt: skip
        try:
            self.hook.patch_deployment(record.endpoint, ops, json_patch=True)
        except ApiException as exc:
            raise self._api_error(exc, record.endpoint) from None

    def _delete_resource(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.hook.delete_deployment(name)
        except ApiException as exc:
            raise self._api_error(exc, name) from None

    def _forget(self, record: ServiceRecord) -> None:
        obj = self._read(record.endpoint)
        if obj is not None and _owner(obj) == record.uuid:
            self._delete_resource(record.endpoint)
        self._delete_secret_if_unused(record)

    def _probe(self, record: ServiceRecord) -> tuple[ServiceState, str | None] | None:
        if record.state not in (ServiceState.ACTIVE, ServiceState.ERROR):
            return None
        obj = self._read(record.endpoint)
        if obj is None:
            return ServiceState.ERROR, f"SeldonDeployment {self.settings.namespace}/{record.endpoint} is gone"
        if _owner(obj) != record.uuid:
            return None
        status = obj.get("status") or {}
        if status.get("state") == "Failed":
            return ServiceState.ERROR, f"Seldon reports Failed: {status.get('description') or 'no description'}"
        if status.get("state") == "Available":
            return ServiceState.ACTIVE, None
        return None  # Creating: a rollout in progress; the record's state stands

    def _log_lines(self, record: ServiceRecord, tail: int | None, follow: bool) -> Iterator[str]:
        """The model containers' logs, pod by pod; lines carry ``[<pod>]`` when there are several
        pods (a canary, replicas). ``follow`` streams every pod's log at once until the pods go away
        (their streams end) or the caller stops iterating (Ctrl-C in the CLI)."""
        from kubernetes.client.exceptions import ApiException

        pods = [p.metadata.name for p in self._pods(record.endpoint) if not (follow and p.metadata.deletion_timestamp)]
        prefix = len(pods) > 1
        if follow:
            lines = 10 if tail is None else tail

            yield from follow_logs(lambda pod: self.hook.stream_pod_log(pod, m.MODEL_NODE, lines), pods, prefix)
            return
        for pod in pods:
            try:
                text = self.hook.read_pod_log(pod, m.MODEL_NODE, tail)
            except ApiException as exc:  # e.g. still initialising: the other pods' logs are worth showing
                log.warning("No log from pod %s: HTTP %s: %s", pod, exc.status, api_message(exc))
                continue
            for line in (text or "").splitlines():
                yield f"[{pod}] {line}" if prefix else line

    def _discover(self) -> list[ServiceRecord] | None:
        found = []
        for obj in self.hook.list_deployments(label_selector=f"{m.MANAGED_LABEL}=true"):
            try:
                lin = json.loads((obj["metadata"].get("annotations") or {})[LINEAGE_ANNOTATION])
            except (KeyError, ValueError):
                continue
            if lin.get("uuid") != _owner(obj) or lin.get("endpoint") != obj["metadata"]["name"]:
                continue  # labels and lineage disagree: not an object we wrote as it is
            status = obj.get("status") or {}
            scaled_down = all(int(p.get("replicas", 1)) == 0 for p in obj["spec"].get("predictors", []))
            if status.get("state") == "Failed":
                state, error = ServiceState.ERROR, status.get("description")
            elif scaled_down:
                state, error = ServiceState.INACTIVE, None
            else:
                state, error = ServiceState.ACTIVE, None
            record = ServiceRecord(
                uuid=lin["uuid"], backend=self.backend, endpoint=obj["metadata"]["name"], conn_id=self.conn_id,
                model_name=lin["model_name"], model_uri=lin["model_uri"], served_uri=lin.get("served_uri"),
                model_version=lin.get("model_version"), model_run_id=lin.get("model_run_id"),
                dag_id=lin.get("dag_id"), run_id=lin.get("run_id"), task_id=lin.get("task_id"),
                map_index=lin.get("map_index", -1), try_number=lin.get("try_number"), config=lin.get("config") or {},
                state=state, last_error=error,
            )  # fmt: skip
            record.prediction_url, record.health_url = self.urls(record)
            found.append(record)
        return found

    def _adopt_conflict(self, found: ServiceRecord, current: ServiceRecord) -> None:
        """An endpoint is one SeldonDeployment: it cannot hold a second server to stop."""

    # -- canary ----------------------------------------------------------------------------------

    def promote_model_server(self, service_uuid: str, timeout: float = 300, *, actor: str | None = None) -> Service:
        """The canary takes all the traffic: predictor ``main`` serves its version alone."""
        record = self._get(service_uuid)
        with self.registry.lease(self.backend, record.endpoint, conn_id=self.conn_id, ttl=timeout + 120, wait=timeout):
            record = self._get(record.uuid)
            if record.state != ServiceState.ACTIVE or not record.config.get("canary_of"):
                raise InvalidParameterError("uuid", service_uuid, "has no canary to promote")
            stable = record.config["canary_of"]
            before = self._read(record.endpoint)
            record.config = {k: v for k, v in record.config.items() if k not in CANARY_KEYS}
            try:
                self._wait_available(record.endpoint, timeout, self._apply(self._manifest(record), {record.uuid}))
            except BaseException:
                self._restore(record, before)
                raise
            promoted = self.registry.update_service(record.uuid, config=record.config)
            self.registry.add_event(
                self.backend, record.endpoint, EventAction.PROMOTE, service_uuid=record.uuid,
                actor=actor or default_actor(),
                message=f"canary {record.model_uri} (version {record.model_version or '-'}) takes all traffic; "
                f"version {stable.get('model_version') or stable.get('served_uri')} retired",
                details={"model_uri": record.model_uri, "served_uri": record.served_uri,
                         "model_version": record.model_version, "previous_uuid": stable.get("uuid")},
            )  # fmt: skip
        return self._service(promoted)

    # -- storage credentials ---------------------------------------------------------------------

    def _secret_name(self, record: ServiceRecord) -> str | None:
        return record.config.get("storage_secret") or self.settings.storage_secret

    def _ensure_secret(self, record: ServiceRecord) -> None:
        """Create the storage-credentials Secret from the connection's ``storage_conn_id`` (S3 or
        MinIO) as the rclone variables Seldon's storage initializer reads; values never leave here."""
        name, source = self._secret_name(record), self.settings.storage_conn_id
        if not name or not source:
            return
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            existing = self.hook.read_secret(name)
        except ApiException as exc:
            raise self._api_error(exc, name) from None
        if existing is not None:
            if (existing.metadata.labels or {}).get(CREATED_SECRET_LABEL) == "airflow-provider-modeldeploy":
                return  # ours, from an earlier deployment
            raise InvalidParameterError(
                "storage_secret", name,
                f"a Secret of this name exists in namespace {self.settings.namespace} and was not created by this "
                "provider; it is left as it is: name another storage_secret (or drop storage_conn_id to use it)",
            )  # fmt: skip
        conn = self.hook.get_connection(source)
        extra = conn.extra_dejson
        endpoint = extra.get("endpoint_url") or (extra.get("service_config") or {}).get("s3", {}).get("endpoint_url")
        data = {
            "RCLONE_CONFIG_S3_TYPE": "s3",
            "RCLONE_CONFIG_S3_PROVIDER": "Minio" if endpoint else "AWS",
            "RCLONE_CONFIG_S3_ENV_AUTH": "false",
            "RCLONE_CONFIG_S3_ACCESS_KEY_ID": conn.login or extra.get("aws_access_key_id") or "",
            "RCLONE_CONFIG_S3_SECRET_ACCESS_KEY": conn.password or extra.get("aws_secret_access_key") or "",
        }
        if endpoint:
            data["RCLONE_CONFIG_S3_ENDPOINT"] = endpoint
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name=name, labels={CREATED_SECRET_LABEL: "airflow-provider-modeldeploy"}),
            string_data=data, type="Opaque",
        )  # fmt: skip
        try:
            self.hook.create_secret(body)
        except ApiException as exc:
            if exc.status != 409:  # created meanwhile by a parallel deployment: fine
                raise self._api_error(exc, name) from None
        log.info("Created storage-credentials Secret %s (values not logged)", name)

    def _delete_secret_if_unused(self, record: ServiceRecord) -> None:
        name = self._secret_name(record)
        if not name:
            return
        from kubernetes.client.exceptions import ApiException

        try:
            secret = self.hook.read_secret(name)
        except ApiException:
            return
        if secret is None:
            return
        if (secret.metadata.labels or {}).get(CREATED_SECRET_LABEL) != "airflow-provider-modeldeploy":
            return  # not ours: never delete a Secret the cluster admin made
        for obj in self.hook.list_deployments():
            for p in obj["spec"].get("predictors", []):
                if (p.get("graph") or {}).get("envSecretRefName") == name:
                    return  # still used by another deployment
        self.hook.delete_secret(name)


def _pod_model_uri(pod: Any) -> str | None:
    """The modelUri a model pod serves: Seldon's storage initializer downloads it (its first argument)."""
    for container in pod.spec.init_containers or []:
        if container.name.endswith("-model-initializer") and container.args:
            return container.args[0]
    return None


#: Waiting reasons of a container (Kubernetes' kubelet) that a rollout does not get over by waiting.
STUCK_REASONS = frozenset({
    "CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
    "CreateContainerError",
})  # fmt: skip


def _crash_loop(pod: Any) -> str | None:
    """Why a model pod will not become ready without a new spec (a container of it crash-looping or
    its image unpullable, the storage initializer's included), None when it may still."""
    statuses = [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]
    for status in statuses:
        waiting = status.state.waiting if status.state else None
        if waiting is None or waiting.reason not in STUCK_REASONS:
            continue
        why = f"container {status.name} {waiting.reason}"
        terminated = status.last_state.terminated if status.last_state else None
        if terminated is not None:
            why += f" (exit code {terminated.exit_code}"
            why += f", {terminated.reason}" if terminated.reason else ""
            why += f": {terminated.message.strip()}" if (terminated.message or "").strip() else ""
            why += f", {status.restart_count} restarts)"
        elif waiting.message:
            why += f": {waiting.message}"
        return why
    return None


def _pod_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def _owner(obj: dict[str, Any]) -> str | None:
    return owner(obj)


def _label_value(value: str) -> str:
    """A label value (63 chars of [-A-Za-z0-9_.], alphanumeric at both ends); the annotation keeps
    the exact value."""
    import re

    cleaned = re.sub(r"[^-A-Za-z0-9_.]", "_", value)[:63]
    return cleaned.strip("-_.")
