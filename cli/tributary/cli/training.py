"""``tributary training``: launch, list, show and watch federated training studies on a hub,
through its REST API (``/api/training-studies``, the JSON the dashboard reads too), and
export a model with its provenance (:mod:`tributary.cli.training_export`).

The hub address, a bearer token and the CA of the hub's certificate come from options or
``TRIBUTARY_HUB_URL``, ``TRIBUTARY_TOKEN`` and ``TRIBUTARY_HUB_CA_FILE``
(:mod:`tributary.cli.hub_client`)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from tributary.cli.hub_client import HubCaOption, HubOption, TokenOption, check, hub_client
from tributary.cli.training_export import export

app = typer.Typer(help="Launch, list, show, watch and export federated training studies on "
                       "a hub.", no_args_is_help=True)
app.command("export")(export)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup
#: States in which a study has ended; only ``finished`` is a success for ``watch``.
ENDED = ("finished", "stopped_budget", "failed")


@app.command("launch")
def launch(
    model: Annotated[Path | None, typer.Option(
        "--initial-model", exists=True, dir_okay=False,
        help="The initial global model (safetensors).")] = None,
    init_from_algorithm: Annotated[bool, typer.Option(
        "--init-from-algorithm",
        help="Instead of --initial-model: the version's own initialisation (its init task, "
             "run here in the sandbox with no data and no network).")] = False,
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", exists=True, dir_okay=False,
        help="JSON settings of the study (the fields of POST /api/training-studies); the "
             "options below override them.")] = None,
    name: Annotated[str | None, typer.Option(help="The study's name.")] = None,
    algorithm: Annotated[int | None, typer.Option(
        help="The registered algorithm version's id (approved, not revoked).")] = None,
    spoke: Annotated[list[str] | None, typer.Option(help="A spoke (repeatable).")] = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds to run.")] = None,
    strategy: Annotated[str | None, typer.Option(
        help="fedavg, fedprox, or a server optimiser: fedadam, fedyogi, fedadagrad.")] = None,
    server_lr: Annotated[float | None, typer.Option(
        help="Server learning rate of fedadam/fedyogi/fedadagrad (default 0.1).")] = None,
    beta_1: Annotated[float | None, typer.Option(
        help="First-moment decay of the server optimiser (default 0.9).")] = None,
    beta_2: Annotated[float | None, typer.Option(
        help="Second-moment decay of the server optimiser (default 0.99).")] = None,
    tau: Annotated[float | None, typer.Option(
        help="Adaptivity of the server optimiser (default 1e-9).")] = None,
    min_participants: Annotated[int | None, typer.Option(
        help="Fewest spokes a round proceeds with.")] = None,
    round_deadline: Annotated[float | None, typer.Option(
        help="Seconds each stage of a round waits for slow spokes.")] = None,
    clip_bound: Annotated[float | None, typer.Option(help="L2 clipping bound C.")] = None,
    noise_multiplier: Annotated[float | None, typer.Option(
        help="Noise multiplier z (sigma = z C per spoke).")] = None,
    epsilon_budget: Annotated[float | None, typer.Option(help="Privacy budget ε.")] = None,
    delta: Annotated[float | None, typer.Option(help="δ of the (ε, δ) guarantee.")] = None,
) -> None:
    """Launch a training study with an approved algorithm version; prints its id. Spokes
    that cannot take part are listed with the reason, an unknown, unapproved or revoked
    version is refused with the reason, and nothing is launched."""
    body: dict[str, Any] = json.loads(file.read_text()) if file is not None else {}
    if not isinstance(body, dict):
        raise typer.BadParameter("not a JSON object", param_hint="--file")
    given = {"name": name, "algorithm_id": algorithm, "spokes": spoke or None,
             "rounds": rounds, "strategy": strategy, "server_lr": server_lr,
             "beta_1": beta_1, "beta_2": beta_2, "tau": tau,
             "min_participants": min_participants,
             "round_deadline_s": round_deadline, "clip_bound": clip_bound,
             "noise_multiplier": noise_multiplier, "epsilon_budget": epsilon_budget,
             "delta": delta}
    body.update({k: v for k, v in given.items() if v is not None})
    if (model is None) == (not init_from_algorithm):
        raise typer.BadParameter("give either --initial-model or --init-from-algorithm",
                                 param_hint="--initial-model")
    with hub_client(hub, token, hub_ca, timeout=300) as client:
        if model is not None:
            initial = model.read_bytes()
        else:
            initial = _initial_model_of(client, body.get("algorithm_id"))
        body["initial_model_b64"] = base64.b64encode(initial).decode()
        study = check(client.post("/api/training-studies", json=body), "launching")
    console.print(study["id"], highlight=False, markup=False)


def _initial_model_of(client: Any, algorithm_id: Any) -> bytes:
    """The version's own initial model (:mod:`tributary.cli.training_init`); exits 1 with
    the reason if it cannot give one."""
    from tributary.cli.training_init import InitError, initial_model, version_image

    if not isinstance(algorithm_id, int):
        raise typer.BadParameter("--init-from-algorithm needs --algorithm ID",
                                 param_hint="--algorithm")
    try:
        image, version = version_image(client, algorithm_id)
        console.print(f"running {version['name']} {version['version']}'s init task "
                      f"({image}) in the sandbox…", highlight=False, markup=False)
        data, count = initial_model(image)
    except InitError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    console.print(f"initial model from {version['name']} {version['version']}'s init: "
                  f"{count} parameters", highlight=False, markup=False)
    return data


@app.command("list")
def list_(
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
) -> None:
    """The hub's training studies: id, name, state, rounds done, ε spent."""
    from rich.table import Table

    with hub_client(hub, token, hub_ca) as client:
        studies = check(client.get("/api/training-studies"), "listing")
    table = Table("id", "name", "state", "rounds", "ε spent", "spokes")
    for s in studies:
        table.add_row(escape(s["id"]), escape(s["name"]), escape(s["state"]),
                      f"{s['rounds_done']}/{s['rounds']}",
                      f"{s['epsilon_spent']:.4g} / {s['epsilon_budget']:.4g}",
                      escape(", ".join(s["spokes"])))
    console.print(table)


