"""A training study on the dashboard and out of the hub (issue 16, items 4, 6 and 8), on a
study really run by ``run_training_demo`` (real broker, SeaweedFS and Docker) in a real
hub process (``tributary hub serve``, whose training service runs the rounds and signs the
models with the hub's key) over the same SeaweedFS:

* in headless Chromium, a coordinator launches the study through the dashboard's form
  (a field the hub refuses is marked beside it, nothing is created), then the study's page
  follows the rounds live (SSE) while they run, then shows its curves, the stop reason and
  the final model's download;
* ``tributary training export`` writes the model whose digest and hub signature check, and
  refuses (writing nothing) once the object in the store has been altered;
* the study's bundle passes ``tributary bundle verify``; one altered byte fails it."""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import shutil
import subprocess
import sys
import threading
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tributary.protocol.objects import ObjectStore
from tributary.protocol.signing import PublicKey
from tributary.protocol.training.provenance import TrainingProvenance, check_model
from tributary.services import objectstore
from tributary.services.browser import CHROMIUM_ARGS, ensure_chromium
from tributary.services.settings import ServiceSettings
from tributary.services.system import free_port
from tributary.testbed.training_demo import SPOKES, push_training_image, run_training_demo
from tributary.testbed.training_hub import TrainingHub as HubProcess

pytestmark = pytest.mark.e2e
playwright_api = pytest.importorskip("playwright.sync_api")

BASE_IMAGE = "tributary/python-base:3.11"
ROUNDS = 4
BIN = Path(sys.executable).parent


@dataclass
class TrainingHub:
    """The hub process (with the demo's store) whose training service runs the demo's
    study, launched through its API."""

    federation: HubProcess
    store_settings: ServiceSettings
    image: tuple[str, str]
    service_settings: ServiceSettings
    demo: Any = None
    error: BaseException | None = None
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start_study(self, launch: Callable[[dict[str, Any]], str] | None = None) -> bool:
        """Run the demo's study in the background (once; False if it already runs),
        launched by ``launch`` (default: through the API)."""
        with self.lock:
            if self.thread is not None:
                return False

            def run() -> None:
                try:
                    self.demo = run_training_demo(
                        self.federation.folder.parent, self.service_settings,
                        self.store_settings, self.image, rounds=ROUNDS, say=lambda _: None,
                        hub=self.federation, launch=launch)
                except BaseException as exc:  # reported by finished()
                    self.error = exc

            self.thread = threading.Thread(target=run, daemon=True)
            self.thread.start()
            return True

    def finished(self) -> Any:
        self.start_study()
        assert self.thread is not None
        self.thread.join(timeout=600)
        if self.error is not None:
            raise self.error
        assert self.demo is not None and self.demo.report["state"] == "finished", self.demo
        return self.demo


