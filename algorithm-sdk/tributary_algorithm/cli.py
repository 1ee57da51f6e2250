"""``tributary-algorithm``: build, push and locally test algorithm images."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .contract import CONTRACT_VERSION
from .localtest import run_test
from .tools import ToolError, build_image, push_image
from .tools.build import DEFAULT_PYTHON_VERSION, default_platforms, default_wheel_cache
from .tools.scaffold import LANGUAGES, init_algorithm

#: A base image for every build here, e.g. one already on a machine without Docker Hub
#: (``tributary services up`` builds ``tributary/python-base:3.11``).
BASE_IMAGE_ENV = "TRIBUTARY_BASE_IMAGE"

_DESCRIPTION = f"""\
Developer tools for Tributary algorithm images (algorithm contract {CONTRACT_VERSION}).

  init   write a new algorithm folder that builds and passes `test` as it is
  build  make an image whose Python packages install offline from wheels/
  push   push it to a registry and print the pinned reference REPO@sha256:...
  test   run it on local cases with the same mounts and isolation as a spoke
"""

_EPILOG = """\
examples:
  tributary-algorithm init my-algorithm && tributary-algorithm test my-algorithm
  tributary-algorithm test my-algorithm --cohort cohort/
  tributary-algorithm build examples/lung_nodule --tag lung-nodule:dev
  tributary-algorithm push lung-nodule:dev --repository 127.0.0.1:5000/algorithms/lung-nodule
  tributary-algorithm test lung-nodule:dev --dicom cohort/CASE_FOLDER \\
      --args '{"min_diameter_mm": 6}' --output out/
