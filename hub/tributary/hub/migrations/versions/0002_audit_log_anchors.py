"""Audit log anchors: each audit row's forensic log entry, each spoke's reported log head.

Revision ID: 0002
Revises: 0001
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('auditevent', schema=None) as batch_op:
        batch_op.add_column(sa.Column('log_seq', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('log_hash', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))
        batch_op.add_column(sa.Column('log_name', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))
    with op.batch_alter_table('spoke', schema=None) as batch_op:
        batch_op.add_column(sa.Column('audit_head_seq', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('audit_head_hash', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))
        batch_op.add_column(sa.Column('audit_head_at', sqlmodel.sql.sqltypes.UTCDateTime(),
                                      nullable=True))
        batch_op.add_column(sa.Column('audit_head_refused', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('spoke', schema=None) as batch_op:
        batch_op.drop_column('audit_head_refused')
        batch_op.drop_column('audit_head_at')
        batch_op.drop_column('audit_head_hash')
        batch_op.drop_column('audit_head_seq')
    with op.batch_alter_table('auditevent', schema=None) as batch_op:
        batch_op.drop_column('log_name')
        batch_op.drop_column('log_hash')
        batch_op.drop_column('log_seq')
