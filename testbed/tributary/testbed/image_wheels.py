"""Wheels for an image whose Python is not the host's.

The host resolves a role's dependencies for its own interpreter, and the image installs
exactly that set, offline. Environment markers may select differently for the image's
interpreter (redis needs async-timeout below Python 3.11.3, and Debian bookworm's Python
is 3.11.2): this module reads the image's marker environment and adds the wheels its
Python needs but the host's did not.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

#: PEP 508's marker variables, computed by the image's own interpreter (which may have no
#: packaging library to ask).
MARKER_ENVIRONMENT = """
import json, os, platform, sys
v = sys.implementation.version
iv = f"{v.major}.{v.minor}.{v.micro}"
if v.releaselevel != "final":
    iv += v.releaselevel[0] + str(v.serial)
print(json.dumps({
    "implementation_name": sys.implementation.name, "implementation_version": iv,
    "os_name": os.name, "platform_machine": platform.machine(),
    "platform_release": platform.release(), "platform_system": platform.system(),
    "platform_version": platform.version(), "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform}))
"""


def marker_environment(image: str) -> dict[str, str]:
    """The marker environment of ``image``'s ``python3``."""
    out = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint",
                          "python3", image, "-c", MARKER_ENVIRONMENT],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist()
                    if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        metadata = HeaderParser().parsestr(archive.read(name).decode("utf-8"))
    return [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]


def missing(wheels: Path, environment: dict[str, str]) -> list[str]:
    """Requirements (without their markers) that ``environment`` selects and no wheel in
    ``wheels`` meets. Requirements behind an extra are not considered: the host resolved
    the extras it was asked for."""
    present = {parse_wheel_filename(w.name)[0] for w in wheels.glob("*.whl")}
    needed: set[str] = set()
    for wheel in wheels.glob("*.whl"):
        for requirement in requirements(wheel):
            if (requirement.marker is not None
                    and canonicalize_name(requirement.name) not in present
                    and requirement.marker.evaluate({**environment, "extra": ""})):
                needed.add(f"{requirement.name}{requirement.specifier}")
    return sorted(needed)


def complete_for(wheels: Path, environment: dict[str, str]) -> list[str]:
    """Add to ``wheels`` what ``environment`` needs beyond the host's resolution (and what
    that needs in turn); the requirements added."""
    added: list[str] = []
    while needed := missing(wheels, environment):
        if set(needed) <= set(added):
            raise RuntimeError(f"pip built no wheel that meets {', '.join(needed)}")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels),
                        *needed], check=True, stdout=subprocess.DEVNULL)
        added += needed
    return added
