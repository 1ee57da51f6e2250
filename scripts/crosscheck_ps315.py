"""Cross-check our PS3.15 Table E.1-1 against an independent extraction of the standard.

Our table has two sources (the Basic Profile column from ``dicom-anonymizer``, the option
columns from idiscore's scrape, see ``scripts/extract_ps315_options.py``). Innolitics'
``dicom-standard`` package (MIT) parses the same table from the standard's HTML into
``confidentiality_profile_attributes.json``, with its own code. Where both extractions name
an attribute they should give it the same action in every column; a difference is either
an edition change (the two were taken years apart) or a parsing error in one of them, and
is worth a look in the standard before a release. Attributes only one side names are
counted, not listed (mostly attributes added to the standard after the older extraction).

    python scripts/crosscheck_ps315.py [--wheel FILE]

Without ``--wheel`` it fetches the wheel with ``pip download`` (no install). Exit status 0
when every shared attribute agrees, 1 otherwise; the report goes to stdout."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tributary.spoke.deid.options import DeidOptions
from tributary.spoke.deid.profile import _OPTIONS, BASIC_EDITION, action_table

ROOT = Path(__file__).resolve().parents[1]
#: Option code (PS3.16 CID 7050) -> the column's key in Innolitics' JSON.
INNOLITICS_COLUMNS = {
    "113100": "basicProfile", "113103": "cleanGraphOpt", "113104": "cleanStructContOpt",
    "113105": "cleanDescOpt", "113106": "rtnLongFullDatesOpt",
    "113107": "rtnLongModifDatesOpt", "113108": "rtnPatCharsOpt", "113109": "rtnDevIdOpt",
    "113110": "rtnUIDsOpt", "113111": "rtnSafePrivOpt", "113112": "rtnInstIdOpt",
}
MEMBER = "confidentiality_profile_attributes.json"


def _theirs(wheel: Path) -> list[dict[str, str]]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/" + MEMBER))
        return json.loads(archive.read(name))


def _key(identifier: str) -> str:
    """Innolitics' id in our keys: 8 hex digits, ``x`` for a repeating digit, or
    ``private`` for the row of all private attributes."""
    return "private" if identifier.startswith("gggg") else identifier.lower()


def _ours(code: str) -> dict[str, str]:
    """Key (as :func:`_key`) -> action, as our engine reads the column."""
    if code != "113100":
        return dict(_OPTIONS["columns"][code]["rules"])
    table = action_table(DeidOptions())
    ours = {f"{tag:08x}": action for tag, action in table.single.items()}
    for mask, value, action in table.masked:
        ours["".join("x" if m == "0" else v for m, v in zip(f"{mask:08x}", f"{value:08x}",
                                                             strict=True))] = action
    ours["private"] = table.private
    return ours


def compare(rows: list[dict[str, str]]) -> tuple[list[str], int, int]:
    """The report's lines, the number of shared rows and how many of them differ."""
    lines = [f"ours: Basic Profile {BASIC_EDITION}, options scraped {_OPTIONS['scraped']}"]
    differences = total = 0
    for code, key in INNOLITICS_COLUMNS.items():
        theirs = {_key(r["id"]): r[key] for r in rows if r.get(key)}
        ours = _ours(code)
        shared = sorted(set(theirs) & set(ours))
        differ = [t for t in shared if theirs[t] != ours[t]]
        differences += len(differ)
        total += len(shared)
        lines.append(f"{code} {key:22} shared {len(shared):4}  agree {len(shared) - len(differ):4}"
                     f"  only ours {len(set(ours) - set(theirs)):4}"
                     f"  only theirs {len(set(theirs) - set(ours)):4}")
        names = {_key(r["id"]): f"{r['tag']} {r['name']}" for r in rows}
        lines += [f"    {names[t]}: ours {ours[t]}, theirs {theirs[t]}" for t in differ]
    return lines, total, differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wheel", type=Path, help="an already downloaded dicom-standard wheel")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            "-d", tmp, "dicom-standard"], check=True)
            wheel = next(Path(tmp).glob("dicom_standard-*.whl"))
        print(f"theirs: {wheel.name}")
        lines, total, differences = compare(_theirs(wheel))
    print("\n".join(lines))
    print(f"{differences} of {total} shared rows differ")
    sys.exit(1 if differences else 0)


if __name__ == "__main__":
    main()