def _show(study: dict[str, Any]) -> None:
    from rich.table import Table

    console.print(f"{study['id']} {study['name']}: {study['state']}"
                  + (f" ({study['stop_reason']})" if study["stop_reason"] else ""),
                  highlight=False, markup=False)
    table = Table("round", "attempt", "stage", "joined", "survivors", "dropouts", "ε round",
                  "ε cumulative", "mean loss")
    for r in study["round_list"]:
        table.add_row(str(r["round"]), str(r["attempt"]), escape(r["stage"]),
                      *(escape(", ".join(r[k])) for k in ("joined", "survivors", "dropouts")),
                      "" if r["epsilon_round"] is None else f"{r['epsilon_round']:.4g}",
                      "" if r["epsilon_cumulative"] is None
                      else f"{r['epsilon_cumulative']:.4g}",
                      "" if r["mean_loss"] is None else f"{r['mean_loss']:.4g}")
    console.print(table)


@app.command("show")
def show(
    study_id: Annotated[str, typer.Argument(help="The training study's id.")],
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="The API's JSON.")] = False,
) -> None:
    """The study and each round attempt: stage, spokes that joined, survivors, dropouts,
    ε per round and cumulative, mean local loss."""
    with hub_client(hub, token, hub_ca) as client:
        study = check(client.get(f"/api/training-studies/{study_id}"), "reading the study")
    if as_json:
        print(json.dumps(study, indent=2))
    else:
        _show(study)


@app.command("watch")
def watch(
    study_id: Annotated[str, typer.Argument(help="The training study's id.")],
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
    interval: Annotated[float, typer.Option(help="Seconds between looks.")] = 2.0,
    timeout: Annotated[float | None, typer.Option(
        help="Give up (exit 2) after this many seconds.")] = None,
) -> None:
    """Print each round as it closes until the study ends. Exit 0 if it finished its
    rounds, 1 if it stopped for another reason (budget spent, failed), 2 on --timeout."""
    seen: set[tuple[int, int, str]] = set()
    started = time.monotonic()
    with hub_client(hub, token, hub_ca) as client:
        while True:
            study = check(client.get(f"/api/training-studies/{study_id}"), "reading")
            for r in study["round_list"]:
                key = (r["round"], r["attempt"], r["stage"])
                if key not in seen and r["stage"] in ("aggregated", "retried", "failed"):
                    seen.add(key)
                    eps = r["epsilon_cumulative"]
                    console.print(
                        f"round {r['round']} attempt {r['attempt']}: {r['stage']}, "
                        f"survivors {len(r['survivors'])}/{len(r['joined'])}"
                        + (f", ε {eps:.4g}" if eps is not None else "")
                        + (f" ({r['outcome_reason']})" if r["outcome_reason"] else ""),
                        highlight=False, markup=False)
            if study["state"] in ENDED:
                break
            if timeout is not None and time.monotonic() - started > timeout:
                console.print(f"{study_id} is still {study['state']} after {timeout} s",
                              markup=False)
                raise typer.Exit(2)
            time.sleep(interval)
    console.print(f"{study_id}: {study['state']}"
                  + (f" ({study['stop_reason']})" if study["stop_reason"] else ""),
                  highlight=False, markup=False)
    if study["state"] != "finished":
        raise typer.Exit(1)
