"""Developer tools without Docker: participant building, output checks, wheels, CLI."""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path

import pytest
from sdk_testutil import SDK_ROOT

from tributary_algorithm import INPUT_ROOT, load_context
from tributary_algorithm.cli import main as cli_main
from tributary_algorithm.contract import PSEUDONYM_PATTERN, describe_exit_code
from tributary_algorithm.tools import (
    LocalRunResult,
    ToolError,
    build_participant,
    build_sdk_wheel,
    prepare_local_debug,
    validate_output_file,
)
from tributary_algorithm.tools.build import (
    default_platforms,
    download_wheels,
    locate_sdk_source,
    wheel_requirements,
)
from tributary_algorithm.tools.localrun import _mount, find_series_dirs
from tributary_algorithm.tools.push import _pushed_digest, split_reference


def _files(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"data")
    return folder


def test_each_folder_with_files_is_a_series(tmp_path: Path) -> None:
    case = tmp_path / "MRN0042317_DOE_JANE"
    _files(case / "study" / "CT_1", "1.dcm", "2.dcm")
    _files(case / "study" / "SEG", "seg.dcm")
    (case / "empty").mkdir()
    _files(case / ".hidden", "x.dcm")
    local = build_participant(case, experiment_id="exp-7")
    participant = local.participant
    assert participant["experiment_id"] == "exp-7"
    assert [s["path"] for s in participant["series"]] == [
        f"{INPUT_ROOT}/series-001",
        f"{INPUT_ROOT}/series-002",
    ]
    assert [s["instance_count"] for s in participant["series"]] == [2, 1]
    assert [host.name for host, _ in local.mounts] == ["CT_1", "SEG"]
    assert all(s["modality"] == "OT" and s["rows"] is None for s in participant["series"])


def test_pseudonyms_are_stable_valid_and_leak_nothing(tmp_path: Path) -> None:
    case = _files(tmp_path / "MRN0042317_DOE_JANE", "a.dcm", ".DS_Store")
    first = build_participant(case).participant
    again = build_participant(case).participant
    other = build_participant(_files(tmp_path / "other", "a.dcm")).participant
    assert first == again
    assert first["case_id"] != other["case_id"]
    assert PSEUDONYM_PATTERN.match(first["case_id"]) and first["case_id"].startswith("c-")
    series_id = first["series"][0]["series_id"]
    assert PSEUDONYM_PATTERN.match(series_id) and series_id.startswith("s-")
    text = json.dumps(first)
    assert "MRN" not in text and "DOE" not in text and str(tmp_path) not in text
    assert first["series"][0]["instance_count"] == 1  # hidden file ignored


def test_the_folder_itself_is_the_series_when_it_holds_files(tmp_path: Path) -> None:
    case = _files(tmp_path / "case", "1.dcm")
    assert find_series_dirs(case) == [case.resolve()]


def test_no_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ToolError, match="no files"):
        build_participant(tmp_path / "empty")
    with pytest.raises(ToolError, match="not a folder"):
        build_participant(tmp_path / "missing")


def test_dicom_metadata_from_the_first_file(tmp_path: Path) -> None:
    pytest.importorskip("pydicom")
    from sdk_testutil import write_ct_slice

    case = tmp_path / "case"
    case.mkdir()
    write_ct_slice(case / "1.dcm", modality="CT", rows=8, columns=6)
    write_ct_slice(case / "2.dcm", modality="CT", rows=8, columns=6)
    [series] = build_participant(case).participant["series"]
    assert (series["modality"], series["rows"], series["columns"], series["body_part"]) == (
        "CT",
        8,
        6,
        "CHEST",
    )


def test_local_debug_hand_over_round_trips_through_load_context(tmp_path: Path) -> None:
    case = _files(tmp_path / "case", "1.dcm", "2.dcm")
    algo_arg = prepare_local_debug(case, tmp_path / "work", arguments={"k": 1})
    ctx = load_context(algo_arg)
    assert ctx.arguments == {"k": 1}
    assert Path(ctx.series[0].path) == case.resolve()
    assert len(ctx.series[0].files()) == 2
    ctx.write_output({"done": True})
    assert (tmp_path / "work" / "output" / "output.json").is_file()


@pytest.mark.parametrize(
    ("content", "problem", "detail"),
    [
        (None, "missing_output", "no output.json"),
        (b'{"a": 1', "invalid_output", "not valid JSON"),
        (b"\xff\xfe", "invalid_output", "not valid JSON"),
        (b'{"a": NaN}', "invalid_output", "not valid JSON"),
        (b"[1]", "invalid_output", "must hold a JSON object"),
        (b'"text"', "invalid_output", "must hold a JSON object"),
        (b'{"a": "' + b"x" * 2000 + b'"}', "output_too_large", "over the 1000 byte limit"),
    ],
)
def test_output_validation_like_the_spoke(tmp_path: Path, content, problem, detail) -> None:
    path = tmp_path / "output.json"
    if content is not None:
        path.write_bytes(content)
    check = validate_output_file(path, limit_bytes=1000)
    assert check.output is None
    assert check.problem == problem
    assert detail in check.detail


def test_valid_output_and_symlink_refusal(tmp_path: Path) -> None:
    path = tmp_path / "output.json"
    path.write_text('{"nodule_count": 0}')
    assert validate_output_file(path).output == {"nodule_count": 0}
    secret = tmp_path / "host-secret.json"
    secret.write_text('{"secret": true}')
    path.unlink()
    path.symlink_to(secret)
    check = validate_output_file(path)
    assert check.output is None and check.problem == "invalid_output"
    assert "cannot be opened safely" in check.detail


