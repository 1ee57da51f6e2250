"""``tributary study``: a coordinator's common tasks from a terminal, through the hub's REST
API (the same endpoints the dashboard uses): launch a study, watch it, show its aggregated
results, fetch them as files.

The hub address, a bearer token and the CA of the hub's certificate come from options or
``TRIBUTARY_HUB_URL``, ``TRIBUTARY_TOKEN`` (``POST /api/auth/token`` issues one) and
``TRIBUTARY_HUB_CA_FILE`` (:mod:`tributary.cli.hub_client`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tributary.cli.hub_client import HubCaOption, HubOption, TokenOption, check, hub_client

if TYPE_CHECKING:  # httpx is imported when a command talks to the hub, not for --help
    import httpx

app = typer.Typer(help="Launch, watch and fetch federated studies on a hub.",
                  no_args_is_help=True)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup

def _json_option(value: str | None, what: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint=what) from None


@app.command("launch")
def launch(
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", exists=True, dir_okay=False,
        help="JSON body of POST /api/experiments; the options below override its fields.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="The study's name.")] = None,
    algorithm: Annotated[int | None, typer.Option(help="Algorithm version id.")] = None,
    spoke: Annotated[list[str] | None, typer.Option(help="Target spoke (repeatable).")] = None,
    arguments: Annotated[str | None, typer.Option(help="Algorithm arguments, JSON.")] = None,
    cohort: Annotated[str | None, typer.Option(help="Cohort criteria, JSON.")] = None,
    release: Annotated[list[str] | None, typer.Option(
        help="Case attribute the spokes may release with results (repeatable).")] = None,
    expires_in_days: Annotated[float | None, typer.Option(help="Expiry, in days.")] = None,
    timeout: Annotated[int | None, typer.Option(
        help="Seconds each case may run (each site caps it).")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="Memory per case, MB.")] = None,
    cpus: Annotated[float | None, typer.Option(help="CPUs per case.")] = None,
    gpus: Annotated[int | None, typer.Option(
        help="GPUs per case; a spoke with fewer refuses the study and says why.")] = None,
    tmp_mb: Annotated[int | None, typer.Option(
        help="Size of each case's /tmp, MB (unset: the site's default; each site caps it).")
    ] = None,
    draft: Annotated[bool, typer.Option(help="Create it without launching.")] = False,
    watch_it: Annotated[bool, typer.Option("--watch", help="Then watch it until done.")] = False,
) -> None:
    """Create a study (checked by the hub: approved algorithm, valid arguments, enrolled
    spokes) and launch it; prints its id."""
    body: dict[str, Any] = json.loads(file.read_text()) if file else {}
    limits = {k: v for k, v in {"timeout_seconds": timeout, "memory_mb": memory_mb,
                                "cpus": cpus, "gpus": gpus, "tmp_mb": tmp_mb}.items()
              if v is not None}
    if limits:
        body["limits"] = {**(body.get("limits") or {}), **limits}
    overrides = {"name": name, "algorithm_id": algorithm, "spoke_ids": spoke,
                 "arguments": _json_option(arguments, "--arguments"),
                 "cohort": _json_option(cohort, "--cohort"), "release": release,
                 "expires_in_days": expires_in_days}
    body.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("name", "algorithm_id", "spoke_ids") if not body.get(k)]
    if missing:
        raise typer.BadParameter(f"missing {', '.join(missing)} (options or --file)")
    with hub_client(hub, token, hub_ca) as client:
        experiment = check(client.post("/api/experiments", json=body), "creation")
        console.print(f"created [bold]{escape(experiment['id'])}[/] "
                      f"({escape(experiment['name'])})")
        if not draft:
            check(client.post(f"/api/experiments/{experiment['id']}/launch"), "launch")
            console.print(f"launched to {', '.join(body['spoke_ids'])}", markup=False)
    typer.echo(experiment["id"])
    if watch_it and not draft:
        watch(experiment["id"], hub, token, hub_ca)


def _events(client: httpx.Client, experiment_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event, data) pairs from the experiment's server-sent event stream."""
    with client.stream("GET", f"/api/experiments/{experiment_id}/events") as response:
        if not response.is_success:
            response.read()
            check(response, "watching")
        event, data = "message", ""
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif line == "":
                if data:
                    yield event, json.loads(data)
                event, data = "message", ""


