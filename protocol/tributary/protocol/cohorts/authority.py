"""A federation authority's folder: its key, its DID document, the credentials it issued
and its revocation status list. Used by ``tributary federation`` and the testbed.

Layout (``authority.json`` is the one state file, rewritten atomically)::

    authority.key (+ .pub)   Ed25519 PKCS#8, owner-only (tributary.protocol.signing)
    did.json                 the did:web DID document to publish, and to give to hubs
    authority.json           AuthorityState: DID, status list URL, every issued credential
    status-list.jwt          the signed status list, republished on every revocation
    credentials/<id>.jwt     each issued credential
"""

from __future__ import annotations

import json
import os
import secrets
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from joserfc.jwk import OKPKey
from pydantic import BaseModel, Field

from tributary.protocol.cohorts.credentials import (
    STATUS_LIST_BITS,
    DidDocument,
    MembershipSubject,
    StatusEntry,
    did_document,
    issue_membership,
    issue_status_list,
)
from tributary.protocol.signing import SigningKey

KEY_FILE = "authority.key"
DID_FILE = "did.json"
STATE_FILE = "authority.json"
STATUS_FILE = "status-list.jwt"


class IssuedCredential(BaseModel):
    id: str
    spoke_id: str
    subject: str
    keyids: list[str]
    status_index: int
    valid_until: datetime
    revoked_at: datetime | None = None
    revoked_reason: str | None = None


class AuthorityState(BaseModel):
    did: str
    federation: str
    status_list_url: str
    issued: list[IssuedCredential] = Field(default_factory=list)


class Authority:
    """One authority folder. Not safe for concurrent writers: one operator runs it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.state = AuthorityState.model_validate_json((folder / STATE_FILE).read_text())
        self.key = OKPKey.import_key((folder / KEY_FILE).read_bytes())
        self.kid = f"{self.state.did}#{self.key.thumbprint()}"

    @classmethod
    def init(cls, folder: Path, did: str, federation: str,
             status_list_url: str) -> Authority:
        """Create the key, the DID document, an empty state and an empty status list."""
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / STATE_FILE).exists():
            raise FileExistsError(f"{folder} already holds an authority")
        SigningKey.generate().save(folder / KEY_FILE)
        key = OKPKey.import_key((folder / KEY_FILE).read_bytes())
        document = did_document(did, [key])  # validates the DID
        StatusEntry(id=f"{status_list_url}#0", statusListIndex="0",
                    statusListCredential=status_list_url)  # validates the URL
        _write(folder / DID_FILE, document.model_dump_json(by_alias=True, indent=2))
        _write(folder / STATE_FILE, AuthorityState(
            did=did, federation=federation, status_list_url=status_list_url
        ).model_dump_json(indent=2))
        authority = cls(folder)
        authority.publish()
        return authority

    @property
    def document(self) -> DidDocument:
        return DidDocument.model_validate_json((self.folder / DID_FILE).read_text())

    def issue(self, spoke_id: str, subject: str, keyids: list[str],
              valid_for: timedelta, valid_from: datetime | None = None) -> tuple[str, Path]:
        """Sign a membership credential for a spoke; returns it and the file it is in."""
        used = {c.status_index for c in self.state.issued}
        index = secrets.randbelow(STATUS_LIST_BITS)
        while index in used:  # a random unused bit: the index says nothing about order
            index = secrets.randbelow(STATUS_LIST_BITS)
        start = valid_from or datetime.now(UTC)
        credential_id = f"urn:uuid:{uuid.uuid4()}"
        token = issue_membership(
            self.key, self.kid, self.state.did, credential_id,
            MembershipSubject(id=subject, spokeId=spoke_id, federation=self.state.federation,
                              keyids=keyids),
            StatusEntry(id=f"{self.state.status_list_url}#{index}",
                        statusListIndex=str(index),
                        statusListCredential=self.state.status_list_url),
            start, start + valid_for)
        self.state.issued.append(IssuedCredential(
            id=credential_id, spoke_id=spoke_id, subject=subject, keyids=keyids,
            status_index=index, valid_until=start + valid_for))
        self._save()
        path = self.folder / "credentials" / f"{credential_id.removeprefix('urn:uuid:')}.jwt"
        path.parent.mkdir(exist_ok=True)
        _write(path, token)
        return token, path

    def revoke(self, credential_id: str, reason: str) -> IssuedCredential:
        """Set the credential's bit and republish the status list."""
        for issued in self.state.issued:
            if issued.id == credential_id:
                if issued.revoked_at is None:
                    issued.revoked_at = datetime.now(UTC)
                    issued.revoked_reason = reason
                    self._save()
                self.publish()
                return issued
        raise LookupError(f"this authority issued no credential {credential_id}")

    def publish(self, valid_for: timedelta = timedelta(days=7)) -> Path:
        """Sign the current status list into ``status-list.jwt`` (for the hubs to read)."""
        bits = bytearray(STATUS_LIST_BITS // 8)
        for issued in self.state.issued:
            if issued.revoked_at is not None:
                bits[issued.status_index // 8] |= 0x80 >> (issued.status_index % 8)
        now = datetime.now(UTC)
        token = issue_status_list(self.key, self.kid, self.state.did,
                                  self.state.status_list_url, bytes(bits), now,
                                  now + valid_for)
        path = self.folder / STATUS_FILE
        _write(path, token)
        return path

    def _save(self) -> None:
        _write(self.folder / STATE_FILE, self.state.model_dump_json(indent=2))


def _write(path: Path, text: str) -> None:
    """Replace ``path`` atomically: a hub reading the status list never sees half of one."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    temporary.write_text(text)
    os.replace(temporary, path)


def load_did_document(path: Path) -> DidDocument:
    return DidDocument.model_validate(json.loads(path.read_text()))
