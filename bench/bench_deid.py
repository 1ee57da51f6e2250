"""De-identification against its floor and against dicognito, on two corpora, all in one
run:

- corpora: generated CT (512x512 slices, 1,500 by default) and pydicom's own test files
  (those dicognito can process, so that every tool handles the same files);
- the floor: plain pydicom read + write of each file (any de-identifier reads and writes);
  on CT also as two processes, each with half the files: what two processes doing only
  that gain on the machine, the baseline of the two-process figures;
- dicognito, in an environment of its own (``bench/.venv-baselines``, created on first
  use with pip; it is not a dependency of Tributary);
- Tributary: ``tributary spoke deidentify`` (screening, PS3.15 profile, report), and
  ``tributary spoke ingest`` (the same plus the content-addressed store and the catalog)
  with one process and with two worker processes;
- whole processes (what a user waits for, startup included) and in-process (the loops
  alone), and the time each tool takes for one file (its startup).

The machine may be shared: each round runs every variant once, in an order that rotates
between rounds, and the figures are medians over the rounds. Each figure is wall time
beside CPU time (user + system, of the process and every process it waited for: the
ingest's workers too), so a speed-up on two processes is shown with the CPU it cost;
the load average is printed beside each table. Before each run, what earlier runs wrote
is flushed to disk (``sync``): the kernel writes dirty pages back about 30 s after they
were written, on the CPUs, so without it every run would share the cores with the
write-back of runs before it, and a run on two processes, which leaves no core idle,
would pay for it more than one on a single process. And each run writes where no earlier
run wrote, when the disk has room for a whole section's outputs (see ``RunFolders``).

    .venv/bin/python bench/bench_deid.py [--slices 1500] [--rounds 3] [--quick] [--ct-only]
    .venv/bin/python bench/bench_deid.py --startup [--rounds 9]   # one file only

``--ct-only`` runs the CT corpus alone, whole processes and in-process (no small files,
no one-file start): enough for ingest's and deidentify's figures on two processes.
Tributary's modules are compiled to bytecode first, as installing a wheel does: with
``PYTHONDONTWRITEBYTECODE`` set, a source tree would otherwise be compiled again by every
process, and the startup figures would measure the compiler.

The last line reads ``deid: F<times> floor, D<times> dicognito, S<times> on 2 processes``
(with the multiplication sign; CT, whole processes: the floor's time over Tributary's,
dicognito's over Tributary's, one ingest process's over two workers')."""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASELINES = HERE / ".venv-baselines"
DICOGNITO = "dicognito==0.19.0"
TRIBUTARY = Path(sys.executable).with_name("tributary")
FLOOR_2 = "floor on 2 processes (half each)"

#: Run inside the baselines' environment: dicognito's own pipeline over the files given,
#: timed in-process; prints the seconds and the files it could not process.
_DICOGNITO_DRIVER = r"""
import json, sys, time, warnings
from pathlib import Path
import pydicom
from dicognito.anonymizer import Anonymizer
warnings.simplefilter("ignore")
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
paths = sorted(p for p in src.rglob("*") if p.is_file())
dst.mkdir(parents=True, exist_ok=True)
anonymizer = Anonymizer()
failed = []
t0 = time.perf_counter()
for path in paths:
    try:
        ds = pydicom.dcmread(path)
        anonymizer.anonymize(ds)
        ds.save_as(dst / f"{ds.SOPInstanceUID}.dcm")
    except Exception:
        failed.append(str(path.relative_to(src)))
print(json.dumps({"seconds": time.perf_counter() - t0, "failed": failed}))
"""