@app.command("watch")
def watch(
    experiment_id: Annotated[str, typer.Argument(help="The experiment's id.")],
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
) -> None:
    """A progress bar per spoke until the study is over. Exit 1 if any spoke refused it or
    any case failed, each reason printed in full (a case's log tail too, where the site
    releases it)."""
    with hub_client(hub, token, hub_ca, timeout=None) as client:
        with Progress(
            # spoke ids and states come from the hub: data, not markup
            TextColumn("{task.description:<24}", markup=False), BarColumn(),
            MofNCompleteColumn(), TextColumn("{task.fields[detail]}", markup=False),
            TimeElapsedColumn(), console=console,
        ) as progress:
            tasks: dict[str, Any] = {}
            latest: dict[str, dict[str, Any]] = {}
            state = "unknown"
            for event, data in _events(client, experiment_id):
                if event != "progress":
                    continue
                experiment = data["experiment"]
                state = experiment["state"]
                # The first event has every target; later ones (delta) only those changed.
                latest.update({t["spoke_id"]: t for t in experiment["targets"]})
                for target in experiment["targets"]:
                    spoke = target["spoke_id"]
                    if spoke not in tasks:
                        tasks[spoke] = progress.add_task(spoke, total=None, detail="")
                    done = target["succeeded"] + target["failed"]
                    detail = f"{target['state']}"
                    if target["failed"]:
                        detail += f", {target['failed']} failed"
                    progress.update(tasks[spoke], completed=done, total=target["case_count"],
                                    detail=detail)
        failed_cases = (_failed_cases(client, experiment_id)
                        if any(t["failed"] for t in latest.values()) else [])
    problems = report_problems(experiment_id, state, list(latest.values()), failed_cases)
    if problems:
        raise typer.Exit(1)


def _failed_cases(client: httpx.Client, experiment_id: str) -> list[dict[str, Any]]:
    """Every failed case of the study (all pages)."""
    response = client.get(f"/api/experiments/{experiment_id}/cases",
                          params={"state": "failed", "limit": 1000})
    cases: list[dict[str, Any]] = check(response, "failed cases")
    while "next" in response.links:
        response = client.get(response.links["next"]["url"])
        cases += check(response, "failed cases")
    return cases


def report_problems(experiment_id: str, state: str, targets: list[dict[str, Any]],
                    failed_cases: list[dict[str, Any]]) -> int:
    """Print the study's ending: every refusal and every failed case with its reason in
    full. Returns how many problems there were (0: every target completed cleanly)."""
    refused = [t for t in targets if t["state"] in ("refused", "cancelled")]
    failed = sum(t["failed"] for t in targets)
    console.print(f"{escape(experiment_id)} is [bold]{escape(state)}[/]"
                  + (f", [red]{len(refused)} of {len(targets)} spoke(s) did not run it[/]"
                     if refused else "")
                  + (f", [red]{failed} case(s) failed[/]" if failed else ""))
    for target in refused:
        console.print(f"[red]{escape(target['spoke_id'])} {escape(target['state'])}:[/] "
                      f"{escape(target.get('reason') or 'no reason given')}",
                      soft_wrap=True, highlight=False)
    for case in failed_cases:
        failure = case.get("failure") or {}
        exit_code = failure.get("exit_code")
        console.print(f"[red]{escape(case['spoke_id'])} case {escape(case['case_id'])} failed "
                      f"({escape(str(failure.get('reason', '?')))}"
                      + (f", exit code {exit_code}" if exit_code is not None else "")
                      + "):[/] " + escape(failure.get("detail") or ""),
                      soft_wrap=True, highlight=False)
        limits = {k: v for k, v in (failure.get("applied_limits") or {}).items()
                  if v is not None}
        if limits:
            console.print("  ran under: " + escape(", ".join(f"{k} {v}" for k, v
                                                              in sorted(limits.items()))),
                          soft_wrap=True, highlight=False)
        discarded = failure.get("discarded_files") or []
        if discarded:
            console.print("  discarded: " + escape(", ".join(
                f"{f.get('name')} ({f.get('size_bytes')} B)" for f in discarded)),
                soft_wrap=True, highlight=False)
        if failure.get("log_withheld"):
            console.print("  log tail withheld by the site's policy", highlight=False)
        elif failure.get("log_tail"):
            console.print(escape(failure["log_tail"].rstrip()), soft_wrap=True,
                          highlight=False, style="dim")
    return len(refused) + failed


