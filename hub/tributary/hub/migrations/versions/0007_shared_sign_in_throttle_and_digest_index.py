"""Sign-in failures in the database, so every web process of a hub throttles the same
count; and an index of cases by (experiment, state, spoke, case) that also covers the
aggregate's freshness digest (attempt, arrival, message): the case list filtered by state
reads its page in order, and a page learns whether its snapshot is current from the index.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 12:50:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'signinfailure',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('key', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('id'))
    with op.batch_alter_table('signinfailure', schema=None) as batch_op:
        batch_op.create_index('ix_signinfailure_kind_key_at', ['kind', 'key', 'at'],
                              unique=False)
        batch_op.create_index(batch_op.f('ix_signinfailure_at'), ['at'], unique=False)
    with op.batch_alter_table('caseresult', schema=None) as batch_op:
        batch_op.create_index('ix_caseresult_experiment_state_case',
                              ['experiment_id', 'state', 'spoke_id', 'case_id', 'attempt',
                               'received_at', 'result_message_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('caseresult', schema=None) as batch_op:
        batch_op.drop_index('ix_caseresult_experiment_state_case')
    with op.batch_alter_table('signinfailure', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_signinfailure_at'))
        batch_op.drop_index('ix_signinfailure_kind_key_at')
    op.drop_table('signinfailure')
