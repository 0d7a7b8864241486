"""The train stage on real transformers/peft/bitsandbytes with tiny models (conftest) and tiny tokenized data built here.

The data input folder is written by these tests themselves (the data step's layout: dataset/ + labels.json), so they do
not depend on the data stage.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from runner.recipe.sections import Distributed, FullTrain, Lora, LoraTrain, Model, QloraTrain, Quantization
from runner.stages import StageError
from tests.conftest import sentiment_rows

CLASSIFIER = "sequence-classification"
CAUSAL = "causal-lm"
LABELS = {"id2label": {"0": "negative", "1": "positive"}, "label2id": {"negative": 0, "positive": 1}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models (tests/conftest.py)


# --- inputs ------------------------------------------------------------------------------------------------------------


def _save_data(folder: Path, columns: dict[str, list[Any]], labels: dict | None) -> Path:
    from datasets import Dataset

    split = Dataset.from_dict(columns).train_test_split(test_size=0.2, seed=0)
    split.save_to_disk(str(folder / "dataset"))
    if labels is not None:
        (folder / "labels.json").write_text(json.dumps(labels))
    return folder


@pytest.fixture(scope="module")
def classifier_data(tiny_classifier_dir: Path, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    texts, names = sentiment_rows(200)
    encoded = tokenizer(texts, truncation=True, max_length=32, return_token_type_ids=False)
    columns = {"text": texts, **encoded, "labels": [LABELS["label2id"][n] for n in names]}
    return _save_data(tmp_path_factory.mktemp("classifier-data"), columns, LABELS)


@pytest.fixture(scope="module")
def causal_data(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts, names = sentiment_rows(160)
    texts = [f"### Instruction:\n{t}\n### Response:\n{n}{tokenizer.eos_token}" for t, n in zip(texts, names, strict=True)]
    encoded = tokenizer(texts, truncation=True, max_length=48, return_token_type_ids=False)
    columns = {"text": texts, **encoded, "labels": [list(ids) for ids in encoded["input_ids"]]}
    return _save_data(tmp_path_factory.mktemp("causal-data"), columns, None)


def _config(model_dir: Path, task: str, train: Any) -> dict[str, Any]:
    return {
        "model": Model(path=str(model_dir), task=task).model_dump(mode="json"),
        "train": train.model_dump(mode="json"),
        "seed": 42,
    }


def _run(config: dict[str, Any], data: Path, out: Path) -> dict[str, Any]:
    from runner.stages import train

    out.mkdir(parents=True, exist_ok=True)
    return train.run(config, {"data": data}, out)


def _full(**overrides: Any) -> FullTrain:
    settings = {"method": "full", "epochs": 3, "batch_size": 16, "learning_rate": 1e-2, "save_steps": 1000,
                "logging_steps": 5, "warmup_ratio": 0.1}
    return FullTrain(**{**settings, **overrides})


def _lora(**overrides: Any) -> LoraTrain:
    settings = {"method": "lora", "lora": Lora(r=8, alpha=16, dropout=0.0, target_modules="all-linear"), "max_steps": 10,
                "batch_size": 16, "learning_rate": 3e-2, "eval_strategy": "no", "logging_steps": 5, "save_steps": 1000}
    return LoraTrain(**{**settings, **overrides})


# --- full fine-tune ----------------------------------------------------------------------------------------------------


def test_full_finetune_learns_sentiment_and_writes_the_contract(tiny_classifier_dir, classifier_data, tmp_path):
    out = tmp_path / "out"
    metrics = _run(_config(tiny_classifier_dir, CLASSIFIER, _full()), classifier_data, out)

    assert metrics["eval_accuracy_before"] <= 0.65  # random head: chance
    assert metrics["eval_accuracy"] >= 0.85
    assert 0.85 <= metrics["eval_f1"] <= 1
    assert metrics["eval_loss"] < metrics["eval_loss_before"]
    assert metrics["world_size"] == 1 and metrics["trainable_params"] == metrics["total_params"]
    assert metrics["resumed_from_step"] is None

    model = out / "model"
    assert (model / "model.safetensors").exists() and (model / "tokenizer.json").exists()
    assert not (model / "training_args.bin").exists()  # no pickles in the result
    assert json.loads((model / "config.json").read_text())["id2label"] == LABELS["id2label"]
    assert json.loads((model / "labels.json").read_text()) == LABELS
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == metrics["steps"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert not (out / "checkpoints").exists()  # removed once the step succeeded


# --- LoRA and QLoRA on the causal LM -------------------------------------------------------------------------------------


def _logits(model: Any, data: Path) -> Any:
    import torch
    from datasets import load_from_disk

    ids = torch.tensor([load_from_disk(str(data / "dataset"))["test"][0]["input_ids"]])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_lora_loss_falls_and_merged_adapter_reproduces_it(tiny_llama_dir, causal_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    metrics = _run(_config(tiny_llama_dir, CAUSAL, _lora()), causal_data, out)

    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.1  # a random base: the adapter alone must lower it
    assert metrics["eval_perplexity"] < metrics["eval_perplexity_before"]
    assert 0 < metrics["trainable_params"] < metrics["total_params"] / 2
    assert metrics["adapter_bytes"] == (out / "adapter" / "adapter_model.safetensors").stat().st_size
    assert (out / "adapter" / "tokenizer.json").exists()

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out / "adapter")
    expected = _logits(adapted, causal_data)
    merged = adapted.merge_and_unload()
    assert (_logits(merged, causal_data) - expected).abs().max().item() < 1e-4
    untrained = _logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), causal_data)
    assert (untrained - expected).abs().max().item() > 1e-2  # the adapter did change the model


def test_model_dtype_bfloat16_loads_the_base_in_bf16_and_still_learns_on_cpu(tiny_llama_dir, causal_data, tmp_path,
                                                                              monkeypatch):
    """`model.dtype: bfloat16`: the frozen base is loaded in bf16 (half the weights' memory), peft keeps the adapters in
    fp32, and the loss still falls on CPU; export's merge and evaluate load the base the same way."""
    import torch

    import runner.stages.train as train_stage
    from runner.stages import merge

    built = []
    original = train_stage.build_model
    monkeypatch.setattr(train_stage, "build_model", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    config = _config(tiny_llama_dir, CAUSAL, _lora())
    config["model"]["dtype"] = "bfloat16"
    metrics = _run(config, causal_data, tmp_path / "out")
    params = list(built[0].named_parameters())
    assert {p.dtype for name, p in params if "lora_" not in name} == {torch.bfloat16}
    assert {p.dtype for name, p in params if "lora_" in name} == {torch.float32}
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.1
    base = merge.load_base(Model.model_validate(config["model"]), {"data": causal_data})
    assert next(base.parameters()).dtype == torch.bfloat16
    unset = merge.load_base(Model(path=str(tiny_llama_dir), task=CAUSAL), {"data": causal_data})
    assert next(unset.parameters()).dtype == torch.float32  # unset: full precision, as before the field existed


def test_qlora_8bit_trains_on_cpu(tiny_llama_dir, causal_data, tmp_path):
    train = QloraTrain(**{**_lora().model_dump(), "method": "qlora", "quantization": Quantization(bits=8)})
    metrics = _run(_config(tiny_llama_dir, CAUSAL, train), causal_data, tmp_path / "out")
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.1
    assert metrics["adapter_bytes"] > 0


def test_eval_before_training_can_be_skipped(tiny_llama_dir, causal_data, tmp_path, monkeypatch):
    """`eval_before_training: false` saves the pass over the eval set before training; the final eval still runs."""
    from transformers import Trainer

    evaluations = []
    original = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self, *a, **k: evaluations.append(1) or original(self, *a, **k))
    out = tmp_path / "out"
    metrics = _run(_config(tiny_llama_dir, CAUSAL, _lora(max_steps=2, eval_before_training=False)), causal_data, out)
    assert len(evaluations) == 1  # eval_strategy "no": only the final evaluation
    assert metrics["eval_loss_before"] is None and metrics["eval_perplexity_before"] is None
    assert isinstance(metrics["eval_loss"], float) and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_4bit_qlora_learns_after_an_eval_pass(tiny_llama_dir, causal_data, tmp_path):
    """4-bit QLoRA trains wherever it runs: the eval pass before training (a no-grad forward in eval mode) used to
    repack bitsandbytes' 4-bit weights into its CPU inference layout, which has no backward, so every gradient was zero
    and the gradient guard stopped the step (bench/bnb_4bit_cpu.py); build.keep_4bit_layout keeps them trainable."""
    # q/v only, as the shipped QLoRA recipes: with every linear layer adapted, gradients could flow around a cut 4-bit
    # layer through its adapter, and the bug would not show
    lora = Lora(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    train = QloraTrain(**{**_lora().model_dump(), "method": "qlora", "lora": lora,
                          "quantization": Quantization(bits=4, compute_dtype="float32")})
    metrics = _run(_config(tiny_llama_dir, CAUSAL, train), causal_data, tmp_path / "out")
    assert metrics["eval_loss_before"] is not None  # the eval pass ran first
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.1
    assert metrics["adapter_bytes"] > 0


# --- resume after a kill -----------------------------------------------------------------------------------------------


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (BaseException, so no `except Exception` cleans up)."""


def test_killed_run_resumes_from_checkpoint_and_matches_uninterrupted(
    tiny_classifier_dir, classifier_data, tmp_path, monkeypatch, caplog
):
    from transformers import Trainer

    config = _config(tiny_classifier_dir, CLASSIFIER, _full(max_steps=12, save_steps=4, eval_strategy="no"))
    whole = _run(config, classifier_data, tmp_path / "whole")

    out = tmp_path / "killed"
    step = Trainer.training_step

    def dies_at_step_7(self, *args, **kwargs):  # noqa: ANN001, ANN202
        if self.state.global_step == 6:  # checkpoint-4 is on disk, steps 5 and 6 are lost
            raise Killed
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", dies_at_step_7)
    with pytest.raises(Killed):
        _run(config, classifier_data, out)
    monkeypatch.setattr(Trainer, "training_step", step)
    assert (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").exists()
    (out / "checkpoints" / "checkpoint-8").mkdir()  # killed while saving: no trainer_state.json yet

    with caplog.at_level(logging.INFO, logger="runner.stages.train"):
        resumed = _run(config, classifier_data, out)

    assert resumed["resumed_from_step"] == 4
    assert "resuming from" in caplog.text and "removing incomplete checkpoint" in caplog.text
    assert resumed["steps"] == whole["steps"] == 12
    assert abs(resumed["eval_loss"] - whole["eval_loss"]) < 1e-4
    assert abs(resumed["train_loss"] - whole["train_loss"]) < 1e-4  # from the log history carried by the checkpoint
    assert not (out / "checkpoints").exists()


def test_resume_point_skips_half_written_checkpoints(tmp_path):
    from runner.stages.train.checkpoints import resume_point

    assert resume_point(tmp_path / "none") is None
    for step, state in ((2, "{}"), (4, "{}"), (6, '{"global_st'), (8, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert resume_point(tmp_path) == tmp_path / "checkpoint-4"


# --- guards ------------------------------------------------------------------------------------------------------------


def test_gradient_guard_fails_when_every_gradient_is_zero(tiny_classifier_dir, classifier_data, tmp_path, monkeypatch):
    import torch

    from runner.stages import pretrained

    load = pretrained.load_model

    def zero_gradients(*args, **kwargs):  # noqa: ANN202 - a model that "trains" but never gets a gradient
        model = load(*args, **kwargs)
        for param in model.parameters():
            param.register_hook(torch.zeros_like)
        return model

    monkeypatch.setattr(pretrained, "load_model", zero_gradients)
    with pytest.raises(StageError, match="gradient guard"):
        _run(_config(tiny_classifier_dir, CLASSIFIER, _full(max_steps=3)), classifier_data, tmp_path / "out")


def test_classifier_metrics_match_sklearn_definitions():
    import numpy as np
    from transformers import EvalPrediction

    from runner.stages.train.trainer import classifier_metrics

    logits = np.eye(3)[[0, 0, 1, 2, 2, 2]]
    result = classifier_metrics(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 1, 2, 2, 0])))
    # per label F1: 0 -> 2*1/(2+1+1) = .5, 1 -> 2*1/(2+0+1) = .667, 2 -> 2*2/(4+1+0) = .8
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)


# --- out of memory -----------------------------------------------------------------------------------------------------


def _oom_once(monkeypatch) -> list[int]:
    import torch
    from transformers import Trainer

    train = Trainer.train
    batches: list[int] = []

    def first_attempt_runs_out(self, *args, **kwargs):  # noqa: ANN001, ANN202
        batches.append(self.args.per_device_train_batch_size)
        if len(batches) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", first_attempt_runs_out)
    return batches


def test_out_of_memory_halves_batch_and_doubles_accumulation(
    tiny_classifier_dir, classifier_data, tmp_path, monkeypatch, caplog
):
    batches = _oom_once(monkeypatch)
    config = _config(tiny_classifier_dir, CLASSIFIER, _full(max_steps=2, batch_size=8, gradient_accumulation=2))
    with caplog.at_level(logging.WARNING, logger="runner.stages.train"):
        metrics = _run(config, classifier_data, tmp_path / "out")
    assert batches == [8, 4]
    assert (metrics["batch_size"], metrics["gradient_accumulation"], metrics["oom_retries"]) == (4, 4, 1)
    assert metrics["effective_batch_size"] == 16
    assert "retrying with batch size 4 x accumulation 4" in caplog.text


def test_out_of_memory_below_the_floor_is_a_stage_error(tiny_classifier_dir, classifier_data, tmp_path, monkeypatch):
    _oom_once(monkeypatch)
    config = _config(tiny_classifier_dir, CLASSIFIER, _full(max_steps=2, batch_size=8, min_batch_size=8))
    with pytest.raises(StageError, match="out of accelerator memory at batch size 8"):
        _run(config, classifier_data, tmp_path / "out")


# --- several processes ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tiny_classifier_dir, classifier_data, tmp_path):
    train = _full(max_steps=4, batch_size=8, distributed=Distributed(nproc_per_node=2, backend="gloo"))
    out = tmp_path / "out"
    metrics = _run(_config(tiny_classifier_dir, CLASSIFIER, train), classifier_data, out)
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    assert metrics["effective_batch_size"] == 16
    assert (out / "model" / "model.safetensors").exists()
    assert not (out / "launch").exists() and not (out / "checkpoints").exists()


def test_precision_is_checked_against_the_hardware():
    import torch

    from runner.stages.train import check_hardware

    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a GPU")
    with pytest.raises(StageError, match="fp16` needs a CUDA GPU"):
        check_hardware(_full(precision="fp16"))
    check_hardware(_full(precision="bf16"))  # CPU autocast runs bf16
