"""Peak host RAM of a causal LM's export and quantize steps (the doctor checks it against `requires.min_ram_gb`).

Each step has phases that never overlap, because the stages free one copy of the weights before the next is made:
- export, in the runner: the fp32 base with the adapter merged into it (4 bytes a parameter), plus the logits of the
  merge check (three passes over 8 samples at the recipe's max_length);
- export, in the builder's child process: the merged checkpoint loaded in the dtype it was saved in (the build's
  precision: 4 or 2 bytes) plus the ONNX initializers written from it (same width);
- export validation: one ONNX Runtime (then onnxruntime-genai) copy of the built weights, on the CPU provider only;
- quantize, in the builder: the merged checkpoint, the float graph that in-builder quantization serializes whole
  (`ir.to_proto`), and the int8/int4 weights;
- quantize validation: the unquantized and the quantized decoder side by side (onnxruntime-genai, greedy agreement).
Every process also pays a fixed runtime (Python, torch, transformers, ONNX Runtime), measured on the real 135M model.
The calibration run and its figures are in bench/export_memory.py.
"""

from __future__ import annotations

from pydantic import BaseModel

GIB = 1024**3
# Calibrated on the real 135M model (bench/export_memory.py, 2026-12-01): runner export 1.57 GiB measured, builder
# export 1.56, builder quantize 1.91, runner quantize 1.70. At that size the fixed runtime is half of each peak, so
# the per-parameter factors below (copies of the weights) are what a 7B figure extrapolates.
RUNTIME_BYTES = int(0.8 * GIB)  # one process with torch, transformers and onnxruntime imported
BUILD_COPIES = 1.5  # the builder's torch model plus the part of the graph's initializers materialized at a time
WIDTH = {"fp32": 4, "fp16": 2, "bf16": 2}


class StepMemory(BaseModel):
    step: str
    phases: dict[str, int]  # phase -> peak bytes
    peak_bytes: int

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def export_memory(params: int, vocab: int, seq_len: int, precision: str, provider: str) -> StepMemory:
    width = WIDTH[precision]
    phases = {
        "merge (runner)": RUNTIME_BYTES + 4 * params + 3 * 8 * seq_len * vocab * 4,
        "build (child)": RUNTIME_BYTES + int(BUILD_COPIES * width * params),
        "validate (runner)": RUNTIME_BYTES + (width * params if provider == "cpu" else 0),
    }
    return StepMemory(step="export", phases=phases, peak_bytes=max(phases.values()))


def quantize_memory(params: int, precision: str, bits: int, provider: str) -> StepMemory:
    width = WIDTH[precision]
    quantized = params * bits // 8
    phases = {
        "build (child)": RUNTIME_BYTES + 2 * width * params + quantized,
        # the unquantized and quantized ONNX Runtime sessions side by side, then the two onnxruntime-genai models
        "validate (runner)": RUNTIME_BYTES + (int(BUILD_COPIES * width * params) + quantized if provider == "cpu" else 0),
    }
    return StepMemory(step="quantize", phases=phases, peak_bytes=max(phases.values()))
