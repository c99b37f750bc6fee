"""Tool input schemas at the bridge: each compiled once per process, and arguments checked against it
before the server sees them.

Most tool schemas are flat (an object of typed properties, some required): `FlatSchema` decides
those exactly as jsonschema would, for a fraction of the cost; jsonschema itself judges the rest, and
says what is wrong when arguments are refused.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, Literal

# JSON types a flat schema may give its properties, as Python checks (bool is not a number in JSON).
FLAT_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}
# Keywords that only annotate (they never make an instance invalid).
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated"})


class FlatSchema:
    """The shape most tool schemas have: an object of typed properties, some required.

    Its verdict is exactly jsonschema's for such a schema, for a fraction of the cost; anything
    else (nested constraints, patterns, enums, $refs…) is not flat and goes to jsonschema.
    """

    def __init__(self, types: dict[str, Callable[[Any], bool]], required: list[str], closed: bool) -> None:
        self.types, self.required, self.closed = types, required, closed

    @classmethod
    def of(cls, schema: dict[str, Any]) -> FlatSchema | None:
        if not set(schema) <= {"type", "properties", "required", "additionalProperties", "$schema"} | ANNOTATIONS:
            return None
        if any(old in str(schema.get("$schema", "")) for old in ("draft-03", "draft-04")):
            return None  # older drafts type integers (and more) differently
        properties, required = schema.get("properties", {}), schema.get("required", [])
        additional = schema.get("additionalProperties", True)
        if schema.get("type") != "object" or not isinstance(properties, dict) or not isinstance(additional, bool):
            return None
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            return None
        types = {}
        for name, spec in properties.items():
            if not isinstance(spec, dict) or not set(spec) <= {"type"} | ANNOTATIONS:
                return None
            kind = spec.get("type")
            if kind is None:
                types[name] = lambda v: True
            elif isinstance(kind, str) and kind in FLAT_TYPES:
                types[name] = FLAT_TYPES[kind]
            else:
                return None
        return cls(types, required, closed=not additional)

    def accepts(self, arguments: dict[str, Any]) -> bool:
        if any(name not in arguments for name in self.required):
            return False
        for name, value in arguments.items():
            check = self.types.get(name)
            if check is None:
                if self.closed:
                    return False
            elif not check(value):
                return False
        return True


# A tool's input schema compiled: the full validator and its flat fast path; False: nothing to check.
Validator = tuple[Any, FlatSchema | None] | Literal[False]


@functools.lru_cache(maxsize=1024)
def compile_schema(schema_json: str) -> Validator:
    """The validator of a schema (canonical JSON), compiled once per process: the sessions of one
    profile list the same tools, and compiling costs ~1 ms a schema (the metaschema check)."""
    # Imported on the first schema that needs it: jsonschema costs an idle bridge ~8 MiB and ~40 ms.
    from jsonschema import exceptions as schema_exceptions
    from jsonschema import validators

    schema = json.loads(schema_json)
    try:
        cls = validators.validator_for(schema)
        cls.check_schema(schema)
    except schema_exceptions.SchemaError:
        return False
    return cls(schema), FlatSchema.of(schema)


def constrains(schema: Any) -> bool:
    """False for schemas every object satisfies (no schema, `{}`, `{"type": "object"}`): nothing to check."""
    return not (
        isinstance(schema, dict) and set(schema) <= {"type", "$schema"} and schema.get("type", "object") == "object"
    )


def argument_errors(validator: Validator, arguments: dict[str, Any]) -> list[dict[str, Any]]:
    """What is wrong with `arguments` (`{"path", "message"}`, by path; empty when nothing is)."""
    if not validator:
        return []
    full, flat = validator
    if flat is not None and flat.accepts(arguments):
        return []  # the common case, decided without jsonschema (its errors are only needed on refusal)
    errors = sorted(full.iter_errors(arguments), key=lambda e: list(e.path))
    return [{"path": list(e.path), "message": e.message} for e in errors]
