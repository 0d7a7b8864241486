"""Quantize stage: ONNX Runtime dynamic and static int8 of the tiny classifier export, weight-only int8/int4 of the tiny
Llama (rebuilt by onnxruntime-genai's builder), bitsandbytes 8/4-bit of the merged models (both load and run on CPU
with bitsandbytes 0.50); sizes and metric drops reported, the drop and greedy gates enforced."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest


def quantize_config(model_dir: Path, task: str, **quantize) -> dict:
    return {"model": {"path": str(model_dir), "task": task}, "quantize": quantize, "seed": 0}


def onnx_inputs(inputs: dict[str, Path], export_out: Path) -> dict[str, Path]:
    return {"export": export_out, "data": inputs["data"]}


def test_cpu_preset_is_detected():
    from runner.stages.quantize import cpu_preset

    preset, reason = cpu_preset()
    assert preset in {"avx512_vnni", "avx512", "avx2", "arm64"} and reason


def test_dynamic_int8_classifier(tiny_classifier_dir, classifier_inputs, classifier_export, tmp_path):
    import onnx

    from runner.stages import quantize

    config = quantize_config(tiny_classifier_dir, "sequence-classification", method="onnx-dynamic-int8", eval_samples=24)
    report = quantize.run(config, onnx_inputs(classifier_inputs, classifier_export[0]), tmp_path)
    files = {p.name for p in (tmp_path / "onnx").iterdir()}
    assert {"model.onnx", "config.json", "labels.json", "tokenizer.json"} <= files
    assert report["size_after_bytes"] < report["size_before_bytes"] and report["metric"] == "accuracy"
    assert report["comparison"]["samples"] == 24 and report["metric_drop"] <= 0.01
    ops = {node.op_type for node in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    assert json.loads((tmp_path / "quantize_report.json").read_text()) == report


def test_dynamic_int8_accuracy_is_measured_as_the_server_runs_it(tiny_classifier_dir, classifier_inputs,
                                                                  classifier_export, tmp_path):
    """Dynamic int8 scales activations per run, so a text scores differently beside padded neighbours; the recorded
    accuracy is that of each text run alone and unpadded, which is what the server does and what serve gates against."""
    import numpy as np

    from runner.stages import quantize
    from runner.stages.compare import load_samples, ort_feed, ort_session

    config = quantize_config(tiny_classifier_dir, "sequence-classification", method="onnx-dynamic-int8", eval_samples=24)
    report = quantize.run(config, onnx_inputs(classifier_inputs, classifier_export[0]), tmp_path)
    session = ort_session(tmp_path / "onnx" / "model.onnx")
    right = 0
    for sample in load_samples(classifier_inputs["data"], "test", 24):
        alone = {"input_ids": np.array([sample["input_ids"]]), "attention_mask": np.array([sample["attention_mask"]])}
        right += int(session.run(["logits"], ort_feed(session, alone))[0].argmax() == sample["labels"])
    assert report["evaluated"] == "one text at a time, unpadded"
    assert report["comparison"]["metric_candidate"] == right / 24


def test_signed_7bit_weights_are_quantized_as_asked(tiny_classifier_dir, classifier_inputs, classifier_export, tmp_path):
    """weights: s8-7bit stores int8 weights in 7 bits whatever the CPU preset would pick, and still passes the gate."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from runner.stages import quantize

    config = quantize_config(tiny_classifier_dir, "sequence-classification", method="onnx-dynamic-int8",
                             weights="s8-7bit", eval_samples=24)
    report = quantize.run(config, onnx_inputs(classifier_inputs, classifier_export[0]), tmp_path)
    assert (report["weights"], report["weights_dtype"], report["reduce_range"]) == ("s8-7bit", "QInt8", True)
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    matmul_weights = {node.input[1] for node in graph.node if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")}
    quantized = [numpy_helper.to_array(t) for t in graph.initializer if t.name in matmul_weights]
    assert quantized and all(w.dtype.name == "int8" and np.abs(w.astype(int)).max() <= 64 for w in quantized)
    assert report["metric_drop"] <= 0.01


# Gates at what the tiny random Llama measured (2 cores, 2026-12-07) with a margin: int8 weights, eval loss +0.017%,
# greedy 4/4 prompts, top-1 0.986 of tokens; int4 k_quant, loss -0.23%, top-1 0.880, greedy 0/4 (a random model's
# greedy tokens sit at near ties, which int4 rounding flips at token 7 or 8; the greedy gate's failing case is below).
@pytest.mark.parametrize(("bits", "algorithm", "max_drop", "min_greedy", "min_top1"),
                         [(8, "default", 0.005, 1.0, 0.95), (4, "k_quant", 0.02, 0.0, 0.8)])
def test_weight_only_llama(bits, algorithm, max_drop, min_greedy, min_top1, tiny_llama_dir, llama_inputs, llama_export,
                           tmp_path):
    import onnx

    from runner.stages import quantize

    config = quantize_config(tiny_llama_dir, "causal-lm", method="onnx-weight-only", bits=bits, algorithm=algorithm,
                             block_size=32, eval_samples=16, greedy_prompts=4, greedy_tokens=8, max_metric_drop=max_drop,
                             min_greedy_agreement=min_greedy)
    report = quantize.run(config, onnx_inputs(llama_inputs, llama_export[0]), tmp_path)
    assert (report["bits"], report["algorithm"], report["block_size"]) == (bits, algorithm, 32)
    assert report["builder_options"]["algo_config"] == algorithm and report["metric"] == "loss"
    assert report["size_after_bytes"] < report["size_before_bytes"]
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(next(a.i for a in n.attribute if a.name == "bits") == bits for n in nbits)
    # a broken quantization (scales off, weights scrambled) leaves about 1/1000 of top-1 tokens of a 1000-token vocabulary
    assert report["greedy"]["prompts"] == 4 and report["comparison"]["top1_agreement"] >= min_top1
    assert {"genai_config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "onnx").iterdir()}


@pytest.mark.parametrize(("agreed", "prompts", "minimum", "fails"),
                         [(3, 4, 1.0, True), (4, 4, 1.0, False), (3, 4, 0.75, False), (2, 4, 0.75, True), (0, 8, 0.1, True)])
def test_greedy_gate(agreed, prompts, minimum, fails):
    """Fewer prompts keeping their greedy tokens than `min_greedy_agreement` asks fails the step; as many passes."""
    from runner.stages import StageError
    from runner.stages.quantize import check_greedy

    report = {"method": "onnx-weight-only", "bits": 4,
              "greedy": {"prompts": prompts, "agreed": agreed, "agreement": agreed / prompts, "rows": []}}
    if fails:
        with pytest.raises(StageError, match=f"agreement {agreed / prompts:.2f} < min_greedy_agreement {minimum}"):
            check_greedy(report, minimum)
    else:
        check_greedy(report, minimum)


def test_greedy_gate_fails_exactly_when_agreement_is_below_the_minimum(tiny_llama_dir, llama_inputs, llama_export,
                                                                       tmp_path):
    """int4 with 256-wide blocks on a random tiny model: whether greedy tokens survive is chance, so the outcome is tied
    to the reported agreement (the report is written before the gates)."""
    from runner.stages import StageError, quantize

    config = quantize_config(tiny_llama_dir, "causal-lm", method="onnx-weight-only", bits=4, block_size=256,
                             eval_samples=8, greedy_prompts=4, greedy_tokens=8, max_metric_drop=0.02,
                             min_greedy_agreement=1.0)  # measured here: 0/4 prompts kept, loss -0.09%: the gate fails
    try:
        quantize.run(config, onnx_inputs(llama_inputs, llama_export[0]), tmp_path)
        failed = ""
    except StageError as error:
        failed = str(error)
    report = json.loads((tmp_path / "quantize_report.json").read_text())
    assert bool(failed) == (report["greedy"]["agreement"] < 1.0)
    assert not failed or "min_greedy_agreement 1.0" in failed


def test_weight_only_drop_is_relative_and_may_exceed_one():
    """The LM drop is a relative loss increase: 0.87 -> 1.93 is 1.22, which a limit above 1 accepts."""
    from runner.recipe.sections import OnnxWeightOnly
    from runner.stages.quantize import check_drop, metric_drop

    drop = metric_drop({"metric_reference": 0.87, "metric_candidate": 1.93}, "causal-lm")
    assert drop["metric_drop"] == pytest.approx(1.2184, abs=1e-4)
    limit = OnnxWeightOnly(method="onnx-weight-only", max_metric_drop=1.5).max_metric_drop
    check_drop({"method": "onnx-weight-only", **drop}, limit)


def test_static_int8_classifier(tiny_classifier_dir, classifier_inputs, classifier_export, tmp_path):
    from runner.stages import quantize

    # measured (2026-12-07): accuracy unchanged, top-1 equal on 24/24, largest logit change 1.8e-4 at scale 9.6e-3;
    # the gate allows one flip of 24 (other CPUs' int8 kernels round differently)
    config = quantize_config(tiny_classifier_dir, "sequence-classification", method="onnx-static-int8",
                             calibration_samples=16, eval_samples=24, max_metric_drop=0.05)
    report = quantize.run(config, onnx_inputs(classifier_inputs, classifier_export[0]), tmp_path)
    assert report["size_after_bytes"] < report["size_before_bytes"]
    assert report["comparison"]["top1_agreement"] >= 23 / 24


def test_drop_gate_fails_exactly_when_the_drop_exceeds_the_limit(tiny_llama_dir, llama_inputs, llama_export, tmp_path):
    """With max_metric_drop near 0 the step fails if and only if int4 raised the loss by more. On a random tiny model
    the size of that change is chance, so the assertion ties the outcome to the reported drop (written before the gate)."""
    from runner.stages import StageError, quantize

    config = quantize_config(tiny_llama_dir, "causal-lm", method="onnx-weight-only", bits=4, eval_samples=16,
                             greedy_prompts=1, max_metric_drop=1e-9, min_greedy_agreement=0)
    try:
        quantize.run(config, onnx_inputs(llama_inputs, llama_export[0]), tmp_path)
        failed = ""
    except StageError as error:
        failed = str(error)
    report = json.loads((tmp_path / "quantize_report.json").read_text())  # written before the gate, for the post-mortem
    assert report["metric_drop"] != 0 and bool(failed) == (report["metric_drop"] > 1e-9)
    assert not failed or re.search(r"lost too much: loss .* > max_metric_drop 1e-09", failed)


@pytest.mark.parametrize(
    ("drop", "limit", "fails"),
    [(0.011, 0.01, True), (0.01, 0.01, False), (-0.5, 0.0, False), (float("nan"), 1.0, True)],
)
def test_drop_gate(drop, limit, fails):
    """A drop above `max_metric_drop` fails, equal passes, an improvement passes, NaN (a broken model) fails."""
    from runner.stages import StageError
    from runner.stages.quantize import check_drop

    report = {"method": "onnx-dynamic-int8", "metric": "accuracy", "metric_before": 0.9, "metric_after": 0.9 - drop,
              "metric_drop": drop}
    if fails:
        with pytest.raises(StageError, match="max_metric_drop"):
            check_drop(report, limit)
    else:
        check_drop(report, limit)


@pytest.mark.parametrize("method", ["bnb-8bit", "bnb-4bit"])
def test_bnb_lora_llama_on_cpu(method, tiny_llama_dir, llama_inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    from runner.stages import quantize

    # measured (2026-12-07): eval loss -0.004% (8-bit), +0.09% (4-bit); the gate at 1%
    config = quantize_config(tiny_llama_dir, "causal-lm", method=method, eval_samples=8, max_metric_drop=0.01)
    report = quantize.run(config, {"train": llama_inputs["train"], "data": llama_inputs["data"]}, tmp_path)
    assert report["merge"]["merged"] and report["size_after_bytes"] < report["size_before_bytes"]
    assert not (tmp_path / "_merged").exists() and (tmp_path / "model" / "tokenizer.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map={"": "cpu"})
    key = "load_in_8bit" if method == "bnb-8bit" else "load_in_4bit"
    assert getattr(reloaded.config.quantization_config, key)


def test_bnb_8bit_classifier_full(tiny_classifier_dir, classifier_inputs, tmp_path):
    from runner.stages import quantize

    # measured (2026-12-07): accuracy unchanged, top-1 equal on 24/24; the gate allows one flip of 24
    config = quantize_config(
        tiny_classifier_dir, "sequence-classification", method="bnb-8bit", eval_samples=24, max_metric_drop=0.05
    )
    report = quantize.run(config, classifier_inputs, tmp_path)
    assert report["comparison"]["top1_agreement"] >= 23 / 24
    assert report["merge"] == {"merged": False} and (tmp_path / "model" / "labels.json").is_file()
    assert report["size_after_bytes"] < report["size_before_bytes"]


def test_fused_export_is_refused_clearly(tiny_classifier_dir, classifier_inputs, tmp_path):
    """ORT's quantizer crashes on fused contrib ops; the stage says which export setting to change instead."""
    from runner.stages import StageError, export, quantize
    from tests.test_stage_export import classifier_config

    export.run(classifier_config(tiny_classifier_dir, optimization_level=99, validation_samples=4), classifier_inputs, tmp_path)
    config = quantize_config(tiny_classifier_dir, "sequence-classification", method="onnx-dynamic-int8")
    (tmp_path / "q").mkdir()
    with pytest.raises(StageError, match="optimization_level"):
        quantize.run(config, onnx_inputs(classifier_inputs, tmp_path), tmp_path / "q")
