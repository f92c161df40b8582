"""The "Served Models" view of the Airflow 3 UI (an AirflowPlugin registered through the provider)."""

from __future__ import annotations

from airflow_provider_modeldeploy.plugins.served_models import ServedModelsPlugin

__all__ = ["ServedModelsPlugin"]
