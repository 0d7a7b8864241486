"""Quantize stage: ONNX Runtime int8 (dynamic, or static calibrated on training samples) of the exported graph, or a
bitsandbytes 4/8-bit copy of the merged model. Every method reports the size before and after and the eval-metric drop
against the unquantized model on the same eval samples, and fails when the drop exceeds `max_metric_drop`.

The metric is accuracy for classifiers (drop = accuracy points lost) and mean token loss for causal LMs (drop = relative
loss increase, so the same `max_metric_drop` means "1% worse" for a 70M or a 7B model).
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter

from runner.recipe.models import BnbQuantize, Model, OnnxStaticInt8, Quantize
from runner.stages import StageError
from runner.stages.export import (
    ONNX_NAME,
    auto_class,
    batches,
    compare,
    copy_labels,
    load_samples,
    load_trained,
    onnx_size,
    ort_feed,
    ort_runner,
    ort_session,
    pad_token_id,
    tokenizer_from,
    torch_runner,
)

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

# The merge check inside a bnb quantize has no export atol to borrow; fp32 merge noise on a 7B model's logits stays
# far below this, a broken merge far above it.
MERGE_ATOL = 1e-3


def run(config: dict, inputs: dict[str, Path], out: Path) -> dict:
    model_cfg = Model.model_validate(config["model"])
    cfg = TypeAdapter(Quantize).validate_python(config["quantize"])
    samples = load_samples(inputs["data"], "test", cfg.eval_samples)
    if isinstance(cfg, BnbQuantize):
        report = quantize_bnb(model_cfg, cfg, inputs, out, samples)
    else:
        report = quantize_onnx(model_cfg, cfg, inputs, out, samples)
    report = {"method": cfg.method, "task": model_cfg.task, **report, **metric_drop(report["comparison"], model_cfg.task)}
    (out / "quantize_report.json").write_text(json.dumps(report, indent=2))
    log.info("quantize: %s", json.dumps(report))
    check_drop(report, cfg.max_metric_drop)
    return report


def metric_drop(comparison: dict[str, Any], task: str) -> dict[str, Any]:
    before, after = comparison["metric_reference"], comparison["metric_candidate"]
    if task == "sequence-classification":
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
    """The optimum AutoQuantizationConfig preset for this CPU, and why. VNNI CPUs do u8*s8 in one instruction; plain
    AVX2/AVX512 can saturate on u8*s8, so their presets quantize weights to u8 (the presets carry that choice)."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return "arm64", f"machine {machine}"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "avx2", f"no /proc/cpuinfo on {platform.system()}; avx2 is the portable x86-64 preset"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    for flag, preset in (("avx512_vnni", "avx512_vnni"), ("avx512f", "avx512"), ("avx2", "avx2")):
        if flag in flags:
            return preset, f"/proc/cpuinfo has {flag}"
    return "avx2", "no AVX2/AVX512 flag in /proc/cpuinfo; avx2 is the portable x86-64 preset"


def quantize_onnx(model_cfg: Model, cfg: Any, inputs: dict[str, Path], out: Path, samples: list[dict]) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType
    from optimum.onnxruntime import AutoQuantizationConfig, ORTQuantizer

    src, dst = inputs["export"] / "onnx", out / "onnx"
    refuse_fused(src / ONNX_NAME)
    static = isinstance(cfg, OnnxStaticInt8)
    preset, why = cpu_preset()
    qconfig = getattr(AutoQuantizationConfig, preset)(is_static=static)
    if cfg.weights == "s8-7bit":
        qconfig = replace(qconfig, weights_dtype=QuantType.QInt8, reduce_range=True)
    external = any(p.name != ONNX_NAME and p.name.startswith(ONNX_NAME) for p in src.iterdir())
    pad_id = pad_token_id(tokenizer_from(src, model_cfg))
    reference = ort_session(src / ONNX_NAME)
    ranges = calibrate(src, reference, qconfig, cfg, inputs["data"], out, pad_id, external) if static else None
    quantizer = ORTQuantizer.from_pretrained(src, file_name=ONNX_NAME)
    # file_suffix="" keeps the name model.onnx: the server loads an export or a quantized graph the same way
    quantizer.quantize(qconfig, dst, file_suffix="", calibration_tensors_range=ranges, use_external_data_format=external)
    copy_side_files(src, dst)
    comparison = compare(ort_runner(reference), ort_runner(ort_session(dst / ONNX_NAME)), samples, model_cfg.task, pad_id)
    return {
        "preset": preset,
        "preset_reason": why,
        "weights": cfg.weights,
        "per_channel": qconfig.per_channel,
        "reduce_range": qconfig.reduce_range,
        "format": qconfig.format.name,
        "weights_dtype": qconfig.weights_dtype.name,
        **({"calibration_samples": cfg.calibration_samples} if static else {}),
        "size_before_bytes": onnx_size(src),
        "size_after_bytes": onnx_size(dst),
        "size_ratio": onnx_size(dst) / onnx_size(src),
        "comparison": comparison,
    }


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


def calibrate(
    src: Path,
    session: onnxruntime.InferenceSession,
    qconfig: Any,
    cfg: OnnxStaticInt8,
    data_dir: Path,
    out: Path,
    pad_id: int,
    external: bool,
) -> dict:
    """Activation ranges (MinMax) from `calibration_samples` training rows: the eval rows stay unseen for the drop."""
    from onnxruntime.quantization import CalibrationMethod
    from optimum.onnxruntime.configuration import CalibrationConfig

    samples = load_samples(data_dir, "train", cfg.calibration_samples)
    calibration = CalibrationConfig(
        dataset_name="data-step",
        dataset_config_name="default",
        dataset_split="train",
        dataset_num_samples=len(samples),
        method=CalibrationMethod.MinMax,
    )
    work = out / "_calibration"
    work.mkdir()
    try:
        calibrator = calibration.create_calibrator(
            onnx_model_path=src / ONNX_NAME,
            operators_to_quantize=qconfig.operators_to_quantize,
            use_external_data_format=external,
            augmented_model_name=str(work / "augmented.onnx"),
        )
        calibrator.collect_data(calibration_reader(session, samples, pad_id))
        return calibrator.compute_data()
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- bitsandbytes -------------------------------------------------------------------------------------------------------


def quantize_bnb(model_cfg: Model, cfg: BnbQuantize, inputs: dict[str, Path], out: Path, samples: list[dict]) -> dict[str, Any]:
    """Merge (fp32), reload the merged weights through bitsandbytes, compare, save. bitsandbytes 0.50 loads and runs both
    4-bit and 8-bit on CPU, so the drop is measured here too; the copy is meant for GPU inference with transformers."""
    import torch

    reference, tokenizer, merge = load_trained(model_cfg, inputs, True, samples, MERGE_ATOL)
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
                quantization_config=bnb_config(cfg.method),
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


def bnb_config(method: str) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if method == "bnb-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float16
    )


def safetensors_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
