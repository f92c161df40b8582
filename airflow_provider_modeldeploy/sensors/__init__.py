"""Sensors waiting on served models."""

from __future__ import annotations

from airflow_provider_modeldeploy.sensors.health import ServedModelHealthSensor

__all__ = ["ServedModelHealthSensor"]
