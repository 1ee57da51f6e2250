"""Building an algorithm image whose Python dependencies are installed offline.

Algorithm images must build where the container engine cannot reach a package index (the
build network of a hospital, or an air-gapped CI). So every wheel the image needs is fetched
on the host, for the *image's* interpreter and architecture, and shipped in the build
context under ``wheels/``; the Dockerfile installs with ``pip --no-index``.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .. import __version__
from ._proc import ToolError, run_command

PathLike = Union[str, "os.PathLike[str]"]

SDK_DISTRIBUTION = "tributary-algorithm"
#: Python version of the interpreter inside the images (Debian bookworm, python:3.11-slim).
DEFAULT_PYTHON_VERSION = "3.11"
#: Oldest and newest glibc baseline of wheels accepted for the image (bookworm has 2.36).
MANYLINUX_RANGE = (17, 28)
#: Zip timestamps of the SDK wheel are pinned so that the wheel, and so Docker's layer
#: cache for ``COPY wheels/``, only changes when the SDK's content changes.
_SOURCE_DATE_EPOCH = "315532800"  # 1980-01-01, the oldest date a zip file can hold
_SDK_COPY_IGNORE = shutil.ignore_patterns(
    "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".*", "tests"
)


@dataclass(frozen=True)
class BuildResult:
    """What :func:`build_image` produced."""

    tag: str
    image_id: str
    wheels: tuple[str, ...]


def default_wheel_cache() -> Path:
    """``$XDG_CACHE_HOME/tributary/wheels``, by default ``~/.cache/tributary/wheels``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tributary" / "wheels"


def host_arch() -> str:
    """The host's CPU architecture in manylinux spelling (``x86_64`` or ``aarch64``)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def default_platforms(arch: str | None = None) -> list[str]:
    """manylinux platform tags pip may pick wheels for; pip does not widen the range itself."""
    arch = arch or host_arch()
    low, high = MANYLINUX_RANGE
    return [f"manylinux2014_{arch}"] + [f"manylinux_2_{v}_{arch}" for v in range(low, high + 1)]


def _is_sdk_source(path: Path) -> bool:
    pyproject = path / "pyproject.toml"
    if not pyproject.is_file() or not (path / "tributary_algorithm").is_dir():
        return False
    text = pyproject.read_text(encoding="utf-8")
    return re.search(r'^name\s*=\s*"tributary-algorithm"\s*$', text, re.MULTILINE) is not None


def locate_sdk_source() -> Path | None:
    """The SDK's source folder when it is installed editable or run from a checkout."""
    candidate = Path(__file__).resolve().parents[2]
    return candidate if _is_sdk_source(candidate) else None


def _default_pip() -> list[str]:
    return [sys.executable, "-m", "pip"]


