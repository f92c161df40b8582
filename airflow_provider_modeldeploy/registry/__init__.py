"""The served-models registry: the provider's own database (SQLite by default, PostgreSQL in production)."""

from __future__ import annotations

from airflow_provider_modeldeploy.registry.store import EndpointLease, Registry, get_registry

__all__ = ["EndpointLease", "Registry", "get_registry"]