def floor(src: Path, dst: Path, part: int = 0, parts: int = 1) -> None:
    """The floor: read and write every file with pydicom, nothing else (with ``parts``
    > 1, every ``parts``-th file from the ``part``-th: one process's share, written to a
    folder of its own, so that the processes do not queue for one directory's lock)."""
    import pydicom

    if parts > 1:
        dst = dst / f"part-{part}"
    dst.mkdir(parents=True, exist_ok=True)
    every = sorted(p for p in src.rglob("*") if p.is_file())
    for index, path in enumerate(every[part::parts], start=part):
        with contextlib.suppress(Exception):  # a file pydicom cannot write is skipped
            pydicom.dcmread(path).save_as(dst / f"{index}.dcm", enforce_file_format=True)


def ensure_baselines() -> Path:
    """dicognito in an environment of its own (made once, from the package index)."""
    python = BASELINES / "bin" / "python"
    if not python.exists() or subprocess.run(
            [python, "-c", "import dicognito"], capture_output=True).returncode:
        subprocess.run([sys.executable, "-m", "venv", BASELINES], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", DICOGNITO], check=True)
    return python


def dicognito_inprocess(python: Path, src: Path, dst: Path) -> dict:
    done = subprocess.run([python, "-c", _DICOGNITO_DRIVER, src, dst], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def small_corpus(python: Path, root: Path) -> Path:
    """pydicom's test files that dicognito processes (its CLI stops at its first error)."""
    import pydicom

    every = Path(pydicom.__file__).parent / "data" / "test_files"
    failed = set(dicognito_inprocess(python, every, root / "probe")["failed"])
    shutil.rmtree(root / "probe")
    out = root / "small"
    for path in sorted(p for p in every.rglob("*") if p.is_file()):
        ref = str(path.relative_to(every))
        if ref not in failed:
            (out / ref).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, out / ref)
    return out


def ct_corpus(root: Path, slices: int) -> Path:
    from tributary.testbed.federation import generate_cohort

    per_case = 100
    out = root / "ct"
    generate_cohort(out, max(1, slices // per_case), seed=5, site="Bench Hospital",
                    size=512, slices=min(per_case, slices))
    (out / "ground_truth.json").unlink(missing_ok=True)
    (out / "attributes.csv").unlink(missing_ok=True)
    return out


class RunFolders:
    """The folder each run writes to. With ``fresh_space``, one no earlier run wrote to,
    and nothing is deleted until a section's rounds end (:meth:`clear`): on this kind of
    machine, files created where others were just deleted (ext4 skips recently freed
    inodes; the kernel hands back pages just freed) cost a varying amount of system time,
    more for two processes writing at once than for one, so deleting the last run's
    output before each run moved ingest's two-process ratio between 1.5x and 2.3x on the
    same code (its CPU time between 0.8x and 1.3x of one process's). Writing into fresh
    space is also what a site ingesting its archive into a new store does. Without the
    disk space for it, each run deletes the last one's output first, and says so."""

    def __init__(self, root: Path, fresh_space: bool) -> None:
        self.root, self.fresh_space, self._count = root / "runs", fresh_space, 0

    def new(self, name: str) -> Path:
        """An empty folder for one run's output (not created)."""
        if not self.fresh_space:
            folder = self.root / name
            shutil.rmtree(folder, ignore_errors=True)
            return folder
        self._count += 1
        return self.root / f"{self._count:05d}-{name}"

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def space_for(root: Path, corpus: Path, variants: int, count: int) -> bool:
        """Whether the disk holds every run's output of one section at once."""
        size = sum(p.stat().st_size for p in corpus.rglob("*") if p.is_file())
        return shutil.disk_usage(root).free > 1.2 * size * variants * count + 2e9


def spoke_config(root: Path, src: Path, workers: int, work: Path) -> Path:
    """A spoke configuration whose work folder is ``work`` (fresh), with the bench's one
    key."""
    work.mkdir(parents=True)
    shutil.copy(root / "bench.key", work / "pseudonym.key")
    path = root / f"spoke-{workers}.toml"
    path.write_text(f'spoke_id = "bench"\ndata_dir = "{src}"\nwork_dir = "{work}"\n'
                    f'hub_public_key = "{root / "hub.pub"}"\n\n[catalog]\n'
                    f"workers = {workers}\n")
    return path


#: (wall seconds, CPU seconds) of one run of a variant
Sample = tuple[float, float]


def cpu_seconds() -> float:
    """User + system time of this process and of every child it has waited for (and
    theirs, as each waited for its own): a whole process's workers are counted."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measured(run: Callable[[], object]) -> Sample:
    """Wall and CPU time of ``run()``, in this process and the processes it waits for."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    run()
    return time.perf_counter() - t0, cpu_seconds() - c0


def timed(command: list[str | Path], check: bool = True) -> Sample:
    def run() -> None:
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
        if check and done.returncode:
            raise RuntimeError(f"{command[0]} failed: {done.stderr[-2000:]}")

    return measured(run)


def rounds(variants: dict[str, Callable[[], Sample]], count: int, folders: RunFolders
           ) -> dict[str, Sample]:
    """Each variant once per round, the order rotating; the median wall and the median
    CPU time of each. The runs' outputs are deleted at the end."""
    names = list(variants)
    samples: dict[str, list[Sample]] = {n: [] for n in names}
    for r in range(count):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            os.sync()  # not the write-back of the runs before this one (see the top)
            samples[name].append(variants[name]())
    folders.clear()
    os.sync()
    return {n: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s))
            for n, s in samples.items()}


