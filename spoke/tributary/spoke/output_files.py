"""Reading a file an algorithm left in its output folder, which it controls completely.

Opening a named pipe blocks until someone writes to it, so a FIFO planted as
``output.json`` or ``progress.json`` would freeze the thread that watches the container,
and with it the time limit, cancellation and revocation. A symbolic link could point at a
host file, a device could be endless, a sparse file could claim terabytes. So the path's
type and size are checked *before* reading, the open never blocks (``O_NONBLOCK``) and
never follows a link (``O_NOFOLLOW``), and the opened file is checked again (``fstat``), in
case the algorithm swapped the path between the check and the open."""

from __future__ import annotations

import os
import stat
from enum import StrEnum
from pathlib import Path


class Refusal(StrEnum):
    """Why a file in the output folder was not read."""

    MISSING = "missing"
    NOT_REGULAR = "not a regular file"
    TOO_LARGE = "too large"
    UNREADABLE = "unreadable"


class UnsafeFile(Exception):
    """The file was refused; ``refusal`` says why, the message says what was found."""

    def __init__(self, refusal: Refusal, detail: str) -> None:
        super().__init__(detail)
        self.refusal = refusal
        self.detail = detail


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def read_bounded(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them; raises
    :class:`UnsafeFile` for anything else, without ever blocking."""
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        raise UnsafeFile(Refusal.MISSING, f"{path.name} does not exist") from None
    except OSError as exc:
        raise UnsafeFile(Refusal.UNREADABLE, f"{path.name} unreadable: {exc}") from None
    _check(path, before, limit)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UnsafeFile(Refusal.MISSING, f"{path.name} does not exist") from None
    except OSError as exc:  # ELOOP: swapped for a link; ENXIO: a socket
        raise UnsafeFile(Refusal.UNREADABLE, f"{path.name} unreadable: {exc}") from None
    with os.fdopen(fd, "rb") as handle:
        _check(path, os.fstat(handle.fileno()), limit)
        raw = handle.read(limit + 1)
    if len(raw) > limit:  # it grew after the check
        raise UnsafeFile(Refusal.TOO_LARGE, f"{path.name} grew past the limit of {limit} bytes")
    return raw


def _check(path: Path, info: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFile(Refusal.NOT_REGULAR,
                         f"{path.name} is {_kind(info.st_mode)}, not a regular file")
    if info.st_size > limit:
        raise UnsafeFile(Refusal.TOO_LARGE,
                         f"{path.name} is {info.st_size} bytes; the limit is {limit}")


#: How many entries of the output folder are looked at when listing what is discarded: an
#: algorithm may leave millions of files, and listing them must stay quick.
SCAN_LIMIT = 1000
#: How deep into sub-folders the listing goes.
SCAN_DEPTH = 4


def sanitised_name(name: str, limit: int) -> str:
    """A file name the algorithm chose, safe to show: control and other unprintable
    characters (a terminal escape, a newline forging a line) replaced, cut to ``limit``."""
    clean = "".join(c if c.isprintable() else "?" for c in name)
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def leftover_files(out_dir: Path, keep: set[str], limit: int,
                   name_limit: int) -> list[tuple[str, int]]:
    """Names and sizes of what the algorithm left in ``out_dir`` besides ``keep`` (top-level
    names): at most ``limit`` entries, the last one summing up any more. Never opens a file
    nor follows a link; a non-regular entry is named with its kind and counted as 0 bytes."""
    found: list[tuple[str, int]] = []
    scanned = 0
    more_count = 0
    more_bytes = 0
    pending: list[tuple[Path, str, int]] = [(out_dir, "", 0)]
    while pending:
        folder, prefix, depth = pending.pop(0)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            scanned += 1
            if scanned > SCAN_LIMIT:
                more_count += 1
                continue
            if not prefix and entry.name in keep:
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            rel = f"{prefix}{entry.name}"
            if stat.S_ISDIR(info.st_mode):
                if depth + 1 < SCAN_DEPTH:
                    pending.append((Path(entry.path), f"{rel}/", depth + 1))
                else:
                    found.append((f"{rel}/ (not listed further)", 0))
                continue
            size = info.st_size if stat.S_ISREG(info.st_mode) else 0
            label = rel if stat.S_ISREG(info.st_mode) else f"{rel} ({_kind(info.st_mode)})"
            found.append((label, size))
    if len(found) > limit or more_count:
        rest = found[limit - 1:]
        more_count += len(rest)
        more_bytes += sum(size for _, size in rest)
        found = found[: limit - 1]
        found.append((f"({more_count} more entries not listed)", more_bytes))
    return [(sanitised_name(name, name_limit), size) for name, size in found]
