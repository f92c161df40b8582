"""The served-models registry: services, endpoints and their history.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "modeldeploy_service",
        sa.Column("uuid", sa.String(36), nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("endpoint", sa.String(63), nullable=False),
        sa.Column("conn_id", sa.String(250), nullable=True),
        sa.Column("model_name", sa.String(63), nullable=False),
        sa.Column("model_uri", sa.Text(), nullable=False),
        sa.Column("served_uri", sa.Text(), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("model_run_id", sa.String(64), nullable=True),
        sa.Column("dag_id", sa.String(250), nullable=True),
        sa.Column("run_id", sa.String(250), nullable=True),
        sa.Column("task_id", sa.String(250), nullable=True),
        sa.Column("map_index", sa.Integer(), nullable=False),
        sa.Column("try_number", sa.Integer(), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("prediction_url", sa.Text(), nullable=True),
        sa.Column("health_url", sa.Text(), nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("uuid", name="pk_modeldeploy_service"),
    )
    op.create_index("ix_modeldeploy_service_endpoint", "modeldeploy_service", ["backend", "endpoint"])
    op.create_index("ix_modeldeploy_service_model_name", "modeldeploy_service", ["model_name"])
    op.create_index("ix_modeldeploy_service_dag_id", "modeldeploy_service", ["dag_id", "task_id"])
    op.create_index("ix_modeldeploy_service_updated_at", "modeldeploy_service", ["updated_at"])
    op.create_index(
        "uq_modeldeploy_service_one_active",
        "modeldeploy_service",
        ["backend", "endpoint"],
        unique=True,
        sqlite_where=sa.text("state = 'active'"),
        postgresql_where=sa.text("state = 'active'"),
    )
    op.create_table(
        "modeldeploy_endpoint",
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("name", sa.String(63), nullable=False),
        sa.Column("conn_id", sa.String(250), nullable=True),
        sa.Column("address", sa.JSON(), nullable=False),
        sa.Column("lock_owner", sa.String(64), nullable=True),
        sa.Column("lock_host", sa.String(255), nullable=True),
        sa.Column("lock_pid", sa.Integer(), nullable=True),
        sa.Column("lock_expires_at", _TS, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("backend", "name", name="pk_modeldeploy_endpoint"),
    )
    op.create_table(
        "modeldeploy_event",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("backend", sa.String(32), nullable=False),
        sa.Column("endpoint", sa.String(63), nullable=False),
        sa.Column("service_uuid", sa.String(36), nullable=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("actor", sa.Text(), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_modeldeploy_event"),
    )
    op.create_index("ix_modeldeploy_event_endpoint", "modeldeploy_event", ["backend", "endpoint", "id"])


def downgrade() -> None:
    op.drop_table("modeldeploy_event")
    op.drop_table("modeldeploy_endpoint")
    op.drop_index("uq_modeldeploy_service_one_active", table_name="modeldeploy_service")
    op.drop_table("modeldeploy_service")
