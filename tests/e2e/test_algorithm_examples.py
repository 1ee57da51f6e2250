"""The example algorithms, built and run the way a spoke runs them.

The e2e tests build ``examples/lung_nodule`` and ``tests/algorithms/misbehaving`` with the
SDK's ``build_image`` on the local base image and run them with ``run_local`` (same mounts,
isolation and output checks as a spoke) on a synthetic cohort with known ground truth.
The other tests need no Docker: they check the detector in-process and the generator.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("numpy")
pytest.importorskip("pydicom")
pytest.importorskip("tributary_algorithm")

from tributary_algorithm import InvalidArguments, load_context, validate_arguments
from tributary_algorithm.tools import (
    LocalRunResult,
    build_image,
    prepare_local_debug,
    push_image,
    run_local,
)

REPO = Path(__file__).resolve().parents[2]
LUNG_NODULE_DIR = REPO / "examples" / "lung_nodule"
MISBEHAVING_DIR = REPO / "tests" / "algorithms" / "misbehaving"
BASE_IMAGE = os.environ.get("TRIBUTARY_BASE_IMAGE", "tributary/python-base:3.11")
DETECTOR_TAG = "tributary-test/lung-nodule:e2e"
MISBEHAVING_TAG = "tributary-test/misbehaving:e2e"
COHORT_SEED = 2024


def _load(name: str, path: Path) -> ModuleType:
    """Import a script that is not part of a package (the examples are standalone)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


generate = _load("synthetic_ct_generate", REPO / "examples" / "synthetic_ct" / "generate.py")


