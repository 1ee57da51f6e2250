"""``tributary algorithm``: a publisher's tools. Create a signing key, sign a release of an
algorithm image (pinned by digest), check the signatures stored beside an image.

The signing and registry code is imported inside each command so ``tributary --help``
stays fast."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(help="Algorithm versions: publish (build, push, sign, register), list, "
                       "show and review them; publisher keys and release signatures.",
                  no_args_is_help=True)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup

if TYPE_CHECKING:
    from tributary.protocol.registry import RegistryClient


def registry_client(registry: str) -> RegistryClient:
    """A registry client with what the environment gives: ``TRIBUTARY_REGISTRY_CA_FILE``
    (the federation CA of a TLS registry), ``TRIBUTARY_REGISTRY_USERNAME`` and
    ``TRIBUTARY_REGISTRY_PASSWORD`` (your hub account, for a token-protected registry)."""
    from tributary.protocol.registry import RegistryClient

    return RegistryClient(registry, username=os.environ.get("TRIBUTARY_REGISTRY_USERNAME"),
                          password=os.environ.get("TRIBUTARY_REGISTRY_PASSWORD"),
                          ca_file=os.environ.get("TRIBUTARY_REGISTRY_CA_FILE") or None)


@app.command("keygen")
def keygen(
    key: Annotated[Path, typer.Argument(help="Private key file to create (KEY.pub beside it).")],
) -> None:
    """Create a publisher's Ed25519 key pair; register KEY.pub on the hub and give it to
    the spokes that should trust your releases."""
    from tributary.protocol.signing import SigningKey

    if key.exists():
        raise typer.BadParameter(f"{key} exists; refusing to overwrite a key")
    created = SigningKey.load_or_create(key)
    console.print(f"wrote {key} and {key}.pub (key id {created.keyid})", markup=False)


@app.command("sign")
def sign(
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
    from tributary.protocol.registry import RegistryError, split_repository
    from tributary.protocol.release import PREDICATE_TYPE, sign_release
    from tributary.protocol.signing import SigningKey

    if output is None and not push:
        raise typer.BadParameter("give --output FILE, --push, or both")
    repository, _, digest = reference.partition("@")
    AlgorithmRef(name=name, version=version, repository=repository, digest=digest)  # validate
    envelope = sign_release(SigningKey.load(key), repository, digest, name, version, publisher)
    if output is not None:
        output.write_text(json.dumps(envelope, indent=2) + "\n")
        console.print(f"wrote {output}", markup=False)
    if push:
        registry, image = split_repository(repository)
        try:
            with registry_client(registry) as client:
                where = client.attach(image, digest, envelope, PREDICATE_TYPE)
        except RegistryError as exc:
            console.print(f"[red]push failed:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None
        console.print(f"stored in {repository} as {where}", markup=False)


@app.command("verify")
def verify(
    reference: Annotated[str, typer.Argument(help="REPOSITORY@sha256:DIGEST to check.")],
    key: Annotated[list[Path], typer.Option(exists=True, dir_okay=False, help=(
        "Trusted public key (publisher or hub); repeat for several."))],
) -> None:
    """Check the signatures stored beside an image in its registry: which trusted keys
    signed a release or an approval of exactly this digest. Exit 1 if none did."""
    from tributary.protocol.registry import RegistryError, split_repository
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
        with registry_client(registry) as client:
            found = client.attestations(image, digest)
    except (RegistryError, ValueError) as exc:
        console.print(f"[red]cannot read signatures:[/] {escape(str(exc))}")
        raise typer.Exit(1) from None
    verified = 0
    for attestation in found:
        label, check = verifiers.get(attestation.predicate_type, (None, None))
        if check is None:
            console.print(f"  skipped  {attestation.predicate_type}", markup=False)
            continue
        try:
            predicate = check(attestation.envelope, trusted, digest)
        except SignatureError as exc:
            console.print(f"  [red]invalid[/]  {escape(label)}: {escape(str(exc))}")
            continue
        verified += 1
        console.print(f"  [green]verified[/] {escape(label)}: "
                      f"{escape(json.dumps(predicate, sort_keys=True))}")
    if not verified:
        console.print(f"[red]no signature by a trusted key for {escape(reference)}[/]")
        raise typer.Exit(1)


def _assemble() -> None:
    """The developer's and reviewer's commands, each in a module of its own."""
    from tributary.cli import algorithm_publish, algorithm_review, algorithm_try

    app.command("publish")(algorithm_publish.publish)
    app.command("list")(algorithm_review.list_versions)
    app.command("show")(algorithm_review.show)
    app.command("review")(algorithm_review.review)
    app.command("try")(algorithm_try.try_version)
    app.command("spokes")(algorithm_try.spokes)


_assemble()
