"""serving/agent_api.py: the agent's control API routes and answers, the request handler driven
in-process (no socket, no agent process) against a recording stand-in agent."""

from __future__ import annotations

import http.client
import io
import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_modeldeploy.serving import agent_api
from airflow_provider_modeldeploy.serving.agent_api import _Handler
from airflow_provider_modeldeploy.serving.server_processes import AgentError

UUID = "a9e17000-0000-4000-8000-000000000001"


class StandInAgent:
    agent_id, auto, advertise_url, services = "agent-1", False, None, {"x": 1}
    state_dir = Path("/var/lib/agent-1")

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.forkserver_ready = threading.Event()
        self.last_request = 0.0

    def list(self, installation: str | None) -> dict[str, Any]:
        self.calls.append(("list", installation))
        return {"services": []}

    def deploy(self, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("deploy", body))
        if body.get("port_range") == "full":
            raise AgentError("port_range='full': no free port", 409, "port_range", "full")
        return {"service": {"uuid": body.get("uuid")}}

    def status(self, uuid: str) -> dict[str, Any]:
        self.calls.append(("status", uuid))
        raise AgentError(f"uuid={uuid!r}: no such service", 404, "uuid", uuid)

    def activate(self, uuid: str, previous: str | None, drain: float) -> dict[str, Any]:
        self.calls.append(("activate", uuid, previous, drain))
        return {"service": {"uuid": uuid}}

    def stop(self, uuid: str, timeout: float, force: bool) -> dict[str, Any]:
        self.calls.append(("stop", uuid, timeout, force))
        return {"service": {"uuid": uuid}}

    def delete(self, uuid: str, force: bool) -> dict[str, Any]:
        self.calls.append(("delete", uuid, force))
        if uuid == "boom":
            raise RuntimeError("disk full")
        return {"deleted": uuid}

    def logs(self, uuid: str, tail: int | None, follow: bool) -> Any:
        self.calls.append(("logs", uuid, tail, follow))
        return iter(["first", "second"])

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))


@pytest.fixture
def agent() -> StandInAgent:
    return StandInAgent()


