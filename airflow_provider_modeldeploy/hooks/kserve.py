"""The ``modeldeploy_kserve`` connection: models served by KServe on Kubernetes.

Cluster access is the cncf-kubernetes ``KubernetesHook`` reading the same connection (extras
``kube_config_path``, ``kube_config``, ``cluster_context``, ``in_cluster``). KServe extras:
``namespace``, ``deployment_mode`` (``Standard`` or ``Knative``), ``protocol`` (``v1`` or ``v2``),
``runtime`` (``sklearn``: KServe's sklearn server with a joblib export of the model; ``mlserver``:
MLServer loading the MLflow directory), ``serving_runtime`` (another ServingRuntime's name),
``url_template`` (the endpoint's base URL when ``status.url`` is not reachable from Airflow, e.g.
``http://ingress/serving/{namespace}/{name}``), ``service_account``, ``storage_conn_id`` (an
S3/MinIO connection the storage Secret is made from), ``storage_secret``, ``replicas``,
``max_replicas``, ``resources``, ``tracking_uri`` and ``local_artifact_map`` (local artifact path
prefixes and the URI prefixes pods read them under). Every cluster call goes through this hook.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_modeldeploy.exceptions import InvalidParameterError
from airflow_provider_modeldeploy.hooks.kubernetes_cluster import KubernetesClusterHook
from airflow_provider_modeldeploy.hooks.seldon import check_dns1123
from airflow_provider_modeldeploy.kserve import manifests as m

CRD = (m.GROUP, m.VERSION, m.PLURAL)


@dataclass
class KServeSettings:
    """What the KServe backend reads from its connection; never holds a secret value."""

    namespace: str = "default"
    deployment_mode: str = "Standard"
    protocol: str | None = None  # None: the runtime's first (sklearn: v1, mlserver: v2)
    runtime: str = "sklearn"
    serving_runtime: str | None = None
    url_template: str | None = None
    service_account: str | None = None
    storage_conn_id: str | None = None
    storage_secret: str = "modeldeploy-storage"
    replicas: int = 1
    max_replicas: int | None = None
    resources: dict[str, Any] | None = None
    tracking_uri: str | None = None
    local_artifact_map: dict[str, str] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """What may be stored with a service (names, not credentials)."""
        return {
            "namespace": self.namespace, "deployment_mode": self.deployment_mode, "runtime": self.runtime,
            "protocol": self.protocol or m.RUNTIMES[self.runtime].protocols[0], "replicas": self.replicas,
        }  # fmt: skip


class KServeDeployerHook(KubernetesClusterHook):
    """Kubernetes API access and KServe settings from a ``modeldeploy_kserve`` connection."""

    default_conn_name = "modeldeploy_kserve_default"
    conn_type = "modeldeploy_kserve"
    hook_name = "Model Deploy: KServe (Kubernetes)"

    def get_settings(self) -> KServeSettings:
        extra = self.extras
        namespace = check_dns1123("namespace", extra.get("namespace") or "default")
        mode = extra.get("deployment_mode") or "Standard"
        if mode not in m.DEPLOYMENT_MODES:
            raise InvalidParameterError("deployment_mode", mode, "use 'Standard' or 'Knative'")
        runtime = extra.get("runtime") or "sklearn"
        if runtime not in m.RUNTIMES:
            raise InvalidParameterError("runtime", runtime, f"use one of {', '.join(m.RUNTIMES)}")
        protocol = extra.get("protocol") or None
        if protocol is not None:
            m.check_runtime_protocol(m.RUNTIMES[runtime], protocol)
        replicas = _int(extra, "replicas", 1, minimum=0)
        max_replicas = _int(extra, "max_replicas", None, minimum=1)
        template = extra.get("url_template") or None
        if template is not None and not str(template).startswith(("http://", "https://")):
            raise InvalidParameterError("url_template", template, "must be an http(s) URL")
        mapping = extra.get("local_artifact_map") or {}
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise InvalidParameterError("local_artifact_map", mapping, "must map local path prefixes to URI prefixes")
        resources = extra.get("resources") or None
        if resources is not None and not isinstance(resources, dict):
            raise InvalidParameterError("resources", resources, 'must be {"requests": {...}, "limits": {...}}')
        sa = extra.get("service_account") or None
        if sa is not None:
            check_dns1123("service_account", sa, 253)
        secret = check_dns1123("storage_secret", extra.get("storage_secret") or "modeldeploy-storage", 253)
        return KServeSettings(
            namespace=namespace, deployment_mode=mode, protocol=protocol, runtime=runtime,
            serving_runtime=extra.get("serving_runtime") or None, url_template=template, service_account=sa,
            storage_conn_id=extra.get("storage_conn_id") or None, storage_secret=secret, replicas=replicas,
            max_replicas=max_replicas, resources=resources,
            tracking_uri=extra.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"),
            local_artifact_map=dict(mapping),
        )  # fmt: skip

    # -- InferenceServices (pods, logs, Secrets and ServiceAccounts: KubernetesClusterHook) ----------

    def get_inference_service(self, name: str) -> dict[str, Any] | None:
        return self.get_object(CRD, name)

    def create_inference_service(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.create_object(CRD, body)

    def patch_inference_service(self, name: str, patch: Any, json_patch: bool = False) -> dict[str, Any]:
        return self.patch_object(CRD, name, patch, json_patch=json_patch)

    def delete_inference_service(self, name: str) -> None:
        self.delete_object(CRD, name)

    def list_inference_services(self, label_selector: str | None = None) -> list[dict[str, Any]]:
        return self.list_objects(CRD, label_selector)

    def isvc_pods(self, isvc: str) -> list[Any]:
        """The InferenceService's pods (KServe labels them with its name), by name."""
        return self.list_pods(f"{m.ISVC_POD_LABEL}={isvc}")

    def test_connection(self) -> tuple[bool, str]:
        try:
            settings = self.get_settings()
            self.list_objects(CRD, limit=1)
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"[:500]
        return True, f"InferenceServices readable in namespace {settings.namespace}"


def _int(extra: dict[str, Any], key: str, default: int | None, minimum: int) -> Any:
    value = extra.get(key, default)
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = minimum - 1
    if isinstance(value, bool) or number < minimum:
        raise InvalidParameterError(key, value, f"must be an integer >= {minimum}")
    return number
