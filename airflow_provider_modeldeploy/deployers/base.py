"""The backend-agnostic deployer: registry bookkeeping, endpoint leases, replace and rollback.

A backend subclass says how to start, check, hand over and stop *its* servers; everything users see
(states, history, idempotent retries, one active server per endpoint) is decided here, once.
"""

from __future__ import annotations

import getpass
import logging
import uuid as uuidlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from airflow_provider_modeldeploy.exceptions import (
    DeploymentFailedError,
    EndpointBusyError,
    InvalidParameterError,
    ModelDeployError,
    ServiceNotFoundError,
)
from airflow_provider_modeldeploy.registry import EndpointLease, Registry, get_registry
from airflow_provider_modeldeploy.registry.store import HOSTNAME
from airflow_provider_modeldeploy.services import (
    EventAction,
    Lineage,
    Service,
    ServiceConfig,
    ServiceRecord,
    ServiceState,
    states_of,
)

if TYPE_CHECKING:
    from airflow_provider_modeldeploy.metrics import ServiceMetrics

log = logging.getLogger(__name__)


@dataclass
class Launch:
    """What a backend reports once its new server is up (not yet taking public traffic)."""

    pid: int | None = None
    prediction_url: str | None = None
    health_url: str | None = None
    served_uri: str | None = None
    model_version: str | None = None
    model_run_id: str | None = None
    #: What the server reports of the model's input (``columns``: name and MLflow type of each,
    #: ``example``: its serving input example as JSON), kept in the endpoint's history for the UI.
    inputs: dict[str, Any] | None = None
    address: dict[str, Any] = field(default_factory=dict)
    handle: Any = None
    #: Set by ``_promote`` once the new server takes the endpoint's traffic: from then on nothing
    #: discards it, and what goes wrong later (the old server's drain, ...) is recorded in ``warnings``.
    committed: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass
class SyncReport:
    """What ``sync_services`` changed in the registry for one backend connection."""

    backend: str
    conn_id: str | None
    checked: int = 0
    adopted: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    dry_run: bool = False  # what sync would change; nothing was

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend, "conn_id": self.conn_id, "checked": self.checked,
            "adopted": self.adopted, "lost": self.lost, "removed": self.removed, "dry_run": self.dry_run,
        }  # fmt: skip


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{HOSTNAME}"


