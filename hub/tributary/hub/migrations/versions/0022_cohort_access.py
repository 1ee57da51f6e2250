"""Private set intersections and vertical studies bound to data access requests.

Revision ID: 0022_cohort_access
Revises: 0021_vertical
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0022_cohort_access'
down_revision: str | None = '0021_vertical'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ('psirun', 'verticalstudy')


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('access_request_id',
                                          sqlmodel.sql.sqltypes.AutoString(), nullable=True))
            batch_op.create_index(batch_op.f(f'ix_{table}_access_request_id'),
                                  ['access_request_id'], unique=False)
            batch_op.create_foreign_key(f'fk_{table}_access_request_id', 'accessrequest',
                                        ['access_request_id'], ['id'])


def downgrade() -> None:
    for table in reversed(TABLES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(f'fk_{table}_access_request_id', type_='foreignkey')
            batch_op.drop_index(batch_op.f(f'ix_{table}_access_request_id'))
            batch_op.drop_column('access_request_id')
