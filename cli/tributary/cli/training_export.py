"""``tributary training export``: a training study's model out of the hub, checked here
before anything is written: the provenance must carry the hub's signature (and hold
together: model chain, ledgers, epsilon recomputed), the model's bytes must match the
digest in it and the hub's signature over that digest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from tributary.cli.hub_client import HubCaOption, HubOption, TokenOption, check, fail, hub_client

app = typer.Typer(help="Training studies: export a model with its provenance.",
                  no_args_is_help=True)
console = Console(emoji=False)  # what the hub and others wrote is data, not markup

#: The files an export writes.
MODEL_FILE = "model.safetensors"
MODEL_SIGNATURE_FILE = "model.sig.json"
PROVENANCE_FILE = "provenance.json"
PROVENANCE_SIGNATURE_FILE = "provenance.dsse.json"


@app.command("export")
def export(
    study_id: Annotated[str, typer.Argument(help="The training study's id (ts-...).")],
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False,
                                      help="Folder to write the model and provenance into.")],
    index: Annotated[int | None, typer.Option(
        "--index", min=0, help="Which global model: 0 the initial one, k the one after the "
                               "k-th aggregated round (default: the final one).")] = None,
    hub_key: Annotated[Path | None, typer.Option(
        "--hub-key", exists=True, dir_okay=False,
        help="The hub's public key (PEM), obtained independently; default: ask the hub "
             "(GET /api/hub/key, over the connection --hub-ca verifies).")] = None,
    hub: HubOption = "http://127.0.0.1:8000",
    token: TokenOption = "",
    hub_ca: HubCaOption = None,
) -> None:
    """Write MODEL (safetensors), its hub signature, the provenance and the provenance's hub
    signature into OUT; exit 1, writing nothing, if any check fails."""
    from tributary.protocol.messages import ProtocolError
    from tributary.protocol.signing import PublicKey
    from tributary.protocol.training.provenance import check_model, open_provenance, problems

    with hub_client(hub, token, hub_ca) as client:
        if hub_key is not None:
            key = PublicKey.load(hub_key)
        else:
            response = client.get("/api/hub/key")
            if not response.is_success:
                check(response, "reading the hub's key")
            key = PublicKey.from_pem(response.text)
        answer = check(client.get(f"/api/training-studies/{study_id}/provenance"),
                       "provenance")
        try:
            prov = open_provenance(answer["envelope"], key)
        except (ProtocolError, KeyError, TypeError) as exc:
            fail(f"the provenance is not signed by the hub key {key.keyid}: {exc}")
        found = problems(prov, key)
        if found:
            fail("the provenance does not hold together:\n  " + "\n  ".join(found))
        if not prov.models:
            fail(f"study {study_id} has no global model yet")
        if index is not None and index >= len(prov.models):
            fail(f"study {study_id} has models 0 to {len(prov.models) - 1}")
        record = prov.models[-1 if index is None else index]
        response = client.get(f"/api/training-studies/{study_id}/model",
                              params={"index": record.index})
        if not response.is_success:
            check(response, "model download")
        data = response.content
    try:
        check_model(data, record, key)
    except ProtocolError as exc:
        fail(f"refused: {exc}")
    out.mkdir(parents=True, exist_ok=True)
    files = {MODEL_FILE: data, MODEL_SIGNATURE_FILE: record.signature.encode(),
             PROVENANCE_FILE: (prov.model_dump_json(indent=2) + "\n").encode(),
             PROVENANCE_SIGNATURE_FILE: (json.dumps(answer["envelope"], indent=2)
                                         + "\n").encode()}
    for name, content in files.items():
        (out / name).write_bytes(content)
        console.print(f"wrote {out / name}", markup=False)
    console.print(f"[green]OK[/] model {record.index} of {escape(study_id)} "
                  f"({escape(record.digest)}), signed by the hub key {escape(key.keyid)}; "
                  f"{len(prov.rounds)} round attempts, epsilon "
                  f"{prov.epsilon_spent:.4g} at delta {prov.study.delta:g}")
