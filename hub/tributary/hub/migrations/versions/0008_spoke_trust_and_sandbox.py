"""Trust made visible and the sandbox lane: each spoke keeps the publisher trust its
heartbeats report and whether it was enrolled as a sandbox; a study says whether it is a
sandbox study and whose.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 12:50:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('spoke', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sandbox', sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.add_column(sa.Column('trust_reported_at',
                                      sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column('trust_required', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('trusted_publishers', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('trust_sandbox', sa.Boolean(), nullable=True))
    with op.batch_alter_table('experiment', schema=None) as batch_op:
        batch_op.add_column(sa.Column('sandbox', sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
        batch_op.add_column(sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('experiment', schema=None) as batch_op:
        batch_op.drop_column('owner')
        batch_op.drop_column('sandbox')
    with op.batch_alter_table('spoke', schema=None) as batch_op:
        batch_op.drop_column('trust_sandbox')
        batch_op.drop_column('trusted_publishers')
        batch_op.drop_column('trust_required')
        batch_op.drop_column('trust_reported_at')
        batch_op.drop_column('sandbox')
