"""Pieces of the KServe deployer that are not its lifecycle: storage credentials the KServe way,
pod inspection and log following."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_modeldeploy.deployers.kubernetes_common import label_value, merge_diff, pod_ready
from airflow_provider_modeldeploy.exceptions import InvalidParameterError
from airflow_provider_modeldeploy.kserve import manifests as m

__all__ = [
    "CANARY_KEYS",
    "CredentialsMixin",
    "label_value",
    "merge_diff",
    "pod_ready",
    "pod_storage_uri",
]

log = logging.getLogger(__name__)
CANARY_KEYS = ("canary_traffic_percent", "canary_of")
CREATED_BY_LABEL = f"{m.LABEL_PREFIX}/created-by"
CREATED_BY = "airflow-provider-modeldeploy"
DEFAULT_SERVICE_ACCOUNT = "modeldeploy-storage"


def pod_storage_uri(pod: Any) -> str | None:
    """The storageUri a predictor pod serves: KServe's storage initializer downloads it (first argument)."""
    for container in pod.spec.init_containers or []:
        if container.name == "storage-initializer" and container.args:
            return container.args[0]
    return None


def _ours(obj: Any) -> bool:
    return ((obj.metadata.labels if obj is not None else None) or {}).get(CREATED_BY_LABEL) == CREATED_BY


class CredentialsMixin:
    """Storage credentials the KServe way: a Secret with the S3 keys and KServe's ``serving.kserve.io/s3-*``
    annotations, listed by a ServiceAccount the predictor names. Both are made from the connection's
    ``storage_conn_id``, marked as ours; one of those names that exists and is not ours is an error,
    never used or changed. The values are read from the Airflow connection and go only into the Secret."""

    hook: Any
    settings: Any

    def _service_account_name(self) -> str | None:
        s = self.settings
        return s.service_account or (DEFAULT_SERVICE_ACCOUNT if s.storage_conn_id else None)

    def _ensure_credentials(self) -> None:
        s = self.settings
        if not s.storage_conn_id:
            return
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        secret_name, account = s.storage_secret, self._service_account_name()
        secret = self.hook.read_secret(secret_name)
        if secret is not None and not _ours(secret):
            raise InvalidParameterError(
                "storage_secret", secret_name,
                f"a Secret of this name exists in namespace {s.namespace} and was not created by this provider; "
                "it is left as it is: name another storage_secret in the connection",
            )  # fmt: skip
        existing = self.hook.read_service_account(account)
        if existing is not None and not _ours(existing):
            raise InvalidParameterError(
                "service_account", account,
                f"a ServiceAccount of this name exists in namespace {s.namespace} and was not created by this "
                "provider; it is left as it is: name another service_account in the connection",
            )  # fmt: skip
        labels = {CREATED_BY_LABEL: CREATED_BY}
        if secret is None:
            conn = self.hook.get_connection(s.storage_conn_id)
            extra = conn.extra_dejson
            endpoint = extra.get("endpoint_url") or (extra.get("service_config") or {}).get("s3", {}).get(
                "endpoint_url"
            )
            annotations = {}
            if endpoint:
                parts = urlsplit(endpoint)
                annotations = {"serving.kserve.io/s3-endpoint": parts.netloc or endpoint,
                               "serving.kserve.io/s3-usehttps": "1" if parts.scheme == "https" else "0"}  # fmt: skip
            region = extra.get("region_name")
            if region:
                annotations["serving.kserve.io/s3-region"] = region
            body = client.V1Secret(
                metadata=client.V1ObjectMeta(name=secret_name, labels=labels, annotations=annotations),
                string_data={"AWS_ACCESS_KEY_ID": conn.login or extra.get("aws_access_key_id") or "",
                             "AWS_SECRET_ACCESS_KEY": conn.password or extra.get("aws_secret_access_key") or ""},
                type="Opaque",
            )  # fmt: skip
            try:
                self.hook.create_secret(body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
            log.info("Created storage-credentials Secret %s (values not logged)", secret_name)
        if existing is None:
            sa = client.V1ServiceAccount(
                metadata=client.V1ObjectMeta(name=account, labels=labels),
                secrets=[client.V1ObjectReference(name=secret_name)],
            )
            try:
                self.hook.create_service_account(sa)
            except ApiException as exc:
                if exc.status != 409:
                    raise

    def _delete_credentials_if_unused(self, deleted: str) -> None:
        """Our Secret and ServiceAccount go with the last of our InferenceServices that uses them."""
        s = self.settings
        account = self._service_account_name()
        if not s.storage_conn_id or not account:
            return
        for obj in self.hook.list_inference_services(label_selector=f"{m.MANAGED_LABEL}=true"):
            if (
                obj["metadata"]["name"] != deleted
                and (obj["spec"].get("predictor") or {}).get("serviceAccountName") == account
            ):
                return
        if _ours(self.hook.read_service_account(account)):
            self.hook.delete_service_account(account)
        if _ours(self.hook.read_secret(s.storage_secret)):
            self.hook.delete_secret(s.storage_secret)
