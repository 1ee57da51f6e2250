"""Training rounds keep each joined spoke's announced local loss (for the mean per round).

Revision ID: 0014_trainhub
Revises: 0013_scale3
Create Date: 2026-12-06 01:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0014_trainhub'
down_revision: str | None = '0013_scale3'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('traininground', schema=None) as batch_op:
        batch_op.add_column(sa.Column('losses', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('traininground', schema=None) as batch_op:
        batch_op.drop_column('losses')
