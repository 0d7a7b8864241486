"""Weight-only LM quantization options side by side on a real export: relative eval-loss increase, greedy agreement
(the quantize stage's own gates, on the same samples) and decode speed through onnxruntime-genai, for each candidate.
This is how the `onnx-weight-only` defaults were chosen.

    python bench/lm_quant_sweep.py [--json out.json]
    python bench/lm_quant_sweep.py --smoke     # the tiny_llama_lora recipe's export, two candidates: seconds (not the figure)

It reads the data and export step outputs of the newest smollm2_lora run whose export step finished, from the cache.
The figure line is the default's (the first candidate, what `onnx-weight-only` ships) eval-loss increase against the
default gate.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, TINY_LM, TINY_LM_SMOKE, figure, recipe_outputs, save

CANDIDATES = [
    {"bits": 8, "algorithm": "default", "block_size": 32},
    {"bits": 8, "algorithm": "rtn", "block_size": 32},
    {"bits": 8, "algorithm": "k_quant", "block_size": 32},
    {"bits": 8, "algorithm": "default", "block_size": 128},
    {"bits": 8, "algorithm": "default", "block_size": 32, "accuracy_level": 1},
    {"bits": 4, "algorithm": "default", "block_size": 32},
    {"bits": 4, "algorithm": "k_quant", "block_size": 32},
    {"bits": 4, "algorithm": "k_quant", "block_size": 32, "last_matmul_int8": True},
]


def decode_tps(artifact: Path, prompts: list[list[int]], tokens: int = 32) -> float:
    from runner.serving.artifact import load_model

    model = load_model(artifact)
    model.generate_ids(prompts[0], max_new_tokens=4)  # warm-up
    produced, start = 0, time.perf_counter()
    for prompt in prompts:
        produced += len(model.generate_ids(prompt, max_new_tokens=tokens)["tokens"])
    if not produced:
        raise SystemExit(f"{artifact}: every prompt ended at once (eos first): no decode speed to measure")
    return produced / (time.perf_counter() - start)


def latest_steps() -> dict:
    for path in sorted((ROOT / "runs" / "smollm2_lora").glob("*/run.json"), reverse=True):
        steps = {s["kind"]: s for s in json.loads(path.read_text())["steps"]}
        if steps.get("export", {}).get("status") in ("ran", "cached"):
            return steps
    raise SystemExit("no smollm2_lora run with a finished export step: `recipe run smollm2_lora` first")


def main() -> int:
    from runner.recipe.sections import Model, OnnxWeightOnly
    from runner.stages import StageError
    from runner.stages.compare import load_samples
    from runner.stages.quantize import metric_drop, quantize_weight_only

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="the tiny_llama_lora recipe's export (one epoch, run here "
                        "if not cached), the default and one 4-bit candidate: checks the bench runs")
    args = parser.parse_args()
    if args.smoke:
        outputs = recipe_outputs(TINY_LM, TINY_LM_SMOKE, "export")
        inputs = {"data": outputs["data"], "export": outputs["export"]}
    else:
        steps = latest_steps()
        inputs = {"data": Path(steps["data"]["outputs"]), "export": Path(steps["export"]["outputs"])}
    candidates = [CANDIDATES[0], CANDIDATES[-2]] if args.smoke else CANDIDATES
    manifest = json.loads((inputs["export"].parent / "manifest.json").read_text())
    model_cfg = Model.model_validate(manifest["config"]["model"])
    samples = load_samples(inputs["data"], "test", 200)
    if args.smoke:  # the tiny model ends a half answer at once: its prompts (the masked part), it answers those
        prompts = [[t for t, label in zip(s["input_ids"], s["labels"], strict=True) if label == -100] for s in samples[:4]]
    else:
        prompts = [s["input_ids"][: len(s["input_ids"]) // 2] for s in samples[:4]]  # long continuations, for speed
    reference_tps = decode_tps(inputs["export"] / "onnx", prompts)
    print(f"fp32 export: {reference_tps:.1f} tokens/s")
    rows = []
    for candidate in candidates:
        cfg = OnnxWeightOnly(method="onnx-weight-only", **candidate)
        with tempfile.TemporaryDirectory() as work:
            try:
                report = quantize_weight_only(model_cfg, cfg, inputs, Path(work), samples)
            except StageError as exc:
                print(f"{candidate}: failed: {exc}")
                continue
            tps = decode_tps(Path(work) / "onnx", prompts)
        drop = metric_drop(report["comparison"], "causal-lm")["metric_drop"]
        row = {**candidate, "loss_increase": drop, "greedy": f"{report['greedy']['agreed']}/{report['greedy']['prompts']}",
               "size_ratio": report["size_ratio"], "tokens_per_s": tps, "speed_vs_fp32": tps / reference_tps}
        rows.append(row)
        print(f"{candidate}: loss +{drop:.2%}, greedy {row['greedy']}, size {row['size_ratio']:.2f}, "
              f"{tps:.1f} tokens/s ({row['speed_vs_fp32']:.2f}x fp32 ONNX)")
    save(args.json, {"figure": "LM weight-only sweep", "reference_tokens_per_s": reference_tps, "rows": rows})
    if not rows or {k: rows[0][k] for k in CANDIDATES[0]} != CANDIDATES[0]:
        print("the default candidate failed to quantize", file=sys.stderr)
        return 1
    gate = OnnxWeightOnly(method="onnx-weight-only").max_metric_drop
    default = rows[0]
    figure("LMQ", f"default weight-only int{default['bits']} eval loss increase (greedy {default['greedy']}, "
           f"{default['speed_vs_fp32']:.2f}x fp32 decode)", 100 * default["loss_increase"],
           f"<= {100 * gate:g}%, the default gate", default["loss_increase"] <= gate, unit="%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
