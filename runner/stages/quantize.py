"""Quantize stage, by method:
- onnx-dynamic-int8 / onnx-static-int8 (classifiers): ONNX Runtime's own quantizer over the exported graph, int8 weights
  and activations, with a weight type chosen for this CPU (`cpu_preset`);
- onnx-weight-only (causal LMs): int8/int4 block-wise weights (MatMulNBits), float activations, rebuilt by
  onnxruntime-genai's model builder from the merged checkpoint the export step kept;
- bnb-4bit / bnb-8bit: a bitsandbytes copy of the merged model, for GPU inference with transformers.
Every method reports the size before and after and the eval-metric drop against the unquantized model on the same eval
samples, and fails when the drop exceeds `max_metric_drop`; onnx-weight-only also gates greedy agreement.

The metric is accuracy for classifiers (drop = accuracy points lost) and mean token loss for causal LMs (drop = relative
loss increase, so the same `max_metric_drop` means "1% worse" for a 70M or a 7B model).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import TypeAdapter

from runner import genai
from runner.hardware.platform_facts import cpu_isa
from runner.names import CAUSAL_LM, CLASSIFIER
from runner.recipe.sections import BnbQuantize, Export, Model, OnnxStaticInt8, OnnxWeightOnly, Quantize
from runner.stages import StageError
from runner.stages.compare import (
    Batch,
    Runner,
    batches,
    compare,
    load_samples,
    ort_feed,
    ort_runner,
    ort_session,
    pad_token_id,
    torch_runner,
)
from runner.stages.export import ONNX_NAME, copy_labels, greedy_prompt, onnx_size
from runner.stages.merge import auto_class, load_trained, tokenizer_from
from runner.stages.shared import bnb_config

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

# The merge check inside a bnb quantize uses the fp32 export tolerance (relative to the logits' scale).
MERGE_TOLERANCE = Export()
# Weight type and symmetry per CPU preset. VNNI (and arm64's dot-product) CPUs multiply u8 activations by s8 weights in
# one instruction; plain AVX2/AVX-512 can saturate on u8*s8, so their presets use u8 weights.
PRESETS = {"avx512_vnni": "QInt8", "arm64": "QInt8", "avx512": "QUInt8", "avx2": "QUInt8"}
INT8_OPS = ["MatMul", "Gemm"]  # the layers that hold the weights; quantizing Add/Gather only adds error


def run(config: dict, inputs: dict[str, Path], out: Path) -> dict:
    """Quantize the export (ONNX int8 / weight-only) or the trained model (bitsandbytes) and gate it against fp32.

    Raises:
        StageError: the quantized model's metric drops by more than `quantize.max_metric_drop`; its greedy answers
            agree less than `min_greedy_agreement` (weight-only); the export holds fused ONNX Runtime ops (export
            optimization_level 2 or 99); weight-only without the export's merged/ checkpoint; the genai builder fails;
            the data step left no test rows.
    """
    model_cfg = Model.model_validate(config["model"])
    cfg = TypeAdapter(Quantize).validate_python(config["quantize"])
    samples = load_samples(inputs["data"], "test", cfg.eval_samples)
    if isinstance(cfg, BnbQuantize):
        report = quantize_bnb(model_cfg, cfg, inputs, out, samples)
    elif isinstance(cfg, OnnxWeightOnly):
        report = quantize_weight_only(model_cfg, cfg, inputs, out, samples)
    else:
        report = quantize_onnx(model_cfg, cfg, inputs, out, samples)
    report = {"method": cfg.method, "task": model_cfg.task, **report, **metric_drop(report["comparison"], model_cfg.task)}
    (out / "quantize_report.json").write_text(json.dumps(report, indent=2))
    log.info("quantize: %s", json.dumps(report))
    check_drop(report, cfg.max_metric_drop)
    if isinstance(cfg, OnnxWeightOnly):
        check_greedy(report, cfg.min_greedy_agreement)
    return report


def metric_drop(comparison: dict[str, Any], task: str) -> dict[str, Any]:
    before, after = comparison["metric_reference"], comparison["metric_candidate"]
    if task == CLASSIFIER:
        return {"metric": "accuracy", "metric_before": before, "metric_after": after, "metric_drop": before - after}
    return {
        "metric": "loss",
        "metric_before": before,
        "metric_after": after,
        "metric_drop": (after - before) / max(abs(before), 1e-12),
    }


def check_drop(report: dict[str, Any], max_drop: float) -> None:
    if not report["metric_drop"] <= max_drop:  # `not <=` so a NaN fails too
        unit = "accuracy points" if report["metric"] == "accuracy" else "relative loss increase"
        raise StageError(
            f"{report['method']} lost too much: {report['metric']} {report['metric_before']:.4f} -> "
            f"{report['metric_after']:.4f}, a drop of {report['metric_drop']:.4f} ({unit}) > max_metric_drop {max_drop}; "
            "raise `quantize.max_metric_drop`, try another method, or keep the unquantized export"
        )


# --- ONNX Runtime int8 --------------------------------------------------------------------------------------------------


def cpu_preset() -> tuple[str, str]:
    """The int8 preset for this CPU (a key of PRESETS), and why: the CPU's instruction-set family
    (runner.hardware.platform_facts)."""
    return cpu_isa()


def quantize_onnx(model_cfg: Model, cfg: Any, inputs: dict[str, Path], out: Path, samples: list[dict]) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    src, dst = inputs["export"] / "onnx", out / "onnx"
    refuse_fused(src / ONNX_NAME)
    static = isinstance(cfg, OnnxStaticInt8)
    preset, why = cpu_preset()
    external = any(p.name != ONNX_NAME and p.name.startswith(ONNX_NAME) for p in src.iterdir())
    common = int8_options(preset, cfg.weights, external)
    weight_type, reduce_range = common["weight_type"], common["reduce_range"]
    pad_id = pad_token_id(tokenizer_from(src, model_cfg))
    reference = ort_session(src / ONNX_NAME)
    dst.mkdir(parents=True)
    if static:
        calibration = load_samples(inputs["data"], "train", cfg.calibration_samples)  # eval rows stay unseen
        quantize_static(str(src / ONNX_NAME), str(dst / ONNX_NAME), calibration_reader(reference, calibration, pad_id),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                        calibrate_method=CalibrationMethod.MinMax, **common)
    else:
        quantize_dynamic(str(src / ONNX_NAME), str(dst / ONNX_NAME), **common)
    copy_side_files(src, dst)
    candidate = ort_runner(ort_session(dst / ONNX_NAME))
    per_run_scales = per_run_activation_scales(dst / ONNX_NAME)  # the same graph fact the server batches by
    if per_run_scales:
        candidate = one_text_at_a_time(candidate)
    comparison = compare(ort_runner(reference), candidate, samples, model_cfg.task, pad_id)
    return {
        "preset": preset,
        # how the accuracy below was measured: a dynamic graph scores a text differently beside other (padded) texts, so
        # it is measured as the server runs it, each text alone and unpadded (the served accuracy must equal it)
        "evaluated": "one text at a time, unpadded" if per_run_scales else "in padded batches",
        "preset_reason": why,
        "weights": cfg.weights,
        "per_channel": True,
        "reduce_range": reduce_range,
        "format": "QDQ" if static else "QOperator",
        "weights_dtype": weight_type.name,
        **({"calibration_samples": cfg.calibration_samples} if static else {}),
        "size_before_bytes": onnx_size(src),
        "size_after_bytes": onnx_size(dst),
        "size_ratio": onnx_size(dst) / onnx_size(src),
        "comparison": comparison,
    }


def per_run_activation_scales(onnx_path: Path) -> bool:
    """Whether the graph computes activation scales from each run's whole input (dynamic int8's DynamicQuantizeLinear):
    the server then runs each text alone (runner.serving.artifact), and so must this step's evaluation."""
    import onnx

    from runner.serving.artifact import DYNAMIC_SCALE_OPS

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(node.op_type in DYNAMIC_SCALE_OPS for node in graph.node)


