"""The dashboard in a real browser (Debian's headless Chromium, driven by Playwright) against
a real hub with real spoke processes: a coordinator signs in, is refused bad launches with
clear messages, launches a study from the form, watches it finish live over server-sent
events, and reads the results with their plots. Screenshots go to test-artifacts/."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import add_attribute, wait_for

from tributary.cli.results_table import figure_cell
from tributary.protocol.broker import BrokerSettings, StompClient
from tributary.protocol.destinations import results_queue
from tributary.services.browser import CHROMIUM_ARGS, ensure_chromium
from tributary.services.settings import ServiceSettings
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[3]
ARTIFACTS = ROOT / "test-artifacts"
#: Two spokes big enough to report, one below this hub's suppression threshold.
SIZES = {"northfield": 8, "riverside": 8, "lakeside": 2}
MIN_CELL_SIZE = 3
#: Does the detector's nodule count flag the patients with several nodules? The site's own
#: ground truth (released with the results) is the label: ROC, AUC, sensitivity...
AGGREGATION = {"score": "nodule_count", "label": "several_nodules", "positive": True,
               "threshold": 2}

playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory,
               service_settings: ServiceSettings) -> Iterator[LocalFederation]:
    """This module's own hub, with a small-cell threshold the small cohorts can pass."""
    fed = LocalFederation(tmp_path_factory.mktemp("dashboard"), service_settings)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRIBUTARY_HUB_MIN_CELL_SIZE", str(MIN_CELL_SIZE))
        fed.start_hub()
    yield fed
    fed.stop()


@pytest.fixture(scope="module")
def study(federation: LocalFederation, detector_image: tuple[str, str]) -> dict[str, Any]:
    """Three spokes with small synthetic cohorts whose attributes say which cases have a
    nodule, an approved detector version, a version still waiting for review, and a
    coordinator account."""
    unique = uuid.uuid4().hex[:6]
    spokes = {f"{name}-{unique}": count for name, count in SIZES.items()}
    for index, (spoke_id, count) in enumerate(spokes.items()):
        data = federation.root / "data" / spoke_id
        generate_cohort(data, count, seed=300 + index, site=spoke_id)
        add_attribute(data, "several_nodules", lambda _, row: int(row["nodule_count"]) >= 2)
        config = federation.add_spoke(spoke_id, data, institution=f"{spoke_id} hospital",
                                      releasable=("nodules", "several_nodules"))
        federation.start_spoke(spoke_id, config)
    schema = json.loads((ROOT / "examples/lung_nodule/arguments.schema.json").read_text())
    common = {"repository": detector_image[0], "digest": detector_image[1],
              "argument_schema": schema, "aggregator": "nodule-detection"}
    approved = federation.register_algorithm(name=f"lung-nodule-{unique}", version="1.0.0",
                                             **common)
    pending = federation.register_algorithm(approve=False, name=f"lung-nodule-{unique}",
                                            version="2.0.0-rc1", **common)
    password = secrets.token_urlsafe(18)
    with federation.api() as api:
        api.post("/api/users", json={"username": f"coord-{unique}", "password": password,
                                     "roles": ["coordinator"], "organisation": "Study office"}
                 ).raise_for_status()
    return {"spokes": spokes, "approved": approved, "pending": pending,
            "username": f"coord-{unique}", "password": password}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, installed if missing; never Playwright's download."""
    chromium = ensure_chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser: Any, federation: LocalFederation) -> Any:
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  base_url=federation.hub_url)
    context.set_default_timeout(20_000)
    return context.new_page()


def _refused(page: Any, message: str) -> None:
    page.click("#submit")
    error = page.locator("#form-error")
    playwright_api.expect(error).to_contain_text(message)