def whole_variants(root: Path, src: Path, baseline: Path, folders: RunFolders, small: bool,
                   halves: bool = False) -> dict[str, Callable[[], Sample]]:
    """Each tool as a whole process over ``src``; with ``halves``, the floor on two
    processes too (the baseline of the two-process figures)."""
    def fresh() -> Path:
        return folders.new("out")

    key = root / "bench.key"
    def floor_halves() -> Sample:
        """The floor on two processes, each reading and writing half the files: what the
        machine gives two processes doing the least any de-identifier does."""
        def run() -> None:
            target = fresh()
            halves = [subprocess.Popen([sys.executable, __file__, "--floor", src, target,
                                        "--floor-part", str(part)],
                                       stdout=subprocess.DEVNULL) for part in (0, 1)]
            if any(half.wait() for half in halves):
                raise RuntimeError("the floor failed")

        return measured(run)

    variants: dict[str, Callable[[], Sample]] = {
        "floor: pydicom read+write": lambda: timed(
            [sys.executable, __file__, "--floor", src, fresh()]),
        **({FLOOR_2: floor_halves} if halves else {}),
        "dicognito": lambda: timed(
            [baseline, "-m", "dicognito", "--quiet", "-o", fresh(), src]),
        "tributary spoke deidentify": lambda: timed(
            [TRIBUTARY, "spoke", "deidentify", src, fresh(), "--key", key,
             "--report", root / "report.json"]),
        "deidentify --workers 1": lambda: timed(
            [TRIBUTARY, "spoke", "deidentify", src, fresh(), "--key", key,
             "--report", root / "report.json", "--workers", "1"]),
    }
    if small:
        variants["deidentify, OCR off"] = lambda: timed(
            [TRIBUTARY, "spoke", "deidentify", src, fresh(), "--key", key,
             "--report", root / "report.json", "--text-detection", "off"])
    for workers in (1, 2):
        variants[f"tributary spoke ingest, {workers} process{'es' if workers > 1 else ''}"] = (
            lambda w=workers: timed([TRIBUTARY, "spoke", "ingest", "-c",
                                     spoke_config(root, src, w, folders.new(f"work-{w}"))]))
    return variants