def one_text_at_a_time(forward: Runner) -> Runner:
    """Run each row of a batch alone, cut to its own length: what the server does for a graph whose activation scales
    come from the run itself, so that the accuracy this step records is the accuracy the served artifact gives."""

    def run(batch: Batch) -> np.ndarray:
        rows = []
        for index, mask in enumerate(batch["attention_mask"]):
            length = int(mask.sum())
            rows.append(forward({"input_ids": batch["input_ids"][index : index + 1, :length],
                                 "attention_mask": batch["attention_mask"][index : index + 1, :length]}))
        return np.concatenate(rows)

    return run


def int8_options(preset: str, weights: str = "preset", external: bool = False) -> dict[str, Any]:
    """quantize_dynamic/quantize_static keyword arguments for a CPU preset: per-channel symmetric weights (zero point 0)
    of the preset's type, or signed 7-bit ones (`weights: s8-7bit`); activations asymmetric u8."""
    from onnxruntime.quantization import QuantType

    weight_type, reduce_range = getattr(QuantType, PRESETS[preset]), False
    if weights == "s8-7bit":
        weight_type, reduce_range = QuantType.QInt8, True
    return {"op_types_to_quantize": INT8_OPS, "per_channel": True, "reduce_range": reduce_range,
            "weight_type": weight_type, "use_external_data_format": external,
            "extra_options": {"WeightSymmetric": True, "ActivationSymmetric": False}}


