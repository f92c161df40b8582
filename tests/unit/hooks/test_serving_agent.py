"""hooks/serving_agent.py: the agent client against httpx.MockTransport (no agent, no socket): the
requests each call sends, and how each kind of answer becomes the provider's error."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from airflow_provider_modeldeploy.exceptions import (
    AgentUnreachableError,
    DeploymentFailedError,
    InvalidParameterError,
    ServiceNotFoundError,
)
from airflow_provider_modeldeploy.hooks.serving_agent import AgentClient, agent_token

UUID = "0b0e5a9c-1111-4000-8000-000000000001"
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def seen() -> list[httpx.Request]:
    return []


def client(monkeypatch: pytest.MonkeyPatch, handler: Handler, seen: list[httpx.Request], **kwargs: Any) -> AgentClient:
    agent = AgentClient(kwargs.pop("url", "http://serving:7400"), **kwargs)

    def recording(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return handler(request)

    real = agent._client

    def mocked(timeout: float) -> httpx.Client:
        made = real(timeout)  # the client the agent would use (base URL, headers, timeouts) ...
        made._transport = httpx.MockTransport(recording)  # ... with no network behind it
        return made

    monkeypatch.setattr(agent, "_client", mocked)
    return agent


def answer(status: int, body: Any) -> Handler:
    return lambda request: httpx.Response(status, json=body)


def test_calls_send_the_documented_routes_and_bodies(monkeypatch: pytest.MonkeyPatch, seen: list) -> None:
    agent = client(monkeypatch, answer(200, {"service": {"uuid": UUID}, "services": []}), seen, token="T0k-en")
    agent.deploy({"uuid": UUID, "model_uri": "models:/iris/1"}, timeout=30)
    agent.activate(UUID, previous_uuid="prev", drain_timeout=5)
    agent.stop(UUID, timeout=10, force=True)
    agent.delete(UUID, force=False)
    assert agent.status(UUID) == {"uuid": UUID}
    assert agent.list(installation="reg-1") == []
    sent = [(r.method, r.url.path, r.url.query.decode(), json.loads(r.content) if r.content else None) for r in seen]
    assert sent == [
        ("POST", "/v1/services", "", {"uuid": UUID, "model_uri": "models:/iris/1"}),
        ("POST", f"/v1/services/{UUID}/activate", "", {"previous_uuid": "prev", "drain_timeout": 5}),
        ("POST", f"/v1/services/{UUID}/stop", "", {"timeout": 10, "force": True}),
        ("DELETE", f"/v1/services/{UUID}", "force=0", None),
        ("GET", f"/v1/services/{UUID}", "", None),
        ("GET", "/v1/services", "installation=reg-1", None),
    ]
    assert all(r.headers["authorization"] == "Bearer T0k-en" for r in seen)
    assert all(str(r.url).startswith("http://serving:7400/v1/") for r in seen)


def test_no_token_no_authorization_header(monkeypatch: pytest.MonkeyPatch, seen: list) -> None:
    client(monkeypatch, answer(200, {"agent_id": "a"}), seen).health()
    assert "authorization" not in seen[0].headers


def test_a_refused_token_is_unreachable_naming_the_setting(monkeypatch: pytest.MonkeyPatch, seen: list) -> None:
    agent = client(monkeypatch, answer(401, {"error": "a valid agent token is required"}), seen, host="serving")
    with pytest.raises(AgentUnreachableError) as info:
        agent.stop(UUID, timeout=1, force=False)
    assert (
        "agent_token" in str(info.value) and "'serving'" in str(info.value) and "nothing was changed" in str(info.value)
    )


def test_an_unknown_service_is_not_found(monkeypatch: pytest.MonkeyPatch, seen: list) -> None:
    body = {"error": f"uuid='{UUID}': the agent runs no such service", "field": "uuid", "value": UUID}
    with pytest.raises(ServiceNotFoundError) as info:
        client(monkeypatch, answer(404, body), seen).status(UUID)
    assert info.value.field == "uuid" and info.value.value == UUID
    assert str(info.value) == f"uuid='{UUID}': the agent runs no such service"


def test_a_full_port_range_is_an_invalid_parameter(monkeypatch: pytest.MonkeyPatch, seen: list) -> None:
    body = {"error": "port_range='6000-6001': no free port on 127.0.0.1", "field": "port_range", "value": "6000-6001"}
    with pytest.raises(InvalidParameterError) as info:
        client(monkeypatch, answer(409, body), seen).deploy({}, timeout=1)
    assert info.value.field == "port_range" and info.value.reason == "no free port on 127.0.0.1"


def test_the_agents_own_error_is_a_failed_deployment(monkeypatch: pytest.MonkeyPatch, seen: list) -> None:
    body = {"error": "the server exited: model weights are corrupted", "field": None, "value": None}
    with pytest.raises(DeploymentFailedError, match="model weights are corrupted"):
        client(monkeypatch, answer(500, body), seen).deploy({}, timeout=1)


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(502, text="<html>Bad Gateway</html>"),  # a proxy's answer, not the agent's
        httpx.Response(503, json={"error": "overloaded"}),
        httpx.Response(504, text="upstream timed out"),
    ],
)
def test_answers_that_are_not_the_agents_are_unreachable(
    monkeypatch: pytest.MonkeyPatch, seen: list, response: httpx.Response
) -> None:
    with pytest.raises(AgentUnreachableError, match="HTTP 50"):
        client(monkeypatch, lambda request: response, seen).list()


def test_connection_failures_are_retried_then_unreachable(monkeypatch: pytest.MonkeyPatch, seen: list) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(AgentUnreachableError, match="connection refused"):
        client(monkeypatch, refuse, seen).request("GET", "/health", attempts=3)
    assert len(seen) == 3


def test_a_connection_failure_then_an_answer_succeeds(monkeypatch: pytest.MonkeyPatch, seen: list) -> None:
    def flaky(request: httpx.Request) -> httpx.Response:
        if len(seen) == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"agent_id": "a1"})

    assert client(monkeypatch, flaky, seen).health()["agent_id"] == "a1" and len(seen) == 2


def test_a_timeout_is_not_retried(monkeypatch: pytest.MonkeyPatch, seen: list) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(AgentUnreachableError, match="no answer to POST /services/x/stop within 40s"):
        client(monkeypatch, slow, seen).stop("x", timeout=10, force=False)
    assert len(seen) == 1  # the agent may be acting on it: never sent twice


def test_logs_stream_lines_and_raise_the_agents_error(monkeypatch: pytest.MonkeyPatch, seen: list) -> None:
    lines = client(monkeypatch, lambda r: httpx.Response(200, text="one\ntwo\n"), seen).logs(UUID, tail=2, follow=False)
    assert list(lines) == ["one", "two"] and seen[0].url.query.decode() == "follow=0&tail=2"
    missing = {"error": "uuid='x': no such service", "field": "uuid", "value": "x"}
    with pytest.raises(ServiceNotFoundError):
        list(client(monkeypatch, answer(404, missing), []).logs("x", tail=None, follow=True))


def test_a_unix_url_talks_over_that_socket() -> None:
    made = AgentClient("unix:///run/md/agent.sock")._client(5)
    try:
        assert str(made.base_url) == "http://agent" and made._transport._pool._uds == "/run/md/agent.sock"
    finally:
        made.close()


def test_agent_token_prefers_the_connection_then_the_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    assert agent_token() is None
    monkeypatch.setenv("AIRFLOW__MODELDEPLOY__AGENT_TOKEN", "from-config")
    assert agent_token() == "from-config" and agent_token({"agent_token": "from-conn"}) == "from-conn"
    assert agent_token({"agent_token": ""}) == "from-config"
