"""Golden cache keys: the keys `build_plan` gives two fixed recipes, written out literally.

A cache key is a promise to every user's cache: the same recipe on the same packages finds last week's results. A
refactor that moves code must not move keys; a change that does (a new field in the key material, a renamed config
key, a different normalization) fails here, and its author decides on purpose: bump the stage's `StageSpec.version`
if the results change, or keep the material as it was. Package versions and platform facts are stubbed so the keys do
not depend on this machine's environment.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runner import plan as plan_module
from runner.hardware import platform_facts
from runner.plan import build_plan
from runner.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "tests/recipes/core.yaml"  # classifier: init model, a CSV file, full train, ONNX, int8, serve

LM = """\
name: golden-lm
seed: 3
model:
  init: {architecture: llama, hidden_size: 32, num_heads: 2}
  task: causal-lm
data:
  source: {rows: {q: [hi, yo, hey, sup], a: [a, b, c, d]}}
  template: "Q: {q} A: {a}"
train: {method: lora, epochs: 1, lora: {r: 4, target_modules: [q_proj, v_proj]}}
export: {format: onnx}
quantize: {method: onnx-weight-only}
evaluate: {}
serve:
  probes: [{prompt: "Q: hi A:", max_new_tokens: 2}]
"""

# Written from build_plan at commit a0b717e (before the structure refactor of issue 15), and unchanged by it.
CORE_KEYS = {
    "model": "606b99429c1bbd0a0fb320ca",
    "data": "104d131a792acbcbc4331c50",
    "train": "4fca1a6bc83d1726204753b0",
    "export": "ccf5aba1b65073b3b5670e35",
    "quantize": "ca9f369af9abc9ae3066a9a7",
    "serve": "116289d4d241f3a64271e382",
}
LM_KEYS = {
    "model": "8d8433854fc3fabde40d55b2",
    "data": "99891f35e7d248cf2ae452d5",
    "train": "4a2b5298480ca7a5717839b8",
    "export": "2e689eda3ec138e6d1a48b89",
    "quantize": "e1376122008441e7a378e7fa",
    "evaluate": "642fe0231ec8db913f481125",
    "serve": "9e87c0dcca642459a7a305fb",
}


@pytest.fixture(autouse=True)
def fixed_environment(monkeypatch):
    monkeypatch.setattr(plan_module, "package_version", lambda name: f"{name}-1.0")
    monkeypatch.setattr(platform_facts, "cpu_isa", lambda: ("avx2", "test"))
    monkeypatch.setattr(platform_facts, "gpus", lambda: ())


def keys(path: Path) -> dict[str, str]:
    return {step.kind: step.key for step in build_plan(load_recipe(path))}


def test_the_classifier_recipe_keeps_its_cache_keys():
    assert keys(CORE) == CORE_KEYS


def test_the_language_model_recipe_keeps_its_cache_keys(tmp_path):
    path = tmp_path / "golden_lm.yaml"
    path.write_text(LM)
    assert keys(path) == LM_KEYS


def test_the_launcher_enters_no_cache_key():
    """Ray and torchrun with the same world size run the same training: one key, so either finds the other's result.
    The launcher changes the key only through what changes results (world size, effective batch)."""
    recipe = REPO / "recipes" / "tiny_llama_lora.yaml"
    common = ["train.distributed.nproc_per_node=2", "train.distributed.backend=gloo"]

    def train_key(*overrides: str) -> str:
        return next(s.key for s in build_plan(load_recipe(recipe, [*common, *overrides])) if s.kind == "train")

    torchrun = train_key()
    assert torchrun == "e066529b724d721d90ce30df"  # written from main before the launcher existed
    assert train_key("train.distributed.launcher=ray", "train.distributed.ray.max_failures=5") == torchrun
    assert train_key("train.distributed.launcher=ray", "train.distributed.nproc_per_node=3") != torchrun  # world size
