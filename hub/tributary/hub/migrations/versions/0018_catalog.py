"""The federated catalog: the latest signed description each spoke published of what it
holds, with the spoke-signed envelope kept for audit.

Revision ID: 0018_catalog
Revises: 0017_credentials
Create Date: 2026-12-06 20:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0018_catalog'
down_revision: str | None = '0017_credentials'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'spokecatalogentry',
        sa.Column('spoke_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('digest', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('description', sa.JSON(), nullable=True),
        sa.Column('envelope', sa.JSON(), nullable=True),
        sa.Column('message_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
        sa.Column('generated_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column('received_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(['spoke_id'], ['spoke.id']),
        sa.PrimaryKeyConstraint('spoke_id'),
    )
    op.create_index(op.f('ix_spokecatalogentry_received_at'), 'spokecatalogentry',
                    ['received_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_spokecatalogentry_received_at'), table_name='spokecatalogentry')
    op.drop_table('spokecatalogentry')
