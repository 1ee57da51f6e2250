"""The base image algorithm Dockerfiles build FROM (``ARG BASE_IMAGE``). Users elsewhere
get ``python:3.11-slim``; where Docker Hub is unreachable a minimal Debian with Python 3.11
is bootstrapped from the machine's own Debian mirror and imported."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from tributary.services.settings import ServiceSettings
from tributary.services.system import ServiceError, ensure_commands


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def debian_mirror() -> str:
    """The first Debian mirror the machine's apt sources name."""
    candidates = [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]
    candidates += sorted(Path("/etc/apt/sources.list.d").glob("*"))
    for source in candidates:
        if not source.is_file():
            continue
        text = source.read_text(errors="replace")
        for match in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            if "security" not in match.group(1):
                return match.group(1)
        for match in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+\S+", text, re.M):
            if "security" not in match.group(1):
                return match.group(1)
    raise ServiceError("no Debian mirror found in the apt sources")


def _try_pull(image: str) -> bool:
    try:
        pulled = subprocess.run(["docker", "pull", "-q", image], capture_output=True, timeout=45)
    except subprocess.TimeoutExpired:
        return False
    return pulled.returncode == 0


def ensure_base_image(settings: ServiceSettings) -> str:
    name = settings.base_image
    if image_exists(name):
        return "present"
    if _try_pull(settings.upstream_base_image):
        subprocess.run(["docker", "tag", settings.upstream_base_image, name], check=True)
        return f"tagged from {settings.upstream_base_image}"
    ensure_commands({"debootstrap": "debootstrap"})
    with tempfile.TemporaryDirectory(prefix="tributary-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        log = settings.path("base-image", "debootstrap.log")
        with open(log, "wb") as out:
            done = subprocess.run(
                ["debootstrap", "--variant=minbase",
                 "--include=python3,python3-pip,ca-certificates",
                 settings.debian_suite, str(rootfs), debian_mirror()],
                stdout=out, stderr=subprocess.STDOUT,
            )
        if done.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
            raise ServiceError(f"debootstrap failed:\n{tail}")
        shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["docker", "import", "-c", "ENV LANG=C.UTF-8", "-c", 'CMD ["python3"]', "-", name],
            stdin=tar.stdout, check=True, capture_output=True,
        )
        tar.wait()
    return "built with debootstrap"
