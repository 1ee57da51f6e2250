"""``tributary contract``: the algorithm contract and the message schemas, as files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(help="The algorithm contract and message schemas.", no_args_is_help=True)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup


@app.command("schemas")
def schemas(
    directory: Annotated[Path, typer.Argument(help="Folder to write the JSON Schemas to.")],
) -> None:
    """Write the JSON Schemas of the algorithm contract and of the messages."""
    from tributary.protocol.schemas import write_schemas

    for path in write_schemas(directory):
        console.print(f"wrote {path}", markup=False)
