"""The recipe's JSON schema (for editors, `recipe schema` and the reference docs) and a walker over it."""

from __future__ import annotations

import functools
import json
from typing import Any

from runner.recipe.document import Recipe

SCHEMA_ID = "https://recipe-runner.dev/recipe.schema.json"


@functools.cache
def recipe_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    return schema


def schema_json() -> str:
    return json.dumps(recipe_schema(), indent=2, sort_keys=True) + "\n"


def _resolve(node: dict[str, Any]) -> list[dict[str, Any]]:
    """A schema node with its $refs followed and anyOf/oneOf/allOf flattened into alternatives."""
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return _resolve(recipe_schema()["$defs"][name])
    alternatives = [alt for key in ("anyOf", "oneOf", "allOf") for alt in node.get(key, [])]
    if alternatives:
        return [resolved for alt in alternatives for resolved in _resolve(alt)]
    return [node]


def schema_children(node: dict[str, Any], part: str | int | None, names: bool = False) -> list[Any]:
    """The schema nodes a path step `part` can lead to from `node` (or, with names=True, the field names there)."""
    found: list[Any] = []
    for alt in _resolve(node):
        properties = alt.get("properties", {})
        if names:
            found += list(properties)
            continue
        if isinstance(part, str) and part in properties:
            found.append(properties[part])
        elif isinstance(part, int) and "items" in alt:
            found.append(alt["items"])
        elif isinstance(part, str) and isinstance(alt.get("additionalProperties"), dict):
            found.append(alt["additionalProperties"])
    return found


def field_has(loc: tuple[str | int, ...], marker: str) -> bool:
    """True when the field at `loc` carries a schema marker (`x-neutral`, `x-local-path`; see models.py)."""
    nodes = [recipe_schema()]
    for part in loc:
        nodes = [child for node in nodes for child in schema_children(node, part)]
        if not nodes:
            return False
    return any(alt.get(marker) for node in nodes for alt in _resolve(node))
