"""``tributary-algorithm init`` writes a folder that works as it is, and ``test`` refuses
folders that are not what its option says (a cohort is not one case, one case is not a
cohort), without Docker."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tributary_algorithm.cli import main as cli_main
from tributary_algorithm.localtest import image_name, one_case
from tributary_algorithm.tools import ToolError
from tributary_algorithm.tools.cohort import check_cohort_folder
from tributary_algorithm.tools.scaffold import init_algorithm, sample_slice


def test_python_scaffold_passes_its_own_test(tmp_path: Path) -> None:
    written = init_algorithm(tmp_path / "algo", "my-algo")
    names = {p.relative_to(tmp_path / "algo").as_posix() for p in written}
    assert {"Dockerfile", "main.py", "arguments.schema.json", "algorithm.toml", "README.md",
            "tests/test_main.py", "requirements.txt"} <= names
    assert "ARG BASE_IMAGE" in (tmp_path / "algo" / "Dockerfile").read_text()
    assert image_name(tmp_path / "algo") == "my-algo:test"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests"], cwd=tmp_path / "algo", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_other_language_scaffold_ships_a_shell_entry_point(tmp_path: Path) -> None:
    init_algorithm(tmp_path / "algo", "any-lang", "other")
    run_sh = tmp_path / "algo" / "run.sh"
    assert run_sh.stat().st_mode & 0o111
    assert "COPY vendor/" in (tmp_path / "algo" / "Dockerfile").read_text()
    assert "no network" in (tmp_path / "algo" / "README.md").read_text()


def test_sample_slices_are_dicom_with_pixels(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    path = tmp_path / "one.dcm"
    path.write_bytes(sample_slice(uuid.uuid4(), 1))
    ds = pydicom.dcmread(str(path))
    assert ds.Modality == "CT" and ds.pixel_array.shape == (8, 8)


@pytest.mark.parametrize("name", ["My-Algo", "-x", "a b", "x" * 101, ""])
def test_unusable_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ToolError):
        init_algorithm(tmp_path / "algo", name)


def test_a_folder_in_use_is_not_overwritten(tmp_path: Path, capsys) -> None:
    (tmp_path / "algo").mkdir()
    (tmp_path / "algo" / "mine.py").write_text("")
    assert cli_main(["init", "algo", "--dir", str(tmp_path / "algo")]) == 1
    assert "not an empty folder" in capsys.readouterr().err


def _patient(folder: Path, patient: str) -> None:
    """A one-slice series of ``patient`` in ``folder``."""
    pydicom = pytest.importorskip("pydicom")
    folder.mkdir(parents=True)
    path = folder / "IM1.dcm"
    path.write_bytes(sample_slice(uuid.uuid4(), 1))
    ds = pydicom.dcmread(str(path))
    ds.PatientID = patient
    ds.save_as(str(path))


def test_one_case_refuses_a_cohort_and_a_cohort_refuses_one_case(tmp_path: Path) -> None:
    _patient(tmp_path / "cohort" / "MRN1_DOE_JANE", "MRN1")
    _patient(tmp_path / "cohort" / "MRN2_ROE_RICH", "MRN2")
    with pytest.raises(ToolError, match="2 patients; --dicom takes one case"):
        one_case(tmp_path / "cohort")
    assert one_case(tmp_path / "cohort" / "MRN1_DOE_JANE").participant["series"]
    with pytest.raises(ToolError, match="directly and no case folders"):
        check_cohort_folder(tmp_path / "cohort" / "MRN1_DOE_JANE")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ToolError, match="holds no case folders"):
        check_cohort_folder(tmp_path / "empty")
    check_cohort_folder(tmp_path / "cohort")


def test_a_cohort_is_one_case_per_patient_deidentified_by_the_spoke(tmp_path: Path) -> None:
    pytest.importorskip("tributary.spoke")
    from tributary_algorithm.tools.cohort import prepare_cohort

    _patient(tmp_path / "cohort" / "MRN1_DOE_JANE" / "ct", "MRN1")
    _patient(tmp_path / "cohort" / "MRN1_DOE_JANE" / "ct-2", "MRN1")  # same patient
    _patient(tmp_path / "cohort" / "MRN2_ROE_RICH", "MRN2")
    (tmp_path / "cohort" / "notes.txt").write_text("not an image")
    prepared = prepare_cohort(tmp_path / "cohort", tmp_path / "work")
    assert len(prepared.cases) == 2, prepared.excluded
    assert sorted(len(c.local.participant["series"]) for c in prepared.cases) == [1, 2]
    assert "the spoke's own engine" in prepared.engine
    assert [ref for ref, _ in prepared.excluded] == ["notes.txt"]
    pydicom = pytest.importorskip("pydicom")
    for case in prepared.cases:
        for folder, _ in case.local.mounts:
            ds = pydicom.dcmread(str(next(folder.iterdir())))
            assert not str(ds.PatientID).startswith("MRN")  # de-identified copies
            assert "MRN" not in str(folder)
