"""onnxruntime-genai's model builder: which causal-LM architectures it exports, and how the runner calls it.

The builder (`python -m onnxruntime_genai.models.builder`) turns a Hugging Face checkpoint folder into an ONNX decoder
with a KV cache, GroupQueryAttention and, for int4/int8, weight-only MatMulNBits layers, plus the genai_config.json that
onnxruntime-genai decodes with. It dispatches on `config.architectures[0]` and fails for anything else, so the recipe
checks that name before any step runs (runner.recipe.local_checks); this module is standard library only for that reason.

The build runs in a child process: the builder holds the torch model and the ONNX graph at once, and a separate process
gives all of that memory back when it ends (a 7B export must not stay resident in the runner while later steps run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from runner.redact import redact

# onnxruntime-genai 0.18.0's builder.py, its `config.architectures[0] == ...` dispatch, the text-only causal LMs
# (what AutoModelForCausalLM trains). tests/test_genai.py re-reads the installed builder's source against this list.
SUPPORTED_ARCHITECTURES = (
    "Ernie4_5ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "GptOssForCausalLM",
    "GraniteForCausalLM",
    "HunYuanDenseV1ForCausalLM",
    "InternLM2ForCausalLM",
    "Lfm2ForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "NemotronForCausalLM",
    "OlmoForCausalLM",
    "Phi3ForCausalLM",
    "PhiForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "SmolLM3ForCausalLM",
)

# The builder's precision x execution-provider pairs that this runner offers (the builder's own table has more EPs).
PRECISIONS = {"cpu": ("fp32", "int8", "int4"), "cuda": ("fp32", "fp16", "bf16", "int8", "int4")}


class BuildError(RuntimeError):
    """The builder failed; the message carries the tail of its output."""


def unsupported_architecture(architecture: str | None) -> str | None:
    """None when the builder can export `architecture`, else a message listing what it can."""
    if architecture in SUPPORTED_ARCHITECTURES:
        return None
    return (
        f"the causal-LM ONNX exporter (onnxruntime-genai's model builder) does not support the architecture "
        f"{architecture or '(none: config.json has no `architectures`)'}; it supports {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def unsupported_shape(config: dict) -> str | None:
    """None when the decoder's GroupQueryAttention can run this config: ONNX Runtime's kernel needs a head size that is
    a multiple of 16 (seen: "head_size shall be a multiple of 16" on the CPU provider)."""
    heads = config.get("num_attention_heads")
    head_size = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else None)
    if head_size and head_size % 16:
        return (f"the ONNX decoder's attention needs a head size that is a multiple of 16, and this model's is "
                f"{head_size} (hidden_size {config.get('hidden_size')} / num_attention_heads {heads})")
    return None


def build(
    checkpoint: Path,
    out: Path,
    precision: str,
    provider: str,
    options: dict[str, str] | None = None,
) -> str:
    """Build `checkpoint` (a save_pretrained folder with its tokenizer) into `out` in a child process; returns the
    builder's output (for the step log). `options` are its --extra_options (e.g. algo_config=k_quant, block_size=32)."""
    cache = out.parent / f"_{out.name}_builder_cache"
    command = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(checkpoint), "-o", str(out), "-p", precision, "-e", provider, "-c", str(cache),
    ]
    if options:
        command += ["--extra_options", *(f"{key}={value}" for key, value in sorted(options.items()))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}  # a local folder only: never reach for the hub
    # The builder stamps `git rev-parse HEAD` of whatever repository encloses site-packages into the graph's
    # producer_version (a venv inside a project checkout gets the project's commit): with no git dir it falls back to
    # the wheel's own commit, so the graph's bytes do not change with the repository around the environment.
    env["GIT_DIR"] = os.devnull
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, check=False)
    # Redacted here too, not only in the step log: the output also travels in BuildError's message and return value.
    output = redact(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}")
    shutil.rmtree(cache, ignore_errors=True)
    if done.returncode != 0 or not (out / "model.onnx").is_file():
        tail = "\n".join(output.strip().splitlines()[-15:])
        raise BuildError(f"onnxruntime-genai's model builder failed (exit {done.returncode}):\n{tail}")
    return output


def genai_config(folder: Path) -> dict:
    return json.loads((folder / "genai_config.json").read_text())