def test_launch_watch_and_read_a_study(federation: LocalFederation, study: dict[str, Any],
                                       page: Any) -> None:
    expect = playwright_api.expect
    # Sign in: a wrong password is refused, the right one opens the experiments list.
    page.goto("/experiments/new")
    assert page.url.endswith("/login")
    page.fill("#username", study["username"])
    page.fill("#password", "not the password")
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text("Wrong username or password")
    page.fill("#username", study["username"])
    page.fill("#password", study["password"])
    page.click("button[type=submit]")
    expect(page.locator("h1")).to_have_text("Experiments")

    # The form refuses bad launches, each reason beside its field, and creates nothing.
    page.click("text=New experiment")
    page.click("#submit")
    expect(page.locator("#form-error")).to_contain_text("check the fields marked below")
    expect(page.locator("[data-field-error=name]")).to_have_text("Give the study a name.")
    expect(page.locator("[data-field-error=spoke_ids]")).to_have_text(
        "Choose at least one target spoke.")
    page.fill("#name", "Nodule detection, browser study")
    page.select_option("#algorithm", str(study["approved"]["id"]))
    for spoke_id in study["spokes"]:
        page.check(f"input[name=spoke_ids][value='{spoke_id}']")
    # The arguments are fields made from the version's schema: defaults, ranges and
    # descriptions; the raw JSON stays in step, under an advanced option.
    diameter = page.locator("#arg-min_diameter_mm")
    assert diameter.input_value() == "4" and diameter.get_attribute("max") == "100"
    assert page.locator("#arg-threshold_hu").input_value() == "-400"
    expect(page.locator("label[for=arg-min_diameter_mm]")).to_contain_text(
        "equivalent-sphere diameter")
    expect(page.locator("#arguments")).to_be_hidden()
    diameter.fill("-5")
    assert json.loads(page.input_value("#arguments"))["min_diameter_mm"] == -5
    page.click("#submit")
    expect(page.locator("[data-field-error='arguments.min_diameter_mm']")).to_have_text(
        "must be at least 0")
    expect(page.locator("[data-field-error=name]")).to_be_hidden()
    page.fill("#memory_mb", "1")
    diameter.fill("4")
    page.click("#submit")  # the hub's own validation error, beside its field too
    expect(page.locator("[data-field-error=memory_mb]")).to_contain_text("16")
    expect(page.locator("[data-field-error='arguments.min_diameter_mm']")).to_be_hidden()
    page.fill("#memory_mb", "1024")
    page.click("#raw-arguments summary")
    page.fill("#arguments", '{"min_diameter_mm": 4, "unknown": 1}')
    _refused(page, "invalid arguments")  # the hub's schema check, for what the fields miss
    page.fill("#arguments", '{"min_diameter_mm": ')
    page.click("#submit")
    expect(page.locator("[data-field-error=arguments]")).to_contain_text("not valid JSON")
    page.fill("#arguments", '{"min_diameter_mm": 7}')
    assert diameter.input_value() == "7"  # hand-written JSON refills the fields
    page.select_option("#algorithm", str(study["pending"]["id"]))
    _refused(page, "not approved")
    page.screenshot(path=ARTIFACTS / "dashboard-refused.png", full_page=True)
    with federation.api() as api:
        assert not [e for e in api.get("/api/experiments").json()
                    if e["name"] == "Nodule detection, browser study"]

    # A valid study: created and launched from the form.
    page.select_option("#algorithm", str(study["approved"]["id"]))
    assert json.loads(page.input_value("#arguments")) == {"min_diameter_mm": 4,
                                                          "threshold_hu": -400}
    page.fill("#release", "several_nodules")
    page.select_option("#aggregator", "binary-classification")
    page.fill("#aggregator_parameters", json.dumps(AGGREGATION))
    page.fill("#timeout_seconds", "300")
    page.fill("#memory_mb", "1024")
    page.click("#submit")
    page.wait_for_url("**/experiments/exp-*")
    experiment_id = page.url.rsplit("/", 1)[1]

    # Progress arrives over SSE: the page completes without being reloaded, and so does
    # the experiments list opened beside it.
    page.evaluate("window.__notReloaded = true")
    listing = page.context.new_page()
    listing.goto("/")
    listing.evaluate("window.__notReloaded = true")
    expect(page.locator("#live")).to_have_text("live", timeout=10_000)
    page.screenshot(path=ARTIFACTS / "dashboard-running.png", full_page=True)
    expect(page.locator("#experiment-state")).to_have_text("completed", timeout=240_000)
    assert page.evaluate("window.__notReloaded") is True
    expect(listing.locator("#experiment-list td", has_text="Nodule detection, browser study")
           .locator("xpath=..").locator(".badge").nth(0)).to_have_text("completed")
    assert listing.evaluate("window.__notReloaded") is True
    listing.close()
    expect(page.locator("#live")).to_have_text("finished")
    expect(page.locator("button", has_text="Cancel experiment")).to_be_hidden()
    total = sum(study["spokes"].values())
    expect(page.locator("#cases tr")).to_have_count(total)
    expect(page.locator("#cases .badge.ok")).to_have_count(total)
    for spoke_id, count in study["spokes"].items():
        row = page.locator(f"#progress tr[data-spoke='{spoke_id}']")
        expect(row).to_contain_text("completed")
        expect(row.locator("td.num").nth(2)).to_have_text(str(count))

    # Results: the aggregate table and every plot, drawn as SVG by the hub; the small
    # spoke's figures are suppressed in the table and absent from every result plot, and
    # so are those of the smaller of the other two (northfield, by name where they tie),
    # so that pooled minus the shown spoke cannot give the small spoke's back.
    expect(page.locator("[data-results-state=completed]")).to_have_count(1)
    expect(page.locator("#aggregate tbody tr")).to_have_count(len(study["spokes"]) + 1)
    complement, big, small = study["spokes"]
    expect(page.locator(f"#aggregate tr[data-group='{small}']")).to_contain_text("suppressed")
    expect(page.locator(f"#aggregate tr[data-group='{complement}']")
           ).to_contain_text("suppressed")
    expect(page.locator(f"#aggregate tr[data-group='{big}']")).not_to_contain_text("suppressed")
    expect(page.locator("#aggregate tr[data-group='pooled']")).not_to_contain_text("suppressed")
    for title in ("Progress per spoke", "Distribution of nodule_count", "ROC curves",
                  "Sensitivity per spoke"):
        figure = page.locator(f"figure[data-plot='{title}']")
        expect(figure.locator("svg")).to_have_count(1)
        assert figure.locator("svg path").count() > 5
        if title != "Progress per spoke":
            assert small not in figure.inner_text()
            assert big in figure.inner_text()
    expect(page.locator("figure[data-plot='ROC curves']")).to_contain_text("pooled (AUC")
    page.screenshot(path=ARTIFACTS / "dashboard-experiment.png", full_page=True)
    box = page.locator("#results").bounding_box()
    page.screenshot(path=ARTIFACTS / "dashboard-study.png", full_page=True,
                    clip={"x": 0, "y": 0, "width": 1280, "height": box["y"] + box["height"]})

    # The same figures on a fresh load, and the other pages read the same federation.
    page.goto(f"/experiments/{experiment_id}")
    expect(page.locator("figure[data-plot] svg")).to_have_count(4)
    page.goto("/")
    expect(page.locator("#experiment-list")).to_contain_text("Nodule detection, browser study")
    page.screenshot(path=ARTIFACTS / "dashboard-list.png", full_page=True)
    page.goto("/spokes")
    for spoke_id in study["spokes"]:
        expect(page.locator("tr", has_text=spoke_id)).to_contain_text("enrolled")
    page.goto("/algorithms")
    expect(page.locator(f"[data-algorithm='{study['pending']['id']}'] .badge").first
           ).to_have_text("pending")
    page.goto(f"/audit?q={experiment_id}")
    expect(page.locator("#audit")).to_contain_text("experiment.launched")
    expect(page.locator("#audit")).to_contain_text(study["username"])
    page.screenshot(path=ARTIFACTS / "dashboard-audit.png", full_page=True)
    print(f"screenshots in {ARTIFACTS}")


