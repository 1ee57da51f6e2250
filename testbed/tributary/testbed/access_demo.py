"""The demo's data access request: the administrator (the demo's coordinator) files one
for the study, with an ethics approval and a DPIA, and a member of the data access
committee, an account of its own, approves it with conditions, so the study can be launched
on a hub that requires access requests (``TRIBUTARY_HUB_REQUIRE_ACCESS_REQUESTS``)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from tributary.testbed.federation import LocalFederation

#: The hub settings that make the demo's hub require access requests.
HUB_ENV = {"TRIBUTARY_HUB_REQUIRE_ACCESS_REQUESTS": "true"}


def placeholder_pdf(title: str) -> bytes:
    """A one-page PDF standing for a document the demo has no real copy of."""
    text = title.replace("\\", "").replace("(", "").replace(")", "")
    stream = f"BT /F1 14 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


def approved_request(federation: LocalFederation, api: httpx.Client, title: str,
                     spokes: list[str], attributes: list[str]) -> tuple[dict[str, Any],
                                                                         dict[str, str]]:
    """File the request as ``api``'s user and approve it as a new committee member; the
    approved request and the member's account."""
    member = {"username": "committee", "password": secrets.token_urlsafe(18)}
    api.post("/api/users", json={**member, "roles": ["committee"]}).raise_for_status()
    filed = api.post("/api/access-requests", data={
        "title": title, "purpose": "Demonstration: validate the lung nodule detector on "
        "every site's synthetic cohort.", "spokes": spokes, "attributes": attributes,
        "study_kinds": ["validation"], "k": "5"}, files={
        "ethics": ("ethics-approval.pdf", placeholder_pdf("Ethics approval (demo)"),
                   "application/pdf"),
        "dpia": ("dpia.pdf", placeholder_pdf("DPIA (demo)"), "application/pdf")})
    filed.raise_for_status()
    request = filed.json()
    token = federation.sign_in(member["username"], member["password"])
    with federation.api(token) as committee:
        decided = committee.post(f"/api/access-requests/{request['id']}/decision", json={
            "decision": "approve", "reason": "demo: synthetic data, documents in order",
            "expires_at": (datetime.now(UTC) + timedelta(days=30)).isoformat()})
        decided.raise_for_status()
    return decided.json(), member
