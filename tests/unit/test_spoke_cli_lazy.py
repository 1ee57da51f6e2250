"""``tributary spoke deidentify`` starts without importing the spoke's other commands
(or the agent, the broker client, docker): typer builds every command of a group at
start, so each is imported only when it is the one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_PROBE = """
import json, sys
from tributary.cli.app import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print(json.dumps(sorted(m for m in sys.modules if m.startswith(
        ("tributary", "docker", "stomp", "requests", "tqdm", "pydicom")))))
"""


def _modules(*args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_deidentify_imports_only_what_it_needs(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    loaded = _modules("spoke", "deidentify", str(tmp_path / "src"), str(tmp_path / "dst"),
                      "--key", str(tmp_path / "k.key"))
    assert "tributary.spoke.commands.deidentify" in loaded
    for other in ("run", "data", "status", "steward", "trust", "store"):
        assert f"tributary.spoke.commands.{other}" not in loaded, other
    assert "pydicom" in loaded  # it de-identified, without pydicom's downloader's imports
    for heavy in ("tributary.spoke.agent", "tributary.spoke.ingest", "docker", "stomp",
                  "tributary.hub", "requests"):
        assert not any(m == heavy or m.startswith(heavy + ".") for m in loaded), heavy


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
