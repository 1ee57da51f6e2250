"""The ``tributary`` command: local services, the hub, a spoke, and the demo federation."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Tributary: move algorithms to medical imaging data, not data to algorithms.",
    no_args_is_help=True, rich_markup_mode="rich",
)
services_app = typer.Typer(help="Local infrastructure: Docker engine, ActiveMQ broker, OCI "
                                "registry and the algorithm base image.", no_args_is_help=True)
contract_app = typer.Typer(help="The algorithm contract and message schemas.",
                           no_args_is_help=True)
app.add_typer(services_app, name="services")
app.add_typer(__import__("tributary.hub.commands.app", fromlist=["app"]).app, name="hub")
app.add_typer(__import__("tributary.spoke.commands.app", fromlist=["app"]).app, name="spoke")
app.add_typer(contract_app, name="contract")
app.add_typer(__import__("tributary.cli.broker", fromlist=["app"]).app, name="broker")
algorithm_app = typer.Typer(help="Publisher tools: keys and release signatures for algorithm "
                                 "images.", no_args_is_help=True)
app.add_typer(algorithm_app, name="algorithm")
app.add_typer(__import__("tributary.cli.audit", fromlist=["app"]).app, name="audit")
app.add_typer(__import__("tributary.cli.counts", fromlist=["app"]).app, name="counts")
app.add_typer(__import__("tributary.cli.study", fromlist=["app"]).app, name="study")
app.add_typer(__import__("tributary.hub.commands.dlq", fromlist=["app"]).app, name="dlq")
app.add_typer(__import__("tributary.hub.commands.gaps", fromlist=["app"]).app, name="gaps")
console = Console()


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.getLogger("stomp").setLevel(logging.WARNING)


@services_app.command("up")
def services_up() -> None:
    """Install what is missing and start every service (idempotent)."""
    from tributary import services

    services.up(report=lambda name, state: console.print(f"[bold]{name:<11}[/] {state}"))


@services_app.command("down")
def services_down() -> None:
    """Stop the services this project started."""
    from tributary import services

    services.down(report=lambda name, state: console.print(f"[bold]{name:<11}[/] {state}"))


@services_app.command("status")
def services_status() -> None:
    """Show which services are running."""
    from tributary import services

    table = Table("service", "state", "detail")
    rows = services.status()
    for row in rows:
        table.add_row(row.name, "[green]up[/]" if row.running else "[red]down[/]", row.detail)
    console.print(table)
    if not all(r.running for r in rows):
        raise typer.Exit(1)


@algorithm_app.command("keygen")
def algorithm_keygen(
    key: Annotated[Path, typer.Argument(help="Private key file to create (KEY.pub beside it).")],
) -> None:
    """Create a publisher's Ed25519 key pair; register KEY.pub on the hub and give it to
    the spokes that should trust your releases."""
    from tributary.protocol.signing import SigningKey

    if key.exists():
        raise typer.BadParameter(f"{key} exists; refusing to overwrite a key")
    created = SigningKey.load_or_create(key)
    console.print(f"wrote {key} and {key}.pub (key id {created.keyid})")


@algorithm_app.command("sign")
def algorithm_sign(
    reference: Annotated[str, typer.Argument(help="REPOSITORY@sha256:DIGEST to sign.")],
    key: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Publisher key.")],
    name: Annotated[str, typer.Option(help="Algorithm name.")],
    version: Annotated[str, typer.Option(help="Algorithm version.")],
    publisher: Annotated[str, typer.Option(help="Publisher name.")],
    output: Annotated[Path | None, typer.Option("--output", "-o",
                                                help="Envelope file to write.")] = None,
    push: Annotated[bool, typer.Option(help=(
        "Store the signature beside the image in its registry (cosign's attestation "
        "layout: `cosign verify-attestation --key KEY.pub --type "
        "https://tributary.dev/algorithm-release/v1` checks it)."))] = False,
) -> None:
    """Sign a release: a DSSE in-toto statement whose subject is the manifest digest."""
    from tributary.protocol.messages import AlgorithmRef
    from tributary.protocol.registry import RegistryClient, RegistryError, split_repository
    from tributary.protocol.release import PREDICATE_TYPE, sign_release
    from tributary.protocol.signing import SigningKey

    if output is None and not push:
        raise typer.BadParameter("give --output FILE, --push, or both")
    repository, _, digest = reference.partition("@")
    AlgorithmRef(name=name, version=version, repository=repository, digest=digest)  # validate
    envelope = sign_release(SigningKey.load(key), repository, digest, name, version, publisher)
    if output is not None:
        output.write_text(json.dumps(envelope, indent=2) + "\n")
        console.print(f"wrote {output}")
    if push:
        registry, image = split_repository(repository)
        try:
            with RegistryClient(registry) as client:
                where = client.attach(image, digest, envelope, PREDICATE_TYPE)
        except RegistryError as exc:
            console.print(f"[red]push failed:[/] {exc}")
            raise typer.Exit(1) from None
        console.print(f"stored in {repository} as {where}")


@algorithm_app.command("verify")
def algorithm_verify(
    reference: Annotated[str, typer.Argument(help="REPOSITORY@sha256:DIGEST to check.")],
    key: Annotated[list[Path], typer.Option(exists=True, dir_okay=False, help=(
        "Trusted public key (publisher or hub); repeat for several."))],
) -> None:
    """Check the signatures stored beside an image in its registry: which trusted keys
    signed a release or an approval of exactly this digest. Exit 1 if none did."""
    from tributary.protocol.registry import RegistryClient, RegistryError, split_repository
    from tributary.protocol.release import (
        APPROVAL_PREDICATE_TYPE,
        PREDICATE_TYPE,
        verify_approval,
        verify_release,
    )
    from tributary.protocol.signing import PublicKey, SignatureError

    repository, _, digest = reference.partition("@")
    registry, image = split_repository(repository)
    trusted = [PublicKey.load(k) for k in key]
    verifiers = {PREDICATE_TYPE: ("release", verify_release),
                 APPROVAL_PREDICATE_TYPE: ("approval", verify_approval)}
    try:
        with RegistryClient(registry) as client:
            found = client.attestations(image, digest)
    except (RegistryError, ValueError) as exc:
        console.print(f"[red]cannot read signatures:[/] {exc}")
        raise typer.Exit(1) from None
    verified = 0
    for attestation in found:
        label, check = verifiers.get(attestation.predicate_type, (None, None))
        if check is None:
            console.print(f"  skipped  {attestation.predicate_type}")
            continue
        try:
            predicate = check(attestation.envelope, trusted, digest)
        except SignatureError as exc:
            console.print(f"  [red]invalid[/]  {label}: {exc}")
            continue
        verified += 1
        console.print(f"  [green]verified[/] {label}: {json.dumps(predicate, sort_keys=True)}")
    if not verified:
        console.print(f"[red]no signature by a trusted key for {reference}[/]")
        raise typer.Exit(1)


bundle_app = typer.Typer(help="Study bundles: results with custody records, verifiable "
                              "offline.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("verify")
def bundle_verify(
    bundle: Annotated[Path, typer.Argument(exists=True, help="Bundle folder or .zip.")],
    keys: Annotated[Path, typer.Option(exists=True, file_okay=False, help=(
        "Folder with hub.pub and <spoke_id>.pub public keys, obtained independently."))],
) -> None:
    """Verify a study bundle offline: hub-signed manifest, every file's digest, every
    spoke-signed custody record and its chain. Exit 1 on any problem."""
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
                console.print(f"[red]not a readable bundle:[/] {exc}")
                raise typer.Exit(1) from None
            folder = Path(tmp)
        report = verify_bundle(folder, keys)
    for problem in report.problems:
        console.print(f"[red]FAIL[/] {problem}")
    for note in report.notes:
        console.print(f"[yellow]NOTE[/] {note}")
    if not report.ok:
        raise typer.Exit(1)
    console.print(f"[green]OK[/] {report.results} results, manifest signed by the hub, "
                  "every custody record verified")


@contract_app.command("schemas")
def contract_schemas(
    directory: Annotated[Path, typer.Argument(help="Folder to write the JSON Schemas to.")],
) -> None:
    """Write the JSON Schemas of the algorithm contract and of the messages."""
    from tributary.protocol.schemas import write_schemas

    for path in write_schemas(directory):
        console.print(f"wrote {path}")


@app.command("demo")
def demo(
    cases: Annotated[str, typer.Option(help="Cases per spoke, comma-separated.")] = "12,10,8",
    hub_port: int = 8000,
    wait: Annotated[bool, typer.Option(help="Keep the federation running afterwards so the "
                                            "dashboard can be explored.")] = True,
    workdir: Annotated[Path | None, typer.Option(help="Where the demo keeps its files.")] = None,
    containers: Annotated[bool, typer.Option(help=(
        "Run broker, registry, hub and spokes as the containers of docker-compose.yml "
        "instead of processes (at most three spokes)."))] = False,
    broker_port: Annotated[int, typer.Option(help="With --containers: the broker's port.")
                           ] = 61613,
    registry_port: Annotated[int, typer.Option(help="With --containers: the registry's port.")
                             ] = 5000,
) -> None:
    """Run a whole federation here: services, hub, three spokes, one study, results."""
    from tributary.cli.demo import run_demo
    from tributary.services.settings import ServiceSettings

    counts = [int(c) for c in cases.split(",") if c.strip()]
    compose = (ServiceSettings(broker_port=broker_port, registry_port=registry_port)
               if containers else None)
    run_demo(counts, hub_port=hub_port, wait=wait, workdir=workdir, console=console,
             containers=compose)


if __name__ == "__main__":
    app()
