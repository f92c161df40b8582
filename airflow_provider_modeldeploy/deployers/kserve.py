"""The KServe backend: each endpoint is one ``InferenceService`` (serving.kserve.io/v1beta1).

Deploy creates it; a replace merge-patches it (with its resourceVersion) and returns once the new
spec is what serves; a deploy with ``canary_traffic_percent`` keeps the serving version and adds the
new one beside it (Standard mode: ``spec.canary[]``; Knative mode: ``canaryTrafficPercent``), until
``promote`` or ``rollback``. Stop / start is KServe's ``serving.kserve.io/stop`` annotation. The
lineage rides on labels and an annotation, so ``sync`` can rebuild the registry from the cluster.
Every cluster call goes through ``KServeDeployerHook``; this module holds the policy, above all:
an InferenceService this provider did not create is never changed, adopted or deleted.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from airflow_provider_modeldeploy.deployers.base import BaseModelDeployer, Launch, default_actor
from airflow_provider_modeldeploy.deployers.kserve_support import (
    CANARY_KEYS,
    CredentialsMixin,
    label_value,
    merge_diff,
    pod_ready,
    pod_storage_uri,
)
from airflow_provider_modeldeploy.deployers.kubernetes_common import check_ours, follow_logs, owner, restore_patch
from airflow_provider_modeldeploy.exceptions import DeploymentFailedError, InvalidParameterError
from airflow_provider_modeldeploy.hooks.kserve import KServeDeployerHook, KServeSettings
from airflow_provider_modeldeploy.hooks.kubernetes_cluster import api_message
from airflow_provider_modeldeploy.kserve import manifests as m
from airflow_provider_modeldeploy.kserve import storage
from airflow_provider_modeldeploy.registry import EndpointLease, Registry
from airflow_provider_modeldeploy.services import (
    EventAction,
    Lineage,
    Service,
    ServiceConfig,
    ServiceRecord,
    ServiceState,
)

log = logging.getLogger(__name__)


class KServeDeployer(CredentialsMixin, BaseModelDeployer):
    """Serves MLflow models with KServe on Kubernetes.

    Backend options: ``replicas``, ``max_replicas``, ``resources``, ``service_account``,
    ``runtime`` (``sklearn`` or ``mlserver``), ``serving_runtime`` (a ServingRuntime's name),
    ``protocol`` (``v1``/``v2``), ``export_joblib`` (sklearn runtime: write a joblib export of the
    model next to it, default True), ``canary_traffic_percent`` (deploy as a canary beside the
    serving version: 0-99 in Standard mode, 0 being a dark launch; 1-99 in Knative mode) and
    ``smoke_input`` (a JSON body in the connection's protocol for the smoke prediction).
    """

    backend = "kserve"
    backend_options: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "replicas": int, "max_replicas": int, "resources": dict, "service_account": str, "runtime": str,
        "serving_runtime": str, "protocol": str, "export_joblib": bool, "canary_traffic_percent": int,
        "smoke_input": (str, dict, list),
    }  # fmt: skip

    def __init__(
        self, conn_id: str | None = None, registry: Registry | None = None, hook: KServeDeployerHook | None = None
    ) -> None:
        super().__init__(conn_id=conn_id, registry=registry)
        self.hook = hook or KServeDeployerHook(conn_id=conn_id)
        self._restored: set[str] = set()

    @classmethod
    def from_connection(cls, conn_id: str, connection: Any) -> KServeDeployer:
        return cls(conn_id=conn_id, hook=KServeDeployerHook(conn_id=conn_id, connection=connection))

    @property
    def settings(self) -> KServeSettings:
        return self.hook.settings

    def _metrics(self, record: ServiceRecord, window: str) -> Any:
        """From the connection's Prometheus (``prometheus_url``), else not available, saying why."""
        from airflow_provider_modeldeploy.deployers.kubernetes_common import kubernetes_metrics

        return kubernetes_metrics(
            self, record, window, self.settings.namespace, roles=lambda: self._revision_roles(record)
        )

    def _revision_roles(self, record: ServiceRecord) -> Callable[[str], str]:
        """Each Knative revision's role, from the InferenceService's traffic status: the revision
        tagged ``latest`` in a split is the canary, the others with traffic are main, and revisions
        without traffic (replaced in the window) are previous."""
        try:
            obj = self.hook.get_inference_service(record.endpoint)
        except Exception as exc:  # the API's or the network's, after retries: the chart draws, all main
            log.warning("Cannot read InferenceService %s for its revisions' roles: %s", record.endpoint, exc)
            obj = None
        traffic = (((obj or {}).get("status") or {}).get("components") or {}).get("predictor", {}).get("traffic") or []
        if not traffic:
            return lambda revision: "main"
        split = len([t for t in traffic if t.get("percent")]) > 1
        roles = {
            t.get("revisionName"): "canary" if split and t.get("tag") == "latest" else "main"
            for t in traffic if t.get("percent")
        }  # fmt: skip
        return lambda revision: roles.get(revision, "previous")

    # -- options and names -----------------------------------------------------------------------

    def deploy_model(
        self, config: ServiceConfig, replace: bool = True, timeout: float = 300, *, lineage: Lineage | None = None
    ) -> Service:
        config.validate()
        m.check_isvc_name("endpoint", config.endpoint_name)  # the InferenceService's name
        return super().deploy_model(config, replace=replace, timeout=timeout, lineage=lineage)

    def _validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        clean = super()._validate_options(options)
        s = self.settings
        if clean.get("replicas", 1) < 0:
            raise InvalidParameterError("replicas", clean["replicas"], "must be a non-negative integer")
        if clean.get("max_replicas", 1) < 1:
            raise InvalidParameterError("max_replicas", clean["max_replicas"], "must be a positive integer")
        runtime = clean.get("runtime", s.runtime)
        if runtime not in m.RUNTIMES:
            raise InvalidParameterError("runtime", runtime, f"use one of {', '.join(m.RUNTIMES)}")
        supported = m.RUNTIMES[runtime].protocols
        protocol = clean.get("protocol") or (s.protocol if s.protocol in supported else None) or supported[0]
        m.check_runtime_protocol(m.RUNTIMES[runtime], protocol)
        pct = clean.get("canary_traffic_percent")
        low = 0 if s.deployment_mode == "Standard" else 1
        if pct is not None and not low <= pct <= 99:
            raise InvalidParameterError("canary_traffic_percent", pct, f"must be between {low} and 99")
        if "service_account" in clean:
            from airflow_provider_modeldeploy.hooks.seldon import check_dns1123

            check_dns1123("service_account", clean["service_account"], 253)
        if isinstance(clean.get("smoke_input"), str):
            try:
                json.loads(clean["smoke_input"])
            except ValueError as exc:
                raise InvalidParameterError("smoke_input", clean["smoke_input"], f"is not JSON ({exc})") from None
        return {**s.public(), **clean, "runtime": runtime, "protocol": protocol}

    # -- URLs ------------------------------------------------------------------------------------

    def urls(self, record: ServiceRecord, obj: dict[str, Any] | None = None) -> tuple[str, str]:
        """(prediction URL, health URL): the runtimes serve the model under the InferenceService's name."""
        s, name = self.settings, record.endpoint
        if s.url_template:
            base = s.url_template.format(namespace=s.namespace, name=name)
        else:
            obj = obj if obj is not None else self.hook.get_inference_service(name)
            base = ((obj or {}).get("status") or {}).get("url") or f"http://{name}.{s.namespace}.svc.cluster.local"
        base = base.rstrip("/")
        if record.config.get("protocol", "v1") == "v2":
            return f"{base}/v2/models/{name}/infer", f"{base}/v2/models/{name}/ready"
        return f"{base}/v1/models/{name}:predict", f"{base}/v1/models/{name}"

    # -- the InferenceService ----------------------------------------------------------------------

    def _read(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.hook.get_inference_service(name)
        except ApiException as exc:
            raise self._api_error(exc, name) from None

    def _api_error(self, exc: Any, name: str) -> Exception:
        if exc.status == 422:
            return InvalidParameterError(
                "manifest", name, f"the cluster rejected the InferenceService: {api_message(exc)}"
            )
        return DeploymentFailedError(f"endpoint={name!r}: Kubernetes API answered {exc.status}: {api_message(exc)}")

    def _owners(self, record: ServiceRecord, previous: ServiceRecord | None) -> set[str]:
        """Service uuids whose InferenceService this deployment may change: this endpoint's services."""
        known = {r.uuid for r in self.registry.find_services(backend=self.backend, endpoint=record.endpoint)}
        return known | {record.uuid} | ({previous.uuid} if previous else set())

    def _check_ours(self, obj: dict[str, Any] | None, owners: set[str]) -> None:
        """Never take over an InferenceService this provider did not create for this endpoint."""
        check_ours(obj, owners, "InferenceService", self.settings.namespace)

    def _apply(self, manifest: dict[str, Any], owners: set[str]) -> dict[str, Any]:
        """Create the InferenceService, or merge-patch it into exactly ``manifest``'s spec (our
        labels and annotations set, the stop annotation removed) with its resourceVersion; on a 409
        conflict (someone wrote in between) re-read and re-apply, a few times."""
        from kubernetes.client.exceptions import ApiException
        from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

        name = manifest["metadata"]["name"]

        def conflict(exc: BaseException) -> bool:
            return isinstance(exc, ApiException) and exc.status == 409

        @retry(retry=retry_if_exception(conflict), stop=stop_after_attempt(5), wait=wait_exponential(0.05, max=1),
               reraise=True)  # fmt: skip
        def attempt() -> dict[str, Any]:
            current = self._read(name)
            if current is None:
                return self.hook.create_inference_service(manifest)
            self._check_ours(current, owners)
            meta = manifest["metadata"]
            patch = {
                "metadata": {
                    "labels": meta["labels"], "annotations": {**meta["annotations"], m.STOP_ANNOTATION: None},
                    "resourceVersion": current["metadata"]["resourceVersion"],
                },
                "spec": merge_diff(current.get("spec") or {}, manifest["spec"]),
            }  # fmt: skip
            return self.hook.patch_inference_service(name, patch)

        try:
            return attempt()
        except ApiException as exc:
            raise self._api_error(exc, name) from None

    def _restore(self, record: ServiceRecord, before: dict[str, Any] | None) -> None:
        """Put the InferenceService back exactly as it was before a failed rollout: its labels,
        annotations and spec (the previous version serves), or remove the one we created."""
        self._restored.add(record.uuid)
        try:
            if before is None:
                current = self._read(record.endpoint)
                if current is not None and owner(current) == record.uuid:
                    self.hook.delete_inference_service(record.endpoint)
                return
            for _ in range(5):
                current = self._read(record.endpoint)
                if current is not None and owner(current) is None:
                    log.warning("InferenceService %s is no longer ours: left as it is", record.endpoint)
                    return
                if current is None:
                    body = {k: v for k, v in copy.deepcopy(before).items() if k != "status"}
                    for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
                        body["metadata"].pop(key, None)
                    self.hook.create_inference_service(body)
                    return
                try:
                    self.hook.patch_inference_service(record.endpoint, restore_patch(current, before))
                    return
                except Exception as exc:
                    if getattr(exc, "status", None) != 409:
                        raise
        except Exception:
            log.exception("Could not restore InferenceService %s after a failed rollout", record.endpoint)

    def _rolled_out(self, obj: dict[str, Any], generation: int | None) -> tuple[bool, str]:
        """(whether the spec of ``generation`` is what serves, what is missing); raises
        DeploymentFailedError with KServe's reason when the new model failed to load."""
        status = obj.get("status") or {}
        observed = status.get("observedGeneration")
        if generation is not None and (observed is None or int(observed) < generation):
            return False, f"KServe has not observed generation {generation} yet"
        failed = [status.get("modelStatus") or {}] + [
            c.get("modelStatus") or {} for c in status.get("canaryStatuses") or []
        ]
        for ms in failed:
            if ms.get("transitionStatus") in ("BlockedByFailedLoad", "InvalidSpec"):
                info = ms.get("lastFailureInfo") or {}
                raise DeploymentFailedError(
                    f"endpoint={obj['metadata']['name']!r}: KServe reports {ms['transitionStatus']}: "
                    f"{info.get('reason') or 'no reason'}: {info.get('message') or 'no message'}"
                )
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        ready = conditions.get("Ready") or {}
        if ready.get("status") != "True":
            return False, f"not Ready ({ready.get('reason') or ready.get('message') or 'no condition yet'})"
        predictor = (status.get("components") or {}).get("predictor") or {}
        if self.settings.deployment_mode == "Knative":
            if predictor.get("latestReadyRevision") != predictor.get("latestCreatedRevision"):
                return False, f"revision {predictor.get('latestCreatedRevision')} is not ready yet"
            return True, ""
        return self._pods_rolled_out(obj)

    def _pods_rolled_out(self, obj: dict[str, Any]) -> tuple[bool, str]:
        """Standard mode: the live pods are exactly the spec's predictors' (their storage initializers
        name the storageUri), all ready: Ready alone stays True through a rolling update."""
        from collections import Counter

        from kubernetes.client.exceptions import ApiException

        spec = obj["spec"]
        wanted: Counter[str] = Counter()
        for p in [spec["predictor"], *(c["predictor"] for c in spec.get("canary") or [])]:
            wanted[p["model"]["storageUri"]] += max(int(p.get("minReplicas", 1)), 1)
        try:
            pods = self.hook.isvc_pods(obj["metadata"]["name"])
        except ApiException as exc:
            if exc.status == 403:  # may not list pods: KServe's status is all there is to go by
                log.warning("Cannot list pods in %s (403): trusting KServe's status alone", self.settings.namespace)
                return True, ""
            raise self._api_error(exc, obj["metadata"]["name"]) from None
        live = [
            p for p in pods if p.metadata.deletion_timestamp is None and p.status.phase not in ("Succeeded", "Failed")
        ]
        serving: Counter[str | None] = Counter(pod_storage_uri(p) for p in live)
        ready = sum(1 for p in live if pod_ready(p))
        if set(serving) <= set(wanted) and all(serving[u] >= 1 for u in wanted) and ready == len(live):
            return True, ""
        return False, f"{ready} of {len(live)} predictor pods ready, wanted: {dict(wanted)}"

    def _wait_rolled_out(self, name: str, timeout: float, written: dict[str, Any]) -> dict[str, Any]:
        generation = (written.get("metadata") or {}).get("generation")
        deadline = time.monotonic() + timeout
        while True:
            obj = self._read(name)
            if obj is None:
                raise DeploymentFailedError(f"endpoint={name!r}: the InferenceService disappeared while rolling out")
            done, detail = self._rolled_out(obj, generation)
            if done:
                return obj
            if time.monotonic() > deadline:
                raise DeploymentFailedError(f"timeout={timeout!r}: InferenceService {name} did not roll out ({detail})")
            time.sleep(0.2)

    # -- manifests ---------------------------------------------------------------------------------

    def _lineage(self, record: ServiceRecord) -> dict[str, Any]:
        return {
            "uuid": record.uuid, "endpoint": record.endpoint, "model_name": record.model_name,
            "model_uri": record.model_uri, "served_uri": record.served_uri, "model_version": record.model_version,
            "model_run_id": record.model_run_id, "dag_id": record.dag_id, "run_id": record.run_id,
            "task_id": record.task_id, "map_index": record.map_index, "try_number": record.try_number,
            "config": {k: v for k, v in record.config.items() if k != "smoke_input"},
        }  # fmt: skip

    def _predictor(
        self, cfg: dict[str, Any], name: str, served_uri: str, model_uri: str, version: str | None
    ) -> m.Predictor:
        s = self.settings
        runtime = m.RUNTIMES[cfg.get("runtime", s.runtime)]
        # MLServer registers the model under this version and names it in every v2 answer
        # (``model_version``): the deploy checks that the new version is what answers.
        env = {"MLSERVER_MODEL_VERSION": version} if runtime.loads == "mlflow" and version else {}
        return m.Predictor(
            name=name, storage_uri=storage.pod_uri(served_uri, s.local_artifact_map, model_uri),
            runtime=runtime, protocol=cfg.get("protocol", "v1"), env=env,
            runtime_name=cfg.get("serving_runtime") or s.serving_runtime,
            min_replicas=cfg.get("replicas", s.replicas), max_replicas=cfg.get("max_replicas", s.max_replicas),
            service_account_name=cfg.get("service_account") or self._service_account_name(),
            resources=cfg.get("resources", s.resources),
        )  # fmt: skip

    def _manifest(self, record: ServiceRecord) -> dict[str, Any]:
        cfg, s = record.config, self.settings
        served = record.served_uri or record.model_uri
        own = self._predictor(
            cfg,
            cfg.get("predictor_name") or _predictor_name(record.uuid),
            served,
            record.model_uri,
            record.model_version,
        )
        canaries: list[m.Canary] = []
        canary = cfg.get("canary_of")
        if canary and s.deployment_mode == "Standard":
            main = self._predictor(
                cfg, canary["predictor_name"], canary["served_uri"], canary["model_uri"], canary.get("model_version")
            )
            canaries, own = [m.Canary(own, int(cfg["canary_traffic_percent"]))], main
        elif canary:
            own.canary_traffic_percent = int(cfg["canary_traffic_percent"])
        labels = {
            m.MANAGED_LABEL: "true", m.SERVICE_LABEL: record.uuid,
            f"{m.LABEL_PREFIX}/model-name": label_value(record.model_name),
            f"{m.LABEL_PREFIX}/model-version": label_value(record.model_version or ""),
            f"{m.LABEL_PREFIX}/dag-id": label_value(record.dag_id or ""),
        }  # fmt: skip
        return m.InferenceServiceSpec(
            name=record.endpoint, namespace=s.namespace, predictor=own, deployment_mode=s.deployment_mode,
            canaries=canaries, labels=labels,
            annotations={m.LINEAGE_ANNOTATION: json.dumps(self._lineage(record), sort_keys=True)},
        ).build()  # fmt: skip

    def render(self, config: ServiceConfig) -> dict[str, Any]:
        """The InferenceService a deploy of ``config`` would send, validated; nothing is sent or written."""
        import uuid as uuidlib

        config.validate()
        m.check_isvc_name("endpoint", config.endpoint_name)
        record = ServiceRecord(
            uuid=str(uuidlib.uuid4()), backend=self.backend, endpoint=config.endpoint_name, conn_id=self.conn_id,
            model_name=config.model_name, model_uri=config.model_uri,
            config=self._validate_options(config.backend_options), state=ServiceState.PENDING,
        )  # fmt: skip
        current = self._current(record.endpoint)
        self._resolve_storage(record, write=False)
        self._prepare_canary(
            record, current if current and current.state == ServiceState.ACTIVE else None, persist=False
        )
        return self._manifest(record)

    # -- lifecycle ---------------------------------------------------------------------------------

    def _resolve_storage(self, record: ServiceRecord, write: bool = True) -> None:
        """Resolve the model URI, check the runtime can load it (writing the joblib export the sklearn
        server needs when ``write``) and that pods can reach it: all before anything is sent."""
        if record.served_uri and record.model_version:  # a start: the version it served, not what an alias names now
            location, version, run_id = record.served_uri, record.model_version, record.model_run_id
        else:
            location, version, run_id = storage.resolve(record.model_uri, self.settings.tracking_uri)
        runtime = m.RUNTIMES[record.config.get("runtime", self.settings.runtime)]
        export = record.config.get("export_joblib", True)
        served = storage.loadable_location(location, runtime, record.model_uri, export_joblib=export, write=write)
        storage.pod_uri(served, self.settings.local_artifact_map, record.model_uri)  # reachable by pods?
        record.served_uri, record.model_version, record.model_run_id = served, version or record.model_version, run_id

    def _prepare_canary(self, record: ServiceRecord, previous: ServiceRecord | None, persist: bool = True) -> None:
        cfg = dict(record.config)
        canary = cfg.get("canary_of")
        if canary and canary.get("canary_uuid") != record.uuid:
            # Inherited by a rollback from the canary's config: the version rolled back to is the
            # stable predictor, which keeps its name (Standard mode: no restart).
            for key in CANARY_KEYS:
                cfg.pop(key, None)
            if record.served_uri == canary.get("served_uri"):
                cfg["predictor_name"] = canary["predictor_name"]
            else:
                cfg.pop("predictor_name", None)
        elif "canary_traffic_percent" in cfg and not canary:
            if previous is None or previous.state != ServiceState.ACTIVE or not previous.served_uri:
                raise InvalidParameterError(
                    "canary_traffic_percent", cfg["canary_traffic_percent"],
                    f"a canary needs a version serving endpoint '{record.endpoint}' already",
                )  # fmt: skip
            stable = previous.config.get("canary_of") or {}
            cfg["canary_of"] = {
                "canary_uuid": record.uuid, "uuid": stable.get("uuid") or previous.uuid,
                "served_uri": stable.get("served_uri") or previous.served_uri,
                "model_uri": stable.get("model_uri") or previous.model_uri,
                "model_version": stable.get("model_version") if stable else previous.model_version,
                "predictor_name": stable.get("predictor_name")
                or previous.config.get("predictor_name") or _predictor_name(previous.uuid),
            }  # fmt: skip
            cfg.pop("predictor_name", None)
        elif not canary and previous is not None and previous.served_uri == record.served_uri:
            cfg.setdefault("predictor_name", previous.config.get("predictor_name") or _predictor_name(previous.uuid))
        if cfg != record.config:
            record.config = cfg
            if persist:
                self.registry.update_service(record.uuid, config=cfg)

    def _launch(
        self, record: ServiceRecord, lease: EndpointLease, previous: ServiceRecord | None, timeout: float
    ) -> Launch:
        owners = self._owners(record, previous)
        before = self._read(record.endpoint)
        self._check_ours(before, owners)  # before anything is written, the registry included
        self._resolve_storage(record)
        self._prepare_canary(record, previous)
        manifest = self._manifest(record)
        self._ensure_credentials()
        try:
            obj = self._wait_rolled_out(record.endpoint, timeout, self._apply(manifest, owners))
            prediction_url, health_url = self.urls(record, obj)
            self._smoke(record, prediction_url, health_url, timeout)
        except BaseException:
            self._restore(record, before)
            raise
        return Launch(
            prediction_url=prediction_url, health_url=health_url, served_uri=record.served_uri,
            model_version=record.model_version, model_run_id=record.model_run_id,
        )  # fmt: skip

    def _smoke(self, record: ServiceRecord, prediction_url: str, health_url: str, timeout: float) -> None:
        """Health (503 while the predictor warms up is waited out), then the smoke prediction if given."""
        import httpx

        from airflow_provider_modeldeploy.hooks.tls import default_tls

        deadline = time.monotonic() + min(timeout, 120)
        while True:
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
        runtime = m.RUNTIMES[record.config.get("runtime", self.settings.runtime)]
        wanted = record.model_version if runtime.loads == "mlflow" and not record.config.get("canary_of") else None
        while True:
            answer = httpx.post(
                prediction_url, content=body if isinstance(body, str) else json.dumps(body),
                headers={"content-type": "application/json"}, timeout=60, verify=default_tls(),
            )  # fmt: skip
            if answer.status_code != 200:
                raise DeploymentFailedError(
                    f"model_uri={record.model_uri!r}: smoke prediction answered {answer.status_code}: {answer.text[:300]}"
                )
            served = _answer_version(answer)
            if wanted is None or served == wanted:
                return
            if time.monotonic() > deadline:  # the ingress still routes to the previous version's pods
                raise DeploymentFailedError(
                    f"endpoint={record.endpoint!r}: answers model version {served!r}, not the new {wanted!r}"
                )
            time.sleep(0.2)

    def _promote(self, record: ServiceRecord, launch: Launch, previous: ServiceRecord | None, timeout: float) -> None:
        """Nothing to do: KServe already serves the new spec behind the same URL."""

    def _discard(self, record: ServiceRecord, launch: Launch | None) -> None:
        if record.uuid in self._restored:
            return
        obj = self._read(record.endpoint)
        if obj is not None and owner(obj) == record.uuid:
            self.hook.delete_inference_service(record.endpoint)

    def _stop(self, record: ServiceRecord, timeout: float, force: bool) -> None:
        """KServe's stop annotation: the predictor's pods go, the InferenceService stays (``Stopped``)."""
        from kubernetes.client.exceptions import ApiException

        obj = self._read(record.endpoint)
        if obj is None or owner(obj) != record.uuid:
            return
        patch = {"metadata": {"annotations": {m.STOP_ANNOTATION: "true"}}}
        try:
            self.hook.patch_inference_service(record.endpoint, patch)
        except ApiException as exc:
            raise self._api_error(exc, record.endpoint) from None
        deadline = time.monotonic() + (0 if force else min(timeout, 60))
        while time.monotonic() < deadline:
            obj = self._read(record.endpoint)
            if obj is None or _condition(obj, "Stopped") == "True":
                return
            time.sleep(0.2)

    def _forget(self, record: ServiceRecord) -> None:
        obj = self._read(record.endpoint)
        if obj is not None and owner(obj) == record.uuid:
            self.hook.delete_inference_service(record.endpoint)
        self._delete_credentials_if_unused(record.endpoint)

    def _probe(self, record: ServiceRecord) -> tuple[ServiceState, str | None] | None:
        if record.state not in (ServiceState.ACTIVE, ServiceState.ERROR):
            return None
        obj = self._read(record.endpoint)
        if obj is None:
            return ServiceState.ERROR, f"InferenceService {self.settings.namespace}/{record.endpoint} is gone"
        if owner(obj) != record.uuid:
            return None
        state, error = _state_of(obj)
        return (state, error) if state != ServiceState.PENDING else None

    def _log_lines(self, record: ServiceRecord, tail: int | None, follow: bool) -> Iterator[str]:
        """The model containers' logs, pod by pod; lines carry ``[<pod>]`` when there are several
        pods (a canary, replicas). ``follow`` streams every pod's log until the pods go away."""
        from kubernetes.client.exceptions import ApiException

        pods = [p.metadata.name for p in self.hook.isvc_pods(record.endpoint)
                if not (follow and p.metadata.deletion_timestamp)]  # fmt: skip
        prefix = len(pods) > 1
        if follow:
            lines = 10 if tail is None else tail
            yield from follow_logs(lambda pod: self.hook.stream_pod_log(pod, m.MODEL_CONTAINER, lines), pods, prefix)
            return
        for pod in pods:
            try:
                text = self.hook.read_pod_log(pod, m.MODEL_CONTAINER, tail)
            except ApiException as exc:  # e.g. still initialising: the other pods' logs are worth showing
                log.warning("No log from pod %s: HTTP %s: %s", pod, exc.status, api_message(exc))
                continue
            for line in (text or "").splitlines():
                yield f"[{pod}] {line}" if prefix else line

    def _discover(self) -> list[ServiceRecord] | None:
        """InferenceServices carrying our managed label and lineage; nothing else is ever adopted."""
        found = []
        for obj in self.hook.list_inference_services(label_selector=f"{m.MANAGED_LABEL}=true"):
            try:
                lin = json.loads((obj["metadata"].get("annotations") or {})[m.LINEAGE_ANNOTATION])
            except (KeyError, ValueError):
                continue
            if lin.get("uuid") != owner(obj) or lin.get("endpoint") != obj["metadata"]["name"]:
                continue  # labels and lineage disagree: not an object we wrote as it is
            state, error = _state_of(obj)
            record = ServiceRecord(
                uuid=lin["uuid"], backend=self.backend, endpoint=obj["metadata"]["name"], conn_id=self.conn_id,
                model_name=lin["model_name"], model_uri=lin["model_uri"], served_uri=lin.get("served_uri"),
                model_version=lin.get("model_version"), model_run_id=lin.get("model_run_id"),
                dag_id=lin.get("dag_id"), run_id=lin.get("run_id"), task_id=lin.get("task_id"),
                map_index=lin.get("map_index", -1), try_number=lin.get("try_number"), config=lin.get("config") or {},
                state=ServiceState.ACTIVE if state == ServiceState.PENDING else state, last_error=error,
            )  # fmt: skip
            record.prediction_url, record.health_url = self.urls(record, obj)
            found.append(record)
        return found

    def _adopt_conflict(self, found: ServiceRecord, current: ServiceRecord | None) -> None:
        """An endpoint is one InferenceService: it cannot hold a second server to stop."""

    # -- canary ------------------------------------------------------------------------------------

    def promote_model_server(self, service_uuid: str, timeout: float = 300, *, actor: str | None = None) -> Service:
        """The canary takes all the traffic (Standard mode: it becomes the predictor, by its name)."""
        record = self._get(service_uuid)
        with self.registry.lease(self.backend, record.endpoint, conn_id=self.conn_id, ttl=timeout + 120, wait=timeout):
            record = self._get(record.uuid)
            if record.state != ServiceState.ACTIVE or not record.config.get("canary_of"):
                raise InvalidParameterError("uuid", service_uuid, "has no canary to promote")
            stable = record.config["canary_of"]
            before = self._read(record.endpoint)
            self._check_ours(before, {record.uuid})
            record.config = {k: v for k, v in record.config.items() if k not in CANARY_KEYS}
            try:
                self._wait_rolled_out(record.endpoint, timeout, self._apply(self._manifest(record), {record.uuid}))
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


def _answer_version(answer: Any) -> str | None:
    """The model version a v2 answer names (``model_version``), if any."""
    try:
        data = answer.json()
    except ValueError:
        return None
    return str(data["model_version"]) if isinstance(data, dict) and data.get("model_version") is not None else None


def _predictor_name(uuid: str) -> str:
    """A predictor is named after the service that first served its version (DNS label, a letter first)."""
    return f"p-{uuid.replace('-', '')[:10]}"


def _condition(obj: dict[str, Any], kind: str) -> str | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c.get("status")
    return None


def _state_of(obj: dict[str, Any]) -> tuple[ServiceState, str | None]:
    """What KServe's status says (PENDING: a rollout in progress, nothing to conclude)."""
    status = obj.get("status") or {}
    if (
        _condition(obj, "Stopped") == "True"
        or (obj["metadata"].get("annotations") or {}).get(m.STOP_ANNOTATION) == "true"
    ):
        return ServiceState.INACTIVE, None
    if _condition(obj, "Ready") == "True":
        return ServiceState.ACTIVE, None
    ms = status.get("modelStatus") or {}
    if ms.get("transitionStatus") in ("BlockedByFailedLoad", "InvalidSpec"):
        info = ms.get("lastFailureInfo") or {}
        return (
            ServiceState.ERROR,
            f"KServe reports {ms['transitionStatus']}: {info.get('reason')}: {info.get('message')}",
        )
    return ServiceState.PENDING, None
