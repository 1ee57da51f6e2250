"""Training studies keep their server optimiser's settings, and each aggregated round the
digest of the optimiser's moments after it.

Revision ID: 0015_trainopt
Revises: 0014_trainhub
Create Date: 2026-12-06 04:40:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0015_trainopt'
down_revision: str | None = '0014_trainhub'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('trainingstudy', schema=None) as batch_op:
        batch_op.add_column(sa.Column('server_optimiser', sa.JSON(), nullable=True))
    with op.batch_alter_table('traininground', schema=None) as batch_op:
        batch_op.add_column(sa.Column('optimiser_state_out', sqlmodel.sql.sqltypes.AutoString(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('traininground', schema=None) as batch_op:
        batch_op.drop_column('optimiser_state_out')
    with op.batch_alter_table('trainingstudy', schema=None) as batch_op:
        batch_op.drop_column('server_optimiser')