def refuse_fused(onnx_path: Path) -> None:
    """ONNX Runtime's quantizer cannot type the outputs of fused contrib ops (com.microsoft Attention, SkipLayerNorm...)
    that export.optimization_level 2/99 writes, and fails with an obscure shape-inference error; say what to change."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    fused = sorted({node.op_type for node in graph.node if node.domain == "com.microsoft"})
    if fused:
        raise StageError(
            f"the export holds fused ONNX Runtime ops ({', '.join(fused[:4])}) from `export.optimization_level` 2 or 99, "
            "which the int8 quantizer cannot process: set `export.optimization_level` to 1 or leave it unset "
            "(ONNX Runtime applies the same fusions to the quantized graph when it loads it)"
        )


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, config.json, labels.json, generation config: everything beside the graph, so the layout equals export's."""
    for path in src.iterdir():
        if path.is_file() and not path.name.startswith(ONNX_NAME):
            shutil.copy2(path, dst / path.name)


def calibration_reader(session: onnxruntime.InferenceSession, samples: list[dict], pad_id: int) -> Any:
    """An onnxruntime CalibrationDataReader over training samples, one example per run so padding never enters the
    activation ranges; a with-past decoder gets the same empty cache as in validation."""
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = (ort_feed(session, batch) for batch in batches(samples, pad_id, size=1))

        def get_next(self) -> dict | None:
            return next(self._feeds, None)

    return Feeds()


# --- weight-only int8/int4 for causal LMs ------------------------------------------------------------------------------


def builder_options(cfg: OnnxWeightOnly) -> dict[str, str]:
    """The model builder's --extra_options for this recipe section."""
    options = {"algo_config": cfg.algorithm, "block_size": str(cfg.block_size)}
    if cfg.accuracy_level is not None:
        options["accuracy_level"] = str(cfg.accuracy_level)
    if cfg.last_matmul_int8 and cfg.bits == 4:
        options["matmul_mixed_precision"] = "last_matmul:int8"
    return options


def quantize_weight_only(
    model_cfg: Model, cfg: OnnxWeightOnly, inputs: dict[str, Path], out: Path, samples: list[dict]
) -> dict[str, Any]:
    """Rebuild the export's merged checkpoint with int8/int4 weights, then compare it with the unquantized export (both
    through ONNX Runtime): eval loss, and greedy continuations through onnxruntime-genai, as served."""
    from runner.serving.artifact import load_model as load_served

    export = inputs["export"]
    merged, src, dst = export / "merged", export / "onnx", out / "onnx"
    if not (merged / "config.json").is_file():
        raise StageError(f"the export step's output {export} has no merged/ checkpoint to quantize: rerun the export step")
    precision = f"int{cfg.bits}"
    provider = json.loads((export / "export_report.json").read_text()).get("execution_provider", "cpu")
    options = builder_options(cfg)
    try:
        log.info("%s", genai.build(merged, dst, precision, provider, options))
    except genai.BuildError as exc:
        raise StageError(str(exc)) from None
    pad_id = pad_token_id(tokenizer_from(src, model_cfg))
    reference, candidate = ort_session(src / ONNX_NAME, provider=provider), ort_session(dst / ONNX_NAME, provider=provider)
    comparison = compare(ort_runner(reference), ort_runner(candidate), samples, CAUSAL_LM, pad_id)
    del reference, candidate  # onnxruntime-genai loads its own copies for the greedy check
    gc.collect()
    greedy = greedy_agreement(load_served(src), load_served(dst), samples[: cfg.greedy_prompts], cfg.greedy_tokens)
    return {
        "bits": cfg.bits,
        "algorithm": cfg.algorithm,
        "block_size": cfg.block_size,
        "accuracy_level": cfg.accuracy_level,
        "builder_options": options,
        "execution_provider": provider,
        "size_before_bytes": onnx_size(src),
        "size_after_bytes": onnx_size(dst),
        "size_ratio": onnx_size(dst) / onnx_size(src),
        "comparison": comparison,
        "greedy": greedy,
    }


