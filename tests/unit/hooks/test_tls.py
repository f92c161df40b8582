"""hooks/tls.py: the provider's HTTP clients share one TLS context per process. httpx would otherwise
load the CA bundle for every client (about 30 ms of CPU each), and the provider makes clients per
agent call, per health poll and per metrics sample."""

from __future__ import annotations

import ssl

import pytest

from airflow_provider_modeldeploy.health import check_health
from airflow_provider_modeldeploy.hooks.serving_agent import AgentClient
from airflow_provider_modeldeploy.hooks.tls import default_tls


def test_clients_share_one_context_loading_the_ca_bundle_once(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[object] = []
    real = ssl.SSLContext.load_verify_locations

    def counted(self: ssl.SSLContext, *args: object, **kwargs: object) -> None:
        loads.append(args or kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)
    default_tls.cache_clear()
    try:
        for url in ("unix:///nonexistent/agent.sock", "http://127.0.0.1:1"):
            for _ in range(3):
                AgentClient(url, token="t")._client(1.0).close()
        for _ in range(3):  # nothing listens on port 1: each check fails, after making its client
            healthy, _reason = check_health("http://127.0.0.1:1/health")
            assert not healthy
        assert len(loads) == 1, loads
    finally:
        default_tls.cache_clear()
