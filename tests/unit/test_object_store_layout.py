"""The object store's file formats and key names, without a running store: what each party
may touch is decided here, so a mistake must show without SeaweedFS."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from tributary.protocol.objects import (
    ObjectStoreCredentials,
    ObjectStoreError,
    global_model_key,
    load_credentials,
    round_update_key,
)
from tributary.services import objectstore
from tributary.services.settings import ServiceSettings


def test_key_names_cannot_leave_their_prefix() -> None:
    assert global_model_key(3) == "global/000000003/model.bin"
    assert round_update_key("site-a", 3, "weights.npz") == "spokes/site-a/000000003/weights.npz"
    for bad_name in ("../x", "a/b", "..", ""):
        with pytest.raises(ValueError):
            round_update_key("site-a", 1, bad_name)
    for bad_spoke in ("../site-b", "Site-A", "a"):
        with pytest.raises(ValueError):
            round_update_key(bad_spoke, 1)
    for bad_round in (-1, True, 1.5, 10**9):
        with pytest.raises(ValueError):
            global_model_key(bad_round)  # type: ignore[arg-type]


def test_credentials_require_https_and_the_ca(tmp_path: Path) -> None:
    fields = {"bucket": "tributary", "party": "site-a", "access_key": "TRB0123456789",
              "secret_key": "s3cr3t-value"}
    with pytest.raises(ValueError, match="https"):
        ObjectStoreCredentials(endpoint="http://hub:8333", **fields)
    creds = ObjectStoreCredentials(endpoint="https://hub:8333/", **fields)
    assert "s3cr3t" not in repr(creds)
    path = tmp_path / "credentials.json"
    path.write_text(creds.model_dump_json())
    assert json.loads(path.read_text())["secret_key"] == "s3cr3t-value"
    with pytest.raises(ObjectStoreError, match="CA file"):
        load_credentials(path)
    (tmp_path / "ca.crt").write_text("pem")
    loaded, ca = load_credentials(path)
    assert loaded.endpoint == "https://hub:8333" and ca == tmp_path / "ca.crt"
    path.write_text('{"endpoint": "https://hub:8333"}')
    with pytest.raises(ObjectStoreError, match="not an object store credentials file"):
        load_credentials(path)


def test_identities_refresh_keeps_secrets_and_tombstones_revoked(tmp_path: Path) -> None:
    settings = ServiceSettings(state_dir=tmp_path)
    first = objectstore.write_identities(settings, ["site-a", "site-b"])
    again = objectstore.write_identities(settings, ["site-a", "site-b"])
    assert again == first
    folder = objectstore.store_dir(settings)
    for name in ("identities.json", "s3.json"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600

    dropped = objectstore.write_identities(settings, ["site-a"])  # site-b left the federation
    assert dropped.revoked == ["site-b"] and dropped.spokes["site-a"] == first.spokes["site-a"]
    rendered = json.loads((folder / "s3.json").read_text())["identities"]
    by_name = {i["name"]: i for i in rendered}
    assert "anonymous" not in by_name
    assert by_name["tributary-spoke-site-b"] == {"name": "tributary-spoke-site-b",
                                                 "credentials": [], "actions": []}
    assert by_name["tributary-spoke-site-a"]["actions"] == [
        "Read:tributary/global/*", "List:tributary/global/*",
        "Read:tributary/spokes/site-a/*", "Write:tributary/spokes/site-a/*",
        "List:tributary/spokes/site-a/*"]
    assert by_name["tributary-hub"]["actions"][0] == "Admin:tributary"

    back = objectstore.write_identities(settings, ["site-a", "site-b"])
    assert back.spokes["site-b"] != first.spokes["site-b"] and back.revoked == []
    rotated = objectstore.write_identities(settings, ["site-a", "site-b"], rotate=True)
    assert rotated.hub != back.hub and rotated.spokes["site-a"] != back.spokes["site-a"]
    with pytest.raises(Exception, match="federation"):
        objectstore.write_identities(settings, ["site-a"], federation="other")
