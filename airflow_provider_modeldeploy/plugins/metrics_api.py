"""The Served Models API's metrics routes (the page's charts and the list's sparklines).

Authorized as the other read routes (``app._readable``: 403 before anything of a service is shown;
``authz.visibility`` for several). The figures come from the service's deployer
(``BaseModelDeployer.metrics``); reasons go through ``masking.mask_text``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import FastAPI, Query
from pydantic import BaseModel, Field

from airflow_provider_modeldeploy.exceptions import ServiceNotFoundError
from airflow_provider_modeldeploy.masking import mask_text
from airflow_provider_modeldeploy.plugins.app import _UUID, _readable, _registry
from airflow_provider_modeldeploy.plugins.authz import Reader, visibility

MAX_SPARKLINES = 100


class MetricsPointModel(BaseModel):
    t: datetime = Field(description="the step's start")
    requests: int
    errors: int = Field(description="answers with status >= 400 (client_errors + server_errors)")
    client_errors: int
    server_errors: int
    rows: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class VersionSeriesModel(BaseModel):
    model_version: str
    role: Literal["main", "canary", "previous"]
    points: list[MetricsPointModel]


class MetricsSummaryModel(BaseModel):
    requests: int
    errors: int
    error_rate: float | None = Field(description="errors / requests; null with no requests")
    requests_per_minute: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    in_flight: int | None
    rows: int


class MetricsEventModel(BaseModel):
    t: datetime
    action: str
    model_version: str | None


class ServiceMetricsModel(BaseModel):
    uuid: str
    window: Literal["1h", "1d"]
    step_seconds: int
    start: datetime
    end: datetime
    available: bool = Field(description="false: the backend cannot tell (reason says why); never zeros")
    reason: str | None
    source: Literal["serving-agent", "prometheus"] | None
    versions: list[VersionSeriesModel]
    summary: MetricsSummaryModel
    events: list[MetricsEventModel]


class SparklineModel(BaseModel):
    available: bool
    reason: str | None
    requests_per_minute: list[int] = Field(description="the last hour's 60 minutes, oldest first")
    p95_ms: list[float | None]


class SparklinesModel(BaseModel):
    services: dict[str, SparklineModel]


def service_metrics(uuid: str, window: str) -> dict:
    """The deployer's figures for a readable service, reasons masked."""
    from airflow_provider_modeldeploy.deployers import deployer_for_service
    from airflow_provider_modeldeploy.metrics import ServiceMetrics

    try:
        result = deployer_for_service(uuid).metrics(uuid, window)
    except Exception as exc:  # the page shows why, as for logs; the registry's own failures still raise
        from airflow_provider_modeldeploy.exceptions import RegistryUnavailableError
        from airflow_provider_modeldeploy.plugins.app import error_status

        if isinstance(exc, RegistryUnavailableError | ServiceNotFoundError):
            raise
        result = ServiceMetrics.unavailable(uuid, window, error_status(exc)[1])
    data = result.to_dict()
    data["reason"] = mask_text(data["reason"]) if data["reason"] else None
    data["totals"] = result.totals
    return data


def add_routes(app: FastAPI) -> None:
    """Called by ``app.create_app`` (this module imports it: it is loaded by then)."""

    @app.get(
        "/api/services/{uuid}/metrics", response_model=ServiceMetricsModel,
        summary="Requests, errors, latency and rows of one service over the last hour or day",
    )  # fmt: skip
    def get_metrics(user: Reader, uuid: _UUID, window: Literal["1h", "1d"] = "1h") -> dict:
        record = _readable(user, uuid)
        data = service_metrics(record.uuid, window)
        data.pop("totals")
        return data

    @app.get(
        "/api/metrics/sparklines", response_model=SparklinesModel,
        summary="The last hour's requests per minute and p95 latency of several services",
    )  # fmt: skip
    def get_sparklines(
        user: Reader,
        uuid: Annotated[
            list[str], Query(max_length=MAX_SPARKLINES, description="service uuids (unreadable ones are left out)")
        ],
    ) -> dict:
        registry = _registry()
        seen = visibility(user, registry.dag_ids())
        out: dict[str, dict] = {}
        for wanted in dict.fromkeys(uuid):
            try:
                record = registry.get_service(wanted)
            except ServiceNotFoundError:
                continue
            if not (record.dag_id in seen.dag_ids if record.dag_id else seen.no_dag):
                continue  # as if it did not exist: the list does not show it either
            data = service_metrics(record.uuid, "1h")
            totals = data["totals"]
            out[wanted] = {
                "available": data["available"], "reason": data["reason"],
                "requests_per_minute": [p.requests for p in totals] if data["available"] else [],
                "p95_ms": [p.p95_ms for p in totals] if data["available"] else [],
            }  # fmt: skip
        return {"services": out}
