"""The JSON schema editors use is generated from the Pydantic models and committed; it must never go stale."""

from __future__ import annotations

import json
from pathlib import Path

from runner.cli import main
from runner.recipe.schema import recipe_schema, schema_json

REPO = Path(__file__).resolve().parent.parent


def test_committed_schema_is_current():
    committed = (REPO / "recipe.schema.json").read_text()
    assert committed == schema_json(), "recipe.schema.json is stale: run `recipe schema > recipe.schema.json`"


def test_recipe_schema_command_prints_it(capsys):
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "Recipe"


def test_every_field_has_a_description():
    schema = recipe_schema()
    missing = []
    for name, definition in [("Recipe", schema), *schema["$defs"].items()]:
        for field, spec in definition.get("properties", {}).items():
            if "description" not in spec:
                missing.append(f"{name}.{field}")
    assert not missing, f"fields without a description: {missing}"


def test_unknown_keys_are_forbidden_at_every_level():
    schema = recipe_schema()
    for name, definition in [("Recipe", schema), *schema["$defs"].items()]:
        if "properties" in definition:
            assert definition.get("additionalProperties") is False, name


def test_every_recipe_file_starts_with_how_to_run_it_and_the_schema_line():
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        head = recipe.read_text().splitlines()[:4]
        assert head[0] == "# yaml-language-server: $schema=../recipe.schema.json", recipe
        assert any(line.startswith("# Run: nox -s recipe -- ") for line in head), recipe


def test_recipe_reference_docs_are_current():
    from runner.recipe.docs import reference_markdown

    committed = (REPO / "docs" / "recipe-reference.md").read_text()
    assert committed == reference_markdown(), "docs/recipe-reference.md is stale: python -m runner.recipe.docs > it"
