"""``tributary federation``: a federation authority's membership credentials: create the
authority, issue a spoke's credential, revoke one, publish the status list, and present a
credential to a hub. The authority's folder is ``tributary.protocol.cohorts.authority``'s.

Heavy imports stay inside the commands so ``tributary --help`` remains fast."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tributary.cli.hub_client import HubCaOption, HubOption, TokenOption, check, fail, hub_client

if TYPE_CHECKING:
    from tributary.protocol.cohorts.authority import Authority

app = typer.Typer(help="A federation authority: membership credentials for spokes (W3C "
                       "verifiable credentials), their revocation, and presenting them to "
                       "a hub.", no_args_is_help=True)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup

DirOption = Annotated[Path, typer.Option(
    "--dir", "-d", file_okay=False, envvar="TRIBUTARY_AUTHORITY_DIR",
    help="The authority's folder (its private key: keep it private).")]


def _authority(folder: Path) -> Authority:
    from pydantic import ValidationError

    from tributary.protocol.cohorts.authority import Authority

    try:
        return Authority(folder)
    except (OSError, ValidationError, ValueError) as exc:
        fail(f"{folder} is not a federation authority's folder: {exc}")


@app.command("init")
def init(
    folder: DirOption,
    did: Annotated[str, typer.Option(help="The authority's did:web identifier, e.g. "
                                          "did:web:authority.example.org.")],
    status_url: Annotated[str, typer.Option(
        help="The https URL its status list will be published at (the list's id).")],
    federation: Annotated[str, typer.Option(
        help="The federation's name (the hubs' and spokes' broker namespace).")] = "tributary",
) -> None:
    """Create an authority: its Ed25519 key, its DID document and an empty status list."""
    from tributary.protocol.cohorts.authority import DID_FILE, STATUS_FILE, Authority

    try:
        authority = Authority.init(folder, did, federation, status_url)
    except (FileExistsError, ValueError) as exc:
        fail(str(exc))
    console.print(f"authority {authority.state.did} (key {authority.kid})\n"
                  f"publish {folder / DID_FILE} and {folder / STATUS_FILE}; give both to the "
                  f"hubs (TRIBUTARY_HUB_FEDERATION_AUTHORITIES, "
                  f"TRIBUTARY_HUB_CREDENTIAL_STATUS_LISTS)", markup=False)


@app.command("issue")
def issue(
    folder: DirOption,
    spoke: Annotated[str, typer.Option(help="The spoke's id at the hub.")],
    did: Annotated[str, typer.Option(help="The spoke's did:web identifier.")],
    key: Annotated[list[Path], typer.Option(
        help="A public key the spoke signs with (PEM, as `tributary spoke key` prints it); "
             "repeatable.", dir_okay=False, exists=True)],
    days: Annotated[float, typer.Option(help="Days the credential is valid.", min=0.01,
                                        max=3660)] = 365,
    out: Annotated[Path | None, typer.Option("--out", "-o", dir_okay=False,
                                             help="Also write it here.")] = None,
) -> None:
    """Issue a spoke's membership credential, bound to its id, DID and signing keys."""
    from datetime import timedelta

    from pydantic import ValidationError

    from tributary.protocol.signing import PublicKey, SignatureError

    authority = _authority(folder)
    try:
        keyids = [PublicKey.load(path).keyid for path in key]
        token, path = authority.issue(spoke, did, keyids, timedelta(days=days))
    except (SignatureError, ValidationError, ValueError) as exc:
        fail(f"not issued: {exc}")
    if out is not None:
        out.write_text(token)
    issued = authority.state.issued[-1]
    console.print(f"issued {issued.id} to {spoke} ({did}), valid until "
                  f"{issued.valid_until:%Y-%m-%d %H:%M} UTC: {out or path}", markup=False)


@app.command("revoke")
def revoke(
    folder: DirOption,
    credential: Annotated[str, typer.Argument(help="The credential's id (urn:uuid:...).")],
    reason: Annotated[str, typer.Option(help="Why (kept in the authority's records).")],
) -> None:
    """Revoke a credential and republish the status list: hubs that read the new list
    refuse it at their next check."""
    authority = _authority(folder)
    try:
        issued = authority.revoke(credential, reason)
    except LookupError as exc:
        fail(str(exc))
    console.print(f"revoked {issued.id} ({issued.spoke_id}); give the hubs the new "
                  f"{folder / 'status-list.jwt'}", markup=False)


@app.command("publish")
def publish(
    folder: DirOption,
    days: Annotated[float, typer.Option(help="Days the signed list is valid (hubs refuse "
                                             "every credential once it lapses).",
                                        min=0.01, max=366)] = 7,
) -> None:
    """Sign the current status list again (before the last one lapses)."""
    from datetime import timedelta

    path = _authority(folder).publish(timedelta(days=days))
    console.print(f"status list signed: {path}", markup=False)


@app.command("list")
def list_issued(folder: DirOption) -> None:
    """The credentials this authority issued, revoked or not."""
    table = Table("credential", "spoke", "subject", "valid until", "revoked")
    for issued in _authority(folder).state.issued:
        table.add_row(*(escape(v) for v in (
            issued.id, issued.spoke_id, issued.subject, f"{issued.valid_until:%Y-%m-%d %H:%M}",
            f"{issued.revoked_at:%Y-%m-%d} {issued.revoked_reason}"
            if issued.revoked_at else "")))
    console.print(table)


@app.command("present")
def present(
    spoke: Annotated[str, typer.Argument(help="The spoke's id at the hub.")],
    credential: Annotated[Path, typer.Argument(dir_okay=False, exists=True,
                                               help="Its credential file (a VC-JWT).")],
    hub: HubOption,
    token: TokenOption,
    hub_ca: HubCaOption = None,
) -> None:
    """Present (or renew) a spoke's credential at the hub, as its administrator: the hub
    verifies it now and says why if it refuses it."""
    with hub_client(hub, token, hub_ca, timeout=30) as client:
        read = check(client.put(f"/api/spokes/{spoke}/credential",
                                json={"credential": credential.read_text().strip()}),
                     "credential")
    console.print(f"{spoke}: {read['state']}, issued by {read['issuer']}, valid until "
                  f"{read['valid_until']}", markup=False)