@pytest.fixture(scope="module")
def training_hub(tmp_path_factory: pytest.TempPathFactory,
                 service_settings: ServiceSettings) -> Iterator[TrainingHub]:
    if shutil.which("docker") is None:
        pytest.skip("the docker CLI is not installed")
    if subprocess.run(["docker", "image", "inspect", BASE_IMAGE],
                      capture_output=True, timeout=60).returncode != 0:
        pytest.skip(f"base image {BASE_IMAGE} is not built (no Docker Hub here)")
    image = push_training_image(service_settings)
    store = ServiceSettings(state_dir=tmp_path_factory.mktemp("os"), host="127.0.0.2",
                            objectstore_port=free_port("127.0.0.2"))
    objectstore.write_identities(store, list(SPOKES), federation="training-ui")
    assert objectstore.ensure_running(store) in ("started", "running")
    credentials = objectstore.write_party_credentials(store, "hub")
    fed = HubProcess(tmp_path_factory.mktemp("training-hub") / "hub", service_settings.host,
                     service_settings.broker_port, f"tu{uuid.uuid4().hex[:8]}", credentials)
    try:
        fed.start()
        hub = TrainingHub(fed, store, image, service_settings)
        yield hub
        if hub.thread is not None:
            hub.thread.join(timeout=600)
    finally:
        fed.stop()
        objectstore.stop(store)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, headless, installed if missing; never Playwright's download."""
    chromium = ensure_chromium()
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _admin_page(browser: Any, fed: HubProcess) -> Any:
    context = browser.new_context(base_url=fed.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto("/login")
    page.fill("#username", "admin")
    page.fill("#password", fed.password)
    page.click("button[type=submit]")
    return page


def test_the_study_page_follows_the_rounds_live(training_hub: TrainingHub, browser: Any,
                                                tmp_path: Path) -> None:
    expect = playwright_api.expect
    fed = training_hub.federation
    page = _admin_page(browser, fed)
    bodies: queue.Queue[dict[str, Any]] = queue.Queue()
    launched: queue.Queue[str] = queue.Queue()

    def through_the_form(body: dict[str, Any]) -> str:  # in the demo's thread
        bodies.put(body)
        return launched.get(timeout=300)

    assert training_hub.start_study(through_the_form), "the study was launched already"
    page.click("nav >> text=Training")
    expect(page.locator("h1")).to_have_text("Training studies")
    body = bodies.get(timeout=300)  # the demo launches its study after starting its agents
    page.click("#new-training-link")
    expect(page.locator("h1")).to_have_text("New training study")
    page.fill("#name", body["name"])
    page.select_option("#algorithm_id", str(body["algorithm_id"]))
    for spoke in body["spokes"]:
        page.check(f"input[name=spokes][value='{spoke}']")
    page.set_input_files("#initial_model", files=[{
        "name": "initial.safetensors", "mimeType": "application/octet-stream",
        "buffer": base64.b64decode(body["initial_model_b64"])}])
    for name in ("rounds", "min_participants", "round_deadline_s", "clip_bound",
                 "noise_multiplier", "epsilon_budget", "delta"):
        page.fill(f"#{name}", f"{body[name]:.12f}".rstrip("0").rstrip("."))
    # A setting the hub refuses is shown beside its field, and nothing is created.
    page.select_option("#strategy", "fedadam")
    page.fill("#beta_2", "1.5")
    page.click("#submit")
    expect(page.locator("[data-field-error=beta_2]")).to_contain_text("less than 1")
    assert page.url.endswith("/training/new")
    with fed.api(fed.admin_token) as api:
        assert api.get("/api/training-studies").json() == []
    page.select_option("#strategy", "fedavg")  # its optimiser fields are not sent
    page.click("#submit")
    page.wait_for_url("**/training/ts-*")
    launched.put(page.url.rsplit("/", 1)[1])
    with fed.api(fed.admin_token) as api:
        audit = api.get("/api/audit", params={"action": "training.launch"}).json()
    assert [e["actor"] for e in audit] == ["admin"], audit
    # Opened as soon as the study exists (its rounds take about a minute): it follows the
    # stream, rows arriving without a reload, until the stream's end.
    assert page.locator("#training").get_attribute("data-live"), "opened after the end"
    expect(page.locator("#live")).to_have_text("live")
    seen_before_end = page.locator("#rounds tr").count()
    assert seen_before_end < ROUNDS
    expect(page.locator("#rounds tr").nth(seen_before_end)).to_be_attached(timeout=300_000)
    expect(page.locator("#live")).to_have_text("finished", timeout=300_000)
    demo = training_hub.finished()
    expect(page.locator("#rounds tr")).to_have_count(ROUNDS)
    expect(page.locator("#training-state")).to_have_text("finished")
    expect(page.locator("#training-summary")).to_contain_text(f"{ROUNDS} rounds done")
    expect(page.locator("#training-summary")).to_contain_text(f"{ROUNDS} of {ROUNDS} aggregated")
    assert page.locator("#training-curves svg[aria-label^='Training per round']").count() == 1
    for row in page.locator("#rounds tr").all():
        expect(row.locator("td").nth(1)).to_have_text("aggregated")
        expect(row.locator("td").nth(4)).to_have_text("3")  # survived masking
    final = demo.report["rounds"][-1]["global_model"]
    expect(page.locator("#final-model")).to_contain_text(final)
    link = page.locator("#model-download")
    response = page.request.get(link.get_attribute("href"))
    assert response.status == 200
    assert "sha256:" + hashlib.sha256(response.body()).hexdigest() == final
    provenance = page.request.get(page.locator("#provenance-link").get_attribute("href"))
    prov = TrainingProvenance.model_validate(provenance.json()["provenance"])
    assert [len(r.participants) for r in prov.rounds] == [3] * ROUNDS
    artifacts = Path(__file__).parents[3] / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / "training-study.png"), full_page=True)
    page.context.close()


