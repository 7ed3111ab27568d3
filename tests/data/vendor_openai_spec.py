"""Cut the schemas the tests validate against out of the official OpenAI spec, so a clone needs nothing
outside the repository.

    python tests/data/vendor_openai_spec.py PATH/TO/openai-openapi.json

(the official spec, from github.com/openai/openai-openapi; the tests never read it, only this file's output)

writes tests/data/openai-openapi.subset.json: the named schemas below and every schema they reference,
unchanged, with the spec's `info` and where it came from. Add a name here (and rerun) to validate a new body.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "ErrorResponse",
    "ListModelsResponse",
    "Model",
    "Response",  # the Responses API (issue 13)
    "ResponseStreamEvent",
]
OUT = Path(__file__).with_name("openai-openapi.subset.json")
PREFIX = "#/components/schemas/"


def _refs(node, found: list[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                if not value.startswith(PREFIX):
                    raise ValueError(f"unexpected $ref {value}")
                found.append(value[len(PREFIX) :])
            else:
                _refs(value, found)
    elif isinstance(node, list):
        for value in node:
            _refs(value, found)


def closure(schemas: dict, roots: list[str]) -> dict:
    keep: dict = {}
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in keep:
            continue
        keep[name] = schemas[name]
        found: list[str] = []
        _refs(schemas[name], found)
        stack.extend(found)
    return dict(sorted(keep.items()))


def main(spec_path: str) -> None:
    raw = Path(spec_path).read_bytes()
    spec = json.loads(raw)
    subset = {
        "x-vendored-from": {
            "source": "the official OpenAI OpenAPI spec, the copy in the project's shared/openai-openapi.json",
            "sha256": hashlib.sha256(raw).hexdigest(),
            "roots": ROOTS,
            "tool": "tests/data/vendor_openai_spec.py",
        },
        "openapi": spec["openapi"],
        "info": spec["info"],
        "components": {"schemas": closure(spec["components"]["schemas"], ROOTS)},
    }
    OUT.write_text(json.dumps(subset, indent=1, sort_keys=False) + "\n")
    print(f"{OUT}: {len(subset['components']['schemas'])} schemas")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} PATH/TO/openai-openapi.json")
    main(sys.argv[1])
