"""What more than one stage needs to read a model the same way, in one place:

- `read_labels(data_dir)`: the data step's label map (labels.json), or None for causal LMs;
- `bnb_config(...)`: the bitsandbytes quantization config (train's QLoRA base, quantize's bnb methods);
- `CLASSIFIER_HEADS` / `EXTRA_HEADS`: the classifier heads LoRA trains fully (modules_to_save), which the doctor's memory
  estimate counts the same way the train stage sets them;
- `perplexity(loss)`: exp of a mean token loss, as train's metrics and evaluate's scores report it.

Cheap to import: torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# peft's SEQ_CLS heads: trained fully and saved with the adapter (peft adds them to modules_to_save itself)
CLASSIFIER_HEADS = ("classifier", "score")
# Classifier heads that a base checkpoint may lack (then freshly initialized): trained and saved with the adapter, or a
# reloaded base would get different random heads. The train stage adds these to modules_to_save; DistilBERT has one.
EXTRA_HEADS = ("pre_classifier",)


def read_labels(data_dir: Path) -> dict[str, Any] | None:
    """The data step's `{"id2label": ..., "label2id": ...}`; None when the data step wrote none (causal LMs)."""
    path = data_dir / "labels.json"
    return json.loads(path.read_text()) if path.is_file() else None


def bnb_config(bits: int, quant_type: str = "nf4", double_quant: bool = True, compute_dtype: str = "float16") -> Any:
    """transformers.BitsAndBytesConfig: 8-bit (LLM.int8), or 4-bit with the given quant type, double quantization and
    compute dtype (the name of a torch dtype)."""
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709
