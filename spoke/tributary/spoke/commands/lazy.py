"""The spoke's commands imported when they are used, so that ``tributary spoke
deidentify`` (or ``tributary-spoke run``) does not import and build the steward's, the
trust store's or the catalog's commands first: typer builds every command of a group
when the program starts. The same mechanism as the operator's ``tributary`` command has;
a spoke installs without that command, so it has its own."""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import typer
from typer.core import TyperGroup


class LazyCommands(TyperGroup):
    """A group whose subcommands are ``name -> "module:attribute"`` (a ``typer.Typer`` or
    a command function), imported on first use; listing them (``--help``) imports all."""

    lazy: ClassVar[dict[str, str]] = {}

    def list_commands(self, ctx: Any) -> list[str]:
        return [*super().list_commands(ctx), *(n for n in self.lazy if n not in self.commands)]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module, _, attribute = self.lazy[cmd_name].partition(":")
            obj = getattr(importlib.import_module(module), attribute)
            if isinstance(obj, typer.Typer):
                command = typer.main.get_group(obj)
            else:
                single = typer.Typer(add_completion=False)
                single.command(cmd_name)(obj)
                command = typer.main.get_command(single)
            command.name = cmd_name
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)


def commands(**targets: str) -> type[LazyCommands]:
    """A :class:`LazyCommands` class with these subcommands, for ``typer.Typer(cls=...)``."""
    return type("SpokeCommands", (LazyCommands,), {"lazy": targets})
