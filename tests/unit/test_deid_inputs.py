"""Inputs that are not regular files are never opened: a FIFO (opening it waits for a
writer forever), a socket, a device, or a symbolic link out of the input folder each end
as an exclusion with its reason, and the run goes on, in the steward's command and in the
spoke's ingest alike."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tributary.spoke.config import SpokeConfig
from tributary.spoke.ingest import ingest, open_catalog

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A folder with one image, one image reached by a link inside the folder, and every
    kind of entry that must not be read."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(MR, outside / "other-patient.dcm")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    shutil.copy(CT, src / "sub" / "ct.dcm")
    os.symlink(src / "sub" / "ct.dcm", src / "inside-link.dcm")
    os.symlink(outside / "other-patient.dcm", src / "escaping-link.dcm")
    os.mkfifo(src / "pipe.dcm")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(src / "socket.dcm"))
    server.close()  # the socket file stays
    os.symlink("/dev/zero", src / "device.dcm")  # out of the folder and a device
    return src


def _reasons(entries: dict[str, str]) -> dict[str, str]:
    return {Path(k).name: v for k, v in entries.items()}


def test_the_steward_command_never_opens_them(hostile: Path, tmp_path: Path) -> None:
    dst, report = tmp_path / "dst", tmp_path / "report.json"
    # a process of its own with a timeout: a FIFO opened would hang it, not the suite
    done = subprocess.run(
        [sys.executable, "-m", "tributary.cli", "spoke", "deidentify", str(hostile),
         str(dst), "--key", str(tmp_path / "k.key"), "--report", str(report),
         "--text-detection", "off"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    document = json.loads(report.read_text())
    verdicts = {Path(v["path"]).name: v for v in document["screening"]["files"]}
    assert document["files_seen"] == 6
    refused = {name: v["findings"][0] for name, v in verdicts.items()
               if v["status"] == "excluded" and
               v["findings"][0]["reason"] == "not-a-regular-file"}
    assert set(refused) == {"pipe.dcm", "socket.dcm", "escaping-link.dcm", "device.dcm"}
    assert "FIFO" in refused["pipe.dcm"]["detail"]
    assert "socket" in refused["socket.dcm"]["detail"]
    assert "out of the input folder" in refused["escaping-link.dcm"]["detail"]
    # the image and the link to it inside the folder: one instance, written once
    assert document["files_written"] == 1
    assert document["reasons"].get("duplicate-pixels") == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_the_ingest_never_opens_them(hostile: Path, tmp_path: Path, workers: int,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from tributary.spoke import ingest as ingest_module

    monkeypatch.setattr(ingest_module, "_PARALLEL_MIN", 2)  # workers even for 6 files
    config = SpokeConfig(spoke_id="inputs", data_dir=hostile, work_dir=tmp_path / "work",
                         hub_public_key=tmp_path / "hub.pub", catalog={"workers": workers})
    ingest(config)
    with open_catalog(config) as catalog:
        outcome = {e.ref: (e.status, e.reason) for e in catalog.exclusions()}
        stored = catalog._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
    excluded = {ref: reason for ref, (status, reason) in outcome.items()
                if status == "excluded"}
    refused = {ref for ref, reason in excluded.items()
               if (reason or "").startswith("not-a-regular-file")}
    assert refused == {"pipe.dcm", "socket.dcm", "escaping-link.dcm", "device.dcm"}, excluded
    assert stored == 1


def test_a_link_inside_the_folder_follows_its_target(hostile: Path) -> None:
    """The fingerprint of a link is its target's: a changed target is read again."""
    from tributary.spoke.config import FolderSource
    from tributary.spoke.sources import Folder

    items = {i.ref: i for i in Folder(FolderSource(name="f", path=hostile)).items()}
    target = (hostile / "sub" / "ct.dcm").stat()
    assert items["inside-link.dcm"].fingerprint == f"{target.st_size}:{target.st_mtime_ns}"
    assert items["pipe.dcm"].root == hostile  # every entry listed, refused when opened
