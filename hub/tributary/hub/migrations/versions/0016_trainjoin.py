"""A training study names the registered, approved algorithm version it runs; a round
attempt keeps the spokes that refused it (the stages no longer wait for them); the hub
keeps each spoke's training custody records (its chain is checked across rounds).

Revision ID: 0016_trainjoin
Revises: 0015_trainopt
Create Date: 2026-12-06 04:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0016_trainjoin'
down_revision: str | None = '0015_trainopt'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('trainingstudy', schema=None) as batch_op:
        batch_op.add_column(sa.Column('algorithm_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key('fk_trainingstudy_algorithm_id', 'algorithm',
                                    ['algorithm_id'], ['id'])
    with op.batch_alter_table('traininground', schema=None) as batch_op:
        batch_op.add_column(sa.Column('refused', sa.JSON(), nullable=True))
    op.create_table(
        'trainingcustody',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('spoke_id', sa.String(), nullable=False),
        sa.Column('sequence', sa.Integer(), nullable=False),
        sa.Column('record_sha256', sa.String(), nullable=False),
        sa.Column('study_id', sa.String(), nullable=False),
        sa.Column('round_id', sa.String(), nullable=False),
        sa.Column('object_digest', sa.String(), nullable=False),
        sa.Column('envelope', sa.JSON(), nullable=True),
        sa.Column('received_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('spoke_id', 'sequence'),
    )
    op.create_index(op.f('ix_trainingcustody_spoke_id'), 'trainingcustody', ['spoke_id'],
                    unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_trainingcustody_spoke_id'), table_name='trainingcustody')
    op.drop_table('trainingcustody')
    with op.batch_alter_table('traininground', schema=None) as batch_op:
        batch_op.drop_column('refused')
    with op.batch_alter_table('trainingstudy', schema=None) as batch_op:
        batch_op.drop_constraint('fk_trainingstudy_algorithm_id', type_='foreignkey')
        batch_op.drop_column('algorithm_id')
