"""Preparing files on worker processes, every file accounted for.

Each worker is a fork of this process, which has loaded the engine already
(:mod:`tributary.spoke.worker_fork`), or, when forking is not safe (other threads run),
a fresh interpreter (``python -m tributary.spoke.prepare_worker``: it imports the engine,
never the command line); it screens and de-identifies the files it is given
and writes each output into the store's staging folder itself; only metadata comes back
over its socket. The parent keeps a few files in flight per worker (:func:`_depth`), so
it always knows which file a worker was preparing (the first it holds; the others wait
in its socket): a worker that dies (killed, out of memory, a decoder that crashes the
interpreter) is replaced and its files go to the next workers; a file that a second
worker dies preparing is excluded with the reason, and the run goes on. A worker that
spends longer than ``file_timeout`` on one file (a file that hangs a decoder) is killed
and counts as dying on it. Results come back in input order, so the decisions taken on
them (duplicates, conflicts) are the same whatever the number of workers.

Not ``multiprocessing``'s pools: a dead worker breaks a whole ``ProcessPoolExecutor``,
and spawned children re-import the parent's ``__main__`` (the whole CLI)."""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from tributary.spoke.store import Excluded, PreparedInstance
from tributary.spoke.worker_fork import Forked, can_fork, fork_worker

#: Files in flight per worker: at least one being prepared and one waiting, so a worker
#: never idles while its result travels back; and as many as it prepares in
#: :data:`_AHEAD` seconds, so that it does not run dry while this process is busy with a
#: file of its own and with storing what came back (with two, a worker on CT slices sat
#: idle a third of the time). At most :data:`_MAX_DEPTH`: what a worker holds at the end
#: of a run, no other process can take.
_MIN_DEPTH = 2
_MAX_DEPTH = 16
_AHEAD = 0.04
#: A worker that dies before preparing anything this many times in a row means the
#: workers cannot start at all (a broken installation): stop instead of looping.
_MAX_START_FAILURES = 3

#: Seconds one file may take (OCR alone may take two minutes a frame on three frames).
_FILE_TIMEOUT = 900.0

Prepared = PreparedInstance | Excluded

#: What a worker prepares with: ingest's store preparer, or the steward's folder worker
#: (:mod:`tributary.spoke.folder_deid`), whose results are its own.
INGEST_TASK = "tributary.spoke.preparing:ingest_task"
FOLDER_TASK = "tributary.spoke.folder_deid:worker_task"
TASKS = frozenset({INGEST_TASK, FOLDER_TASK})


@dataclass
class _Worker:
    process: subprocess.Popen[bytes] | Forked
    conn: Connection
    held: deque[int] = field(default_factory=deque)
    done: int = 0
    since: float = 0.0  # when it started on the first file it holds
    pace: float = 0.0  # seconds a file, as the worker timed them lately (0: not known)
    overdue: bool = False
    ready: bool = False  # it has imported the engine and said so: it may get files


class WorkersFailed(RuntimeError):
    """The worker processes cannot start."""


