"""Every help text of every command survives rendering: rich reads ``[word]`` as markup
and silently drops it (``tributary spoke ingest --help`` printed "after changing )" for
"after changing [deidentification])"), so each command's help is rendered and every
bracketed word written in its source must be on screen."""

from __future__ import annotations

import argparse
import re
from typing import Any

import click
import pytest
import typer
from typer.testing import CliRunner

import tributary.cli.app
import tributary.hub.commands.app
import tributary.spoke.commands.app
from tributary_algorithm.cli import make_parser

APPS = {"tributary": tributary.cli.app.app, "tributary-hub": tributary.hub.commands.app.app,
        "tributary-spoke": tributary.spoke.commands.app.app}
#: ``[word]`` as written in a help text; ``\[`` is rich's escape for a literal bracket.
_BRACKETED = re.compile(r"(?<!\\)\[([^\[\]\n]*)\]|\\\[([^\[\]\n]*)\]")


def _commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, command)]
    if hasattr(command, "commands"):  # a group (typer vendors its own click)
        context = click.Context(command)  # groups may load theirs lazily
        for name in sorted(command.list_commands(context)):
            found += _commands(command.get_command(context, name), (*path, name))
    return found


def _texts(command: Any) -> list[str]:
    texts = [command.help or "", command.short_help or "", command.epilog or ""]
    texts += [getattr(p, "help", None) or "" for p in command.params]
    return [t for t in texts if t]


def _flat(text: str) -> str:
    """The rendered screen as one line of words: no panel borders, no wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─┃━┏┓┗┛]", " ", text).split())


def _cases() -> list[tuple[str, tuple[str, ...], str]]:
    out = []
    for name, app in APPS.items():
        for path, command in _commands(typer.main.get_command(app)):
            for text in _texts(command):
                for match in _BRACKETED.finditer(text):
                    out.append((name, path, f"[{match.group(1) or match.group(2) or ''}]"))
    return out


def test_some_help_texts_do_hold_brackets() -> None:
    """The check below must be able to fail: the known case is among those checked."""
    assert ("tributary", ("spoke", "ingest"), "[deidentification]") in _cases()


@pytest.mark.parametrize("name", sorted(APPS))
def test_every_bracketed_word_is_rendered(name: str) -> None:
    runner = CliRunner()
    missing = []
    screens: dict[tuple[str, ...], str] = {}
    for app_name, path, word in _cases():
        if app_name != name:
            continue
        if path not in screens:
            done = runner.invoke(APPS[name], [*path, "--help"], terminal_width=400,
                                 env={"COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"})
            assert done.exit_code == 0, (path, done.output)
            screens[path] = _flat(done.output)
        if " ".join(word.split()) not in screens[path]:
            missing.append(f"{name} {' '.join(path)}: {word}")
    assert not missing, "help texts whose brackets rich swallowed:\n" + "\n".join(missing)


def test_tributary_algorithm_help_renders() -> None:
    """argparse formats help with %: a stray percent sign breaks --help instead."""
    parser = make_parser()
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    for sub in parsers:
        screen = _flat(sub.format_help())
        for action in sub._actions:
            for match in _BRACKETED.finditer(action.help or ""):
                assert f"[{match.group(1) or match.group(2)}]" in screen, (sub.prog, action.help)
