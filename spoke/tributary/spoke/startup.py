"""A lean start for the processes that only de-identify (the steward's command, ingest
workers): pydicom imports ``requests`` and ``tqdm`` when it loads, only to download its
own test data, which these processes never do. Loading pydicom while those two are
hidden saves about 0.1 s of CPU a start (a third of pydicom's import); they are
unhidden at once, so anything that needs them later imports them as usual."""

from __future__ import annotations

import sys

_DOWNLOAD_ONLY = ("requests", "tqdm")


def import_pydicom() -> None:
    """Import pydicom without its test-data downloader's optional dependencies (it then
    falls back to the standard library, should it ever download)."""
    if "pydicom" in sys.modules:
        return
    hidden = [name for name in _DOWNLOAD_ONLY if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import pydicom.dataset  # noqa: F401
    finally:
        for name in hidden:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]
