"""The spoke publishes its description through its durable outbox: at first, then only
when it changed enough (a catalog grown by fewer than k cases waits), each one signed by
the spoke's key, audited with the true total that stays at the site, and built only from
what the site's policy releases."""

from __future__ import annotations

import base64
import csv
import json
import threading
from pathlib import Path

from typer.testing import CliRunner

from tributary.protocol.auditlog import AuditLog, read_entries
from tributary.protocol.cohorts.catalog import CatalogDescriptionMessage, open_description
from tributary.protocol.signing import SigningKey
from tributary.protocol.wire import open_from_spoke
from tributary.spoke.catalog_publisher import CatalogPublisher
from tributary.spoke.commands.app import app
from tributary.spoke.config import SpokeConfig
from tributary.spoke.ingest import ingest
from tributary.spoke.journal import Journal
from tributary.spoke.lifecycle import Lifecycle
from tributary.spoke.steward import StewardDesk
from tributary.testbed.federation import generate_cohort


def add_cases(data: Path, name: str, cases: int, seed: int) -> None:
    """Cases in a folder of their own, their attributes appended to the site's table
    (with an identifier for linkage the site does not release)."""
    generate_cohort(data / name, cases, seed=seed, site="North", size=64, slices=16)
    with open(data / name / "attributes.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    table = data / "attributes.csv"
    fresh = not table.exists()
    with open(table, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*rows[0], "linkage_id"])
        if fresh:
            writer.writeheader()
        writer.writerows({**row, "linkage_id": f"{name}-{i}"} for i, row in enumerate(rows))
    (data / name / "attributes.csv").unlink()


def test_published_at_first_then_only_when_changed_by_k(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    add_cases(data, "first", 6, seed=41)
    config = SpokeConfig(spoke_id="north", data_dir=data, work_dir=tmp_path / "work",
                         hub_public_key=tmp_path / "hub.pub", counts={"min_cell": 3},
                         policy={"releasable_attributes": ["nodules"],
                                 "attributes_file": "attributes.csv"})
    ingest(config)
    key = SigningKey.generate()
    journal = Journal(config.work_dir / "journal.db")
    woken = threading.Event()
    lifecycle = Lifecycle("north", journal, AuditLog(config.work_dir / "audit.jsonl"), key,
                          StewardDesk(config.work_dir / "journal.db"), woken.set)
    publisher = CatalogPublisher(config, lifecycle, key, threading.Event())

    def sent() -> list[CatalogDescriptionMessage]:
        rows = [r for r in journal.outbox_pending() if r.kind == "catalog_description"]
        return [open_from_spoke(r.body, lambda _: ("north", key.public))[0] for r in rows]

    assert publisher.check() and woken.is_set()
    assert not publisher.check()  # unchanged: nothing more is sent
    [first] = sent()
    description = open_description(first, [key.public])
    assert description.cases == 6 and description.attributes == ["nodules"]
    signed = base64.b64decode(first.envelope["payload"])
    assert b"linkage_id" not in signed and b"nodule_count" not in signed

    add_cases(data, "second", 2, seed=42)  # two more: fewer than k = 3
    ingest(config)
    assert not publisher.check() and len(sent()) == 1
    add_cases(data, "third", 1, seed=43)  # nine now: three more than was published
    ingest(config)
    assert publisher.check()
    assert open_description(sent()[-1], [key.public]).cases == 9
    audited = [e["detail"] for _, e in read_entries(config.work_dir / "audit.jsonl")
               if e and e["action"] == "catalog.described"]
    assert [a["true_cases"] for a in audited] == [6, 9]
    assert audited[0]["reason"] == "first description"
    last = sent()[-1].digest
    journal.close()

    # The site sees what it publishes, and the digest of what it last sent.
    toml = tmp_path / "spoke.toml"
    toml.write_text(f'spoke_id = "north"\ndata_dir = "{data}"\nwork_dir = "{config.work_dir}"\n'
                    f'hub_public_key = "{tmp_path / "hub.pub"}"\n[counts]\nmin_cell = 3\n'
                    '[policy]\nreleasable_attributes = ["nodules"]\n'
                    'attributes_file = "attributes.csv"\n')
    shown = CliRunner().invoke(app, ["description", "--config", str(toml), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["last_sent_digest"] == last
    assert json.loads(shown.output)["now"]["cases"] == 9