def call(agent: StandInAgent, method: str, path: str, body: Any = None, *, token: str | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One request through the handler, as the server would dispatch it; (status, headers, body)."""
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    handler = _Handler.__new__(_Handler)
    handler.server = SimpleNamespace(agent=agent, token=token)
    message = http.client.HTTPMessage()
    for key, value in {**({"Content-Length": str(len(raw))} if raw else {}), **(headers or {})}.items():
        message[key] = value
    handler.headers = message
    handler.rfile, handler.wfile = io.BytesIO(raw), io.BytesIO()
    handler.command, handler.path, handler.request_version = method, path, "HTTP/1.0"
    handler.requestline, handler.client_address = f"{method} {path} HTTP/1.0", ("unix", 0)
    handler._dispatch(method)
    head, _, content = handler.wfile.getvalue().partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    return status, dict(line.split(": ", 1) for line in lines[1:]), content


def json_call(agent: StandInAgent, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
    status, headers, content = call(agent, method, path, body, **kwargs)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(content)


def test_health_says_who_the_agent_is(agent: StandInAgent) -> None:
    status, body = json_call(agent, "GET", "/v1/health")
    assert status == 200 and body["agent_id"] == "agent-1" and body["api"] == "v1" and body["services"] == 1
    assert body["stamp"] == agent_api.code_stamp() and body["forkserver_ready"] is False
    # Which records it keeps, as a stamp a client compares with its own, never the path itself.
    assert body["state"] == agent_api.state_stamp(Path("/var/lib/agent-1")) and "/var/lib" not in json.dumps(body)
    assert agent.last_request > 0  # every request counts against the idle timeout


def test_routes_reach_the_agent_with_their_arguments(agent: StandInAgent) -> None:
    assert json_call(agent, "GET", "/v1/services?installation=reg-1")[0] == 200
    assert json_call(agent, "POST", "/v1/services", {"uuid": UUID})[0] == 200
    assert (
        json_call(agent, "POST", f"/v1/services/{UUID}/activate", {"previous_uuid": "p", "drain_timeout": 5})[0] == 200
    )
    assert json_call(agent, "POST", f"/v1/services/{UUID}/activate")[0] == 200  # default drain
    assert json_call(agent, "POST", f"/v1/services/{UUID}/stop", {"timeout": 3, "force": True})[0] == 200
    assert json_call(agent, "DELETE", f"/v1/services/{UUID}?force=1")[0] == 200
    assert json_call(agent, "DELETE", f"/v1/services/{UUID}")[0] == 200
    assert json_call(agent, "POST", "/v1/shutdown") == (200, {"stopping": True})
    assert agent.calls == [
        ("list", "reg-1"),
        ("deploy", {"uuid": UUID}),
        ("activate", UUID, "p", 5.0),
        ("activate", UUID, None, 30.0),
        ("stop", UUID, 3.0, True),
        ("delete", UUID, True),
        ("delete", UUID, False),
        ("shutdown",),
    ]


def test_the_agents_refusals_carry_status_field_and_value(agent: StandInAgent) -> None:
    assert json_call(agent, "GET", f"/v1/services/{UUID}") == (
        404, {"error": f"uuid={UUID!r}: no such service", "field": "uuid", "value": UUID},
    )  # fmt: skip
    status, body = json_call(agent, "POST", "/v1/services", {"port_range": "full"})
    assert status == 409 and body["field"] == "port_range"


def test_an_unexpected_failure_is_a_500_naming_it(agent: StandInAgent) -> None:
    assert json_call(agent, "DELETE", "/v1/services/boom") == (500, {"error": "RuntimeError: disk full"})


@pytest.mark.parametrize(
    ("method", "path", "status", "says"),
    [
        ("GET", "/v2/health", 404, "unknown API version"),
        ("GET", "/health", 404, "unknown API version"),
        ("GET", "/v1/services/x/restart", 404, "no such route"),
        ("POST", "/v1/health", 404, "no such route"),
    ],
)
def test_unknown_routes(agent: StandInAgent, method: str, path: str, status: int, says: str) -> None:
    answer = json_call(agent, method, path)
    assert answer[0] == status and says in answer[1]["error"] and agent.calls == []


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "the request body is not JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        ({"timeout": -1}, 400, "timeout=-1: must be a non-negative number of seconds"),
        ({"timeout": "10"}, 400, "timeout='10': must be a non-negative number"),
        ({"timeout": True}, 400, "timeout=True"),
    ],
)
def test_bad_bodies_are_refused_before_the_agent_acts(agent: StandInAgent, body: Any, status: int, says: str) -> None:
    answer = json_call(agent, "POST", f"/v1/services/{UUID}/stop", body)
    assert answer[0] == status and says in answer[1]["error"] and agent.calls == []


def test_a_body_over_one_mebibyte_is_refused_unread(agent: StandInAgent) -> None:
    status, body = json_call(agent, "POST", "/v1/services", headers={"Content-Length": str(2 << 20)})
    assert status == 413 and "larger than 1 MiB" in body["error"] and agent.calls == []


def test_tcp_requests_need_the_token(agent: StandInAgent) -> None:
    assert json_call(agent, "GET", "/v1/services", token="s3cret-token")[0] == 401
    wrong = {"Authorization": "Bearer s3cret-tokeN"}
    assert json_call(agent, "GET", "/v1/services", token="s3cret-token", headers=wrong)[0] == 401
    assert agent.calls == []
    right = {"Authorization": "Bearer s3cret-token"}
    assert json_call(agent, "GET", "/v1/services", token="s3cret-token", headers=right)[0] == 200


def test_logs_stream_as_text_and_check_tail(agent: StandInAgent) -> None:
    status, headers, content = call(agent, "GET", f"/v1/services/{UUID}/logs?tail=2&follow=1")
    assert status == 200 and headers["Content-Type"].startswith("text/plain") and content == b"first\nsecond\n"
    assert agent.calls == [("logs", UUID, 2, True)]
    status, body = json_call(agent, "GET", f"/v1/services/{UUID}/logs?tail=-3")
    assert status == 400 and body["field"] == "tail" and len(agent.calls) == 1


def test_the_code_stamp_is_stable_and_names_this_code() -> None:
    assert agent_api.code_stamp() == agent_api.code_stamp() and len(agent_api.code_stamp()) == 16
    assert agent_api.socket_path(Path("/run/md")).as_posix() == "/run/md/agent.sock"
