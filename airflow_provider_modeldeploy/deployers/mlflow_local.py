"""The local MLflow backend (the embedded default): each service is a model-server process tree run by
the serving agent of its host (``serving/agent.py``).

This deployer is the agent's client: it decides (registry, leases, history, in ``base.py``) and the
agent acts. The registry records which agent runs each service, so that any host, any process
(a worker, the API server, the CLI) acts on the same server, and none of them ever loads a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from airflow_provider_modeldeploy.deployers.base import BaseModelDeployer, Launch
from airflow_provider_modeldeploy.exceptions import (
    AgentUnreachableError,
    DeploymentFailedError,
    InvalidParameterError,
    ModelDeployError,
    ServiceNotFoundError,
)
from airflow_provider_modeldeploy.hooks.mlflow_local import MlflowDeployerHook, MlflowServingSettings
from airflow_provider_modeldeploy.hooks.serving_agent import UNIX_PREFIX, AgentClient, local_agent, local_agent_url
from airflow_provider_modeldeploy.registry import EndpointLease, Registry
from airflow_provider_modeldeploy.registry.store import HOSTNAME, safe_url
from airflow_provider_modeldeploy.services import ServiceRecord, ServiceState

if TYPE_CHECKING:
    from airflow_provider_modeldeploy.metrics import ServiceMetrics

log = logging.getLogger(__name__)

#: What an agent's record of a server may give an adopted registry record; its state, host and
#: agent come from what runs now.
_ADOPTABLE_FIELDS = frozenset(ServiceRecord.__dataclass_fields__) - {
    "created_at", "updated_at", "state", "pid", "host", "agent_id", "agent_url", "last_error",
}  # fmt: skip


#: Backend options bounding what one client can cost a model server; the agent turns them into the
#: server's command-line arguments (absent: the server's defaults).
_SERVER_LIMITS = ("max_body_mb", "max_header_kb", "read_timeout", "keep_alive", "max_concurrent_requests")


class MLflowLocalDeployer(BaseModelDeployer):
    """Serves MLflow pyfunc models as local processes with MLflow's scoring protocol.

    Backend options (``ServiceConfig(..., **options)``): ``workers`` (processes sharing the socket),
    ``timeout`` (per-request seconds), ``port`` (pin the endpoint's port), ``smoke_input`` (a JSON
    body for the smoke prediction; default: the model's logged input example), ``fast_path``
    (default true: plain rows for a scikit-learn model with a column signature are answered without
    pandas, with the answers MLflow's app gives; false sends every request through MLflow's app),
    ``max_body_mb`` (default 32: larger request bodies get 413 before they are read), and against
    abusive clients ``max_header_kb`` (default 64: a larger request line and headers get 431),
    ``read_timeout`` (default 10: seconds a request's headers may take from their first byte, and its
    body may pause, else 408; and a client may stop reading its answer, else it is disconnected), ``keep_alive`` (default 5: seconds an idle connection, or one that
    never sent a byte, stays open) and ``max_concurrent_requests`` (default 64 per worker: more get
    503; idle connections do not count). ``metrics`` (default true: the server counts its prediction
    requests and serves ``GET /metrics``, see ``serving/metrics.py``; false, for comparisons).
    """

    backend = "mlflow"
    backend_options: ClassVar[dict[str, type | tuple[type, ...]]] = {
        "workers": int,
        "timeout": int,
        "port": int,
        "smoke_input": (str, dict, list),
        "fast_path": bool,
        "metrics": bool,
        "max_body_mb": int,
        "max_header_kb": int,
        "read_timeout": int,
        "keep_alive": int,
        "max_concurrent_requests": int,
    }

    def __init__(
        self,
        conn_id: str | None = None,
        registry: Registry | None = None,
        hook: MlflowDeployerHook | None = None,
    ) -> None:
        super().__init__(conn_id=conn_id, registry=registry)
        self.hook = hook or MlflowDeployerHook(conn_id=conn_id)
        self._settings: MlflowServingSettings | None = None
        self._unreachable: dict[str, AgentUnreachableError] = {}  # agent URL -> why, once per deployer

    @classmethod
    def from_connection(cls, conn_id: str, connection: Any) -> MLflowLocalDeployer:
        return cls(conn_id=conn_id, hook=MlflowDeployerHook(conn_id=conn_id, connection=connection))

    @property
    def settings(self) -> MlflowServingSettings:
        if self._settings is None:
            self._settings = self.hook.get_settings()
        return self._settings

    def _validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        clean = super()._validate_options(options)
        for key in ("workers", "timeout", *_SERVER_LIMITS):
            if key in clean and clean[key] < 1:
                raise InvalidParameterError(key, clean[key], "must be a positive integer")
        if "port" in clean and not 1 <= clean["port"] <= 65535:
            raise InvalidParameterError("port", clean["port"], "must be between 1 and 65535")
        if isinstance(clean.get("smoke_input"), str):
            try:
                json.loads(clean["smoke_input"])
            except ValueError as exc:
                raise InvalidParameterError("smoke_input", clean["smoke_input"], f"is not JSON ({exc})") from None
        public = self.settings.public()
        return {**public, **{k: v for k, v in clean.items()}}

    # -- which agent ------------------------------------------------------------------------------

    @property
    def installation(self) -> str:
        """This registry's id: an agent runs the servers of every installation on its host, and lists
        (for ``sync``) only those of the registry that asks."""
        return hashlib.sha256(safe_url(self.registry.url).encode()).hexdigest()[:16]

    def _client(self, url: str | None, host: str | None = None) -> AgentClient:
        if not url:
            return local_agent()
        if url.startswith(UNIX_PREFIX):
            if host and host != HOSTNAME:
                raise AgentUnreachableError(
                    host, url,
                    f"it listens only on a unix socket of host {host!r} and this is {HOSTNAME!r}; run it with a "
                    "TCP listener ('airflow served-models agent --listen ...') to act from other hosts",
                )  # fmt: skip
            return local_agent() if url == local_agent_url() else AgentClient(url, host=host)
        return AgentClient(url, token=self.settings.agent_token, host=host)

    def _agent_of(self, record: ServiceRecord) -> AgentClient:
        """The agent that runs ``record``'s server (the one the registry names), wherever we are."""
        url = record.agent_url or ("" if not record.host or record.host == HOSTNAME else None)
        if url is None:  # a row from before agents, of another host
            raise AgentUnreachableError(record.host, "unknown", "the registry names no serving agent for it")
        down = self._unreachable.get(url)
        if down is not None:
            raise down
        return self._client(url, record.host)

    def _call(self, record: ServiceRecord, action: Any) -> Any:
        """Run ``action(agent)`` on the record's agent; an unreachable agent is remembered (one wait per
        agent, not one per service, in a listing)."""
        agent = self._agent_of(record)
        try:
            return action(agent)
        except AgentUnreachableError as exc:
            self._unreachable[agent.url] = exc
            raise

    # -- lifecycle -------------------------------------------------------------------------------

    def _launch(
        self, record: ServiceRecord, lease: EndpointLease, previous: ServiceRecord | None, timeout: float
    ) -> Launch:
        opts = record.config
        if record.agent_url or (record.pid is not None and record.host):  # started again where it ran
            agent = self._agent_of(record)
        elif previous is not None and previous.state == ServiceState.ACTIVE and (previous.agent_url or previous.pid):
            agent = self._agent_of(previous)  # a replace: where the endpoint's socket is
        else:
            agent = self._client(lease.address.get("agent_url") or self.settings.agent_url)
        same_agent = previous is not None and previous.agent_url in (None, agent.url) and previous.pid is not None
        env = self.settings.server_env()
        if "timeout" in opts:
            env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(opts["timeout"])
        spec = {
            "uuid": record.uuid, "installation": self.installation, "registry_url": self.registry.url,
            "endpoint": record.endpoint, "model_name": record.model_name, "model_uri": record.model_uri,
            "options": {
                "workers": opts.get("workers", self.settings.workers), "fast_path": opts.get("fast_path", True),
                "metrics": opts.get("metrics", True), "smoke_input": opts.get("smoke_input"), **{key: opts.get(key) for key in _SERVER_LIMITS},
            },
            "env": env, "timeout": timeout, "record": record.to_dict(),
            "bind": {
                "host": lease.address.get("host") or self.settings.host,
                "port": lease.address.get("port") or opts.get("port"),
                "port_range": list(self.settings.port_range),
            },
            "previous_uuid": previous.uuid if same_agent and previous is not None else None,
        }  # fmt: skip
        # The registry names the agent before the server exists: whoever finds this service pending
        # (a deploying task killed midway) knows whom to ask to stop it.
        health = agent.health()
        agent_url = health.get("advertise_url") or agent.url
        self.registry.update_service(record.uuid, host=health["host"], agent_id=health["agent_id"], agent_url=agent_url)
        # ... and so does this record: if the deploy fails, it is what _discard and _forget ask that agent
        # about (the agent keeps the log of a server that failed to start until it is told to forget it).
        record.host, record.agent_id, record.agent_url = health["host"], health["agent_id"], agent_url
        answer = agent.deploy(spec, timeout)
        served = answer["service"]
        address = served["address"]
        self.registry.update_service(record.uuid, pid=served["pid"])
        info = served.get("info") or {}
        return Launch(
            pid=served["pid"], prediction_url=address["prediction_url"], health_url=address["health_url"],
            served_uri=info.get("served_uri"), model_version=info.get("model_version"),
            model_run_id=info.get("model_run_id"),
            inputs={"columns": info.get("input_columns"), "example": info.get("input_example")}
            if info.get("input_columns") or info.get("input_example") else None,
            address={"host": address["host"], "port": address["port"], "agent_url": agent_url},
            handle=(agent, same_agent),
        )  # fmt: skip

    def _promote(self, record: ServiceRecord, launch: Launch, previous: ServiceRecord | None, timeout: float) -> None:
        agent, same_agent = launch.handle
        handover = previous is not None and previous.uuid != record.uuid
        try:
            answer = agent.activate(
                record.uuid, previous.uuid if handover and same_agent else None, drain_timeout=min(timeout, 60)
            )
        except ModelDeployError as exc:
            # The answer may be what was lost: if the new server takes traffic, it stays (commit point).
            try:
                launch.committed = agent.status(record.uuid).get("phase") == "active"
            except ModelDeployError:
                launch.committed = False
            if not launch.committed:
                raise DeploymentFailedError(
                    f"uuid={record.uuid!r}: the new server could not be activated ({exc})"
                ) from None
            launch.warnings.append(f"activation answered with an error, but the new server serves: {exc}")
            return
        launch.committed = True
        if answer.get("previous_error"):
            launch.warnings.append(f"the previous server was not stopped cleanly: {answer['previous_error']}")
        if handover and not same_agent and previous is not None:
            try:
                self._stop(previous, timeout=min(timeout, 60), force=False)
            except ModelDeployError as exc:
                launch.warnings.append(f"the previous server (service {previous.uuid}) was not stopped: {exc}")

    def _discard(self, record: ServiceRecord, launch: Launch | None) -> None:
        if launch is None and not record.agent_url:
            return  # the agent never took it (it cleans up a server that fails to start itself)
        agent = launch.handle[0] if launch is not None else self._agent_of(record)
        with contextlib.suppress(ServiceNotFoundError):
            agent.stop(record.uuid, timeout=2, force=True)

    def _stop(self, record: ServiceRecord, timeout: float, force: bool) -> None:
        if not record.agent_url and record.pid is None:
            return  # never started anywhere
        with contextlib.suppress(ServiceNotFoundError):  # the agent has no server for it: nothing runs
            self._call(record, lambda agent: agent.stop(record.uuid, timeout=timeout, force=force))

    def _forget(self, record: ServiceRecord) -> None:
        if not record.agent_url and record.pid is None:
            return
        with contextlib.suppress(ServiceNotFoundError):
            self._call(record, lambda agent: agent.delete(record.uuid, force=True))

    def _retired(self, record: ServiceRecord) -> None:
        # The agent stopped it on activation but keeps its record and log, as for any stopped service;
        # the registry no longer has it, and a sync would adopt it again as an inactive service.
        self._forget(record)

    def _probe(self, record: ServiceRecord) -> tuple[ServiceState, str | None] | None:
        if record.state not in (ServiceState.ACTIVE, ServiceState.ERROR) or (not record.agent_url and not record.pid):
            return None
        try:
            served = self._call(record, lambda agent: agent.status(record.uuid))
        except ServiceNotFoundError:
            if record.state == ServiceState.ERROR:
                return None
            return ServiceState.ERROR, (
                f"the serving agent of host {record.host!r} runs no server for this service any more "
                "(the agent's records were lost, or the host restarted); start it again"
            )
        except AgentUnreachableError:
            return None  # cannot tell: the registry keeps what it knows
        phase = served.get("phase")
        if phase in ("active", "restarting"):
            # A server being restarted by its agent is still this endpoint's service.
            return ServiceState.ACTIVE, None
        if phase == "failed":
            last = " | ".join(
                line.strip() for line in self._call(record, lambda agent: list(agent.logs(record.uuid, 2, False)))
            )
            reason = served.get("error") or "the model server failed"
            return ServiceState.ERROR, f"{reason}; last log lines: {last}" if last else reason
        if phase == "stopped":
            return ServiceState.INACTIVE, None
        return None

    def _agents_to_ask(self, known: list[ServiceRecord]) -> dict[str, ServiceRecord | None]:
        urls: dict[str, ServiceRecord | None] = {self.settings.agent_url or "": None}
        for record in known:
            if record.agent_url:
                urls.setdefault(record.agent_url, record)
        return urls

    def _discover(self) -> list[ServiceRecord]:
        """The servers every agent this registry names (and this connection's) runs for it. Services
        of an agent that cannot be reached are not judged (``_covers``)."""
        known = [r for r in self.registry.find_services(backend=self.backend) if r.conn_id == self.conn_id]
        found: list[ServiceRecord] = []
        self._asked: set[str] = set()
        for url, example in self._agents_to_ask(known).items():
            try:
                agent = self._agent_of(example) if example is not None else self._client(url or None)
                served = agent.list(self.installation)
            except AgentUnreachableError as exc:
                log.warning("sync: %s", exc)
                continue
            self._asked.add(url)
            if agent.url != url:
                self._asked.add(agent.url)
            for item in served:
                record = self._adoptable(item, url or agent.url)
                if record is not None:
                    found.append(record)
        return found

    def _covers(self, record: ServiceRecord) -> bool:
        asked = getattr(self, "_asked", set())
        return (record.agent_url or "") in asked or (not record.agent_url and record.host in (None, HOSTNAME))

    def _adoptable(self, served: dict[str, Any], agent_url: str) -> ServiceRecord | None:
        data = {k: v for k, v in (served.get("record") or {}).items() if k in _ADOPTABLE_FIELDS}
        data.setdefault("uuid", served["uuid"])
        data.setdefault("backend", self.backend)
        for key in ("endpoint", "model_name", "model_uri"):
            data.setdefault(key, served.get(key))
        if not data.get("endpoint") or not data.get("model_uri"):
            return None
        record = ServiceRecord(**data)
        info = served.get("info") or {}
        record.served_uri = info.get("served_uri") or record.served_uri
        record.model_version = info.get("model_version") or record.model_version
        record.model_run_id = info.get("model_run_id") or record.model_run_id
        record.pid, record.host, record.agent_url = served.get("pid"), served.get("host"), agent_url
        address = served.get("address") or {}
        phase = served.get("phase")
        if phase in ("active", "restarting"):
            record.state = ServiceState.ACTIVE
            record.prediction_url, record.health_url = address.get("prediction_url"), address.get("health_url")
        elif phase == "stopped":
            record.state = ServiceState.INACTIVE
        elif phase == "failed":
            record.state, record.last_error = ServiceState.ERROR, served.get("error")
        else:
            record.state = ServiceState.PENDING  # never activated: a deployment that died midway
        return record

    def _adopt_conflict(self, found: ServiceRecord, current: ServiceRecord | None) -> None:
        self._forget(found)

    def _metrics(self, record: ServiceRecord, window: str) -> ServiceMetrics:
        """From the serving agents' per-minute figures: this service's, and those of the endpoint's
        earlier services that served within the window (role ``previous``)."""
        from airflow_provider_modeldeploy.metrics import ServiceMetrics, build, window_bounds

        if record.config.get("metrics") is False:
            return ServiceMetrics.unavailable(
                record.uuid, window, f"service {record.uuid} was deployed with metrics=false: its server records none"
            )
        if not record.agent_url and record.pid is None:
            return ServiceMetrics.unavailable(record.uuid, window, f"service {record.uuid} never ran")
        start, end, _step = window_bounds(window)
        earlier = [
            r for r in self.registry.find_services(backend=self.backend, endpoint=record.endpoint, limit=20)
            if r.uuid != record.uuid and (r.agent_url or r.pid is not None)
            and r.updated_at is not None and r.updated_at.timestamp() >= start
        ]  # fmt: skip
        related = [record, *earlier[:4]]
        slices: list[dict[str, Any]] = []
        for r in related:
            try:
                answer = self._call(r, lambda agent, r=r: agent.metrics(r.uuid, start, end))
            except ModelDeployError as exc:
                if r is not record:
                    continue  # an earlier service's agent: this one's figures still stand
                return ServiceMetrics.unavailable(
                    record.uuid, window, f"the serving agent of host {record.host!r} did not answer: {exc}"
                )
            for point in answer.get("points") or []:
                slices.append({**point, "model_version": point.get("model_version") or r.model_version or ""})
        main = record.model_version or ""
        return build(
            record.uuid, window, slices, source="serving-agent", events=self._chart_history(record),
            role_of=lambda version: "main" if version == main else "previous",
        )  # fmt: skip

    def _log_lines(self, record: ServiceRecord, tail: int | None, follow: bool) -> Iterator[str]:
        if not record.agent_url and record.pid is None:
            return iter(())
        return _lines_or_none(self._agent_of(record).logs(record.uuid, tail, follow))


def _lines_or_none(lines: Iterator[str]) -> Iterator[str]:
    """A service the agent has forgotten has no log any more: no lines, not an error."""
    try:
        yield from lines
    except ServiceNotFoundError:
        return
