"""Vertical training studies: two spokes with different columns of one PSI's linked cohort
train one logistic regression, the hub coordinating and relaying.

Revision ID: 0021_vertical
Revises: 0020_access
Create Date: 2026-12-06 19:50:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0021_vertical'
down_revision: str | None = '0020_access'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('verticalstudy',
    sa.Column('id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('psi_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('features_spoke', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('label_spoke', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('features_attributes', sa.JSON(), nullable=True),
    sa.Column('label_attributes', sa.JSON(), nullable=True),
    sa.Column('label', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('positive', sa.JSON(), nullable=True),
    sa.Column('hyperparameters', sa.JSON(), nullable=True),
    sa.Column('release_coefficients', sa.Boolean(), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('round_index', sa.Integer(), nullable=False),
    sa.Column('stage', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('parties', sa.JSON(), nullable=True),
    sa.Column('answers', sa.JSON(), nullable=True),
    sa.Column('losses', sa.JSON(), nullable=True),
    sa.Column('final', sa.JSON(), nullable=True),
    sa.Column('created_by', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.Column('finished_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('verticalstudy')
