"""The dashboard's algorithm forms in a real browser (issue 15): an administrator registers
a publisher key by pasting it into the Algorithms page; a version signed with it shows its
signed statement on its own page, where a reviewer approves it."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tributary.protocol.release import sign_release
from tributary.protocol.signing import SigningKey
from tributary.services.browser import CHROMIUM_ARGS, ensure_chromium
from tributary.testbed.federation import LocalFederation

pytestmark = pytest.mark.e2e
playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, installed if missing; never Playwright's download."""
    chromium = ensure_chromium()
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def signed_in(browser: Any, federation: LocalFederation, username: str, password: str) -> Any:
    context = browser.new_context(base_url=federation.hub_url,
                                  viewport={"width": 1280, "height": 900})
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.goto("/login")
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("button[type=submit]")
    return page


def test_register_a_publisher_and_review_on_the_version_page(
        federation: LocalFederation, browser: Any,
        misbehaving_image: tuple[str, str]) -> None:
    expect = playwright_api.expect
    suffix = uuid.uuid4().hex[:6]
    key = SigningKey.generate()
    admin = signed_in(browser, federation, "admin", federation.admin_password)
    admin.goto("/algorithms")
    form = admin.locator("form[data-api='/api/publishers']")
    form.locator("input[name=name]").fill(f"Browser Lab {suffix}")
    form.locator("textarea[name=public_key_pem]").fill(key.public.pem)
    form.locator("button[type=submit]").click()
    expect(admin.locator("#publishers tbody")).to_contain_text(key.keyid)
    admin.goto("/algorithms")
    form = admin.locator("form[data-api='/api/publishers']")  # the same key again: refused
    form.locator("input[name=name]").fill("Twice")
    form.locator("textarea[name=public_key_pem]").fill(key.public.pem)
    form.locator("button[type=submit]").click()
    expect(admin.locator("#publishers [data-error]")).to_contain_text("already registered")
    admin.context.close()

    name = f"paged-{suffix}"
    repository, digest = misbehaving_image
    algorithm = federation.register_algorithm(
        approve=False, name=name, version="1.0.0", repository=repository, digest=digest,
        release_signature=sign_release(key, repository, digest, name, "1.0.0", "Browser Lab"))
    password = secrets.token_urlsafe(18)
    with federation.api() as api:
        api.post("/api/users", json={"username": f"rev-{suffix}", "password": password,
                                     "roles": ["reviewer"], "organisation": "Board P"}
                 ).raise_for_status()
    reviewer = signed_in(browser, federation, f"rev-{suffix}", password)
    reviewer.goto(f"/algorithms/{algorithm['id']}")
    expect(reviewer.locator("h1")).to_have_text(f"{name} 1.0.0")
    expect(reviewer.locator("main")).to_contain_text(key.keyid)  # the release statement
    card = reviewer.locator(f"[data-algorithm='{algorithm['id']}']")
    card.locator("input[name=comment]").fill("looked at it in the browser")
    card.locator("button[value=approve]").click()
    expect(card.locator("table").last).to_contain_text("looked at it in the browser")
    expect(card.locator("h2 .badge")).to_have_text("pending")  # one of two organisations
    reviewer.context.close()
