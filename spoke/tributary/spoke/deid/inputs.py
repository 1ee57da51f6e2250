"""Opening an input file without trusting what the path names.

An input folder is the hospital's, and may hold anything: a FIFO (opening it blocks until
someone writes, forever), a device (reading it never ends, or has effects), a socket, or a
symbolic link out of the folder (to another patient's data, or to the spoke's own key).
None of these is ever read: they become exclusions with their reason. The file is opened
without blocking and checked on the open descriptor (``fstat``), so swapping the file for
a FIFO between listing and reading changes nothing."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


class NotRegular(Exception):
    """The input is not a regular file inside its folder; the message says what it is."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def open_input(path: Path, root: Path | None = None) -> BinaryIO:
    """``path`` opened for reading, when it is a regular file (through a symbolic link
    only if the link stays inside ``root``); raises :class:`NotRegular` otherwise and
    ``OSError`` when it cannot be opened."""
    if root is not None and path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(root.resolve()):
            raise NotRegular("a symbolic link out of the input folder; not followed")
    mode = os.stat(path).st_mode  # a socket cannot even be opened: say what it is
    if not stat.S_ISREG(mode):
        raise NotRegular(f"{_kind(mode)}, not a regular file; not read")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegular(f"{_kind(mode)}, not a regular file; not read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
