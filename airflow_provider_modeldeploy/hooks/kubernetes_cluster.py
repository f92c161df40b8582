"""Cluster access shared by the Kubernetes backends' hooks: the cncf-kubernetes ``KubernetesHook``
reading the backend connection's extras, and one way to make every API call (a timeout on each, and
retries of what a retry can fix: 429, 5xx, a dropped connection; never a 4xx verdict)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from airflow.sdk import BaseHook

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
            from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

            hook = KubernetesHook(conn_id=None)
            # KubernetesHook would look the connection up by id and insist on its own type; hand it
            # this connection's extras instead, which it reads exactly as it reads its own.
            hook.__dict__["conn_extras"] = self.extras
            self._k8s = hook
        return self._k8s

    def get_conn(self) -> Any:
        """The kubernetes ``ApiClient``."""
        return self.kubernetes_hook().api_client

    def core_v1(self) -> Any:
        return self.kubernetes_hook().core_v1_client

    def custom_objects(self) -> Any:
        from kubernetes import client

        return client.CustomObjectsApi(self.get_conn())

    def call(self, fn: Callable[..., T], *args: Any, stream: bool = False, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` with a request timeout, retried (backing off) on what may pass."""
        from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

        kwargs.setdefault("_request_timeout", (REQUEST_TIMEOUT[0], None) if stream else REQUEST_TIMEOUT)

        @retry(retry=retry_if_exception(_retryable), stop=stop_after_attempt(RETRIES),
               wait=wait_exponential(0.2, max=3), reraise=True)  # fmt: skip
        def attempt() -> T:
            return fn(*args, **kwargs)

        return attempt()
