"""The study bundle: an experiment's results with their spoke-signed custody records, in
an RO-Crate (``ro-crate-metadata.json``) with a SHA-256 manifest signed by the hub, so a
third party can verify it offline with the public keys alone:

    tributary bundle verify BUNDLE_DIR --keys KEYS_DIR

``KEYS_DIR`` holds ``hub.pub`` and one ``<spoke_id>.pub`` per spoke (PEM), obtained from
the hub and the institutions independently of the bundle."""

from __future__ import annotations

import hashlib
import itertools
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tributary.protocol.custody import record_hash, verify_custody
from tributary.protocol.messages import CaseStatus, Failure, ResultMessage
from tributary.protocol.signing import PublicKey, SignatureError, SigningKey, verify

MANIFEST = "manifest-sha256.txt"
MANIFEST_SIGNATURE = "manifest.dsse.json"
MANIFEST_PAYLOAD_TYPE = "text/plain; profile=tributary-bundle-manifest"


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def write_bundle(out: Path, experiment: dict[str, Any], cases: list[dict[str, Any]],
                 hub_key: SigningKey) -> Path:
    """Write the bundle folder ``out`` for an experiment's final cases."""
    out.mkdir(parents=True, exist_ok=False)
    _write_json(out / "experiment.json", experiment)
    parts = [{"@id": "experiment.json", "@type": "File", "name": "Experiment definition"}]
    for case in cases:
        if not case.get("custody"):
            continue
        stem = f"results/{case['spoke_id']}/{case['case_id']}"
        _write_json(out / f"{stem}.json", {k: case[k] for k in (
            "experiment_id", "spoke_id", "case_id", "attempt", "state", "output", "failure",
            "released", "image_digest", "started_at", "finished_at")})
        _write_json(out / f"{stem}.custody.dsse.json", case["custody"])
        parts += [{"@id": f"{stem}.json", "@type": "File", "name": f"Result {case['case_id']}"},
                  {"@id": f"{stem}.custody.dsse.json", "@type": "File",
                   "encodingFormat": "application/vnd.dsse.envelope.v1+json",
                   "name": f"Custody record {case['case_id']}"}]
    _write_json(out / "ro-crate-metadata.json", {
        "@context": "https://w3id.org/ro/crate/1.1/context",
        "@graph": [
            {"@id": "ro-crate-metadata.json", "@type": "CreativeWork",
             "about": {"@id": "./"},
             "conformsTo": [{"@id": "https://w3id.org/ro/crate/1.1"},
                            {"@id": "https://w3id.org/5s-crate/0.4"}]},
            {"@id": "./", "@type": "Dataset", "name": f"Tributary study {experiment['id']}",
             "description": experiment.get("name", ""), "hasPart": [
                 {"@id": p["@id"]} for p in parts]},
            *parts,
        ]})
    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  "
                       f"{p.relative_to(out).as_posix()}\n" for p in files)
    (out / MANIFEST).write_text(manifest)
    _write_json(out / MANIFEST_SIGNATURE, hub_key.sign(manifest.encode(), MANIFEST_PAYLOAD_TYPE))
    return out


def zip_bundle(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(folder).as_posix())
    return target


@dataclass
class BundleReport:
    problems: list[str] = field(default_factory=list)
    results: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and self.results > 0


def _keys(keys_dir: Path) -> tuple[list[PublicKey], dict[str, list[PublicKey]]]:
    hub = [PublicKey.load(keys_dir / "hub.pub")]
    spokes: dict[str, list[PublicKey]] = {}
    for path in sorted(keys_dir.glob("*.pub")):
        if path.name != "hub.pub":
            spokes.setdefault(path.stem.split("@")[0], []).append(PublicKey.load(path))
    return hub, spokes


def verify_bundle(folder: Path, keys_dir: Path) -> BundleReport:
    """Check the manifest signature, every file's digest, and every custody record."""
    report = BundleReport()
    hub_keys, spoke_keys = _keys(keys_dir)
    try:
        envelope = json.loads((folder / MANIFEST_SIGNATURE).read_text())
        manifest = verify(envelope, hub_keys, MANIFEST_PAYLOAD_TYPE).decode()
    except (OSError, ValueError, SignatureError) as exc:
        report.problems.append(f"manifest signature: {exc}")
        return report
    if (folder / MANIFEST).read_text() != manifest:
        report.problems.append("manifest-sha256.txt differs from the signed manifest")
    listed: dict[str, str] = {}
    for line in manifest.splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    for extra in sorted(present - set(listed) - {MANIFEST, MANIFEST_SIGNATURE}):
        report.problems.append(f"{extra}: not in the signed manifest")
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            report.problems.append(f"{name}: missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            report.problems.append(f"{name}: content differs from the signed manifest")
    chains: dict[str, list[tuple[int, str, str]]] = {}
    for name in sorted(n for n in listed if n.endswith(".custody.dsse.json")):
        result_name = name.replace(".custody.dsse.json", ".json")
        try:
            envelope = json.loads((folder / name).read_text())
            data = json.loads((folder / result_name).read_text())
            result = ResultMessage(
                experiment_id=data["experiment_id"], spoke_id=data["spoke_id"],
                case_id=data["case_id"], attempt=data["attempt"],
                status=CaseStatus(data["state"]), output=data["output"],
                failure=Failure.model_validate(data["failure"]) if data["failure"] else None,
                released=data["released"], image_digest=data["image_digest"])
            record = verify_custody(envelope, spoke_keys.get(result.spoke_id, []), result)
        except (OSError, ValueError, KeyError, SignatureError) as exc:
            report.problems.append(f"{name}: {exc}")
            continue
        report.results += 1
        chains.setdefault(result.spoke_id, []).append(
            (record.sequence, record.previous_record_sha256, record_hash(envelope)))
    for spoke, records in chains.items():
        records.sort()
        for (seq_a, _, hash_a), (seq_b, prev_b, _) in itertools.pairwise(records):
            if seq_b == seq_a + 1 and prev_b != hash_a:
                report.problems.append(f"{spoke}: custody chain broken between records "
                                       f"{seq_a} and {seq_b}")
            if seq_b == seq_a:
                report.problems.append(f"{spoke}: two records with sequence {seq_a}")
    return report