def test_study_cli_launch_watch_fetch(federation: LocalFederation, study: dict[str, Any],
                                      tmp_path: Path) -> None:
    """The coordinator's CLI: launch from a JSON file, watch it to the end, fetch results."""
    token = federation.sign_in(study["username"], study["password"])
    env = {**os.environ, "TRIBUTARY_HUB_URL": federation.hub_url, "TRIBUTARY_TOKEN": token}
    cli = [sys.executable, "-m", "tributary.cli", "study"]
    spokes = list(study["spokes"])
    body = tmp_path / "study.json"
    body.write_text(json.dumps({"name": "CLI study", "algorithm_id": study["approved"]["id"],
                                "arguments": {"min_diameter_mm": 4},
                                "cohort": {"max_cases": 2}, "release": ["nodules"]}))
    spokes = spokes[:2]

    refused = subprocess.run([*cli, "launch", "--file", str(body), "--spoke", spokes[0],
                              "--algorithm", str(study["pending"]["id"])],
                             env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "not approved" in refused.stderr

    launched = subprocess.run([*cli, "launch", "--file", str(body), "--spoke", spokes[0],
                               "--spoke", spokes[1], "--watch"],
                              env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stdout + launched.stderr
    experiment_id = next(line for line in launched.stdout.splitlines()
                         if line.startswith("exp-"))
    assert "completed" in launched.stdout

    fetched = subprocess.run([*cli, "fetch", experiment_id, "--out", str(tmp_path / "out")],
                             env=env, capture_output=True, text=True, timeout=60)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    cases = json.loads((tmp_path / "out" / f"{experiment_id}-cases.json").read_text())
    aggregate = json.loads((tmp_path / "out" / f"{experiment_id}-aggregate.json").read_text())
    assert len(cases) == 4 and all(c["state"] == "succeeded" for c in cases)
    assert aggregate["groups"]["pooled"]["cases"] == 4
    rows = (tmp_path / "out" / f"{experiment_id}-results.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and "spoke_id" in rows[0]
    assert (tmp_path / "out" / f"{experiment_id}-aggregate.csv").read_text().count("pooled")

    shown = subprocess.run([*cli, "show", experiment_id], env={**env, "COLUMNS": "200"},
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"({experiment_id}): completed, 4/4 cases finished" in shown.stdout
    pooled = aggregate["groups"]["pooled"]
    figures = {c["key"]: c["label"] for c in aggregate["columns"]}
    for key, figure in pooled["figures"].items():  # each row as the hub computed it
        row = next(line for line in shown.stdout.splitlines()
                   if line.strip("│ ").startswith(figures[key] + " "))
        assert row.rstrip(" │").endswith(figure_cell(figure)), (key, row)
    small = [k for k, f in pooled["figures"].items() if f["suppressed"]]
    assert not small or "suppressed: computed over fewer than" in shown.stdout

    no_token = subprocess.run([*cli, "watch", experiment_id],
                              env={**env, "TRIBUTARY_TOKEN": "wrong"},
                              capture_output=True, text=True, timeout=60)
    assert no_token.returncode == 1 and "401" in no_token.stderr


def test_cancel_from_the_page_while_a_spoke_is_offline(federation: LocalFederation,
                                                      study: dict[str, Any], page: Any,
                                                      tmp_path: Path) -> None:
    """A draft is launched from its page to a spoke that never started: the spoke shows
    offline, with what its target waits for; the coordinator cancels the experiment."""
    expect = playwright_api.expect
    offline = f"dormant-{uuid.uuid4().hex[:6]}"
    federation.add_spoke(offline, tmp_path)  # registered and enrolled, never started
    with federation.api(federation.sign_in(study["username"], study["password"])) as api:
        created = api.post("/api/experiments", json={
            "name": "Waiting for a dormant spoke", "algorithm_id": study["approved"]["id"],
            "spoke_ids": [offline]}).raise_for_status().json()
    page.goto(f"/experiments/{created['id']}")
    if "/login" in page.url:
        page.fill("#username", study["username"])
        page.fill("#password", study["password"])
        page.click("button[type=submit]")
        page.goto(f"/experiments/{created['id']}")
    expect(page.locator("#experiment-state")).to_have_text("draft")
    page.click("button:has-text('Launch')")  # the draft is launched from its page
    expect(page.locator("#experiment-state")).to_have_text("launched")
    row = page.locator(f"#progress tr[data-spoke='{offline}']")
    expect(row).to_contain_text("offline")
    expect(row).to_contain_text("published")
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("button:has-text('Cancel experiment')")
    expect(page.locator("#experiment-state")).to_have_text("cancelled")
    expect(page.locator("#progress")).to_contain_text("cancel")
    page.goto("/spokes")
    expect(page.locator("tr", has_text=offline)).to_contain_text("offline")
    running = page.locator("tr", has_text=next(iter(study["spokes"])))
    deadline = time.monotonic() + 60  # a freshly started spoke's first heartbeat
    while "online" not in running.inner_text() and time.monotonic() < deadline:
        time.sleep(1)
        page.reload()
    expect(running).to_contain_text("online")
    page.goto(f"/audit?action=experiment.cancelled&target={created['id']}")
    expect(page.locator("#audit tbody tr")).to_have_count(1)


def test_review_and_revoke_from_the_algorithms_page(federation: LocalFederation,
                                                    study: dict[str, Any], browser: Any,
                                                    detector_image: tuple[str, str]) -> None:
    """Two reviewers of two organisations approve a version on the page (the hub signs
    the approval once the rule is met); a coordinator then revokes it with a reason."""
    expect = playwright_api.expect
    suffix = uuid.uuid4().hex[:6]
    algorithm = federation.register_algorithm(
        approve=False, name=f"reviewed-{suffix}", version="1.0.0",
        repository=detector_image[0], digest=detector_image[1])
    accounts = {}
    with federation.api() as api:
        for name, roles, org in ((f"rev-a-{suffix}", ["reviewer"], "Board A"),
                                 (f"rev-b-{suffix}", ["reviewer"], "Board B")):
            accounts[name] = secrets.token_urlsafe(18)
            api.post("/api/users", json={"username": name, "password": accounts[name],
                                         "roles": roles, "organisation": org}
                     ).raise_for_status()
    accounts[study["username"]] = study["password"]
    section = f"[data-algorithm='{algorithm['id']}']"
    for index, (username, password) in enumerate(accounts.items()):
        context = browser.new_context(base_url=federation.hub_url)
        page = context.new_page()
        page.goto("/login")
        page.fill("#username", username)
        page.fill("#password", password)
        page.click("button[type=submit]")
        page.goto("/algorithms")
        card = page.locator(section)
        if index < 2:  # a reviewer: approve with a comment
            card.locator("input[name=comment]").fill(f"checked by {username}")
            card.locator("button[value=approve]").click()
            expect(card.locator("tbody")).to_contain_text(f"checked by {username}")
            expect(card.locator("h2 .badge")).to_have_text(
                "pending" if index == 0 else "approved")
        else:  # the coordinator: revoke, with the reason on record
            page.on("dialog", lambda dialog: dialog.accept())
            card.locator("input[name=reason]").fill("superseded by 1.0.1")
            card.locator("button", has_text="Revoke").click()
            expect(card.locator("h2 .badge")).to_have_text("revoked")
            expect(card).to_contain_text("superseded by 1.0.1")
            page.screenshot(path=ARTIFACTS / "dashboard-algorithms.png", full_page=True)
        context.close()


def test_failed_cases_show_their_reason_and_run_again(federation: LocalFederation,
                                                      study: dict[str, Any], page: Any,
                                                      misbehaving_image: tuple[str, str]
                                                      ) -> None:
    """Cases of an algorithm that crashes fail with their reason on the page; the
    coordinator runs them again from the page and the second attempt shows up live."""
    expect = playwright_api.expect
    spoke_id = list(study["spokes"])[-1]  # the two-case spoke
    algorithm = federation.register_algorithm(
        name=f"crashing-{uuid.uuid4().hex[:6]}", version="1.0.0",
        repository=misbehaving_image[0], digest=misbehaving_image[1])
    with federation.api(federation.sign_in(study["username"], study["password"])) as api:
        created = api.post("/api/experiments", json={
            "name": "An algorithm that crashes", "algorithm_id": algorithm["id"],
            "arguments": {"behaviour": "crash"}, "spoke_ids": [spoke_id],
            "limits": {"timeout_seconds": 120, "memory_mb": 256}}).raise_for_status().json()
        api.post(f"/api/experiments/{created['id']}/launch").raise_for_status()
    page.goto(f"/experiments/{created['id']}")
    if "/login" in page.url:
        page.fill("#username", study["username"])
        page.fill("#password", study["password"])
        page.click("button[type=submit]")
        page.goto(f"/experiments/{created['id']}")
    expect(page.locator("#experiment-state")).to_have_text("completed", timeout=120_000)
    expect(page.locator("#cases .badge.fail")).to_have_count(2)
    expect(page.locator("#cases")).to_contain_text("exit")  # the failure reason
    expect(page.locator("#failure-reasons tbody tr")).to_have_count(2)  # spoke and pooled
    retry = page.locator("button", has_text="Retry failed cases")
    expect(retry).to_be_visible()
    page.on("dialog", lambda dialog: dialog.accept())
    retry.click()
    expect(page.locator("#cases")).to_contain_text("2 attempts", timeout=120_000)
    expect(page.locator("#experiment-state")).to_have_text("completed", timeout=120_000)
    page.screenshot(path=ARTIFACTS / "dashboard-retried.png", full_page=True)


def test_an_administrator_discards_a_dead_letter_from_its_page(
        federation: LocalFederation, browser: Any) -> None:
    """A malformed message is shown with its reason; the administrator discards it with a
    reason of their own from the page, and it is gone."""
    expect = playwright_api.expect
    marker = f"garbage-{uuid.uuid4().hex[:6]}"
    client = StompClient(BrokerSettings(host=federation.services.host,
                                        port=federation.services.broker_port,
                                        federation=federation.federation), "poisoner").start(30)
    try:
        client.publish(results_queue(federation.federation), f"not json {marker}")
    finally:
        client.close()
    with federation.api() as api:
        wait_for(lambda: any(marker in d["body_preview"]
                             for d in api.get("/api/dead-letters").json()), 60, "dead letter")
    context = browser.new_context(base_url=federation.hub_url)
    page = context.new_page()
    page.goto("/login")
    page.fill("#username", "admin")
    page.fill("#password", federation.admin_password)
    page.click("button[type=submit]")
    page.goto("/dead-letters")
    row = page.locator("tr", has=page.locator(f"code[title*='{marker}']"))
    expect(row).to_contain_text("malformed message: not JSON")
    page.screenshot(path=ARTIFACTS / "dashboard-dead-letters.png", full_page=True)
    page.on("dialog", lambda dialog: dialog.accept())
    row.locator("input[name=reason]").fill("garbage from a test")
    row.locator("button", has_text="Discard").click()
    expect(page.locator(f"code[title*='{marker}']")).to_have_count(0)
    context.close()
    with federation.api() as api:
        events = api.get("/api/audit", params={"action": "dead_letter.discarded"}).json()
    assert any(e["actor"] == "admin" and e["detail"]["reason"] == "garbage from a test"
               for e in events)


def test_a_failed_case_page_shows_the_log_tail_or_why_not(
        federation: LocalFederation, study: dict[str, Any], page: Any,
        misbehaving_image: tuple[str, str]) -> None:
    """A crashing algorithm: its case page (and `study show`) shows the log tail, exit code
    and the limits it ran under; at a site whose policy withholds log tails, neither shows
    the tail and both say why."""
    expect = playwright_api.expect
    open_spoke = list(study["spokes"])[-1]
    closed_spoke = f"withholding-{uuid.uuid4().hex[:6]}"
    data = federation.root / "data" / closed_spoke
    generate_cohort(data, 1, seed=77, site=closed_spoke)
    federation.start_spoke(closed_spoke, federation.add_spoke(closed_spoke, data,
                                                              log_tails=False))
    algorithm = federation.register_algorithm(
        name=f"crash-logs-{uuid.uuid4().hex[:6]}", version="1.0.0",
        repository=misbehaving_image[0], digest=misbehaving_image[1])
    token = federation.sign_in(study["username"], study["password"])
    with federation.api(token) as api:
        created = api.post("/api/experiments", json={
            "name": "Failures to read", "algorithm_id": algorithm["id"],
            "arguments": {"behaviour": "crash"}, "spoke_ids": [open_spoke, closed_spoke],
            "limits": {"timeout_seconds": 120, "memory_mb": 256}}).raise_for_status().json()
        api.post(f"/api/experiments/{created['id']}/launch").raise_for_status()
        federation.wait_for_experiment(created["id"], timeout=300)
        cases = api.get(f"/api/experiments/{created['id']}/cases").json()
    open_case = next(c for c in cases if c["spoke_id"] == open_spoke)
    closed_case = next(c for c in cases if c["spoke_id"] == closed_spoke)

    page.goto(f"/experiments/{created['id']}")
    if "/login" in page.url:
        page.fill("#username", study["username"])
        page.fill("#password", study["password"])
        page.click("button[type=submit]")
        page.goto(f"/experiments/{created['id']}")
    page.click(f"a[href$='/cases/{open_spoke}/{open_case['case_id']}']")
    expect(page.locator("h1")).to_contain_text(open_case["case_id"])
    expect(page.locator("pre[data-log-tail]")).to_contain_text("Traceback")
    expect(page.locator("[data-exit-code]")).to_have_text(str(open_case["failure"]["exit_code"]))
    expect(page.locator("#failure [data-applied-limits]")).to_contain_text("memory_mb 256")
    expect(page.locator("[data-reason]")).to_contain_text("exit_code")
    page.screenshot(path=ARTIFACTS / "dashboard-case-log-tail.png", full_page=True)

    page.goto(f"/experiments/{created['id']}/cases/{closed_spoke}/{closed_case['case_id']}")
    expect(page.locator("[data-log-tail=withheld]")).to_contain_text(
        "Withheld by the site's policy")
    expect(page.locator("pre[data-log-tail]")).to_have_count(0)
    assert "Traceback" not in page.content()
    page.screenshot(path=ARTIFACTS / "dashboard-case-log-withheld.png", full_page=True)

    env = {**os.environ, "TRIBUTARY_HUB_URL": federation.hub_url, "TRIBUTARY_TOKEN": token,
           "COLUMNS": "200"}
    shown = subprocess.run([sys.executable, "-m", "tributary.cli", "study", "show",
                            created["id"]], env=env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert f"{open_spoke} case {open_case['case_id']} failed" in shown.stdout
    assert "Traceback" in shown.stdout and "ran under: " in shown.stdout
    closed_lines = shown.stdout.split(f"{closed_spoke} case {closed_case['case_id']} failed")[1]
    assert any("log tail withheld by the site's policy" in line
               for line in closed_lines.splitlines()[1:4]), shown.stdout
