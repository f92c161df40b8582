"""The ``modeldeploy_seldon`` connection: models served by Seldon Core on Kubernetes.

The Kubernetes side is the cncf-kubernetes provider's ``KubernetesHook`` reading the same
connection (extras ``kube_config_path``, ``kube_config``, ``cluster_context``, ``in_cluster``), so
the cluster is reached exactly as that hook understands it. Seldon extras: ``namespace``,
``ingress_base_url`` (where ``/seldon/<ns>/<name>/...`` answers), ``storage_secret`` (name of the
Secret with the model storage credentials), ``storage_conn_id`` (an S3/MinIO Airflow connection to
create that Secret from), ``implementation`` (default MLFLOW_SERVER), ``protocol`` (``seldon`` or
``v2``), ``replicas`` (default 1), ``tracking_uri`` (MLflow, to resolve ``models:/`` URIs into the
storage URIs Seldon downloads).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from airflow_provider_modeldeploy.exceptions import InvalidParameterError
from airflow_provider_modeldeploy.hooks.kubernetes_cluster import KubernetesClusterHook

IMPLEMENTATIONS = (
    "MLFLOW_SERVER",
    "SKLEARN_SERVER",
    "XGBOOST_SERVER",
    "TENSORFLOW_SERVER",
    "TRITON_SERVER",
    "HUGGINGFACE_SERVER",
)
PROTOCOLS = ("seldon", "v2")
#: group, version and plural of Seldon Core 1's SeldonDeployment (seldon/manifests.py builds them).
CRD = ("machinelearning.seldon.io", "v1", "seldondeployments")
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def check_dns1123(field_name: str, value: Any, max_length: int = 63) -> str:
    """``value`` if it is a DNS-1123 label (Kubernetes object names), else InvalidParameterError."""
    if not isinstance(value, str) or len(value) > max_length or not _DNS1123_LABEL.fullmatch(value):
        raise InvalidParameterError(
            field_name, value,
            f"is not a valid Kubernetes name (DNS-1123 label: at most {max_length} lowercase letters, "
            "digits or '-', starting and ending with a letter or digit)",
        )  # fmt: skip
    return value


@dataclass
class SeldonSettings:
    """What the Seldon backend reads from its connection; never holds a secret value."""

    namespace: str = "default"
    ingress_base_url: str = "http://127.0.0.1"
    storage_secret: str | None = None
    storage_conn_id: str | None = None
    implementation: str = "MLFLOW_SERVER"
    protocol: str = "seldon"
    replicas: int = 1
    service_account: str | None = None
    tracking_uri: str | None = None

    def public(self) -> dict[str, Any]:
        """What may be stored with a service (names, not credentials)."""
        return {
            "namespace": self.namespace, "ingress_base_url": self.ingress_base_url,
            "storage_secret": self.storage_secret, "implementation": self.implementation,
            "protocol": self.protocol, "replicas": self.replicas,
        }  # fmt: skip


class SeldonDeployerHook(KubernetesClusterHook):
    """Kubernetes API access and Seldon settings from a ``modeldeploy_seldon`` connection.

    :param conn_id: the Airflow connection id.
    :param connection: the connection when the caller already looked it up.
    """

    default_conn_name = "modeldeploy_seldon_default"
    conn_type = "modeldeploy_seldon"
    hook_name = "Model Deploy: Seldon Core (Kubernetes)"

    def get_settings(self) -> SeldonSettings:
        extra = self.extras
        namespace = check_dns1123("namespace", extra.get("namespace") or "default")
        implementation = extra.get("implementation") or "MLFLOW_SERVER"
        if implementation not in IMPLEMENTATIONS:
            raise InvalidParameterError("implementation", implementation, f"use one of {', '.join(IMPLEMENTATIONS)}")
        protocol = extra.get("protocol") or "seldon"
        if protocol not in PROTOCOLS:
            raise InvalidParameterError("protocol", protocol, "use 'seldon' or 'v2'")
        replicas = extra.get("replicas", 1)
        try:
            replicas = int(replicas)
        except (TypeError, ValueError):
            replicas = -1
        if replicas < 1:
            raise InvalidParameterError("replicas", extra.get("replicas"), "must be a positive integer")
        secret = extra.get("storage_secret") or None
        if secret is not None:
            check_dns1123("storage_secret", secret, 253)
        base = (extra.get("ingress_base_url") or "http://127.0.0.1").rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise InvalidParameterError("ingress_base_url", base, "must be an http(s) URL")
        return SeldonSettings(
            namespace=namespace, ingress_base_url=base, storage_secret=secret,
            storage_conn_id=extra.get("storage_conn_id") or None, implementation=implementation,
            protocol=protocol, replicas=replicas, service_account=extra.get("service_account") or None,
            tracking_uri=extra.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"),
        )  # fmt: skip

    # -- SeldonDeployments (pods, logs and Secrets: KubernetesClusterHook) -------------------------

    def get_deployment(self, name: str) -> dict[str, Any] | None:
        return self.get_object(CRD, name)

    def create_deployment(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.create_object(CRD, body)

    def patch_deployment(self, name: str, patch: Any, json_patch: bool = False) -> dict[str, Any]:
        return self.patch_object(CRD, name, patch, json_patch=json_patch)

    def delete_deployment(self, name: str) -> None:
        self.delete_object(CRD, name)

    def list_deployments(self, label_selector: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        return self.list_objects(CRD, label_selector, limit)

    def model_pods(self, deployment: str) -> list[Any]:
        """The SeldonDeployment's model pods (Seldon labels them with its name), by name."""
        return self.list_pods(f"seldon-deployment-id={deployment}")

    def test_connection(self) -> tuple[bool, str]:
        try:
            settings = self.get_settings()
            self.list_deployments(limit=1)
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"[:500]
        return True, f"SeldonDeployments readable in namespace {settings.namespace}"
