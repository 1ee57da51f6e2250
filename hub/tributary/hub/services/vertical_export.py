"""A vertical study's bundle: the study (settings, parties' states, losses, the model as
the coordinator may see it) and every audit event about it, in an RO-Crate with the SHA-256
manifest signed by the hub like every other bundle. No ciphertext, mask or coefficient the
study did not release is in it: the hub never holds them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from tributary.hub.models import AuditEvent, PsiRun, VerticalStudy
from tributary.hub.services import access_grants, psi, vertical
from tributary.protocol.bundle import sign_manifest
from tributary.protocol.signing import SigningKey

STUDY = "vertical-study.json"
AUDIT = "audit-events.json"
LINKAGE = "linked-psi.json"
ACCESS = "access-request.json"


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"


def study_record(study: VerticalStudy) -> dict[str, Any]:
    return {**study.model_dump(mode="json", exclude={"answers", "final"}),
            "parties": {s: {k: v for k, v in p.items() if k in ("state", "reason", "rows",
                                                                 "features", "public_key")}
                        for s, p in study.parties.items()},
            "model": vertical.model(study)}


def events(session: Session, study_id: str) -> list[dict[str, Any]]:
    rows = session.exec(select(AuditEvent).where(AuditEvent.target == study_id)
                        .order_by(col(AuditEvent.id)))
    return [{"at": e.at, "actor": e.actor, "action": e.action, "detail": e.detail,
             "log_seq": e.log_seq, "log_hash": e.log_hash} for e in rows]


def write_vertical_bundle(out: Path, session: Session, study: VerticalStudy,
                          key: SigningKey) -> Path:
    """Write the bundle folder ``out`` (which must not exist) and sign its manifest."""
    out.mkdir(parents=True, exist_ok=False)
    (out / STUDY).write_text(_dump(study_record(study)))
    (out / AUDIT).write_text(_dump(events(session, study.id)))
    parts = [{"@id": STUDY, "@type": "File", "name": "Vertical study",
              "encodingFormat": "application/json"},
             {"@id": AUDIT, "@type": "File", "name": "The hub's audit events of the study",
              "encodingFormat": "application/json"}]
    linked = session.get(PsiRun, study.psi_id)
    if linked is not None:  # where its rows come from: the PSI, its approvals and relays
        (out / LINKAGE).write_text(_dump(psi.bundle_entries(session, linked)))
        parts.append({"@id": LINKAGE, "@type": "File", "encodingFormat": "application/json",
                      "name": "The private set intersection that linked the cohort"})
    access = access_grants.bundle_record(session, study.access_request_id)
    if access is not None:
        (out / ACCESS).write_text(_dump(access))
        parts.append({"@id": ACCESS, "@type": "File", "encodingFormat": "application/json",
                      "name": "The data access request, its decision and audit events"})
    crate = {"@context": "https://w3id.org/ro/crate/1.1/context", "@graph": [
        {"@id": "ro-crate-metadata.json", "@type": "CreativeWork", "about": {"@id": "./"},
         "conformsTo": [{"@id": "https://w3id.org/ro/crate/1.1"}]},
        {"@id": "./", "@type": "Dataset", "name": f"Tributary vertical study {study.id}",
         "description": study.name, "hasPart": [{"@id": p["@id"]} for p in parts]},
        *parts]}
    (out / "ro-crate-metadata.json").write_text(_dump(crate))
    sign_manifest(out, key)
    return out