def _result(**changes) -> LocalRunResult:
    fields = dict(
        image="img",
        exit_code=0,
        meaning="success",
        timed_out=False,
        oom_killed=False,
        duration_s=1.0,
        stdout="",
        stderr="",
        output={"x": 1},
        output_error=None,
        output_problem=None,
        participant={},
        arguments={},
    )
    fields.update(changes)
    return LocalRunResult(**fields)


@pytest.mark.parametrize(
    ("changes", "outcome"),
    [
        ({}, "success"),
        ({"timed_out": True, "exit_code": 137}, "timeout"),
        ({"oom_killed": True, "exit_code": 137}, "out_of_memory"),
        ({"exit_code": 2, "output": None}, "invalid_arguments"),
        ({"exit_code": 3, "output": None}, "unsuitable_input"),
        ({"exit_code": 1, "output": None}, "exit_code"),
        ({"exit_code": 42}, "exit_code"),
        ({"output": None, "output_problem": "output_too_large"}, "output_too_large"),
    ],
)
def test_outcomes_use_the_spokes_failure_reasons(changes, outcome: str) -> None:
    result = _result(**changes)
    assert result.outcome == outcome
    assert result.ok == (outcome == "success")


def test_mount_specs_quote_awkward_paths() -> None:
    plain = _mount(Path("/data/case"), "/tributary/input/series-001", True)
    assert plain == "type=bind,source=/data/case,target=/tributary/input/series-001,readonly"
    awkward = _mount(Path("/data/a,b"), "/tributary/output", False)
    assert awkward == 'type=bind,"source=/data/a,b",target=/tributary/output'


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("127.0.0.1:5000/algorithms/lung", ("127.0.0.1:5000/algorithms/lung", None)),
        ("127.0.0.1:5000/algorithms/lung:1.0", ("127.0.0.1:5000/algorithms/lung", "1.0")),
        ("lung-nodule:dev", ("lung-nodule", "dev")),
    ],
)
def test_split_reference(reference: str, expected) -> None:
    assert split_reference(reference) == expected


def test_split_reference_refuses_digests() -> None:
    with pytest.raises(ToolError):
        split_reference("repo@sha256:" + "0" * 64)


def test_digest_announced_by_docker_push() -> None:
    digest = "sha256:" + "ab" * 32
    output = f"abc123: Pushed\n1.0: digest: {digest} size: 1784\n"
    assert _pushed_digest(output) == digest
    assert _pushed_digest("nothing here") is None


def test_exit_code_descriptions() -> None:
    assert describe_exit_code(0) == "success"
    assert describe_exit_code(3) == "unsuitable input"
    assert "SIGKILL" in describe_exit_code(137)
    assert "error" in describe_exit_code(42)


def test_default_platforms_cover_manylinux2014_to_2_28() -> None:
    tags = default_platforms("x86_64")
    assert tags[0] == "manylinux2014_x86_64"
    assert "manylinux_2_17_x86_64" in tags and tags[-1] == "manylinux_2_28_x86_64"


def test_sdk_source_is_found_in_a_checkout() -> None:
    assert locate_sdk_source() == SDK_ROOT


def test_sdk_wheel_carries_its_extras_and_offline_download_uses_the_cache(
    tmp_path: Path,
) -> None:
    littered_before = (SDK_ROOT / "build").exists()
    wheel = build_sdk_wheel(SDK_ROOT, tmp_path / "dist")
    assert wheel.name.startswith("tributary_algorithm-")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "tributary_algorithm/tools/build.py" in names
    assert not any("tests/" in n for n in names)
    # the checkout is not littered by this build (other tools may have left one before)
    assert littered_before or not (SDK_ROOT / "build").exists()
    # the dicom and training extras ship with every image; flower (flwr) does not
    assert sorted(wheel_requirements(wheel)) == ["numpy>=1.24", "pydicom>=2.3",
                                                 "safetensors>=0.4"]
    again = build_sdk_wheel(SDK_ROOT, tmp_path / "dist2")
    assert again.read_bytes() == wheel.read_bytes()  # reproducible: Docker cache hits
    # With the wanted wheel already in the cache, resolution never asks an index.
    cache = tmp_path / "dist"
    added = download_wheels(None, ["tributary-algorithm"], tmp_path / "ctx", cache=cache)
    assert added == [wheel.name]


def test_cli_help_and_errors(capsys, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        cli_main(["--help"])
    assert caught.value.code == 0
    assert "build" in capsys.readouterr().out
    with pytest.raises(SystemExit) as caught:
        cli_main(["test", "img", "--dicom", str(tmp_path), "--args", "[1]"])
    assert caught.value.code == 2
    assert cli_main(["build", str(tmp_path), "--tag", "x:y"]) == 1
    assert "has no Dockerfile" in capsys.readouterr().err


def test_output_dir_permissions_for_the_container_user(tmp_path: Path) -> None:
    from tributary_algorithm.tools.localrun import _prepare_output_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "output.json").write_text("{}")
    _prepare_output_dir(out)
    assert not (out / "output.json").exists()  # a stale answer is never re-read
    info = out.stat()
    if os.geteuid() == 0:
        assert info.st_uid == 65534
    else:
        assert info.st_mode & stat.S_IWOTH
