"""``tributary algorithm publish``: from an algorithm folder to a version waiting for review
in one command: build (unless an image is given), push, sign the release with the
publisher's key (stored beside the image and handed to the hub), register the version with
its argument schema and aggregator, and print where reviewers review it.

What is registered comes from the folder's ``algorithm.toml`` (``tributary-algorithm init``
writes one); options override it. Everything the hub would refuse is checked first, before
anything is built or pushed: the publisher key must be registered and the version new."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.markup import escape

from tributary.cli.hub_client import HubCaOption, HubOption, TokenOption, check, fail, hub_client

console = Console(emoji=False)  # what the hub and others wrote is data, not markup
MANIFEST = "algorithm.toml"


class AlgorithmManifest(BaseModel):
    """``algorithm.toml``: what the hub registers for a version of this algorithm."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100, pattern=r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")
    version: str = Field(min_length=1, max_length=50, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    description: str = ""
    aggregator: str = "summary"
    #: The JSON Schema of the arguments, relative to the folder (shipped in the image too).
    arguments_schema: str = "arguments.schema.json"


def load_manifest(directory: Path, overrides: dict[str, Any]) -> AlgorithmManifest:
    """The folder's manifest with the command line's values on top, or exit with why."""
    path = directory / MANIFEST
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            fail(f"{path}: {exc}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return AlgorithmManifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                             for e in exc.errors())
        fail(f"{path if path.is_file() else 'the options'}: {problems} (give --name and "
             f"--version, or write {MANIFEST})")


def _schema(directory: Path, manifest: AlgorithmManifest) -> dict[str, Any]:
    path = directory / manifest.arguments_schema
    if not path.is_file():
        return {}
    try:
        schema = json.loads(path.read_text())
    except ValueError as exc:
        fail(f"{path} is not valid JSON: {exc}")
    if not isinstance(schema, dict):
        fail(f"{path} must hold a JSON object (a JSON Schema)")
    return schema


def publish(
    directory: Annotated[Path, typer.Argument(
        file_okay=False, help="The algorithm folder (Dockerfile, algorithm.toml).")] = Path("."),
    key: Annotated[Path, typer.Option(
        envvar="TRIBUTARY_PUBLISHER_KEY", exists=True, dir_okay=False,
        help="Your publisher key (`tributary algorithm keygen`), registered at the hub.")
    ] = Path("publisher.key"),
    registry: Annotated[str, typer.Option(
        envvar="TRIBUTARY_REGISTRY", help="The federation's registry (host:port).")
    ] = "127.0.0.1:5000",
    repository: Annotated[str | None, typer.Option(
        help="Where to push, without tag (default: REGISTRY/algorithms/NAME).")] = None,
    image: Annotated[str | None, typer.Option(
        help="Publish this local image instead of building DIR.")] = None,
    base_image: Annotated[str | None, typer.Option(
        envvar="TRIBUTARY_BASE_IMAGE",
        help="When building: the BASE_IMAGE build argument.")] = None,
    name: Annotated[str | None, typer.Option(help="Overrides algorithm.toml.")] = None,
    version: Annotated[str | None, typer.Option(help="Overrides algorithm.toml.")] = None,
    description: Annotated[str | None, typer.Option(help="Overrides algorithm.toml.")] = None,
    aggregator: Annotated[str | None, typer.Option(
        help="Overrides algorithm.toml: how the hub pools outputs (summary, "
             "binary-classification, nodule-detection).")] = None,
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
) -> None:
    """Build, push, sign and register a version; prints its review link. Registry
    credentials and CA: TRIBUTARY_REGISTRY_USERNAME, TRIBUTARY_REGISTRY_PASSWORD,
    TRIBUTARY_REGISTRY_CA_FILE."""
    from tributary.cli.algorithm import registry_client
    from tributary.protocol.registry import RegistryError, split_repository
    from tributary.protocol.release import PREDICATE_TYPE, sign_release
    from tributary.protocol.signing import SignatureError, SigningKey
    from tributary_algorithm.tools import ToolError, build_image, push_image

    manifest = load_manifest(directory, {"name": name, "version": version,
                                         "description": description, "aggregator": aggregator})
    schema = _schema(directory, manifest)
    try:
        signing_key = SigningKey.load(key)
    except (SignatureError, ValueError, TypeError, OSError) as exc:
        fail(f"{key} is not a publisher key: {exc}")
    repository = repository or f"{registry}/algorithms/{manifest.name}"
    label = f"{manifest.name} {manifest.version}"
    with hub_client(hub, token, hub_ca) as client:
        publishers = check(client.get("/api/publishers"), "reading the publishers")
        publisher = next((p for p in publishers if p["keyid"] == signing_key.keyid), None)
        if publisher is None:
            fail(f"the key {key} (id {signing_key.keyid[:16]}…) is not a registered publisher "
                 f"at {hub}; an administrator registers it with `tributary publisher register "
                 f"NAME --key {key}.pub` or on the dashboard's Algorithms page")
        console.print(f"publisher   {escape(publisher['name'])} "
                      f"(key {escape(signing_key.keyid[:16])}…)")
        versions = [a for a in check(client.get("/api/algorithms"), "reading the algorithms")
                    if a["name"] == manifest.name]
        taken = [a for a in versions if a["version"] == manifest.version]
        if taken:
            fail(f"{label} is already registered (id {taken[0]['id']}); a new image is a new "
                 "version: raise `version` in algorithm.toml or pass --version")
        try:
            if image is None:
                image = f"{manifest.name}:{manifest.version}"
                with console.status(escape(f"building {directory} as {image}…")):
                    built = build_image(directory, image, base_image=base_image)
                console.print(f"built       {image} ({built.image_id[:19]}…)", markup=False)
            with console.status(escape(f"pushing {image}…")):
                repository, digest = push_image(
                    image, f"{repository}:{manifest.version}",
                    username=os.environ.get("TRIBUTARY_REGISTRY_USERNAME"),
                    password=os.environ.get("TRIBUTARY_REGISTRY_PASSWORD"))
        except ToolError as exc:
            fail(str(exc))
        console.print(f"pushed      {repository}@{digest}", soft_wrap=True, markup=False)
        same = next((a for a in versions if a["digest"] == digest), None)
        if same is not None:
            fail(f"this image ({digest}) is already registered as {manifest.name} "
                 f"{same['version']} (id {same['id']}): nothing changed since, so there is "
                 "nothing new to publish (rebuild after your change)")
        release = sign_release(signing_key, repository, digest, manifest.name,
                               manifest.version, publisher["name"])
        host, path = split_repository(repository)
        try:
            with registry_client(host) as registry_api:
                registry_api.attach(path, digest, release, PREDICATE_TYPE)
        except RegistryError as exc:
            fail(f"the release signature could not be stored beside the image: {exc}")
        console.print(f"signed      release {label}, stored beside the image", markup=False)
        response = client.post("/api/algorithms", json={
            "name": manifest.name, "version": manifest.version, "repository": repository,
            "digest": digest, "description": manifest.description,
            "argument_schema": schema, "aggregator": manifest.aggregator,
            "release_signature": release})
        created = check(response, "registration")
    if notice := response.headers.get("X-Tributary-Notice"):
        console.print(f"[yellow]note[/]        {escape(notice)}", soft_wrap=True)
    console.print(f"registered  {label} as id {created['id']} (aggregator "
                  f"{manifest.aggregator}, argument schema "
                  f"{manifest.arguments_schema if schema else 'none'})", markup=False)
    console.print(f"review it   {hub.rstrip('/')}/algorithms/{created['id']}", soft_wrap=True,
                  markup=False)
    console.print(f"            or: tributary algorithm review {created['id']} --approve "
                  "(reviewers; the review rule decides how many)")
    typer.echo(created["id"])
