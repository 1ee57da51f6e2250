"""write_output: atomic replacement and the checks the spoke would otherwise fail."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tributary_algorithm import OutputError, encode_output, load_context


def _output_files(ctx) -> list[str]:
    return sorted(os.listdir(os.path.dirname(ctx.output_path)))


def test_writes_json_object(make_case) -> None:
    ctx = load_context(make_case())
    path = ctx.write_output({"nodule_count": 1, "name": "Ünïcode"})
    assert json.loads(Path(path).read_text(encoding="utf-8")) == {
        "nodule_count": 1,
        "name": "Ünïcode",
    }
    assert ctx.output_written
    assert _output_files(ctx) == ["output.json"]  # no temporary file left behind
    assert Path(path).stat().st_mode & 0o777 == 0o644


def test_second_write_replaces_the_first(make_case) -> None:
    ctx = load_context(make_case())
    ctx.write_output({"attempt": 1})
    ctx.write_output({"attempt": 2})
    assert json.loads(Path(ctx.output_path).read_text()) == {"attempt": 2}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ("text", "must be a JSON object"),
        ({"value": {1, 2}}, "not JSON-serialisable"),
        ({"value": float("nan")}, "not JSON-serialisable"),
        ({"value": float("inf")}, "not JSON-serialisable"),
    ],
)
def test_refuses_what_the_spoke_would_refuse(make_case, data, message: str) -> None:
    ctx = load_context(make_case())
    with pytest.raises(OutputError, match=message):
        ctx.write_output(data)
    assert not ctx.output_written
    assert _output_files(ctx) == []


def test_size_cap_keeps_the_previous_output(make_case) -> None:
    ctx = load_context(make_case(), output_limit_bytes=100)
    ctx.write_output({"small": True})
    with pytest.raises(OutputError, match="at most 100 bytes"):
        ctx.write_output({"big": "x" * 200})
    assert json.loads(Path(ctx.output_path).read_text()) == {"small": True}
    assert _output_files(ctx) == ["output.json"]


def test_default_cap_is_one_mebibyte() -> None:
    encode_output({"x": "a" * (1024 * 1024 - 20)})
    with pytest.raises(OutputError):
        encode_output({"x": "a" * (1024 * 1024)})


def test_a_failed_rename_leaves_nothing_half_written(make_case, monkeypatch) -> None:
    ctx = load_context(make_case())
    ctx.write_output({"good": True})

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        ctx.write_output({"good": False})
    assert json.loads(Path(ctx.output_path).read_text()) == {"good": True}
    assert _output_files(ctx) == ["output.json"]


def test_missing_output_directory(make_case, tmp_path: Path) -> None:
    algo_arg = json.loads(make_case())
    algo_arg["output"] = str(tmp_path / "nowhere" / "output.json")
    ctx = load_context(json.dumps(algo_arg))
    with pytest.raises(OutputError, match="does not exist"):
        ctx.write_output({})


def test_numpy_values_are_converted(make_case) -> None:
    np = pytest.importorskip("numpy")
    ctx = load_context(make_case())
    ctx.write_output({"count": np.int64(3), "centre": np.array([1.5, 2.0])})
    assert json.loads(Path(ctx.output_path).read_text()) == {"count": 3, "centre": [1.5, 2.0]}


def test_report_progress_replaces_the_progress_file(make_case) -> None:
    ctx = load_context(make_case())
    ctx.report_progress(0.25, "segmenting")
    ctx.report_progress(0.5, "measuring")
    progress = Path(os.path.dirname(ctx.output_path)) / "progress.json"
    assert json.loads(progress.read_text()) == {"fraction": 0.5, "message": "measuring"}
    assert _output_files(ctx) == ["progress.json"]  # no temporary file left behind


def test_report_progress_refuses_free_text(make_case) -> None:
    """Progress leaves the spoke unreviewed: only the fixed vocabulary of steps."""
    ctx = load_context(make_case())
    with pytest.raises(ValueError, match="progress step must be one of"):
        ctx.report_progress(0.5, "patient DOE^JANE, 3 nodules")
    assert _output_files(ctx) == []


@pytest.mark.parametrize("fraction", [-0.1, 1.5, "half"])
def test_report_progress_refuses_a_bad_fraction(make_case, fraction) -> None:
    ctx = load_context(make_case())
    with pytest.raises(ValueError, match="progress fraction"):
        ctx.report_progress(fraction)
