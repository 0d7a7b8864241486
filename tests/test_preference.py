"""Preference tuning (train.objective dpo/orpo/kto/simpo/grpo) through TRL, on the tiny Llama of conftest.

What a user relies on: DPO learns (its loss falls and held-out pairs end up ranked right); the reference the loss is
measured against does not move while the policy trains; LoRA keeps no second copy of the base, full fine-tuning a frozen
one; a data set whose chosen equals rejected, or a reward that runs code without `allow_code`, is refused at its line;
a DPO setting re-runs the train step only, and SFT recipes keep their keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner.recipe.sections import Data, Model
from runner.stages import StageError
from tests.conftest import sentiment_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pairs(n: int) -> dict[str, list[str]]:
    """Review snippets whose verdict is the chosen answer and the opposite verdict the rejected one."""
    texts, names = sentiment_rows(n, seed=1)
    opposite = {"positive": "negative", "negative": "positive"}
    return {"prompt": [f"{t} ###" for t in texts], "chosen": [f" {v}" for v in names],
            "rejected": [f" {opposite[v]}" for v in names]}


def data_step(model_dir: Path, out: Path, rows: dict[str, list[Any]], objective: str = "dpo", **extra: Any) -> Path:
    from transformers import AutoTokenizer

    from runner.stages.data import preference as data_preference

    config = {"model": Model(path=str(model_dir), task="causal-lm").model_dump(mode="json"),
              "data": Data.model_validate({"source": {"rows": rows}, "test_size": 0.25, "max_length": 48}).model_dump(
                  mode="json"),
              "seed": 0, "objective": objective, "max_prompt_length": 32, "max_identical_share": 0.01, **extra}
    out.mkdir(parents=True, exist_ok=True)
    data_preference.run(config, AutoTokenizer.from_pretrained(model_dir), out)
    return out


@pytest.fixture(scope="module")
def dpo_data(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    return data_step(tiny_llama_dir, tmp_path_factory.mktemp("dpo-data"), pairs(64))


def job_for(model_dir: Path, data: Path, out: Path, **train: Any):  # noqa: ANN201 - train_job.Job
    from runner.stages.train.job import Job

    settings: dict[str, Any] = {"method": "lora", "objective": "dpo", "max_steps": 12, "batch_size": 8,
                                "learning_rate": 5e-3, "eval_strategy": "no", "save_steps": 1000, "logging_steps": 1,
                                "lora": {"r": 8, "target_modules": ["q_proj", "v_proj", "o_proj"]},
                                "preference": {"beta": 0.1}}
    settings.update(train)
    settings = {name: value for name, value in settings.items() if value is not None}  # lora=None: full
    config = {"model": Model(path=str(model_dir), task="causal-lm").model_dump(mode="json"), "train": settings,
              "seed": 7}
    return Job.parse(config, {"data": data}, out)


# --- training ----------------------------------------------------------------------------------------------------------


def test_dpo_loss_falls_and_held_out_pairs_rank_right(tiny_llama_dir, dpo_data, tmp_path):
    from runner.stages import train

    job = job_for(tiny_llama_dir, dpo_data, tmp_path, max_steps=24, learning_rate=1e-2, scheduler="constant",
                  eval_strategy="epoch")
    metrics = train.run({"model": job.model_json, "train": job.train.model_dump(mode="json"), "seed": job.seed},
                        {"data": dpo_data}, tmp_path)
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # -log sigmoid(0): the policy starts as its reference
    assert losses[-1] < 0.6
    # TRL's metric names reach trainer_state and metrics.json unchanged
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(history[0])
    assert metrics["eval_rewards/accuracies"] > metrics["eval_rewards/accuracies_before"]
    assert metrics["eval_rewards/margins"] > 0 == metrics["eval_rewards/margins_before"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() and metrics["reference_copy"] is False


def reference_logits(trainer: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        if trainer.ref_model is not None:
            return trainer.ref_model(input_ids=ids).logits.clone()
        with trainer.model.disable_adapter():  # LoRA: the reference is the base with the adapter off
            return trainer.model(input_ids=ids).logits.clone()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_reference_is_unchanged_by_training(tiny_llama_dir, dpo_data, tmp_path, method):
    import torch
    from transformers import AutoTokenizer

    from runner.stages.train.preference import load_policy, make_trainer, read_text_splits

    job = job_for(tiny_llama_dir, dpo_data, tmp_path, method=method, max_steps=6,
                  **({"lora": None} if method == "full" else {}))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    trainer = make_trainer(job, load_policy(job), tokenizer, read_text_splits(job))
    ids = torch.tensor([tokenizer("the film was great ### positive")["input_ids"]])
    before = reference_logits(trainer, ids)
    with torch.no_grad():
        policy_before = trainer.model(input_ids=ids).logits.clone()
    trainer.train()
    with torch.no_grad():
        policy_after = trainer.model(input_ids=ids).logits
    assert not torch.equal(policy_before, policy_after)  # the policy did move
    assert torch.equal(reference_logits(trainer, ids), before)


def test_lora_keeps_one_copy_of_the_base_and_full_holds_a_frozen_one(tiny_llama_dir, dpo_data, tmp_path):
    from transformers import AutoTokenizer

    from runner.stages.train.preference import load_policy, make_trainer, read_text_splits

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)

    def parameter_bytes(job: Any) -> tuple[int, int, bool]:
        trainer = make_trainer(job, load_policy(job), tokenizer, read_text_splits(job))
        models = [trainer.model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                    for model in models for p in model.parameters()}
        adapter = sum(p.numel() * p.element_size() for n, p in trainer.model.named_parameters() if "lora_" in n)
        return sum(storages.values()), adapter, trainer.ref_model is not None

    base = sum(p.numel() * p.element_size() for p in load_policy(job_for(tiny_llama_dir, dpo_data, tmp_path)).parameters())
    lora_bytes, adapter, lora_ref = parameter_bytes(job_for(tiny_llama_dir, dpo_data, tmp_path / "lora"))
    full_bytes, _, full_ref = parameter_bytes(job_for(tiny_llama_dir, dpo_data, tmp_path / "full", method="full",
                                                      lora=None))
    assert (lora_ref, full_ref) == (False, True)
    assert lora_bytes == base + adapter  # the base's weights once, plus the adapter
    assert full_bytes == 2 * base  # policy and its frozen reference


def test_precomputed_reference_log_probs_hold_no_reference_model(tiny_llama_dir, dpo_data, tmp_path):
    from transformers import AutoTokenizer

    from runner.stages.train.preference import load_policy, make_trainer, read_text_splits

    job = job_for(tiny_llama_dir, dpo_data, tmp_path, method="full", lora=None,
                  preference={"precompute_ref_log_probs": True})
    trainer = make_trainer(job, load_policy(job), AutoTokenizer.from_pretrained(tiny_llama_dir), read_text_splits(job))
    assert trainer.ref_model is None


# --- data ------------------------------------------------------------------------------------------------------------


def test_chosen_equal_to_rejected_is_refused_by_the_data_step(tiny_llama_dir, tmp_path):
    rows = pairs(40)
    rows["rejected"] = [*rows["chosen"][:2], *rows["rejected"][2:]]  # 2 of 40 identical: over 1%
    with pytest.raises(StageError, match="2 of 40 rows have chosen equal to rejected"):
        data_step(tiny_llama_dir, tmp_path, rows)
    out = data_step(tiny_llama_dir, tmp_path / "allowed", rows, max_identical_share=0.1)
    assert json.loads((out / "stats.json").read_text())["identical_pairs"] == 2


def test_long_prompts_are_cut_to_the_budget_and_counted(tiny_llama_dir, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    rows = pairs(20)
    rows["prompt"][0] = " ".join(["the film was great"] * 30) + " ###"
    out = data_step(tiny_llama_dir, tmp_path, rows, max_prompt_length=16)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["prompts_over_budget"] == 1 and "prompt budget" in stats["warnings"][0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    dataset = load_from_disk(str(out / "dataset"))
    prompts = [*dataset["train"]["prompt"], *dataset["test"]["prompt"]]
    assert max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts) == 16
    assert any(p.endswith("great ###") and len(p) < len(rows["prompt"][0]) for p in prompts)  # the end is kept


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


RECIPE = """\
name: pref
model: {init: {architecture: llama, hidden_size: 32, num_heads: 2}, task: causal-lm}
data:
  source:
    rows:
      prompt: [a, b, c, d]
      chosen: [x, y, z, w]
      rejected: [x, v, u, t]