@app.command("list")
def list_(
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
) -> None:
    """The hub's studies: id, name, state, algorithm and target spokes."""
    from rich.table import Table

    with hub_client(hub, token, hub_ca) as client:
        experiments = check(client.get("/api/experiments"), "listing")
    table = Table("id", "name", "state", "algorithm", "spokes")
    for experiment in experiments:
        table.add_row(*(escape(str(v)) for v in (
            experiment["id"], experiment["name"], experiment["state"], experiment["algorithm"],
            ", ".join(t["spoke_id"] for t in experiment["targets"]))))
    console.print(table)


@app.command("show")
def show(
    experiment_id: Annotated[str, typer.Argument(help="The experiment's id.")],
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="The aggregate report as JSON.")
                       ] = False,
) -> None:
    """The study's state and its aggregated results: per spoke and pooled, each figure with
    its confidence interval, small cells suppressed (as on the dashboard)."""
    from tributary.cli.results_table import aggregate_table

    with hub_client(hub, token, hub_ca) as client:
        experiment = check(client.get(f"/api/experiments/{experiment_id}"), "study")
        report = check(client.get(f"/api/experiments/{experiment_id}/aggregate"),
                        "aggregate")
        failed_cases = ([] if as_json or not any(t["failed"] for t in experiment["targets"])
                        else _failed_cases(client, experiment_id))
    if as_json:
        console.print_json(json.dumps(report))
        return
    done = sum(t["succeeded"] + t["failed"] for t in experiment["targets"])
    counts = [t["case_count"] for t in experiment["targets"]]
    total = "?" if None in counts else sum(counts)  # a spoke has not selected its cohort
    console.print(f"[bold]{escape(experiment['name'])}[/] ({escape(experiment_id)}): "
                  f"{escape(experiment['state'])}, "
                  f"{done}/{total} cases finished")
    console.print(aggregate_table(report))
    if failed_cases or any(t["state"] in ("refused", "cancelled") for t in experiment["targets"]):
        # Each failed case as the developer needs it: reason, exit code, limits it ran
        # under, discarded files, and its log tail or that the site withheld it.
        report_problems(experiment_id, experiment["state"], experiment["targets"],
                        failed_cases)


@app.command("fetch")
def fetch(
    experiment_id: Annotated[str, typer.Argument(help="The experiment's id.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write into.")] = Path("."),
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
    bundle: Annotated[bool, typer.Option(help="Also the signed study bundle (zip).")] = False,
) -> None:
    """Write the study, its cases and its aggregate (JSON, and CSV exports of the aggregate,
    the case results and ROC points) to files in OUT, and optionally the signed bundle."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with hub_client(hub, token, hub_ca) as client:
        for name, path in (("experiment", ""), ("cases", "/cases?limit=1000"),
                           ("aggregate", "/aggregate")):
            response = client.get(f"/api/experiments/{experiment_id}{path}")
            data = check(response, f"{name} fetch")
            while name == "cases" and "next" in response.links:  # paginated: every page
                response = client.get(response.links["next"]["url"])
                data += check(response, f"{name} fetch")
            target = out / f"{experiment_id}-{name}.json"
            target.write_text(json.dumps(data, indent=2) + "\n")
            written.append(target)
        for name in ("aggregate.csv", "results.csv", "roc.csv"):
            response = client.get(f"/api/experiments/{experiment_id}/{name}")
            if not response.is_success:
                check(response, f"{name} export")
            target = out / f"{experiment_id}-{name}"
            target.write_bytes(response.content)
            written.append(target)
        if bundle:
            response = client.get(f"/api/experiments/{experiment_id}/bundle")
            if not response.is_success:
                check(response, "bundle export")
            target = out / f"tributary-{experiment_id}.zip"
            target.write_bytes(response.content)
            written.append(target)
    for path in written:
        console.print(f"wrote {path}", markup=False)
