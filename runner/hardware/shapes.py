"""The model, from its config alone: where the config comes from, and the structure the memory estimate reads.

model_config (the hub or its local cache, a local folder, model.init, or a copy bundled in runner/model_configs),
model_shape (a meta-device instance's linears, heads, parameter counts: ModelShape), and the module names of one
transformer block by which tensor feeds them (SITES). NotEstimated and ModelMismatch say why no estimate can be made.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

from runner.hub import hub_config
from runner.names import CAUSAL_LM
from runner.recipe import gguf_header
from runner.recipe.document import Recipe
from runner.recipe.sections import model_location
from runner.stages.shared import CLASSIFIER_HEADS, EXTRA_HEADS, init_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Meta-model module names of one transformer block, by which tensor feeds them (see activations._layer_bytes).
LLAMA_TYPES = frozenset({"llama", "mistral", "qwen2"})
SITES = {
    "llama": {"attn_in": ("q_proj", "k_proj", "v_proj"), "o_in": ("o_proj",), "mlp_in": ("gate_proj", "up_proj"),
              "down_in": ("down_proj",)},
    "distilbert": {"attn_in": ("q_lin", "k_lin", "v_lin"), "o_in": ("out_lin",), "mlp_in": ("lin1",),
                   "down_in": ("lin2",)},
    # BERT's linears share short names ("dense" three times): named by their path inside the block
    "bert": {"attn_in": ("attention.self.query", "attention.self.key", "attention.self.value"),
             "o_in": ("attention.output.dense",), "mlp_in": ("intermediate.dense",), "down_in": ("output.dense",)},
}
BERT_TYPES = frozenset({"bert"})


class NotEstimated(Exception):
    """No estimate can be made (an architecture without an activation model, a config out of reach): a warning."""


class ModelMismatch(Exception):
    """The recipe does not fit its own model (LoRA targets it lacks, an unreadable config): the train step would fail."""


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model, read off a meta-device instance built from its config."""

    model_type: str
    family: Literal["llama", "distilbert", "bert"]
    task: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int  # key/value width per token (grouped-query attention shrinks it)
    vocab: int
    attention_dropout: float
    hidden_dropout: float
    total_params: int
    linears: tuple[Linear, ...]
    keep_full: frozenset[str]  # linears bitsandbytes leaves unquantized
    output_head: str | None  # lm_head: never a LoRA target for all-linear
    heads_to_save: tuple[str, ...]  # classifier heads peft trains fully (copies)
    module_params: dict[str, int]  # parameters per module that holds some directly (for modules_to_save)
    embeddings: tuple[str, ...]  # nn.Embedding modules


def model_config(recipe: Recipe) -> tuple[PretrainedConfig, str]:
    """The transformers config of the recipe's model and a line saying where it came from.

    hub: the local HF cache, then the hub when it is reachable, then the copy bundled in runner/model_configs.
    path: the folder's config.json. init: built from the init fields as the model step builds it."""
    model = recipe.model
    if model.recipe is not None:  # another recipe's trained model: the shape of that recipe's base (a merge keeps it)
        from runner.recipe.load import load_recipe

        return model_config(load_recipe(Path(model.recipe)).recipe)
    if model.init is not None:
        return init_config(model.init, model.init.vocab_size), "built from model.init"
    from transformers import AutoConfig

    if model.gguf_file is not None:  # converted by the model step: the GGUF header has the shape
        gguf = Path(model_location(model) or "") / model.gguf_file
        try:
            return AutoConfig.for_model(**gguf_header.config(gguf)), f"GGUF header of {gguf}"
        except gguf_header.GGUFError as exc:
            raise ModelMismatch(f"cannot read the model config from {gguf}: {exc}") from None
    if model.path is not None or model.package is not None:
        folder = str(model_location(model))  # the package's folder was found when the recipe was validated
        try:
            return AutoConfig.from_pretrained(folder, trust_remote_code=False), f"local folder {folder}"
        except (OSError, ValueError) as exc:
            raise ModelMismatch(f"cannot read the model config in {folder}: {exc}") from None
    assert model.hub is not None
    return _hub_config(model.hub, model.revision)


@lru_cache(maxsize=16)  # one look-up per model, however many remedies are estimated
def _hub_config(hub: str, revision: str | None) -> tuple[PretrainedConfig, str]:
    """In runner.hub's one order (HF cache, bundled copy, then the hub itself when it answers), so the doctor sizes the
    config that validate checked."""
    from transformers import AutoConfig

    found, source = hub_config(hub, revision, fetch=_hub_reachable())
    if found is None:
        raise NotEstimated(f"no config for {hub}: {source}; run once with network (the config is then cached) or add "
                           f"runner/model_configs/{hub.replace('/', '--')}.json")
    # for_model builds the config class from model_type: the model's own code (trust_remote_code) is never run
    return AutoConfig.for_model(**found), source


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect instead of huggingface_hub's five retries (~30 s) when there is no network."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def model_shape(config: PretrainedConfig, task: str, num_labels: int = 2) -> ModelShape:
    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return _model_shape(key, task, num_labels)


@lru_cache(maxsize=32)
def _model_shape(config_json: str, task: str, num_labels: int) -> ModelShape:
    """Build the model on the meta device (no storage, no download) and read its structure."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.quantizers.base import get_keys_to_not_convert  # transformers 5 moved it here

    raw = json.loads(config_json)
    model_type = raw.get("model_type", "")
    if model_type not in LLAMA_TYPES | BERT_TYPES and model_type != "distilbert":
        raise NotEstimated(f"no activation model for model_type {model_type!r} (supported: llama-like, distilbert, bert)")
    config = AutoConfig.for_model(**{**raw, "num_labels": num_labels})
    auto = AutoModelForCausalLM if task == CAUSAL_LM else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config)
    linears = tuple(Linear(name, m.in_features, m.out_features, m.bias is not None)
                    for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    output = model.get_output_embeddings()
    output_head = next((n for n, m in model.named_modules() if output is not None and m is output), None)
    modules = dict(model.named_modules())
    heads = tuple(n for n in (*EXTRA_HEADS, *CLASSIFIER_HEADS) if task != CAUSAL_LM and n in modules)
    distilbert = model_type == "distilbert"
    bert = model_type in BERT_TYPES
    return ModelShape(
        model_type=model_type,
        family="distilbert" if distilbert else "bert" if bert else "llama",
        task=task,
        hidden=config.hidden_size,
        intermediate=config.hidden_dim if distilbert else config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        kv_dim=(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        * (config.hidden_size // config.num_attention_heads),
        vocab=config.vocab_size,
        attention_dropout=float(config.attention_probs_dropout_prob if bert
                                else getattr(config, "attention_dropout", 0.0) or 0.0),
        hidden_dropout=float(config.dropout) if distilbert else float(config.hidden_dropout_prob) if bert else 0.0,
        total_params=sum(p.numel() for p in model.parameters()),
        linears=linears,
        keep_full=frozenset(get_keys_to_not_convert(model)),
        output_head=output_head,
        heads_to_save=heads,
        module_params={n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in modules.items()
                       if any(True for _ in m.parameters(recurse=False))},
        embeddings=tuple(n for n, m in modules.items() if isinstance(m, torch.nn.Embedding)),
    )


def in_any(name: str, modules: frozenset[str] | tuple[str, ...]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)
