"""Validate bodies against the official OpenAI spec: the schemas the tests use, vendored in
tests/data/openai-openapi.subset.json by tests/data/vendor_openai_spec.py (nothing is read from outside the repo).

OpenAPI 3.1 schemas are JSON Schema 2020-12, except that some nodes still say `nullable: true`, which
JSON Schema ignores: those are widened here to also allow null.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

from jsonschema import Draft202012Validator

SPEC_PATH = Path(__file__).resolve().parent / "data" / "openai-openapi.subset.json"


def _widen_nullable(node):
    if isinstance(node, dict):
        node = {k: _widen_nullable(v) for k, v in node.items()}
        if node.pop("nullable", False):
            kind = node.get("type")
            if isinstance(kind, str):
                node["type"] = [kind, "null"]
                if "enum" in node:
                    node["enum"] = [*node["enum"], None]
            elif isinstance(kind, list):
                node["type"] = [*kind, "null"]
            else:
                return {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_widen_nullable(v) for v in node]
    return node


@functools.cache
def _components() -> dict:
    spec = json.loads(SPEC_PATH.read_text())
    return _widen_nullable(copy.deepcopy(spec["components"]))


@functools.cache
def validator(schema_name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{schema_name}", "components": _components()})


def validate(body: dict, schema_name: str) -> None:
    """Raise jsonschema.ValidationError, with the path, when `body` breaks the official schema."""
    errors = sorted(validator(schema_name).iter_errors(body), key=lambda e: list(e.absolute_path))
    if errors:
        raise AssertionError(
            f"{schema_name} violated: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])
        )
