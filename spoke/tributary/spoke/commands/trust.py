"""``tributary spoke trust``: the site's data steward decides which algorithm publishers
this spoke trusts, without editing the TOML or restarting. Each decision goes to the
spoke's trust store and its audit log; the running spoke picks it up before its next
experiment and reports it to the hub in its next heartbeat."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from tributary.spoke.commands.options import ConfigOption, StewardOption

app = typer.Typer(help="The publishers whose signed algorithm versions this spoke runs.",
                  no_args_is_help=True)
console = Console(emoji=False)  # names and reasons are data, not markup



def _fail(message: str) -> None:
    console.print(f"[red]{escape(message)}[/]")
    raise typer.Exit(1)


@app.command("add")
def add(
    key: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                        help="The publisher's public key (PEM).")],
    config: ConfigOption,
    reason: Annotated[str, typer.Option(help="Why the site trusts it; audited.")],
    name: Annotated[str, typer.Option(help="The publisher's name, for people.")] = "",
    steward: StewardOption = None,
) -> None:
    """Trust a publisher: versions it signed (and the hub approved) run here from now on."""
    from tributary.protocol.auditlog import AuditLog
    from tributary.spoke.config import SpokeConfig
    from tributary.spoke.trust import TrustError
    from tributary.spoke.trust import add as trust_add

    loaded = SpokeConfig.load(config)
    who = steward or getpass.getuser()
    try:
        entry = trust_add(loaded.work_dir, key.read_bytes()[:8192], name, who, reason)
    except TrustError as exc:
        _fail(str(exc))
        return
    AuditLog(loaded.work_dir / "audit.jsonl").append(
        who, "trust.publisher_added", entry.keyid, {"name": entry.name, "reason": reason})
    console.print(f"publisher {escape(entry.name)} trusted (key id {escape(entry.keyid)}); the "
                  "running spoke reports it in its next heartbeat")


@app.command("remove")
def remove(
    keyid: Annotated[str, typer.Argument(help="The key id (or an unambiguous prefix).")],
    config: ConfigOption,
    reason: Annotated[str, typer.Option(help="Why the site stops trusting it; audited.")],
    steward: StewardOption = None,
) -> None:
    """Stop trusting a publisher added with ``trust add`` (keys in the TOML stay there)."""
    from tributary.protocol.auditlog import AuditLog
    from tributary.spoke.config import SpokeConfig
    from tributary.spoke.trust import TrustError
    from tributary.spoke.trust import remove as trust_remove

    if not reason.strip():
        raise typer.BadParameter("a removal needs a reason", param_hint="--reason")
    loaded = SpokeConfig.load(config)
    who = steward or getpass.getuser()
    try:
        entry = trust_remove(loaded.work_dir, keyid)
    except TrustError as exc:
        _fail(str(exc))
        return
    AuditLog(loaded.work_dir / "audit.jsonl").append(
        who, "trust.publisher_removed", entry.keyid, {"name": entry.name, "reason": reason})
    console.print(f"publisher {escape(entry.name)} no longer trusted "
                  f"(key id {escape(entry.keyid)})")


@app.command("list")
def list_keys(
    config: ConfigOption,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """The publisher keys this spoke trusts: from its TOML and from its trust store."""
    from tributary.protocol.signing import PublicKey
    from tributary.spoke.config import SpokeConfig
    from tributary.spoke.trust import TrustError, read_store

    loaded = SpokeConfig.load(config)
    rows = [{"keyid": PublicKey.load(p).keyid, "name": p.name, "source": "configuration",
             "steward": "", "reason": "", "added_at": ""}
            for p in loaded.trust.publisher_keys]
    try:
        store = read_store(loaded.work_dir)
    except TrustError as exc:
        _fail(str(exc))
        return
    rows += [{"keyid": p.keyid, "name": p.name, "source": "trust store", "steward": p.steward,
              "reason": p.reason, "added_at": p.added_at.isoformat()} for p in store.publishers]
    if as_json:
        typer.echo(json.dumps({"sandbox": loaded.trust.sandbox, "publishers": rows}, indent=2))
        return
    if not rows:
        console.print("no publisher pinned: any version the hub approved runs here")
        return
    table = Table(*(Column(h, overflow="fold") for h in  # key ids whole: a steward
                    ("key id", "name", "from", "steward", "reason", "added")))  # compares them
    for row in rows:
        table.add_row(*(escape(str(row[k])) for k in
                        ("keyid", "name", "source", "steward", "reason", "added_at")))
    console.print(table)
