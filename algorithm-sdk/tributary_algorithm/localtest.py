"""``tributary-algorithm test``: which image (built from a folder, or given), which cases
(one folder, a cohort de-identified like a spoke's, or the folder's own sample cases), and
a report per case in the spoke's words."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from .tools import ToolError, build_image, print_result
from .tools.localrun import LocalParticipant, LocalRunResult, build_participant, run_participant

SAMPLE_CASES = "testdata"


def image_name(directory: Path) -> str:
    """The tag a folder's image is built under: ``NAME:test`` (``name`` of its
    ``algorithm.toml``, else the folder's name made tag-safe)."""
    manifest = directory / "algorithm.toml"
    name = ""
    if manifest.is_file():
        found = re.search(r'^name\s*=\s*"([^"]+)"', manifest.read_text(), re.MULTILINE)
        name = found.group(1) if found else ""
    name = name or re.sub(r"[^a-z0-9._-]+", "-", directory.resolve().name.lower()).strip("-._")
    return f"{name or 'algorithm'}:test"


def distinct_patients(folders: list[Path]) -> set[str]:
    """Patient IDs of the first file of each folder (pydicom if installed, else none)."""
    try:
        import pydicom
    except ImportError:
        return set()
    found = set()
    for folder in folders:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        try:
            ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
        except Exception:
            continue
        if ds.get("PatientID"):
            found.add(str(ds.PatientID))
    return found


def one_case(dicom_dir: Path) -> LocalParticipant:
    """The participant of ``--dicom DIR``; a folder holding several patients is refused
    rather than run as one giant case."""
    local = build_participant(dicom_dir)
    patients = distinct_patients([host for host, _ in local.mounts])
    if len(patients) > 1:
        raise ToolError(f"{dicom_dir} holds the series of {len(patients)} patients; --dicom "
                        "takes one case. Run a folder of cases with --cohort DIR (one case "
                        "per patient, de-identified like a spoke does).")
    return local


def _cases(args: argparse.Namespace, target: Path | None,
           cleanup: list[Path]) -> tuple[list[tuple[str, Any]], str]:
    """(label, participant) of each case to run and a line saying where they come from;
    folders to remove afterwards go to ``cleanup``."""
    if args.cohort is not None:
        from .tools.cohort import check_cohort_folder, prepare_cohort

        check_cohort_folder(args.cohort)
        print(f"ingesting {args.cohort} as a spoke would (this copies and de-identifies "
              "every file)…", flush=True)
        cohort = prepare_cohort(args.cohort)
        cleanup.append(cohort.workdir)
        note = f"{len(cohort.cases)} case(s), one per patient, {cohort.engine}"
        if cohort.excluded:
            shown = "; ".join(f"{ref} ({why})" for ref, why in cohort.excluded[:3])
            note += (f"\n{len(cohort.excluded)} file(s) left out as a spoke leaves them out: "
                     f"{shown}" + (" …" if len(cohort.excluded) > 3 else ""))
        return [(c.case_id, c.local) for c in cohort.cases], note
    if args.dicom is not None:
        return [(str(args.dicom), one_case(args.dicom))], "1 case (not de-identified: --dicom)"
    if target is None:
        raise ToolError("give the cases to run: --dicom CASE_DIR or --cohort COHORT_DIR")
    samples = target / SAMPLE_CASES
    folders = sorted(p for p in samples.iterdir() if p.is_dir()) if samples.is_dir() else []
    if not folders:
        raise ToolError(f"{target} has no {SAMPLE_CASES}/ folder of sample cases; give "
                        "--dicom CASE_DIR or --cohort COHORT_DIR")
    return ([(str(f.relative_to(target)), one_case(f)) for f in folders],
            f"{len(folders)} sample case(s) from {samples} (your own files, used as they are)")


def _as_json(result: LocalRunResult) -> dict[str, Any]:
    return {key: getattr(result, key) for key in (
        "exit_code", "meaning", "outcome", "timed_out", "oom_killed", "duration_s", "output",
        "output_error", "output_problem", "container", "stderr", "participant")}


