"""Wide tables fit: a results table with many figures scrolls inside its box at 1280 px.

Renders the dashboard's own stylesheet around the results markup (a compact per-spoke table
with 40 figure columns), so the check is of the CSS every results table uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tributary.services.browser import CHROMIUM_ARGS, ensure_chromium

ROOT = Path(__file__).resolve().parents[3]
CSS = ROOT / "hub/tributary/hub/static/dashboard.css"
playwright_api = pytest.importorskip("playwright.sync_api")


def _page_html(columns: int, rows: int) -> str:
    head = "".join(f'<th scope="col" class="num">figure number {i} (95% CI)</th>'
                   for i in range(columns))
    cells = "".join('<td class="num">0.8123<br><small>[0.7012, 0.9001]</small></td>'
                    for _ in range(columns))
    body = "".join(f'<tr><th scope="row">spoke-{r}</th>{cells}</tr>' for r in range(rows))
    return (f"<!doctype html><html><head><style>{CSS.read_text()}</style></head><body>"
            f'<main><section id="results"><div class="scroll"><table id="aggregate">'
            f'<caption>Per spoke</caption><thead><tr><th scope="col">Spoke</th>{head}</tr>'
            f"</thead><tbody>{body}</tbody></table></div></section></main></body></html>")


def test_a_wide_results_table_scrolls_within_a_1280_pixel_page() -> None:
    chromium = ensure_chromium()
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page: Any = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_content(_page_html(columns=40, rows=12))
            box = page.locator("#results .scroll").bounding_box()
            assert box is not None
            assert box["x"] >= 0 and box["x"] + box["width"] <= 1280
            sizes = page.locator("#results .scroll").evaluate(
                "e => [e.scrollWidth, e.clientWidth]")
            assert sizes[0] > sizes[1], "the table is not wider than its box"
            page.locator("#results .scroll").evaluate("e => e.scrollLeft = 500")
            assert page.locator("#results .scroll").evaluate("e => e.scrollLeft") > 0
            # The page itself does not scroll sideways: the table is cut off nowhere.
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280
        finally:
            browser.close()
