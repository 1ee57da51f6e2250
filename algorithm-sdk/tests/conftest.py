"""Fixtures: a fake case on disk laid out like the contract's hand-over."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
from sdk_testutil import participant_for


@pytest.fixture
def make_case(tmp_path: Path) -> Callable[..., str]:
    """Write participant.json + a series folder; return the ALGO_ARG JSON text."""

    def _make(arguments: dict[str, Any] | None = None, **participant_overrides: Any) -> str:
        series_dir = tmp_path / "input" / "series-001"
        series_dir.mkdir(parents=True, exist_ok=True)
        for name in ("b.dcm", "a.dcm"):
            (series_dir / name).write_bytes(b"not really dicom")
        (tmp_path / "output").mkdir(exist_ok=True)
        participant_file = tmp_path / "participant.json"
        participant_file.write_text(
            json.dumps(participant_for(series_dir, **participant_overrides))
        )
        return json.dumps(
            {
                "contract_version": "1.0",
                "arguments": arguments or {},
                "participant": str(participant_file),
                "output": str(tmp_path / "output" / "output.json"),
            }
        )

    return _make
