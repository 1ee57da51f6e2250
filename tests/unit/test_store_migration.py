"""A store written before its format was marked (objects named by the SHA-256 of the
whole file, written by pydicom's ``save_as``, BLAKE2b of the pixels in the catalog):
the spoke refuses it, naming the migrate command; ``tributary spoke store migrate``
converts it (audited), and running it again changes nothing."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from tributary.cli.app import app
from tributary.spoke.config import SpokeConfig
from tributary.spoke.deid.output import digests_of_file
from tributary.spoke.ingest import ingest, open_catalog, store_root
from tributary.spoke.store import FORMAT_FILE, DeidStore, StoreFormatError
from tributary.testbed.federation import generate_cohort


def _config(tmp_path: Path, data: Path, name: str) -> tuple[SpokeConfig, Path]:
    work = tmp_path / name
    work.mkdir()
    (tmp_path / "hub.pub").write_text("")
    path = tmp_path / f"{name}.toml"
    path.write_text(f'spoke_id = "{name}"\ndata_dir = "{data}"\nwork_dir = "{work}"\n'
                    f'hub_public_key = "{tmp_path / "hub.pub"}"\n')
    return SpokeConfig.load(path), path


def _make_old(config: SpokeConfig) -> None:
    """Turn a store into what the old writer left: each object rewritten by pydicom's
    ``save_as`` and named by the SHA-256 of its bytes; catalog rows and series links to
    match; the catalog's pixel digest a BLAKE2b; no format marker."""
    root = store_root(config.work_dir)
    renames = {}
    for path in list((root / "objects").glob("*/*.dcm")):
        ds = pydicom.dcmread(path)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
        old = hashlib.sha256(data).hexdigest()
        target = root / "objects" / old[:2] / f"{old}.dcm"
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(data)
        os.chmod(target, 0o444)
        path.unlink()
        blake = hashlib.blake2b(bytes(ds.PixelData), digest_size=32).hexdigest()
        renames[path.name.removesuffix(".dcm")] = (old, blake)
    for view in list((root / "series").glob("*/*.dcm")):
        old = renames[view.name.removesuffix(".dcm")][0]
        view.unlink()
        os.link(root / "objects" / old[:2] / f"{old}.dcm", view.parent / f"{old}.dcm")
    with open_catalog(config) as catalog:
        catalog.rename_objects(renames)
    (root / FORMAT_FILE).unlink()


def _state(config: SpokeConfig) -> tuple[dict, set, set]:
    root = store_root(config.work_dir)
    with open_catalog(config) as catalog:
        rows = {r[0]: (r[1], r[2]) for r in catalog._db.execute(
            "SELECT instance_uid, digest, pixels FROM instances")}
    objects = {p.name.removesuffix(".dcm") for p in (root / "objects").glob("*/*.dcm")}
    links = {(p.parent.name, p.name) for p in (root / "series").glob("*/*.dcm")}
    return rows, objects, links


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("migrate") / "data"
    generate_cohort(folder, 2, seed=5, site="Old Store General", size=64, slices=16)
    (folder / "attributes.csv").unlink()
    return folder


def test_an_old_store_is_refused_then_migrated_once(data: Path, tmp_path: Path) -> None:
    fresh, _ = _config(tmp_path, data, "fresh")
    ingest(fresh)
    assert json.loads((store_root(fresh.work_dir) / FORMAT_FILE).read_text())["version"] == 2
    old, old_toml = _config(tmp_path, data, "old")
    key = (fresh.work_dir / "pseudonym.key").read_bytes()  # the same pseudonyms
    (old.work_dir / "pseudonym.key").write_bytes(key)
    os.chmod(old.work_dir / "pseudonym.key", 0o600)
    ingest(old)
    _make_old(old)
    before_rows, before_objects, _ = _state(old)
    assert before_objects == {d for d, _ in before_rows.values()}

    # refused, naming the command: the store, the ingest and the agent
    with pytest.raises(StoreFormatError, match="tributary spoke store migrate"):
        DeidStore(store_root(old.work_dir))
    runner = CliRunner()
    started = runner.invoke(app, ["spoke", "run", "-c", str(old_toml)])
    assert started.exit_code == 2, started.output
    assert "tributary spoke store migrate" in " ".join(started.output.split())
    refused = runner.invoke(app, ["spoke", "ingest", "-c", str(old_toml)])
    assert refused.exit_code == 1 and "store migrate" in " ".join(refused.output.split())

    done = runner.invoke(app, ["spoke", "store", "migrate", "-c", str(old_toml)])
    assert done.exit_code == 0, done.output
    rows, objects, links = _state(old)
    root = store_root(old.work_dir)
    # every object named as the current writer names its bytes, and the catalog agrees
    for digest in objects:
        data_bytes = (root / "objects" / digest[:2] / f"{digest}.dcm").read_bytes()
        assert digests_of_file(data_bytes)[0] == digest
    assert objects == {d for d, _ in rows.values()}
    assert {name.removesuffix(".dcm") for _, name in links} == objects
    assert len(links) == len(before_objects)
    # the pixel digests are those a fresh ingest records: duplicates are found across
    fresh_rows, _, _ = _state(fresh)
    assert {uid: p for uid, (_, p) in rows.items()} == \
        {uid: p for uid, (_, p) in fresh_rows.items()}
    entries = [json.loads(line) for line in (old.work_dir / "audit.jsonl").open()]
    migrated = [e for e in entries if e["action"] == "store.migrated"]
    assert len(migrated) == 1 and migrated[0]["detail"]["renamed"] == len(objects)

    # idempotent: a second run changes nothing and says so; the store opens again
    again = runner.invoke(app, ["spoke", "store", "migrate", "-c", str(old_toml)])
    assert again.exit_code == 0 and "nothing to do" in again.output
    assert _state(old) == (rows, objects, links)
    report = ingest(old)  # unchanged inputs: nothing new written
    assert report.stored == 0 and _state(old) == (rows, objects, links)


def test_a_damaged_marker_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    DeidStore(root)
    (root / FORMAT_FILE).write_text("{not json")
    with pytest.raises(StoreFormatError, match="damaged"):
        DeidStore(root)
