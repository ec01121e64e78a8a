"""Validation of inferd's answers against OpenAI's published OpenAPI document.

The document (tests/fixtures/openai-openapi/openapi.yaml.gz, see the README there for its commit) is
OpenAPI 3.1, whose schemas are JSON Schema 2020-12, but it still carries OpenAPI 3.0 idioms that
a JSON Schema validator reads differently from what the document means:

- `nullable: true` (3.0) is an unknown keyword to JSON Schema, so a validator would refuse the
  `null` the document allows (e.g. a stream chunk's `finish_reason`, its `usage`). Each one
  becomes a type union with `null` (and `null` joins the schema's `enum`, if it has one); a
  nullable schema without `type` (a `$ref`, `allOf`, `anyOf`...) becomes `anyOf: [schema,
  {type: null}]`.
- `exclusiveMinimum: true` (3.0's boolean form) becomes 2020-12's numeric form.
- `oneOf` means "exactly one branch matches". Where the document's branches can overlap (two
  message shapes that both accept `{"type": "message", "role": "user", "content": [...]}` in
  `InputItem`, object branches without `additionalProperties: false` and no required tag that
  tells them apart), an instance that fits two branches would be refused although the document
  clearly means it. Every `oneOf` whose branches are not provably disjoint (distinct JSON types,
  or distinct required values of the discriminating property) is validated as `anyOf`;
  `ambiguous_oneofs()` lists where, so the relaxation is visible. Discriminators are ignored.

The document has no schema for a streamed legacy completion: OpenAI streams
`CreateCompletionResponse` objects ("the same as the non-streamed object", says its description),
with `finish_reason: null` until the last event, which that schema refuses. So this module adds
`CreateCompletionStreamResponse` (unless the document one day has its own): that schema with a
nullable `finish_reason`, nothing else changed.

`validate(component, instance)` answers the errors (empty when valid) against
`#/components/schemas/<component>`; `assert_valid` fails a test with them. The converted document
and each component's validator are built once per process (the document is about 3 MB).
"""

from __future__ import annotations

import copy
import functools
import gzip
from pathlib import Path
from typing import Any

import yaml

# jsonschema ships no type hints (types-jsonschema has them, when installed).
from jsonschema import Draft202012Validator  # type: ignore[import-untyped, unused-ignore]
from jsonschema.exceptions import best_match  # type: ignore[import-untyped, unused-ignore]
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

# Kept gzipped (360 KB instead of 2.9 MB); the bytes inside are the published file, unchanged.
SPEC = Path(__file__).parent / "fixtures" / "openai-openapi" / "openapi.yaml.gz"
_URI = "urn:openai-openapi"
_JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
# JSON pointers (into the document) of the `oneOf`s validated as `anyOf`; filled by `_spec`.
_AMBIGUOUS: list[str] = []


def validate(component: str, instance: Any) -> list[str]:
    """Every error of `instance` against `#/components/schemas/<component>`, one line each,
    naming where in the instance it is; empty if the instance conforms."""
    errors = sorted(
        _validator(component).iter_errors(instance), key=lambda e: [str(p) for p in e.path]
    )
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {_message(e)}" for e in errors]


def assert_valid(component: str, instance: Any) -> None:
    errors = validate(component, instance)
    assert not errors, f"not a valid {component}:\n  " + "\n  ".join(errors)


def ambiguous_oneofs() -> list[str]:
    """The JSON pointers of the document's `oneOf`s validated as `anyOf` (branches that may
    overlap)."""
    _spec()
    return list(_AMBIGUOUS)


