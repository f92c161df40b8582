"""Tables of the served-models registry. Changing them needs a new Alembic revision in migrations/.

SQLAlchemy Core tables, not ORM classes: configuring any ORM mapper in a process fires Airflow's
``before_configured`` hook, which imports all of Airflow's models (about 0.8 s of CPU in every
``airflow served-models`` command and every deploying task); the registry needs none of them.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, Column, DateTime, Index, Integer, MetaData, String, Table, Text, text

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


metadata = MetaData(naming_convention=NAMING)

#: One model server.
services = Table(
    "modeldeploy_service",
    metadata,
    Column("uuid", String(36), primary_key=True),
    Column("backend", String(32), nullable=False),
    Column("endpoint", String(63), nullable=False),
    Column("conn_id", String(250)),
    Column("model_name", String(63), nullable=False),
    Column("model_uri", Text, nullable=False),
    Column("served_uri", Text),
    Column("model_version", String(64)),
    Column("model_run_id", String(64)),
    Column("dag_id", String(250)),
    Column("run_id", String(250)),
    Column("task_id", String(250)),
    Column("map_index", Integer, nullable=False, default=-1),
    Column("try_number", Integer),
    Column("config", JSON, nullable=False, default=dict),
    Column("state", String(16), nullable=False),
    Column("last_error", Text),
    Column("prediction_url", Text),
    Column("health_url", Text),
    Column("host", String(255)),
    Column("pid", Integer),
    # The serving agent that runs the service (local backend): every host acts through agent_url.
    Column("agent_id", String(64)),
    Column("agent_url", Text),
    Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
    Column("updated_at", DateTime(timezone=True), nullable=False, default=utcnow, onupdate=utcnow),
    Index("ix_modeldeploy_service_endpoint", "backend", "endpoint"),
    Index("ix_modeldeploy_service_model_name", "model_name"),
    Index("ix_modeldeploy_service_dag_id", "dag_id", "task_id"),
    Index("ix_modeldeploy_service_updated_at", "updated_at"),
    # The database itself guarantees one active server per endpoint, whatever races above it.
    Index(
        "uq_modeldeploy_service_one_active",
        "backend",
        "endpoint",
        unique=True,
        sqlite_where=text("state = 'active'"),
        postgresql_where=text("state = 'active'"),
    ),
)

#: A logical endpoint: its stable address and the lease that serialises deployments to it.
endpoints = Table(
    "modeldeploy_endpoint",
    metadata,
    Column("backend", String(32), primary_key=True),
    Column("name", String(63), primary_key=True),
    Column("conn_id", String(250)),
    Column("address", JSON, nullable=False, default=dict),
    Column("lock_owner", String(64)),
    Column("lock_host", String(255)),
    Column("lock_pid", Integer),
    Column("lock_expires_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
)

#: The history of an endpoint: who did what, when, with which outcome.
events = Table(
    "modeldeploy_event",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("backend", String(32), nullable=False),
    Column("endpoint", String(63), nullable=False),
    Column("service_uuid", String(36)),
    Column("action", String(16), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("actor", Text),
    Column("message", Text),
    Column("details", JSON, nullable=False, default=dict),
    Column("created_at", DateTime(timezone=True), nullable=False, default=utcnow),
    Index("ix_modeldeploy_event_endpoint", "backend", "endpoint", "id"),
)