def inprocess_variants(root: Path, src: Path, baseline: Path, folders: RunFolders
                       ) -> dict[str, Callable[[], Sample]]:
    import pydicom

    from tributary.spoke.config import SpokeConfig
    from tributary.spoke.deid import DeidOptions, Screener
    from tributary.spoke.folder_deid import FolderRun, prepared
    from tributary.spoke.ingest import ingest
    from tributary.spoke.pseudonyms import Pseudonymizer

    paths = sorted(p for p in src.rglob("*") if p.is_file())

    def fresh() -> Path:
        out = folders.new("out")
        out.mkdir(parents=True)
        return out

    def floor_loop() -> Sample:
        target = fresh()

        def run() -> None:
            for index, path in enumerate(paths):
                with contextlib.suppress(Exception):
                    pydicom.dcmread(path).save_as(target / f"{index}.dcm",
                                                  enforce_file_format=True)

        return measured(run)

    def steward_loop(workers: int | None) -> Sample:
        """What ``tributary spoke deidentify`` does, without its startup and report."""
        return measured(lambda: steward_files(fresh(), workers))

    def steward_files(target: Path, workers: int | None) -> None:
        key = root / "bench.key"
        options = DeidOptions()
        run = FolderRun(Screener(options, Pseudonymizer.from_key_file(key),
                                 hash_pixels=False), target)
        run.open()
        try:
            for result in prepared(paths, src, key, options, run.staging, workers):
                run.take(result)
        finally:
            run.close()
        run.screener.report()

    def ingest_run(workers: int) -> Sample:
        config = SpokeConfig.load(spoke_config(root, src, workers,
                                               folders.new(f"work-{workers}")))
        return measured(lambda: ingest(config))

    def dicognito_run() -> Sample:
        """Its driver's own loop time; CPU time is the driver process's whole (startup
        included), so its CPU column is an upper bound."""
        target = fresh()
        c0 = cpu_seconds()
        seconds = dicognito_inprocess(baseline, src, target)["seconds"]
        return seconds, cpu_seconds() - c0

    return {
        "floor: pydicom read+write": floor_loop,
        "dicognito": dicognito_run,
        "tributary spoke deidentify": lambda: steward_loop(None),
        "deidentify --workers 1": lambda: steward_loop(1),
        "tributary spoke ingest, 1 process": lambda: ingest_run(1),
        "tributary spoke ingest, 2 processes": lambda: ingest_run(2),
    }


def one_file(root: Path, src: Path, baseline: Path, count: int) -> dict[str, Sample]:
    """Each tool's time for one small file: mostly its startup."""
    single = root / "one"
    single.mkdir(exist_ok=True)
    first = next(p for p in sorted(src.rglob("*.dcm")) if p.name == "CT_small.dcm")
    shutil.copy(first, single / first.name)
    folders = RunFolders(root, fresh_space=True)  # one small file a run
    return rounds(whole_variants(root, single, baseline, folders, small=False), count,
                  folders)


def compiled() -> None:
    """Tributary's modules as bytecode beside their sources, as an installed wheel has
    them (``__pycache__`` is ignored by git). An editable install's ``tributary.__path__``
    names its finders' hooks, not folders: each distribution's package is looked up."""
    import importlib.util

    for package in ("tributary.cli", "tributary.protocol", "tributary.spoke"):
        spec = importlib.util.find_spec(package)
        for folder in spec.submodule_search_locations if spec else ():
            compileall.compile_dir(folder, quiet=2)


