"""De-identifying a folder for a data steward (``tributary spoke deidentify``), on one
process or many, with the same result.

The work is split as ingest's is (:mod:`tributary.spoke.preparing`): :class:`FolderWorker`
screens, de-identifies and writes one file into a staging folder inside DST, in whichever
process it runs, and returns only a :class:`FileResult` (the verdict and metadata, never
the bytes); :class:`FolderRun`, in the parent, takes the results in input order and
decides what only the whole batch shows (identical pixel data, two inputs with one SOP
Instance UID, what an earlier run left in DST), then moves each kept file to its place
without ever replacing one. The order of decisions is the input order, so the outputs,
the report and the pseudonyms are those of one process whatever the number of workers."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tributary.spoke.cores import usable_cores
from tributary.spoke.deid import Deidentifier, DeidOptions, FileVerdict, Reason, Screener
from tributary.spoke.deid.output import write_new
from tributary.spoke.deid.screening import SlicePlace
from tributary.spoke.pseudonyms import Pseudonymizer
from tributary.spoke.store import Excluded, failure_reason

#: The staging folder's name inside DST: removed at the end of every run (and at the
#: start of the next one, should a run be killed).
STAGING = ".tributary-staging"
_EARLIER = "a file an earlier run wrote to DST"
#: Fewer files than this are de-identified in this process alone: a worker takes a
#: fraction of a second of CPU to start, which a small set would not win back.
PARALLEL_MIN = 64


@dataclass(frozen=True)
class FileResult:
    """One input, as a worker prepared it: what the parent needs to decide, and where
    the written file waits (``staged``, None when nothing was written)."""

    verdict: FileVerdict
    placed: SlicePlace | None = None
    relative: str | None = None  # <case>/<series>/<SOP Instance UID>.dcm
    staged: str | None = None
    digest: str | None = None
    pixel_digest: str | None = None
    removed_unknown: list[str] = field(default_factory=list)
    removed_undecodable: list[str] = field(default_factory=list)


class FolderWorker:
    """Screens, de-identifies and stages one file at a time (in a worker or the parent)."""

    def __init__(self, pseudonyms: Pseudonymizer, options: DeidOptions, staging: Path
                 ) -> None:
        self.pseudonyms = pseudonyms
        self.deid = Deidentifier(pseudonyms, options)
        self.screener = Screener(options, pseudonyms, hash_pixels=False)
        self.staging = staging

    def __call__(self, path: Path, root: Path | None) -> FileResult:
        from tributary.spoke.deid.output import encode

        ds, verdict = self.screener.check(path, root)
        placed = self.screener.hand_over(verdict)
        if ds is None:
            return FileResult(verdict, placed)
        try:
            case_id = self.pseudonyms.case_id(f"patient:{ds.get('PatientID', '')}")
            self.deid.deidentify(ds, case_id)
            relative = f"{case_id}/{verdict.series_id}/{ds.SOPInstanceUID}.dcm"
            encoded = encode(ds)  # hashed once, here, and written once, below
        except Exception as exc:  # one bad file must not stop the batch; it is reported
            verdict.add(Reason.DEIDENTIFICATION_FAILED, failure_reason(exc))
            return FileResult(verdict, None)
        staged = self.staging / f"{secrets.token_hex(12)}.dcm"
        try:
            write_new(staged, encoded, 0o644)
        except OSError as exc:
            verdict.add(Reason.DEIDENTIFICATION_FAILED, f"cannot write: {exc}"[:300])
            return FileResult(verdict, None)
        return FileResult(verdict, placed, relative, str(staged), encoded.digest,
                          encoded.pixel_digest, list(self.deid.removed_unknown),
                          list(self.deid.removed_undecodable))


def worker_task(key_file: str, options_json: str, staging: str) -> FolderWorker:
    """A worker process's preparer (see :class:`tributary.spoke.preparing.PreparePool`)."""
    return FolderWorker(Pseudonymizer.from_key_file(Path(key_file)),
                        DeidOptions.model_validate_json(options_json), Path(staging))


def lost(path: str, excluded: Excluded) -> FileResult:
    """A file no worker could prepare (two died on it): excluded with the pool's reason."""
    verdict = FileVerdict(path=path)
    verdict.add(Reason.DEIDENTIFICATION_FAILED,
                excluded.reason.removeprefix(f"{Reason.DEIDENTIFICATION_FAILED}: "))
    return FileResult(verdict)


