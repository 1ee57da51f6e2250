"""Loading ALGO_ARG and the participant JSON, and the errors a bad hand-over gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sdk_testutil import CASE_ID, SERIES_ID, participant_for

from tributary_algorithm import (
    ALGO_ARG_FILE_ENV,
    CONTRACT_VERSION,
    OUTPUT_PATH,
    PARTICIPANT_PATH,
    ContextError,
    InvalidArguments,
    load_context,
)
from tributary_algorithm.context import parse_algo_arg


def test_loads_a_valid_case(make_case, tmp_path: Path) -> None:
    ctx = load_context(make_case({"min_diameter_mm": 5}))
    assert ctx.case_id == CASE_ID
    assert ctx.experiment_id == "exp-1"
    assert ctx.arguments == {"min_diameter_mm": 5}
    assert ctx.output_path == str(tmp_path / "output" / "output.json")
    [series] = ctx.series
    assert series.series_id == SERIES_ID
    assert (series.modality, series.instance_count, series.rows, series.body_part) == (
        "CT",
        2,
        4,
        None,
    )
    assert ctx.series_with_modality("ct") == [series]
    assert ctx.series_with_modality("MR") == []


def test_series_files_are_sorted_and_skip_hidden(make_case, tmp_path: Path) -> None:
    ctx = load_context(make_case())
    folder = Path(ctx.series[0].path)
    (folder / ".DS_Store").write_bytes(b"x")
    (folder / "sub").mkdir()
    (folder / "sub" / "c.dcm").write_bytes(b"x")
    names = [Path(p).relative_to(folder).as_posix() for p in ctx.series[0].files()]
    assert names == ["a.dcm", "b.dcm", "sub/c.dcm"]


def test_reads_algo_arg_from_the_environment(make_case, monkeypatch) -> None:
    monkeypatch.setenv("ALGO_ARG", make_case({"x": 1}))
    assert load_context().arguments == {"x": 1}


def test_file_override_for_local_debugging(make_case, tmp_path: Path, monkeypatch) -> None:
    arg_file = tmp_path / "algo_arg.json"
    arg_file.write_text(make_case({"y": 2}))
    monkeypatch.delenv("ALGO_ARG", raising=False)
    monkeypatch.setenv(ALGO_ARG_FILE_ENV, str(arg_file))
    assert load_context().arguments == {"y": 2}


def test_explicit_environ_mapping(make_case) -> None:
    assert load_context(environ={"ALGO_ARG": make_case({"z": 3})}).arguments == {"z": 3}


def test_contract_defaults_fill_missing_fields() -> None:
    parsed = parse_algo_arg("{}")
    assert parsed == {
        "contract_version": CONTRACT_VERSION,
        "arguments": {},
        "participant": PARTICIPANT_PATH,
        "output": OUTPUT_PATH,
    }


def test_relative_series_paths_resolve_against_the_participant_file(tmp_path: Path) -> None:
    (tmp_path / "series").mkdir()
    participant_file = tmp_path / "participant.json"
    participant_file.write_text(json.dumps(participant_for(Path("series"))))
    ctx = load_context({"participant": str(participant_file), "output": "out.json"})
    assert ctx.series[0].path == str(tmp_path / "series")


@pytest.mark.parametrize(
    ("algo_arg", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"contract_version": "2.0"}', "contract_version"),
        ('{"contract_version": 1}', "contract_version"),
        ('{"participant": ""}', "participant must be a non-empty path"),
        ('{"output": 5}', "output must be a non-empty path"),
        ('{"participant": "/nonexistent/participant.json"}', "cannot be read"),
    ],
)
def test_bad_algo_arg_gives_a_clear_error(algo_arg: str, message: str) -> None:
    with pytest.raises(ContextError, match=message):
        load_context(algo_arg)


def test_missing_algo_arg_explains_how_to_debug_locally() -> None:
    with pytest.raises(ContextError, match="ALGO_ARG is not set"):
        load_context(environ={})


def test_arguments_that_are_not_an_object_are_invalid_arguments(make_case) -> None:
    algo_arg = json.loads(make_case())
    algo_arg["arguments"] = [1, 2]
    with pytest.raises(InvalidArguments, match="arguments must be a JSON object"):
        load_context(json.dumps(algo_arg))
    assert InvalidArguments("x").code == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"case_id": "MRN0042317"}, "case_id must be a pseudonym"),
        ({"case_id": "c-0123"}, "case_id must be a pseudonym"),
        ({"experiment_id": ""}, "experiment_id"),
        ({"series": {}}, "series must be a list"),
        ({"contract_version": "3.1"}, "contract_version"),
    ],
)
def test_bad_participant_fields_are_named(make_case, overrides, message: str) -> None:
    with pytest.raises(ContextError, match=message):
        load_context(make_case(**overrides))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("series_id", "DOE_JANE", r"series\[0\]\.series_id"),
        ("instance_count", True, r"series\[0\]\.instance_count"),
        ("instance_count", -1, r"series\[0\]\.instance_count"),
        ("rows", "160", r"series\[0\]\.rows"),
        ("modality", None, r"series\[0\]\.modality"),
        ("body_part", 7, r"series\[0\]\.body_part"),
    ],
)
def test_bad_series_fields_are_named(make_case, tmp_path, field, value, message) -> None:
    series = participant_for(tmp_path)["series"]
    series[0][field] = value
    with pytest.raises(ContextError, match=message):
        load_context(make_case(series=series))


def test_participant_that_is_not_json(make_case, tmp_path: Path) -> None:
    algo_arg = make_case()
    (tmp_path / "participant.json").write_text("{oops")
    with pytest.raises(ContextError, match="is not JSON"):
        load_context(algo_arg)


def test_datasets_reads_dicom_and_skips_other_files(make_case, tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from sdk_testutil import write_ct_slice

    ctx = load_context(make_case())
    folder = Path(ctx.series[0].path)
    write_ct_slice(folder / "real.dcm", modality="CT")
    datasets = ctx.series[0].datasets(stop_before_pixels=True)
    assert [ds.Modality for ds in datasets] == ["CT"]
    from tributary_algorithm import UnsuitableInput

    with pytest.raises(UnsuitableInput, match="not a readable DICOM"):
        ctx.series[0].datasets(skip_invalid=False)
