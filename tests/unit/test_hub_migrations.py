"""The hub's schema migrations: they build exactly the schema the models describe, adopt a
database made before migrations existed without losing a row, run once when several
processes open a new database together, and are audited."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text
from sqlmodel import Session, SQLModel, select
from typer.testing import CliRunner

from tributary.cli.app import app
from tributary.hub import migrations
from tributary.hub.db import make_engine
from tributary.hub.models import AuditEvent, Organisation, User
from tributary.hub.services.users import hash_password


def schema_differences(url: str) -> list:
    engine = create_engine(url)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, SQLModel.metadata)


def test_migrations_build_exactly_the_models_schema(tmp_path: Path) -> None:
    """Fails when hub/models.py changes without a migration (see hub/migrations)."""
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    make_engine(url)
    assert schema_differences(url) == []
    engine = make_engine(url)
    assert migrations.current(engine) == migrations.head()
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_downgrade_and_upgrade_round_trip(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}")
    with engine.begin() as connection:
        command.downgrade(migrations.alembic_config(connection), "base")
    with engine.connect() as connection:
        tables = set(connection.dialect.get_table_names(connection))
    assert tables == {"alembic_version"}
    migrations.upgrade(engine)
    assert schema_differences(str(engine.url)) == []


def test_a_database_from_before_migrations_is_adopted_with_its_data(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old-hub.db'}"
    old = create_engine(url)
    # What hubs did before there were migrations: the baseline schema, no alembic_version.
    with old.begin() as connection:
        command.upgrade(migrations.alembic_config(connection), migrations.BASELINE)
        connection.execute(text("DROP TABLE alembic_version"))
        for name, organisation in (("carol", "North"), ("dave", " north "), ("erin", "")):
            connection.execute(text(
                "INSERT INTO user (username, organisation, roles, password_hash, created_at, "
                "disabled) VALUES (:name, :organisation, '[\"coordinator\"]', :hash, "
                "'2026-01-01 00:00:00', 0)"),
                {"name": name, "organisation": organisation,
                 "hash": hash_password("a long enough password")})
        connection.execute(text(
            "INSERT INTO auditevent (at, actor, action, target, detail) VALUES "
            "('2026-01-01 00:00:00', 'bootstrap', 'user.created', 'carol', '{}')"))
    old.dispose()

    result = CliRunner().invoke(app, ["hub", "migrate", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert f"upgraded from {migrations.BASELINE} to {migrations.head()}" in result.output
    engine = make_engine(url)
    assert migrations.current(engine) == migrations.head()
    with Session(engine) as session:
        carol, dave, erin = (session.get(User, n) for n in ("carol", "dave", "erin"))
        assert carol is not None and dave is not None and erin is not None
        # Free-text organisations became one record per normalised name.
        assert carol.organisation_id is not None
        assert carol.organisation_id == dave.organisation_id and erin.organisation_id is None
        [north] = session.exec(select(Organisation)).all()
        assert north.name == "North"
        actions = [e.action for e in session.exec(select(AuditEvent))]
    assert "user.created" in actions
    assert schema_differences(url) == []


def test_the_migrate_command_creates_and_audits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    first = CliRunner().invoke(app, ["hub", "migrate", "--database-url", url])
    assert first.exit_code == 0, first.output
    assert f"upgraded from none to {migrations.head()}" in first.output
    again = CliRunner().invoke(app, ["hub", "migrate", "--database-url", url])
    assert "already at the newest revision" in again.output
    with Session(make_engine(url)) as session:
        [created] = session.exec(select(AuditEvent).where(
            AuditEvent.action == "hub.schema_created")).all()
    assert created.actor.startswith("cli:") and created.detail == {
        "revision": migrations.head()}
    # ... and in the forensic log beside the database, chained like every other entry.
    log = [json.loads(line) for line in (tmp_path / "hub-audit.jsonl").read_text().splitlines()]
    assert [entry["action"] for entry in log] == ["hub.schema_created"]


def _open(url: str) -> str | None:
    return migrations.current(make_engine(url))


def test_processes_opening_a_new_database_together_migrate_it_once(tmp_path: Path) -> None:
    """The hub, its Celery workers and the CLI may all start at once on a new database."""
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        revisions = pool.map(_open, [url] * 4)
    assert revisions == [migrations.head()] * 4
    with Session(make_engine(url)) as session:
        created = session.exec(select(AuditEvent).where(
            AuditEvent.action == "hub.schema_created")).all()
    assert len(created) == 1
    assert schema_differences(url) == []

