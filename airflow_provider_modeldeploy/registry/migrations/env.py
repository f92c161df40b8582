"""Alembic environment of the served-models registry; run programmatically by Registry.ensure_schema."""

from __future__ import annotations

from alembic import context

from airflow_provider_modeldeploy.registry.models import metadata
from airflow_provider_modeldeploy.registry.store import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
