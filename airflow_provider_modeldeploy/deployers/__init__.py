"""Model deployers: one backend-agnostic interface; the connection's type picks the backend.

>>> from airflow_provider_modeldeploy.deployers import ServiceConfig, get_model_deployer
>>> deployer = get_model_deployer()            # modeldeploy_default, or local MLflow defaults
>>> service = deployer.deploy_model(ServiceConfig(model_uri="models:/iris@champion", model_name="iris"))
>>> service.prediction_url
'http://127.0.0.1:5200/invocations'
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from airflow_provider_modeldeploy import config
from airflow_provider_modeldeploy.exceptions import InvalidParameterError
from airflow_provider_modeldeploy.services import Lineage, Service, ServiceConfig, ServiceState, states_of

if TYPE_CHECKING:
    from airflow_provider_modeldeploy.deployers.base import BaseModelDeployer, SyncReport

__all__ = [
    "Lineage",
    "Service",
    "ServiceConfig",
    "ServiceState",
    "deployer_for_service",
    "get_model_deployer",
    "sync_all",
]

log = logging.getLogger(__name__)

#: connection type -> "module:Class" of its deployer. Backends are imported only when used.
DEPLOYERS: dict[str, str] = {
    "modeldeploy_mlflow": "airflow_provider_modeldeploy.deployers.mlflow_local:MLflowLocalDeployer",
    "modeldeploy_seldon": "airflow_provider_modeldeploy.deployers.seldon:SeldonDeployer",
    "modeldeploy_kserve": "airflow_provider_modeldeploy.deployers.kserve:KServeDeployer",
}


def _in_task() -> bool:
    try:
        from airflow.sdk.execution_time import task_runner
    except ImportError:  # pragma: no cover
        return False
    return getattr(task_runner, "SUPERVISOR_COMMS", None) is not None


def _lookup_connection(conn_id: str) -> Any | None:
    """The Airflow connection, or None when it is not defined anywhere this process may look."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        pass
    if _in_task() or os.environ.get("_MODELDEPLOY_NO_METASTORE"):
        return None
    # CLI and API server processes may read connections stored in Airflow's metadata database.
    try:
        from airflow.models.connection import Connection

        return Connection.get_connection_from_secrets(conn_id)
    except Exception:
        return None


def _load(path: str) -> type[BaseModelDeployer]:
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def get_model_deployer(conn_id: str | None = None) -> BaseModelDeployer:
    """The deployer for a connection; its type (``modeldeploy_mlflow``, ...) picks the backend.

    With no ``conn_id`` the configured default connection is used, and when that is not defined,
    the local MLflow backend with default settings: zero configuration.
    """
    if conn_id is not None and (not isinstance(conn_id, str) or not conn_id.strip()):
        raise InvalidParameterError("conn_id", conn_id, "must be a non-empty connection id")
    explicit = conn_id is not None
    conn_id = conn_id or config.default_conn_id()
    conn = _lookup_connection(conn_id)
    if conn is None:
        if explicit and conn_id != config.default_conn_id():
            raise InvalidParameterError("conn_id", conn_id, "no Airflow connection has this id")
        from airflow_provider_modeldeploy.deployers.mlflow_local import MLflowLocalDeployer

        return MLflowLocalDeployer(conn_id=None)
    conn_type = conn.conn_type
    if conn_type not in DEPLOYERS:
        raise InvalidParameterError(
            "conn_id", conn_id,
            f"is a '{conn_type}' connection, not a model deployer connection "
            f"(use one of: {', '.join(sorted(DEPLOYERS))})",
        )  # fmt: skip
    return _load(DEPLOYERS[conn_type]).from_connection(conn_id, conn)


def deployer_for_service(service_uuid: str) -> BaseModelDeployer:
    """The deployer that manages an existing service (the one of the connection that deployed it)."""
    from airflow_provider_modeldeploy.registry import get_registry

    record = get_registry().get_service(service_uuid)
    deployer = get_model_deployer(record.conn_id) if record.conn_id else get_model_deployer()
    if deployer.backend != record.backend:
        raise InvalidParameterError(
            "conn_id",
            record.conn_id,
            f"now picks the {deployer.backend} backend, but service {record.uuid} runs on {record.backend}",
        )
    return deployer


def find_services(
    *,
    service_uuid: str | None = None,
    model_name: str | None = None,
    endpoint: str | None = None,
    dag_id: str | None = None,
    task_id: str | None = None,
    run_id: str | None = None,
    running: bool | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[Service]:
    """Services of every backend matching the filters, each bound to the deployer that manages it."""
    from airflow_provider_modeldeploy.exceptions import ModelDeployError, ServiceNotFoundError
    from airflow_provider_modeldeploy.registry import get_registry

    registry = get_registry()
    if service_uuid is not None:
        # A uuid names one service (exactly, or by a unique prefix): never every service it prefixes.
        try:
            uuid = registry.get_service(service_uuid).uuid
        except ServiceNotFoundError:
            return []
    else:
        uuid = None
    records = registry.find_services(
        service_uuid=uuid, model_name=model_name, endpoint=endpoint, dag_id=dag_id,
        task_id=task_id, run_id=run_id, states=states_of(running), limit=limit, offset=offset,
    )  # fmt: skip
    deployers: dict[tuple[str, str | None], BaseModelDeployer | None] = {}
    services = []
    for record in records:
        key = (record.backend, record.conn_id)
        if key not in deployers:
            try:
                deployers[key] = deployer_for_service(record.uuid)
            except ModelDeployError as exc:
                # One backend out of reach (its connection removed or changed) must not hide the
                # others: its services are listed as the registry knows them, not re-checked.
                log.warning("Services of %s / %s are shown unchecked: %s", record.backend, record.conn_id, exc)
                deployers[key] = None
        deployer = deployers[key]
        services.append(deployer.service_for(record) if deployer is not None else Service(record, None))
    if running is not None:  # checked against the backend since: a server found dead is not shown running
        services = [s for s in services if s.is_running == running]
    return services


def sync_all(conn_ids: list[str] | None = None, dry_run: bool = False) -> list[SyncReport]:
    """Reconcile the registry with every backend it names, the default one and ``conn_ids``
    (``dry_run``: only say what would change)."""
    from airflow_provider_modeldeploy.registry import get_registry

    deployers: dict[tuple[str, str | None], BaseModelDeployer] = {}
    for conn_id in [None, *get_registry().connection_ids(), *(conn_ids or [])]:
        deployer = get_model_deployer(conn_id)
        deployers.setdefault((deployer.backend, deployer.conn_id), deployer)
    return [deployer.sync_services(dry_run=dry_run) for deployer in deployers.values()]
