"""Why 4-bit QLoRA learned nothing on CPU: bitsandbytes' CPU inference layout has no backward.

    python bench/bnb_4bit_cpu.py

One bitsandbytes Linear4bit (NF4, fp32 compute) on CPU: the gradient reaching its input in train mode, then again after
one eval-mode forward without grad (what Trainer.evaluate and generate do), without and with the runner's workaround
(runner.stages.train.build.keep_4bit_layout). On a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks the weights at that
eval forward (`packing_format_for_cpu`) and computes the layer with `gemv_4bit` from then on; that op has no autograd
kernel, so torch warns once and the input gets no gradient: every LoRA adapter before a 4-bit layer stops learning.
Measured here (Intel Xeon with AVX512-BF16): |dL/dx| 8.1639 fresh, None after the eval forward; with the workaround
8.1639 both times. A CPU without AVX512-BF16 never repacks.
"""

from __future__ import annotations

import json

import bitsandbytes as bnb
import torch
from bitsandbytes.functional import has_avx512bf16


def input_gradient(layer: torch.nn.Module, x: torch.Tensor) -> float | None:
    layer.train()
    xi = x.clone().requires_grad_(True)
    layer(xi).sum().backward()
    return None if xi.grad is None else round(float(xi.grad.norm()), 4)


def trial(keep_layout: bool) -> dict[str, object]:
    torch.manual_seed(0)
    weight = torch.nn.Linear(64, 32, bias=False).weight.data
    layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes the weights
    if keep_layout:
        layer.support_avx512bf16_for_cpu = False  # what keep_4bit_layout sets on every 4-bit layer
    x = torch.randn(4, 64)
    fresh = input_gradient(layer, x)
    layer.eval()
    with torch.no_grad():
        layer(x)
    return {"keep_layout": keep_layout, "grad_fresh": fresh, "grad_after_eval_forward": input_gradient(layer, x),
            "repacked": bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))}


def main() -> int:
    facts = {"bitsandbytes": bnb.__version__, "torch": torch.__version__, "avx512_bf16": bool(has_avx512bf16()),
             "trials": [trial(False), trial(True)]}
    print(json.dumps(facts, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
