"""What more than one stage needs to read a model the same way, in one place:

- `read_labels(data_dir)`: the data step's label map (labels.json), or None for causal LMs;
- `bnb_config(...)`: the bitsandbytes quantization config (train's QLoRA base, quantize's bnb methods);
- `CLASSIFIER_HEADS` / `EXTRA_HEADS`: the classifier heads LoRA trains fully (modules_to_save), which the doctor's memory
  estimate counts the same way the train stage sets them;
- `perplexity(loss)`: exp of a mean token loss, as train's metrics and evaluate's scores report it;
- `macro_f1(true, predicted)`: the one macro-F1 (train's eval metric, evaluate's score, the report's column);
- `init_config(init, vocab_size)`: the config of a `model.init` model, as the model step builds it and the doctor sizes it.

Cheap to import: torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from runner.recipe.sections import ModelInit

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


def init_config(init: ModelInit, vocab_size: int, **extra: Any) -> PretrainedConfig:
    """The transformers config of a `model.init` model. The model step passes its trained tokenizer's size and special
    ids (and the labels); the doctor passes `init.vocab_size`, the most the tokenizer can have."""
    from transformers import DistilBertConfig, LlamaConfig

    if init.architecture == "distilbert":
        return DistilBertConfig(vocab_size=vocab_size, dim=init.hidden_size, hidden_dim=init.intermediate_size,
                                n_layers=init.num_layers, n_heads=init.num_heads,
                                max_position_embeddings=init.max_position_embeddings, **extra)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=init.hidden_size, intermediate_size=init.intermediate_size,
                       num_hidden_layers=init.num_layers, num_attention_heads=init.num_heads,
                       num_key_value_heads=init.num_heads, max_position_embeddings=init.max_position_embeddings,
                       tie_word_embeddings=False, **extra)


MACRO_F1 = "the mean of the per-label F1 over every label that occurs in the truth or the predictions"


def macro_f1(true: list[Any], predicted: list[Any]) -> float:
    """Macro-F1 as MACRO_F1 says (scikit-learn's f1_score, average="macro", over those labels): a label neither true
    nor predicted anywhere has no F1 to average, so a set that lacks a class is not scored as if the model failed it."""
    from sklearn.metrics import f1_score

    labels = sorted(set(true) | set(predicted), key=str)
    return float(f1_score(true, predicted, labels=labels, average="macro", zero_division=0))

