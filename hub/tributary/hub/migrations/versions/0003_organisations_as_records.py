"""Organisations as records: users and reviews refer to an organisation by id, so the review
rule compares organisations by identity. Existing free-text organisations become records,
one per normalised name ("North" and "north " become one).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 16:30:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

from tributary.hub.services.organisations import display_name, name_key

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('organisation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('name_key', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('created_at', sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name_key')
    )
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.add_column(sa.Column('organisation_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_user_organisation_id'), ['organisation_id'],
                              unique=False)
        batch_op.create_foreign_key('fk_user_organisation_id', 'organisation',
                                    ['organisation_id'], ['id'])
    with op.batch_alter_table('review', schema=None) as batch_op:
        batch_op.add_column(sa.Column('organisation_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key('fk_review_organisation_id', 'organisation',
                                    ['organisation_id'], ['id'])
    _organisations_from_text()
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.drop_column('organisation')


def _organisations_from_text() -> None:
    """One record per normalised free-text name found on users and reviews."""
    connection = op.get_bind()
    organisation = sa.table('organisation', sa.column('id', sa.Integer),
                            sa.column('name', sa.String), sa.column('name_key', sa.String),
                            sa.column('created_at', sqlmodel.sql.sqltypes.UTCDateTime))
    user = sa.table('user', sa.column('username', sa.String),
                    sa.column('organisation', sa.String),
                    sa.column('organisation_id', sa.Integer))
    review = sa.table('review', sa.column('id', sa.Integer),
                      sa.column('organisation', sa.String),
                      sa.column('organisation_id', sa.Integer))
    ids: dict[str, int] = {}

    def record(text: str | None) -> int | None:
        if not text or not display_name(text):
            return None
        key = name_key(text)
        if key not in ids:
            connection.execute(organisation.insert().values(
                name=display_name(text), name_key=key, created_at=sa.func.current_timestamp()))
            ids[key] = connection.execute(sa.select(organisation.c.id).where(
                organisation.c.name_key == key)).scalar_one()
        return ids[key]

    for username, text in connection.execute(sa.select(user.c.username, user.c.organisation)
                                              ).all():
        connection.execute(user.update().where(user.c.username == username)
                           .values(organisation_id=record(text)))
    for review_id, text in connection.execute(sa.select(review.c.id, review.c.organisation)
                                              ).all():
        connection.execute(review.update().where(review.c.id == review_id)
                           .values(organisation_id=record(text)))


def downgrade() -> None:
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.add_column(sa.Column('organisation', sqlmodel.sql.sqltypes.AutoString(),
                                      nullable=False, server_default=''))
    connection = op.get_bind()
    connection.execute(sa.text(
        "UPDATE \"user\" SET organisation = COALESCE((SELECT name FROM organisation "
        "WHERE organisation.id = \"user\".organisation_id), '')"))
    with op.batch_alter_table('review', schema=None) as batch_op:
        batch_op.drop_constraint('fk_review_organisation_id', type_='foreignkey')
        batch_op.drop_column('organisation_id')
    with op.batch_alter_table('user', schema=None) as batch_op:
        batch_op.alter_column('organisation', server_default=None)
        batch_op.drop_constraint('fk_user_organisation_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_user_organisation_id'))
        batch_op.drop_column('organisation_id')
    op.drop_table('organisation')
