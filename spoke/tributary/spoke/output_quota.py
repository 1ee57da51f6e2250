"""A size-limited output folder for each case.

The output folder is the only place an algorithm can write that outlives its container,
and by default it lies on the disk that also holds the spoke's journal and audit log. An
algorithm that filled it would stop the spoke from recording anything. So the spoke mounts
a tmpfs of the site's size (``[runner] output_quota_mb``) there before the container
starts: writing past it fails inside the container with ENOSPC (and counts against the
container's memory limit, never the spoke's disk), and the spoke can tell afterwards that
the quota was what stopped the algorithm. Mounting needs CAP_SYS_ADMIN, which a spoke that
drives the Docker engine on its own host normally has; a quota of 0 turns this off."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

#: The uid and gid the algorithm runs as (see :data:`tributary.spoke.runner.ALGORITHM_USER`).
_NOBODY = 65534


class QuotaError(Exception):
    """The quota could not be put in place: the case must not run without it."""


def mount(folder: Path, megabytes: int, owner: int = _NOBODY) -> None:
    """Mount an empty tmpfs of ``megabytes`` MiB at ``folder``, owned by the algorithm's
    user (``owner``: the host uid and gid it appears as), with no devices, set-uid
    programs or executables."""
    folder.mkdir(parents=True, exist_ok=True)
    options = (f"size={megabytes}m,mode=0700,uid={owner},gid={owner},"
               "nosuid,nodev,noexec")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tributary-output",
                           str(folder)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise QuotaError(f"could not mount the {megabytes} MiB output folder: "
                         f"{(done.stderr or done.stdout).strip()}")


def unmount(folder: Path) -> None:
    """Unmount ``folder`` if something is mounted there (also a leftover from a spoke that
    died mid-case); its content is gone with it."""
    if not os.path.ismount(folder):
        return
    subprocess.run(["umount", str(folder)], capture_output=True, check=False)
    if os.path.ismount(folder):  # still busy: detach it, it goes once released
        subprocess.run(["umount", "--lazy", str(folder)], capture_output=True, check=False)


def unmount_under(root: Path) -> list[Path]:
    """Unmount every output folder still mounted below ``root`` (a spoke that died mid-case
    leaves its cases' tmpfs behind, holding memory until they are unmounted); returns
    them. Called at start-up, when no case can still be running."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return []
    base = os.path.realpath(root)
    # /proc/self/mounts escapes spaces and the like as octal (\040)
    points = [Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field))
              for field in (line.split()[1] for line in lines if len(line.split()) > 1)]
    left = [p for p in points if str(p).startswith(base + os.sep) and p.name == "output"]
    for folder in sorted(left, reverse=True):
        unmount(folder)
    return left


def is_full(folder: Path) -> bool:
    """True when the folder's file system has (next to) no room left: the algorithm ran
    into its quota."""
    try:
        info = os.statvfs(folder)
    except OSError:
        return False
    return info.f_bavail * info.f_frsize < 64 * 1024 or info.f_favail == 0
