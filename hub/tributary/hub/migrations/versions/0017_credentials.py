"""Participant credentials: the membership credential each spoke presented (a VC-JWT signed
by a federation authority) and the outcome of its latest check.

Revision ID: 0017_credentials
Revises: 0016_trainjoin
Create Date: 2026-12-06 20:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0017_credentials'
down_revision: str | None = '0016_trainjoin'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'spokecredential',
        sa.Column('spoke_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('token', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('credential_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('issuer', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('subject', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('keyids', sa.JSON(), nullable=True),
        sa.Column('valid_from', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('valid_until', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('status_list', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('status_index', sa.Integer(), nullable=False),
        sa.Column('presented_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('presented_by', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('checked_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('state', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.ForeignKeyConstraint(['spoke_id'], ['spoke.id']),
        sa.PrimaryKeyConstraint('spoke_id'),
    )


def downgrade() -> None:
    op.drop_table('spokecredential')
