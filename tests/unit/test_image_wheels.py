"""An image's Python may select other dependencies than the host's: the wheels handed to
its offline install must follow the image's markers, not the host's."""

from __future__ import annotations

import zipfile
from pathlib import Path

from tributary.testbed.image_wheels import missing

BOOKWORM = {"implementation_name": "cpython", "implementation_version": "3.11.2",
            "os_name": "posix", "platform_machine": "x86_64", "platform_release": "6.1",
            "platform_system": "Linux", "platform_version": "#1",
            "python_full_version": "3.11.2", "platform_python_implementation": "CPython",
            "python_version": "3.11", "sys_platform": "linux"}


def wheel(folder: Path, name: str, *requires: str) -> None:
    metadata = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{name}-1.0.dist-info/METADATA",
                         f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n{metadata}")


def test_a_requirement_only_the_images_python_selects_is_missing(tmp_path: Path) -> None:
    wheel(tmp_path, "redis", 'async-timeout>=4.0.3; python_full_version < "3.11.3"',
          'hiredis>=3; extra == "hiredis"', 'tomli; python_version < "3.11"')
    assert missing(tmp_path, BOOKWORM) == ["async-timeout>=4.0.3"]
    assert missing(tmp_path, {**BOOKWORM, "python_full_version": "3.11.7"}) == []


def test_a_requirement_already_there_is_not_missing(tmp_path: Path) -> None:
    wheel(tmp_path, "redis", 'async-timeout>=4.0.3; python_full_version < "3.11.3"')
    wheel(tmp_path, "async_timeout")
    assert missing(tmp_path, BOOKWORM) == []
