"""docs/recipe-reference.md, generated from the schema's field descriptions (a test keeps the committed file current).

    python -m runner.recipe.docs > docs/recipe-reference.md
"""

from __future__ import annotations

import json
import sys
from typing import Any

from runner.names import X_LOCAL_PATH, X_NEUTRAL
from runner.recipe.schema import recipe_schema

INTRO = """# Recipe reference

Generated from the Pydantic models in `runner/recipe/sections.py` (sections) and `document.py` (the recipe) by
`python -m runner.recipe.docs`; do not edit by hand.
Every section forbids unknown keys. Fields marked *neutral* cannot change a result and stay out of cache keys;
*local path* fields are resolved against the file that names them and enter cache keys by content hash.
"""


def _type(spec: dict[str, Any]) -> str:
    if "$ref" in spec:
        name = spec["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{name.lower()})"
    if "const" in spec:
        return f"`{json.dumps(spec['const'])}`"
    if "enum" in spec:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in spec["enum"])
    for key in ("anyOf", "oneOf"):
        if key in spec:
            kinds = [_type(alt) for alt in spec[key] if alt.get("type") != "null"]
            optional = any(alt.get("type") == "null" for alt in spec[key])
            return " or ".join(kinds) + (" (optional)" if optional else "")
    if spec.get("type") == "array":
        return f"list of {_type(spec.get('items', {}))}"
    if spec.get("type") == "object":
        extra = spec.get("additionalProperties")
        return f"mapping to {_type(extra)}" if isinstance(extra, dict) else "mapping"
    return str(spec.get("type", "any"))


def _default(spec: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" in spec:
        return f"`{json.dumps(spec['default'])}`"
    return ""


def _limits(spec: dict[str, Any]) -> str:
    names = {"exclusiveMinimum": "> ", "minimum": ">= ", "exclusiveMaximum": "< ", "maximum": "<= ", "pattern": "matches "}
    found = [f"{label}`{spec[key]}`" for key, label in names.items() if key in spec]
    for alt in spec.get("anyOf", []):
        found += [f"{label}`{alt[key]}`" for key, label in names.items() if key in alt]
    return ", ".join(found)


def _model_section(name: str, definition: dict[str, Any]) -> list[str]:
    lines = [f"## {name}", ""]
    if definition.get("description"):
        lines += [" ".join(definition["description"].split()), ""]
    lines += ["| field | type | default | description |", "|---|---|---|---|"]
    required = set(definition.get("required", []))
    for field, spec in definition.get("properties", {}).items():
        notes = [note for note, flag in (("neutral", spec.get(X_NEUTRAL)), ("local path", spec.get(X_LOCAL_PATH))) if flag]
        limits = _limits(spec)
        text = " ".join(spec.get("description", "").split()).replace("|", "\\|")
        if limits:
            text += f" ({limits})"
        if notes:
            text += f" *{', '.join(notes)}*"
        lines.append(f"| `{field}` | {_type(spec)} | {_default(spec, field in required)} | {text} |")
    return [*lines, ""]


def reference_markdown() -> str:
    schema = recipe_schema()
    lines = [INTRO, *_model_section("Recipe", schema)]
    for name, definition in sorted(schema["$defs"].items()):
        if "properties" in definition:
            lines += _model_section(name, definition)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