def prepared(paths: list[Path], src: Path, key_file: Path, options: DeidOptions,
             staging: Path, workers: int | None = None) -> Iterator[FileResult]:
    """A :class:`FileResult` for each of ``paths``, in their order. With ``workers`` > 1
    (default: :func:`usable_cores`) and at least :data:`PARALLEL_MIN` files, ``workers
    - 1`` worker processes help this one, which prepares files itself whenever no
    worker result waits; a file no worker could prepare comes back excluded."""
    local = FolderWorker(Pseudonymizer.from_key_file(key_file), options, staging)
    workers = usable_cores() if workers is None else workers
    if workers < 2 or len(paths) < PARALLEL_MIN:
        for path in paths:
            yield local(path, src)
        return
    from tributary.spoke.preparing import FOLDER_TASK, PreparePool

    pool = PreparePool(workers - 1, key_file, options.model_dump_json(), staging,
                       task=FOLDER_TASK)
    jobs = [(str(path), str(src)) for path in paths]
    for job, result in zip(jobs, pool.map(jobs, local=lambda j: local(Path(j[0]), src)),
                           strict=True):
        yield lost(job[0], result) if isinstance(result, Excluded) else result


@dataclass
class Output:
    """A file written to DST, with what the engine removed from it."""

    source: str
    output: str
    removed_unknown: list[str]
    removed_undecodable: list[str]


class FolderRun:
    """The parent's side: results in input order become outputs in DST or exclusions."""

    def __init__(self, screener: Screener, dst: Path) -> None:
        self.screener, self.dst = screener, dst
        self.staging = dst / STAGING
        self.outputs: list[Output] = []
        # Output path -> (source, digest): inputs that share a SOP Instance UID map to one
        # output name; the first is kept, the others are excluded, never written over it,
        # so the report always says what is on disk.
        self._written: dict[Path, tuple[str, str]] = {}
        self._made: set[Path] = set()  # folders made: one mkdir each, not one a file

    def open(self) -> None:
        """A fresh staging folder in DST (the same file system: a kept file is linked,
        not copied, to its place)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def take(self, result: FileResult) -> None:
        verdict = result.verdict
        self.screener.adopt(verdict, result.placed)
        staged = Path(result.staged) if result.staged else None
        try:
            if staged is not None and result.relative and result.digest:
                self._place(result, staged, result.relative, result.digest)
        finally:
            if staged is not None:
                staged.unlink(missing_ok=True)

    def _place(self, result: FileResult, staged: Path, relative: str, digest: str) -> None:
        verdict = result.verdict
        if result.pixel_digest and self.screener.seen_pixels(verdict, result.pixel_digest):
            return
        target = self.dst / relative
        try:
            first = self._written.get(target) or _earlier_run(target, staged, digest)
            if first is not None and not (first[0] == _EARLIER and first[1] == digest):
                if first[1] == digest:
                    verdict.add(Reason.DUPLICATE_INSTANCE, f"same de-identified instance "
                                f"as {first[0]}; written once")
                else:
                    verdict.add(Reason.UID_COLLISION, f"same SOP Instance UID as "
                                f"{first[0]}; different content, the first file is kept")
                return
            if first is None:  # else an earlier run wrote exactly these bytes
                if target.parent not in self._made:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self._made.add(target.parent)
                _move_new(staged, target)
        except OSError as exc:
            verdict.add(Reason.DEIDENTIFICATION_FAILED, f"cannot write: {exc}"[:300])
            return
        self._written[target] = (verdict.path, digest)
        self.outputs.append(Output(verdict.path, relative, result.removed_unknown,
                                   result.removed_undecodable))


def _move_new(staged: Path, target: Path) -> None:
    """``staged`` to ``target``, never replacing a file: a hard link where the file
    system has them; elsewhere (FAT, exFAT: a steward's USB disk) a rename after a check,
    this run being the only writer of its outputs."""
    try:
        os.link(staged, target)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        os.rename(staged, target)


def _earlier_run(target: Path, staged: Path, digest: str) -> tuple[str, str] | None:
    """A file an earlier run left at ``target``, with ``digest`` when it holds exactly
    the staged bytes: identical bytes count as this run's output (re-running is
    harmless); other bytes are a collision."""
    if not target.is_file():
        return None
    same = target.read_bytes() == staged.read_bytes()
    return _EARLIER, digest if same else "other bytes"
