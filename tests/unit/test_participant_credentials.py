"""Participant credentials without services: what a federation authority signs, and every
way a credential or status list is refused (algorithm confusion, a foreign or injected key,
a wrong type, a tampered payload, the clock, another spoke's or key's credential, a
revocation, a status list that is missing, forged, too short or a gzip bomb)."""

from __future__ import annotations

import base64
import gzip
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey, OKPKey

from tributary.protocol.cohorts import credentials as vc
from tributary.protocol.cohorts.authority import STATUS_FILE, Authority
from tributary.protocol.signing import SigningKey

NOW = datetime.now(UTC)
URL = "https://authority.example.org/status/1"


@pytest.fixture(autouse=True)
def _now() -> None:
    """Each test's "now", taken when it starts: a module's tests may run minutes after its
    import (test workers), and credentials are issued at the real time."""
    global NOW
    NOW = datetime.now(UTC)


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority.init(tmp_path / "authority", "did:web:authority.example.org",
                          "tributary", URL)


def trusted(authority: Authority) -> dict[str, vc.DidDocument]:
    return {authority.state.did: authority.document}


def status_lists(authority: Authority) -> list[vc.StatusListCredential]:
    token = (authority.folder / STATUS_FILE).read_text()
    return [vc.verify_status_list(token, trusted(authority), NOW)]


def issue(authority: Authority, spoke: str = "north", keyids: list[str] | None = None,
          **kwargs: object) -> tuple[str, list[str]]:
    keyids = keyids or [SigningKey.generate().keyid]
    token, _ = authority.issue(spoke, f"did:web:{spoke}.example.org", keyids,
                               kwargs.pop("valid_for", timedelta(days=30)), **kwargs)
    return token, keyids


def payload(token: str) -> dict:
    part = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_a_credential_is_a_vc_2_jwt_bound_to_the_spoke_and_its_keys(authority: Authority
                                                                     ) -> None:
    token, keyids = issue(authority)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "Ed25519", "typ": "vc+jwt", "cty": "vc", "kid": authority.kid}
    credential = vc.verify_membership(token, trusted(authority), NOW)
    assert credential.context[0] == vc.VC_CONTEXT
    assert credential.sub == credential.credentialSubject.id == "did:web:north.example.org"
    assert credential.credentialSubject.keyids == keyids
    vc.check_binding(credential, "north", keyids, "tributary")
    vc.check_status(credential, status_lists(authority))
    with pytest.raises(vc.CredentialError, match="for spoke 'north', not 'south'"):
        vc.check_binding(credential, "south", keyids)
    with pytest.raises(vc.CredentialError, match="does not name the spoke's signing key"):
        vc.check_binding(credential, "north", [*keyids, SigningKey.generate().keyid])
    with pytest.raises(vc.CredentialError, match="for federation"):
        vc.check_binding(credential, "north", keyids, "other")


def test_the_did_document_publishes_only_public_ed25519_keys(authority: Authority) -> None:
    document = json.loads((authority.folder / "did.json").read_text())
    jwk = document["verificationMethod"][0]["publicKeyJwk"]
    assert set(jwk) == {"kty", "crv", "x"} and jwk["crv"] == "Ed25519"
    assert document["assertionMethod"] == [authority.kid]
    private = authority.key.as_dict(private=True)
    document["verificationMethod"][0]["publicKeyJwk"] = private
    with pytest.raises(ValueError, match="private key"):
        vc.DidDocument.model_validate(document)
    assert vc.did_web_url("did:web:example.org") == "https://example.org/.well-known/did.json"
    with pytest.raises(ValueError, match="did:web"):
        vc.DidDocument.model_validate({**document, "id": "did:key:z6Mk"})


def forge(claims: dict, header: dict, key: object, algorithm: str) -> str:
    return jwt.encode(header, claims, key, algorithms=[algorithm])


