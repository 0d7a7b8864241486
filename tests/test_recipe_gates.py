"""The gates the shipped recipes set: none that cannot fail, and each beside the figure it was set from.

A gate at 0 (or at a 100% loss) passes whatever the model does, so a broken quantization would ship; a gate with no
measured figure beside it cannot be judged (is 0.05 a margin of 2x or 100x?). Each gate line says what was measured, or,
for recipes this machine cannot run (the Hub, a 16 GB GPU), that it was not and why.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
GATES = ("max_metric_drop", "min_greedy_agreement", "max_p95_ms", "max_forgetting")


def gate_lines(text: str) -> list[tuple[int, str]]:
    return [(n, line) for n, line in enumerate(text.splitlines()) if re.search(rf"\b({'|'.join(GATES)}):", line)]


def comment_for(lines: list[str], n: int) -> str:
    """The comment on line n and the comment lines right above it."""
    said = [lines[n].partition("#")[2]]
    above = n - 1
    while above >= 0 and lines[above].lstrip().startswith("#"):
        said.append(lines[above])
        above -= 1
    return " ".join(said)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_gate_a_shipped_recipe_sets_says_what_was_measured(recipe):
    text = recipe.read_text()
    lines = text.splitlines()
    for n, line in gate_lines(text):
        said = comment_for(lines, n)
        assert re.search(r"\bmeasured\b", said, re.I), f"{recipe.name}:{n + 1}: {line.strip()} has no measured figure beside it"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_no_shipped_gate_passes_whatever_the_model_does(recipe):
    from runner.recipe.sections import OnnxWeightOnly

    raw = yaml.safe_load(recipe.read_text())
    quantize = raw.get("quantize") or {}
    if quantize.get("method") == "onnx-weight-only":
        assert quantize.get("min_greedy_agreement", OnnxWeightOnly.model_fields["min_greedy_agreement"].default) > 0
    if "max_metric_drop" in quantize:
        assert quantize["max_metric_drop"] < 0.5, "a drop limit this loose passes a model that lost half its metric"
    evaluate = raw.get("evaluate") or {}
    if "max_forgetting" in evaluate:
        assert evaluate["max_forgetting"] < 0.5


def test_the_check_finds_an_unexplained_gate_and_a_gate_at_zero():
    lines = ["quantize: {method: onnx-weight-only, bits: 8, min_greedy_agreement: 0.0}"]
    assert gate_lines("\n".join(lines)) == [(0, lines[0])]
    assert not re.search(r"\bmeasured\b", comment_for(lines, 0))
    explained = ["# measured: greedy 8/8 (2 cores)", lines[0]]
    assert re.search(r"\bmeasured\b", comment_for(explained, 1))
