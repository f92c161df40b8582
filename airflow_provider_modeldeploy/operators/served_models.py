"""Operators over the deployer interface. They never branch on the backend: the connection does.

Only the Task SDK is imported here; deployers (and mlflow, httpx, SQLAlchemy) are imported when a
task runs, so DAG files that use these operators parse fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_modeldeploy.services import Lineage, Service

#: What a deploy task pushes to XCom: enough to find and call the model, never a secret.
XCOM_FIELDS = (
    "uuid", "backend", "endpoint", "model_name", "model_uri", "model_version", "model_run_id",
    "served_uri", "prediction_url", "health_url", "state", "dag_id", "run_id", "task_id", "conn_id",
)  # fmt: skip


def service_record(service: Service) -> dict[str, Any]:
    from airflow_provider_modeldeploy.masking import mask

    data = service.to_dict()
    return mask({key: data.get(key) for key in XCOM_FIELDS})


def _shown(uri: str | None) -> str | None:
    from airflow_provider_modeldeploy.masking import mask_text

    return mask_text(uri) if uri else uri


def lineage_from_context(context: Context) -> Lineage:
    from airflow_provider_modeldeploy.services import Lineage

    ti = context["ti"]
    return Lineage(
        dag_id=ti.dag_id,
        run_id=ti.run_id,
        task_id=ti.task_id,
        map_index=getattr(ti, "map_index", -1) if getattr(ti, "map_index", -1) is not None else -1,
        try_number=getattr(ti, "try_number", None),
    )


class DeployModelOperator(BaseOperator):
    """Serve an MLflow model, replacing in place the server already at its endpoint.

    The new server takes traffic at the endpoint's unchanged prediction URL only once it answers
    health and a smoke prediction; if it fails, the previous server keeps serving and the task
    fails naming the cause. A retried task that already deployed the model does not deploy again.

    :param model_uri: MLflow model URI (``models:/name@alias``, ``models:/name/3``, ``runs:/id/model``,
        a path). Templated.
    :param model_name: the model's name, also the endpoint name unless ``endpoint`` is set. Templated.
    :param conn_id: deployer connection (``modeldeploy_mlflow``, ...); None for the default.
    :param replace: replace a server already at the endpoint (else that is an error).
    :param timeout: seconds the new server may take to load and answer.
    :param wait_for_healthy: after deploying, check the public health URL answers.
    :param endpoint: logical endpoint name (default: ``model_name``). Templated.
    :param backend_options: backend options, e.g. ``{"workers": 2}`` for MLflow. Templated.
    :param reason: why this deployment happens, recorded with the task in the endpoint history (e.g.
        ``alias champion of iris moved 2 -> 1``). Templated.
    :return: (XCom) a JSON record: uuid, model_name, model_uri, model_version, prediction_url, state, backend, ...
    """

    template_fields: Sequence[str] = ("model_uri", "model_name", "endpoint", "conn_id", "backend_options", "reason")
    ui_color = "#d5f5e3"

    def __init__(
        self,
        *,
        model_uri: str,
        model_name: str,
        conn_id: str | None = None,
        replace: bool = True,
        timeout: int = 300,
        wait_for_healthy: bool = True,
        endpoint: str | None = None,
        backend_options: dict[str, Any] | None = None,
        reason: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.reason = reason
        self.model_uri = model_uri
        self.model_name = model_name
        self.conn_id = conn_id
        self.replace = replace
        self.timeout = timeout
        self.wait_for_healthy = wait_for_healthy
        self.endpoint = endpoint
        self.backend_options = backend_options or {}

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_provider_modeldeploy.deployers import ServiceConfig, get_model_deployer

        deployer = get_model_deployer(self.conn_id)
        config = ServiceConfig(
            model_uri=self.model_uri, model_name=self.model_name, endpoint=self.endpoint, **self.backend_options
        )
        self.log.info(
            "Deploying %s as %s with the %s backend", _shown(self.model_uri), config.endpoint_name, deployer.backend
        )
        lineage = lineage_from_context(context)
        lineage.reason = self.reason or None
        service = deployer.deploy_model(config, replace=self.replace, timeout=self.timeout, lineage=lineage)
        if self.wait_for_healthy:
            deployer.wait_until_healthy(service, timeout=self.timeout)
        self.log.info(
            "Service %s serves %s (version %s) at %s",
            service.uuid,
            _shown(service.record.model_uri),
            service.record.model_version,
            _shown(service.prediction_url),
        )
        return service_record(service)


class _ServedModelsOperator(BaseOperator):
    """Acts on the services picked by uuid, or by model name / DAG / task filters."""

    template_fields: Sequence[str] = ("service_uuid", "model_name", "filter_dag_id", "filter_task_id")

    def __init__(
        self,
        *,
        service_uuid: str | None = None,
        model_name: str | None = None,
        filter_dag_id: str | None = None,
        filter_task_id: str | None = None,
        timeout: int = 300,
        missing_ok: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.service_uuid = service_uuid
        self.model_name = model_name
        self.filter_dag_id = filter_dag_id
        self.filter_task_id = filter_task_id
        self.timeout = timeout
        self.missing_ok = missing_ok

    def _services(self) -> list[Service]:
        from airflow_provider_modeldeploy.deployers import find_services
        from airflow_provider_modeldeploy.exceptions import InvalidParameterError, ServiceNotFoundError

        filters = {
            "service_uuid": self.service_uuid,
            "model_name": self.model_name,
            "dag_id": self.filter_dag_id,
            "task_id": self.filter_task_id,
        }
        if not any(filters.values()):
            raise InvalidParameterError(
                "service_uuid", None, "give a service uuid or at least one of model_name, filter_dag_id, filter_task_id"
            )
        services = find_services(**filters)
        if not services and not self.missing_ok:
            shown = ", ".join(f"{k}={v!r}" for k, v in filters.items() if v)
            raise ServiceNotFoundError("filter", shown)
        return services

    def act(self, service: Service) -> Service | None:
        raise NotImplementedError

    def execute(self, context: Context) -> list[dict[str, Any]]:
        results = []
        for service in self._services():
            updated = self.act(service)
            results.append(service_record(updated or service) | ({"state": "deleted"} if updated is None else {}))
        return results


class StartServedModelOperator(_ServedModelsOperator):
    """Start stopped served models again, at their endpoint's prediction URL."""

    def act(self, service: Service) -> Service:
        self.log.info("Starting service %s (%s)", service.uuid, _shown(service.record.model_uri))
        return service.start(timeout=self.timeout)


