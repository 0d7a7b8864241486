"""The model step for `model.gguf_file`: a GGUF checkpoint converted once into a transformers folder every stage loads.

transformers reads GGUF through the `gguf` package (`from_pretrained(folder, gguf_file=NAME)`), dequantizing every
tensor, but the model it returns is marked quantized and `save_pretrained` refuses it; loading it in every stage would
also repeat the slow dequantization (about a minute for the 135M SmolLM2 on 2 cores) and leave export's merge and the
onnxruntime-genai builder, which read a folder, without one. So this step copies the tensors into a plain model of the
same architecture (checked bit-equal), and saves it as float32 safetensors with the tokenizer converted from the GGUF
(its special tokens checked against the file's own ids) into `out/model`, as the `model.init` step does.

The weights are those of the GGUF file: a Q4_1 file gives real pretrained weights that were rounded to 4 bits, so
quantization figures measured on them are those of an already-rounded model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from runner.recipe.gguf_header import GGUFError, read_header
from runner.recipe.packages import PackageMissing
from runner.recipe.sections import Model, model_location
from runner.stages import StageError

log = logging.getLogger(__name__)

# tokenizer attribute -> the GGUF key holding that token's id
SPECIAL_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
               "pad_token": "tokenizer.ggml.padding_token_id"}


def gguf_path(cfg: Model) -> Path:
    try:
        folder = Path(model_location(cfg) or "")
    except PackageMissing as exc:
        raise StageError(f"model.package: {exc}") from None
    path = folder / (cfg.gguf_file or "")
    if not path.is_file():
        raise StageError(f"model.gguf_file: no file {cfg.gguf_file} in {folder}")
    return path


def convert(cfg: Model, out: Path) -> dict[str, Any]:
    """Convert the recipe's GGUF file into out/model (safetensors, float32) with its tokenizer; returns the metrics."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(cfg)
    try:
        values, _ = read_header(path)
    except GGUFError as exc:
        raise StageError(f"model.gguf_file: {exc}") from None
    try:
        # a GGUF file carries tensors and metadata, never code: no remote code is ever wanted here
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                      trust_remote_code=False)
    except (OSError, ValueError, ImportError) as exc:  # no gguf package, an architecture transformers cannot map
        raise StageError(f"model.gguf_file: transformers could not read {path}: {exc}") from exc
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)  # what makes save_pretrained refuse the loaded model
    plain = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(plain, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    copied = dict(model.state_dict())
    for name, tensor in loaded.state_dict().items():
        if name not in copied or not torch.equal(tensor, copied[name]):
            raise StageError(f"model.gguf_file: tensor {name} changed while copying the GGUF model")
    if unexpected or [m for m in missing if m not in loaded.state_dict()]:
        raise StageError(f"model.gguf_file: the converted model lacks {missing} or has extra {unexpected}")
    for name, key in SPECIAL_IDS.items():
        wanted = values.get(key)
        if wanted is not None and getattr(tokenizer, f"{name}_id") != wanted:
            raise StageError(f"model.gguf_file: the converted tokenizer's {name} is id {getattr(tokenizer, f'{name}_id')}, "
                             f"the GGUF file says {wanted}")
    tokenizer.model_max_length = config.get("max_position_embeddings", tokenizer.model_max_length)
    target = out / "model"
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    parameters = model.num_parameters()
    log.info("converted %s (%s) to a %d-parameter float32 %s", path.name, values.get("general.name"), parameters,
             type(model).__name__)
    return {"parameters": parameters, "vocab_size": len(tokenizer), "gguf_file": path.name,
            "gguf_architecture": values.get("general.architecture")}
