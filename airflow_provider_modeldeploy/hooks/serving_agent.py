"""The client of a serving agent (``serving/agent_api.py``): every call the local MLflow backend makes
to the host that runs its model servers, with timeouts and retries.

An agent is addressed by URL: ``unix:///run/dir/agent.sock`` on this host, or ``http://host:port``
(its TCP listener, with a shared token) from any host. Without configuration the local agent is used,
and started on first use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from airflow_provider_modeldeploy import config
from airflow_provider_modeldeploy.exceptions import (
    AgentUnreachableError,
    DeploymentFailedError,
    InvalidParameterError,
    ServiceNotFoundError,
)

log = logging.getLogger(__name__)

UNIX_PREFIX = "unix://"
#: Environment an agent started on first use does not inherit: Airflow's settings (its secrets among
#: them) and tracking credentials, which reach each server with its own request only.
_NOT_INHERITED = (
    "AIRFLOW",
    "_AIRFLOW",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


class AgentClient:
    """Talks to one serving agent.

    :param url: ``unix:///path/agent.sock`` or ``http(s)://host:port``.
    :param token: the agent's shared token (TCP only).
    :param host: the agent's host name, when known, for error messages.
    """

    def __init__(self, url: str, token: str | None = None, host: str | None = None) -> None:
        self.url, self.token, self.host = url, token, host

    def __repr__(self) -> str:
        return f"AgentClient({self.url!r})"

    def _client(self, timeout: float) -> Any:
        import httpx

        from airflow_provider_modeldeploy.hooks.tls import default_tls

        limits = httpx.Timeout(timeout, connect=3.0)
        if self.url.startswith(UNIX_PREFIX):
            transport = httpx.HTTPTransport(uds=self.url[len(UNIX_PREFIX) :], verify=default_tls())
            return httpx.Client(transport=transport, base_url="http://agent", timeout=limits)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url.rstrip("/"), timeout=limits, headers=headers, verify=default_tls())

    def _unreachable(self, reason: str) -> AgentUnreachableError:
        return AgentUnreachableError(self.host, self.url, reason)

    def request(self, method: str, path: str, *, body: dict | None = None, params: dict | None = None,
                timeout: float = 30.0, attempts: int = 3) -> dict[str, Any]:  # fmt: skip
        """One API call; the agent's JSON answer. Connection failures are retried briefly (nothing was
        done then); an answer that is an error is raised as the provider's error for it."""
        import httpx
        from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_fixed

        @retry(retry=retry_if_exception_type(httpx.ConnectError), stop=stop_after_attempt(attempts),
               wait=wait_fixed(0.3), reraise=True)  # fmt: skip
        def call() -> httpx.Response:
            with self._client(timeout) as client:
                return client.request(method, f"/v1{path}", json=body, params=params)

        try:
            answer = call()
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._unreachable(str(exc) or type(exc).__name__) from None
        except httpx.TimeoutException:
            raise self._unreachable(f"no answer to {method} {path} within {timeout:.0f}s") from None
        except httpx.HTTPError as exc:
            raise self._unreachable(f"{type(exc).__name__}: {exc}") from None
        return self._result(answer)

    def _result(self, answer: Any) -> dict[str, Any]:
        try:
            data = answer.json()
        except ValueError:
            data = {"error": answer.text[:300]}
        if answer.status_code < 400:
            return data
        message, field = str(data.get("error") or answer.status_code), data.get("field")
        if answer.status_code == 401:
            raise self._unreachable("it refused this host's token: set the same [modeldeploy] agent_token on both")
        if answer.status_code == 404 and field == "uuid":
            raise ServiceNotFoundError("uuid", data.get("value"), message.split(": ", 1)[-1])
        invalid = field in ("host", "port_range", "uuid", "tail") and answer.status_code in (400, 409, 422)
        if invalid and message.startswith(f"{field}="):
            raise InvalidParameterError(field, data.get("value"), message.split(": ", 1)[-1])
        if "error" not in data or answer.status_code in (502, 503, 504):  # not the agent's own answer
            raise self._unreachable(f"HTTP {answer.status_code}: {message}")
        raise DeploymentFailedError(message)

    # -- the API ---------------------------------------------------------------------------------

    def health(self, timeout: float = 5.0, attempts: int = 3) -> dict[str, Any]:
        return self.request("GET", "/health", timeout=timeout, attempts=attempts)

    def deploy(self, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        return self.request("POST", "/services", body=spec, timeout=timeout + 30)

    def activate(self, uuid: str, previous_uuid: str | None, drain_timeout: float) -> dict[str, Any]:
        body = {"previous_uuid": previous_uuid, "drain_timeout": drain_timeout}
        return self.request("POST", f"/services/{uuid}/activate", body=body, timeout=drain_timeout + 60)

    def stop(self, uuid: str, timeout: float, force: bool) -> dict[str, Any]:
        body = {"timeout": timeout, "force": force}
        return self.request("POST", f"/services/{uuid}/stop", body=body, timeout=timeout + 30)

    def delete(self, uuid: str, force: bool) -> dict[str, Any]:
        return self.request("DELETE", f"/services/{uuid}", params={"force": int(force)}, timeout=60)

    def status(self, uuid: str) -> dict[str, Any]:
        return self.request("GET", f"/services/{uuid}", timeout=10)["service"]

    def list(self, installation: str | None = None) -> list[dict[str, Any]]:
        params = {"installation": installation} if installation else None
        return self.request("GET", "/services", params=params, timeout=10)["services"]

    def logs(self, uuid: str, tail: int | None, follow: bool) -> Iterator[str]:
        import httpx

        params: dict[str, Any] = {"follow": int(follow)}
        if tail is not None:
            params["tail"] = tail
        try:
            with (
                self._client(None if follow else 30) as client,  # type: ignore[arg-type]
                client.stream("GET", f"/v1/services/{uuid}/logs", params=params) as answer,
            ):
                if answer.status_code >= 400:
                    answer.read()
                    self._result(answer)
                yield from answer.iter_lines()
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._unreachable(str(exc)) from None

    def shutdown(self) -> None:
        self.request("POST", "/shutdown", timeout=10)

    def metrics(self, uuid: str, start: float, end: float) -> dict[str, Any]:
        """The agent's per-minute figures of a service between two Unix times (``metrics_store.py``)."""
        return self.request("GET", f"/services/{uuid}/metrics", params={"start": start, "end": end}, timeout=15)

    def sample_metrics(self) -> int:
        """Have the agent read every active server's /metrics now; how many it read."""
        return int(self.request("POST", "/metrics/sample", timeout=60).get("sampled", 0))


def agent_token(extra: dict[str, Any] | None = None) -> str | None:
    """The shared token of agents' TCP listeners: the connection's ``agent_token`` extra, else
    ``[modeldeploy] agent_token``."""
    return (extra or {}).get("agent_token") or config.get_option("agent_token") or None


def local_agent_url() -> str:
    from airflow_provider_modeldeploy.serving import agent_api

    return f"{UNIX_PREFIX}{agent_api.socket_path(config.runtime_dir())}"


def local_agent(start: bool = True) -> AgentClient:
    """The agent of this host (its unix socket), started on first use when ``start``.

    An agent started on first use that runs an older version of the provider is asked to exit (its
    servers keep serving) and a new one adopts its servers.
    """
    from airflow_provider_modeldeploy.serving import agent_api

    run_dir = config.runtime_dir()
    path = agent_api.socket_path(run_dir)
    client = AgentClient(f"{UNIX_PREFIX}{path}", host=agent_api.HOSTNAME)
    try:
        health = client.health(attempts=1 if start else 3)  # no agent yet: start one at once
        if not start or not health.get("auto") or health.get("stamp") == agent_api.code_stamp():
            return client
        if health.get("state") not in (None, agent_api.state_stamp(config.agent_state_dir())):
            # Another installation's agent on this socket (another AIRFLOW_HOME, the same user): an agent
            # started here would not know its servers, which would serve on with no agent. (None: an
            # agent from before this check, restarted as before.)
            log.warning(
                "The serving agent (pid %s) runs other code and keeps another installation's records: "
                "it is used as it is, not restarted", health.get("pid"),
            )  # fmt: skip
            return client
        log.info("Restarting the serving agent (pid %s): it runs an older provider", health.get("pid"))
        with contextlib.suppress(AgentUnreachableError):
            client.shutdown()
        _wait_gone(path)
    except AgentUnreachableError:
        if not start:
            raise
    if not start:
        return client
    _start_local_agent(run_dir)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.health(timeout=2, attempts=1)
            return client
        except AgentUnreachableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _wait_gone(path: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _start_local_agent(run_dir: Any) -> None:
    from airflow_provider_modeldeploy.serving import agent_api

    state = config.agent_state_dir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_INHERITED)}
    cmd = [
        sys.executable, "-m", agent_api.MODULE, "--state-dir", str(state), "--run-dir", str(run_dir),
        "--idle-timeout", str(config.agent_idle_timeout()), "--metrics-interval", str(config.metrics_interval()),
    ]  # fmt: skip
    fd = os.open(state / "agent.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, start_new_session=True, env=env, cwd="/")
    finally:
        os.close(fd)