class PreparePool:
    """``workers`` processes preparing files with one key and one set of options."""

    def __init__(self, workers: int, key_file: Path, options_json: str, staging: Path,
                 file_timeout: float = _FILE_TIMEOUT, task: str = INGEST_TASK,
                 fork: bool | None = None) -> None:
        """``task``: the ``module:function`` each worker calls with the key file, the
        options and the staging folder to get its preparer (one of :data:`TASKS`).
        ``fork``: start workers as forks of this process (:mod:`tributary.spoke.worker_fork`)
        or as fresh interpreters; by default, forks whenever that is safe."""
        if task not in TASKS:
            raise ValueError(f"unknown preparing task {task!r}")
        self.size = workers
        self.file_timeout = file_timeout
        self._init = (task, str(key_file), options_json, str(staging))
        self._workers: list[_Worker] = []
        self._start_failures = 0
        self._fork = fork
        if fork is not False:
            importlib.import_module(task.split(":")[0])  # what a forked worker runs

    def _spawn(self, fd: int) -> subprocess.Popen[bytes] | Forked:
        if self._fork or (self._fork is None and can_fork()):
            return fork_worker(fd, serve)
        return subprocess.Popen(
            [sys.executable, "-m", "tributary.spoke.prepare_worker", str(fd)],
            pass_fds=(fd,), stdin=subprocess.DEVNULL,
            start_new_session=True)  # its own group: a kill reaches its OCR too

    def _start(self) -> _Worker:
        parent, child = socket.socketpair()
        try:
            process = self._spawn(child.fileno())
        finally:
            child.close()
        conn = Connection(parent.detach())
        conn.send(self._init)
        worker = _Worker(process, conn)
        self._workers.append(worker)
        return worker

    def close(self) -> None:
        """Stop the workers. Those still starting, or still holding files (the results
        were not all wanted), are stopped at once: whatever they staged is cleared by
        the next run (``DeidStore.clear_staging``)."""
        for worker in self._workers:
            if worker.ready and not worker.held:
                with contextlib.suppress(OSError):
                    worker.conn.send(None)
            else:
                _signal_group(worker.process, signal.SIGTERM)
            worker.conn.close()
        for worker in self._workers:
            try:
                worker.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(worker.process, signal.SIGKILL)
                worker.process.wait()
        self._workers = []

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def map(self, paths: list[tuple[str, str | None]],
            local: Callable[[tuple[str, str | None]], Any] | None = None
            ) -> Iterator[Any]:
        """The task's results for ``paths`` (each a path and the source folder it must
        stay in), in their order; an :class:`Excluded` for a file no worker could
        prepare. ``local``
        prepares a file in this process: with it, this process takes the next file
        whenever no worker has a result for it, so it never waits for workers to start
        and the workers only ever add to what one process does."""
        pending: deque[int] = deque(range(len(paths)))
        deaths = [0] * len(paths)
        results: dict[int, Any] = {}
        following = 0
        try:
            while len(self._workers) < min(self.size, len(paths)):
                self._start()
            while following < len(paths):
                for worker in self._workers:
                    while worker.ready and pending and len(worker.held) < _depth(worker):
                        index = pending.popleft()
                        if not worker.held:
                            worker.since = time.monotonic()
                        worker.held.append(index)
                        try:
                            worker.conn.send((index, paths[index]))
                        except OSError:
                            break  # it died: the wait below finds out
                now = time.monotonic()
                busy = [w for w in self._workers if w.held]
                first = min((w.since + self.file_timeout for w in busy), default=now + 60)
                timeout = max(0.0, first - now)
                if local is not None and pending:
                    timeout = 0.0  # nothing to wait for: there is work here
                ready = wait([w.conn for w in self._workers], timeout=timeout)
                for worker in busy:
                    if time.monotonic() >= worker.since + self.file_timeout and \
                            worker.conn not in ready:
                        worker.overdue = True
                        _signal_group(worker.process, signal.SIGKILL)
                        ready.append(worker.conn)  # its end of the socket closes
                for worker in [w for w in self._workers if w.conn in ready]:
                    try:
                        message = worker.conn.recv()
                    except (EOFError, OSError):
                        self._lost(worker, paths, deaths, pending, results)
                        continue
                    if message == "ready":
                        worker.ready = True
                        continue
                    index, result, took = message
                    worker.held.remove(index)
                    worker.since = time.monotonic()
                    worker.pace = took if not worker.pace else 0.8 * worker.pace + 0.2 * took
                    worker.done += 1
                    self._start_failures = 0
                    results[index] = result
                if local is not None and pending and not ready:
                    index = pending.popleft()
                    results[index] = local(paths[index])
                while following in results:
                    yield results.pop(following)
                    following += 1
        finally:
            self.close()

    def _lost(self, worker: _Worker, paths: list[str], deaths: list[int],
              pending: deque[int], results: dict[int, Any]) -> None:
        """A worker died: the file it was preparing goes to another worker, or out after
        a second death; the files waiting behind it go to other workers."""
        worker.conn.close()
        code = worker.process.wait()
        self._workers.remove(worker)
        how = (f"stopped after {self.file_timeout:g} s on it" if worker.overdue else
               f"killed by signal {signal.Signals(-code).name}" if code < 0 and
               -code in signal.valid_signals() else f"exit status {code}")
        if not worker.done and not worker.held:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:
                raise WorkersFailed(f"preparing workers cannot start ({how})")
        if worker.held:
            deaths[worker.held[0]] += 1
        for index in reversed(worker.held):
            if deaths[index] >= 2:
                results[index] = Excluded(
                    f"deidentification-failed: two worker processes died preparing this "
                    f"file (the last {how}); it is left out")
            else:
                pending.appendleft(index)
        if pending or len(results) < len(paths):
            self._start()


def _depth(worker: _Worker) -> int:
    """How many files ``worker`` may hold: about :data:`_AHEAD` seconds of its work."""
    if not worker.pace:
        return _MIN_DEPTH
    return max(_MIN_DEPTH, min(_MAX_DEPTH, 1 + math.ceil(_AHEAD / worker.pace)))


def _signal_group(process: subprocess.Popen[bytes] | Forked, sig: signal.Signals) -> None:
    """``sig`` to the worker and what it started (``tesseract``): a worker killed alone
    would leave its OCR running for minutes on the file that hung it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def ingest_task(key_file: str, options_json: str, staging: str
                ) -> Callable[[Path, Path | None], Prepared]:
    """Ingest's preparer: screened, de-identified, staged in the store."""
    from tributary.spoke.deid import DeidOptions
    from tributary.spoke.pseudonyms import Pseudonymizer
    from tributary.spoke.store import Preparer

    preparer = Preparer(Pseudonymizer.from_key_file(Path(key_file)),
                        DeidOptions.model_validate_json(options_json), Path(staging))
    return preparer.from_file


def serve(fd: int) -> None:
    """A worker: prepare each path the parent sends until it sends None."""
    conn = Connection(fd)
    task, *args = conn.recv()
    if task not in TASKS:  # only the parent writes here; still, import nothing else
        raise SystemExit(f"unknown preparing task {task!r}")
    module, name = task.split(":")
    prepare = getattr(importlib.import_module(module), name)(*args)
    conn.send("ready")
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return  # the parent went away
        if message is None:
            return
        index, (path, root) = message
        started = time.monotonic()
        try:
            result = prepare(Path(path), Path(root) if root else None)
        except Excluded as exc:
            result = exc
        except Exception as exc:  # a bug must cost one file, not the run
            result = Excluded(f"deidentification-failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}"[:300])
        conn.send((index, result, time.monotonic() - started))
