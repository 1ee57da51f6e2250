"""A training study's bundle: its provenance (settings, every round attempt with its
participants, survivors and epsilon, every global model's digest with the hub's signature),
its epsilon ledger per spoke and its model digests, in an RO-Crate with the same SHA-256
manifest signed by the hub as an experiment's bundle, so ``tributary bundle verify`` checks
it offline with the hub's public key. The models themselves are not in it (they may be
large): their digests and signatures are, and ``tributary training export`` fetches them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from tributary.protocol.bundle import TRAINING_STUDY, sign_manifest
from tributary.protocol.signing import PublicKey, SigningKey
from tributary.protocol.training.privacy import PrivacyLedger
from tributary.protocol.training.provenance import ModelRecord, TrainingProvenance, problems

LEDGER = "epsilon-ledger.json"
MODELS = "models.json"

_LEDGERS = TypeAdapter(dict[str, PrivacyLedger])
_MODELS = TypeAdapter(list[ModelRecord])


def _dump(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"


def write_training_bundle(out: Path, prov: TrainingProvenance, hub_key: SigningKey) -> Path:
    """Write the bundle folder ``out`` (which must not exist) and sign its manifest."""
    out.mkdir(parents=True, exist_ok=False)
    (out / TRAINING_STUDY).write_text(_dump(prov.model_dump(mode="json")))
    (out / LEDGER).write_text(_dump(_LEDGERS.dump_python(prov.ledgers, mode="json")))
    (out / MODELS).write_text(_dump(_MODELS.dump_python(prov.models, mode="json")))
    parts = [{"@id": TRAINING_STUDY, "@type": "File", "name": "Training provenance",
              "encodingFormat": "application/json"},
             {"@id": LEDGER, "@type": "File", "name": "Epsilon ledger per spoke"},
             {"@id": MODELS, "@type": "File", "name": "Global model digests, hub-signed"}]
    crate = {"@context": "https://w3id.org/ro/crate/1.1/context", "@graph": [
        {"@id": "ro-crate-metadata.json", "@type": "CreativeWork", "about": {"@id": "./"},
         "conformsTo": [{"@id": "https://w3id.org/ro/crate/1.1"}]},
        {"@id": "./", "@type": "Dataset", "name": f"Tributary training study {prov.study.id}",
         "description": prov.study.name, "hasPart": [{"@id": p["@id"]} for p in parts]},
        *parts]}
    (out / "ro-crate-metadata.json").write_text(_dump(crate))
    sign_manifest(out, hub_key)
    return out


def _load(folder: Path, name: str, parse: Any) -> Any:
    return parse((folder / name).read_bytes())


def check_training_bundle(folder: Path, hub: PublicKey) -> tuple[int, list[str]]:
    """(round attempts checked, problems) of a training bundle whose manifest has already
    been verified: the provenance against the hub's key (model signatures, the model chain,
    the ledgers against the rounds, epsilon recomputed with dp-accounting), and the ledger
    and model files against the provenance."""
    try:
        prov: TrainingProvenance = _load(folder, TRAINING_STUDY,
                                         TrainingProvenance.model_validate_json)
    except (OSError, ValidationError) as exc:
        return 0, [f"{TRAINING_STUDY}: unusable: {exc}"]
    found = problems(prov, hub)
    for name, adapter, expected in ((LEDGER, _LEDGERS, prov.ledgers),
                                    (MODELS, _MODELS, prov.models)):
        try:
            value = _load(folder, name, adapter.validate_json)
        except (OSError, ValidationError) as exc:
            found.append(f"{name}: unusable: {exc}")
            continue
        if _plain(value, adapter) != _plain(expected, adapter):
            found.append(f"{name}: differs from {TRAINING_STUDY}")
    return len(prov.rounds), found


def _plain(value: Any, adapter: TypeAdapter[Any]) -> Any:
    return adapter.dump_python(value, mode="json") if not isinstance(value, BaseModel) else (
        value.model_dump(mode="json"))