class BaseModelDeployer(ABC):
    """Deploys models as tracked services. Get one with ``get_model_deployer(conn_id)``."""

    backend: ClassVar[str]
    #: Options ``ServiceConfig(**backend_options)`` may carry for this backend, with their types.
    backend_options: ClassVar[dict[str, type | tuple[type, ...]]] = {}

    def __init__(self, conn_id: str | None = None, registry: Registry | None = None) -> None:
        self.conn_id = conn_id
        self._registry = registry

    @classmethod
    def from_connection(cls, conn_id: str, connection: Any) -> BaseModelDeployer:
        """The deployer for an Airflow connection of this backend's type (already looked up)."""
        return cls(conn_id=conn_id)

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = get_registry()
        return self._registry

    # -- what a backend implements ---------------------------------------------------------------

    @abstractmethod
    def _launch(
        self, record: ServiceRecord, lease: EndpointLease, previous: ServiceRecord | None, timeout: float
    ) -> Launch:
        """Start the server for ``record`` and check it answers (health + smoke prediction), but do
        not route public traffic to it yet. Raise DeploymentFailedError, leaving nothing behind."""

    @abstractmethod
    def _promote(self, record: ServiceRecord, launch: Launch, previous: ServiceRecord | None, timeout: float) -> None:
        """Route the endpoint's traffic to the new server, then drain and stop the previous one."""

    @abstractmethod
    def _discard(self, record: ServiceRecord, launch: Launch | None) -> None:
        """Stop a server that failed before promotion, whatever state it reached."""

    @abstractmethod
    def _stop(self, record: ServiceRecord, timeout: float, force: bool) -> None:
        """Stop the server (gracefully, or at once with ``force``). Idempotent."""

    @abstractmethod
    def _probe(self, record: ServiceRecord) -> tuple[ServiceState, str | None] | None:
        """The server's actual state when it differs from the record (None: cannot tell, or same)."""

    @abstractmethod
    def _log_lines(self, record: ServiceRecord, tail: int | None, follow: bool) -> Iterator[str]:
        """The server's log."""

    def _forget(self, record: ServiceRecord) -> None:  # noqa: B027 - optional for backends
        """Remove what the backend keeps of a service that is deleted (files, cached state)."""

    def _retired(self, record: ServiceRecord) -> None:  # noqa: B027 - optional for backends
        """A service replaced at its endpoint (its server stopped, its row gone from the registry):
        remove what the backend still keeps of it, so that nothing (``sync``) takes it for a service."""

    def _discover(self) -> list[ServiceRecord] | None:
        """Every service this backend (through this connection) actually runs, known to the registry
        or not, as records rebuilt from what the backend keeps (labels, state files): uuid, endpoint,
        model and lineage, with the state the backend reports. None: the backend cannot list them."""
        return None

    def _covers(self, record: ServiceRecord) -> bool:
        """Whether the last ``_discover`` could see ``record``'s server, were it running (a backend
        whose servers live on several hosts cannot judge those it could not reach)."""
        return True

    def _adopt_conflict(self, found: ServiceRecord, current: ServiceRecord | None) -> None:
        """A discovered server sync will not adopt (never activated, or its endpoint is served by
        another service): by default stop it, since it is a leftover nobody accounts for."""
        self._stop(found, timeout=10, force=True)

    def _validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Check ``backend_options``; return what to store with the service (never a secret)."""
        clean: dict[str, Any] = {}
        for key, value in options.items():
            if key not in self.backend_options:
                known = ", ".join(sorted(self.backend_options)) or "none"
                raise InvalidParameterError(key, value, f"not an option of the {self.backend} backend (known: {known})")
            expected = self.backend_options[key]
            if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise InvalidParameterError(key, value, "must be an integer")
            if expected is not int and not isinstance(value, expected):
                raise InvalidParameterError(key, value, f"must be of type {expected.__name__}")
            clean[key] = value
        return clean

    # -- the public interface --------------------------------------------------------------------

    def deploy_model(
        self,
        config: ServiceConfig,
        replace: bool = True,
        timeout: float = 300,
        *,
        lineage: Lineage | None = None,
    ) -> Service:
        """Serve ``config.model_uri`` at the endpoint ``config.endpoint_name``.

        With ``replace`` (the default) a server already at the endpoint is replaced in place: the new
        one takes traffic at the same URL only once it answers health and a smoke prediction, and
        if it fails, the old one keeps serving and this raises DeploymentFailedError. Without it,
        an endpoint that already has a server is an error. A retried Airflow task that already
        deployed this model gets its service back instead of a second server.
        """
        config.validate()
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidParameterError("timeout", timeout, "must be a positive number of seconds")
        options = self._validate_options(config.backend_options)
        lineage = lineage or Lineage(actor=default_actor())
        endpoint = config.endpoint_name
        with self.registry.lease(
            self.backend, endpoint, conn_id=self.conn_id, ttl=timeout + 120, wait=timeout
        ) as lease:
            self._cleanup_orphans(endpoint)
            current = self._current(endpoint)
            if current is not None:
                if self._is_same_deployment(current, config, lineage):
                    log.info(
                        "Service %s already serves %s for this task; not deploying again",
                        current.uuid,
                        config.model_uri,
                    )
                    return self._service(current)
                if not replace:
                    raise InvalidParameterError(
                        "replace", False,
                        f"endpoint '{endpoint}' is already served by service {current.uuid} "
                        f"({current.state}); pass replace=True or choose another endpoint",
                    )  # fmt: skip
            record = self.registry.add_service(
                ServiceRecord(
                    uuid=str(uuidlib.uuid4()), backend=self.backend, endpoint=endpoint,
                    conn_id=self.conn_id, model_name=config.model_name, model_uri=config.model_uri,
                    dag_id=lineage.dag_id, run_id=lineage.run_id, task_id=lineage.task_id,
                    map_index=lineage.map_index, try_number=lineage.try_number, config=options,
                    state=ServiceState.PENDING, host=HOSTNAME,
                )
            )  # fmt: skip
            return self._bring_up(record, lease, current, timeout, lineage)

    def _bring_up(
        self,
        record: ServiceRecord,
        lease: EndpointLease,
        previous: ServiceRecord | None,
        timeout: float,
        lineage: Lineage,
        action: EventAction | None = None,
        fresh: bool = True,
    ) -> Service:
        """Launch, check, promote; on failure leave the registry and the previous server as they were."""
        launch: Launch | None = None
        late: BaseException | None = None
        try:
            launch = self._launch(record, lease, previous, timeout)
            self.registry.update_service(
                record.uuid, pid=launch.pid, served_uri=launch.served_uri,
                model_version=launch.model_version, model_run_id=launch.model_run_id,
            )  # fmt: skip
            self._promote(record, launch, previous, timeout)
        except BaseException as exc:
            if launch is None or not launch.committed:
                self._abandon(record, launch, lease, previous, exc, lineage, fresh)
                raise
            # The commit point is passed: the new server serves. Record it as such, then fail if we must.
            late = exc
            launch.warnings.append(f"{type(exc).__name__}: {exc}")
        if launch.address:
            self.registry.set_endpoint_address(self.backend, record.endpoint, launch.address)
        retire = [previous.uuid] if previous is not None and previous.uuid != record.uuid else []
        active = self.registry.activate(
            record.uuid,
            retire=retire,
            prediction_url=launch.prediction_url,
            health_url=launch.health_url,
            pid=launch.pid,
        )
        if retire and previous is not None:
            try:
                self._retired(previous)
            except Exception as exc:  # the deployment succeeded; what is left is only kept, not served
                launch.warnings.append(f"what the backend keeps of replaced service {previous.uuid} stays: {exc}")
        for warning in launch.warnings:
            log.warning("Service %s serves, but: %s", record.uuid, warning)
        if action is None:
            # A canary (backends that support one) shares the endpoint with the version it is tried against.
            canary = retire and record.config.get("canary_of")  # a dark launch has 0 percent
            action = EventAction.CANARY if canary else EventAction.REPLACE if retire else EventAction.DEPLOY
        self.registry.add_event(
            self.backend, record.endpoint, action, service_uuid=record.uuid, actor=lineage.describe(),
            message=f"serving {record.model_uri} (version {active.model_version or '-'}) at {active.prediction_url}",
            details={
                "model_uri": record.model_uri, "model_version": active.model_version,
                "model_run_id": active.model_run_id, "served_uri": active.served_uri,
                # the version's lineage: a rollback to it restores it, and is authorized against its DAG
                "dag_id": record.dag_id, "run_id": record.run_id, "task_id": record.task_id,
                "previous_uuid": previous.uuid if previous else None,
                "previous_model_uri": previous.model_uri if previous else None,
                "previous_model_version": previous.model_version if previous else None,
                **({"inputs": launch.inputs} if launch.inputs else {}),
                **({"warnings": launch.warnings} if launch.warnings else {}),
            },
        )  # fmt: skip
        if late is not None and not isinstance(late, Exception):
            raise late  # a timeout or an interrupt of the task: it still fails, the registry is true
        return self._service(active)

    def _abandon(
        self,
        record: ServiceRecord,
        launch: Launch | None,
        lease: EndpointLease,
        previous: ServiceRecord | None,
        exc: BaseException,
        lineage: Lineage,
        fresh: bool,
    ) -> None:
        try:
            self._discard(record, launch)
        except Exception:
            log.exception("Could not stop the failed server of service %s", record.uuid)
        if not fresh:
            return
        self.registry.delete_service(record.uuid)
        self._forget(record)
        if previous is not None:
            kept = previous.state == ServiceState.ACTIVE
            self.registry.add_event(
                self.backend, record.endpoint, EventAction.ROLLBACK, outcome="failed", service_uuid=record.uuid,
                actor=lineage.describe(),
                message=f"{record.model_uri} did not come up ({exc}); "
                + (f"service {previous.uuid} keeps serving" if kept else f"service {previous.uuid} kept"),
                details={"model_uri": record.model_uri, "kept_uuid": previous.uuid},
            )  # fmt: skip
        elif lease.created and not self.registry.find_services(backend=self.backend, endpoint=record.endpoint):
            # A first deployment that failed leaves no trace: the registry is as it was.
            self.registry.delete_endpoint(self.backend, record.endpoint)

    def find_model_server(
        self,
        model_name: str | None = None,
        dag_id: str | None = None,
        task_id: str | None = None,
        run_id: str | None = None,
        running: bool | None = None,
        service_uuid: str | None = None,
        *,
        endpoint: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Service]:
        """Services of this backend matching every given filter, newest first, states refreshed."""
        records = self.registry.find_services(
            backend=self.backend, model_name=model_name, dag_id=dag_id, task_id=task_id, run_id=run_id,
            service_uuid=service_uuid, endpoint=endpoint, states=states_of(running), limit=limit, offset=offset,
        )  # fmt: skip
        services = [self._service(self._refresh(r)) for r in records]
        if running is not None:  # checked against the backend since: a server found dead is not shown running
            services = [s for s in services if s.is_running == running]
        return services

    def service_for(self, record: ServiceRecord) -> Service:
        """A registry record of this backend as a Service, its state checked against reality."""
        return self._service(self._refresh(record))

    def get_model_server(self, service_uuid: str) -> Service:
        return self._service(self._refresh(self._get(service_uuid)))

    def start_model_server(self, service_uuid: str, timeout: float = 300, *, actor: str | None = None) -> Service:
        """Start a stopped (or failed) service again at its endpoint's URL.

        :param actor: who asks, for the history (default: the OS user at this host).
        """
        record = self._get(service_uuid)
        lineage = Lineage(actor=actor or default_actor())
        with self.registry.lease(
            self.backend, record.endpoint, conn_id=self.conn_id, ttl=timeout + 120, wait=timeout
        ) as lease:
            record = self._refresh(self._get(record.uuid))
            if record.state == ServiceState.ACTIVE:
                return self._service(record)
            other = [
                r for r in self.registry.find_services(backend=self.backend, endpoint=record.endpoint, states=[ServiceState.ACTIVE])
                if r.uuid != record.uuid
            ]  # fmt: skip
            if other:
                raise InvalidParameterError(
                    "uuid", record.uuid,
                    f"endpoint '{record.endpoint}' is served by service {other[0].uuid}; stop it first or deploy "
                    f"{record.model_uri} to replace it",
                )  # fmt: skip
            self.registry.update_service(record.uuid, state=ServiceState.PENDING, last_error=None)
            record.state = ServiceState.PENDING
            try:
                return self._bring_up(record, lease, None, timeout, lineage, action=EventAction.START, fresh=False)
            except BaseException as exc:
                message = str(exc) if isinstance(exc, ModelDeployError) else f"{type(exc).__name__}: {exc}"
                self.registry.update_service(record.uuid, state=ServiceState.ERROR, last_error=message, pid=None)
                self.registry.add_event(
                    self.backend, record.endpoint, EventAction.START, outcome="failed",
                    service_uuid=record.uuid, actor=lineage.describe(), message=message,
                )  # fmt: skip
                raise

    def stop_model_server(
        self, service_uuid: str, timeout: float = 60, force: bool = False, *, actor: str | None = None
    ) -> Service:
        """Stop a service's server (draining in-flight requests unless ``force``); it can be started again."""
        record = self._get(service_uuid)
        with self.registry.lease(
            self.backend, record.endpoint, conn_id=self.conn_id, ttl=timeout + 120, wait=timeout + 60
        ):
            record = self._get(record.uuid)
            self._stop(record, timeout, force)
            stopped = self.registry.update_service(record.uuid, state=ServiceState.INACTIVE, pid=None)
            self.registry.add_event(
                self.backend, record.endpoint, EventAction.STOP, service_uuid=record.uuid,
                actor=actor or default_actor(), message=f"stopped{' (forced)' if force else ''}",
            )  # fmt: skip
        return self._service(stopped)

    def delete_model_server(
        self, service_uuid: str, timeout: float = 60, force: bool = False, *, actor: str | None = None
    ) -> None:
        """Stop a service's server and remove the service from the registry (its endpoint history stays)."""
        record = self._get(service_uuid)
        with self.registry.lease(
            self.backend, record.endpoint, conn_id=self.conn_id, ttl=timeout + 120, wait=timeout + 60
        ):
            record = self._get(record.uuid)
            self._stop(record, timeout, force)
            self.registry.delete_service(record.uuid)
            self._forget(record)
            self.registry.add_event(
                self.backend, record.endpoint, EventAction.DELETE, service_uuid=record.uuid,
                actor=actor or default_actor(),
                message=f"deleted service of {record.model_uri} (version {record.model_version or '-'})",
            )  # fmt: skip

    def rollback_model_server(
        self,
        service_uuid: str,
        to_service_uuid: str | None = None,
        timeout: float = 300,
        *,
        actor: str | None = None,
    ) -> Service:
        """Serve an earlier version of an endpoint again, in place (same prediction URL).

        Replaced services leave the registry but not the endpoint's history, which records what each
        served; a rollback deploys that again as a new service of the endpoint.

        :param service_uuid: a service of the endpoint to roll back (usually the one serving now).
        :param to_service_uuid: the earlier service, as the history names it, whose version to serve
            again; default: the one the serving service replaced.
        :param actor: who asks, for the history.

        The earlier version takes traffic only once it answers health and a smoke prediction; if it
        fails, the serving one keeps serving and this raises DeploymentFailedError.
        """
        record = self._get(service_uuid)
        lineage = Lineage(actor=actor or default_actor())
        with self.registry.lease(
            self.backend, record.endpoint, conn_id=self.conn_id, ttl=timeout + 120, wait=timeout
        ) as lease:
            current = self._current(record.endpoint)
            target = self._rollback_target(record, current, to_service_uuid)
            restored = self.registry.add_service(
                ServiceRecord(
                    uuid=str(uuidlib.uuid4()), backend=self.backend, endpoint=record.endpoint,
                    conn_id=self.conn_id, model_name=target.get("model_name") or record.model_name,
                    model_uri=target["served_uri"] or target["model_uri"],
                    model_version=target.get("model_version"),  # a storage URI does not say it
                    config=(current or record).config, state=ServiceState.PENDING, host=HOSTNAME,
                    # lineage back to the DAG run that deployed this version first
                    dag_id=target.get("dag_id"), run_id=target.get("run_id"), task_id=target.get("task_id"),
                )
            )  # fmt: skip
            previous = current if current is not None and current.state == ServiceState.ACTIVE else None
            return self._bring_up(restored, lease, previous, timeout, lineage, action=EventAction.ROLLBACK)

    def render(self, config: ServiceConfig) -> dict[str, Any]:
        """The manifest a deploy of ``config`` would send, validated, sending and recording nothing
        (backends that send manifests override this)."""
        raise InvalidParameterError("conn_id", self.conn_id, f"the {self.backend} backend sends no manifest to render")

    def promote_model_server(self, service_uuid: str, timeout: float = 300, *, actor: str | None = None) -> Service:
        """Give a canary all of its endpoint's traffic (backends with canaries override this).

        :param service_uuid: the canary service.
        :param actor: who asks, for the history.
        """
        raise InvalidParameterError("uuid", service_uuid, "has no canary to promote")

    def rollback_target(self, service_uuid: str, to_service_uuid: str | None = None) -> dict[str, Any]:
        """What a rollback of ``service_uuid``'s endpoint would serve again (``to_service_uuid`` or the
        version the serving one replaced), from the history, changing nothing: its uuid, model_uri,
        served_uri, model_version and lineage (dag_id, run_id, task_id; None for versions recorded
        before lineage was)."""
        record = self._get(service_uuid)
        return self._rollback_target(record, self._current(record.endpoint), to_service_uuid)

    def _rollback_target(
        self, record: ServiceRecord, current: ServiceRecord | None, to_service_uuid: str | None
    ) -> dict[str, Any]:
        """What an earlier service served, from the endpoint's history: model_uri, served_uri, version."""
        served: dict[str, dict[str, Any]] = {}
        replaced_by: dict[str, str] = {}
        for event in reversed(self.registry.list_events(self.backend, record.endpoint, limit=1000)):
            details = event.get("details") or {}
            if event["outcome"] != "success" or not event.get("service_uuid") or "model_uri" not in details:
                continue
            served[event["service_uuid"]] = {
                "uuid": event["service_uuid"], "model_uri": details["model_uri"],
                "served_uri": details.get("served_uri"), "model_version": details.get("model_version"),
                "dag_id": details.get("dag_id"), "run_id": details.get("run_id"), "task_id": details.get("task_id"),
            }  # fmt: skip
            if details.get("previous_uuid"):
                replaced_by[event["service_uuid"]] = details["previous_uuid"]
        if to_service_uuid is None:
            anchor = current.uuid if current is not None else record.uuid
            to_service_uuid = replaced_by.get(anchor)
            if to_service_uuid is None:
                raise InvalidParameterError(
                    "uuid", record.uuid, f"endpoint '{record.endpoint}' has no earlier version to roll back to"
                )
        elif not isinstance(to_service_uuid, str) or not to_service_uuid:
            raise InvalidParameterError("to_service_uuid", to_service_uuid, "must be a service uuid")
        matches = [uuid for uuid in served if uuid.startswith(to_service_uuid)]
        if len(matches) != 1:
            raise InvalidParameterError(
                "to_service_uuid", to_service_uuid,
                f"names no{' single' if matches else ''} earlier service in the history of endpoint "
                f"'{record.endpoint}'",
            )  # fmt: skip
        if current is not None and matches[0] == current.uuid and current.state == ServiceState.ACTIVE:
            raise InvalidParameterError(
                "to_service_uuid", to_service_uuid, "already serves the endpoint; name an earlier service"
            )
        return served[matches[0]]

    def get_model_server_logs(self, service_uuid: str, tail: int | None = None, follow: bool = False) -> Iterator[str]:
        if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 0):
            raise InvalidParameterError("tail", tail, "must be a non-negative integer")
        return self._log_lines(self._get(service_uuid), tail, follow)

    def wait_until_healthy(self, service: Service, timeout: float = 300, sample_input: Any = None) -> Service:
        """Poll the service's public health URL (and a sample prediction) until it answers 200."""
        import time

        from airflow_provider_modeldeploy.health import check_health

        deadline = time.monotonic() + timeout
        while True:
            service.refresh()
            if service.is_failed:
                raise DeploymentFailedError(f"uuid={service.uuid!r}: {service.status.last_error}")
            if service.is_running and service.health_url:
                ok, reason = check_health(service.health_url, service.prediction_url, sample_input)
                if ok:
                    return service
            else:
                reason = f"service is {service.status.state}"
            if time.monotonic() > deadline:
                raise DeploymentFailedError(f"uuid={service.uuid!r}: not healthy after {timeout}s ({reason})")
            time.sleep(0.5)

    def sync_services(self, dry_run: bool = False) -> SyncReport:
        """Reconcile the registry with what the backend runs.

        A registry service the backend no longer runs is marked inactive (its last error says so);
        ``start`` brings it back at its endpoint's URL. A server the backend runs that the registry
        does not know (the registry was lost, or a deployment died before recording it) is adopted
        with the lineage the backend kept, or stopped when its endpoint is already served by
        another service. Deployments in progress (pending under a live lease) are left alone.

        :param dry_run: only report what would change: the registry and the backend are left as they are.
        """
        report = SyncReport(self.backend, self.conn_id, dry_run=dry_run)
        discovered = self._discover()
        found = {r.uuid: r for r in discovered or []}
        registered = self.registry.find_services(backend=self.backend)
        known = [r for r in registered if r.conn_id == self.conn_id]
        interrupted: set[str] = set()
        for record in known:
            report.checked += 1
            if record.state == ServiceState.PENDING:
                interrupted.add(record.endpoint)
                continue
            if discovered is not None and record.uuid not in found and self._covers(record):
                if record.state in (ServiceState.ACTIVE, ServiceState.ERROR):
                    reason = f"not running in the {self.backend} backend any more (found by sync)"
                    if record.last_error and record.state == ServiceState.ERROR:
                        reason = f"{reason}; before: {record.last_error}"
                    if not dry_run:
                        self.registry.update_service(
                            record.uuid, state=ServiceState.INACTIVE, last_error=reason, pid=None
                        )
                        self.registry.add_event(
                            self.backend, record.endpoint, EventAction.LOST, service_uuid=record.uuid,
                            actor=default_actor(), message=reason,
                        )  # fmt: skip
                    report.lost.append(record.uuid)
                continue
            if not dry_run:
                self._refresh(record)
        # Pending services of a deployment that died: their lease is free (or its holder dead).
        for endpoint in sorted(interrupted):
            if dry_run:
                if self.registry.lease_is_free(self.backend, endpoint):
                    report.removed.extend(
                        r.uuid
                        for r in self.registry.find_services(
                            backend=self.backend, endpoint=endpoint, states=[ServiceState.PENDING]
                        )
                    )
                continue
            try:
                with self.registry.lease(self.backend, endpoint, conn_id=self.conn_id, ttl=120, wait=2):
                    report.removed.extend(self._cleanup_orphans(endpoint))
            except EndpointBusyError:
                continue  # a deployment is in progress
        known_uuids = {r.uuid for r in registered}
        for record in found.values():
            if record.uuid in known_uuids or record.uuid in report.removed:
                continue
            if dry_run:
                served = self.registry.find_services(
                    backend=self.backend, endpoint=record.endpoint, states=[ServiceState.ACTIVE]
                )
                conflict = record.state == ServiceState.PENDING or (record.state == ServiceState.ACTIVE and served)
                (report.removed if conflict else report.adopted).append(record.uuid)
                continue
            try:
                lease = self.registry.lease(self.backend, record.endpoint, conn_id=self.conn_id, ttl=180, wait=2)
                with lease:
                    self._adopt(record, report)
            except EndpointBusyError:
                continue
        return report

    def _adopt(self, record: ServiceRecord, report: SyncReport) -> None:
        current = next(
            iter(self.registry.find_services(backend=self.backend, endpoint=record.endpoint, states=[ServiceState.ACTIVE])),
            None,
        )  # fmt: skip
        if record.state == ServiceState.PENDING or (record.state == ServiceState.ACTIVE and current is not None):
            # Never activated (its deployment died first), or its endpoint is served by another service.
            self._adopt_conflict(record, current)
            why = f"service {current.uuid} serves the endpoint" if current else "its deployment never finished"
            self.registry.add_event(
                self.backend, record.endpoint, EventAction.CLEANUP, service_uuid=record.uuid, actor=default_actor(),
                message=f"stopped a server of {record.model_uri} the registry did not know; {why}",
            )  # fmt: skip
            report.removed.append(record.uuid)
            return
        record.conn_id = self.conn_id
        self.registry.add_service(record)
        self.registry.add_event(
            self.backend, record.endpoint, EventAction.ADOPT, service_uuid=record.uuid, actor=default_actor(),
            message=f"adopted {record.model_uri} (version {record.model_version or '-'}, {record.state}) "
            f"found running in the {self.backend} backend",
            details={"model_uri": record.model_uri, "served_uri": record.served_uri,
                     "model_version": record.model_version},
        )  # fmt: skip
        report.adopted.append(record.uuid)

    def metrics(self, service_uuid: str, window: str = "1h") -> ServiceMetrics:
        """The service's traffic over ``window`` (``1h``: per minute, ``1d``: per 15 minutes): requests,
        errors, latency quantiles and rows per model version, a summary, and the endpoint's deploys,
        replaces, rollbacks and promotes. ``available`` is false, with the reason, where the backend
        cannot tell (never zeros)."""
        from airflow_provider_modeldeploy.metrics import WINDOWS

        if window not in WINDOWS:
            raise InvalidParameterError("window", window, f"must be one of {', '.join(WINDOWS)}")
        return self._metrics(self._get(service_uuid), window)

    def _metrics(self, record: ServiceRecord, window: str) -> ServiceMetrics:
        """What a backend implements for ``metrics`` (the record is this backend's)."""
        from airflow_provider_modeldeploy.metrics import ServiceMetrics

        return ServiceMetrics.unavailable(record.uuid, window, f"the {self.backend} backend reports no metrics")

    def _chart_history(self, record: ServiceRecord) -> list[dict[str, Any]]:
        """The endpoint's recent history, for the events on the charts."""
        return self.registry.list_events(self.backend, record.endpoint, limit=200)

    def get_history(self, service_or_endpoint: str, limit: int = 50) -> list[dict[str, Any]]:
        try:
            endpoint = self._get(service_or_endpoint).endpoint
        except ServiceNotFoundError:
            endpoint = service_or_endpoint
        return self.registry.list_events(self.backend, endpoint, limit)

    # -- helpers ---------------------------------------------------------------------------------

    def _service(self, record: ServiceRecord) -> Service:
        return Service(record, self)

    def _get(self, service_uuid: str) -> ServiceRecord:
        if not isinstance(service_uuid, str) or not service_uuid:
            raise InvalidParameterError("uuid", service_uuid, "must be a service uuid")
        record = self.registry.get_service(service_uuid)
        if record.backend != self.backend:
            raise ServiceNotFoundError(
                "uuid", service_uuid, f"belongs to the {record.backend} backend, not {self.backend}"
            )
        return record

    def _current(self, endpoint: str) -> ServiceRecord | None:
        records = [
            self._refresh(r)
            for r in self.registry.find_services(backend=self.backend, endpoint=endpoint)
            if r.state != ServiceState.PENDING
        ]
        for state in (ServiceState.ACTIVE, ServiceState.ERROR, ServiceState.INACTIVE):
            for r in records:
                if r.state == state:
                    return r
        return None

    def _refresh(self, record: ServiceRecord) -> ServiceRecord:
        probed = self._probe(record)
        if probed is None or (probed[0] == record.state and probed[1] == record.last_error):
            return record
        state, error = probed
        log.warning("Service %s is %s: %s", record.uuid, state, error)
        return self.registry.update_service(record.uuid, state=state, last_error=error)

    def _cleanup_orphans(self, endpoint: str) -> list[str]:
        """Pending services left by a deployment that died (its lease was taken over): stop them.
        Returns the uuids of the services removed."""
        removed = []
        for r in self.registry.find_services(backend=self.backend, endpoint=endpoint, states=[ServiceState.PENDING]):
            log.warning("Removing service %s left pending by an interrupted deployment", r.uuid)
            try:
                self._stop(r, timeout=10, force=True)
            except Exception:
                log.exception("Could not stop orphan server of service %s", r.uuid)
                continue
            self.registry.delete_service(r.uuid)
            self._forget(r)
            self.registry.add_event(
                self.backend, endpoint, EventAction.CLEANUP, service_uuid=r.uuid, actor=default_actor(),
                message=f"removed server of {r.model_uri} left by an interrupted deployment",
            )  # fmt: skip
            removed.append(r.uuid)
        return removed

    @staticmethod
    def _is_same_deployment(current: ServiceRecord, config: ServiceConfig, lineage: Lineage) -> bool:
        return (
            lineage.is_task
            and current.state == ServiceState.ACTIVE
            and (current.dag_id, current.run_id, current.task_id, current.map_index)
            == (lineage.dag_id, lineage.run_id, lineage.task_id, lineage.map_index)
            and current.model_uri == config.model_uri
        )