def _can_skip_build_isolation(pip: Sequence[str]) -> bool:
    """Whether the SDK wheel can be built with this interpreter's own setuptools.

    That avoids a network round trip for an isolated build environment; it is only known
    for the interpreter running this code.
    """
    if list(pip) != _default_pip():
        return False
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return False
    try:
        major = int(version("setuptools").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return False
    # The SDK's pyproject.toml needs setuptools 77 (its licence is an SPDX expression);
    # from that release on setuptools builds wheels without the ``wheel`` package.
    return major >= 77


def build_sdk_wheel(
    source: PathLike,
    dest: PathLike,
    *,
    pip: Sequence[str] | None = None,
    verbose: bool = False,
) -> Path:
    """Build the SDK wheel from a source folder into ``dest`` and return its path.

    The source is copied first so the build never litters the checkout with ``build/``
    and ``*.egg-info`` folders.
    """
    pip = list(pip or _default_pip())
    source = Path(source)
    if not _is_sdk_source(source):
        raise ToolError(f"{source} is not a source folder of {SDK_DISTRIBUTION}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tributary-sdk-") as tmp:
        copy = Path(tmp) / "sdk"
        shutil.copytree(source, copy, ignore=_SDK_COPY_IGNORE)
        out = Path(tmp) / "out"
        args = [*pip, "wheel", "--no-deps", "--quiet", "-w", str(out)]
        if _can_skip_build_isolation(pip):
            args.append("--no-build-isolation")
        env = dict(os.environ, SOURCE_DATE_EPOCH=_SOURCE_DATE_EPOCH)
        run_command([*args, str(copy)], verbose=verbose, env=env)
        built = sorted(out.glob("tributary_algorithm-*.whl"))
        if len(built) != 1:
            raise ToolError(f"pip wheel produced {[p.name for p in built]}, expected one wheel")
        target = dest / built[0].name
        shutil.copy2(built[0], target)
    return target


def _obtain_sdk_wheel(sdk: PathLike | None, dest: Path, pip: Sequence[str], verbose: bool) -> Path:
    if sdk is not None:
        path = Path(sdk)
        if path.is_file() and path.suffix == ".whl":
            target = dest / path.name
            shutil.copy2(path, target)
            return target
        return build_sdk_wheel(path, dest, pip=pip, verbose=verbose)
    source = locate_sdk_source()
    if source is not None:
        return build_sdk_wheel(source, dest, pip=pip, verbose=verbose)
    # Installed from a wheel: fetch the very same release from the package index.
    with tempfile.TemporaryDirectory(prefix="tributary-sdk-") as tmp:
        requirement = f"{SDK_DISTRIBUTION}=={__version__}"
        try:
            run_command(
                [*pip, "download", "--no-deps", "--only-binary=:all:", "-d", tmp, requirement],
                verbose=verbose,
            )
        except ToolError as exc:
            raise ToolError(
                f"this SDK is not a source checkout and {requirement} could not be downloaded; "
                f"pass --sdk (sdk=) with an SDK source folder or wheel.\n{exc}"
            ) from exc
        found = sorted(Path(tmp).glob("tributary_algorithm-*.whl"))
        if not found:
            raise ToolError(f"pip download did not produce a {SDK_DISTRIBUTION} wheel")
        target = dest / found[0].name
        shutil.copy2(found[0], target)
    return target


_EXTRA_MARKER = re.compile(r"""^\s*extra\s*==\s*["']([^"']+)["']\s*$""")

#: The SDK extras whose wheels every build context gets. ``flower`` is not among them (flwr
#: and its gRPC stack are large): an image of a Flower client lists flwr in requirements.txt.
SHIPPED_EXTRAS = ("dicom", "training")


def wheel_requirements(wheel: PathLike, extras: tuple[str, ...] = SHIPPED_EXTRAS) -> list[str]:
    """The requirements of a wheel *including those of ``extras``*, markers on extras
    removed, each once.

    The SDK's ``dicom`` extra (pydicom) and ``training`` extra (numpy, safetensors) are
    shipped in every build context, so a Dockerfile may install
    ``tributary-algorithm[dicom,training]`` without listing them itself.
    """
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        if not names:
            raise ToolError(f"{wheel} has no METADATA")
        metadata = archive.read(names[0]).decode("utf-8")
    requirements = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement, _, marker = line[len("Requires-Dist:") :].strip().partition(";")
        extra = _EXTRA_MARKER.match(marker) if marker else None
        if extra and extra.group(1) not in extras:
            continue
        if marker and not extra:
            requirement = f"{requirement.strip()}; {marker.strip()}"
        if requirement.strip() not in requirements:
            requirements.append(requirement.strip())
    return requirements


def _has_requirements(path: Path) -> bool:
    if not path.is_file():
        return False
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return any(lines)


def download_wheels(
    requirements_file: PathLike | None,
    extra_requirements: Sequence[str],
    dest: PathLike,
    *,
    cache: PathLike,
    python_version: str = DEFAULT_PYTHON_VERSION,
    platforms: Sequence[str] | None = None,
    find_links: Sequence[PathLike] = (),
    pip: Sequence[str] | None = None,
    verbose: bool = False,
) -> list[str]:
    """Put wheels for the requirements, for the image's Python and CPU, into ``dest``.

    First resolves offline against ``cache``; only if that fails is the index asked, with
    downloads saved into ``cache``, so an unchanged requirements file never downloads twice.
    Returns the file names added to ``dest``.
    """
    pip = list(pip or _default_pip())
    dest, cache = Path(dest), Path(cache)
    dest.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    targets: list[str] = []
    if requirements_file is not None and _has_requirements(Path(requirements_file)):
        targets += ["-r", str(requirements_file)]
    targets += list(extra_requirements)
    if not targets:
        return []
    selection = [
        "--only-binary=:all:",
        "--python-version",
        python_version,
        "--implementation",
        "cp",
    ]
    for tag in platforms or default_platforms():
        selection += ["--platform", tag]
    links: list[str] = []
    for link in find_links:
        links += ["--find-links", str(link)]
    before = {p.name for p in dest.iterdir()}
    offline = [
        *pip,
        "download",
        "--quiet",
        "--no-index",
        "--find-links",
        str(cache),
        *links,
        *selection,
        "-d",
        str(dest),
        *targets,
    ]
    first = run_command(offline, verbose=False, check=False)
    if first.returncode != 0:
        if verbose:
            print("wheel cache incomplete; downloading", file=sys.stderr, flush=True)
        run_command(
            [*pip, "download", *links, *selection, "-d", str(cache), *targets], verbose=verbose
        )
        run_command(offline, verbose=verbose)
    return sorted({p.name for p in dest.iterdir()} - before)


def build_image(
    directory: PathLike,
    tag: str,
    *,
    base_image: str | None = None,
    sdk: PathLike | None = None,
    wheel_cache: PathLike | None = None,
    python_version: str = DEFAULT_PYTHON_VERSION,
    platforms: Sequence[str] | None = None,
    build_args: Mapping[str, str] | None = None,
    no_cache: bool = False,
    docker: str = "docker",
    pip: Sequence[str] | None = None,
    verbose: bool = False,
    timeout: float | None = 3600,
) -> BuildResult:
    """Build the algorithm image in ``directory`` (``Dockerfile`` + code) as ``tag``.

    The build context is a temporary copy of ``directory`` plus ``wheels/`` holding the
    SDK wheel (from ``sdk``: a source folder or a ``.whl``; by default this SDK's own
    checkout, else the same release from the index), its extras' wheels and the wheels of
    ``requirements.txt``. ``base_image`` is passed as the ``BASE_IMAGE`` build argument.
    Files already in ``directory/wheels`` are kept (for private packages).
    """
    source = Path(directory)
    if not (source / "Dockerfile").is_file():
        raise ToolError(f"{source} has no Dockerfile")
    pip = list(pip or _default_pip())
    cache = Path(wheel_cache) if wheel_cache is not None else default_wheel_cache()
    with tempfile.TemporaryDirectory(prefix="tributary-build-") as tmp:
        context = Path(tmp) / "context"
        shutil.copytree(
            source,
            context,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".git", ".pytest_cache"),
        )
        wheels = context / "wheels"
        wheels.mkdir(exist_ok=True)
        vendored = sorted(p.name for p in wheels.iterdir())
        sdk_wheel = _obtain_sdk_wheel(sdk, wheels, pip, verbose)
        added = download_wheels(
            context / "requirements.txt",
            wheel_requirements(sdk_wheel),
            wheels,
            cache=cache,
            python_version=python_version,
            platforms=platforms,
            find_links=[wheels],
            pip=pip,
            verbose=verbose,
        )
        iidfile = Path(tmp) / "image-id"
        args = [docker, "build", "--network", "host", "-t", tag, "--iidfile", str(iidfile)]
        if base_image:
            args += ["--build-arg", f"BASE_IMAGE={base_image}"]
        for key, value in (build_args or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        if no_cache:
            args.append("--no-cache")
        try:
            run_command([*args, str(context)], verbose=verbose, timeout=timeout)
        except ToolError as exc:
            if base_image is None and _pull_failed(str(exc)):
                raise ToolError(
                    f"{exc}\nThe Dockerfile's base image could not be pulled: give "
                    "--base-image IMAGE (an image on this machine, e.g. "
                    "tributary/python-base:3.11 from `tributary services up`) or set "
                    "TRIBUTARY_BASE_IMAGE"
                ) from None
            raise
        image_id = iidfile.read_text().strip()
    return BuildResult(
        tag=tag, image_id=image_id, wheels=tuple(sorted({*vendored, sdk_wheel.name, *added}))
    )


def _pull_failed(output: str) -> bool:
    """Whether a failed ``docker build`` could not fetch its base image."""
    signs = ("registry-1.docker.io", "pull access denied", "failed to resolve",
             "manifest unknown", "not found: manifest", "no such host")
    return any(sign in output for sign in signs)
