"""JSON Schemas generated from the pydantic models, so the documented contract can never
drift from the code: ``tributary contract schemas docs/schemas`` rewrites them and a test
checks the committed copies are current."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, TypeAdapter

from tributary.protocol.contract import AlgoArg, Participant, Progress
from tributary.protocol.messages import CountRequest, ExperimentMessage, HubMessage, SpokeMessage
from tributary.protocol.training.contract import (
    RoundSpec,
    TrainingAlgoArg,
    TrainingCohort,
    TrainingOutput,
)
from tributary.protocol.training.provenance import TrainingProvenance

SCHEMAS: dict[str, type[BaseModel] | object] = {
    "algo-arg.schema.json": AlgoArg,
    "participant.schema.json": Participant,
    "progress.schema.json": Progress,
    "training-algo-arg.schema.json": TrainingAlgoArg,
    "training-cohort.schema.json": TrainingCohort,
    "training-round.schema.json": RoundSpec,
    "training-output.schema.json": TrainingOutput,
    "training-provenance.schema.json": TrainingProvenance,
    "experiment-message.schema.json": ExperimentMessage,
    "count-request.schema.json": CountRequest,
    "hub-message.schema.json": HubMessage,
    "result-envelope.schema.json": SpokeMessage,
}


def schema_of(model: type[BaseModel] | object) -> dict:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model.model_json_schema()
    return TypeAdapter(model).json_schema()


def render(name: str) -> str:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              **schema_of(SCHEMAS[name])}
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SCHEMAS:
        path = directory / name
        path.write_text(render(name))
        written.append(path)
    return written
