"""Operators that deploy, replace, start, stop and delete served models, whatever the backend."""

from __future__ import annotations

from airflow_provider_modeldeploy.operators.served_models import (
    DeleteServedModelOperator,
    DeployModelOperator,
    PromoteServedModelOperator,
    RollbackServedModelOperator,
    StartServedModelOperator,
    StopServedModelOperator,
)

__all__ = [
    "DeleteServedModelOperator",
    "DeployModelOperator",
    "PromoteServedModelOperator",
    "RollbackServedModelOperator",
    "StartServedModelOperator",
    "StopServedModelOperator",
]
