"""Converting a de-identified store written before its format was marked to the current
format: each object renamed to the name :mod:`tributary.spoke.deid.output` gives its
bytes (the bytes themselves never change), its series links and catalog rows following.

Safe to interrupt and run again: new names are added beside the old ones, the catalog
moves in one transaction, and only then do old names go and the marker appear. Running
it on a store already in the current format changes nothing."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

from tributary.spoke.catalog import Catalog
from tributary.spoke.deid.output import digests_of_file
from tributary.spoke.store import (
    FORMAT_FILE,
    STORE_FORMAT,
    StoreFormatError,
    store_format,
    write_format,
)


class MigrationReport(BaseModel):
    """What a migration did, for the audit log and the operator."""

    already_current: bool
    objects: int = 0
    renamed: int = 0
    catalog_rows: int = 0
    links: int = 0


def migrate_layout(root: Path, catalog: Catalog) -> MigrationReport:
    """Convert the store at ``root`` (and ``catalog``'s rows) to the current format.
    Call with the store unused (the ingest lock held, the agent stopped)."""
    found = store_format(root)
    if found is not None and (root / FORMAT_FILE).exists():
        if found != STORE_FORMAT:
            raise StoreFormatError(f"{root} is in format {found.version}; not converted")
        return MigrationReport(already_current=True)
    objects = sorted(p for p in (root / "objects").glob("*/*.dcm"))
    renames: dict[str, tuple[str, str | None]] = {}
    for path in objects:
        old = path.name.removesuffix(".dcm")
        new, pixels = digests_of_file(path.read_bytes())
        renames[old] = (new, pixels)
        target = root / "objects" / new[:2] / f"{new}.dcm"
        if target != path and not target.exists():
            target.parent.mkdir(exist_ok=True)
            os.link(path, target)
    links = 0
    for series in sorted((root / "series").glob("*")) if (root / "series").is_dir() else []:
        for view in sorted(series.glob("*.dcm")):
            old = view.name.removesuffix(".dcm")
            if old in renames and renames[old][0] != old:
                new = renames[old][0]
                fresh = series / f"{new}.dcm"
                if not fresh.exists():
                    os.link(root / "objects" / new[:2] / f"{new}.dcm", fresh)
                view.unlink()
                links += 1
    rows = catalog.rename_objects(renames)
    renamed = 0
    for path in objects:
        old = path.name.removesuffix(".dcm")
        if renames[old][0] != old:
            path.unlink(missing_ok=True)
            renamed += 1
    write_format(root)
    return MigrationReport(already_current=False, objects=len(objects), renamed=renamed,
                           catalog_rows=rows, links=links)