def matching_branches(pointer: str, instance: Any) -> list[int]:
    """Which branches of the `anyOf` (or `oneOf`) at `pointer` ("#/components/schemas/...")
    `instance` matches: more than one at a `oneOf` is why it is in `ambiguous_oneofs()`."""
    node: Any = _spec()
    for part in pointer.removeprefix("#/").split("/"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    key = "anyOf" if "anyOf" in node else "oneOf"
    return [
        i
        for i in range(len(node[key]))
        if Draft202012Validator(
            {"$ref": f"{_URI}{pointer}/{key}/{i}"}, registry=_registry()
        ).is_valid(instance)
    ]


def _message(error: Any) -> str:
    # An anyOf failure says only "... is not valid under any of the given schemas"; the errors
    # of the branch the instance was meant for say why. That branch: not one refused for its
    # JSON type or for its tag (`type`: "response.output_text.delta"...), the fewest errors.
    if not error.context:
        return str(error.message[:300])
    branches: dict[Any, list[Any]] = {}
    for e in error.context:
        branches.setdefault(e.relative_schema_path[0], []).append(e)
    meant = [
        errs
        for errs in branches.values()
        if not any(
            (e.validator == "type" and not e.path)
            or (e.validator in ("enum", "const") and list(e.path) == ["type"])
            for e in errs
        )
    ]
    causes = min(meant, key=len) if meant else list(error.context)
    best = best_match(causes)
    where = "/".join(map(str, best.absolute_path)) or "<root>"
    return f"not valid under any of its schemas, e.g. {where}: {best.message[:200]}"


@functools.cache
def _validator(component: str) -> Draft202012Validator:
    spec = _spec()
    if component not in spec["components"]["schemas"]:
        raise KeyError(f"no schema {component!r} in {SPEC.name}")
    schema = {"$ref": f"{_URI}#/components/schemas/{component}"}
    return Draft202012Validator(schema, registry=_registry())


@functools.cache
def _registry() -> Registry[Any]:
    resource: Resource[Any] = Resource.from_contents(_spec(), default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(_URI, resource)
    return registry


@functools.cache
def _spec() -> dict[str, Any]:
    with gzip.open(SPEC, "rt", encoding="utf-8") as f:
        # libyaml's loader when present: the pure-Python one takes ~20 s over this document.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        doc: dict[str, Any] = yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader
    schemas = doc["components"]["schemas"]
    if "CreateCompletionStreamResponse" not in schemas:
        event = copy.deepcopy(schemas["CreateCompletionResponse"])
        event["properties"]["choices"]["items"]["properties"]["finish_reason"]["nullable"] = True
        schemas["CreateCompletionStreamResponse"] = event
    for name, schema in schemas.items():
        schemas[name] = _nullable(schema)
    for name, schema in schemas.items():
        _oneof(schema, f"#/components/schemas/{name}", schemas)
    return doc


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's `nullable` and boolean `exclusiveMinimum` in JSON Schema's terms."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable(value) for key, value in node.items()}
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(node.get(bound), bool):
            plain = "minimum" if bound == "exclusiveMinimum" else "maximum"
            if node.pop(bound) and plain in node:
                node[bound] = node.pop(plain)
    if node.get("nullable") is not True:
        node.pop("nullable", None)  # `nullable: false` says nothing JSON Schema does not
        return node
    del node["nullable"]
    kind = node.get("type")
    if kind is None:
        return {"anyOf": [node, {"type": "null"}]}
    kinds = [kind] if isinstance(kind, str) else list(kind)
    node["type"] = [*kinds, "null"] if "null" not in kinds else kinds
    if "enum" in node and None not in node["enum"]:
        node["enum"] = [*node["enum"], None]
    return node


def _oneof(node: Any, pointer: str, schemas: dict[str, Any]) -> None:
    """Turn each `oneOf` whose branches may overlap into `anyOf` (see the module's docstring)."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            _oneof(item, f"{pointer}/{i}", schemas)
        return
    if not isinstance(node, dict):
        return
    for key, value in list(node.items()):
        _oneof(value, f"{pointer}/{key}", schemas)
    branches = node.get("oneOf")
    if isinstance(branches, list) and not _disjoint(branches, node, schemas):
        node["anyOf"] = node.pop("oneOf")
        _AMBIGUOUS.append(pointer)


def _disjoint(branches: list[Any], node: dict[str, Any], schemas: dict[str, Any]) -> bool:
    """Whether no instance can match two branches: proven by JSON types, or by the values of a
    required tag property (the discriminator's, else `type`). Unproven counts as overlapping."""
    tag = (node.get("discriminator") or {}).get("propertyName", "type")
    sigs = [_signature(branch, tag, schemas, 0) for branch in branches]
    for i, (types_a, tags_a) in enumerate(sigs):
        for types_b, tags_b in sigs[i + 1 :]:
            common = types_a & types_b
            if not common:
                continue
            # Objects both tagged, by different values, never match the same instance.
            if tags_a is not None and tags_b is not None and common == {"object"}:
                disjoint = not tags_a & tags_b
                if disjoint:
                    continue
            return False
    return True


def _signature(
    schema: Any, tag: str, schemas: dict[str, Any], depth: int
) -> tuple[frozenset[str], frozenset[Any] | None]:
    """The JSON types a schema admits, and the values its required `tag` property may take
    (None if it has no such required, enumerated property)."""
    schema = _deref(schema, schemas)
    if not isinstance(schema, dict) or depth > 8:
        return _JSON_TYPES, None
    types: frozenset[str] = _JSON_TYPES
    kind = schema.get("type")
    if isinstance(kind, str):
        types = frozenset({kind})
    elif isinstance(kind, list):
        types = frozenset(kind)
    if "integer" in types or "number" in types:
        types |= {"integer", "number"}
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        value_types = {_json_type(v) for v in values}
        if "number" in value_types:
            value_types.add("integer")
        types &= frozenset(value_types)
    tags: frozenset[Any] | None = None
    if tag in schema.get("required", ()) and tag in schema.get("properties", {}):
        prop = _deref(schema["properties"][tag], schemas)
        if isinstance(prop, dict) and ("const" in prop or "enum" in prop):
            tags = frozenset([prop["const"]] if "const" in prop else prop["enum"])
    for part in schema.get("allOf", ()):
        part_types, part_tags = _signature(part, tag, schemas, depth + 1)
        types &= part_types
        if part_tags is not None:
            tags = part_tags if tags is None else tags & part_tags
    return types, tags


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _deref(schema: Any, schemas: dict[str, Any]) -> Any:
    for _ in range(16):
        # Siblings of a `$ref` are annotations (description, title) in this document.
        if not (isinstance(schema, dict) and "$ref" in schema):
            break
        schema = schemas.get(str(schema["$ref"]).rsplit("/", 1)[-1], {})
    return schema
