"""Files attached to a data access request (the ethics approval, the DPIA): read as hostile
input. The size is bounded before anything else; the type is decided from the content,
never from the name or the browser's Content-Type; the file is kept by its SHA-256 digest
and served back as a download that no browser renders in the hub's origin."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

#: Kinds of attachment a request carries, each required.
KINDS = ("ethics", "dpia")

#: Allowed types, recognised by their leading bytes: documents and scans.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "application/pdf"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class AttachmentRefused(ValueError):
    """An attached file that is too large, empty or of a type not allowed."""


@dataclass(frozen=True)
class CheckedFile:
    kind: str
    filename: str
    media_type: str
    digest: str
    content: bytes


def media_type_of(content: bytes) -> str | None:
    """The allowed type ``content`` is, judged by its bytes (None: not an allowed type). A
    PDF must also end like one (``%%EOF`` near its end), so a text file that merely starts
    with ``%PDF-`` is refused."""
    for magic, media_type in _SIGNATURES:
        if content.startswith(magic):
            if media_type == "application/pdf" and b"%%EOF" not in content[-2048:]:
                return None
            return media_type
    return None


def safe_filename(name: str | None, kind: str, media_type: str) -> str:
    """A file name fit for a Content-Disposition header: ASCII, no path, bounded."""
    stem = _SAFE_NAME.sub("_", (name or "").rsplit("/", 1)[-1].rsplit("\\", 1)[-1])
    stem = stem.strip("._")[:100]
    extension = {"application/pdf": ".pdf", "image/png": ".png", "image/jpeg": ".jpg"}
    return stem or f"{kind}{extension[media_type]}"


def check(kind: str, filename: str | None, content: bytes, max_bytes: int) -> CheckedFile:
    """The file as it will be kept, or :class:`AttachmentRefused` saying why not."""
    if kind not in KINDS:
        raise AttachmentRefused(f"unknown attachment kind {kind!r}")
    label = "ethics approval" if kind == "ethics" else "DPIA"
    if not content:
        raise AttachmentRefused(f"the {label} file is empty")
    if len(content) > max_bytes:
        raise AttachmentRefused(f"the {label} file is over {max_bytes} bytes")
    media_type = media_type_of(content)
    if media_type is None:
        raise AttachmentRefused(f"the {label} file is not a PDF, PNG or JPEG (judged by its "
                                "content, not its name)")
    return CheckedFile(kind=kind, filename=safe_filename(filename, kind, media_type),
                       media_type=media_type,
                       digest="sha256:" + hashlib.sha256(content).hexdigest(),
                       content=content)
