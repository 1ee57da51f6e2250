"""Keeps outside text out of rich markup in every command module.

rich reads ``[...]`` in a printed string as markup and ``:name:`` as an emoji code, so a
value interpolated into a printed string (an exception, a path, a name typed by another
user, a detail an algorithm wrote) can hide text, fake a verdict or plant a hyperlink.
This scan reads the command modules and fails on any string built for a console's
``print``/``log``, a table row, a ``Panel`` or ``Text.from_markup`` whose interpolated
values are neither passed through ``escape`` nor plainly numbers; on a ``Console`` made
without ``emoji=False``; and on a progress ``TextColumn`` without ``markup=False``. It is
a syntactic guard: what it lets through (a line printed with ``markup=False``, a table
object, a number) is listed below (``_SAFE_CALLS``, ``_NUMBERS``, ``_OWN_LITERALS``,
``_RENDERABLES``), on purpose small, so that a new exception must be argued for here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_EXCLUDED = {"app.py", "main.py", "lazy.py", "__init__.py", "__main__.py"}
MODULES = sorted(
    path
    for folder in ("spoke/tributary/spoke/commands", "cli/tributary/cli",
                   "hub/tributary/hub/commands")
    for path in (ROOT / folder).glob("*.py")
    if path.name not in _EXCLUDED
) + sorted((ROOT / "algorithm-sdk/tributary_algorithm").rglob("*.py"))

# Calls whose result cannot carry markup: escaping itself, numbers, and ``_state`` (the
# algorithm commands' own three literals).
_SAFE_CALLS = {"escape", "len", "int", "float", "round", "sum", "_state"}
# Attribute or key names that hold numbers we count ourselves (never outside text).
_NUMBERS = {
    "rounds", "rounds_done", "round", "attempt", "resend_requests", "objects", "renamed",
    "results", "training_rounds", "relayed_messages", "cases", "index", "last_missing",
    "attributes_cases", "attributes_unmatched", "count_requests", "revoked_digests", "id",
    "excluded", "flagged", "catalog_rows", "links", "count", "due", "warn_days", "done",
    "total", "total_at_most", "days_left", "failed", "pid", "exit_code", "timeout",
    "from_sequence", "waiting", "studies", "series",
}
# Names bound to our own literals only: a style chosen from two, a caption we compose.
_OWN_LITERALS = {"colour", "caption"}
# Names bound to renderables in the scanned modules, and functions that return one.
_RENDERABLES = {"table", "aggregate_table"}


def _is_console(node: ast.expr) -> bool:
    """A receiver that is one of the commands' consoles (``console``, ``errors``,
    ``_console()``)."""
    if isinstance(node, ast.Call):
        node = node.func
    name = node.id if isinstance(node, ast.Name) else getattr(node, "attr", "")
    return "console" in name.lower() or name == "errors"


def _numeric_name(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in _NUMBERS
    if isinstance(node, ast.Attribute):
        return node.attr in _NUMBERS
    if isinstance(node, ast.Subscript):
        key = node.slice
        return isinstance(key, ast.Constant) and key.value in _NUMBERS
    return False


def _numeric_format(value: ast.FormattedValue) -> bool:
    """``{x:.4g}``, ``{x:d}``, ``{x:.0%}``: a format that only a number takes."""
    spec = value.format_spec
    if not isinstance(spec, ast.JoinedStr) or not spec.values:
        return False
    last = spec.values[-1]
    return isinstance(last, ast.Constant) and str(last.value)[-1:] in set("bcdeEfFgGnoxX%")


def _unsafe(node: ast.expr) -> list[ast.expr]:
    """The parts of ``node`` that may put outside text into markup."""
    if isinstance(node, ast.Constant):
        return []
    if isinstance(node, ast.JoinedStr):
        return [bad for value in node.values if isinstance(value, ast.FormattedValue)
                and not _numeric_format(value) for bad in _unsafe(value.value)]
    if isinstance(node, ast.BinOp):
        return _unsafe(node.left) + _unsafe(node.right)
    if isinstance(node, ast.IfExp):
        return _unsafe(node.body) + _unsafe(node.orelse)
    if isinstance(node, ast.BoolOp):
        return [bad for value in node.values for bad in _unsafe(value)]
    if isinstance(node, ast.Starred):
        return _unsafe(node.value)
    if isinstance(node, (ast.GeneratorExp, ast.ListComp)):
        return _unsafe(node.elt)  # each cell the generator makes
    if isinstance(node, ast.Compare):
        return []  # a boolean
    if isinstance(node, ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        if name in _SAFE_CALLS:
            return []
        if name == "str" and len(node.args) == 1 and not _unsafe_number(node.args[0]):
            return []
        return [node]
    if _numeric_name(node) or (isinstance(node, ast.Name) and node.id in _OWN_LITERALS):
        return []
    return [node]


def _unsafe_number(node: ast.expr) -> bool:
    """``str(x)`` is safe only when ``x`` is itself a number by the rules above."""
    return bool(_unsafe(node))


def _renderable(node: ast.expr) -> bool:
    """A table or another renderable, printed as it is: a name in ``_RENDERABLES`` or a
    class made inline (``Syntax(...)``, ``Table(...)``), whose own cells are scanned."""
    if isinstance(node, ast.Name):
        return node.id in _RENDERABLES
    if isinstance(node, ast.Call):
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        return name in _RENDERABLES or name[:1].isupper()
    return False


def _markup_arguments(call: ast.Call) -> list[ast.expr]:
    """The arguments of ``call`` that rich will read as markup, if it renders any."""
    func = call.func
    if any(k.arg == "markup" and isinstance(k.value, ast.Constant) and k.value.value is False
           for k in call.keywords):
        return []
    if isinstance(func, ast.Attribute) and func.attr in ("print", "log", "status") \
            and _is_console(func.value):
        return [a for a in call.args if not _renderable(a)]
    if isinstance(func, ast.Attribute) and func.attr == "add_row":
        return list(call.args)
    if isinstance(func, ast.Attribute) and func.attr == "add_column":
        return call.args[:1] + [k.value for k in call.keywords if k.arg == "header"]
    if isinstance(func, ast.Attribute) and func.attr == "from_markup":
        return list(call.args)
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
    titles = [k.value for k in call.keywords if k.arg in ("title", "subtitle", "caption")]
    if name == "Panel":
        return list(call.args) + titles
    if name == "Table":
        return titles
    return []


def _findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        func = call.func
        if (isinstance(func, ast.Name) and func.id == "Console") or \
                (isinstance(func, ast.Attribute) and func.attr == "Console"):
            emoji = [k for k in call.keywords if k.arg == "emoji"]
            if not emoji or not (isinstance(emoji[0].value, ast.Constant)
                                 and emoji[0].value.value is False):
                found.append(f"{path.name}:{call.lineno}: Console without emoji=False")
        if (getattr(func, "id", None) or getattr(func, "attr", None)) == "TextColumn" and not \
                any(k.arg == "markup" and isinstance(k.value, ast.Constant)
                    and k.value.value is False for k in call.keywords):
            found.append(f"{path.name}:{call.lineno}: TextColumn renders its fields as markup")
        for argument in _markup_arguments(call):
            for bad in _unsafe(argument):
                found.append(f"{path.name}:{call.lineno}: {ast.unparse(bad)} not escaped")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_printed_outside_text_is_escaped(path: Path) -> None:
    assert _findings(path) == []


def test_the_guard_catches_what_it_guards(tmp_path: Path) -> None:
    """The scan itself: an unescaped exception is found, an escaped one and a count not."""
    sample = tmp_path / "guard_sample.py"
    sample.write_text(
        "from rich.console import Console\n"
        "console = Console()\n"
        "console.print(f'[red]{exc}[/]')\n"
        "console.print(f'{escape(str(exc))} in {len(rows)} rows')\n"
        "table.add_row(r['name'], escape(r['state']), str(r['id']))\n"
        "console.print('total: ' + name)\n")
    assert _findings(sample) == [
        "guard_sample.py:2: Console without emoji=False",
        "guard_sample.py:3: exc not escaped",
        "guard_sample.py:5: r['name'] not escaped",
        "guard_sample.py:6: name not escaped",
    ]
