"""Command groups imported when they are used, so that ``tributary spoke deidentify``
does not import and build the hub's, the study's or the PKI's commands first (typer
builds every command of a group when the program starts).

``tributary --help`` still lists every group: listing imports them all, once."""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import typer
from typer.core import TyperGroup


class LazyGroup(TyperGroup):
    """A group whose subcommands are ``name -> "module:attribute"`` (a ``typer.Typer``
    or a command function), imported on first use."""

    lazy: ClassVar[dict[str, str]] = {}

    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *(n for n in self.lazy if n not in self.commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            self.add_command(load(self.lazy[cmd_name], cmd_name), cmd_name)
        return super().get_command(ctx, cmd_name)


def load(target: str, name: str) -> Any:
    """The click command of ``module:attribute``, as ``add_typer`` or ``command`` would
    have mounted it under ``name``."""
    module, _, attribute = target.partition(":")
    obj = getattr(importlib.import_module(module), attribute)
    if isinstance(obj, typer.Typer):
        command = typer.main.get_group(obj)  # a group even with one command, as add_typer
    else:
        single = typer.Typer(rich_markup_mode="rich", add_completion=False)
        single.command(name)(obj)
        command = typer.main.get_command(single)
    command.name = name
    return command


def groups(**targets: str) -> type[LazyGroup]:
    """A :class:`LazyGroup` class with these subcommands, for ``typer.Typer(cls=...)``."""
    return type("Groups", (LazyGroup,), {"lazy": targets})


def no_options() -> None:
    """The top-level command takes no options of its own (a callback makes it a group)."""