class StopServedModelOperator(_ServedModelsOperator):
    """Stop served models (gracefully: in-flight requests finish); they can be started again.

    :param force: kill at once instead of draining.
    """

    def __init__(self, *, force: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.force = force

    def act(self, service: Service) -> Service:
        self.log.info("Stopping service %s (%s)", service.uuid, _shown(service.record.model_uri))
        return service.stop(timeout=self.timeout, force=self.force)


class DeleteServedModelOperator(StopServedModelOperator):
    """Stop served models and remove them from the registry (their endpoint history stays)."""

    def act(self, service: Service) -> None:
        self.log.info("Deleting service %s (%s)", service.uuid, _shown(service.record.model_uri))
        service.delete(timeout=self.timeout, force=self.force)
        return None


class PromoteServedModelOperator(_ServedModelsOperator):
    """Give canaries all of their endpoint's traffic (backends with canaries, e.g. Seldon Core)."""

    def act(self, service: Service) -> Service:
        self.log.info("Promoting canary service %s (%s)", service.uuid, _shown(service.record.model_uri))
        return service.promote(timeout=self.timeout)


class RollbackServedModelOperator(_ServedModelsOperator):
    """Serve an earlier version of each picked service's endpoint again, in place; a canary in
    progress is removed and the version it was tried against takes all traffic again.

    :param to_service_uuid: the earlier service (from the endpoint's history) to serve again;
        default: the one the serving service replaced.
    """

    template_fields: Sequence[str] = (*_ServedModelsOperator.template_fields, "to_service_uuid")

    def __init__(self, *, to_service_uuid: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.to_service_uuid = to_service_uuid

    def act(self, service: Service) -> Service:
        self.log.info("Rolling back endpoint %s of service %s", service.record.endpoint, service.uuid)
        return service.rollback(self.to_service_uuid, timeout=self.timeout)
