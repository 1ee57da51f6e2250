"""A PACS source on a real Orthanc server (Debian's orthanc + orthanc-dicomweb, started by
the project's own starter) with HTTP authentication: ingest over QIDO-RS/WADO-RS gives the
same catalog (and the same de-identified bytes) as ingest from a folder of the same
files; re-ingest is a no-op and instances added to the PACS are picked up."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tributary.services import orthanc
from tributary.spoke.config import SpokeConfig
from tributary.spoke.ingest import ingest, open_catalog
from tributary.testbed.federation import generate_cohort

pytestmark = pytest.mark.e2e
PASSWORD = "pacs-secret-for-tests"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[orthanc.Orthanc]:
    server = orthanc.start(tmp_path_factory.mktemp("orthanc"), free_port(),
                           users={"tributary": PASSWORD})
    yield server
    server.stop()


def test_pacs_ingest_matches_folder_ingest(pacs: orthanc.Orthanc, tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_cohort(data, 3, seed=31, site="PACS General", size=64, slices=16)
    extra = tmp_path / "extra"
    generate_cohort(extra, 1, seed=32, site="PACS General", size=64, slices=16)
    (extra / "attributes.csv").unlink()
    attributes = tmp_path / "attributes.csv"
    shutil.move(data / "attributes.csv", attributes)

    # The same pseudonym key at both "sites", so pseudonyms and UIDs are comparable.
    policy = {"releasable_attributes": ["nodule_count"], "attributes_file": str(attributes)}
    folder_cfg = SpokeConfig(spoke_id="site-a", data_dir=data, work_dir=tmp_path / "w1",
                             hub_public_key=tmp_path / "hub.pub", policy=policy)
    pacs_cfg = SpokeConfig.model_validate({
        "spoke_id": "site-a", "work_dir": str(tmp_path / "w2"),
        "hub_public_key": str(tmp_path / "hub.pub"), "policy": policy,
        "sources": [{"kind": "dicomweb", "name": "pacs", "url": pacs.dicomweb_url,
                     "username": "tributary", "password": PASSWORD}]})
    assert PASSWORD not in repr(pacs_cfg) and PASSWORD not in pacs_cfg.model_dump_json()
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()
    key = bytes(range(32))
    (tmp_path / "w1" / "pseudonym.key").write_bytes(key)
    (tmp_path / "w2" / "pseudonym.key").write_bytes(key)

    files = sorted(data.rglob("*.dcm"))
    assert pacs.upload(files) == 48
    from_folder = ingest(folder_cfg)
    from_pacs = ingest(pacs_cfg)
    assert from_pacs.stored == from_folder.stored == 48
    assert from_pacs.attributes_cases == 3
    with open_catalog(folder_cfg) as a, open_catalog(pacs_cfg) as b:
        assert a.snapshot() == b.snapshot()
        assert a.counts()["cases"] == 3

    again = ingest(pacs_cfg)
    assert (again.stored, again.unchanged, again.excluded) == (0, 48, 0)

    assert pacs.upload(sorted(extra.rglob("*.dcm"))) == 16
    more = ingest(pacs_cfg)
    assert (more.stored, more.unchanged) == (16, 48)
    with open_catalog(pacs_cfg) as b:
        assert b.counts()["cases"] == 4

    wrong = pacs_cfg.model_copy(update={"sources": [pacs_cfg.sources[0].model_copy(
        update={"password": None})]})
    with pytest.raises(Exception, match="QIDO-RS studies failed") as failure:
        ingest(wrong)
    assert PASSWORD not in str(failure.value)
