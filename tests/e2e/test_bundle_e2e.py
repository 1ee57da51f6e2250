"""The study bundle exported by the real hub verifies offline with the public keys alone,
and altering any byte of any file in it makes verification fail; a bundle that the hub's
own key signed over a wrong content (another experiment's result, a result without its
custody record, a dropped case, a result of another image) is refused too."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

from tributary.protocol.auditlog import AuditLog
from tributary.protocol.bundle import MANIFEST, MANIFEST_PAYLOAD_TYPE, MANIFEST_SIGNATURE
from tributary.protocol.signing import SigningKey
from tributary.testbed.federation import LocalFederation, generate_cohort

pytestmark = pytest.mark.e2e


def verify(bundle: Path, keys: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tributary.cli", "bundle", "verify",
                           str(bundle), "--keys", str(keys)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def exported(federation: LocalFederation, misbehaving_image: tuple[str, str],
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    spoke_id = f"bundle-{uuid.uuid4().hex[:6]}"
    data = federation.root / "data" / spoke_id
    generate_cohort(data, 3, seed=21, site="Bundle Hospital")
    federation.start_spoke(spoke_id, federation.add_spoke(spoke_id, data))
    algorithm = federation.register_algorithm(
        name=f"bundle-{spoke_id}", version="1", repository=misbehaving_image[0],
        digest=misbehaving_image[1])
    root = tmp_path_factory.mktemp("bundle")
    keys = root / "keys"
    keys.mkdir()
    with federation.api() as api:
        exp = api.post("/api/experiments", json={
            "name": "bundle", "algorithm_id": algorithm["id"], "spoke_ids": [spoke_id],
            "arguments": {"behaviour": "ok"}}).raise_for_status().json()
        api.post(f"/api/experiments/{exp['id']}/launch").raise_for_status()
        federation.wait_for_experiment(exp["id"], timeout=120)
        # A second, one-case study on the same spoke: its result is the "other experiment's
        # result" a forged bundle splices in.
        other = api.post("/api/experiments", json={
            "name": "bundle-other", "algorithm_id": algorithm["id"], "spoke_ids": [spoke_id],
            "cohort": {"max_cases": 1},
            "arguments": {"behaviour": "ok"}}).raise_for_status().json()
        api.post(f"/api/experiments/{other['id']}/launch").raise_for_status()
        federation.wait_for_experiment(other["id"], timeout=120)
        archive = root / "bundle.zip"
        archive.write_bytes(api.get(f"/api/experiments/{exp['id']}/bundle")
                            .raise_for_status().content)
        other_archive = root / "other.zip"
        other_archive.write_bytes(api.get(f"/api/experiments/{other['id']}/bundle")
                                  .raise_for_status().content)
        (keys / "hub.pub").write_text(api.get("/api/hub/key").text)
        for index, key in enumerate(api.get(f"/api/spokes/{spoke_id}/keys").json()):
            (keys / f"{spoke_id}@{index}.pub").write_text(key["public_key_pem"])
    folder = root / "folder"
    with zipfile.ZipFile(archive) as opened:
        opened.extractall(folder)
    with zipfile.ZipFile(other_archive) as opened:
        opened.extractall(root / "other")
    return {"zip": archive, "folder": folder, "keys": keys, "root": root,
            "other": root / "other", "hub_key": federation.hub_key_path,
            "hub_log": federation.hub_audit_log,
            "spoke_log": federation.root / "spokes" / spoke_id / "audit.jsonl",
            "spoke_id": Path(spoke_id)}


def test_bundle_verifies_offline(exported: dict[str, Path]) -> None:
    for bundle in (exported["zip"], exported["folder"]):
        done = verify(bundle, exported["keys"])
        assert done.returncode == 0, done.stdout + done.stderr
        assert "3 results" in done.stdout
    crate = (exported["folder"] / "ro-crate-metadata.json").read_text()
    assert "https://w3id.org/ro/crate/1.1" in crate


def test_any_altered_byte_fails(exported: dict[str, Path]) -> None:
    files = sorted(p for p in exported["folder"].rglob("*") if p.is_file())
    assert len(files) >= 9
    for target in files:
        copy = exported["root"] / f"altered-{uuid.uuid4().hex[:6]}"
        shutil.copytree(exported["folder"], copy)
        path = copy / target.relative_to(exported["folder"])
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        done = verify(copy, exported["keys"])
        assert done.returncode == 1, f"altering {target.name} went unnoticed"
        assert "FAIL" in done.stdout


def test_altered_zip_or_wrong_keys_fail(exported: dict[str, Path]) -> None:
    data = bytearray(exported["zip"].read_bytes())
    data[len(data) // 3] ^= 0xFF
    broken = exported["root"] / "broken.zip"
    broken.write_bytes(bytes(data))
    assert verify(broken, exported["keys"]).returncode == 1
    stranger = exported["root"] / "stranger-keys"
    shutil.copytree(exported["keys"], stranger)
    for pub in stranger.glob("bundle-*.pub"):
        pub.write_text(SigningKey.generate().public.pem)
    done = verify(exported["folder"], stranger)
    assert done.returncode == 1 and "custody" in done.stdout


def forge(exported: dict[str, Path]) -> Path:
    """A copy of the bundle to edit and then re-sign with the hub's own key: what a buggy
    or dishonest export could produce, which the manifest signature alone cannot refuse."""
    copy = exported["root"] / f"forged-{uuid.uuid4().hex[:6]}"
    shutil.copytree(exported["folder"], copy)
    return copy


def resign(folder: Path, hub_key: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and p.name not in (MANIFEST, MANIFEST_SIGNATURE))
    manifest = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  "
                       f"{p.relative_to(folder).as_posix()}\n" for p in files)
    (folder / MANIFEST).write_text(manifest)
    envelope = SigningKey.load(hub_key).sign(manifest.encode(), MANIFEST_PAYLOAD_TYPE)
    (folder / MANIFEST_SIGNATURE).write_text(json.dumps(envelope))


def said(done: subprocess.CompletedProcess[str]) -> str:
    """The verifier's output with the terminal's line wrapping undone."""
    return " ".join(done.stdout.split())


def results(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "results").rglob("*.json")
                  if not p.name.endswith(".custody.dsse.json"))


def test_resigned_copy_still_verifies(exported: dict[str, Path]) -> None:
    """The forgeries below differ from the real bundle only in what they change."""
    copy = forge(exported)
    resign(copy, exported["hub_key"])
    done = verify(copy, exported["keys"])
    assert done.returncode == 0, done.stdout + done.stderr


def test_another_experiments_result_is_refused(exported: dict[str, Path]) -> None:
    copy = forge(exported)
    (spliced,) = results(exported["other"])
    # a case of this study's spoke in its place (the same patient has another released id
    # in every study, so the other study's file name names no case here)
    target = next(p for p in results(copy) if p.parent.name == spliced.parent.name)
    shutil.copy(spliced, target)
    custody = spliced.with_name(spliced.stem + ".custody.dsse.json")
    shutil.copy(custody, target.with_name(target.stem + ".custody.dsse.json"))
    resign(copy, exported["hub_key"])
    done = verify(copy, exported["keys"])
    assert done.returncode == 1, done.stdout
    other_id = json.loads((exported["other"] / "experiment.json").read_text())["id"]
    assert f"belongs to experiment {other_id}" in said(done)


def test_result_without_custody_record_is_refused(exported: dict[str, Path]) -> None:
    copy = forge(exported)
    result = results(copy)[1]
    result.with_name(result.stem + ".custody.dsse.json").unlink()
    resign(copy, exported["hub_key"])
    done = verify(copy, exported["keys"])
    assert done.returncode == 1, done.stdout
    assert f"{result.relative_to(copy).as_posix()}: no custody record" in said(done)


def test_dropped_case_is_refused(exported: dict[str, Path]) -> None:
    copy = forge(exported)
    result = results(copy)[1]
    result.unlink()
    result.with_name(result.stem + ".custody.dsse.json").unlink()
    resign(copy, exported["hub_key"])
    done = verify(copy, exported["keys"])
    assert done.returncode == 1, done.stdout
    assert f"case {result.stem}: result missing" in said(done)


def test_result_of_another_image_is_refused(exported: dict[str, Path]) -> None:
    copy = forge(exported)
    path = copy / "experiment.json"
    experiment = json.loads(path.read_text())
    other_digest = "sha256:" + "ab" * 32
    experiment["image"] = experiment["image"].split("@")[0] + "@" + other_digest
    path.write_text(json.dumps(experiment))
    resign(copy, exported["hub_key"])
    done = verify(copy, exported["keys"])
    assert done.returncode == 1, done.stdout
    assert f"not the approved image {other_digest}" in said(done)


# -- audit log anchors: a cut or a recreated log no longer verifies -------------------------

def audit_verify(log: Path, *anchors: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tributary.cli", "audit", "verify", str(log),
                           *anchors], capture_output=True, text=True)


def cut(log: Path, below: int, target: Path) -> Path:
    """A copy of ``log`` without its entries from ``below`` on: a cut at a line boundary."""
    lines = log.read_bytes().splitlines(keepends=True)[:below - 1]
    target.write_bytes(b"".join(lines))
    return target


def recreated(target: Path) -> Path:
    """A log deleted and started again at seq 1."""
    log = AuditLog(target)
    log.append("someone", "log.recreated")
    log.append("someone", "something.else")
    return target


def test_hub_log_cut_or_recreated_fails_against_the_bundle(exported: dict[str, Path]) -> None:
    anchors = json.loads((exported["folder"] / "audit-anchors.json").read_text())
    head = anchors["hub"]["seq"]
    assert head >= 3
    done = audit_verify(exported["hub_log"], "--anchors", str(exported["zip"]))
    assert done.returncode == 0, done.stdout + done.stderr
    root = exported["root"]
    for log in (cut(exported["hub_log"], head, root / "hub-cut.jsonl"),
                recreated(root / "hub-new.jsonl")):
        assert audit_verify(log).returncode == 0  # the chain alone cannot tell
        for source in (exported["folder"], exported["zip"]):
            done = audit_verify(log, "--anchors", str(source))
            assert done.returncode == 1, done.stdout + done.stderr
            assert f"anchored head seq {head}" in " ".join(done.stdout.split())


def test_spoke_log_cut_or_recreated_fails_against_the_hub(
        federation: LocalFederation, exported: dict[str, Path]) -> None:
    spoke_id = str(exported["spoke_id"])
    with federation.api() as api:
        anchors = api.get("/api/audit/anchors").raise_for_status().json()
    head = anchors["spokes"][spoke_id]["seq"]
    assert head >= 1
    saved = exported["root"] / "anchors.json"
    saved.write_text(json.dumps(anchors))
    real = audit_verify(exported["spoke_log"], "--anchors", str(saved), "--source", spoke_id)
    assert real.returncode == 0, real.stdout + real.stderr
    root = exported["root"]
    for log in (cut(exported["spoke_log"], head, root / "spoke-cut.jsonl"),
                recreated(root / "spoke-new.jsonl")):
        assert audit_verify(log).returncode == 0  # the chain alone cannot tell
        done = audit_verify(log, "--anchors", str(saved), "--source", spoke_id)
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"anchored head seq {head}" in " ".join(done.stdout.split())


def test_a_manifest_naming_a_file_outside_the_bundle_is_refused(
        exported: dict[str, Path]) -> None:
    copy = forge(exported)
    outside = copy.parent / f"outside-{uuid.uuid4().hex[:6]}.json"
    outside.write_text("{}")
    resign(copy, exported["hub_key"])
    manifest = (copy / MANIFEST).read_text() + (
        f"{hashlib.sha256(b'{}').hexdigest()}  ../{outside.name}\n")
    (copy / MANIFEST).write_text(manifest)
    envelope = SigningKey.load(exported["hub_key"]).sign(manifest.encode(),
                                                         MANIFEST_PAYLOAD_TYPE)
    (copy / MANIFEST_SIGNATURE).write_text(json.dumps(envelope))
    done = verify(copy, exported["keys"])
    assert done.returncode == 1, done.stdout
    assert f"../{outside.name}: not a path inside the bundle" in said(done)
