"""One distribution per role: each folder builds a wheel that holds every file of its
package (found, not listed), and each role's dependencies, followed to the end, hold no
other role's frameworks. A site installing ``tributary-spoke`` gets no web framework."""

from __future__ import annotations

import re
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tributary.testbed import checkout_wheels

ROOT = Path(__file__).resolve().parents[2]
#: folder -> (distribution, the package paths inside it)
ROLES = {
    "protocol": ("tributary-protocol", ("tributary/protocol",)),
    "hub": ("tributary-hub", ("tributary/hub",)),
    "spoke": ("tributary-spoke", ("tributary/spoke",)),
    "cli": ("tributary", ("tributary/cli", "tributary/services")),
    "testbed": ("tributary-testbed", ("tributary/testbed",)),
}
WEB = {"fastapi", "starlette", "uvicorn", "flask", "django", "jinja2", "python-multipart"}
# scipy is not among them: the spoke's privacy accountant (dp-accounting, in the protocol's
# training extra) needs it, since a spoke checks its own epsilon cap without trusting the hub.
HUB_ONLY = WEB | {"celery", "matplotlib", "alembic", "sqlmodel", "sqlalchemy"}
SPOKE_ONLY = {"pydicom", "docker", "dicom-anonymizer", "dicomweb-client", "pytesseract"}


def _name(value: str) -> str:
    return re.sub(r"[-_.]+", "-", value).lower()


def closure(name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """Every distribution ``pip install name[extras]`` brings, as this environment resolved
    them: requirements followed through their installed metadata, markers evaluated."""
    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = [(name, extras)]
    while todo:
        current, wanted = todo.pop()
        if _name(current) in seen:
            continue
        seen.add(_name(current))
        try:
            requires = distribution(current).requires or []
        except PackageNotFoundError:
            continue  # an optional platform-specific dependency not installed here
        for line in requires:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra})
                                     for extra in (wanted or {""})):
                todo.append((requirement.name, frozenset(requirement.extras)))
    return seen


def test_a_spoke_installs_no_web_framework_and_nothing_of_the_hub() -> None:
    installed = closure("tributary-spoke")
    assert "tributary-protocol" in installed and "pydicom" in installed  # the walk works
    assert not installed & HUB_ONLY, sorted(installed & HUB_ONLY)


def test_a_hub_installs_no_dicom_library_or_docker_sdk() -> None:
    installed = closure("tributary-hub", frozenset({"postgresql"}))
    assert {"fastapi", "psycopg"} <= installed
    assert not installed & SPOKE_ONLY, sorted(installed & SPOKE_ONLY)


def test_the_protocol_needs_neither_role() -> None:
    installed = closure("tributary-protocol")
    assert not installed & (HUB_ONLY | SPOKE_ONLY | {"tributary-hub", "tributary-spoke"})


def test_the_command_depends_on_every_role() -> None:
    assert {"tributary-protocol", "tributary-hub", "tributary-spoke",
            "tributary-algorithm"} <= closure("tributary")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    checkout_wheels.build(ROOT, sorted(ROLES), out, dependencies=False, isolation=False)
    return out


@pytest.mark.parametrize("folder", sorted(ROLES))
def test_each_folder_is_a_wheel_holding_every_file_of_its_package(folder: str,
                                                                  wheels: Path) -> None:
    name, packages = ROLES[folder]
    wheel = next(wheels.glob(f"{name.replace('-', '_')}-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        shipped = {entry for entry in archive.namelist() if ".dist-info/" not in entry}
    source = ROOT / folder
    expected = {path.relative_to(source).as_posix()
                for package in packages for path in (source / package).rglob("*")
                if path.is_file() and "__pycache__" not in path.parts}
    assert expected, f"nothing under {folder}/tributary"
    assert shipped == expected
    # the folder's path ends in the import path, and nothing else is shipped at the top
    assert {entry.split("/")[0] for entry in shipped} == {"tributary"}
    assert not any(entry == "tributary/__init__.py" for entry in shipped), "not a namespace"
