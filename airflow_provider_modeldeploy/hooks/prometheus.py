"""A small Prometheus HTTP API client (``/api/v1/query_range``) for the Kubernetes backends' metrics:
every call with timeouts and a few retries on connection failures; errors as the provider's."""

from __future__ import annotations

from typing import Any

from airflow_provider_modeldeploy.exceptions import ModelDeployError


class PrometheusError(ModelDeployError):
    """Prometheus did not answer, or refused the query."""


class PrometheusClient:
    """:param url: the Prometheus base URL (the connection's ``prometheus_url`` extra)."""

    def __init__(self, url: str, timeout: float = 10.0, attempts: int = 3, transport: Any = None) -> None:
        self.url, self.timeout, self.attempts, self.transport = url.rstrip("/"), timeout, attempts, transport

    def query_range(self, query: str, start: float, end: float, step: int) -> list[dict[str, Any]]:
        """The matrix ``[{"metric": {labels}, "values": [[unix time, "value"], ...]}, ...]``."""
        import httpx
        from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_fixed

        from airflow_provider_modeldeploy.hooks.tls import default_tls

        @retry(retry=retry_if_exception_type(httpx.TransportError), stop=stop_after_attempt(self.attempts),
               wait=wait_fixed(0.5), reraise=True)  # fmt: skip
        def call() -> httpx.Response:
            with httpx.Client(
                timeout=httpx.Timeout(self.timeout, connect=3.0), transport=self.transport, verify=default_tls()
            ) as client:
                return client.get(
                    f"{self.url}/api/v1/query_range", params={"query": query, "start": start, "end": end, "step": step}
                )

        try:
            answer = call()
        except httpx.HTTPError as exc:
            raise PrometheusError(f"prometheus_url={self.url!r}: no answer ({type(exc).__name__}: {exc})") from None
        try:
            data = answer.json()
        except ValueError:
            data = {}
        if answer.status_code != 200 or data.get("status") != "success":
            error = data.get("error") or answer.text[:200]
            raise PrometheusError(f"prometheus_url={self.url!r}: HTTP {answer.status_code}: {error}")
        return list((data.get("data") or {}).get("result") or [])
