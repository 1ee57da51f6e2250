"""Sub-commands of ``tributary``, one Typer app per module, registered in ``tributary.cli``."""
