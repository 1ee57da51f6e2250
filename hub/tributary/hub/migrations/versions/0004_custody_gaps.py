"""Custody gaps: records of a spoke's chain that never reached the hub, and when a spoke
said a target was done (a target completes only once every case has its result).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 16:20:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('experimenttarget', schema=None) as batch_op:
        batch_op.add_column(sa.Column('spoke_completed_at',
                                      sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
    op.create_table('custodygap',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('spoke_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('first_missing', sa.Integer(), nullable=False),
    sa.Column('last_missing', sa.Integer(), nullable=True),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('detected_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('resend_requested_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('resend_requests', sa.Integer(), nullable=False),
    sa.Column('settled_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('accepted_by', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('accepted_reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('lost_cases', sa.JSON(), nullable=True),
    sa.ForeignKeyConstraint(['spoke_id'], ['spoke.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('custodygap', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_custodygap_spoke_id'), ['spoke_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('experimenttarget', schema=None) as batch_op:
        batch_op.drop_column('spoke_completed_at')
    with op.batch_alter_table('custodygap', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_custodygap_spoke_id'))
    op.drop_table('custodygap')
