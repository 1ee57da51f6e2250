"""What a newcomer relies on in the command's layout: ``tributary --help`` names every group,
the roles' own commands run as console scripts, ``app.py`` only assembles groups defined in
modules of their own, and the demo says what it needs where the testbed is not installed."""

from __future__ import annotations

import ast
import os
import re
import site
import subprocess
import sys
from pathlib import Path

import tributary.cli.app

BIN = Path(sys.executable).parent
GROUPS = {"services", "hub", "spoke", "contract", "broker", "pki", "algorithm", "audit", "counts",
          "study", "dlq", "gaps", "bundle", "demo", "publisher", "login"}


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
    """No command bodies and no hidden imports in app.py: every group it mounts is an
    ``app`` (or a command function) of a module imported at its top."""
    tree = ast.parse(Path(tributary.cli.app.__file__).read_text())
    functions = [node.name for node in ast.walk(tree)
                 if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)]
    assert functions == []
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    assert not [c for c in calls if isinstance(c.func, ast.Name) and c.func.id == "__import__"]
    imported = {alias.asname or alias.name for node in tree.body
                if isinstance(node, ast.ImportFrom) for alias in node.names}
    mounted = [c.args[0] for c in calls
               if isinstance(c.func, ast.Attribute) and c.func.attr == "add_typer"]
    mounted += [c.args[0] for c in calls if isinstance(c.func, ast.Call)
                and isinstance(c.func.func, ast.Attribute) and c.func.func.attr == "command"]
    assert len(mounted) == len(GROUPS)
    for target in mounted:
        assert isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
        assert target.value.id in imported, ast.unparse(target)


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
