"""The lean start of a de-identifying process (:mod:`tributary.spoke.startup`): each
deferred module is the real one from its first use, the names answered without loading
are answered right, and what the one-file path imports is pinned, so that the start
does not silently regrow. That the deferrals change no output byte and no report is
``test_spoke_cli_lazy.test_deferred_modules_change_no_byte``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tributary.spoke.startup import DEFERRED


def _run(probe: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


#: Python defining ``loaded(name)``: whether a module is really loaded (not a stand-in)
_LOADED = ("import sys\ndef loaded(name):\n    module = sys.modules.get(name)\n"
           "    return module is not None and type(module).__name__ != '_Deferred'\n")


@pytest.mark.parametrize("command", ["deidentify", "data"])
def test_the_command_module_loads_no_engine_and_no_model(command: str) -> None:
    """Importing the command (what typer does to build it: ``deidentify``, and ``data``
    for ingest) loads neither pydicom nor pydantic nor rich: they come after the lean
    start, inside the command, with the collector paused."""
    heavy = ("pydantic", "pydicom", "rich", "PIL", "numpy", "tributary.spoke.deid",
             "tributary.protocol", "tributary.spoke.store")
    probe = (f"import json, sys\nimport tributary.spoke.commands.{command}\n"
             f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    assert json.loads(_run(probe)) == []


def test_one_file_loads_no_deferred_module(tmp_path: Path) -> None:
    """De-identifying one CT slice uses none of the deferred modules, nor the wire
    protocol, the catalog, sqlite, cryptography, an HTTP client, the broker's client,
    or typer's rich help formatting."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm"))
                                             .read_bytes())
    args = ["spoke", "deidentify", str(tmp_path / "src"), str(tmp_path / "dst"),
            "--key", str(tmp_path / "k.key")]
    never = (*DEFERRED, "http.client", "ssl", "sqlite3", "cryptography", "httpx",
             "stomp", "docker", "typer.rich_utils", "tributary.protocol.messages",
             "tributary.spoke.catalog", "tributary.spoke.preparing", "pytesseract")
    probe = (f"{_LOADED}import json\nfrom tributary.cli.app import app\n"
             f"try:\n    app({args!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
             f"print(json.dumps([m for m in {never!r} if loaded(m)]))")
    assert json.loads(_run(probe)) == []
    assert list((tmp_path / "dst").rglob("*.dcm"))


@pytest.mark.parametrize("use", [
    # numpy: a real array, and the stand-in's ndarray check agrees with numpy's own
    "import numpy\nassert numpy.arange(3).sum() == 3 and isinstance(numpy.zeros(1), "
    "numpy.ndarray)",
    # urllib.request, as pydicom's downloader reaches it (an attribute of urllib)
    "import urllib\nassert urllib.request.Request('http://example.org').host == "
    "'example.org'\nimport urllib.request as r\nassert r.urlopen is urllib.request.urlopen",
    # tqdm, as dicom-anonymizer uses it
    "import tqdm, io\nbar = tqdm.tqdm(total=2, file=io.StringIO())\nbar.update(2)\n"
    "bar.close()\nassert bar.n == 2",
    # attr: the forwarded attr.ib defines a real attrs class; rich pretty-prints it as one
    "import attr\n@attr.s\nclass P:\n    x = attr.ib()\nassert attr.fields(P)[0].name == 'x'\n"
    "from rich.pretty import pretty_repr\nassert pretty_repr(P(1)) == 'P(x=1)'",
    # argparse, as dicom-anonymizer's command uses it
    "import argparse\nparser = argparse.ArgumentParser()\nparser.add_argument('--n', type=int)\n"
    "assert parser.parse_args(['--n', '3']).n == 3",
    # configparser, as rich reads a theme file
    "import configparser, io\nfrom rich.theme import Theme\n"
    "theme = Theme.from_file(io.StringIO('[styles]\\nwarning = red\\n'))\n"
    "assert 'warning' in theme.styles",
    # pydicom.examples, an attribute of pydicom once pydicom is loaded
    "import pydicom\nassert str(pydicom.examples.ct.PatientName) == 'CompressedSamples^CT1'",
    # Pillow's image modules, as OCR and pydicom's colour management use them
    "from PIL import Image, ImageCms\nimage = Image.new('RGB', (3, 2), (9, 8, 7))\n"
    "assert image.size == (3, 2) and isinstance(image, Image.Image)\n"
    "srgb = ImageCms.createProfile('sRGB')\n"
    "ImageCms.applyTransform(image, ImageCms.buildTransform(srgb, srgb, 'RGB', 'RGB'))",
    # pydicom's Pillow decoder: found available at load (from Pillow's compiled module),
    # and it decodes a JPEG image to the pixels pydicom's own test data holds
    "import pydicom\nfrom pydicom.data import get_testdata_file\n"
    "from pydicom.pixels.decoders.base import JPEGBaseline8BitDecoder\n"
    "assert 'pillow' in JPEGBaseline8BitDecoder.available_plugins\n"
    "ds = pydicom.dcmread(get_testdata_file('SC_rgb_jpeg_dcmtk.dcm'))\n"
    "assert ds.pixel_array.shape == (100, 100, 3) and int(ds.pixel_array[50, 50, 0]) > 0",
])
def test_a_deferred_module_is_the_real_one_once_used(use: str) -> None:
    probe = (f"{_LOADED}from tributary.spoke.startup import DEFERRED, lean_start\n"
             "lean_start()\nimport rich.pretty\n"
             "assert not any(loaded(m) for m in DEFERRED), DEFERRED\n"
             f"{use}\nprint('ok')")
    assert _run(probe) == "ok"