def startup_only(baseline: Path, count: int) -> None:
    """The one-file section alone: its medians, with the CPU time of each."""
    import pydicom

    every = Path(pydicom.__file__).parent / "data" / "test_files"
    root = Path(tempfile.mkdtemp(prefix="tributary-bench-startup-"))
    try:
        (root / "bench.key").write_bytes(os.urandom(32))
        (root / "hub.pub").write_text("unused by ingest\n")
        results = one_file(root, every, baseline, count)
        print(f"one file (startup), whole processes, medians of {count} rounds, order "
              f"rotating ({load()} when printed):")
        for name, (seconds, cpu) in results.items():
            print(f"  {name:<38} {seconds:8.3f} s wall {cpu:8.3f} s CPU")
        ours, theirs = results["tributary spoke deidentify"], results["dicognito"]
        print(f"startup: {ours[0]:.3f} s wall ({ours[1]:.3f} s CPU) against "
              f"{theirs[0]:.3f} s ({theirs[1]:.3f} s CPU) for dicognito")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def floor_line(whole: dict[str, Sample]) -> str:
    """What two processes give on this machine: the floor's own speed-up, each process
    reading and writing half the files (the baseline of ingest's 2-process figure)."""
    one, two = whole["floor: pydicom read+write"], whole[FLOOR_2]
    return (f"CT floor on 2 processes (pydicom read+write, half the files each): "
            f"{one[0] / two[0]:.2f}x the speed of one for {two[1] / one[1]:.2f}x its CPU time")


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def table(title: str, files: int, results: dict[str, Sample]) -> None:
    floor_s = results["floor: pydicom read+write"][0]
    dicognito_s = results["dicognito"][0]
    print(f"\n{title} ({load()} when printed)")
    print(f"  {'':<38} {'seconds':>8} {'CPU s':>7} {'files/s':>8} {'x floor':>8} "
          f"{'x dicognito':>12}")
    for name, (seconds, cpu) in results.items():
        print(f"  {name:<38} {seconds:8.2f} {cpu:7.2f} {files / seconds:8.1f} "
              f"{floor_s / seconds:8.2f} {dicognito_s / seconds:12.2f}")


def ct_only(root: Path, ct: Path, baseline: Path, files: int, count: int,
            folders: RunFolders) -> None:
    """The CT tables and the two-process ratios, without the small corpus."""
    from tributary.spoke.cores import usable_cores

    whole = rounds(whole_variants(root, ct, baseline, folders, small=False, halves=True),
                   count, folders)
    inproc = rounds(inprocess_variants(root, ct, baseline, folders), count, folders)
    table("CT, whole processes", files, whole)
    table("CT, in-process (loops alone)", files, inproc)
    for name, results in (("whole processes", whole), ("in-process", inproc)):
        one, two = (results["tributary spoke ingest, 1 process"],
                    results["tributary spoke ingest, 2 processes"])
        single, default = results["deidentify --workers 1"], \
            results["tributary spoke deidentify"]
        print(f"CT {name}: ingest on 2 processes {one[0] / two[0]:.2f}x the speed of one "
              f"for {two[1] / one[1]:.2f}x its CPU time; deidentify with its default "
              f"{usable_cores()} {single[0] / default[0]:.2f}x for "
              f"{default[1] / single[1]:.2f}x; {load()}")
    print(floor_line(whole))