def _cli(*args: str | Path, token: str, hub: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "tributary"), *map(str, args)], capture_output=True,
                          text=True, timeout=120, env={
                              "PATH": "/usr/bin:/bin", "TRIBUTARY_HUB_URL": hub,
                              "TRIBUTARY_TOKEN": token, "COLUMNS": "200", "NO_COLOR": "1"})


def test_export_checks_the_model_and_refuses_an_altered_object(
        training_hub: TrainingHub, tmp_path: Path) -> None:
    demo = training_hub.finished()
    fed = training_hub.federation
    key_file = tmp_path / "hub.pub"
    with fed.api(fed.admin_token) as api:
        key_file.write_text(api.get("/api/hub/key").text)
    hub_key = PublicKey.load(key_file)
    out = tmp_path / "export"
    done = _cli("training", "export", demo.study_id, "--out", out, "--hub-key", key_file,
                token=fed.admin_token, hub=fed.url)
    assert done.returncode == 0, done.stdout + done.stderr
    prov = TrainingProvenance.model_validate_json((out / "provenance.json").read_bytes())
    final = prov.models[-1]
    assert final.digest == demo.report["rounds"][-1]["global_model"]
    check_model((out / "model.safetensors").read_bytes(), final, hub_key)  # digest + signature
    assert (out / "model.sig.json").read_text() == final.signature
    assert [r.epsilon_cumulative for r in prov.rounds] == [
        r["epsilon"] for r in demo.report["rounds"]]
    assert prov.study.image_digest == training_hub.image[1]

    # The initial model, by index, checks too.
    first = _cli("training", "export", demo.study_id, "--out", tmp_path / "first", "--index",
                 "0", "--hub-key", key_file, token=fed.admin_token, hub=fed.url)
    assert first.returncode == 0, first.stderr

    # Someone with write access to the store replaces the final model's object.
    store = ObjectStore.from_file(objectstore.write_party_credentials(
        training_hub.store_settings, "hub"))
    original = store.get(final.location)
    store.put(final.location, original[:-1] + bytes([original[-1] ^ 1]))
    try:
        with fed.api(fed.admin_token) as api:
            refused = api.get(f"/api/training-studies/{demo.study_id}/model")
        assert refused.status_code == 502 and "refused" in refused.text
        again = _cli("training", "export", demo.study_id, "--out", tmp_path / "tampered",
                     "--hub-key", key_file, token=fed.admin_token, hub=fed.url)
        assert again.returncode == 1 and "refused" in again.stderr, again.stderr
        assert not (tmp_path / "tampered").exists()
        with fed.api(fed.admin_token) as api:
            audit = api.get("/api/audit", params={"action": "training.model_refused"}).json()
        assert audit, "the refusal is audited"
    finally:
        store.put(final.location, original)


def test_the_training_bundle_verifies_and_one_altered_byte_fails(
        training_hub: TrainingHub, tmp_path: Path) -> None:
    demo = training_hub.finished()
    fed = training_hub.federation
    with fed.api(fed.admin_token) as api:
        response = api.get(f"/api/training-studies/{demo.study_id}/bundle")
        assert response.status_code == 200, response.text
        keys = tmp_path / "keys"
        keys.mkdir()
        (keys / "hub.pub").write_text(api.get("/api/hub/key").text)
    archive = tmp_path / "bundle.zip"
    archive.write_bytes(response.content)
    done = _cli("bundle", "verify", archive, "--keys", keys, token="", hub=fed.url)
    assert done.returncode == 0 and "training study" in done.stdout, done.stdout + done.stderr
    folder = tmp_path / "bundle"
    zipfile.ZipFile(archive).extractall(folder)
    ledger = json.loads((folder / "epsilon-ledger.json").read_text())
    assert sorted(ledger) == sorted(SPOKES)
    assert all(len(v["charges"]) == ROUNDS for v in ledger.values())
    data = bytearray((folder / "training-study.json").read_bytes())
    data[len(data) // 3] ^= 0x01
    (folder / "training-study.json").write_bytes(bytes(data))
    failed = _cli("bundle", "verify", folder, "--keys", keys, token="", hub=fed.url)
    assert failed.returncode == 1 and "training-study.json" in failed.stdout, failed.stdout
