"""``tributary audit``: check and read the forensic audit logs that hubs and spokes write.

Verification needs nothing but the file, so an auditor can run it on a copy anywhere."""

from __future__ import annotations

import json
from collections import deque
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Forensic audit logs: verify a log's hash chain, show its entries.",
                  no_args_is_help=True)

LogArgument = Annotated[Path, typer.Argument(
    exists=True, dir_okay=False, readable=True, metavar="LOG",
    help="A hub or spoke audit log (JSON lines).")]


def _head(value: str | None) -> tuple[int, str] | None:
    if value is None:
        return None
    seq, _, digest = value.partition(":")
    if not seq.isdigit() or len(digest) != 64:
        raise typer.BadParameter("expected SEQ:HASH, as printed by an earlier verify",
                                 param_hint="--expect-head")
    return int(seq), digest.lower()


def _anchored_head(path: Path, source: str) -> tuple[int, str]:
    """The head of ``source`` in an anchors file or a bundle; exit 1 if there is none."""
    from pydantic import ValidationError

    from tributary.protocol.bundle import read_anchors

    try:
        anchors = read_anchors(path)
    except (OSError, ValueError, ValidationError) as exc:
        typer.echo(f"{path}: no usable audit anchors: {exc}", err=True)
        raise typer.Exit(1) from None
    head = anchors.head(source)
    if head is None:
        known = ", ".join(["hub", *sorted(anchors.spokes)]) if anchors.hub else ", ".join(
            sorted(anchors.spokes))
        typer.echo(f"{path}: no anchored head for {source!r} (it has: {known or 'none'})",
                   err=True)
        raise typer.Exit(1)
    return head.seq, head.hash


@app.command("verify")
def verify(
    log: LogArgument,
    expect_head: Annotated[str | None, typer.Option(
        "--expect-head", metavar="SEQ:HASH",
        help="The head an earlier verify printed (kept elsewhere): also detects entries "
             "cut off the end of the log.")] = None,
    anchors: Annotated[Path | None, typer.Option(
        "--anchors", exists=True, metavar="FILE|BUNDLE",
        help="The heads the hub anchored: a saved GET /api/audit/anchors answer, or a study "
             "bundle (folder or zip). Detects a log cut at its end or recreated.")] = None,
    source: Annotated[str, typer.Option(
        "--source", help="Whose log LOG is, for --anchors: 'hub' or a spoke id.")] = "hub",
) -> None:
    """Check the log's hash chain; exit 1 naming the first broken entry."""
    from tributary.protocol.auditlog import verify_log

    if expect_head is not None and anchors is not None:
        raise typer.BadParameter("give --expect-head or --anchors, not both")
    head = _head(expect_head) if anchors is None else _anchored_head(anchors, source)
    report = verify_log(log, head)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


@app.command("show")
def show(
    log: LogArgument,
    action: Annotated[str | None, typer.Option(
        "--action", "-a", help="Only entries with this action; wildcards allowed "
                               "(e.g. 'container.*').")] = None,
    tail: Annotated[int | None, typer.Option(
        "--tail", "-n", min=1, help="Only the last N (matching) entries.")] = None,
    raw: Annotated[bool, typer.Option("--json", help="Print the entries as JSON lines.")] = False,
) -> None:
    """Print the log's entries (without verifying them: use `verify` for that)."""
    from tributary.protocol.auditlog import read_entries

    shown: deque[str] = deque(maxlen=tail)
    for number, entry in read_entries(log):
        if entry is None:
            typer.echo(f"line {number}: not a JSON entry (run `tributary audit verify`)",
                       err=True)
            continue
        if action is not None and not fnmatchcase(str(entry.get("action", "")), action):
            continue
        shown.append(json.dumps(entry, sort_keys=True) if raw else (
            f"{entry.get('seq', '?'):>6}  {entry.get('at', '')}  {entry.get('actor', '')}  "
            f"{entry.get('action', '')}  {entry.get('target', '')}  "
            f"{json.dumps(entry.get('detail', {}), sort_keys=True)}"))
    for line in shown:
        typer.echo(line)
