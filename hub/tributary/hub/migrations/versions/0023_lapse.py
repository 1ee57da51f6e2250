"""When a spoke was withdrawn from a study because its membership lapsed.

Revision ID: 0023_lapse
Revises: 0022_cohort_access
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0023_lapse'
down_revision: str | None = '0022_cohort_access'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('experimenttarget', schema=None) as batch_op:
        batch_op.add_column(sa.Column('withdrawn_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('experimenttarget', schema=None) as batch_op:
        batch_op.drop_column('withdrawn_at')