"""


def _json_object(text: str) -> dict[str, Any]:
    """Parse ``--args``: inline JSON, or ``@file.json``."""
    if text.startswith("@"):
        text = Path(text[1:]).read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def make_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so tests and docs can inspect it)."""
    parser = argparse.ArgumentParser(
        prog="tributary-algorithm",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the docker and pip commands and their output",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = sub.add_parser(
        "build",
        help="build an algorithm image",
        description="Build DIR (Dockerfile, optional requirements.txt, code) into an image. "
        "The SDK wheel and wheels of requirements.txt (for the image's Python and the host "
        "CPU) are put in the build context under wheels/ so that the image installs offline.",
    )
    build.add_argument("directory", metavar="DIR", type=Path, help="folder with a Dockerfile")
    build.add_argument("--tag", "-t", required=True, help="image tag, e.g. lung-nodule:dev")
    build.add_argument(
        "--base-image",
        metavar="IMAGE",
        default=os.environ.get(BASE_IMAGE_ENV) or None,
        help=f"passed as build argument BASE_IMAGE (default: ${BASE_IMAGE_ENV}, else the "
        "Dockerfile's)",
    )
    build.add_argument(
        "--sdk",
        metavar="PATH",
        type=Path,
        help="SDK source folder or .whl to ship (default: this SDK's checkout, "
        "else the same release from the package index)",
    )
    build.add_argument(
        "--wheel-cache",
        metavar="DIR",
        type=Path,
        help=f"where downloaded wheels are kept (default: {default_wheel_cache()})",
    )
    build.add_argument(
        "--python-version",
        default=DEFAULT_PYTHON_VERSION,
        metavar="X.Y",
        help="Python version inside the image (default: %(default)s)",
    )
    build.add_argument(
        "--platform",
        dest="platforms",
        action="append",
        metavar="TAG",
        help="wheel platform tag, repeatable "
        f"(default: {default_platforms()[0]} … {default_platforms()[-1]})",
    )
    build.add_argument(
        "--build-arg",
        dest="build_args",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra docker build argument, repeatable",
    )
    build.add_argument("--no-cache", action="store_true", help="do not use Docker's layer cache")

    push = sub.add_parser(
        "push",
        help="push an image and print its digest reference",
        description="Tag IMAGE as REPOSITORY, push it, and print REPO@sha256:... (the manifest "
        "digest an experiment pins the algorithm by).",
    )
    push.add_argument("image", metavar="IMAGE", help="local image tag")
    push.add_argument(
        "--repository",
        "-r",
        required=True,
        metavar="REGISTRY/REPO[:TAG]",
        help="where to push, e.g. 127.0.0.1:5000/algorithms/lung-nodule:1.0",
    )
    push.add_argument(
        "--username",
        "-u",
        help="your hub username, for a federation registry with token auth; the password "
        "is read from TRIBUTARY_REGISTRY_PASSWORD or asked for",
    )

    init = sub.add_parser(
        "init",
        help="start a new algorithm",
        description="Write a new algorithm folder NAME (Dockerfile taking BASE_IMAGE, entry "
        "point, argument schema, algorithm.toml, a sample case, a test, README) that "
        "`tributary-algorithm test NAME` passes as written.",
    )
    init.add_argument("name", metavar="NAME", help="the algorithm's name (lower case)")
    init.add_argument(
        "--language",
        choices=LANGUAGES,
        default="python",
        help="python (the SDK) or other (a shell entry point to replace with your "
        "program; the README shows how to ship its dependencies offline)",
    )
    init.add_argument(
        "--dir", type=Path, metavar="DIR", help="where to write it (default: ./NAME)"
    )

    test = sub.add_parser(
        "test",
        help="run an image (or build and run a folder) on local cases like a spoke",
        description="Run IMAGE, or the image built from an algorithm folder DIR, on local "
        "cases exactly as a spoke would: each series mounted read-only with a generated "
        "participant JSON; no network, read-only root, user 65534, no capabilities, "
        "memory/CPU/pids limits; then output.json is checked like the spoke does. "
        "--cohort runs one case per patient on copies de-identified by the spoke's own "
        "engine; --dicom runs one case; with neither, DIR/testdata/ holds the cases. "
        "Exit status 0 when every case succeeded with a valid output, 1 otherwise.",
    )
    test.add_argument("image", metavar="IMAGE|DIR", help="image tag or ID, or a folder "
                      "with a Dockerfile (built first)")
    data = test.add_mutually_exclusive_group()
    data.add_argument(
        "--dicom",
        type=Path,
        metavar="DIR",
        help="folder with the series of one case",
    )
    data.add_argument(
        "--cohort",
        type=Path,
        metavar="DIR",
        help="folder of cases (one per patient, as the example generator writes them), "
        "each de-identified by the spoke's engine (needs tributary-spoke) and run separately",
    )
    test.add_argument(
        "--base-image",
        metavar="IMAGE",
        default=os.environ.get(BASE_IMAGE_ENV) or None,
        help=f"when building DIR: passed as build argument BASE_IMAGE (default: "
        f"${BASE_IMAGE_ENV}, else the Dockerfile's)",
    )
    test.add_argument(
        "--sdk", metavar="PATH", type=Path, help="when building DIR: as for build"
    )
    test.add_argument(
        "--args",
        dest="arguments",
        type=_json_object,
        default={},
        metavar="JSON",
        help="algorithm arguments: a JSON object or @file.json",
    )
    test.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="keep output.json here, in one folder per case for several cases "
        "(default: a temporary folder)",
    )
    test.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="kill the container after S seconds (default: %(default)s, an experiment's default)",
    )
    test.add_argument(
        "--memory-mb",
        type=int,
        default=2048,
        metavar="N",
        help="memory limit in MiB, no swap (default: %(default)s)",
    )
    test.add_argument(
        "--cpus", type=float, default=1.0, metavar="C", help="CPU limit (default: %(default)s)"
    )
    test.add_argument(
        "--pids-limit",
        type=int,
        default=256,
        metavar="N",
        help="process limit (default: %(default)s)",
    )
    test.add_argument(
        "--tmpfs-mb",
        type=int,
        default=512,
        metavar="N",
        help="size of the /tmp tmpfs in MiB (default: %(default)s)",
    )
    training = test.add_argument_group(
        "training (the training contract, docs/training.md)")
    training.add_argument(
        "--training", action="store_true",
        help="run IMAGE as a training algorithm: init, then ROUNDS rounds "
        "of fit on every site, plain FedAvg here, and evaluate on every site")
    training.add_argument(
        "--site", dest="sites", action="append", type=Path, default=[], metavar="DIR",
        help="a cohort folder that is one site (repeatable; --cohort DIR counts as one); "
        "its attributes file gives each case's labels")
    training.add_argument("--rounds", type=int, default=3, metavar="N",
                          help="rounds to run (default: %(default)s)")
    training.add_argument("--local-epochs", type=int, default=1, metavar="N")
    training.add_argument("--learning-rate", type=float, default=None, metavar="LR")
    training.add_argument("--proximal-mu", type=float, default=0.0, metavar="MU",
                          help="FedProx's proximal term (0: FedAvg)")
    training.add_argument("--seed", type=int, default=0)
    test.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON object instead of a report",
    )
    return parser


def _build_args(pairs: list[str]) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ToolError(f"--build-arg needs KEY=VALUE, got {pair!r}")
        result[key] = value
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit status."""
    args = make_parser().parse_args(argv)
    try:
        if args.command == "build":
            result = build_image(
                args.directory,
                args.tag,
                base_image=args.base_image,
                sdk=args.sdk,
                wheel_cache=args.wheel_cache,
                python_version=args.python_version,
                platforms=args.platforms,
                build_args=_build_args(args.build_args),
                no_cache=args.no_cache,
                verbose=args.verbose,
            )
            print(f"built {result.tag} ({result.image_id}) with {len(result.wheels)} wheels")
            return 0
        if args.command == "push":
            password = None
            if args.username:
                password = os.environ.get("TRIBUTARY_REGISTRY_PASSWORD") or getpass.getpass(
                    f"hub password for {args.username}: ")
            repository, digest = push_image(args.image, args.repository, verbose=args.verbose,
                                            username=args.username, password=password)
            print(f"{repository}@{digest}")
            return 0
        if args.command == "init":
            target = args.dir or Path(args.name)
            written = init_algorithm(target, args.name, args.language)
            print(f"wrote {len(written)} files to {target}/:")
            for path in written:
                print(f"  {path.relative_to(target)}")
            print(f"next: tributary-algorithm test {target}")
            return 0
        return run_test(args)
    except ToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
