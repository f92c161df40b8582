"""Which serving agent runs each service: its id and the address every host acts through.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("modeldeploy_service") as batch:
        batch.add_column(sa.Column("agent_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("agent_url", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("modeldeploy_service") as batch:
        batch.drop_column("agent_url")
        batch.drop_column("agent_id")