def run_test(args: argparse.Namespace) -> int:
    """The ``test`` command; returns the exit status (0: every case succeeded)."""
    cleanup: list[Path] = []
    try:
        return _run_test(args, cleanup)
    finally:
        for folder in cleanup:
            shutil.rmtree(folder, ignore_errors=True)


def _training_sites(args: argparse.Namespace, cleanup: list[Path]) -> list[Any]:
    """Each ``--site`` (and ``--cohort``) folder de-identified like a spoke's store."""
    from .tools.cohort import prepare_cohort
    from .tools.localtrain import SiteCase, TrainingSite

    if args.dicom is not None:
        raise ToolError("--training runs on whole sites: give --site COHORT_DIR (repeatable), "
                        "not --dicom")
    folders = list(args.sites) + ([args.cohort] if args.cohort is not None else [])
    if not folders:
        raise ToolError("--training needs the sites' data: --site COHORT_DIR (repeatable)")
    sites = []
    for folder in folders:
        print(f"ingesting {folder} as a spoke would…", flush=True)
        cohort = prepare_cohort(folder)
        cleanup.append(cohort.workdir)
        sites.append(TrainingSite(folder.name, tuple(
            SiteCase(c.case_id, c.local, dict(c.attributes)) for c in cohort.cases)))
        print(f"site {folder.name}: {len(cohort.cases)} case(s)")
    return sites


def _run_training_test(args: argparse.Namespace, image: str, cleanup: list[Path]) -> int:
    from .tools.localtrain import train_test
    from .training import RoundConfig

    sites = _training_sites(args, cleanup)
    base = RoundConfig(round=0, strategy="fedprox" if args.proximal_mu else "fedavg",
                       proximal_mu=args.proximal_mu, local_epochs=args.local_epochs,
                       learning_rate=args.learning_rate, seed=args.seed)
    _, history = train_test(image, sites, args.rounds, base, arguments=args.arguments,
                            timeout=args.timeout, memory_mb=args.memory_mb, cpus=args.cpus,
                            pids_limit=args.pids_limit, tmpfs_mb=args.tmpfs_mb)
    if args.json:
        print(json.dumps([{"round": r.round, "participants": r.participants,
                           "loss": r.eval_loss, "metrics": r.metrics} for r in history]))
    return 0


def _run_test(args: argparse.Namespace, cleanup: list[Path]) -> int:
    target = Path(args.image) if Path(args.image).is_dir() else None
    image = args.image
    if target is not None:
        if not (target / "Dockerfile").is_file():
            raise ToolError(f"{target} is a folder without a Dockerfile")
        image = image_name(target)
        print(f"building {target} as {image}…", flush=True)
        built = build_image(target, image, base_image=args.base_image, sdk=args.sdk,
                            verbose=args.verbose)
        print(f"built {image} ({built.image_id[:19]})")
    if args.training:
        return _run_training_test(args, image, cleanup)
    cases, note = _cases(args, target, cleanup)
    print(note)
    results = []
    for index, (label, local) in enumerate(cases, start=1):
        output_dir = None
        if args.output is not None:
            output_dir = args.output if len(cases) == 1 else args.output / f"case-{index:03d}"
        result = run_participant(
            image, local, arguments=args.arguments, output_dir=output_dir,
            timeout=args.timeout, tmpfs_mb=args.tmpfs_mb, memory_mb=args.memory_mb,
            cpus=args.cpus, pids_limit=args.pids_limit)
        results.append((label, result))
        if args.json:
            continue
        if len(cases) == 1:
            print_result(result)
            continue
        line = f"case {index}/{len(cases)} {label}: {result.outcome} ({result.duration_s:.1f} s)"
        if result.ok:
            print(f"{line} {json.dumps(result.output, sort_keys=True)}")
        else:
            print(line)
            print_result(result, file=sys.stdout)
    failed = [label for label, result in results if not result.ok]
    if args.json:
        body = [{"case": label, **_as_json(result)} for label, result in results]
        print(json.dumps(body[0] if len(body) == 1 else body, indent=2))
    elif len(cases) > 1:
        print(f"{len(results) - len(failed)} of {len(results)} case(s) succeeded"
              + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
