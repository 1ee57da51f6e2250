"""``tributary spoke run | init | key``: the agent itself, a starting configuration and
the spoke's key pair."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from tributary.protocol import logs

console = Console(emoji=False)  # outside text is printed as data, not markup
app = typer.Typer(help="Run a spoke next to an institution's data.", no_args_is_help=True)


@app.command("run")
def spoke_run(
    config: Annotated[Path, typer.Option("--config", "-c", exists=True, dir_okay=False,
                                         help="The spoke's TOML configuration file.")],
    verbose: bool = False,
) -> None:
    """Consume this spoke's queue and run experiments until stopped (Ctrl-C or SIGTERM)."""
    from tributary.spoke.agent import SpokeAgent
    from tributary.spoke.config import SpokeConfig
    from tributary.spoke.store import StoreFormatError

    logs.configure(verbose)
    try:
        agent = SpokeAgent(SpokeConfig.load(config))
    except StoreFormatError as exc:
        console.print(f"[red]spoke not started:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: agent.stop())
    agent.run()


@app.command("init")
def spoke_init(
    spoke_id: Annotated[str, typer.Option("--id", help="The spoke's identifier.")],
    data_dir: Annotated[Path, typer.Option(
        "--data", help="Folder of DICOM files, any layout (PACS sources: see docs/data.md).")],
    work_dir: Annotated[Path, typer.Option("--work", help="The spoke's private work folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the config.")],
    hub_key: Annotated[Path, typer.Option(
        "--hub-key", help="The hub's public key (PEM, from GET /api/hub/key), to pin.")],
    broker_port: int = 61613,
    concurrency: int = 2,
) -> None:
    """Write a starting configuration file for a spoke."""
    from tributary.spoke.config import SpokeConfig

    SpokeConfig(spoke_id=spoke_id, data_dir=data_dir, work_dir=work_dir, hub_public_key=hub_key,
                concurrency=concurrency)  # validates before writing
    output.write_text(
        f'spoke_id = "{spoke_id}"\ndata_dir = "{data_dir}"\nwork_dir = "{work_dir}"\n'
        f'hub_public_key = "{hub_key}"\n'
        f"concurrency = {concurrency}\n\n[broker]\nhost = \"127.0.0.1\"\nport = {broker_port}\n\n"
        "[policy]\n# Case attributes that may ever leave with a result, if a study asks.\n"
        "releasable_attributes = []\n# attributes_file = \"attributes.csv\"  # patient_id,...\n\n"
        "[runner]\nmax_memory_mb = 8192\nmax_timeout_seconds = 86400\n"
        "# allowed_registries = [\"registry.example.org\"]\n"
        "\n[execution]\n# Where cases run: \"docker\", \"podman\" (podman_socket) or "
        "\"slurm\" ([execution.slurm]);\n# see docs/spoke.md.\nengine = \"docker\"\n"
        "\n[steward]\n# A local data steward approves experiments / reviews results "
        "(tributary spoke steward).\napprove_experiments = false\nreview_results = false\n"
        "\n[counts]\n# Federated counts below min_cell are reported as \"fewer than "
        "min_cell\".\nenabled = true\nmin_cell = 5\n\n"
        "[deidentification]\n# PS3.15 options on top of the Basic Profile (docs/"
        "deidentification.md);\n# changing them later needs `tributary spoke ingest "
        "--rebuild`.\n# retain_modified_dates = true\n\n"
        "# A PACS as a further source (DICOMweb; keep this file chmod 600):\n"
        "# [[sources]]\n# kind = \"dicomweb\"\n# name = \"pacs\"\n"
        "# url = \"https://pacs.example.org/dicom-web\"\n# username = \"reader\"\n"
        "# password = \"...\"\n"
    )
    console.print(f"wrote {output}", markup=False)


@app.command("key")
def spoke_key(
    config: Annotated[Path, typer.Option("--config", "-c", exists=True, dir_okay=False,
                                         help="The spoke's TOML configuration file.")],
) -> None:
    """Print the spoke's public key (generating its key pair locally on first use), for an
    administrator to enrol on the hub. The private key never leaves the work folder."""
    from tributary.protocol.signing import SigningKey
    from tributary.spoke.config import SpokeConfig

    key = SigningKey.load_or_create(SpokeConfig.load(config).work_dir / "spoke.key")
    typer.echo(key.public.pem, nl=False)
    typer.echo(f"# key id {key.keyid}", err=True)
