"""What the steward's commands print about paths, file names and errors is what they are:
rich reads ``[...]`` as markup and ``:name:`` as an emoji code, so a destination named
``out [red]:smile:`` was reported as ``out 😄``, a file named ``CT [final].txt`` lost its
``[final]``, and pydantic's ``[type=missing, ...]`` vanished from a configuration error."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from tributary.cli.app import app


def _flat(text: str) -> str:
    """The output without whitespace: rich wraps long lines anywhere."""
    return "".join(text.split())


def test_deidentify_reports_the_destination_as_named(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "src")
    dst = tmp_path / "out [red]:smile:"
    result = CliRunner().invoke(app, ["spoke", "deidentify", str(tmp_path / "src"),
                                      str(dst), "--key", str(tmp_path / "k.key")])
    assert result.exit_code == 0, result.output
    assert list(dst.rglob("*.dcm"))
    assert _flat(f"written to {dst};") in _flat(result.output)
    assert _flat(f"report: {dst}-report.json") in _flat(result.output)


def test_ingest_shows_file_names_and_errors_as_they_are(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), data)
    (data / "CT [final].txt").write_text("not an image")
    config = tmp_path / "spoke.toml"
    config.write_text(f'spoke_id = "site-a"\ndata_dir = "{data}"\n'
                      f'work_dir = "{tmp_path / "work"}"\nhub_public_key = "hub.pub"\n')
    runner = CliRunner()
    result = runner.invoke(app, ["spoke", "ingest", "-c", str(config)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["spoke", "exclusions", "-c", str(config)])
    assert result.exit_code == 0, result.output
    assert "CT[final].txt" in _flat(result.output)
    config.write_text(f'data_dir = "{data}"\nwork_dir = "{tmp_path / "work"}"\n'
                      'hub_public_key = "hub.pub"\n')  # no spoke_id
    result = runner.invoke(app, ["spoke", "ingest", "-c", str(config)])
    assert result.exit_code == 2
    assert "[type=missing," in _flat(result.output)
