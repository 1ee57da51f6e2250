"""Trust made visible, in a real browser (issue 15): a version signed by a publisher the
only spoke does not trust says so on its page, and the new-study form shows the hub's
refusal with the spoke's reason; nothing is sent."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tributary.protocol.release import sign_release
from tributary.protocol.signing import SigningKey
from tributary.services.browser import CHROMIUM_ARGS, ensure_chromium
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e
playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory,
               service_settings: ServiceSettings) -> Iterator[LocalFederation]:
    fed = LocalFederation(tmp_path_factory.mktemp("trust-browser"), service_settings,
                          launch_trust_check="strict")
    fed.start_hub()
    yield fed
    fed.stop()


def test_the_version_page_warns_and_the_form_shows_why_a_launch_is_refused(
        federation: LocalFederation, detector_image: tuple[str, str]) -> None:
    suffix = uuid.uuid4().hex[:6]
    site_key, stranger = SigningKey.generate(), SigningKey.generate()
    (federation.root / "site.pub").write_text(site_key.public.pem)
    spoke_id = f"pinned-{suffix}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 1, seed=3, site=spoke_id)
    federation.start_spoke(spoke_id, federation.add_spoke(
        spoke_id, data, publisher_keys=(federation.root / "site.pub",)))
    name = f"stranger-{suffix}"
    with federation.api() as api:
        api.post("/api/publishers", json={"name": f"Stranger Labs {suffix}",
                                          "public_key_pem": stranger.public.pem}
                 ).raise_for_status()
    algorithm = federation.register_algorithm(
        name=name, version="1", repository=detector_image[0], digest=detector_image[1],
        release_signature=sign_release(stranger, *detector_image, name, "1", "Stranger"))
    federation.wait_for_trust([spoke_id])

    chromium = ensure_chromium()
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        context = browser.new_context(base_url=federation.hub_url,
                                      viewport={"width": 1280, "height": 900})
        context.set_default_timeout(20_000)
        page = context.new_page()
        page.goto("/login")
        page.fill("#username", "admin")
        page.fill("#password", federation.admin_password)
        page.click("button[type=submit]")
        expect = playwright_api.expect

        page.goto(f"/algorithms/{algorithm['id']}")
        trust = page.locator("#spoke-trust")
        expect(trust).to_contain_text("1 of 1 spoke(s) will not run this version")
        expect(trust).to_contain_text(f"does not trust Stranger Labs {suffix}")

        page.goto("/experiments/new")
        page.fill("#name", "refused before sending")
        page.select_option("#algorithm", str(algorithm["id"]))
        page.check(f"input[name=spoke_ids][value='{spoke_id}']")
        page.click("#submit")
        error = page.locator("#form-error")
        expect(error).to_contain_text("would refuse this version; nothing was sent")
        expect(error).to_contain_text(f"{spoke_id}: the spoke does not trust Stranger Labs")
        browser.close()
    with federation.api() as api:
        drafts = [e for e in api.get("/api/experiments").json()
                  if e["name"] == "refused before sending"]
    assert [e["state"] for e in drafts] == ["draft"]
    assert drafts[0]["targets"][0]["state"] == "pending"
