"""SFT, then DPO by reference: `model: {recipe: sft.yaml}` plans the SFT recipe's steps up to train before its own,
keys its steps on them, and trains on the SFT model (issue 24, part 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.plan import Step, build_plan
from runner.recipe import RecipeError, load_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = "good fine nice bad poor sad happy glad dull warm cold kind".split()
SFT = f"""\
# the SFT recipe a DPO recipe starts from
name: sft
seed: 3
model: {{init: {{architecture: llama, hidden_size: 32, num_heads: 2, intermediate_size: 64, vocab_size: 120}}, task: causal-lm}}
data:
  source: {{rows: {{q: {WORDS * 2}, a: {WORDS[::-1] * 2}}}}}
  template: "Q: {{q}} A: {{a}}"
  max_length: 16
  test_size: 0.25
train:
  method: lora
  lora: {{r: 4, target_modules: [q_proj, v_proj]}}
  epochs: 1
  batch_size: 6
  learning_rate: 0.05
"""
DPO = f"""\
name: dpo
seed: 3
model: {{recipe: sft.yaml, task: causal-lm}}
data:
  source: {{rows: {{prompt: {WORDS * 2}, chosen: {(WORDS[1:] + WORDS[:1]) * 2}, rejected: {(WORDS[6:] + WORDS[:6]) * 2}}}}}
  max_length: 16
  test_size: 0.25
train:
  method: lora
  objective: dpo
  lora: {{r: 4, target_modules: [q_proj, v_proj]}}
  preference: {{beta: 0.1, max_prompt_length: 8}}
  epochs: 1
  batch_size: 6
  learning_rate: 0.01