def test_pydantic_plugins_are_off_unless_the_site_chose() -> None:
    """pydantic's own switch: off in a de-identifying process, the site's setting kept."""
    probe = ("import os\nfrom tributary.spoke.startup import lean_start\nlean_start()\n"
             "print(os.environ['PYDANTIC_DISABLE_PLUGINS'])")
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    assert _run(probe, env) == "__all__"
    assert _run(probe, {**env, "PYDANTIC_DISABLE_PLUGINS": "logfire"}) == "logfire"


def test_objects_are_frozen_at_exit_and_exit_handlers_still_run(tmp_path: Path) -> None:
    """The collector's final passes are skipped; exit handlers registered before and
    after the lean start still run, and what they write is there."""
    marks = tmp_path / "marks"
    probe = ("import atexit, gc\n"
             f"atexit.register(lambda: open({str(marks)!r}, 'a').write("
             "f'before {gc.get_freeze_count() > 1000}\\n'))\n"
             "from tributary.spoke.startup import lean_start\nlean_start()\n"
             f"atexit.register(lambda: open({str(marks)!r}, 'a').write('after\\n'))\n"
             "print('ok')")
    assert _run(probe) == "ok"
    assert marks.read_text() == "after\nbefore True\n"


def test_the_collector_waits_for_the_imports_and_then_collects() -> None:
    """Paused from the lean start to the end of the command's imports, then on again
    with the imports' objects frozen; a warm process (pydicom loaded) is left as it is."""
    cold = ("import gc\nfrom tributary.spoke.startup import lean_start, started\n"
            "lean_start()\nassert not gc.isenabled()\nimport rich.console\nstarted()\n"
            "assert gc.isenabled() and gc.get_freeze_count() > 10_000\n"
            "class Cycle:\n    pass\nc = Cycle()\nc.me = c\ndel c\nassert gc.collect() > 0\n"
            "print('ok')")
    assert _run(cold) == "ok"
    warm = ("import gc, pydicom\nfrom tributary.spoke.startup import lean_start, started\n"
            "lean_start()\nassert gc.isenabled()\nstarted()\n"
            "assert gc.get_freeze_count() == 0\nprint('ok')")
    assert _run(warm) == "ok"


