"""health.py: one health verdict for every backend, over httpx.MockTransport (no server)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from airflow_provider_modeldeploy.health import acheck_health, check_health, is_final


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """httpx clients answer from ``box``: the health status, the prediction answer, what was sent."""
    box: dict[str, Any] = {"health": 200, "predict": (200, "[0, 2]"), "sent": []}

    def handler(request: httpx.Request) -> httpx.Response:
        box["sent"].append((request.method, str(request.url), request.headers.get("content-type"), request.read()))
        if box["health"] is None:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/health":
            return httpx.Response(box["health"])
        return httpx.Response(box["predict"][0], text=box["predict"][1])

    real_client, real_async = httpx.Client, httpx.AsyncClient
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(handler), **kw))
    monkeypatch.setattr(httpx, "AsyncClient", lambda **kw: real_async(transport=httpx.MockTransport(handler), **kw))
    return box


def both(*args: Any) -> tuple[bool, str]:
    sync = check_health(*args)
    assert asyncio.run(acheck_health(*args)) == sync  # the trigger's check is the same check
    return sync


def test_healthy_with_the_sample_prediction(server: dict[str, Any]) -> None:
    ok, reason = both("http://m/health", "http://m/invocations", {"inputs": [[1, 2]]})
    assert ok and reason == "healthy; sample prediction: [0, 2]"
    method, url, content_type, body = server["sent"][1]
    assert (method, url, content_type) == ("POST", "http://m/invocations", "application/json")
    assert json.loads(body) == {"inputs": [[1, 2]]}


def test_a_string_sample_is_sent_as_is(server: dict[str, Any]) -> None:
    both("http://m/health", "http://m/invocations", '{"inputs": [[1]]}')
    assert server["sent"][1][3] == b'{"inputs": [[1]]}'


def test_health_alone_without_a_sample(server: dict[str, Any]) -> None:
    assert both("http://m/health") == (True, "healthy")
    assert [s[0] for s in server["sent"]] == ["GET", "GET"]  # sync then async: no prediction sent


def test_unhealthy_verdicts(server: dict[str, Any]) -> None:
    server["health"] = 503
    assert both("http://m/health", "http://m/invocations", {"x": 1}) == (False, "health answered HTTP 503")
    assert all(s[0] == "GET" for s in server["sent"])  # no sample sent to a server that is not up
    server["health"], server["predict"] = 200, (422, "wrong columns")
    assert both("http://m/health", "http://m/invocations", {"x": 1}) == (
        False, "sample prediction answered HTTP 422: wrong columns",
    )  # fmt: skip
    server["health"] = None
    ok, reason = both("http://m/health")
    assert not ok and reason == "http://m/health: ConnectError: connection refused"


@pytest.mark.parametrize(
    ("reason", "final"),
    [
        ("sample prediction answered HTTP 400: bad json", True),
        ("sample prediction answered HTTP 422: wrong columns", True),
        ("sample prediction answered HTTP 415: content type", True),
        ("sample prediction answered HTTP 404: not yet routed", False),
        ("sample prediction answered HTTP 408: timeout", False),
        ("sample prediction answered HTTP 429: busy", False),
        ("sample prediction answered HTTP 503: loading", False),
        ("health answered HTTP 400", False),  # health itself: the server may still be starting
        ("http://m/health: ConnectError: refused", False),
    ],
)
def test_only_a_refused_sample_is_final(reason: str, final: bool) -> None:
    assert is_final(reason) is final
