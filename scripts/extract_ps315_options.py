"""Extract the option columns of DICOM PS3.15 Table E.1-1 into spoke/deid/ps315_options.json.

The Basic Profile column comes at run time from the maintained ``dicom-anonymizer`` table;
the option columns (Retain Longitudinal Temporal Information with Modified Dates, Retain
Patient Characteristics, Retain Device Identity, Clean Descriptors, Retain Safe Private...)
are shipped by no permissively licensed, maintained package. ``idiscore`` publishes them
machine-readably, scraped from the standard's published table (module ``_public_dicom``,
with its scrape date). This script reads that module as *data* (``ast``, never imported,
so idiscore is no dependency of Tributary) and writes tag -> action per option column.

    python scripts/extract_ps315_options.py [--version 1.6.0] [--wheel FILE]

Without ``--wheel`` it fetches the wheel with ``pip download`` (no install)."""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT = (Path(__file__).resolve().parents[1] / "spoke" / "tributary" / "spoke" / "deid"
       / "ps315_options.json")


def _action_codes(source: str) -> dict[str, str]:
    """ActionCodes.NAME -> code letter(s), read from idiscore's own dicom.py."""
    codes: dict[str, str] = {}
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and getattr(node.value.func, "id", "") == "ActionCode"):
            codes[node.targets[0].id] = node.value.args[0].value  # type: ignore[attr-defined]
    return codes


def _identifier(call: ast.Call) -> str:
    kind = call.func.id  # type: ignore[attr-defined]
    if kind == "PrivateTags":
        return "private"
    if kind in ("SingleTag", "RepeatingGroup"):
        return call.args[0].value.lower()  # type: ignore[attr-defined]
    raise ValueError(f"unknown tag identifier {kind}")


def extract(public_dicom: str, dicom_py: str) -> dict:
    codes = _action_codes(dicom_py)
    scraped = re.search(r"scrape date:\s*(\S+)", public_dicom)
    page = re.search(r"(https?://\S+part15\S*)", public_dicom)
    columns: dict[str, dict] = {}
    for node in ast.parse(public_dicom).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        kwargs = {k.arg: k.value for k in node.value.keywords}
        name, code = kwargs["name"].value, kwargs["code"].value  # type: ignore[attr-defined]
        rules: dict[str, str] = {}
        for item in kwargs["rules"].elts:  # type: ignore[attr-defined]
            ident, action = item.elts
            rules[_identifier(ident)] = codes[action.attr]
        columns[code] = {"name": name, "rules": dict(sorted(rules.items()))}
    return {
        "table": "DICOM PS3.15 Table E.1-1 (Application Level Confidentiality Profile "
                 "Attributes)",
        "standard_page": page.group(1) if page else None,
        "scraped": scraped.group(1) if scraped else None,
        "source": "idiscore _public_dicom (scraped from the standard), read as data by "
                  "scripts/extract_ps315_options.py",
        "columns": columns,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--version", default="1.6.0", help="idiscore release to read")
    parser.add_argument("--wheel", type=Path, help="an already downloaded idiscore wheel")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            "--only-binary=:all:", "--python-version", "3.12", "-d", tmp,
                            f"idiscore=={args.version}"], check=True)
            wheel = next(Path(tmp).glob("idiscore-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            table = extract(archive.read("idiscore/_public_dicom.py").decode(),
                            archive.read("idiscore/dicom.py").decode())
        table["source_release"] = wheel.name
    OUT.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {OUT.name}: {len(table['columns'])} columns, scraped {table['scraped']}")


if __name__ == "__main__":
    main()
