"""Starting a preparing worker as a fork of this process, which has already loaded
pydicom and the de-identification engine: a fresh interpreter spends about 0.4 s of CPU
importing them again before its first file, a fork a few milliseconds.

Forking is only safe in a process running one thread (a fork copies locks that other
threads may hold, and only the forking thread): :func:`can_fork` says so, and the pool
starts fresh interpreters otherwise (the agent, with its broker threads, always does).
The child never returns into the caller's code: it serves, then leaves with ``_exit``,
so nothing of the parent (its catalog connection, buffered output, exit handlers) is
used, flushed or closed twice. The parent's objects are frozen out of the garbage
collector first (``gc.freeze``): the child neither collects (and finalizes) the parent's
garbage nor writes to every page by scanning it."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable


def can_fork() -> bool:
    """Whether a worker may be forked from this process now: POSIX, one thread."""
    return hasattr(os, "fork") and threading.active_count() == 1


class Forked:
    """A forked worker, with the part of :class:`subprocess.Popen` the pool uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """The exit status (negative: the signal that ended it), as ``Popen.wait``."""
        if timeout is None:
            if self.returncode is None:
                _, status = os.waitpid(self.pid, 0)
                self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            time.sleep(0.01)
        assert self.returncode is not None
        return self.returncode


def fork_worker(fd: int, serve: Callable[[int], None]) -> Forked:
    """A child running ``serve(fd)`` in a session of its own (a kill of its group reaches
    what it starts: OCR), ignoring ^C (the parent decides when to stop)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()  # else the child's copy of the buffer could be written again
    gc.freeze()
    pid = os.fork()
    if pid:
        gc.unfreeze()
        return Forked(pid)
    code = 0
    try:
        os.setsid()
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        serve(fd)
    except BaseException:  # whatever happens, never return to the caller
        code = 1
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
    os._exit(code)
