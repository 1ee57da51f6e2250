"""``tributary spoke deidentify`` starts without importing the spoke's other commands
(or the agent, the broker client, docker): typer builds every command of a group at
start, so each is imported only when it is the one run."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pydicom.data import get_testdata_file

from tributary.protocol.auditlog import verify_log
from tributary.spoke.startup import DEFERRED

_PROBE = """
import json, sys
from tributary.cli.app import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps(sorted(m for m in sys.modules if m.startswith(
        ("tributary", "docker", "stomp", "requests", "tqdm", "pydicom", "numpy.",
         "pytesseract")))))
"""


def _modules(*args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_deidentify_imports_only_what_it_needs(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "src")
    loaded = _modules("spoke", "deidentify", str(tmp_path / "src"), str(tmp_path / "dst"),
                      "--key", str(tmp_path / "k.key"))
    assert "tributary.spoke.commands.deidentify" in loaded
    for other in ("run", "data", "status", "steward", "trust", "store"):
        assert f"tributary.spoke.commands.{other}" not in loaded, other
    assert "pydicom" in loaded  # it de-identified, without pydicom's downloader's imports
    for heavy in ("tributary.spoke.agent", "tributary.spoke.ingest", "docker", "stomp",
                  "tributary.hub", "requests", "tributary.spoke.preparing"):
        assert not any(m == heavy or m.startswith(heavy + ".") for m in loaded), heavy
    # a CT slice is read, de-identified and written without numpy or OCR (Pillow's
    # package is pydicom's own import; its image modules are deferred)
    assert (tmp_path / "dst").is_dir() and list((tmp_path / "dst").rglob("*.dcm"))
    for heavy in ("numpy.", "pytesseract"):
        assert not any(m.startswith(heavy) for m in loaded), heavy


def test_deferred_modules_change_no_byte(tmp_path: Path) -> None:
    """With the modules of ``startup.DEFERRED`` deferred and the objects frozen at exit
    (a process started by the command) and all loaded from the start (this one),
    pydicom's test files give the same outputs and the same report, and the audit log
    written at the end verifies; OCR of the text-prone ones loads numpy on the way,
    when it is needed."""
    src = tmp_path / "src"
    shutil.copytree(Path(get_testdata_file("CT_small.dcm")).parent, src)
    key = tmp_path / "k.key"
    key.write_bytes(os.urandom(32))
    reports = []
    for name, run in (("deferred", _subprocess), ("loaded", _in_process)):
        report = tmp_path / f"{name}.json"
        run(["spoke", "deidentify", str(src), str(tmp_path / name), "--key", str(key),
             "--report", str(report), "--workers", "1"])
        document = json.loads(report.read_text())
        for field in ("started", "finished", "destination"):
            document.pop(field)
        reports.append(document)
    assert reports[0] == reports[1]
    assert reports[0]["files_written"] > 20
    outputs = [{str(p.relative_to(tmp_path / n)): p.read_bytes()
                for p in (tmp_path / n).rglob("*") if p.is_file()}
               for n in ("deferred", "loaded")]
    assert outputs[0] == outputs[1]
    log = verify_log(tmp_path / "audit.jsonl")
    assert log.ok and log.entries == 2, log.summary()


def _subprocess(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "tributary.cli", *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


def _in_process(args: list[str]) -> None:
    for name in DEFERRED:  # loaded (an attribute used): nothing deferred here
        assert importlib.import_module(name).__file__
    from typer.testing import CliRunner

    from tributary.cli.app import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


def test_the_deferred_numpy_is_numpy_once_used() -> None:
    """The stand-in answers ``isinstance(x, numpy.ndarray)`` without loading numpy (no
    array can exist before), and is numpy itself from its first real use on."""
    probe = ("import sys\nfrom tributary.spoke.startup import import_pydicom\n"
             "import_pydicom()\nimport numpy\n"
             "assert 'numpy._core' not in sys.modules\n"
             "check = numpy.ndarray\nassert not isinstance([1], check)\n"
             "assert 'numpy._core' not in sys.modules\n"
             "array = numpy.arange(4)\nassert isinstance(array, check)\n"
             "assert issubclass(type(array), check) and numpy.ndarray is type(array)\n"
             "import numpy.linalg\nassert numpy.linalg.norm(array) > 3\n"
             "from pydicom import dcmread\nfrom pydicom.data import get_testdata_file\n"
             "from pydicom.filewriter import _is_multi_value\n"
             "assert _is_multi_value(array)\n"
             "pixels = dcmread(get_testdata_file('CT_small.dcm')).pixel_array\n"
             "print(pixels.shape)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "(128, 128)", done.stderr


def test_every_spoke_command_is_still_listed() -> None:
    done = subprocess.run([sys.executable, "-m", "tributary.cli", "spoke", "--help"],
                          capture_output=True, text=True, timeout=120)
    for name in ("run", "init", "key", "ingest", "catalog", "exclusions", "status",
                 "steward", "trust", "store", "deidentify"):
        assert f" {name} " in done.stdout, name


def test_the_lean_pydicom_import_hides_nothing_for_later() -> None:
    """pydicom loaded without ``requests``; ``requests`` imports as usual afterwards."""
    probe = ("import sys\nfrom tributary.spoke.startup import import_pydicom\n"
             "import_pydicom()\nassert 'pydicom' in sys.modules\n"
             "assert 'requests' not in sys.modules\nimport requests, tqdm\n"
             "from pydicom import dcmread\nprint(requests.__name__)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "requests", done.stderr
