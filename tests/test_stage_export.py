"""Export stage: tiny classifier and tiny Llama (LoRA merged) to ONNX, validated against PyTorch; the gate catches a
corrupted export. The train/data input folders are built here the way the train and data stages lay them out.

The builders below are imported by test_stage_quantize.py too, and what they build is shared (`shared`) so a run of both
modules exports each tiny model once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import sentiment_rows

LM_TEMPLATE = "### Instruction:\nsay how it was: {text}\n### Response:\n{label}"


def make_data(folder: Path, tokenizer_dir: Path, task: str, rows: int = 72) -> Path:
    """A data-step output: dataset/ (train/test with text, input_ids, attention_mask, labels) and labels.json."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts, names = sentiment_rows(rows, seed=1)
    if task == "causal-lm":
        texts = [LM_TEMPLATE.format(text=t, label=n) for t, n in zip(texts, names, strict=True)]
    encoded = tokenizer(texts, truncation=True, max_length=64, return_token_type_ids=False)
    label2id = {"negative": 0, "positive": 1}
    labels = [label2id[n] for n in names] if task != "causal-lm" else [list(ids) for ids in encoded["input_ids"]]
    table = {"text": texts, "input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}
    split = rows * 2 // 3
    DatasetDict(
        train=Dataset.from_dict({k: v[:split] for k, v in table.items()}),
        test=Dataset.from_dict({k: v[split:] for k, v in table.items()}),
    ).save_to_disk(str(folder / "dataset"))
    if task != "causal-lm":
        id2label = {str(i): n for n, i in label2id.items()}
        (folder / "labels.json").write_text(json.dumps({"id2label": id2label, "label2id": label2id}))
    return folder


def make_full_train(folder: Path, model_dir: Path) -> Path:
    """A full fine-tune's output: the model and tokenizer saved under model/."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(model_dir).save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder / "model")
    return folder


def make_lora_train(folder: Path, model_dir: Path) -> Path:
    """A LoRA run's output: a peft adapter with the tokenizer beside it. lora_B starts at zero in peft, so it is
    perturbed: the merge must visibly change the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    peft_model.save_pretrained(folder / "adapter")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder / "adapter")
    return folder


def classifier_config(model_dir: Path, **export) -> dict:
    return {"model": {"path": str(model_dir), "task": "sequence-classification"}, "export": export, "seed": 0}


def llama_config(model_dir: Path, **export) -> dict:
    return {"model": {"path": str(model_dir), "task": "causal-lm"}, "export": export, "seed": 0}


_BUILT: dict[str, Any] = {}


def shared(key: str, build: Callable[[], Any]) -> Any:
    """Built once per pytest run, whichever of the two stage test modules asks first (both use these fixtures)."""
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


def classifier_inputs_for(model_dir: Path, factory: pytest.TempPathFactory) -> dict[str, Path]:
    def build() -> dict[str, Path]:
        root = factory.mktemp("classifier-inputs")
        return {
            "train": make_full_train(root / "train", model_dir),
            "data": make_data(root / "data", model_dir, "sequence-classification"),
        }

    return shared("classifier-inputs", build)


def llama_inputs_for(model_dir: Path, factory: pytest.TempPathFactory) -> dict[str, Path]:
    def build() -> dict[str, Path]:
        root = factory.mktemp("llama-inputs")
        return {"train": make_lora_train(root / "train", model_dir), "data": make_data(root / "data", model_dir, "causal-lm")}

    return shared("llama-inputs", build)


