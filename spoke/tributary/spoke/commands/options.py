"""Options shared by the spoke's commands, defined once so they read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOption = Annotated[Path, typer.Option(
    "--config", "-c", exists=True, dir_okay=False, help="The spoke's TOML configuration file.")]
StewardOption = Annotated[str | None, typer.Option(
    "--steward", "--as", help="Who decides, for the audit log (default: the signed-in user).")]
