"""Federated training: training studies and their rounds (durable SecAgg+ state).

Revision ID: 0011_training2
Revises: 0008
Create Date: 2026-12-05 17:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0011_training2'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_S = sqlmodel.sql.sqltypes.AutoString
_T = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    op.create_table('trainingstudy',
    sa.Column('id', _S(), nullable=False),
    sa.Column('name', _S(), nullable=False),
    sa.Column('algorithm', _S(), nullable=False),
    sa.Column('strategy', _S(), nullable=False),
    sa.Column('proximal_mu', sa.Float(), nullable=False),
    sa.Column('rounds', sa.Integer(), nullable=False),
    sa.Column('min_participants', sa.Integer(), nullable=False),
    sa.Column('round_deadline_s', sa.Float(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('clip_bound', sa.Float(), nullable=False),
    sa.Column('noise_multiplier', sa.Float(), nullable=False),
    sa.Column('epsilon_budget', sa.Float(), nullable=False),
    sa.Column('delta', sa.Float(), nullable=False),
    sa.Column('spokes', sa.JSON(), nullable=True),
    sa.Column('global_model', _S(), nullable=True),
    sa.Column('state', _S(), nullable=False),
    sa.Column('stop_reason', _S(), nullable=True),
    sa.Column('ledgers', sa.JSON(), nullable=True),
    sa.Column('created_by', _S(), nullable=False),
    sa.Column('created_at', _T(), nullable=False),
    sa.Column('finished_at', _T(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('traininground',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_id', _S(), nullable=False),
    sa.Column('round_index', sa.Integer(), nullable=False),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('round_id', _S(), nullable=False),
    sa.Column('stage', _S(), nullable=False),
    sa.Column('stage_deadline', _T(), nullable=False),
    sa.Column('participants', sa.JSON(), nullable=True),
    sa.Column('secagg', sa.JSON(), nullable=True),
    sa.Column('num_examples', sa.JSON(), nullable=True),
    sa.Column('uploads', sa.JSON(), nullable=True),
    sa.Column('global_model_in', _S(), nullable=True),
    sa.Column('global_model_out', _S(), nullable=True),
    sa.Column('epsilon_cumulative', sa.Float(), nullable=True),
    sa.Column('mean_loss', sa.Float(), nullable=True),
    sa.Column('outcome_reason', _S(), nullable=True),
    sa.Column('opened_at', _T(), nullable=False),
    sa.Column('closed_at', _T(), nullable=True),
    sa.ForeignKeyConstraint(['study_id'], ['trainingstudy.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('round_id'),
    sa.UniqueConstraint('study_id', 'round_index', 'attempt')
    )
    with op.batch_alter_table('traininground', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_traininground_study_id'), ['study_id'],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table('traininground', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_traininground_study_id'))
    op.drop_table('traininground')
    op.drop_table('trainingstudy')
