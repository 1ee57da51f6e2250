"""Tesseract, the OCR engine that finds burned-in text in pixel data during
de-identification (``tributary.spoke.deid.text_detection``), from Debian's package."""

from __future__ import annotations

import shutil

from tributary.services.system import ensure_commands


def ensure_tesseract() -> str:
    """Install Debian's ``tesseract-ocr`` (with its English data) if ``tesseract`` is
    missing (idempotent); returns the program's path."""
    ensure_commands({"tesseract": "tesseract-ocr"})
    path = shutil.which("tesseract")
    assert path is not None, "tesseract-ocr installed but tesseract is not on PATH"
    return path
