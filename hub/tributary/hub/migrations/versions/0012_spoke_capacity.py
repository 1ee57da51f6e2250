"""Spokes report their capacity (GPUs, /tmp, limits, executor) in heartbeats.

Revision ID: 0012_spoke_capacity
Revises: 0011_training2
Create Date: 2026-12-06 01:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012_spoke_capacity'
down_revision: str | None = '0011_training2'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('spoke', schema=None) as batch_op:
        batch_op.add_column(sa.Column('capacity', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('spoke', schema=None) as batch_op:
        batch_op.drop_column('capacity')
