"""Headless Chromium from Debian's package, for the dashboard's browser tests and
screenshots (Playwright drives it; Playwright's own browser download is never used)."""

from __future__ import annotations

from pathlib import Path

from tributary.services.system import ensure_commands

CHROMIUM = Path("/usr/bin/chromium")
#: Flags for a headless run on a server: no sandbox (root in CI), and no traffic to any
#: outside host (updates, sync, field trials).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]


def ensure_chromium() -> Path:
    """Install Debian's chromium if it is missing (idempotent); returns its path."""
    if not CHROMIUM.exists():
        ensure_commands({"chromium": "chromium"})
    return CHROMIUM
