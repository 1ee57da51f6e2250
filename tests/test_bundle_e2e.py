"""The study bundle exported by the real hub verifies offline with the public keys alone,
and altering any byte of any file in it makes verification fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

from tributary.federation import LocalFederation, generate_cohort
from tributary.protocol.signing import SigningKey

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
        archive = root / "bundle.zip"
        archive.write_bytes(api.get(f"/api/experiments/{exp['id']}/bundle")
                            .raise_for_status().content)
        (keys / "hub.pub").write_text(api.get("/api/hub/key").text)
        for index, key in enumerate(api.get(f"/api/spokes/{spoke_id}/keys").json()):
            (keys / f"{spoke_id}@{index}.pub").write_text(key["public_key_pem"])
    folder = root / "folder"
    with zipfile.ZipFile(archive) as opened:
        opened.extractall(folder)
    return {"zip": archive, "folder": folder, "keys": keys, "root": root}


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
