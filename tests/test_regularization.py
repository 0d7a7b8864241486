"""L2-SP (`train.l2sp`) as specifications: the penalty measures how far the pretrained weights moved, a run with it ends
closer to where it started, a fresh head is not pulled anywhere, one optimizer step adds the penalty once whatever the
gradient accumulation, a resumed run still pulls toward the *pretrained* weights, the recipe refuses it where it cannot
apply, and the doctor counts its copy of the weights.

Tiny config-built models (conftest) and tiny data; the forgetting figure on the real classifier is bench/forgetting.py's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.recipe import RecipeError, load_recipe
from runner.recipe.sections import FullTrain, Model
from runner.stages.train import regularize
from tests.conftest import REPO, sentiment_rows

CLASSIFIER = "sequence-classification"
CAUSAL = "causal-lm"
LABELS = {"id2label": {"0": "negative", "1": "positive"}, "label2id": {"negative": 0, "positive": 1}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models (tests/conftest.py)


# --- inputs ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_dir(tiny_classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny classifier without dropout, so that two batch layouts of the same examples give the same gradients."""
    import shutil

    out = tmp_path_factory.mktemp("classifier-no-dropout")
    shutil.copytree(tiny_classifier_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config |= {"dropout": 0.0, "attention_dropout": 0.0, "seq_classif_dropout": 0.0}
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def bare_encoder_dir(tiny_classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's encoder alone, saved without any head: like all-MiniLM-L6-v2, a classifier built from it gets
    fresh `pre_classifier` and `classifier` layers."""
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path_factory.mktemp("bare-encoder")
    AutoModel.from_pretrained(tiny_classifier_dir).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_classifier_dir).save_pretrained(out)
    return out


def _save(folder: Path, columns: dict[str, list[Any]], labels: dict | None) -> Path:
    from datasets import Dataset

    Dataset.from_dict(columns).train_test_split(test_size=0.2, seed=0).save_to_disk(str(folder / "dataset"))
    if labels is not None:
        (folder / "labels.json").write_text(json.dumps(labels))
    return folder


@pytest.fixture(scope="module")
def classifier_data(tiny_classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    texts, names = sentiment_rows(120)
    encoded = tokenizer(texts, truncation=True, max_length=32, return_token_type_ids=False)
    columns = {"text": texts, **encoded, "labels": [LABELS["label2id"][n] for n in names]}
    return _save(tmp_path_factory.mktemp("classifier-data"), columns, LABELS)


@pytest.fixture(scope="module")
def causal_data(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts, names = sentiment_rows(80)
    texts = [f"### Instruction:\n{t}\n### Response:\n{n}{tokenizer.eos_token}" for t, n in zip(texts, names, strict=True)]
    encoded = tokenizer(texts, truncation=True, max_length=48, return_token_type_ids=False)
    columns = {"text": texts, **encoded, "labels": [list(ids) for ids in encoded["input_ids"]]}
    return _save(tmp_path_factory.mktemp("causal-data"), columns, None)


def _train(model_dir: Path, task: str, data: Path, out: Path, **train: Any) -> dict[str, Any]:
    from runner.stages import train as train_stage

    settings = {"method": "full", "max_steps": 8, "batch_size": 16, "learning_rate": 1e-2, "save_steps": 1000,
                "logging_steps": 2, "eval_strategy": "no", "eval_before_training": False}
    config = {"model": Model(path=str(model_dir), task=task).model_dump(mode="json"),
              "train": FullTrain(**{**settings, **train}).model_dump(mode="json"), "seed": 42}
    out.mkdir(parents=True, exist_ok=True)
    return train_stage.run(config, {"data": data}, out)


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _distance(a: dict[str, Any], b: dict[str, Any], names: list[str]) -> float:
    return math.sqrt(sum(float(((a[n] - b[n]) ** 2).sum()) for n in names))


# --- the penalty -------------------------------------------------------------------------------------------------------


def test_penalty_is_zero_at_the_start_and_grows_with_the_squared_distance(classifier_dir: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir)
    anchor = regularize.snapshot(model, 0.5)
    assert float(regularize.penalty(model, anchor).detach()) == 0.0
    assert anchor.numel == sum(p.numel() for p in model.parameters())

    weight = model.distilbert.embeddings.word_embeddings.weight
    with torch.no_grad():
        weight[3, :4] += 0.1  # four weights moved by 0.1: sum of squares 4 * 0.01
    assert float(regularize.penalty(model, anchor).detach()) == pytest.approx(0.5 * 0.04, rel=1e-4)
    with torch.no_grad():
        weight[3, :4] += 0.1  # twice as far: four times the penalty
    assert float(regularize.penalty(model, anchor).detach()) == pytest.approx(0.5 * 0.16, rel=1e-4)

    loss = regularize.penalty(model, anchor)
    loss.backward()  # its gradient is 2 * l2sp * (w - w0): pulls back toward the start, nowhere else
    assert torch.allclose(weight.grad[3, :4], torch.full((4,), 2 * 0.5 * 0.2))
    assert int((weight.grad != 0).sum()) == 4
    assert regularize.log_entries(anchor)["l2sp_distance"] == pytest.approx(0.4, rel=1e-4)  # sqrt(4 * 0.2^2)


def test_a_fresh_head_has_no_pretrained_value_and_is_left_out(bare_encoder_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    loaded = AutoModelForSequenceClassification.from_pretrained(
        bare_encoder_dir, num_labels=2, **regularize.load_kwargs(0.1))
    model = regularize.attach(loaded, 0.1)
    anchor = regularize.anchor_of(model)
    assert anchor is not None
    heads = [n for n, _ in model.named_parameters() if n.startswith(("pre_classifier.", "classifier."))]
    assert sorted(anchor.excluded) == sorted(heads) and len(heads) == 4
    assert set(anchor.weights) == {n for n, _ in model.named_parameters()} - set(heads)  # the whole encoder
    assert regularize.attach(model, None) is model and regularize.load_kwargs(None) == {}  # off: nothing asked or kept


# --- in the train stage ------------------------------------------------------------------------------------------------


PULLED = {"max_steps": 8, "save_steps": 4, "l2sp": 0.5}  # strong, so that a few steps of a tiny model show it


@pytest.fixture(scope="module")
def pulled(classifier_dir, classifier_data, tmp_path_factory) -> tuple[dict[str, Any], Path]:
    """One uninterrupted run with L2-SP (the reference of the tests below)."""
    out = tmp_path_factory.mktemp("pulled")
    return _train(classifier_dir, CLASSIFIER, classifier_data, out, **PULLED), out


def test_a_run_with_l2sp_ends_closer_to_its_pretrained_weights(classifier_dir, classifier_data, pulled,
                                                               tmp_path) -> None:
    start = _weights(classifier_dir)
    plain = _train(classifier_dir, CLASSIFIER, classifier_data, tmp_path / "plain",
                   **{k: v for k, v in PULLED.items() if k != "l2sp"})
    metrics, out = pulled

    names = sorted(start)  # this checkpoint has its head: every weight is pretrained
    far = _distance(_weights(tmp_path / "plain" / "model"), start, names)
    near = _distance(_weights(out / "model"), start, names)
    assert near < 0.7 * far, (near, far)
    assert metrics["l2sp_distance"] == pytest.approx(near, rel=1e-3)  # what metrics.json says is what moved
    assert metrics["l2sp"] == 0.5 and metrics["l2sp_params"] == sum(t.numel() for t in start.values())
    assert "l2sp" not in plain

    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [h for h in history if "loss" in h]
    assert logged and all("l2sp_penalty" in h and "l2sp_distance" in h for h in logged)
    assert logged[0]["l2sp_penalty"] == 0 < logged[-1]["l2sp_penalty"]  # nothing moved at step 1; then it grows
    assert all("l2sp_penalty" not in h for h in history if "eval_loss" in h)  # eval loss is the task's alone


def _steps(run: Path) -> list[tuple[float, float, float]]:
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    return [(h["loss"], h["grad_norm"], h["l2sp_penalty"]) for h in history if "loss" in h]


@pytest.mark.parametrize("task", [CLASSIFIER, CAUSAL])
def test_one_optimizer_step_adds_the_penalty_once_whatever_the_accumulation(
    task, classifier_dir, classifier_data, tiny_llama_dir, causal_data, tmp_path, monkeypatch
) -> None:
    """16 examples in one batch, or in two accumulated batches of 8: every step has the same loss, gradient norm and
    penalty. The causal LM's loss is normalized over the accumulated batch's tokens (each micro-batch then carries
    half of the penalty); the classifier's is a per-batch mean, which Trainer must divide by the accumulation steps
    (the train step marks classifiers so: their forward declares **kwargs, which Trainer took for "normalizes over the
    accumulated batch itself", transformers #47688)."""
    model_dir, data = (classifier_dir, classifier_data) if task == CLASSIFIER else (tiny_llama_dir, causal_data)
    settings = {"max_steps": 4, "l2sp": 0.5, "logging_steps": 1, "learning_rate": 3e-3}  # strong: of the task loss's order
    whole = _train(model_dir, task, data, tmp_path / "whole", **settings)
    halves = _train(model_dir, task, data, tmp_path / "halves", **settings, batch_size=8, gradient_accumulation=2)

    # The logged loss includes the penalty: a penalty counted twice (or half) would shift it by the penalty, 100x the
    # tolerance. Adam moves a coordinate whose gradient is float noise by a whole learning rate, so the weights and the
    # penalty differ by rounding between the layouts, far below that.
    assert max(p for _, _, p in _steps(tmp_path / "whole")) > 1e-3
    for (loss, norm, term), (loss2, norm2, term2) in zip(_steps(tmp_path / "whole"), _steps(tmp_path / "halves"),
                                                           strict=True):
        assert loss2 == pytest.approx(loss, abs=1e-5) and term2 == pytest.approx(term, abs=1e-5)
        assert norm2 == pytest.approx(norm, rel=1e-3)
    assert halves["l2sp_distance"] == pytest.approx(whole["l2sp_distance"], rel=1e-2)


class Killed(Exception):
    pass


def test_a_resumed_run_still_pulls_toward_the_pretrained_weights(classifier_dir, classifier_data, pulled, tmp_path,
                                                                  monkeypatch) -> None:
    """The checkpoint holds trained weights; the copy is taken from the base model before they are loaded, so the
    resumed run equals the uninterrupted one (a copy taken from the checkpoint would pull toward step 4's weights)."""
    from transformers import Trainer

    whole, whole_out = pulled
    step = Trainer.training_step

    def dies_at_step_6(self, *args, **kwargs):  # noqa: ANN001, ANN202
        if self.state.global_step == 5:
            raise Killed
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", dies_at_step_6)
    with pytest.raises(Killed):
        _train(classifier_dir, CLASSIFIER, classifier_data, tmp_path / "killed", **PULLED)
    monkeypatch.setattr(Trainer, "training_step", step)
    resumed = _train(classifier_dir, CLASSIFIER, classifier_data, tmp_path / "killed", **PULLED)

    assert resumed["resumed_from_step"] == 4
    assert resumed["l2sp_distance"] == pytest.approx(whole["l2sp_distance"], rel=1e-4)
    a, b = _weights(whole_out / "model"), _weights(tmp_path / "killed" / "model")
    assert _distance(a, b, sorted(a)) < 1e-4 * whole["l2sp_distance"]

    def penalties(run: Path) -> list[float]:
        history = json.loads((run / "trainer_state.json").read_text())["log_history"]
        return [h["l2sp_penalty"] for h in history if "l2sp_penalty" in h]

    assert penalties(tmp_path / "killed") == pytest.approx(penalties(whole_out), rel=1e-4)


# --- the recipe --------------------------------------------------------------------------------------------------------


def _recipe(tmp_path: Path, train: dict[str, Any]) -> Path:
    recipe = {
        "name": "l2sp",
        "model": {"init": {"architecture": "distilbert"}, "task": CLASSIFIER},
        "data": {"source": {"path": str(REPO / "tests" / "recipes" / "reviews.csv")}},
        "train": train,
    }
    path = tmp_path / "l2sp.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _problems(path: Path) -> list[tuple[str, int, str]]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    return [(".".join(map(str, p.loc)), p.pos.line, p.message) for p in caught.value.problems]


def test_l2sp_is_for_full_fine_tunes_and_is_refused_at_its_line_elsewhere(tmp_path: Path) -> None:
    assert load_recipe(_recipe(tmp_path, {"method": "full", "l2sp": 0.01})).recipe.train.l2sp == 0.01

    lora = {"method": "lora", "lora": {"target_modules": "all-linear"}, "l2sp": 0.01}
    [(loc, line, message)] = _problems(_recipe(tmp_path, lora))
    assert loc == "train.l2sp" and "applies to `method: full`" in message and "remove `l2sp`" in message
    assert (tmp_path / "l2sp.yaml").read_text().splitlines()[line - 1].strip() == "l2sp: 0.01"

    fsdp = {"method": "full", "l2sp": 0.01, "distributed": {"fsdp": "full_shard"}}
    [(loc, _, message)] = _problems(_recipe(tmp_path, fsdp))
    assert loc == "train.l2sp" and "fsdp" in message

    [(loc, _, message)] = _problems(_recipe(tmp_path, {"method": "full", "l2sp": 0}))  # off is unset, not 0
    assert loc == "train.l2sp" and "greater than 0" in message


# --- the doctor --------------------------------------------------------------------------------------------------------


def test_the_doctor_counts_the_copy_of_the_pretrained_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.hardware.estimate import estimate

    monkeypatch.chdir(REPO)
    recipe = REPO / "recipes" / "distilbert_imdb.yaml"
    plain = estimate(load_recipe(recipe).recipe, "cuda")
    pulled = estimate(load_recipe(recipe, ["train.l2sp=0.01"]).recipe, "cuda")

    assert plain.parts["l2sp_reference"] == 0
    assert pulled.parts["l2sp_reference"] == 4 * pulled.params_total  # fp32, as the train stage loads the base
    # the copy is there at both moments; the gradients also through the backward pass (the penalty's come first)
    assert pulled.phases["optimizer_step"] == plain.phases["optimizer_step"] + pulled.parts["l2sp_reference"]
    assert pulled.phases["backward_start"] == (plain.phases["backward_start"] + pulled.parts["l2sp_reference"]
                                               + pulled.parts["gradients"])
    assert pulled.peak_bytes > plain.peak_bytes


def test_the_doctor_shows_the_copy_on_its_own_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from runner.hardware.doctor import doctor

    monkeypatch.chdir(REPO)
    doctor(["distilbert_imdb", "train.l2sp=0.01"], profile="t4-16gb")
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("l2sp:"))
    assert "copy of the pretrained weights 0.25 GiB" in line  # 67 M fp32 weights
