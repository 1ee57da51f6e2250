"""Argument validation against an algorithm's JSON Schema (the supported subset)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tributary_algorithm import InvalidArguments, SchemaError, load_context, validate_arguments

SCHEMA = {
    "type": "object",
    "properties": {
        "min_diameter_mm": {"type": "number", "default": 4, "minimum": 0, "maximum": 100},
        "threshold_hu": {"type": "number", "default": -400, "exclusiveMaximum": 0},
        "mode": {"type": "string", "enum": ["fast", "thorough"], "default": "fast"},
        "labels": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "iterations": {"type": "integer", "minimum": 1},
    },
    "required": [],
    "additionalProperties": False,
}


def test_defaults_are_filled_in() -> None:
    assert validate_arguments({}, SCHEMA) == {
        "min_diameter_mm": 4,
        "threshold_hu": -400,
        "mode": "fast",
    }
    assert validate_arguments({"min_diameter_mm": 6.5}, SCHEMA)["min_diameter_mm"] == 6.5


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"min_diameter_mm": "4"}, "min_diameter_mm must be of type number"),
        ({"min_diameter_mm": True}, "min_diameter_mm must be of type number"),
        ({"min_diameter_mm": -1}, "min_diameter_mm must be >= 0"),
        ({"threshold_hu": 0}, "threshold_hu must be < 0"),
        ({"mode": "slow"}, "mode must be one of"),
        ({"labels": ["a", 1]}, r"labels\[1\] must be of type string"),
        ({"labels": ["a", "b", "c"]}, "at most 2 items"),
        ({"iterations": 1.5}, "iterations must be of type integer"),
        ({"min_diamter_mm": 4}, "min_diamter_mm is not a known argument"),
    ],
)
def test_problems_are_reported(arguments, message: str) -> None:
    with pytest.raises(InvalidArguments, match=message) as caught:
        validate_arguments(arguments, SCHEMA)
    assert caught.value.code == 2


def test_all_problems_at_once() -> None:
    with pytest.raises(InvalidArguments) as caught:
        validate_arguments({"min_diameter_mm": -1, "mode": "slow", "x": 1}, SCHEMA)
    assert caught.value.message.count(";") == 2


def test_integer_valued_float_is_an_integer() -> None:
    assert validate_arguments({"iterations": 3.0}, SCHEMA)["iterations"] == 3.0


def test_required_and_nested_objects() -> None:
    schema = {
        "type": "object",
        "required": ["roi"],
        "properties": {
            "roi": {
                "type": "object",
                "properties": {"size": {"type": "integer", "default": 3}},
                "additionalProperties": False,
            }
        },
    }
    with pytest.raises(InvalidArguments, match="roi is required"):
        validate_arguments({}, schema)
    assert validate_arguments({"roi": {}}, schema) == {"roi": {"size": 3}}


def test_unsupported_keywords_are_a_schema_error_not_ignored() -> None:
    with pytest.raises(SchemaError, match="oneOf"):
        validate_arguments({}, {"type": "object", "oneOf": []})


def test_context_validates_against_a_schema_file(make_case, tmp_path: Path) -> None:
    schema_file = tmp_path / "arguments.schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    ctx = load_context(make_case({"mode": "thorough"}))
    assert ctx.validated_arguments(schema_file)["mode"] == "thorough"
    assert ctx.validated_arguments(SCHEMA)["min_diameter_mm"] == 4
