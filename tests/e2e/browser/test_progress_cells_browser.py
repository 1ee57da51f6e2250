"""The live progress rows mark a withdrawn spoke as the server-rendered page does.

Runs the dashboard's own script in Chromium and renders one target row with
``progressCells``, the function the experiment page rewrites its rows with from the SSE
stream, so a row a live page redraws shows the same badge as one the server rendered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tributary.services.browser import CHROMIUM_ARGS, ensure_chromium

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "hub/tributary/hub/static/dashboard.js"
playwright_api = pytest.importorskip("playwright.sync_api")

TARGET = {"spoke_id": "north", "spoke_online": True, "state": "cancelled",
          "reason": "membership credential refused: revoked", "waiting_for": None,
          "case_count": 4, "queued": 0, "running": 0, "succeeded": 1, "failed": 0,
          "cancelled": 3, "withdrawn_at": None}


def _row(page: Any, target: dict[str, Any]) -> dict[str, Any]:
    return page.evaluate("""t => {
        const row = document.createElement("tr");
        row.append(...progressCells(t));
        document.body.replaceChildren(Object.assign(document.createElement("table"), {}));
        document.querySelector("table").append(row);
        const badge = row.querySelector("[data-withdrawn]");
        return {text: row.cells[1].textContent,
                title: badge ? badge.getAttribute("title") : null};
    }""", target)


def test_a_withdrawn_spoke_is_marked_in_a_live_row() -> None:
    chromium = ensure_chromium()
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page: Any = browser.new_page()
            page.set_content("<!doctype html><html><body></body></html>")
            page.add_script_tag(content=SCRIPT.read_text())
            staying = _row(page, TARGET)
            assert staying["title"] is None and "withdrawn" not in staying["text"]
            leaving = _row(page, TARGET | {"withdrawn_at": "2026-12-07T12:00:00Z"})
            assert "withdrawn" in leaving["text"] and "revoked" in leaving["text"]
            assert "2026-12-07T12:00:00Z" in leaving["title"]
        finally:
            browser.close()