train:
  method: lora
  objective: dpo
  lora: {r: 4, target_modules: [q_proj]}
"""


def test_identical_pairs_in_a_recipe_are_refused_at_the_chosen_column(tmp_path):
    from runner.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, RECIPE))
    assert "r.yaml:7:" in str(caught.value)  # the line of `chosen:`
    assert "1 of 4 rows have chosen equal to rejected" in str(caught.value)


GRPO = """\
name: grpo
model: {init: {architecture: llama, hidden_size: 32, num_heads: 2}, task: causal-lm}
data:
  source: {rows: {prompt: ["1+1=", "2+2="], answer: ["2", "4"]}}
train:
  method: lora
  objective: grpo
  batch_size: 4
  lora: {r: 4, target_modules: [q_proj]}
  grpo:
    num_generations: 4
    rewards:
      - {name: numeric_match, column: answer}
      - {function: "json:loads", weight: 0.5}
"""


def test_a_code_reward_needs_allow_code(tmp_path):
    from runner.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, GRPO))
    assert "r.yaml:14:" in str(caught.value) and "allow_code: true" in str(caught.value)
    load_recipe(write(tmp_path, GRPO.replace("    num_generations: 4", "    num_generations: 4\n    allow_code: true")))


def test_a_user_reward_is_imported_only_with_allow_code():
    from runner.recipe.objectives import Grpo
    from runner.stages.train.rewards import reward_functions, user_function

    with pytest.raises(StageError, match="allow_code"):
        user_function("tests.test_preference:length_reward", allow_code=False)
    grpo = Grpo.model_validate({"allow_code": True, "rewards": [{"function": "tests.test_preference:length_reward"},
                                                                 {"name": "numeric_match", "column": "answer"}]})
    functions = reward_functions(grpo)
    assert [fn.__name__ for fn in functions] == ["length_reward", "numeric_match"]  # TRL logs rewards/<name>/mean
    assert functions[1](prompts=["1+1="], completions=[" 2\nmore"], answer=["2"]) == [1.0]
    with pytest.raises(StageError, match="must accept `completions`"):
        user_function("json:loads", allow_code=True)


def length_reward(completions: list[str], **kwargs: Any) -> list[float]:
    return [float(len(c)) for c in completions]


# --- keys --------------------------------------------------------------------------------------------------------------


def test_a_dpo_setting_reruns_the_train_step_only(tmp_path):
    from runner.plan import build_plan
    from runner.recipe import load_recipe

    recipe = write(tmp_path, RECIPE.replace("rejected: [x, v, u, t]", "rejected: [s, v, u, t]"))
    keys = {s.kind: s.key for s in build_plan(load_recipe(recipe))}
    changed = {s.kind: s.key for s in build_plan(load_recipe(recipe, ["train.preference.beta=0.3"]))}
    assert [kind for kind in keys if keys[kind] != changed[kind]] == ["train"]
    # the prompt budget is the data step's (it cuts prompts), so it re-runs data and what follows
    budget = {s.kind: s.key for s in build_plan(load_recipe(recipe, ["train.preference.max_prompt_length=8"]))}
    assert [kind for kind in keys if keys[kind] != budget[kind]] == ["data", "train"]


@pytest.mark.parametrize("objective", ["orpo", "simpo", "kto"])
def test_each_pairwise_relative_trains_through_trl(tiny_llama_dir, tmp_path, objective):
    from runner.stages.train.preference import train_objective

    rows = pairs(32)
    if objective == "kto":  # unpaired: each prompt with its good and its bad completion as two labelled rows
        rows = {"prompt": rows["prompt"] * 2, "completion": rows["chosen"] + rows["rejected"],
                "label": [True] * 32 + [False] * 32}
    data = data_step(tiny_llama_dir, tmp_path / "data", rows, objective=objective)
    job = job_for(tiny_llama_dir, data, tmp_path / "out", objective=objective, max_steps=3)
    metrics = train_objective(job)
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert metrics["steps"] == 3 and metrics["objective"] == objective
    assert all(entry["loss"] == entry["loss"] for entry in history if "loss" in entry)  # a number, not NaN
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_grpo_logs_each_reward_by_name_and_the_seed_repeats_the_run(tiny_llama_dir, tmp_path):
    from runner.stages.train.preference import train_objective

    rows = {"prompt": [f"What is {a} plus {a}? Answer:" for a in range(24)], "answer": [str(2 * a) for a in range(24)]}
    data = data_step(tiny_llama_dir, tmp_path / "data", rows, objective="grpo")
    grpo = {"num_generations": 4, "max_completion_length": 6,
            "rewards": [{"name": "numeric_match", "column": "answer"}, {"name": "regex", "pattern": r"^\s*\d"}]}

    def run(out: Path) -> list[dict[str, Any]]:
        job = job_for(tiny_llama_dir, data, out, objective="grpo", preference=None, grpo=grpo, max_steps=2)
        train_objective(job)
        return json.loads((out / "trainer_state.json").read_text())["log_history"]

    first = run(tmp_path / "a")
    assert {"reward", "rewards/numeric_match/mean", "rewards/regex/mean"} <= set(first[0])
    second = run(tmp_path / "b")
    assert [h.get("reward") for h in first] == [h.get("reward") for h in second]


def test_the_doctor_counts_a_full_fine_tunes_frozen_reference(tmp_path):
    from runner.hardware.estimate import estimate
    from runner.recipe import load_recipe

    recipe = write(tmp_path, RECIPE.replace("rejected: [x, v, u, t]", "rejected: [s, v, u, t]"))
    lora = estimate(load_recipe(recipe).recipe)
    full = estimate(load_recipe(recipe, ["train.method=full", "train.lora=null"]).recipe)
    precomputed = estimate(load_recipe(recipe, ["train.method=full", "train.lora=null",
                                                "train.preference.precompute_ref_log_probs=true"]).recipe)
    assert lora.parts["reference"] == 0 and precomputed.parts["reference"] == 0
    assert full.parts["reference"] == full.parts["weights"] > 0
    assert full.peak_bytes - precomputed.peak_bytes == full.parts["weights"]
