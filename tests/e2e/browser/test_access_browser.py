"""Data access requests in a real browser, on a real hub that requires them: a coordinator
files a request from the form the catalog links to (its spoke preselected by the address),
with the ethics approval and DPIA attached; a committee member finds it in the queue and
approves it with conditions; the new-experiment form offers the approved request, shows
the hub's refusal of an attribute outside the conditions, and launches one inside them,
which the request's page then lists."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tributary.services.browser import CHROMIUM_ARGS, ensure_chromium
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e
playwright_api = pytest.importorskip("playwright.sync_api")
PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory,
               service_settings: ServiceSettings) -> Iterator[LocalFederation]:
    fed = LocalFederation(tmp_path_factory.mktemp("access-browser"), service_settings,
                          hub_env={"TRIBUTARY_HUB_REQUIRE_ACCESS_REQUESTS": "true"})
    fed.start_hub()
    yield fed
    fed.stop()


def test_request_queue_decision_and_a_bound_launch_in_the_browser(
        federation: LocalFederation, misbehaving_image: tuple[str, str]) -> None:
    suffix = uuid.uuid4().hex[:6]
    spoke_id = f"north-{suffix}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 1, seed=5, site=spoke_id)
    federation.add_spoke(spoke_id, data)
    algorithm = federation.register_algorithm(
        name=f"dac-{suffix}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1])
    users = {"coordinator": f"coord-{suffix}", "committee": f"member-{suffix}"}
    password = uuid.uuid4().hex
    with federation.api() as api:
        for role, name in users.items():
            api.post("/api/users", json={"username": name, "password": password,
                                         "roles": [role]}).raise_for_status()

    chromium = ensure_chromium()
    expect = playwright_api.expect
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)

        def signed_in(role: str):
            context = browser.new_context(base_url=federation.hub_url,
                                          viewport={"width": 1280, "height": 900})
            context.set_default_timeout(20_000)
            page = context.new_page()
            page.goto("/login")
            page.fill("#username", users[role])
            page.fill("#password", password)
            page.click("button[type=submit]")
            expect(page.locator(".who")).to_contain_text(users[role])
            return page

        coordinator = signed_in("coordinator")
        coordinator.goto(f"/access-requests/new?spokes={spoke_id}&attributes=nodules,age")
        expect(coordinator.locator(f"input[name=spokes][value='{spoke_id}']")).to_be_checked()
        coordinator.fill("#title", f"Validation {suffix}")
        coordinator.fill("#purpose", "Validate the detector at a held-out site.")
        for name in ("ethics", "dpia"):
            coordinator.set_input_files(f"#{name}", files=[{
                "name": f"{name}.pdf", "mimeType": "application/pdf", "buffer": PDF}])
        coordinator.click("#submit")
        expect(coordinator.locator("#access-state")).to_have_text("submitted")
        request_id = coordinator.url.rstrip("/").rsplit("/", 1)[-1]
        expect(coordinator.locator("#attachments")).to_contain_text("Ethics approval")
        expect(coordinator.locator("#decision-form")).to_have_count(0)  # not for the requester

        member = signed_in("committee")
        member.goto("/access-requests")
        queue = member.locator("#committee-queue")
        expect(queue).to_contain_text(f"Validation {suffix}")
        queue.get_by_role("link", name=f"Validation {suffix}").click()
        member.uncheck("#decision-form input[name=attributes][value='age']")
        member.fill("#reason", "ethics approval and DPIA in order")
        member.click("#approve")
        expect(member.locator("#access-state")).to_have_text("approved")
        expect(member.locator("#conditions")).to_contain_text("nodules")
        expect(member.locator("#conditions")).not_to_contain_text("age")
        expect(member.locator("#votes")).to_contain_text(users["committee"])

        coordinator.goto("/experiments/new")
        coordinator.select_option("#access_request_id", request_id)
        coordinator.fill("#name", "outside the conditions")
        coordinator.select_option("#algorithm", str(algorithm["id"]))
        coordinator.check(f"input[name=spoke_ids][value='{spoke_id}']")
        coordinator.fill("#release", "nodules, age")
        coordinator.click("#submit")
        error = coordinator.locator("#form-error")
        expect(error).to_contain_text("not launched")
        expect(error).to_contain_text(f"attribute(s) age not allowed by access request "
                                      f"{request_id}")

        coordinator.goto("/experiments/new")
        coordinator.select_option("#access_request_id", request_id)
        coordinator.fill("#name", "inside the conditions")
        coordinator.select_option("#algorithm", str(algorithm["id"]))
        coordinator.check(f"input[name=spoke_ids][value='{spoke_id}']")
        coordinator.fill("#release", "nodules")
        coordinator.click("#submit")
        coordinator.wait_for_url("**/experiments/exp-*")
        experiment_id = coordinator.url.rstrip("/").rsplit("/", 1)[-1]
        expect(coordinator.locator("#experiment-access-request")).to_have_text(request_id)

        coordinator.goto(f"/access-requests/{request_id}")
        expect(coordinator.locator("#bound-studies")).to_contain_text(experiment_id)
        browser.close()
    with federation.api() as api:
        launched = api.get(f"/api/experiments/{experiment_id}").json()
    assert launched["state"] == "launched"
    assert launched["access_request_id"] == request_id
