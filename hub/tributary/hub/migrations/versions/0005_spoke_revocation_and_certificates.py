"""Spoke revocation (one switch for broker, registry and object store access) and the
expiry of each spoke's federation certificate, as its heartbeats report it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 07:10:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('spoke', schema=None) as batch_op:
        batch_op.add_column(sa.Column('revoked_at', sqlmodel.sql.sqltypes.UTCDateTime(),
                                      nullable=True))
        batch_op.add_column(sa.Column('certificate_not_after',
                                      sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('certificate_serial', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('spoke', schema=None) as batch_op:
        batch_op.drop_column('certificate_serial')
        batch_op.drop_column('certificate_not_after')
        batch_op.drop_column('revoked_at')