def greedy_agreement(reference: Any, candidate: Any, samples: list[dict], tokens: int) -> dict[str, Any]:
    """The share of test prompts (the tokens before each answer) whose first `tokens` greedy tokens are equal."""
    rows = []
    for sample in samples:
        prompt = greedy_prompt(sample)
        want = reference.generate_ids(prompt, max_new_tokens=tokens)["tokens"]
        got = candidate.generate_ids(prompt, max_new_tokens=tokens)["tokens"]
        rows.append({"prompt_tokens": len(prompt), "reference": want, "quantized": got, "identical": want == got})
    agreed = sum(row["identical"] for row in rows)
    return {"prompts": len(rows), "agreed": agreed, "agreement": agreed / max(len(rows), 1), "rows": rows}


def check_greedy(report: dict[str, Any], minimum: float) -> None:
    greedy = report["greedy"]
    if not greedy["agreement"] >= minimum:
        raise StageError(
            f"{report['method']} int{report['bits']} changed the greedy output: {greedy['agreed']} of {greedy['prompts']} "
            f"prompts kept their first tokens (agreement {greedy['agreement']:.2f} < min_greedy_agreement {minimum}); "
            "use bits: 8, algorithm: k_quant, a smaller block_size, last_matmul_int8: true, or keep the unquantized export"
        )


# --- bitsandbytes -------------------------------------------------------------------------------------------------------


def quantize_bnb(model_cfg: Model, cfg: BnbQuantize, inputs: dict[str, Path], out: Path, samples: list[dict]) -> dict[str, Any]:
    """Merge (fp32), reload the merged weights through bitsandbytes, compare, save. bitsandbytes 0.50 loads and runs both
    4-bit and 8-bit on CPU, so the drop is measured here too; the copy is meant for GPU inference with transformers."""
    import torch

    reference, tokenizer, merge = load_trained(model_cfg, inputs, True, samples, MERGE_TOLERANCE)
    source = inputs["train"] / "model"
    if merge["merged"]:  # bitsandbytes quantizes while loading, so the merged fp32 weights go to disk first
        source = out / "_merged"
        reference.save_pretrained(source, safe_serialization=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        quantized = (
            auto_class(model_cfg.task)
            .from_pretrained(
                source,
                quantization_config=bnb_config(8 if cfg.method == "bnb-8bit" else 4),  # 4-bit: nf4, double quant, fp16
                dtype=torch.float16,
                device_map={"": device},
                trust_remote_code=model_cfg.trust_remote_code,
            )
            .eval()
        )
        comparison = compare(torch_runner(reference), torch_runner(quantized), samples, model_cfg.task, pad_token_id(tokenizer))
        quantized.save_pretrained(out / "model", safe_serialization=True)
        tokenizer.save_pretrained(out / "model")
        copy_labels(inputs["data"], out / "model")
        before = safetensors_size(source)
    finally:
        shutil.rmtree(out / "_merged", ignore_errors=True)
    after = safetensors_size(out / "model")
    return {
        "device": device,
        "merge": merge,
        "non_quantized_dtype": "float16",
        "size_before_bytes": before,
        "size_after_bytes": after,
        "size_ratio": after / before,
        "comparison": comparison,
    }


def safetensors_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
