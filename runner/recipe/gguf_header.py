"""A GGUF file's header, read with the standard library: the architecture and shape a recipe's checks and the doctor need.

`recipe validate` and `recipe doctor` must stay fast and import neither torch nor transformers, yet a `model.gguf_file`
recipe has no config.json until the model step converts it. The header (format: the GGUF specification in the ggml repository,
little-endian: magic, version, tensor count, key-value count, the key-values, then one info record per tensor) holds the
same facts. Arrays (the tokenizer's 49152 tokens) are skipped over, not read.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"GGUF"
# value type -> struct format of a scalar (8 = string, 9 = array are read apart)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
# GGUF architecture -> the transformers class the model step builds (architectures whose GGUF tensors transformers maps)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class GGUFError(ValueError):
    """Not a GGUF file, or one this reader cannot follow; str() says which."""


def read_header(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The key-values (an array becomes its length) and the tensor names of a GGUF file."""
    try:
        with path.open("rb") as fh:
            if fh.read(4) != MAGIC:
                raise GGUFError(f"{path} is not a GGUF file (no GGUF magic)")
            version, tensors, count = struct.unpack("<IQQ", _read(fh, 20))
            if version < 2:
                raise GGUFError(f"{path} is GGUF version {version}; versions 2 and 3 are read")
            values = {}
            for _ in range(count):
                key = _string(fh)
                values[key] = _value(fh, struct.unpack("<I", _read(fh, 4))[0])
            names = []
            for _ in range(tensors):
                names.append(_string(fh))
                dims = struct.unpack("<I", _read(fh, 4))[0]
                _read(fh, 8 * dims + 4 + 8)  # the dimensions, the type, the offset
            return values, names
    except (OSError, struct.error, UnicodeDecodeError) as exc:
        raise GGUFError(f"cannot read the GGUF header of {path}: {exc}") from None


def config(path: Path) -> dict[str, Any]:
    """A transformers-style config.json dict from the header: what the local checks and the doctor's estimate read."""
    values, names = read_header(path)
    arch = values.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path.name}: GGUF architecture {arch!r} is not one the runner converts "
                        f"({', '.join(sorted(ARCHITECTURES))})")
    heads = values[f"{arch}.attention.head_count"]
    return {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": values[f"{arch}.embedding_length"],
        "intermediate_size": values[f"{arch}.feed_forward_length"],
        "num_hidden_layers": values[f"{arch}.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": values.get(f"{arch}.attention.head_count_kv", heads),
        "max_position_embeddings": values.get(f"{arch}.context_length", 2048),
        "vocab_size": values.get(f"{arch}.vocab_size") or values.get("tokenizer.ggml.tokens"),
        "tie_word_embeddings": "output.weight" not in names,  # no separate head: it shares the embedding
        "torch_dtype": "float32",  # the model step dequantizes to float32
    }


def _read(fh: BinaryIO, size: int) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise struct.error("the file ends inside its header")
    return data


def _string(fh: BinaryIO) -> str:
    return _read(fh, struct.unpack("<Q", _read(fh, 8))[0]).decode("utf-8")


def _value(fh: BinaryIO, kind: int) -> Any:
    if kind == STRING:
        return _string(fh)
    if kind == ARRAY:
        item, length = struct.unpack("<IQ", _read(fh, 12))
        if item in SCALARS:  # fixed size: skip in one seek
            fh.seek(struct.calcsize(SCALARS[item]) * length, 1)
        else:
            for _ in range(length):
                _value(fh, item)
        return length
    if kind not in SCALARS:
        raise GGUFError(f"unknown GGUF value type {kind}")
    return struct.unpack(SCALARS[kind], _read(fh, struct.calcsize(SCALARS[kind])))[0]
