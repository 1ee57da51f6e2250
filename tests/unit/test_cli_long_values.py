"""Values a person checks character by character (digests, file paths) are wrapped in the
commands' tables, never cut with an ellipsis: rich's columns crop a word longer than
their width, so on an 80-column terminal the committee saw ``sha256:9f86d08…`` for an
attachment's digest, and a steward the start of an excluded file's path."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tributary.cli import access
from tributary.cli.app import app
from tributary.spoke.catalog import Catalog

DIGEST = "sha256:" + "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def _flat(text: str) -> str:
    """The table's text without whitespace and rules: a folded value runs on in the same
    column of the next lines."""
    return "".join(c for c in text if not c.isspace() and not 0x2500 <= ord(c) <= 0x257F)


def test_an_access_request_shows_its_attachments_digests_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    narrow = Console(width=60, record=True, emoji=False)
    monkeypatch.setattr(access, "console", narrow)
    access._show({
        "id": "ar-1", "title": "Nodules", "state": "pending", "requested_by": "cora",
        "purpose": "validation", "spokes": ["north"], "attributes": [], "study_kinds": [
            "validation"], "k": 5, "epsilon": 1.0, "conditions": None, "refusal_reason": None,
        "epsilon_spent": 0.0, "attachments": [{"kind": "ethics", "digest": DIGEST}],
        "votes": [], "experiments": [], "training_studies": []})
    shown = narrow.export_text()
    assert "…" not in shown
    assert DIGEST in _flat(shown)


def test_the_exclusions_show_each_input_path_whole(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    config = tmp_path / "spoke.toml"
    config.write_text(f'spoke_id = "site-a"\ndata_dir = "{tmp_path}"\nwork_dir = "{work}"\n'
                      'hub_public_key = "hub.pem"\n')
    ref = "archive/2019/patient-000123/study-4567/series-0008/IM-0001-0042-thumbnail.dcm"
    catalog = Catalog(work / "catalog.db")
    catalog.record_inputs("archive", [(ref, "fp", "excluded", "not-dicom: no preamble", None)])
    catalog.commit()
    catalog.close()
    result = CliRunner().invoke(app, ["spoke", "exclusions", "-c", str(config)],
                                env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    column = "".join(line.split("│")[2].strip() for line in result.output.splitlines()
                     if line.startswith("│"))  # the input column, line after line
    assert column == ref
