"""Wheels of the checkout's own distributions, built from a temporary copy of each folder.

setuptools builds in place: it leaves ``build/`` and ``*.egg-info`` in the source folder, and
two builds of one folder at once (two test workers, a test beside a demo) read and write the
same ``build/lib`` and may ship each other's half-written files. Copying each folder first
keeps the checkout as it was and every build to itself."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

#: What never belongs in a wheel's source: earlier builds, caches, environments.
IGNORED = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                 ".pytest_cache", ".venv", ".ruff_cache")


def build(root: Path, distributions: Sequence[str], wheel_dir: Path, *,
          dependencies: bool = True, isolation: bool = True,
          env: Mapping[str, str] | None = None) -> None:
    """``pip wheel`` the folders ``distributions`` of ``root`` (each optionally with extras,
    ``hub[postgresql]``) into ``wheel_dir``, with their dependencies unless told not to."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tributary-wheels-") as tmp:
        targets = []
        for name in distributions:
            folder, bracket, extras = name.partition("[")
            copy = Path(tmp) / folder
            shutil.copytree(root / folder, copy, ignore=IGNORED)
            targets.append(f"{copy}{bracket}{extras}")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheel_dir),
                        *([] if dependencies else ["--no-deps"]),
                        *([] if isolation else ["--no-build-isolation"]), *targets],
                       check=True, stdout=subprocess.DEVNULL, env=dict(env) if env else None)
