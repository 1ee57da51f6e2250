"""Checking algorithm arguments against the algorithm's own JSON Schema, stdlib only.

An algorithm ships ``arguments.schema.json`` so the hub can show and check arguments before
an experiment starts. Validating against the *same* file inside the container keeps one
source of truth for names, types, ranges and defaults. Only the subset of JSON Schema that
describes flat-ish argument objects is supported; an unsupported keyword is a programming
error (``SchemaError``), never silently ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from .errors import InvalidArguments

_ANNOTATIONS = {"$schema", "$id", "$comment", "title", "description", "examples", "default"}
_SUPPORTED = _ANNOTATIONS | {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "enum",
    "const",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "items",
    "minItems",
    "maxItems",
}


class SchemaError(ValueError):
    """The schema itself uses something this validator does not implement."""


def _type_ok(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        if isinstance(value, bool):
            return False
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if name == "number":
        return (
            not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        )
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, list)
    if name == "object":
        return isinstance(value, Mapping)
    raise SchemaError(f"unknown JSON Schema type {name!r}")


def _check(value: Any, schema: Mapping[str, Any], where: str, problems: list[str]) -> Any:
    unsupported = sorted(set(schema) - _SUPPORTED)
    if unsupported:
        raise SchemaError(f"{where}: unsupported schema keywords {unsupported}")
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else list(types)
        if not any(_type_ok(value, name) for name in names):
            problems.append(f"{where} must be of type {' or '.join(names)}, got {value!r}")
            return value
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where} must be one of {schema['enum']}, got {value!r}")
    if "const" in schema and value != schema["const"]:
        problems.append(f"{where} must be {schema['const']!r}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bounds = (
            ("minimum", lambda v, b: v >= b, ">="),
            ("maximum", lambda v, b: v <= b, "<="),
            ("exclusiveMinimum", lambda v, b: v > b, ">"),
            ("exclusiveMaximum", lambda v, b: v < b, "<"),
        )
        for key, ok, sign in bounds:
            if key in schema and not ok(value, schema[key]):
                problems.append(f"{where} must be {sign} {schema[key]}, got {value!r}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            problems.append(f"{where} must have at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            problems.append(f"{where} must have at most {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{where} must match {schema['pattern']!r}")
    if isinstance(value, list):
        if "minItems" in schema and len(value) < schema["minItems"]:
            problems.append(f"{where} must have at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            problems.append(f"{where} must have at most {schema['maxItems']} items")
        if "items" in schema:
            value = [
                _check(item, schema["items"], f"{where}[{i}]", problems)
                for i, item in enumerate(value)
            ]
    if isinstance(value, Mapping):
        value = _check_object(value, schema, where, problems)
    return value


def _check_object(
    value: Mapping[str, Any], schema: Mapping[str, Any], where: str, problems: list[str]
) -> dict[str, Any]:
    properties: Mapping[str, Any] = schema.get("properties", {})
    result: dict[str, Any] = {}
    for name in schema.get("required", []):
        if name not in value:
            problems.append(f"{where}.{name} is required")
    additional = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            result[name] = _check(item, properties[name], f"{where}.{name}", problems)
        elif additional is False:
            known = ", ".join(sorted(properties)) or "none"
            problems.append(f"{where}.{name} is not a known argument (known: {known})")
        elif isinstance(additional, Mapping):
            result[name] = _check(item, additional, f"{where}.{name}", problems)
        else:
            result[name] = item
    for name, sub in properties.items():
        if name not in value and "default" in sub:
            result[name] = sub["default"]
    return result


def validate_arguments(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> dict:
    """Return ``arguments`` with schema defaults filled in, or raise ``InvalidArguments``.

    All problems are reported at once, so a user fixing an experiment does not have to
    iterate one error at a time.
    """
    problems: list[str] = []
    checked = _check(arguments, schema, "arguments", problems)
    if problems:
        raise InvalidArguments("; ".join(problems))
    return dict(checked)
