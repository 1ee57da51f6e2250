"""Data access requests and the committee: requests, committee members' votes, attached
files (ethics approval, DPIA) kept by digest; experiments and training studies name the
request they run under.

Revision ID: 0020_access
Revises: 0019_psi
Create Date: 2026-12-06 19:50:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0020_access'
down_revision: str | None = '0019_psi'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_S = sqlmodel.sql.sqltypes.AutoString
_T = sqlmodel.sql.sqltypes.UTCDateTime


def upgrade() -> None:
    op.create_table(
        'accessrequest',
        sa.Column('id', _S(), nullable=False),
        sa.Column('title', _S(), nullable=False),
        sa.Column('purpose', _S(), nullable=False),
        sa.Column('requested_by', _S(), nullable=False),
        sa.Column('spokes', sa.JSON(), nullable=True),
        sa.Column('attributes', sa.JSON(), nullable=True),
        sa.Column('study_kinds', sa.JSON(), nullable=True),
        sa.Column('epsilon', sa.Float(), nullable=True),
        sa.Column('k', sa.Integer(), nullable=True),
        sa.Column('state', _S(), nullable=False),
        sa.Column('conditions', sa.JSON(), nullable=True),
        sa.Column('decided_at', _T(), nullable=True),
        sa.Column('refusal_reason', _S(), nullable=True),
        sa.Column('withdrawn_at', _T(), nullable=True),
        sa.Column('epsilon_spent', sa.Float(), nullable=False),
        sa.Column('created_at', _T(), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index(op.f('ix_accessrequest_requested_by'), 'accessrequest', ['requested_by'],
                    unique=False)
    op.create_index(op.f('ix_accessrequest_state'), 'accessrequest', ['state'], unique=False)
    op.create_table(
        'accessvote',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('request_id', _S(), nullable=False),
        sa.Column('member', _S(), nullable=False),
        sa.Column('decision', _S(), nullable=False),
        sa.Column('conditions', sa.JSON(), nullable=True),
        sa.Column('conditions_sha256', _S(), nullable=True),
        sa.Column('reason', _S(), nullable=False),
        sa.Column('at', _T(), nullable=False),
        sa.ForeignKeyConstraint(['request_id'], ['accessrequest.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('request_id', 'member'),
    )
    op.create_index(op.f('ix_accessvote_request_id'), 'accessvote', ['request_id'],
                    unique=False)
    op.create_table(
        'accessattachment',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('request_id', _S(), nullable=False),
        sa.Column('kind', _S(), nullable=False),
        sa.Column('digest', _S(), nullable=False),
        sa.Column('filename', _S(), nullable=False),
        sa.Column('media_type', _S(), nullable=False),
        sa.Column('size', sa.Integer(), nullable=False),
        sa.Column('content', sa.LargeBinary(), nullable=False),
        sa.Column('created_at', _T(), nullable=False),
        sa.ForeignKeyConstraint(['request_id'], ['accessrequest.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('request_id', 'kind'),
    )
    op.create_index(op.f('ix_accessattachment_request_id'), 'accessattachment',
                    ['request_id'], unique=False)
    for table in ('experiment', 'trainingstudy'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column('access_request_id', _S(), nullable=True))
            batch_op.create_index(batch_op.f(f'ix_{table}_access_request_id'),
                                  ['access_request_id'], unique=False)
            batch_op.create_foreign_key(f'fk_{table}_access_request_id', 'accessrequest',
                                        ['access_request_id'], ['id'])


def downgrade() -> None:
    for table in ('trainingstudy', 'experiment'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_constraint(f'fk_{table}_access_request_id', type_='foreignkey')
            batch_op.drop_index(batch_op.f(f'ix_{table}_access_request_id'))
            batch_op.drop_column('access_request_id')
    op.drop_index(op.f('ix_accessattachment_request_id'), table_name='accessattachment')
    op.drop_table('accessattachment')
    op.drop_index(op.f('ix_accessvote_request_id'), table_name='accessvote')
    op.drop_table('accessvote')
    op.drop_index(op.f('ix_accessrequest_state'), table_name='accessrequest')
    op.drop_index(op.f('ix_accessrequest_requested_by'), table_name='accessrequest')
    op.drop_table('accessrequest')
