"""Wait until a served model answers health, and optionally a sample prediction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_provider_modeldeploy.services import Service


def _default_deferrable() -> bool:
    """``[operators] default_deferrable``, as Airflow's own deferrable operators default to it."""
    try:
        from airflow.sdk.configuration import conf
    except ImportError:  # Airflow < 3.2
        from airflow.configuration import conf

    return conf.getboolean("operators", "default_deferrable", fallback=False)


class ServedModelHealthSensor(BaseSensorOperator):
    """Succeeds when the served model answers its health URL (and ``sample_input``, when given).

    The service is picked by ``service_uuid`` (e.g. ``{{ ti.xcom_pull('deploy')['uuid'] }}``) or
    by ``model_name`` (its active service). With ``deferrable=True`` the wait runs in the
    triggerer and frees the worker slot.

    :param service_uuid: the service to wait on. Templated.
    :param model_name: or the model whose active service to wait on. Templated.
    :param sample_input: JSON body (str, dict or list) POSTed to the prediction URL; it must answer 200.
        Templated.
    :param deferrable: wait in the triggerer instead of a worker slot (default: ``[operators]
        default_deferrable``, as for Airflow's own operators).
    """

    template_fields: Sequence[str] = ("service_uuid", "model_name", "sample_input")
    ui_color = "#e8f8f5"

    def __init__(
        self,
        *,
        service_uuid: str | None = None,
        model_name: str | None = None,
        sample_input: Any = None,
        deferrable: bool = _default_deferrable(),
        poke_interval: float = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(poke_interval=poke_interval, **kwargs)
        self.service_uuid = service_uuid
        self.model_name = model_name
        self.sample_input = sample_input
        self.deferrable = deferrable

    def _service(self) -> Service:
        from airflow_provider_modeldeploy.deployers import find_services
        from airflow_provider_modeldeploy.exceptions import InvalidParameterError, ServiceNotFoundError

        if self.service_uuid:
            services = find_services(service_uuid=self.service_uuid)
            if not services:
                raise ServiceNotFoundError("service_uuid", self.service_uuid)
            return services[0]
        if not self.model_name:
            raise InvalidParameterError("service_uuid", self.service_uuid, "give a service uuid or a model_name")
        services = find_services(model_name=self.model_name)
        if not services:
            raise ServiceNotFoundError("model_name", self.model_name)
        running = [s for s in services if s.is_running]
        return (running or services)[0]

    def poke(self, context: Context) -> bool:
        from airflow_provider_modeldeploy.exceptions import DeploymentFailedError
        from airflow_provider_modeldeploy.health import check_health, is_final

        service = self._service()
        if service.is_failed:
            raise DeploymentFailedError(f"uuid={service.uuid!r}: {service.status.last_error}")
        if not service.is_running or not service.health_url:
            self.log.info("Service %s is %s", service.uuid, service.status.state)
            return False
        ok, reason = check_health(service.health_url, service.prediction_url, self.sample_input)
        self.log.info("Service %s at %s: %s", service.uuid, service.health_url, reason)
        if not ok and is_final(reason):
            raise DeploymentFailedError(f"service {service.uuid}: {reason}")  # the sample is refused
        return ok

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        if self.poke(context):
            return None
        service = self._service()
        if not service.record.health_url:
            from airflow_provider_modeldeploy.exceptions import DeploymentFailedError

            raise DeploymentFailedError(
                f"uuid={service.uuid!r}: the service has no health URL (state {service.status.state})"
            )
        from airflow_provider_modeldeploy.triggers.health import ServedModelHealthTrigger

        self.defer(
            trigger=ServedModelHealthTrigger(
                service_uuid=service.uuid,
                health_url=service.record.health_url,
                prediction_url=service.record.prediction_url,
                sample_input=self.sample_input,
                poll_interval=self.poke_interval,
                timeout=self.timeout,
            ),
            method_name="execute_complete",
            timeout=timedelta(seconds=self.timeout) if self.timeout else None,
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> None:
        from airflow_provider_modeldeploy.exceptions import DeploymentFailedError
        from airflow_provider_modeldeploy.triggers.health import HealthOutcome

        outcome, message = event.get("status"), f"service {event.get('service_uuid')}: {event.get('message')}"
        if outcome == HealthOutcome.HEALTHY:
            self.log.info("Service %s: %s", event.get("service_uuid"), event.get("message"))
            return
        if outcome == HealthOutcome.FAILED:
            raise DeploymentFailedError(message)  # the sample is refused: no point in waiting
        from airflow.sdk.exceptions import AirflowSensorTimeout

        raise AirflowSensorTimeout(message)
