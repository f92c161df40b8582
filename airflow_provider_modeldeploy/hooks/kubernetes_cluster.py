"""Cluster access shared by the Kubernetes backends' hooks: the cncf-kubernetes ``KubernetesHook``
reading the backend connection's extras, and one way to make every API call (a timeout on each, and
retries of what a retry can fix: 429, 5xx, a dropped connection; never a 4xx verdict)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from airflow.sdk import BaseHook

from airflow_provider_modeldeploy.crd_schema import FIELD_VALIDATION

log = logging.getLogger(__name__)
T = TypeVar("T")
#: (connect, read) seconds of each API call; streams (``logs -f``) have no read timeout.
REQUEST_TIMEOUT = (10, 60)
RETRIES = 4


def _retryable(exc: BaseException) -> bool:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(exc, ApiException):
        return exc.status in (429, 500, 502, 503, 504) or exc.status == 0
    return isinstance(exc, Urllib3Error | ConnectionError | TimeoutError)


def api_message(exc: Any) -> str:
    """The message of a Kubernetes ``Status`` answer (the reason phrase when there is none)."""
    import json

    try:
        return json.loads(exc.body).get("message") or exc.reason
    except (TypeError, ValueError, AttributeError):
        return str(getattr(exc, "reason", exc))


class KubernetesClusterHook(BaseHook):
    """Kubernetes API access from a model-deploy connection that carries KubernetesHook's extras.

    :param conn_id: the Airflow connection id.
    :param connection: the connection when the caller already looked it up.
    """

    conn_name_attr = "conn_id"

    def __init__(self, conn_id: str | None = None, connection: Any = None) -> None:
        super().__init__()
        self.conn_id = conn_id
        self._connection = connection
        self._k8s: Any = None
        self._settings: Any = None

    @property
    def connection(self) -> Any:
        if self._connection is None:
            self._connection = self.get_connection(self.conn_id)
        return self._connection

    @property
    def extras(self) -> dict[str, Any]:
        conn = self.connection
        return dict(conn.extra_dejson) if hasattr(conn, "extra_dejson") else {}

    def kubernetes_hook(self) -> Any:
        """The cncf-kubernetes hook on the same connection (kubeconfig / context / in-cluster)."""
        if self._k8s is None:
            self._k8s = _kubernetes_hook_class()(self.connection)
        return self._k8s

    def get_conn(self) -> Any:
        """The kubernetes ``ApiClient``."""
        return self.kubernetes_hook().api_client

    def core_v1(self) -> Any:
        return self.kubernetes_hook().core_v1_client

    def custom_objects(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.get_conn())

    # -- custom objects (group, version, plural), in the connection's namespace ----------------------

    def _custom(self, crd: tuple[str, str, str], method: str, *args: Any, **kwargs: Any) -> Any:
        group, version, plural = crd
        api = self.custom_objects()
        return self.call(getattr(api, method), group, version, self.namespace, plural, *args, **kwargs)

    def get_object(self, crd: tuple[str, str, str], name: str) -> dict[str, Any] | None:
        """The object, or None when there is none of this name."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self._custom(crd, "get_namespaced_custom_object", name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create_object(self, crd: tuple[str, str, str], body: dict[str, Any]) -> dict[str, Any]:
        # Strict: a field the CRD does not declare is a 400, not silently dropped (crd_schema.py).
        return self._custom(crd, "create_namespaced_custom_object", body, field_validation=FIELD_VALIDATION)

    def patch_object(
        self, crd: tuple[str, str, str], name: str, patch: Any, json_patch: bool = False
    ) -> dict[str, Any]:
        """A merge patch (a dict), or an RFC 6902 JSON patch (a list of operations) with ``json_patch``."""
        kwargs = {"_content_type": "application/json-patch+json"} if json_patch else {}
        return self._custom(crd, "patch_namespaced_custom_object", name, patch,
                            field_validation=FIELD_VALIDATION, **kwargs)  # fmt: skip

    def delete_object(self, crd: tuple[str, str, str], name: str) -> None:
        """Deleted, or already gone."""
        from kubernetes.client.exceptions import ApiException

        try:
            self._custom(crd, "delete_namespaced_custom_object", name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def list_objects(
        self, crd: tuple[str, str, str], label_selector: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        kwargs: dict[str, Any] = {"label_selector": label_selector} if label_selector else {}
        if limit is not None:
            kwargs["limit"] = limit
        return self._custom(crd, "list_namespaced_custom_object", **kwargs).get("items", [])

    # -- pods, logs, secrets, service accounts ---------------------------------------------------

    def list_pods(self, label_selector: str) -> list[Any]:
        """The namespace's pods matching the selector, by name."""
        pods = self.call(self.core_v1().list_namespaced_pod, self.namespace, label_selector=label_selector)
        return sorted(pods.items, key=lambda pod: pod.metadata.name)

    def read_pod_log(self, pod: str, container: str, tail: int | None = None, previous: bool = False) -> str:
        """The container's log (``previous``: of its instance before the last restart)."""
        kwargs: dict[str, Any] = {"tail_lines": tail} if tail is not None else {}
        if previous:
            kwargs["previous"] = True
        return self.call(self.core_v1().read_namespaced_pod_log, pod, self.namespace, container=container, **kwargs)

    def stream_pod_log(self, pod: str, container: str, tail: int) -> Any:
        """An open ``follow=true`` log response (read it with ``kubernetes.watch.watch.iter_resp_lines``)."""
        return self.call(self.core_v1().read_namespaced_pod_log, pod, self.namespace, container=container,
                         follow=True, tail_lines=tail, _preload_content=False, stream=True)  # fmt: skip

    def _read_core(self, method: str, name: str) -> Any | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.call(getattr(self.core_v1(), method), name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def read_secret(self, name: str) -> Any | None:
        return self._read_core("read_namespaced_secret", name)

    def create_secret(self, body: Any) -> Any:
        return self.call(self.core_v1().create_namespaced_secret, self.namespace, body)

    def delete_secret(self, name: str) -> None:
        self.call(self.core_v1().delete_namespaced_secret, name, self.namespace)

    def read_service_account(self, name: str) -> Any | None:
        return self._read_core("read_namespaced_service_account", name)

    def create_service_account(self, body: Any) -> Any:
        return self.call(self.core_v1().create_namespaced_service_account, self.namespace, body)

    def delete_service_account(self, name: str) -> None:
        self.call(self.core_v1().delete_namespaced_service_account, name, self.namespace)

    def get_settings(self) -> Any:
        """The backend's settings from the connection's extras, checked; they hold ``namespace``."""
        raise NotImplementedError

    @property
    def settings(self) -> Any:
        """``get_settings()``, checked once per hook: the deployer and every call read this one copy."""
        if self._settings is None:
            self._settings = self.get_settings()
        return self._settings

    @property
    def namespace(self) -> str:
        """The namespace of every call: the connection's, as the backend hook's settings check it."""
        return self.settings.namespace

    def call(self, fn: Callable[..., T], *args: Any, stream: bool = False, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` with a request timeout, retried (backing off) on what may pass."""
        from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

        kwargs.setdefault("_request_timeout", (REQUEST_TIMEOUT[0], None) if stream else REQUEST_TIMEOUT)

        @retry(retry=retry_if_exception(_retryable), stop=stop_after_attempt(RETRIES),
               wait=wait_exponential(0.2, max=3), reraise=True)  # fmt: skip
        def attempt() -> T:
            return fn(*args, **kwargs)

        return attempt()


@functools.cache
def _kubernetes_hook_class() -> type:
    """KubernetesHook reading the extras of a connection already looked up.

    KubernetesHook reads its extras from ``get_connection(conn_id)``; a deploy may hold a connection
    no secrets backend can return (handed in by the caller), so this subclass answers
    ``conn_extras`` from that connection, which KubernetesHook then reads as it reads its own.
    """
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    class ConnectionKubernetesHook(KubernetesHook):
        def __init__(self, connection: Any) -> None:
            super().__init__(conn_id=getattr(connection, "conn_id", None))
            self._modeldeploy_connection = connection

        @functools.cached_property
        def conn_extras(self) -> dict[str, Any]:
            conn = self._modeldeploy_connection
            return dict(conn.extra_dejson) if hasattr(conn, "extra_dejson") else {}

    return ConnectionKubernetesHook
