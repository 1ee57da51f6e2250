"""``tributary bundle``: verify a study bundle offline, with nothing but the bundle and the
public keys, so anyone handed the bundle can check it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(help="Study bundles: results with custody records, verifiable "
                       "offline.", no_args_is_help=True)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup


@app.command("verify")
def verify(
    bundle: Annotated[Path, typer.Argument(exists=True, help="Bundle folder or .zip.")],
    keys: Annotated[Path, typer.Option(exists=True, file_okay=False, help=(
        "Folder with hub.pub and <spoke_id>.pub public keys, obtained independently."))],
) -> None:
    """Verify a study bundle offline: hub-signed manifest, every file's digest, every
    spoke-signed custody record and its chain; for a training study's bundle, every global
    model's hub signature, the model chain and the epsilon ledger recomputed. Exit 1 on any
    problem."""
    import tempfile
    import zipfile

    from tributary.protocol.bundle import verify_bundle

    with tempfile.TemporaryDirectory() as tmp:
        folder = bundle
        if bundle.is_file():
            try:
                with zipfile.ZipFile(bundle) as archive:
                    archive.extractall(tmp)
            except (zipfile.BadZipFile, OSError) as exc:
                console.print(f"[red]not a readable bundle:[/] {escape(str(exc))}")
                raise typer.Exit(1) from None
            folder = Path(tmp)
        report = verify_bundle(folder, keys)
    for problem in report.problems:
        console.print(f"[red]FAIL[/] {escape(problem)}")
    for note in report.notes:
        console.print(f"[yellow]NOTE[/] {escape(note)}")
    if not report.ok:
        raise typer.Exit(1)
    if report.training_rounds:
        console.print(f"[green]OK[/] training study: {report.training_rounds} round attempts, "
                      "manifest signed by the hub, every global model's signature, the model "
                      "chain and the epsilon ledger verified")
        return
    console.print(f"[green]OK[/] {report.results} results, manifest signed by the hub, "
                  "every custody record verified")