def classifier_export_for(model_dir: Path, inputs: dict[str, Path], factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from runner.stages import export

    def build() -> tuple[Path, dict]:
        out = factory.mktemp("classifier-export")
        return out, export.run(classifier_config(model_dir, validation_samples=24), inputs, out)

    return shared("classifier-export", build)


def llama_export_for(model_dir: Path, inputs: dict[str, Path], factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from runner.stages import export

    def build() -> tuple[Path, dict]:
        out = factory.mktemp("llama-export")
        return out, export.run(llama_config(model_dir, validation_samples=16), inputs, out)

    return shared("llama-export", build)




def test_classifier_export_layout_and_gate(classifier_export):
    out, report = classifier_export
    files = {p.name for p in (out / "onnx").iterdir()}
    assert {"model.onnx", "config.json", "labels.json", "tokenizer.json", "tokenizer_config.json"} <= files
    validation = report["validation"]
    assert validation["passed"] and validation["samples"] == 24
    assert validation["max_abs_diff"] <= 1e-4 and validation["top1_agreement"] == 1.0
    assert json.loads((out / "export_report.json").read_text()) == report
    assert report["merge"] == {"merged": False} and report["size_bytes"] > 0


def test_corrupted_export_is_caught(classifier_export, classifier_inputs, tmp_path):
    """Scale one weight matrix of an exported copy: the gate must fail and name the difference."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper
    from transformers import AutoModelForSequenceClassification

    from runner.recipe.sections import Export
    from runner.stages import StageError
    from runner.stages.compare import load_samples
    from runner.stages.export import validate_onnx

    onnx_dir = shutil.copytree(classifier_export[0] / "onnx", tmp_path / "onnx")
    graph = onnx.load(str(onnx_dir / "model.onnx"))
    victim = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the embeddings: every token goes through
    victim.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(victim) * 1.05, victim.name))
    onnx.save(graph, str(onnx_dir / "model.onnx"))

    model = AutoModelForSequenceClassification.from_pretrained(classifier_inputs["train"] / "model").eval()
    samples = load_samples(classifier_inputs["data"], "test", 16)
    with pytest.raises(StageError, match=r"max abs logit difference .* > 0.0001 \(rtol 0.0001 x logit scale"):
        validate_onnx(onnx_dir, model, samples, Export())
    shutil.copy2(classifier_export[0] / "onnx" / "model.onnx", onnx_dir / "model.onnx")  # the intact graph passes
    assert validate_onnx(onnx_dir, model, samples, Export())["passed"]


def test_llama_lora_merged_export_with_past(llama_export, llama_inputs, tiny_llama_dir):
    import numpy as np
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    from runner.stages.compare import batches, load_samples, ort_feed, torch_runner

    out, report = llama_export
    merge = report["merge"]
    assert merge["merged"] and merge["merge_max_abs_diff"] <= merge["tolerance"]
    # the adapter's effect is orders of magnitude above fp32 merge noise: that is how a broken merge is told apart
    assert merge["adapter_effect_max_abs"] > 1000 * merge["merge_max_abs_diff"]
    assert report["exporter"] == "onnxruntime-genai model builder" and report["precision"] == "fp32"
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= {p.name for p in (out / "onnx").iterdir()}
    assert (out / "merged" / "model.safetensors").is_file()  # what the quantize step rebuilds from
    validation = report["validation"]
    assert validation["max_abs_diff"] <= 1e-4 and validation["metric"] == "loss"
    assert validation["greedy"] and all(g["identical"] and len(g["torch"]) > 0 for g in validation["greedy"])
    session = ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert any(i.name.startswith("past_key_values") for i in session.get_inputs())
    # the adapter really went in: the export answers differently from the bare base
    batch = next(batches(load_samples(llama_inputs["data"], "test", 4), pad_id=2))
    base = torch_runner(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval())(batch)
    exported = session.run(["logits"], ort_feed(session, batch))[0]
    assert np.abs(base - exported).max() > 1e-2


def test_adapter_without_merge_is_refused(tiny_llama_dir, llama_inputs, tmp_path):
    from runner.stages import StageError, export

    with pytest.raises(StageError, match="merge_adapter: true"):
        export.run(llama_config(tiny_llama_dir, merge_adapter=False), llama_inputs, tmp_path)


def test_optimized_graph_is_validated(tiny_classifier_dir, classifier_inputs, tmp_path):
    from runner.stages import export

    report = export.run(
        classifier_config(tiny_classifier_dir, optimization_level=99, opset=17, validation_samples=8),
        classifier_inputs,
        tmp_path,
    )
    assert report["optimization_level"] == 99 and report["opset"] == 17 and report["validation"]["passed"]
    assert not (tmp_path / "onnx" / "_optimized").exists()


def test_a_classifier_past_the_external_data_threshold_exports_quantizes_and_serves(
        tiny_classifier_dir, classifier_inputs, tmp_path, monkeypatch):
    """Past 2 GB a protobuf cannot hold the weights: the export keeps them in model.onnx.data (the dynamo exporter's
    name) through metadata stripping and ORT's offline optimization, and quantize and the server read that layout.
    The threshold is set to 0 so a tiny model takes the path a 0.5B-parameter fp32 classifier takes."""
    import onnx

    from runner.serving.settings import ServerSettings
    from runner.stages import export, quantize
    from runner.stages.serve import ServerProcess

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    report = export.run(classifier_config(tiny_classifier_dir, optimization_level=1, validation_samples=16),
                        classifier_inputs, tmp_path / "export")
    onnx_dir = tmp_path / "export" / "onnx"
    assert report["external_data"] and report["validation"]["passed"]
    assert export.external_data_files(onnx_dir / "model.onnx") == ["model.onnx.data"]
    graph_bytes, data_bytes = (onnx_dir / "model.onnx").stat().st_size, (onnx_dir / "model.onnx.data").stat().st_size
    assert data_bytes > graph_bytes and report["size_bytes"] == graph_bytes + data_bytes
    nodes = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph.node
    assert not [e.key for n in nodes for e in n.metadata_props if e.key.startswith(export.DROPPED_METADATA)]

    config = {"model": {"path": str(tiny_classifier_dir), "task": "sequence-classification"},
              "quantize": {"method": "onnx-dynamic-int8", "eval_samples": 16}, "seed": 0}
    quantized = quantize.run(config, {"export": tmp_path / "export", "data": classifier_inputs["data"]}, tmp_path / "q")
    assert quantized["size_after_bytes"] < quantized["size_before_bytes"]
    q_dir = tmp_path / "q" / "onnx"
    assert export.external_data_files(q_dir / "model.onnx") == ["model.onnx.data"]

    process = ServerProcess(q_dir, ServerSettings(), tmp_path / "server.log")
    try:
        process.wait_ready(60)
        with process.client() as client:
            info = client.get("/info").json()
            answer = client.post("/predict", json={"texts": ["a wonderful film", "an awful film"]})
    finally:
        process.stop()
    assert answer.status_code == 200, answer.text
    assert {p["label"] for p in answer.json()["predictions"]} <= {"positive", "negative"}
    assert info["sha256"] != ""


def test_safetensors_merged(tiny_llama_dir, llama_inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    from runner.stages import export

    report = export.run(llama_config(tiny_llama_dir, format="safetensors", validation_samples=4), llama_inputs, tmp_path)
    assert report["format"] == "safetensors" and report["merge"]["merged"]
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in model.named_parameters())
