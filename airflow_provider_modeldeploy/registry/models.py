"""Tables of the served-models registry. Changing them needs a new Alembic revision in migrations/."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Index, Integer, MetaData, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ServiceRow(Base):
    """One model server."""

    __tablename__ = "modeldeploy_service"

    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    backend: Mapped[str] = mapped_column(String(32))
    endpoint: Mapped[str] = mapped_column(String(63))
    conn_id: Mapped[str | None] = mapped_column(String(250))
    model_name: Mapped[str] = mapped_column(String(63))
    model_uri: Mapped[str] = mapped_column(Text)
    served_uri: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(String(64))
    model_run_id: Mapped[str | None] = mapped_column(String(64))
    dag_id: Mapped[str | None] = mapped_column(String(250))
    run_id: Mapped[str | None] = mapped_column(String(250))
    task_id: Mapped[str | None] = mapped_column(String(250))
    map_index: Mapped[int] = mapped_column(Integer, default=-1)
    try_number: Mapped[int | None] = mapped_column(Integer)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16))
    last_error: Mapped[str | None] = mapped_column(Text)
    prediction_url: Mapped[str | None] = mapped_column(Text)
    health_url: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(String(255))
    pid: Mapped[int | None] = mapped_column(Integer)
    # The serving agent that runs the service (local backend): every host acts through agent_url.
    agent_id: Mapped[str | None] = mapped_column(String(64))
    agent_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    __table_args__ = (
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


class EndpointRow(Base):
    """A logical endpoint: its stable address and the lease that serialises deployments to it."""

    __tablename__ = "modeldeploy_endpoint"

    backend: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    conn_id: Mapped[str | None] = mapped_column(String(250))
    address: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    lock_owner: Mapped[str | None] = mapped_column(String(64))
    lock_host: Mapped[str | None] = mapped_column(String(255))
    lock_pid: Mapped[int | None] = mapped_column(Integer)
    lock_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EventRow(Base):
    """The history of an endpoint: who did what, when, with which outcome."""

    __tablename__ = "modeldeploy_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    backend: Mapped[str] = mapped_column(String(32))
    endpoint: Mapped[str] = mapped_column(String(63))
    service_uuid: Mapped[str | None] = mapped_column(String(36))
    action: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str | None] = mapped_column(Text)
    message: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("ix_modeldeploy_event_endpoint", "backend", "endpoint", "id"),)
