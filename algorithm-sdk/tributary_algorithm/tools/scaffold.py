"""``tributary-algorithm init``: a new algorithm folder that builds, runs and passes
``tributary-algorithm test`` as written, so a developer starts from something that works
and changes one thing at a time."""

from __future__ import annotations

import re
import struct
import uuid
from pathlib import Path

from . import templates
from ._proc import ToolError

LANGUAGES = ("python", "other")
#: Names usable as an image repository component and a hub algorithm name.
NAME_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")
SAMPLE_SLICES = 2


def init_algorithm(directory: Path, name: str, language: str = "python") -> list[Path]:
    """Write a runnable algorithm called ``name`` into ``directory`` (which must not exist
    or be empty); returns the files written."""
    if not NAME_RE.match(name) or len(name) > 100:
        raise ToolError(f"{name!r} is not a usable algorithm name: lower-case letters, digits "
                        "and single '.', '_' or '-' between them (it becomes the image name)")
    if language not in LANGUAGES:
        raise ToolError(f"unknown language {language!r}; choose one of {', '.join(LANGUAGES)}")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ToolError(f"{directory} exists and is not an empty folder")
    python = language == "python"
    files: dict[str, str | bytes] = {
        "algorithm.toml": templates.MANIFEST.format(
            name=name, description=f"{name}, made with tributary-algorithm init"),
        ".gitignore": templates.GITIGNORE,
        "arguments.schema.json": (templates.SCHEMA_PYTHON if python
                                  else templates.SCHEMA_OTHER).format(name=name),
        "Dockerfile": (templates.DOCKERFILE_PYTHON if python
                       else templates.DOCKERFILE_OTHER).format(name=name),
        "README.md": templates.README.format(
            name=name, language="Python" if python else "any language",
            entry="main.py" if python else "run.sh",
            extra_rows=templates.README_ROWS_PYTHON if python else templates.README_ROWS_OTHER,
            language_notes="" if python else templates.NOTES_OTHER),
    }
    if python:
        files["main.py"] = templates.MAIN_PYTHON.format(name=name)
        files["requirements.txt"] = templates.REQUIREMENTS_PYTHON
        files["tests/test_main.py"] = templates.TEST_PYTHON.format(name=name)
    else:
        files["run.sh"] = templates.RUN_OTHER.format(name=name)
        files["vendor/README.txt"] = templates.VENDOR_README
    seed = uuid.uuid5(uuid.NAMESPACE_URL, f"tributary-algorithm-init:{name}")
    for index in range(1, SAMPLE_SLICES + 1):
        files[f"testdata/case-1/series-1/IM{index:05d}.dcm"] = sample_slice(seed, index)
    written = []
    for relative, content in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        written.append(path)
    if not python:
        (directory / "run.sh").chmod(0o755)
    return written


def _uid(seed: uuid.UUID, kind: str) -> str:
    """A UID under the 2.25 root (a UUID as a decimal integer, PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(seed, kind).int}"


def _element(group: int, element: int, vr: str, value: bytes) -> bytes:
    """One data element in explicit VR little endian, padded to an even length."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB") else b" "
    if vr in ("OB", "OW", "SQ", "UN", "UT"):
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


def sample_slice(seed: uuid.UUID, index: int, size: int = 8) -> bytes:
    """A tiny, valid CT Image Storage file (explicit VR little endian) with no real person
    in it: the scaffold's sample case, written without pydicom so ``init`` needs nothing."""
    ct = b"1.2.840.10008.5.1.4.1.1.2"
    instance = _uid(seed, f"instance-{index}").encode()
    us = lambda v: struct.pack("<H", v)  # noqa: E731
    offset = seed.int % 997  # distinct pixels per seed: a spoke drops duplicate pixel data
    dataset = b"".join([
        _element(0x0008, 0x0016, "UI", ct),
        _element(0x0008, 0x0018, "UI", instance),
        _element(0x0008, 0x0060, "CS", b"CT"),
        _element(0x0010, 0x0010, "PN", b"Sample^Case"),
        _element(0x0010, 0x0020, "LO", b"SAMPLE-1"),
        _element(0x0018, 0x0015, "CS", b"CHEST"),
        _element(0x0020, 0x000D, "UI", _uid(seed, "study").encode()),
        _element(0x0020, 0x000E, "UI", _uid(seed, "series").encode()),
        _element(0x0020, 0x0013, "IS", str(index).encode()),
        _element(0x0028, 0x0002, "US", us(1)),
        _element(0x0028, 0x0004, "CS", b"MONOCHROME2"),
        _element(0x0028, 0x0010, "US", us(size)),
        _element(0x0028, 0x0011, "US", us(size)),
        _element(0x0028, 0x0100, "US", us(16)),
        _element(0x0028, 0x0101, "US", us(12)),
        _element(0x0028, 0x0102, "US", us(11)),
        _element(0x0028, 0x0103, "US", us(0)),
        _element(0x7FE0, 0x0010, "OW",
                 b"".join(us((x * 37 + index * 11 + offset) % 4096) for x in range(size * size))),
    ])
    meta = b"".join([
        _element(0x0002, 0x0001, "OB", b"\0\1"),
        _element(0x0002, 0x0002, "UI", ct),
        _element(0x0002, 0x0003, "UI", instance),
        _element(0x0002, 0x0010, "UI", b"1.2.840.10008.1.2.1"),
    ])
    group_length = _element(0x0002, 0x0000, "UL", struct.pack("<I", len(meta)))
    return b"\0" * 128 + b"DICM" + group_length + meta + dataset
