"""Registry access without services: the gateway's matching of requests against a token's
digest restriction, the token format (signed by a certificate the registry trusts, for one
audience, short-lived), spoke assertions, and who the token service grants what."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import jwt
import pytest
from sqlmodel import Session, select

from tributary.hub.db import open_database
from tributary.hub.models import (
    Algorithm,
    Experiment,
    ExperimentState,
    ExperimentTarget,
    Spoke,
    SpokeKey,
)
from tributary.hub.registry_gateway import decide
from tributary.hub.services import registry_access
from tributary.hub.services.registry_tokens import (
    Access,
    TokenError,
    TokenSigner,
    TokenVerifier,
    parse_scope,
)
from tributary.hub.services.users import create_user
from tributary.hub.settings import HubSettings
from tributary.protocol.registry_auth import spoke_assertion
from tributary.protocol.signing import SigningKey
from tributary.services.pki import ensure_ca, issue_client_cert

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
BLOB = "sha256:" + "c" * 64
SERVICE = "tributary-registry"
PASSWORD = "a long enough password"


def claims(*entries: dict) -> dict:
    return {"access": list(entries)}


RESTRICTED = {"type": "repository", "name": "alice/algo", "actions": ["pull"],
              "digests": [A], "blobs": [BLOB]}


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("GET", f"/v2/alice/algo/manifests/{A}", True),
    ("HEAD", f"/v2/alice/algo/manifests/{A}", True),
    ("GET", f"/v2/alice/algo/manifests/sha256-{'a' * 64}.att", True),
    ("GET", f"/v2/alice/algo/blobs/{BLOB}", True),
    ("GET", f"/v2/alice/algo/manifests/{B}", False),
    ("GET", "/v2/alice/algo/manifests/latest", False),
    ("GET", f"/v2/alice/algo/manifests/sha256-{'b' * 64}.att", False),
    ("GET", f"/v2/alice/algo/blobs/{A}", False),
    ("GET", "/v2/alice/algo/tags/list", False),
    ("POST", "/v2/alice/algo/blobs/uploads/", False),
    ("PUT", f"/v2/alice/algo/manifests/{A}", False),
    ("DELETE", f"/v2/alice/algo/manifests/{A}", False),
    ("GET", f"/v2/bob/x/../../alice/algo/manifests/{B}", False),
    ("GET", f"/v2/alice//algo/manifests/{B}", False),
])
def test_gateway_enforces_digest_restriction(method: str, path: str, allowed: bool) -> None:
    assert (decide(method, path, claims(RESTRICTED)) is None) is allowed


def test_gateway_leaves_unrestricted_requests_to_the_registry() -> None:
    full = {"type": "repository", "name": "alice/algo", "actions": ["pull", "push"]}
    assert decide("PUT", f"/v2/alice/algo/manifests/{B}", claims(full)) is None
    # a restriction on another repository does not apply here
    assert decide("GET", "/v2/bob/tool/manifests/latest", claims(RESTRICTED)) is None
    # no token at all, or the base endpoint: the registry answers (and challenges)
    assert decide("GET", f"/v2/alice/algo/manifests/{B}", None) is None
    assert decide("GET", "/v2/", claims(RESTRICTED)) is None
    # a name that only looks like the restricted one is a different repository
    assert decide("GET", f"/v2/alice/algo/x/manifests/{B}", claims(RESTRICTED)) is None


def test_gateway_limits_cross_repository_mounts() -> None:
    """A mount reads a blob of another repository: the restriction on that one applies."""
    own = {"type": "repository", "name": "bob/tool", "actions": ["pull", "push"]}
    path = "/v2/bob/tool/blobs/uploads/"
    token = claims(own, RESTRICTED)
    assert decide("POST", path, token, [("mount", BLOB), ("from", "alice/algo")]) is None
    assert decide("POST", path, token, [("mount", A), ("from", "alice/algo")]) is not None
    assert decide("POST", path, token, [("mount", A)]) is None  # no source: a plain upload
    assert decide("POST", path, claims(own), [("mount", A), ("from", "alice/algo")]) is None
    # the registry reads the first of repeated parameters: repeating them is refused
    assert decide("POST", path, token, [("mount", A), ("from", "alice/algo"),
                                        ("from", "bob/tool")]) is not None


def test_scope_parsing() -> None:
    scope = parse_scope("repository:alice/algo:pull,push")
    assert (scope.type, scope.name, scope.actions) == ("repository", "alice/algo",
                                                       ("pull", "push"))
    assert parse_scope("registry:catalog:*").actions == ("*",)
    for bad in ("repository", "repository:alice algo:pull", "x" * 600):
        with pytest.raises(TokenError):
            parse_scope(bad)


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca = ensure_ca(tmp_path / "pki")
    signer = issue_client_cert(ca, tmp_path / "pki" / "token", "tokens")
    return ca.cert_path, signer.key_path, signer.cert_path


def test_tokens_verify_only_from_trusted_signer_and_audience(
        pki: tuple[Path, Path, Path], tmp_path: Path) -> None:
    roots, key, cert = pki
    signer = TokenSigner(key, cert, "tributary-hub", SERVICE, lifetime_s=60)
    issued = signer.mint("spoke:s1", [Access("repository", "alice/algo", ["pull"], [A], [BLOB])])
    verified = TokenVerifier(roots, "tributary-hub", SERVICE).verify(issued.token)
    assert verified["access"] == [RESTRICTED]
    assert isinstance(verified["aud"], str)  # distribution 2.8 reads a string audience
    with pytest.raises(TokenError):
        TokenVerifier(roots, "tributary-hub", "another-service").verify(issued.token)
    with pytest.raises(TokenError):
        TokenVerifier(roots, "someone-else", SERVICE).verify(issued.token)
    other = ensure_ca(tmp_path / "other")
    with pytest.raises(TokenError, match="untrusted"):
        TokenVerifier(other.cert_path, "tributary-hub", SERVICE).verify(issued.token)
    header, payload, signature = issued.token.split(".")
    with pytest.raises(TokenError):
        TokenVerifier(roots, "tributary-hub", SERVICE).verify(
            f"{header}.{payload}.{signature[::-1]}")


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    settings = HubSettings.for_directory(tmp_path)
    engine = open_database(settings)
    with Session(engine) as session:
        yield session
    engine.dispose()


def _spoke(session: Session, spoke_id: str) -> SigningKey:
    key = SigningKey.generate()
    session.add(Spoke(id=spoke_id, name=spoke_id))
    session.add(SpokeKey(keyid=key.keyid, spoke_id=spoke_id, public_key_pem=key.public.pem))
    session.commit()
    return key


def test_spoke_assertions(session: Session) -> None:
    key = _spoke(session, "s1")
    good = spoke_assertion(key, "s1", SERVICE)
    assert registry_access.authenticate(session, "s1", good, SERVICE).kind == "spoke"
    refused = [
        ("s1", spoke_assertion(key, "s1", "another-service")),  # another audience
        ("s1", spoke_assertion(SigningKey.generate(), "s1", SERVICE)),  # not enrolled
        ("s1", spoke_assertion(key, "s1", SERVICE, lifetime_s=3600)),  # lives too long
        ("s1", key.sign_jwt({"sub": "s1", "aud": SERVICE, "iat": int(time.time()) - 600,
                             "exp": int(time.time()) - 300})),  # expired
    ]
    _spoke(session, "s2")
    refused.append(("s2", spoke_assertion(key, "s2", SERVICE)))  # s1's key for s2
    for spoke_id, assertion in refused:
        with pytest.raises(registry_access.AccessRefused):
            registry_access.authenticate(session, spoke_id, assertion, SERVICE)
    spoke = session.get(Spoke, "s1")
    assert spoke is not None
    spoke.revoked_at = datetime.now(UTC)
    session.add(spoke)
    session.commit()
    with pytest.raises(registry_access.AccessRefused, match="revoked"):
        registry_access.authenticate(session, "s1", good, SERVICE)


def test_users_and_approved_digests(session: Session) -> None:
    create_user(session, "alice", PASSWORD, ["developer"])
    create_user(session, "carol", PASSWORD, ["coordinator"])
    alice = registry_access.authenticate(session, "alice", PASSWORD, SERVICE)
    carol = registry_access.authenticate(session, "carol", PASSWORD, SERVICE)
    with pytest.raises(registry_access.AccessRefused):
        registry_access.authenticate(session, "alice", "wrong password!", SERVICE)
    settings = HubSettings()
    scopes = [parse_scope("repository:alice/algo:pull,push")]
    granted, refused = registry_access.grant(session, settings, alice, scopes)
    assert [(g.name, g.actions, g.digests) for g in granted] == [
        ("alice/algo", ["pull", "push"], None)]
    assert refused == []
    granted, refused = registry_access.grant(session, settings, carol, scopes)
    assert granted == [] and refused == ["repository:alice/algo:pull,push"]
    # approved digests: every approved, not revoked one for users; for a spoke, only
    # those of studies that target it
    _spoke(session, "s1")
    _spoke(session, "s2")
    now = datetime.now(UTC)
    for name, digest, revoked in (("a", A, None), ("b", B, now)):
        session.add(Algorithm(name=name, version="1", repository="reg:5000/alice/algo",
                              digest=digest, approved_at=now, revoked_at=revoked))
    session.commit()
    algorithm = session.exec(select(Algorithm).where(Algorithm.name == "a")).one()
    session.add(Experiment(id="e1", name="e1", algorithm_id=algorithm.id,
                           state=ExperimentState.LAUNCHED))
    session.add(ExperimentTarget(experiment_id="e1", spoke_id="s1"))
    # A draft that targets s2 grants it nothing until it is launched.
    session.add(Experiment(id="e2", name="e2", algorithm_id=algorithm.id))
    session.add(ExperimentTarget(experiment_id="e2", spoke_id="s2"))
    session.commit()
    assert registry_access.approved_digests(session, "alice/algo") == {A: "reg:5000"}
    assert registry_access.approved_digests(session, "alice/algo", "s1") == {A: "reg:5000"}
    assert registry_access.approved_digests(session, "alice/algo", "s2") == {}
    session.get(Experiment, "e2").state = ExperimentState.LAUNCHED  # type: ignore[union-attr]
    session.commit()
    assert registry_access.approved_digests(session, "alice/algo", "s2") == {A: "reg:5000"}
    assert registry_access.approved_digests(session, "alice/other") == {}


def test_spoke_assertion_is_a_short_jwt() -> None:
    key = SigningKey.generate()
    token = spoke_assertion(key, "s1", SERVICE)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "EdDSA" and header["kid"] == key.keyid
    assert len(token) < 1024


def test_misconfigured_signer_is_refused_clearly(pki: tuple[Path, Path, Path],
                                                 tmp_path: Path) -> None:
    roots, key, cert = pki
    with pytest.raises(TokenError, match="is not the certificate"):
        TokenSigner(key, roots, "tributary-hub", SERVICE)  # the CA's certificate, not its own
    with pytest.raises(TokenError, match="cannot load"):
        TokenSigner(tmp_path / "missing.key", cert, "tributary-hub", SERVICE)
