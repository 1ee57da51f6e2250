"""The study bundle: an experiment's results with their spoke-signed custody records, in
an RO-Crate (``ro-crate-metadata.json``) with a SHA-256 manifest signed by the hub, so a
third party can verify it offline with the public keys alone:

    tributary bundle verify BUNDLE_DIR --keys KEYS_DIR

``KEYS_DIR`` holds ``hub.pub`` and one ``<spoke_id>.pub`` per spoke (PEM), obtained from
the hub and the institutions independently of the bundle.

The signature alone would only show that the hub wrote the bundle; verification also checks
that its content is the study's: every result belongs to the experiment in
``experiment.json`` and ran its approved image, every result has its custody record, and
every case that ``experiment.json`` lists as finished (``expected_results``) is there."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from tributary.protocol.auditlog import AuditAnchors
from tributary.protocol.custody import record_hash, verify_custody
from tributary.protocol.messages import CaseStatus, Failure, ResultMessage
from tributary.protocol.signing import PublicKey, SignatureError, SigningKey, verify

MANIFEST = "manifest-sha256.txt"
MANIFEST_SIGNATURE = "manifest.dsse.json"
MANIFEST_PAYLOAD_TYPE = "text/plain; profile=tributary-bundle-manifest"
#: The hub's and the study's spokes' audit log heads at export (:class:`AuditAnchors`).
ANCHORS = "audit-anchors.json"
#: Far more than the heads of thousands of spokes; a bigger file is refused unread.
MAX_ANCHORS_BYTES = 4 * 1024 * 1024
#: The file that makes a bundle a training study's (:mod:`tributary.protocol.training.bundle`).
TRAINING_STUDY = "training-study.json"


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


class BundleExperiment(BaseModel):
    """What ``experiment.json`` must hold for the results to be checked against it (the
    experiment's other fields are carried as they are)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str
    #: ``repository@sha256:...``: the approved image every result must have run.
    image: str
    #: Per spoke, the cases with a final, custody-signed result: each must be in the bundle.
    expected_results: dict[str, list[str]]
    #: Per spoke, the cases without such a result yet (case id: state), named for the reader.
    cases_without_result: dict[str, dict[str, str]] = {}

    @property
    def image_digest(self) -> str:
        return self.image.rpartition("@")[2]


def write_bundle(out: Path, experiment: dict[str, Any], cases: Iterable[dict[str, Any]],
                 hub_key: SigningKey, anchors: AuditAnchors | None = None) -> Path:
    """Write the bundle folder ``out`` for an experiment's cases: those with a custody
    record as results, the others named in ``experiment.json``; with ``anchors``, the audit
    log heads the hub holds, as ``audit-anchors.json``. ``cases`` may be a stream: each case
    is written as it comes and only case ids are kept, so memory stays flat however many
    results a study has."""
    out.mkdir(parents=True, exist_ok=False)
    if anchors is not None:
        _write_json(out / ANCHORS, anchors.model_dump(mode="json"))
    expected: dict[str, list[str]] = {}
    without: dict[str, dict[str, str]] = {}
    for case in cases:
        if not case.get("custody"):
            without.setdefault(case["spoke_id"], {})[case["case_id"]] = str(case["state"])
            continue
        expected.setdefault(case["spoke_id"], []).append(case["case_id"])
        stem = f"results/{case['spoke_id']}/{case['case_id']}"
        _write_json(out / f"{stem}.json", {k: case[k] for k in (
            "experiment_id", "spoke_id", "case_id", "attempt", "state", "output", "failure",
            "released", "image_digest", "started_at", "finished_at")})
        _write_json(out / f"{stem}.custody.dsse.json", case["custody"])
    expected = {spoke: sorted(ids) for spoke, ids in sorted(expected.items())}
    without = {spoke: dict(sorted(ids.items())) for spoke, ids in sorted(without.items())}
    _write_json(out / "experiment.json", {**experiment, "expected_results": expected,
                                          "cases_without_result": without})
    parts = [{"@id": "experiment.json", "@type": "File", "name": "Experiment definition"}]
    if anchors is not None:
        parts.append({"@id": ANCHORS, "@type": "File", "name": "Audit log anchors"})
    _write_crate(out, experiment, parts, expected)
    sign_manifest(out, hub_key)
    return out


def _result_parts(expected: dict[str, list[str]]) -> Iterator[dict[str, Any]]:
    for spoke, ids in expected.items():
        for case_id in ids:
            stem = f"results/{spoke}/{case_id}"
            yield {"@id": f"{stem}.json", "@type": "File", "name": f"Result {case_id}"}
            yield {"@id": f"{stem}.custody.dsse.json", "@type": "File",
                   "encodingFormat": "application/vnd.dsse.envelope.v1+json",
                   "name": f"Custody record {case_id}"}


def _write_crate(out: Path, experiment: dict[str, Any], parts: list[dict[str, Any]],
                 expected: dict[str, list[str]]) -> None:
    """``ro-crate-metadata.json``, written part by part (two parts per result)."""
    def dump(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=str)

    with (out / "ro-crate-metadata.json").open("w") as crate:
        crate.write('{"@context": "https://w3id.org/ro/crate/1.1/context", "@graph": [')
        crate.write(dump({"@id": "ro-crate-metadata.json", "@type": "CreativeWork",
                          "about": {"@id": "./"},
                          "conformsTo": [{"@id": "https://w3id.org/ro/crate/1.1"},
                                         {"@id": "https://w3id.org/5s-crate/0.4"}]}))
        crate.write(',\n{"@id": "./", "@type": "Dataset", "name": ')
        crate.write(dump(f"Tributary study {experiment['id']}"))
        crate.write(', "description": ' + dump(experiment.get("name", "")) + ', "hasPart": [')
        every = itertools.chain(parts, _result_parts(expected))
        crate.write(", ".join(dump({"@id": p["@id"]}) for p in every))
        crate.write("]}")
        for part in itertools.chain(parts, _result_parts(expected)):
            crate.write(",\n" + dump(part))
        crate.write("]}\n")


def sign_manifest(folder: Path, hub_key: SigningKey) -> None:
    """(Re)write the SHA-256 manifest of every file in ``folder`` and the hub's signature."""
    names = sorted(  # relative names as strings: a bundle may hold 60,000 files
        PurePosixPath(Path(root).relative_to(folder).as_posix(), name).as_posix()
        for root, _, files in os.walk(folder) for name in files
        if Path(root) != folder or name not in (MANIFEST, MANIFEST_SIGNATURE))
    manifest = "".join(f"{hashlib.sha256((folder / name).read_bytes()).hexdigest()}  "
                       f"{name}\n" for name in names)
    (folder / MANIFEST).write_text(manifest)
    _write_json(folder / MANIFEST_SIGNATURE,
                hub_key.sign(manifest.encode(), MANIFEST_PAYLOAD_TYPE))


def zip_bundle(folder: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, path.relative_to(folder).as_posix())
    return target


@dataclass
class BundleReport:
    problems: list[str] = field(default_factory=list)
    #: Not problems, but worth reading: cases the bundle says have no result yet.
    notes: list[str] = field(default_factory=list)
    results: int = 0
    #: Round attempts of a training study's bundle checked.
    training_rounds: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and (self.results > 0 or self.training_rounds > 0)


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
        parts = PurePosixPath(name).parts
        if not parts or name.startswith("/") or ".." in parts or "\\" in name:
            # Never read outside the bundle, whoever signed the manifest.
            report.problems.append(f"{name}: not a path inside the bundle")
            continue
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
    if TRAINING_STUDY in listed:  # a training study's bundle: no per-case results
        from tributary.protocol.training.bundle import check_training_bundle  # training extra

        report.training_rounds, found = check_training_bundle(folder, hub_keys[0])
        report.problems += found
        return report
    try:
        experiment = BundleExperiment.model_validate_json((folder / "experiment.json").read_bytes())
    except (OSError, ValidationError) as exc:
        report.problems.append(f"experiment.json: unusable, so no result can be checked "
                               f"against it: {exc}")
        return report
    if ANCHORS in listed:
        try:
            AuditAnchors.model_validate_json((folder / ANCHORS).read_bytes())
        except (OSError, ValidationError) as exc:
            report.problems.append(f"{ANCHORS}: unusable: {exc}")
    _check_results(folder, listed, experiment, spoke_keys, report)
    return report


def read_anchors(source: Path) -> AuditAnchors:
    """The anchors in a bundle (folder or zip) or in a saved ``GET /api/audit/anchors``
    answer. Raises ValueError (or OSError) naming what is wrong. A bundle's anchors are as
    trustworthy as its signature: verify the bundle too."""
    if source.is_dir():
        source = source / ANCHORS
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            try:
                size = archive.getinfo(ANCHORS).file_size
            except KeyError:
                raise ValueError(f"{source}: a bundle without {ANCHORS}") from None
            if size > MAX_ANCHORS_BYTES:
                raise ValueError(f"{source}: {ANCHORS} is {size} bytes, more than anchors are")
            data = archive.read(ANCHORS)
    else:
        with source.open("rb") as handle:
            data = handle.read(MAX_ANCHORS_BYTES + 1)
        if len(data) > MAX_ANCHORS_BYTES:
            raise ValueError(f"{source}: more than {MAX_ANCHORS_BYTES} bytes, not anchors")
    return AuditAnchors.model_validate_json(data)


def _check_results(folder: Path, listed: dict[str, str], experiment: BundleExperiment,
                   spoke_keys: dict[str, list[PublicKey]], report: BundleReport) -> None:
    """Each listed result against its custody record and the experiment; the custody
    chains; the expected cases present."""
    chains: dict[str, list[tuple[int, str, str]]] = {}
    found: set[tuple[str, str]] = set()
    for name in sorted(n for n in listed if n.startswith("results/") and n.endswith(".json")
                       and not n.endswith(".custody.dsse.json")):
        custody_name = name.removesuffix(".json") + ".custody.dsse.json"
        if custody_name not in listed:
            report.problems.append(f"{name}: no custody record ({custody_name} missing)")
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
        except (OSError, ValueError, KeyError, TypeError, SignatureError) as exc:
            report.problems.append(f"{name}: {exc}")
            continue
        wrong = _misplaced(result_name, result, experiment)
        if wrong:
            report.problems.append(f"{result_name}: {wrong}")
            continue
        report.results += 1
        found.add((result.spoke_id, result.case_id))
        chains.setdefault(result.spoke_id, []).append(
            (record.sequence, record.previous_record_sha256, record_hash(envelope)))
    for spoke, cases in sorted(experiment.expected_results.items()):
        for case in cases:
            if (spoke, case) not in found:
                report.problems.append(f"{spoke}: case {case}: result missing (listed in "
                                       "experiment.json's expected_results)")
    for spoke, case in sorted(found):
        if case not in experiment.expected_results.get(spoke, []):
            report.problems.append(f"{spoke}: case {case}: a result that experiment.json "
                                   "does not list")
    for spoke, states in sorted(experiment.cases_without_result.items()):
        report.notes.append(f"{spoke}: {len(states)} case(s) without a result yet: "
                            + ", ".join(f"{c} ({s})" for c, s in sorted(states.items())))
    for spoke, records in chains.items():
        records.sort()
        for (seq_a, _, hash_a), (seq_b, prev_b, _) in itertools.pairwise(records):
            if seq_b == seq_a + 1 and prev_b != hash_a:
                report.problems.append(f"{spoke}: custody chain broken between records "
                                       f"{seq_a} and {seq_b}")
            if seq_b == seq_a:
                report.problems.append(f"{spoke}: two records with sequence {seq_a}")


def _misplaced(name: str, result: ResultMessage, experiment: BundleExperiment) -> str | None:
    """Why a custody-verified result does not belong in this bundle, or None."""
    if result.experiment_id != experiment.id:
        return f"belongs to experiment {result.experiment_id}, not {experiment.id}"
    if name != f"results/{result.spoke_id}/{result.case_id}.json":
        return f"holds spoke {result.spoke_id} case {result.case_id}: not this file's case"
    if result.image_digest is None and result.status == CaseStatus.SUCCEEDED:
        return "a success with no image digest"
    if result.image_digest is not None and result.image_digest != experiment.image_digest:
        return (f"ran image {result.image_digest}, not the approved image "
                f"{experiment.image_digest}")
    return None
