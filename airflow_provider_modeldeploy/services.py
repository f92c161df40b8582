"""The service model: what a served model is, whatever backend runs it.

A *service* is one model server. Services are grouped by *endpoint* (by default the model name):
an endpoint keeps its prediction URL while the service behind it is replaced by newer versions.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from airflow_provider_modeldeploy.exceptions import InvalidParameterError

if TYPE_CHECKING:
    from airflow_provider_modeldeploy.deployers.base import BaseModelDeployer

# DNS-1123 label-like, so the same name works as a Seldon deployment or a Kubernetes label value.
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$", re.IGNORECASE)
_URI_SCHEME_RE = re.compile(r"^(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*):")
# What mlflow.pyfunc.load_model understands (artifact repositories + MLflow's own schemes).
KNOWN_URI_SCHEMES = frozenset(
    {
        "runs", "models", "file", "mlflow-artifacts", "s3", "gs", "wasbs", "abfss",
        "dbfs", "hdfs", "viewfs", "sftp", "ftp", "http", "https", "oci",
    }
)  # fmt: skip


class ServiceState(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    INACTIVE = "inactive"
    ERROR = "error"


def states_of(running: bool | None) -> list[ServiceState] | None:
    """The registry states a ``running=`` filter selects, for the query itself: filtering after a
    page is read would return short pages (a page of 25 with 10 stopped services holds 15)."""
    if running is None:
        return None
    return [s for s in ServiceState if (s == ServiceState.ACTIVE) == running]


class EventAction(StrEnum):
    DEPLOY = "deploy"
    REPLACE = "replace"
    ROLLBACK = "rollback"
    STOP = "stop"
    START = "start"
    DELETE = "delete"
    FAIL = "fail"
    CLEANUP = "cleanup"
    CANARY = "canary"
    PROMOTE = "promote"
    ADOPT = "adopt"
    LOST = "lost"


def validate_name(field_name: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise InvalidParameterError(
            field_name,
            value,
            "must be 1-63 letters, digits, '.', '_' or '-', starting and ending with a letter or digit",
        )
    return value


def validate_model_uri(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise InvalidParameterError("model_uri", value, "must be a non-empty MLflow model URI or path")
    match = _URI_SCHEME_RE.match(value)
    if match and len(match["scheme"]) > 1:  # one letter: a Windows drive, i.e. a path
        scheme = match["scheme"].lower()
        if scheme not in KNOWN_URI_SCHEMES:
            raise InvalidParameterError(
                "model_uri",
                value,
                f"unknown scheme '{scheme}:'; use runs:/, models:/, a path or an artifact URI",
            )
        if scheme == "models" and not re.match(r"^models:/[^/@]+(/[^/]+|@[^/]+)?$", value):
            raise InvalidParameterError(
                "model_uri",
                value,
                "use models:/<name>/<version>, models:/<name>@<alias> or models:/<model id>",
            )
        if scheme == "runs" and not re.match(r"^runs:/[0-9a-zA-Z]+/.+$", value):
            raise InvalidParameterError("model_uri", value, "use runs:/<run_id>/<artifact path>")
    return value


class ServiceConfig:
    """What to serve: ``ServiceConfig(model_uri=..., model_name=..., **backend_options)``.

    :param model_uri: MLflow model URI: ``runs:/<id>/model``, ``models:/<name>/<version>``,
        ``models:/<name>@<alias>``, a local path or an artifact-store URI.
    :param model_name: the model's name; used as the endpoint name unless ``endpoint`` is given.
    :param endpoint: the logical endpoint whose prediction URL stays the same across replaces.
    :param backend_options: options of the backend the connection picks (e.g. ``workers`` for
        MLflow, ``replicas`` for Seldon). Unknown options are refused by the deployer.
    """

    def __init__(self, model_uri: str, model_name: str, endpoint: str | None = None, **backend_options: Any) -> None:
        self.model_uri = model_uri
        self.model_name = model_name
        self.endpoint = endpoint
        self.backend_options = backend_options

    @property
    def endpoint_name(self) -> str:
        return self.endpoint or self.model_name

    def validate(self) -> None:
        validate_name("model_name", self.model_name)
        if self.endpoint is not None:
            validate_name("endpoint", self.endpoint)
        validate_model_uri(self.model_uri)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.backend_options.items())
        return f"ServiceConfig(model_uri={self.model_uri!r}, model_name={self.model_name!r}{opts})"


@dataclass
class Lineage:
    """Who asked for a deployment: an Airflow task instance, or a person at a CLI / Python prompt."""

    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    map_index: int = -1
    try_number: int | None = None
    actor: str | None = None
    #: why it was asked for, when something else than a person or a schedule caused it
    #: (e.g. ``alias champion of iris moved 2 -> 1``): the history shows it after the actor
    reason: str | None = None

    @property
    def is_task(self) -> bool:
        return bool(self.dag_id and self.run_id and self.task_id)

    def describe(self) -> str:
        if self.is_task:
            where = f"{self.dag_id}/{self.run_id}/{self.task_id}"
            if self.map_index >= 0:
                where += f"[{self.map_index}]"
            who = f"task {where} try {self.try_number}"
        else:
            who = self.actor or "unknown"
        return f"{who} ({self.reason})" if self.reason else who


@dataclass
class ServiceStatus:
    state: ServiceState
    last_error: str | None = None


@dataclass
class ServiceRecord:
    """One row of the served-models registry, detached from any database session."""

    uuid: str
    backend: str
    endpoint: str
    model_name: str
    model_uri: str
    conn_id: str | None = None
    model_version: str | None = None
    model_run_id: str | None = None
    served_uri: str | None = None
    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    map_index: int = -1
    try_number: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    state: ServiceState = ServiceState.PENDING
    last_error: str | None = None
    prediction_url: str | None = None
    health_url: str | None = None
    host: str | None = None
    pid: int | None = None
    agent_id: str | None = None
    agent_url: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = str(self.state)
        for key in ("created_at", "updated_at"):
            if data[key] is not None:
                data[key] = data[key].isoformat()
        return data


class Service:
    """A model server as users handle it: status, URL, start / stop, whatever the backend."""

    def __init__(self, record: ServiceRecord, deployer: BaseModelDeployer | None) -> None:
        self.record = record
        self._deployer = deployer

    @property
    def uuid(self) -> str:
        return self.record.uuid

    @property
    def status(self) -> ServiceStatus:
        return ServiceStatus(self.record.state, self.record.last_error)

    @property
    def is_running(self) -> bool:
        return self.record.state == ServiceState.ACTIVE

    @property
    def is_failed(self) -> bool:
        return self.record.state == ServiceState.ERROR

    @property
    def prediction_url(self) -> str | None:
        return self.record.prediction_url if self.is_running else None

    @property
    def health_url(self) -> str | None:
        return self.record.health_url if self.is_running else None

    def refresh(self) -> Service:
        self.record = self.deployer.get_model_server(self.uuid).record
        return self

    def start(self, timeout: int = 300, *, actor: str | None = None) -> Service:
        self.record = self.deployer.start_model_server(self.uuid, timeout=timeout, actor=actor).record
        return self

    def stop(self, timeout: int = 60, force: bool = False, *, actor: str | None = None) -> Service:
        self.record = self.deployer.stop_model_server(self.uuid, timeout=timeout, force=force, actor=actor).record
        return self

    def delete(self, timeout: int = 60, force: bool = False, *, actor: str | None = None) -> None:
        self.deployer.delete_model_server(self.uuid, timeout=timeout, force=force, actor=actor)

    def promote(self, timeout: int = 300, *, actor: str | None = None) -> Service:
        """Give this canary all of its endpoint's traffic."""
        return self._deployer.promote_model_server(self.uuid, timeout=timeout, actor=actor)

    def rollback(self, to_service_uuid: str | None = None, timeout: int = 300, *, actor: str | None = None) -> Service:
        """Serve an earlier version of this service's endpoint again; returns the service now serving."""
        return self.deployer.rollback_model_server(self.uuid, to_service_uuid, timeout=timeout, actor=actor)

    @property
    def deployer(self) -> BaseModelDeployer:
        if self._deployer is None:
            from airflow_provider_modeldeploy.deployers import deployer_for_service

            self._deployer = deployer_for_service(self.uuid)  # raises the reason it is out of reach
        return self._deployer

    def to_dict(self) -> dict[str, Any]:
        return self.record.to_dict()

    def __repr__(self) -> str:
        r = self.record
        return (
            f"Service(uuid={r.uuid!r}, backend={r.backend!r}, model={r.model_name!r}, "
            f"version={r.model_version!r}, state={r.state!s}, url={r.prediction_url!r})"
        )