def test_with_the_site_configuration_no_wire_protocol_is_loaded(tmp_path: Path) -> None:
    """``--config`` reads the spoke's configuration (its work folder, key and
    de-identification options), which loads neither the wire protocol's messages nor
    the signing library (and its cloud signers) nor the broker's client."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm"))
                                             .read_bytes())
    (tmp_path / "hub.pub").write_text("unused\n")
    config = tmp_path / "spoke.toml"
    config.write_text(f'spoke_id = "site-a"\ndata_dir = "{tmp_path / "src"}"\n'
                      f'work_dir = "{tmp_path / "work"}"\n'
                      f'hub_public_key = "{tmp_path / "hub.pub"}"\n\n'
                      "[deidentification]\nretain_patient_characteristics = true\n")
    args = ["spoke", "deidentify", str(tmp_path / "src"), str(tmp_path / "dst"),
            "--config", str(config), "--report", str(tmp_path / "report.json")]
    never = ("tributary.protocol.messages", "tributary.protocol.signing",
             "tributary.protocol.broker", "securesystemslib", "boto3", "stomp")
    probe = (f"{_LOADED}import json\nfrom tributary.cli.app import app\n"
             f"try:\n    app({args!r}, standalone_mode=False)\nexcept SystemExit:\n    pass\n"
             f"print(json.dumps([m for m in {never!r} if loaded(m)]))")
    (tmp_path / "work").mkdir()
    assert json.loads(_run(probe)) == []
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["files_written"] == 1 and report["options"]["retain_patient_characteristics"]


def _ending(command: str, tmp_path: Path) -> tuple[int, str, str]:
    """Runs ``command`` (Python) in a process of its own, with an exit handler and an
    object that reports being freed; returns the status, stderr and what was reported."""
    marks = tmp_path / "marks"
    probe = ("import atexit, sys\n"
             f"def mark(text):\n    open({str(marks)!r}, 'a').write(text + '\\n')\n"
             "atexit.register(mark, 'exit handler')\n"
             # a module only sys.modules holds: freed as the interpreter is torn down,
             # when the modules are removed (before the collector, even a frozen one)
             "import types\nclass Freed(types.ModuleType):\n"
             f"    def __del__(self, to={str(marks)!r}, open=open):\n"
             "        open(to, 'a').write('torn down\\n')\n"
             f"sys.modules['freed'] = Freed('freed')\n{command}\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    return done.returncode, done.stderr, marks.read_text() if marks.exists() else ""


def test_a_lean_command_ends_without_tearing_down(tmp_path: Path) -> None:
    """The ``tributary`` process of a de-identifying command: its exit handlers run (the
    audit log verifies, the report is whole), the interpreter is not torn down, and a
    failure keeps its status; any other command ends as usual."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm"))
                                             .read_bytes())
    args = ["spoke", "deidentify", str(tmp_path / "src"), str(tmp_path / "dst"),
            "--key", str(tmp_path / "k.key"), "--report", str(tmp_path / "r.json")]
    main = "from tributary.cli.main import main\nsys.argv = ['tributary', *{!r}]\nmain()"
    status, stderr, marks = _ending(main.format(args), tmp_path)
    assert status == 0, stderr
    assert marks == "exit handler\n"
    assert json.loads((tmp_path / "r.json").read_text())["files_written"] == 1
    from tributary.protocol.auditlog import verify_log

    assert verify_log(tmp_path / "audit.jsonl").ok
    (tmp_path / "marks").unlink()
    status, stderr, marks = _ending(main.format(args[:4]), tmp_path)  # no --key: refused
    assert status == 2 and "exactly one of --config and --key" in stderr
    assert marks == "exit handler\n"
    (tmp_path / "marks").unlink()
    status, _, marks = _ending(main.format(["spoke", "--help"]), tmp_path)
    assert status == 0 and marks == "exit handler\ntorn down\n"


def test_a_process_with_another_thread_ends_as_usual(tmp_path: Path) -> None:
    """A thread still running is waited for, as the interpreter waits for it."""
    thread = ("import threading, time\n"
              "threading.Thread(target=lambda: (time.sleep(0.3), mark('thread'))).start()\n"
              "from tributary.spoke.startup import exit_now, lean_start\nlean_start()\n"
              "exit_now(3)")
    status, _, marks = _ending(thread, tmp_path)
    assert status == 3 and marks == "thread\nexit handler\ntorn down\n"
