"""Private set intersection: the PSI runs, each participating spoke's state and reported
size, and the relays the hub forwarded between spokes (sizes only once forwarded).

Revision ID: 0019_psi
Revises: 0018_catalog
Create Date: 2026-12-06 19:45:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0019_psi'
down_revision: str | None = '0018_catalog'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('psirun',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('mode', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('purpose', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('leader', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('expires_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.ForeignKeyConstraint(['leader'], ['spoke.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_psirun_created_at'), 'psirun', ['created_at'], unique=False)
    op.create_table('psimember',
    sa.Column('psi_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('spoke_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('count', sa.Integer(), nullable=True),
    sa.Column('fewer_than', sa.Integer(), nullable=True),
    sa.Column('request_message_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('updated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['psi_id'], ['psirun.id'], ),
    sa.ForeignKeyConstraint(['spoke_id'], ['spoke.id'], ),
    sa.PrimaryKeyConstraint('psi_id', 'spoke_id')
    )
    op.create_table('psirelayrecord',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('relay_message_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('psi_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('from_spoke', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('to_spoke', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('step', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('payload', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('received_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('forwarded_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.Column('forward_message_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.ForeignKeyConstraint(['psi_id'], ['psirun.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('relay_message_id')
    )
    op.create_index(op.f('ix_psirelayrecord_forwarded_at'), 'psirelayrecord', ['forwarded_at'], unique=False)
    op.create_index(op.f('ix_psirelayrecord_psi_id'), 'psirelayrecord', ['psi_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_psirelayrecord_psi_id'), table_name='psirelayrecord')
    op.drop_index(op.f('ix_psirelayrecord_forwarded_at'), table_name='psirelayrecord')
    op.drop_table('psirelayrecord')
    op.drop_table('psimember')
    op.drop_index(op.f('ix_psirun_created_at'), table_name='psirun')
    op.drop_table('psirun')
