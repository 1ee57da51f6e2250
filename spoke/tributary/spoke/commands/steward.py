"""``tributary spoke steward``: the site's data steward approves experiments before they run
and reviews results before they leave (when the spoke's ``[steward]`` policy asks for it).

Decisions are written to the spoke's journal database and its audit log; the running spoke
acts on them within a second or so, or when it next starts."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from tributary.spoke.commands.options import ConfigOption, StewardOption

app = typer.Typer(help="The site's data steward: approve or reject experiments before they "
                       "run and results before they are released.", no_args_is_help=True)
console = Console(emoji=False)  # what others wrote is shown as data, never as markup



def _desk(config: Path):  # type: ignore[no-untyped-def]
    from tributary.spoke.config import SpokeConfig
    from tributary.spoke.steward import StewardDesk

    loaded = SpokeConfig.load(config)
    return loaded, StewardDesk(loaded.work_dir / "journal.db")


@app.command("pending")
def pending(config: ConfigOption,
            as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False
            ) -> None:
    """Show what waits for a decision: experiments (algorithm, digest, arguments, cohort
    size, attributes asked for) and results (their output.json)."""
    from tributary.spoke.steward import PENDING

    _, desk = _desk(config)
    try:
        experiments = desk.experiments(PENDING)
        results = desk.results(PENDING)
    finally:
        desk.close()
    if as_json:
        typer.echo(json.dumps({
            "experiments": [{"experiment_id": e.experiment_id, "held_at": e.held_at,
                             **e.summary} for e in experiments],
            "results": [{"experiment_id": r.result.experiment_id, "case_id": r.result.case_id,
                         "status": r.result.status.value, "held_at": r.held_at,
                         "output": r.result.output,
                         "failure": r.result.failure.model_dump(mode="json")
                         if r.result.failure else None,
                         "released": r.result.released} for r in results]}, indent=2))
        return
    if not experiments and not results:
        console.print("nothing waits for the steward")
        return
    for held in experiments:
        table = Table(title=f"experiment {escape(held.experiment_id)} "
                            f"(held {escape(str(held.held_at))} UTC)",
                      show_header=False, title_justify="left")
        table.add_column()
        table.add_column(overflow="fold")  # every character shown, never cut off
        s = held.summary
        for label, value in (
                ("algorithm", s["algorithm"]), ("image digest", s["digest"]),
                ("arguments", json.dumps(s["arguments"])), ("cohort", json.dumps(s["cohort"])),
                ("cohort size", str(s["cohort_size"])),
                ("attributes asked", ", ".join(s["release_requested"]) or "none"),
                ("attributes released", ", ".join(s["release_allowed"]) or "none"),
                ("limits", json.dumps(s["limits"])), ("expires", str(s["expires_at"]))):
            table.add_row(escape(label), escape(value))
        access = s.get("access_request")
        table.add_row("access request", "none" if not access else
                      escape(f"{access['request_id']} \"{access['title']}\": "
                             f"{json.dumps(access['conditions'])}"))
        console.print(table)
    for held_result in results:
        result = held_result.result
        console.print(f"[bold]result[/] experiment {escape(result.experiment_id)} case "
                      f"{escape(result.case_id)}: {escape(result.status.value)} "
                      f"(held {escape(str(held_result.held_at))} UTC)")
        if result.failure:
            console.print(f"  failure: {result.failure.reason.value}: {result.failure.detail}",
                          markup=False)
        # wrapped, never cropped: the steward sees every byte of output.json
        console.print(Syntax(json.dumps(result.output, indent=2), "json", word_wrap=True))
        if result.released:
            console.print(f"  with attributes: {json.dumps(result.released)}", markup=False)
    console.print(f"{len(experiments)} experiment(s), {len(results)} result(s) waiting")


def _decide(config: Path, experiment_id: str, case_id: str | None, approve: bool,
            steward: str | None, reason: str | None, all_results: bool) -> None:
    from tributary.protocol.auditlog import AuditLog
    from tributary.spoke.steward import PENDING, NotPending

    loaded, desk = _desk(config)
    who = steward or getpass.getuser()
    verb = "approved" if approve else "rejected"
    try:
        if all_results:
            cases = [r.result.case_id for r in desk.results(PENDING, experiment_id=experiment_id)]
            if not cases:
                raise NotPending(f"no result of experiment {experiment_id!r} waits")
        else:
            cases = [case_id] if case_id else []
        audit = AuditLog(loaded.work_dir / "audit.jsonl")
        if not cases:
            desk.decide_experiment(experiment_id, approve, who, reason)
            audit.append(who, f"steward.experiment_{verb}", experiment_id, {"reason": reason})
            console.print(f"experiment {experiment_id} {verb}", markup=False)
        for case in cases:
            desk.decide_result(experiment_id, case, approve, who, reason)
            audit.append(who, f"steward.result_{verb}", experiment_id,
                         {"case": case, "reason": reason})
            console.print(f"result of {case} in {experiment_id} {verb}", markup=False)
    except NotPending as exc:
        console.print(f"[red]{escape(str(exc))}[/] (see `tributary spoke steward pending`)")
        raise typer.Exit(1) from None
    finally:
        desk.close()


@app.command("approve")
def approve(
    experiment_id: Annotated[str, typer.Argument(help="The experiment.")],
    config: ConfigOption,
    case_id: Annotated[str | None, typer.Argument(
        help="A case: approve the release of its result instead of the experiment.")] = None,
    all_results: Annotated[bool, typer.Option(
        "--all-results", help="Release every waiting result of the experiment.")] = False,
    steward: StewardOption = None,
    reason: Annotated[str | None, typer.Option(help="A note for the audit log.")] = None,
) -> None:
    """Approve an experiment (it runs) or a result (it is released to the hub)."""
    _decide(config, experiment_id, case_id, True, steward, reason, all_results)


@app.command("reject")
def reject(
    experiment_id: Annotated[str, typer.Argument(help="The experiment.")],
    config: ConfigOption,
    reason: Annotated[str, typer.Option(help="Why; reported to the hub and audited.")],
    case_id: Annotated[str | None, typer.Argument(
        help="A case: withhold its result instead of rejecting the experiment.")] = None,
    all_results: Annotated[bool, typer.Option(
        "--all-results", help="Withhold every waiting result of the experiment.")] = False,
    steward: StewardOption = None,
) -> None:
    """Reject an experiment (nothing runs; the hub is told why) or withhold a result (the
    hub receives no output, only that the steward withheld it and why)."""
    if not reason.strip():
        raise typer.BadParameter("a rejection needs a reason", param_hint="--reason")
    _decide(config, experiment_id, case_id, False, steward, reason, all_results)


def _psi() -> typer.Typer:
    from tributary.spoke.commands.steward_psi import app as psi_app

    return psi_app


app.add_typer(_psi(), name="psi", help="Approve or refuse private set intersections.")
