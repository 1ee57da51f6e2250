"""``tributary pki``: the federation's certificates, from one CA: issue, rotate, watch, revoke.

Heavy imports stay inside the commands so ``tributary --help`` remains fast."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from tributary.services.settings import ServiceSettings

from tributary.cli.hub_client import HubCaOption, HubOption, TokenOption, check, fail, hub_client

app = typer.Typer(help="The federation's certificates: one CA for every party and endpoint.",
                  no_args_is_help=True)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup

OutDir = Annotated[Path, typer.Option("--out", "-o", file_okay=False,
                                      help="The federation's PKI folder (keep it private).")]


StoreOption = Annotated[bool | None, typer.Option(
    "--objectstore/--no-objectstore", show_default=False,
    help="Include the object store of this host's services (TRIBUTARY_STATE_DIR): its "
         "certificates and every party's S3 identity. Default: when it has identities.")]


def _store(include: bool | None) -> ServiceSettings | None:
    from tributary.services import objectstore
    from tributary.services.settings import ServiceSettings

    settings = ServiceSettings()
    if include is None:
        include = objectstore.load_identities(settings) is not None
    return settings if include else None


def _fail(message: str, code: int = 2) -> typer.Exit:
    console.print(f"[red]{escape(message)}[/]")
    return typer.Exit(code)


@app.command("issue")
def issue(
    out: OutDir,
    hub_name: Annotated[list[str] | None, typer.Option(
        "--hub-name", help="A DNS name or address clients dial for the hub side (hub, broker, "
                           "registry, object store); repeatable. Kept from earlier runs.")] = None,
    spoke: Annotated[list[str] | None, typer.Option(
        "--spoke", help="A spoke id to issue an identity for (repeatable).")] = None,
    broker_host: Annotated[str | None, typer.Option(
        help="Address the broker listens on (default 127.0.0.1).")] = None,
    broker_port: Annotated[int | None, typer.Option(help="The broker's stomp+ssl port.")] = None,
    objectstore: StoreOption = None,
) -> None:
    """Issue every certificate the federation needs, keeping those already issued and
    still valid; re-run after a spoke joins."""
    from tributary.services import federation_pki

    try:
        store = _store(objectstore)
        spec = federation_pki.issue(out, hub_names=hub_name, spokes=spoke,
                                    broker_host=broker_host, broker_port=broker_port,
                                    store=store)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"federation PKI in {out.resolve()} for {', '.join(spec.hub_names)}",
                  markup=False)
    for spoke_id in spec.active_spokes:
        console.print("  hand [bold]"
                      f"{escape(str(federation_pki.spoke_identity_dir(out, spoke_id)))}[/] "
                      f"to {escape(spoke_id)}'s administrator only")
    _show(out, store)


@app.command("rotate")
def rotate(
    out: OutDir,
    new_ca: Annotated[bool, typer.Option(
        help="Replace the CA as well (every party then needs the new ca.crt).")] = False,
    objectstore: StoreOption = None,
) -> None:
    """Re-issue every certificate; restart the broker, hub and object store afterwards so
    that they serve the new ones (spokes reconnect by themselves)."""
    from tributary.services import federation_pki

    try:
        store = _store(objectstore)
        federation_pki.issue(out, rotate=True, new_ca=new_ca, store=store)
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    console.print("every certificate re-issued" + (" from a new CA" if new_ca else "")
                  + ("; the object store was restarted with its new ones" if store else ""))
    _show(out, store)


def _show(out: Path, store: ServiceSettings | None = None,
          warn_days: int | None = None) -> int:
    from tributary.services import federation_pki

    table = Table("holder", "purpose", "subject", "serial", "expires", "days left")
    due = 0
    for cert in federation_pki.inventory(out, store):
        late = cert.state != "ok" or (warn_days is not None and cert.days_left < warn_days)
        due += late
        colour = "red" if cert.state == "expired" else "yellow" if late else "green"
        table.add_row(*(escape(v) for v in (cert.holder, cert.purpose, cert.subject,
                                            cert.serial[:16],
                                            cert.not_after.strftime("%Y-%m-%d"))),
                      f"[{colour}]{cert.days_left}[/]")
    console.print(table)
    return due


@app.command("status")
def status(
    out: OutDir,
    warn_days: Annotated[int, typer.Option(
        help="Exit with status 1 if a certificate expires within this many days (for "
             "monitoring).")] = 30,
    objectstore: StoreOption = None,
) -> None:
    """Every certificate of the federation with its expiry."""
    from tributary.services.system import ServiceError

    try:
        due = _show(out, _store(objectstore), warn_days)
    except ServiceError as exc:
        raise _fail(str(exc)) from exc
    if due:
        console.print(f"[yellow]{due} certificate(s) expire within {warn_days} days: "
                      "run `tributary pki rotate`[/]")
        raise typer.Exit(1)


@app.command("revoke")
def revoke(
    spoke_id: Annotated[str, typer.Argument(help="The spoke to take out of the federation.")],
    out: OutDir,
    reason: Annotated[str, typer.Option(help="Why (kept in the hub's audit log).")],
    hub: HubOption,
    token: TokenOption,
    hub_ca: HubCaOption = None,
    objectstore: StoreOption = None,
) -> None:
    """Revoke a spoke everywhere at once: at the hub (its keys, results and registry tokens),
    on the broker (identity withdrawn, broker restarted) and in the object store."""
    from tributary.services import federation_pki
    from tributary.services.system import ServiceError

    with hub_client(hub, token, hub_ca, timeout=30) as client:
        check(client.post(f"/api/spokes/{spoke_id}/revoke", json={"reason": reason}),
              f"revoking {spoke_id} at the hub")
    console.print(f"hub: {spoke_id} revoked (keys, results, registry tokens)", markup=False)
    try:
        store = _store(objectstore)
        restarted = federation_pki.revoke(out, spoke_id, store)
    except (ServiceError, ValueError) as exc:
        fail(str(exc))
    console.print(f"broker: identity withdrawn{', broker restarted' if restarted else ''}")
    if store is not None:
        console.print("object store: identity withdrawn (live)")