export: {{format: safetensors}}
evaluate: {{}}
"""


def pair(tmp_path: Path, sft: str = SFT, dpo: str = DPO) -> Path:
    (tmp_path / "sft.yaml").write_text(sft)
    (tmp_path / "dpo.yaml").write_text(dpo)
    return tmp_path / "dpo.yaml"


def keys(path: Path, *overrides: str) -> dict[str, str]:
    return {step.kind: step.key for step in build_plan(load_recipe(path, list(overrides)))}


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [kind for kind in before if before[kind] != after[kind]]


# --- the plan ------------------------------------------------------------------------------------------------------------


def test_the_plan_holds_the_sft_steps_first_with_the_keys_the_sft_recipe_has_itself(tmp_path):
    dpo = pair(tmp_path)
    steps: dict[str, Step] = {step.kind: step for step in build_plan(load_recipe(dpo))}
    assert list(steps) == ["sft.model", "sft.data", "sft.train", "model", "data", "train", "export", "evaluate"]
    own = keys(tmp_path / "sft.yaml")
    assert {kind: steps[f"sft.{kind}"].key for kind in own} == own  # one cache entry, whichever recipe runs it first
    assert steps["sft.train"].stage == "train" and steps["sft.train"].depends == ["sft.data", "sft.model"]
    assert steps["sft.train"].input_name("sft.data") == "data"  # the stage reads its inputs by their plain names
    # the DPO recipe's model step is the SFT train step's result: keyed on it, handed it as `train`
    assert steps["model"].material["upstream"]["train"] == steps["sft.train"].key
    assert steps["train"].depends == ["data", "model"]


def test_a_changed_sft_recipe_reruns_both_trainings(tmp_path):
    dpo = pair(tmp_path)
    before = keys(dpo)
    pair(tmp_path, sft=SFT.replace("learning_rate: 0.05", "learning_rate: 0.02"))
    assert changed(before, keys(dpo)) == ["sft.train", "model", "data", "train", "export", "evaluate"]
    # its data (which its model step's tokenizer is trained on): every step of both
    pair(tmp_path, sft=SFT.replace("  max_length: 16", "  max_length: 20"))
    assert changed(before, keys(dpo)) == list(before)


def test_a_dpo_setting_reruns_the_dpo_train_step_only(tmp_path):
    dpo = pair(tmp_path)
    before = keys(dpo)
    assert changed(before, keys(dpo, "train.preference.beta=0.3")) == ["train", "export", "evaluate"]
    assert changed(before, keys(dpo, "train.learning_rate=0.02")) == ["train", "export", "evaluate"]


def test_neither_the_path_nor_the_comments_of_the_sft_recipe_are_in_a_key(tmp_path):
    dpo = pair(tmp_path)
    before = keys(dpo)
    pair(tmp_path, sft="# edited comment\n" + SFT)
    assert keys(dpo) == before
    other = tmp_path / "elsewhere"
    other.mkdir()
    pair(other, dpo=DPO.replace("recipe: sft.yaml", "recipe: ../sft.yaml"))  # the same SFT recipe, named from elsewhere
    assert keys(other / "dpo.yaml") == before


# --- refused at the field ---------------------------------------------------------------------------------------------


def problem(path: Path) -> str:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    return str(caught.value)


def test_a_missing_referenced_recipe_is_refused_at_its_line(tmp_path):
    dpo = pair(tmp_path, dpo=DPO.replace("recipe: sft.yaml", "recipe: nope.yaml"))
    assert "dpo.yaml:3:" in problem(dpo) and "model.recipe: no such file or folder: " in problem(dpo)


def test_a_recipe_with_two_model_sources_is_refused(tmp_path):
    dpo = pair(tmp_path, dpo=DPO.replace("recipe: sft.yaml,", "recipe: sft.yaml, hub: a/b, revision: x,"))
    assert "give exactly one of hub, path, package, init, recipe (got recipe, hub)" in problem(dpo)


def test_recipes_that_start_from_each_other_are_refused_as_a_cycle(tmp_path):
    looped = SFT.replace("model: {init: {architecture: llama, hidden_size: 32, num_heads: 2, intermediate_size: 64, "
                         "vocab_size: 120}, task: causal-lm}", "model: {recipe: dpo.yaml, task: causal-lm}")
    text = problem(pair(tmp_path, sft=looped))
    assert "dpo.yaml:3:9: model.recipe: the recipe " in text and "sft.yaml is not valid (its problems follow)" in text
    cycle = text.splitlines()[1]
    assert "sft.yaml:4:9: model.recipe: recipes that start from each other's models form a cycle: " in cycle
    assert cycle.endswith("dpo.yaml") and cycle.count("dpo.yaml") == 2 and "sft.yaml -> " in cycle  # dpo -> sft -> dpo


CLASSIFIER = """\
name: cls
model: {init: {architecture: distilbert, hidden_size: 32, num_heads: 2}, task: sequence-classification}
data: {source: {rows: {text: [good, bad, fine, poor], label: [pos, neg, pos, neg]}}}
train: {method: full}
"""


def test_a_referenced_recipe_of_another_task_is_refused_at_the_task(tmp_path):
    dpo = pair(tmp_path, sft=CLASSIFIER)
    text = problem(dpo)
    assert "dpo.yaml:3:" in text and "model.task: causal-lm, but the recipe it starts from" in text
    assert "trains a sequence-classification model" in text


# --- end to end ------------------------------------------------------------------------------------------------------------


def test_sft_then_dpo_trains_the_dpo_adapter_on_the_sft_model(tmp_path, monkeypatch):
    """Both recipes through the real stages on a config-built Llama: the DPO run trains the SFT recipe, merges its
    adapter into one model, and tunes a new adapter on those weights; a second run of the SFT recipe is all cached."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from runner.cli import main
    from runner.report.formatting import signed

    dpo = pair(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(dpo)]) == 0
    run = json.loads((tmp_path / "runs" / "dpo" / "latest" / "run.json").read_text())
    assert [(s["kind"], s["status"]) for s in run["steps"]] == [
        (kind, "ran") for kind in ("sft.model", "sft.data", "sft.train", "model", "data", "train", "export", "evaluate")]
    out = {step["kind"]: Path(step["outputs"]) for step in run["steps"]}

    # the DPO recipe's base is the SFT base with the SFT adapter merged: not the untuned base
    base = AutoModelForCausalLM.from_pretrained(out["sft.model"] / "model")
    sft = PeftModel.from_pretrained(base, out["sft.train"] / "adapter").merge_and_unload()
    start = load_file(out["model"] / "model" / "model.safetensors")
    untuned = load_file(out["sft.model"] / "model" / "model.safetensors")
    for name, tensor in sft.state_dict().items():
        torch.testing.assert_close(start[name], tensor, atol=1e-6, rtol=0)
    assert any(not torch.equal(start[name], untuned[name]) for name in untuned)
    # DPO trained a new adapter on it; at the start the policy is its own reference (SFT model): zero margin
    metrics = json.loads((out["train"] / "metrics.json").read_text())
    assert metrics["objective"] == "dpo" and (out["train"] / "adapter").is_dir()
    assert abs(metrics["eval_rewards/margins_before"]) < 1e-6
    assert metrics["eval_rewards/margins"] != metrics["eval_rewards/margins_before"]

    # export merged the DPO adapter into the SFT model (the model step's output), and evaluate scored that model as
    # the base: base + DPO adapter is what was exported
    exported = AutoModelForCausalLM.from_pretrained(out["export"] / "merged")
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out["model"] / "model"), out["train"] / "adapter")
    for name, tensor in tuned.merge_and_unload().state_dict().items():
        torch.testing.assert_close(exported.state_dict()[name], tensor, atol=1e-6, rtol=0)
    # evaluate scored the SFT model as `base` (the DPO step's reference) against the DPO-tuned one: the implicit reward
    # margin is zero for the reference itself, and DPO's own held-out margin for the tuned model
    preference = json.loads((out["evaluate"] / "evaluate_report.json").read_text())["preference"]
    assert preference["base"]["reward_margin"] == 0.0
    assert preference["train"]["reward_margin"] == pytest.approx(metrics["eval_rewards/margins"], abs=1e-5)

    # the report shows those figures beside the training curves (loss, rewards/chosen, rewards/rejected, margins)
    html = (tmp_path / "runs" / "dpo" / "latest" / "report.html").read_text()
    train = html[html.index("Preference (dpo), base vs tuned"):]
    for header in ("preference accuracy", "reward accuracy", "mean reward margin", "base (the reference)", "tuned"):
        assert f">{header}<" in train
    assert f">{signed(preference['train']['reward_margin'])}<" in train
    assert train.index("alt='preference training curves'") < train.index("<h2")  # in the train section, after the table
    assert "loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies" in train
    assert (tmp_path / "runs" / "dpo" / "latest" / "train-loss.png").stat().st_size > 10_000

    assert main(["run", str(tmp_path / "sft.yaml")]) == 0  # the SFT recipe's own run finds the entries the DPO run made
    again = json.loads((tmp_path / "runs" / "sft" / "latest" / "run.json").read_text())
    assert {s["status"] for s in again["steps"]} == {"cached"}
    # and the DPO run again: every entry intact (TRL's tokenizing wrote nothing into the data step's entry)
    assert main(["run", str(dpo)]) == 0
    again = json.loads((tmp_path / "runs" / "dpo" / "latest" / "run.json").read_text())
    assert {s["status"] for s in again["steps"]} == {"cached"}
    assert not list((tmp_path / ".recipe-cache").glob("quarantine/*"))