def main() -> None:
    from tributary.spoke.folder_deid import usable_cores

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slices", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="300 slices, 2 rounds")
    parser.add_argument("--startup", action="store_true",
                        help="only the one-file section (at least 7 rounds)")
    parser.add_argument("--ct-only", action="store_true",
                        help="the CT corpus alone (no small files, no one-file start)")
    parser.add_argument("--floor", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--floor-part", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        warnings.simplefilter("ignore")
        if args.floor_part is None:
            floor(*args.floor)
        else:
            floor(*args.floor, part=args.floor_part, parts=2)
        return
    compiled()
    if args.startup:
        startup_only(ensure_baselines(), max(7, args.rounds))
        return
    if args.quick:
        args.slices, args.rounds = 300, 2
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)  # in-process ingest logs each exclusion
    baseline = ensure_baselines()
    root = Path(tempfile.mkdtemp(prefix="tributary-bench-deid-"))
    try:
        (root / "bench.key").write_bytes(os.urandom(32))
        (root / "hub.pub").write_text("unused by ingest\n")
        ct = ct_corpus(root, args.slices)
        n_ct = sum(1 for p in ct.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in ct.rglob("*")) / 1e6
        print(f"CT: {n_ct} slices of 512x512 ({size:.0f} MB); "
              f"{os.cpu_count()} CPUs ({usable_cores()} usable); medians of {args.rounds} "
              "rounds, order rotating")
        folders = RunFolders(root, RunFolders.space_for(root, ct, 7, args.rounds))
        print("each run writes where no earlier run wrote (its outputs are deleted when a "
              "section's rounds end)" if folders.fresh_space else
              "NOT ENOUGH DISK for every run's output at once: each run deletes the last "
              "one's output first, which makes the two-process figures vary more")
        if args.ct_only:
            ct_only(root, ct, baseline, n_ct, args.rounds, folders)
            return
        small = small_corpus(baseline, root)
        n_small = sum(1 for p in small.rglob("*") if p.is_file())
        print(f"small: {n_small} of pydicom's test files (those dicognito processes)")
        startup = one_file(root, small, baseline, max(3, args.rounds))
        ct_whole = rounds(whole_variants(root, ct, baseline, folders, small=False,
                                         halves=True), args.rounds, folders)
        small_whole = rounds(whole_variants(root, small, baseline, folders, small=True),
                             args.rounds, folders)
        ct_inproc = rounds(inprocess_variants(root, ct, baseline, folders), args.rounds,
                           folders)
        small_inproc = rounds(inprocess_variants(root, small, baseline, folders),
                              args.rounds, folders)
        table("CT, whole processes", n_ct, ct_whole)
        table("CT, in-process (loops alone)", n_ct, ct_inproc)
        table("pydicom's test files, whole processes", n_small, small_whole)
        table("pydicom's test files, in-process (loops alone)", n_small, small_inproc)
        print("\none file (startup), whole processes:")
        for name, (seconds, cpu) in startup.items():
            print(f"  {name:<38} {seconds:8.3f} s wall {cpu:8.3f} s CPU")
        ours = ct_whole["tributary spoke deidentify"][0]
        f = ct_whole["floor: pydicom read+write"][0] / ours
        d = ct_whole["dicognito"][0] / ours
        one, two = (ct_whole["tributary spoke ingest, 1 process"],
                    ct_whole["tributary spoke ingest, 2 processes"])
        s, cpu_ratio = one[0] / two[0], two[1] / one[1]
        in_one, in_two = (ct_inproc["tributary spoke ingest, 1 process"],
                          ct_inproc["tributary spoke ingest, 2 processes"])
        small_d = small_whole["dicognito"][0] / small_whole["deidentify, OCR off"][0]
        small_s = small_whole["tributary spoke ingest, 1 process"][0] / \
            small_whole["tributary spoke ingest, 2 processes"][0]
        with_ocr = small_whole["dicognito"][0] / small_whole["tributary spoke deidentify"][0]
        print(f"\nsmall files: {small_d:.2f}x dicognito with OCR off (dicognito reads no "
              f"pixels), {with_ocr:.2f}x with OCR of text-prone images; ingest on 2 "
              f"processes {small_s:.2f}x one "
              f"(small sets stay in one process); one file "
              f"{startup['tributary spoke deidentify'][0]:.3f} s against "
              f"{startup['dicognito'][0]:.3f} s for dicognito")
        single = ct_whole["deidentify --workers 1"]
        ours_cpu = ct_whole["tributary spoke deidentify"][1]
        print(f"CT deidentify on one process (--workers 1): "
              f"{ct_whole['floor: pydicom read+write'][0] / single[0]:.2f}x floor, "
              f"{ct_whole['dicognito'][0] / single[0]:.2f}x dicognito; with its default "
              f"{usable_cores()} processes {single[0] / ours:.2f}x the speed of one for "
              f"{ours_cpu / single[1]:.2f}x its CPU time")
        print(f"CT ingest on 2 processes: {s:.2f}x the speed of one for {cpu_ratio:.2f}x its "
              f"CPU time (whole processes); in-process {in_one[0] / in_two[0]:.2f}x for "
              f"{in_two[1] / in_one[1]:.2f}x; {load()}")
        print(floor_line(ct_whole))
        times = "\N{MULTIPLICATION SIGN}"
        print(f"deid: {f:.2f}{times} floor, {d:.2f}{times} dicognito, {s:.2f}{times} on 2 "
              "processes")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
