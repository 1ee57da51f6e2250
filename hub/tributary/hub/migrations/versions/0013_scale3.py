"""Incremental aggregation: running sums per study and spoke, the last full pass's figures.

Revision ID: 0013_scale3
Revises: 0012_spoke_capacity
Create Date: 2026-12-06 01:50:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0013_scale3'
down_revision: str | None = '0012_spoke_capacity'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_S = sqlmodel.sql.sqltypes.AutoString
_T = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    # Studies that exist already have no running sums: they keep full recomputation.
    with op.batch_alter_table('experiment', schema=None) as batch_op:
        batch_op.add_column(sa.Column('aggregate_incremental', sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
    op.create_table('aggregatepartial',
    sa.Column('experiment_id', _S(), nullable=False),
    sa.Column('spoke_id', _S(), nullable=False),
    sa.Column('sums', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiment.id'], ),
    sa.PrimaryKeyConstraint('experiment_id', 'spoke_id')
    )
    op.create_table('aggregatefull',
    sa.Column('experiment_id', _S(), nullable=False),
    sa.Column('computed_at', _T(), nullable=False),
    sa.Column('inputs_sha256', _S(), nullable=False),
    sa.Column('results', sa.Integer(), nullable=False),
    sa.Column('aggregator', _S(), nullable=False),
    sa.Column('parameters', sa.JSON(), nullable=True),
    sa.Column('groups', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['experiment_id'], ['experiment.id'], ),
    sa.PrimaryKeyConstraint('experiment_id')
    )


def downgrade() -> None:
    op.drop_table('aggregatefull')
    op.drop_table('aggregatepartial')
    with op.batch_alter_table('experiment', schema=None) as batch_op:
        batch_op.drop_column('aggregate_incremental')
