"""What a newcomer relies on in the command's layout: ``tributary --help`` names every group,
the roles' own commands run as console scripts, ``app.py`` only assembles groups defined in
modules of their own, and the demo says what it needs where the testbed is not installed."""

from __future__ import annotations

import ast
import importlib
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import typer

import tributary.cli.app

BIN = Path(sys.executable).parent
GROUPS = {"services", "hub", "spoke", "contract", "broker", "pki", "federation", "algorithm",
          "audit", "counts", "study", "training", "vertical", "dlq", "gaps", "bundle", "demo",
          "publisher", "login", "cohort", "access"}


def _run(*command: str | Path, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    wide = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    return subprocess.run([str(part) for part in command], capture_output=True, text=True,
                          timeout=60, env={**wide, **(env or {})})


def test_tributary_help_lists_every_group() -> None:
    done = _run(BIN / "tributary", "--help")
    assert done.returncode == 0, done.stderr
    commands = done.stdout.split("Commands", 1)[1]
    listed = set(re.findall(r"^\W*?([a-z][a-z-]*) {2,}\S", commands, re.MULTILINE))
    assert listed == GROUPS


def test_the_roles_commands_run_as_console_scripts() -> None:
    for script, group in (("tributary-hub", "serve"), ("tributary-spoke", "run")):
        done = _run(BIN / script, "--help")
        assert done.returncode == 0, done.stderr
        assert re.search(rf"^\W*{group} ", done.stdout, re.MULTILINE), done.stdout


def test_app_py_only_assembles() -> None:
    """No command bodies and no hidden imports in app.py: it names every group as the
    ``app`` (or a command function) of a module, loaded when used, and each exists."""
    tree = ast.parse(Path(tributary.cli.app.__file__).read_text())
    functions = [node.name for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)]
    assert functions == []
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    assert not [c for c in calls if isinstance(c.func, ast.Name) and c.func.id == "__import__"]
    lazy = tributary.cli.app.app.info.cls.lazy  # type: ignore[union-attr]
    assert set(lazy) == GROUPS
    for name, target in lazy.items():
        module, _, attribute = target.partition(":")
        assert module.startswith("tributary.") and attribute in ("app", name), target
        obj = getattr(importlib.import_module(module), attribute)
        assert isinstance(obj, typer.Typer) or callable(obj), target


def test_a_command_imports_only_its_own_group() -> None:
    """``tributary spoke ...`` starts without importing the hub's or the studies'
    commands: typer would otherwise build every command of every group first."""
    done = _run(sys.executable, "-c", "import sys; from tributary.cli.app import app\n"
                "try:\n    app(['spoke', '--help'])\nexcept SystemExit:\n    pass\n"
                "print(sorted(m for m in sys.modules if m.startswith('tributary.')))")
    loaded = done.stdout.strip().splitlines()[-1]
    assert "tributary.spoke.commands.app" in loaded, done.stderr
    for other in ("tributary.hub.commands.app", "tributary.cli.study", "tributary.cli.pki"):
        assert other not in loaded


def test_the_demo_asks_for_a_source_checkout_without_the_testbed() -> None:
    """The ``tributary`` distribution alone: the role packages and the third-party ones on
    the path, tributary-testbed not (``-S`` skips the editable installs' hooks)."""
    import tributary.hub
    import tributary.protocol
    import tributary.spoke
    import tributary_algorithm

    roots = [Path(module.__file__).parents[2] for module in  # type: ignore[arg-type]
             (tributary.cli.app, tributary.hub, tributary.protocol, tributary.spoke)]
    roots.append(Path(tributary_algorithm.__file__).parents[1])  # type: ignore[arg-type]
    path = os.pathsep.join(map(str, [*site.getsitepackages(), *roots]))
    bare = (sys.executable, "-S")
    missing = _run(*bare, "-c", "import tributary.testbed", env={"PYTHONPATH": path})
    assert "No module named 'tributary.testbed'" in missing.stderr
    done = _run(*bare, "-m", "tributary.cli", "demo", "--no-wait", env={"PYTHONPATH": path})
    assert done.returncode == 1
    assert "The demo needs a source checkout" in done.stdout, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