def test_algorithm_confusion_and_injected_keys_are_refused(authority: Authority) -> None:
    token, _ = issue(authority)
    claims = payload(token)
    header = {"typ": "vc+jwt", "kid": authority.kid}
    unsigned = (base64.urlsafe_b64encode(json.dumps({**header, "alg": "none"}).encode())
                .rstrip(b"=").decode() + "." + token.split(".")[1] + ".")
    with pytest.raises(vc.CredentialError, match="algorithm 'none' refused"):
        vc.verify_membership(unsigned, trusted(authority), NOW)
    # HS256 keyed with the authority's public key: the classic confusion
    public_x = authority.key.as_dict(private=False)["x"]
    hmac = OctKey.import_key(public_x.encode())
    with pytest.raises(vc.CredentialError, match="algorithm 'HS256' refused"):
        vc.verify_membership(forge(claims, {**header, "alg": "HS256"}, hmac, "HS256"),
                             trusted(authority), NOW)
    rogue = OKPKey.generate_key("Ed25519")
    with pytest.raises(vc.CredentialError, match="signature does not verify"):
        vc.verify_membership(forge(claims, {**header, "alg": "Ed25519"}, rogue, "Ed25519"),
                             trusted(authority), NOW)
    embedded = {**header, "alg": "Ed25519", "jwk": rogue.as_dict(private=False)}
    with pytest.raises(vc.CredentialError, match="jwk"):
        vc.verify_membership(forge(claims, embedded, rogue, "Ed25519"), trusted(authority), NOW)
    with pytest.raises(vc.CredentialError, match="typ 'JWT'"):
        vc.verify_membership(forge(claims, {**header, "typ": "JWT", "alg": "Ed25519"},
                                   authority.key, "Ed25519"), trusted(authority), NOW)


def test_a_tampered_credential_or_an_untrusted_issuer_is_refused(authority: Authority,
                                                                 tmp_path: Path) -> None:
    token, _ = issue(authority)
    claims = payload(token)
    claims["credentialSubject"]["spokeId"] = "south"
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    head, _, signature = token.split(".")
    with pytest.raises(vc.CredentialError, match="signature does not verify"):
        vc.verify_membership(f"{head}.{body}.{signature}", trusted(authority), NOW)
    other = Authority.init(tmp_path / "other", "did:web:other.example.org", "tributary", URL)
    foreign, _ = issue(other)
    with pytest.raises(vc.CredentialError, match="not a federation authority this hub"):
        vc.verify_membership(foreign, trusted(authority), NOW)
    # the same DID with another key (a stolen name, not the key): no such assertion key
    impostor = Authority.init(tmp_path / "impostor", authority.state.did, "tributary", URL)
    with pytest.raises(vc.CredentialError, match="is not an assertion key"):
        vc.verify_membership(issue(impostor)[0], trusted(authority), NOW)
    # claims that disagree with the credential they repeat are refused even when signed
    claims = payload(token)
    claims["sub"] = "did:web:south.example.org"
    signed = forge(claims, {"typ": "vc+jwt", "kid": authority.kid, "alg": "Ed25519"},
                   authority.key, "Ed25519")
    with pytest.raises(vc.CredentialError, match="sub disagrees"):
        vc.verify_membership(signed, trusted(authority), NOW)
    for junk in ("", "a.b", "x" * (vc.MAX_CREDENTIAL_BYTES + 1), "a.b.c"):
        with pytest.raises(vc.CredentialError):
            vc.verify_membership(junk, trusted(authority), NOW)


def test_validity_is_checked_with_a_bounded_clock_skew(authority: Authority) -> None:
    token, _ = issue(authority, valid_for=timedelta(hours=1))
    credential = vc.verify_membership(token, trusted(authority), NOW)
    end = credential.validUntil
    assert vc.verify_membership(token, trusted(authority), end + timedelta(seconds=30),
                                leeway=60)
    with pytest.raises(vc.CredentialError, match="expired at"):
        vc.verify_membership(token, trusted(authority), end + timedelta(seconds=30), leeway=0)
    with pytest.raises(vc.CredentialError, match="expired at"):  # skew capped at 300 s
        vc.verify_membership(token, trusted(authority), end + timedelta(seconds=400),
                             leeway=100_000)
    future, _ = issue(authority, valid_from=NOW + timedelta(days=1))
    with pytest.raises(vc.CredentialError, match="not valid before"):
        vc.verify_membership(future, trusted(authority), NOW)


