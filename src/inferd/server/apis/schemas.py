"""JSON Schemas that clients send (tool parameters, structured-output formats), checked before
they reach an engine: a schema that is not valid JSON Schema is the client's error, a 400 naming
the field, not whatever an engine's grammar compiler makes of it (a 500, or a schema quietly
ignored). jsonschema's Draft 2020-12 meta-schema is the judge, as it is for OpenAI's and
Anthropic's own APIs.

jsonschema is imported on the first schema, not with the server: with its optional format
checkers installed its import compiles an RFC 3987 grammar, about a second of `inferd serve`'s
start on 2 cores, for requests that may never carry a schema."""

from __future__ import annotations

import json
from typing import Any

from inferd.errors import InvalidRequestError


def schema_error(schema: Any) -> str | None:
    """Why `schema` is not a valid JSON Schema (with the path inside it), or None."""
    if not isinstance(schema, dict):
        return "must be a JSON Schema object"
    import jsonschema  # late: see the module docstring

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as err:
        path = "".join(f"[{json.dumps(p)}]" for p in err.path)
        return f"{path} is not a valid JSON Schema: {err.message}"
    return None


def check_chat_tools(payload: dict[str, Any]) -> None:
    """Chat completions' function tools: each `parameters` must be a JSON Schema."""
    tools = payload.get("tools")
    if not isinstance(tools, list):
        return
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and function.get("parameters") is not None:
            error = schema_error(function["parameters"])
            if error is not None:
                raise InvalidRequestError(f"tools[{i}].function.parameters{error}", param="tools")