def match_problems(findings: list[dict[str, Any]], nodules: list[dict[str, Any]]) -> list[str]:
    """Why ``findings`` do not match the ground truth (empty when they do).

    A nodule is found when a finding's centre lies within its radius and the diameter is
    within 20 % or 2.5 mm; the counts must be equal (no false positives).
    """
    problems = []
    if len(findings) != len(nodules):
        problems.append(f"{len(findings)} findings for {len(nodules)} nodules")
    unused = list(findings)
    for nodule in nodules:
        centre = nodule["center_mm"]

        def distance(finding: dict[str, Any], centre: list[float] = centre) -> float:
            return sum((a - b) ** 2 for a, b in zip(finding["center_mm"], centre, strict=True))

        if not unused:
            problems.append(f"nodule at {centre} not found")
            continue
        best = min(unused, key=distance)
        unused.remove(best)
        radius, diameter = nodule["diameter_mm"] / 2, nodule["diameter_mm"]
        if distance(best) ** 0.5 > radius:
            problems.append(f"nodule at {centre}: nearest finding at {best['center_mm']}")
        if abs(best["diameter_mm"] - diameter) > max(0.2 * diameter, 2.5):
            problems.append(f"nodule at {centre}: diameter {best['diameter_mm']} vs {diameter}")
    return problems


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Four cases: 0, 1, 2 and 3 nodules (the generator spreads counts evenly)."""
    out = tmp_path_factory.mktemp("cohort")
    truth = generate.generate_cohort(out, cases=4, seed=COHORT_SEED, site="E2E Test Hospital")
    assert sorted(len(case["nodules"]) for case in truth.values()) == [0, 1, 2, 3]
    return out, truth


# --- without Docker -----------------------------------------------------------------------


def test_generator_is_deterministic_and_looks_like_hospital_data(tmp_path: Path) -> None:
    import pydicom

    first = generate.generate_cohort(tmp_path / "a", cases=2, seed=5, site="Site A")
    second = generate.generate_cohort(tmp_path / "b", cases=2, seed=5, site="Site A")
    assert first == second
    folder = next(iter(first))
    assert folder.startswith("MRN") and "_" in folder
    files = sorted((tmp_path / "a" / folder).iterdir())
    assert len(files) == 40
    assert [f.read_bytes() for f in files] == [
        f.read_bytes() for f in sorted((tmp_path / "b" / folder).iterdir())
    ]
    ds = pydicom.dcmread(files[0])
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert (ds.Modality, ds.BodyPartExamined, ds.InstitutionName) == ("CT", "CHEST", "Site A")
    assert ds.PatientID == folder.split("_")[0]
    for keyword in (
        "PatientName",
        "PatientBirthDate",
        "PatientAddress",
        "AccessionNumber",
        "ReferringPhysicianName",
        "OperatorsName",
        "InstitutionAddress",
    ):
        assert str(ds.get(keyword, "")), keyword
    assert any(elem.tag.is_private for elem in ds)
    assert (ds.Rows, ds.Columns, float(ds.SliceThickness)) == (160, 160, 2.5)


def test_detector_schema_defaults_and_rejections() -> None:
    schema = json.loads((LUNG_NODULE_DIR / "arguments.schema.json").read_text())
    assert validate_arguments({}, schema) == {"min_diameter_mm": 4, "threshold_hu": -400}
    for bad in ({"min_diameter_mm": "4"}, {"threshold_hu": 50}, {"sensitivity": 1}):
        with pytest.raises(InvalidArguments):
            validate_arguments(bad, schema)


def test_detector_in_process_on_a_larger_cohort(tmp_path: Path) -> None:
    """Eight more cases, without containers: the algorithm itself is exact enough."""
    pytest.importorskip("scipy")
    detector = _load("lung_nodule_detector", LUNG_NODULE_DIR / "detector.py")
    truth = generate.generate_cohort(tmp_path / "cohort", cases=8, seed=99)
    for folder, case in truth.items():
        ctx = load_context(prepare_local_debug(tmp_path / "cohort" / folder, tmp_path / folder))
        output = detector.main(ctx)
        assert output["nodule_count"] == len(output["findings"])
        assert match_problems(output["findings"], case["nodules"]) == [], folder


# --- with Docker --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_ready() -> None:
    """Skip (with the reason) unless a Docker engine and the local base image are there."""
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"`docker info` failed, no Docker engine: {info.stderr.strip()[:200]}")
    base = subprocess.run(
        ["docker", "image", "inspect", BASE_IMAGE], capture_output=True, timeout=60
    )
    if base.returncode != 0:
        pytest.skip(f"base image {BASE_IMAGE} is not built (no Docker Hub here)")


@pytest.fixture(scope="module")
def lung_nodule_tag(docker_ready: None) -> str:
    build_image(LUNG_NODULE_DIR, DETECTOR_TAG, base_image=BASE_IMAGE)
    return DETECTOR_TAG


@pytest.fixture(scope="module")
def misbehaving_tag(docker_ready: None) -> str:
    build_image(MISBEHAVING_DIR, MISBEHAVING_TAG, base_image=BASE_IMAGE)
    return MISBEHAVING_TAG


def _explain(result: LocalRunResult) -> str:
    return f"exit {result.exit_code} ({result.meaning}): {result.stderr[-2000:]}"


@pytest.mark.e2e
def test_detector_container_finds_the_ground_truth(lung_nodule_tag: str, cohort) -> None:
    out, truth = cohort
    for folder, case in truth.items():
        result = run_local(lung_nodule_tag, out / folder, timeout=120, memory_mb=1024)
        assert result.ok, _explain(result)
        output = result.output
        assert output["nodule_count"] == len(case["nodules"])
        assert match_problems(output["findings"], case["nodules"]) == [], folder
        assert output["series_id"] == result.participant["series"][0]["series_id"]
        assert "MRN" not in json.dumps(output)  # the folder name never reaches the output
        if not case["nodules"]:
            assert output == {"nodule_count": 0, "findings": [], "series_id": output["series_id"]}


@pytest.mark.e2e
def test_detector_container_rejects_bad_arguments(lung_nodule_tag: str, cohort) -> None:
    out, truth = cohort
    result = run_local(
        lung_nodule_tag, out / next(iter(truth)), arguments={"min_diameter_mm": -3}, timeout=120
    )
    assert (result.exit_code, result.outcome) == (2, "invalid_arguments"), _explain(result)
    assert "min_diameter_mm must be >= 0" in result.stderr


@pytest.mark.e2e
def test_detector_container_says_unsuitable_without_ct(
    lung_nodule_tag: str, tmp_path: Path
) -> None:
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "report.txt").write_text("not an image")
    os.chmod(folder / "report.txt", 0o644)
    result = run_local(lung_nodule_tag, folder, timeout=120)
    assert (result.exit_code, result.outcome) == (3, "unsuitable_input"), _explain(result)
    assert "no CT series" in result.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("behaviour", "outcome", "exit_code", "evidence"),
    [
        ("ok", "success", 0, ""),
        ("crash", "exit_code", 1, "RuntimeError: deliberate crash"),
        ("garbage", "invalid_output", 0, "not valid JSON"),
        ("not-object", "invalid_output", 0, "must hold a JSON object"),
        ("oversize", "output_too_large", 0, "over the 1048576 byte limit"),
        ("no-output", "missing_output", 0, "no output.json"),
        ("network", "exit_code", 1, "network access failed"),
        ("write-input", "exit_code", 1, "Read-only file system"),
    ],
)
def test_misbehaving_container_is_contained(
    misbehaving_tag: str,
    cohort,
    behaviour: str,
    outcome: str,
    exit_code: int,
    evidence: str,
) -> None:
    out, truth = cohort
    result = run_local(
        misbehaving_tag, out / next(iter(truth)), arguments={"behaviour": behaviour}, timeout=60
    )
    assert (result.outcome, result.exit_code) == (outcome, exit_code), _explain(result)
    assert evidence in f"{result.stderr}\n{result.output_error}"
    if behaviour == "ok":
        assert result.output == {"ok": True, "case_id": result.participant["case_id"]}


@pytest.mark.e2e
def test_misbehaving_hang_is_killed_at_the_timeout(misbehaving_tag: str, cohort) -> None:
    out, truth = cohort
    started = time.monotonic()
    result = run_local(
        misbehaving_tag, out / next(iter(truth)), arguments={"behaviour": "hang"}, timeout=4
    )
    assert result.timed_out and result.outcome == "timeout", _explain(result)
    assert time.monotonic() - started < 30
    names = subprocess.run(
        ["docker", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True
    ).stdout.split()
    assert result.container and result.container not in names  # killed and removed


@pytest.mark.e2e
def test_misbehaving_memory_hog_is_killed(misbehaving_tag: str, cohort) -> None:
    out, truth = cohort
    result = run_local(
        misbehaving_tag,
        out / next(iter(truth)),
        arguments={"behaviour": "memory"},
        timeout=60,
        memory_mb=96,
    )
    assert result.outcome == "out_of_memory" and result.exit_code == 137, _explain(result)
    assert result.oom_killed


def _free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.e2e
def test_push_reports_the_manifest_digest(misbehaving_tag: str, tmp_path: Path) -> None:
    """Push to a throw-away registry on loopback (Debian's docker-registry, if installed)."""
    registry_bin = shutil.which("docker-registry")
    if registry_bin is None:
        pytest.skip("docker-registry (Debian package) is not installed")
    port = _free_loopback_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
        f"    rootdirectory: {tmp_path / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    registry = subprocess.Popen(
        [registry_bin, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("local registry did not start")
                time.sleep(0.2)
        repository = f"127.0.0.1:{port}/tributary-test/misbehaving"
        repo, digest = repository, ""
        repo, digest = push_image(misbehaving_tag, f"{repository}:v1")
        assert repo == repository and digest.startswith("sha256:") and len(digest) == 71
        image_id = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{.Id}}", misbehaving_tag],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert digest != image_id  # the manifest digest, not the config digest
        pulled = subprocess.run(
            ["docker", "pull", f"{repo}@{digest}"], capture_output=True, text=True, timeout=120
        )
        assert pulled.returncode == 0, pulled.stderr
    finally:
        registry.terminate()
        registry.wait(timeout=20)
        subprocess.run(
            [
                "docker",
                "image",
                "rm",
                f"{repository}:v1",
                *([f"{repo}@{digest}"] if digest else []),
            ],
            capture_output=True,
        )