def test_revocation_takes_effect_with_the_next_status_list(authority: Authority) -> None:
    token, _ = issue(authority)
    keep, _ = issue(authority, spoke="south")
    credential = vc.verify_membership(token, trusted(authority), NOW)
    kept = vc.verify_membership(keep, trusted(authority), NOW)
    before = status_lists(authority)
    authority.revoke(credential.id, "left the federation")
    after = status_lists(authority)
    vc.check_status(credential, before)  # the old list did not say so yet
    with pytest.raises(vc.CredentialError, match=r"revoked by did:web:authority\.example\.org"):
        vc.check_status(credential, after)
    vc.check_status(kept, after)
    with pytest.raises(vc.CredentialError, match="not available"):
        vc.check_status(credential, [])
    with pytest.raises(LookupError):
        authority.revoke("urn:uuid:00000000-0000-0000-0000-000000000000", "x")


def test_status_lists_are_bounded_and_must_be_signed(authority: Authority,
                                                     tmp_path: Path) -> None:
    bits = bytes(vc.STATUS_LIST_BITS // 8)
    assert vc.decode_status_list(vc.encode_status_list(bits)) == bits
    with pytest.raises(vc.CredentialError, match="fewer than"):
        vc.decode_status_list(vc.encode_status_list(bytes(16)))
    bomb = "u" + base64.urlsafe_b64encode(gzip.compress(bytes(64 * 1024 * 1024))).decode()
    with pytest.raises(vc.CredentialError, match="larger than the limit"):
        vc.decode_status_list(bomb.rstrip("="))
    with pytest.raises(vc.CredentialError, match="beyond the status list"):
        vc.bit(bits, len(bits) * 8)
    assert vc.bit(bytes([0x80]), 0) and not vc.bit(bytes([0x80]), 1)  # spec's bit order
    other = Authority.init(tmp_path / "other", "did:web:other.example.org", "tributary", URL)
    forged = (other.folder / STATUS_FILE).read_text()
    with pytest.raises(vc.CredentialError, match="not a federation authority"):
        vc.verify_status_list(forged, trusted(authority), NOW)
    with pytest.raises(vc.CredentialError, match="not a membership credential"):
        vc.verify_membership((authority.folder / STATUS_FILE).read_text(), trusted(authority),
                             NOW)


def test_the_federation_command_runs_an_authority(tmp_path: Path) -> None:
    """`tributary federation`: init, issue for a spoke's public key, revoke, list, publish;
    what it writes verifies, and refuses once revoked."""
    from typer.testing import CliRunner

    from tributary.cli.app import app

    runner, folder = CliRunner(), tmp_path / "authority"
    spoke_key = SigningKey.generate()
    (tmp_path / "spoke.pub").write_text(spoke_key.public.pem)

    def run(*args: str) -> str:
        done = runner.invoke(app, ["federation", *args], env={"COLUMNS": "200"})
        assert done.exit_code == 0, done.output
        return done.output

    run("init", "--dir", str(folder), "--did", "did:web:authority.example.org",
        "--status-url", URL)
    refused = runner.invoke(app, ["federation", "init", "--dir", str(folder), "--did",
                                  "did:web:authority.example.org", "--status-url", URL])
    assert refused.exit_code == 1 and "already holds an authority" in refused.output
    run("issue", "--dir", str(folder), "--spoke", "north", "--did",
        "did:web:north.example.org", "--key", str(tmp_path / "spoke.pub"), "--days", "30",
        "-o", str(tmp_path / "north.jwt"))
    authority = Authority(folder)
    credential = vc.verify_membership((tmp_path / "north.jwt").read_text(),
                                      trusted(authority), NOW)
    vc.check_binding(credential, "north", [spoke_key.keyid], "tributary")
    vc.check_status(credential, status_lists(authority))
    bad = runner.invoke(app, ["federation", "issue", "--dir", str(folder), "--spoke", "north",
                              "--did", "https://north", "--key", str(tmp_path / "spoke.pub")])
    assert bad.exit_code == 1 and "did:web" in bad.output
    run("revoke", "--dir", str(folder), credential.id, "--reason", "left")
    assert "left" in run("list", "--dir", str(folder))
    run("publish", "--dir", str(folder), "--days", "1")
    with pytest.raises(vc.CredentialError, match="revoked"):
        vc.check_status(credential, status_lists(authority))


def test_a_hub_trusting_an_authority_needs_its_status_list(tmp_path: Path) -> None:
    from tributary.hub.settings import HubSettings

    with pytest.raises(ValueError, match="no status list is configured"):
        HubSettings(federation_authorities=[tmp_path / "did.json"])
    assert HubSettings().federation_authorities == []  # none: no credential asked for
