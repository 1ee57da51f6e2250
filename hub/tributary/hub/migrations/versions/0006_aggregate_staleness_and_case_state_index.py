"""Decoupled aggregation: each experiment says since when its stored aggregate lags behind
its results and when a hub process last claimed its recomputation; and an index on cases by
(experiment, spoke, state), so progress is counted without reading case rows.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 08:40:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('experiment', schema=None) as batch_op:
        batch_op.add_column(sa.Column('aggregate_stale_since',
                                      sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('aggregate_claimed_at',
                                      sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    with op.batch_alter_table('caseresult', schema=None) as batch_op:
        batch_op.create_index('ix_caseresult_experiment_spoke_state',
                              ['experiment_id', 'spoke_id', 'state'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('caseresult', schema=None) as batch_op:
        batch_op.drop_index('ix_caseresult_experiment_spoke_state')
    with op.batch_alter_table('experiment', schema=None) as batch_op:
        batch_op.drop_column('aggregate_claimed_at')
        batch_op.drop_column('aggregate_stale_since')
