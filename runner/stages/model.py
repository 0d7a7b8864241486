"""The `model` step: a small model built from `model.init` (tests and the tiny recipes), a GGUF checkpoint converted
(`model.gguf_file`, in model_gguf.py), or another recipe's trained model (`model.recipe`, in model_source.py).

Planned only when `model.init`, `model.gguf_file` or `model.recipe` is set. For init it trains a real tokenizer on the
recipe's train split, builds a DistilBERT- or Llama-like model from a config with seeded random weights, and saves both with
`save_pretrained` into `out/model`, where downstream stages load it back like any local model
(runner/stages/pretrained.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner import chat as chat_lib
from runner.names import CAUSAL_LM, CLASSIFIER
from runner.recipe.sections import Data, Model, ModelInit
from runner.stages import StageError
from runner.stages.data import preference as data_preference
from runner.stages.data import rows as data_rows
from runner.stages.data.chat import ChatFormat
from runner.stages.shared import init_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

log = logging.getLogger(__name__)



# --- the model step -----------------------------------------------------------------------------------------------------


def run(config: dict[str, Any], inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    """Build `model.init`: a tokenizer trained on the recipe's train split and a seeded random model, saved to out/model.

    Raises:
        StageError: the recipe has no `model.init`; a distilbert asked to be a causal LM; a chat recipe
            (`data.messages_column`) on a distilbert, or without `data.chat_template`, or with a template that does not
            render; and whatever reading the recipe's rows raises (runner.stages.data.rows: a missing file, column or
            label, too few rows to split).
    """
    cfg = Model.model_validate(config["model"])
    if cfg.recipe is not None:
        from runner.stages import model_source

        return model_source.run(config, inputs, out)
    if cfg.gguf_file is not None:
        from runner.stages import model_gguf

        return model_gguf.convert(cfg, out)
    if cfg.init is None:
        raise StageError("the model step builds `model.init` or converts `model.gguf_file`; this recipe has neither")
    if cfg.init.architecture == "distilbert" and cfg.task == CAUSAL_LM:
        raise StageError("a distilbert model cannot be a causal LM; use `architecture: llama` for `task: causal-lm`")
    seed = int(config["seed"])

    # None unless the recipe trains on conversations (sft: messages_column; an objective: rows of messages)
    chat = chat_format(config["data"], cfg.init, preference="objective" in config)
    with data_rows.scratch_dir(out) as cache_dir:
        # the tokenizer learns from the train split only: a vocabulary fitted to test rows would leak them
        if "objective" in config:  # preference rows (runner.stages.data.preference): prompts and completions
            rows = data_preference.train_texts(config["data"], config["objective"], seed, cache_dir)
        else:
            rows = data_rows.train_split_rows(config["data"], seed, cfg.task, cache_dir, chat=chat)
        tokenizer = train_tokenizer(_texts(rows, chat), len(rows), cfg.init, chat)
        names = rows.features["labels"].names if cfg.task == CLASSIFIER else None
    if chat is not None:  # saved with the tokenizer: every later stage (and the server) renders with it
        tokenizer.chat_template = chat.template

    model = build_model(cfg.init, cfg.task, tokenizer, names, seed)
    target = out / "model"
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    parameters = model.num_parameters()
    log.info(
        "built a %s %s with %d parameters and a %d-token vocabulary", cfg.init.architecture, cfg.task, parameters, len(tokenizer)
    )
    return {"parameters": parameters, "vocab_size": len(tokenizer)}


def _texts(rows: Any, chat: ChatFormat | None, batch_size: int = 1000) -> Iterator[str]:
    # a chat's markers (<|im_start|> ...) become special tokens: left in the text, BPE would spend merges on their pieces
    specials = [*chat_markers(chat.template), *chat.special.values()] if chat is not None else []
    for batch in rows.iter(batch_size=batch_size):
        for text in batch["text"]:
            for special in specials:
                text = text.replace(special, " ")
            yield text


# --- chat recipes: the template's markers as special tokens ---------------------------------------------------------------

LLAMA_SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def chat_format(data_cfg: dict[str, Any], init: ModelInit, preference: bool = False) -> ChatFormat | None:
    """For a `messages_column` recipe: the recipe's template and the special tokens the built tokenizer will have.

    A tokenizer trained here has no template of its own, so `data.chat_template` is required. Its end-of-turn marker
    (ChatML's <|im_end|>) becomes the eos token: generation, in export's gate and in the server, stops where a turn
    ends, as with SmolLM2 or Qwen, whose eos is <|im_end|> too."""
    data = Data.model_validate(data_cfg)
    if data.messages_column is None and not (preference and data.chat_template):
        return None
    if init.architecture != "llama":
        raise StageError("data.messages_column trains a causal LM: use `model.init.architecture: llama`")
    if not data.chat_template:
        raise StageError("data.messages_column with model.init needs data.chat_template: a tokenizer built here has no "
                         "chat template of its own (recipes/tiny_chat_lora.yaml has a ChatML one)")
    special = chat_lib.template_tokens(LLAMA_SPECIAL)
    try:
        eos = chat_lib.end_of_turn(data.chat_template, special) or LLAMA_SPECIAL["eos_token"]
    except chat_lib.ChatTemplateError as exc:
        raise StageError(f"data.chat_template: {exc}") from None
    return ChatFormat(data.chat_template, {**special, "eos_token": eos})


def chat_markers(template: str) -> list[str]:
    """The template's markers that are not already one of the architecture's special tokens."""
    return [marker for marker in chat_lib.markers(template) if marker not in LLAMA_SPECIAL.values()]


def train_tokenizer(texts: Iterator[str], count: int, init: ModelInit, chat: ChatFormat | None = None
                    ) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer trained on `texts`, with the special tokens of the architecture.

    distilbert: lowercased, [CLS] text [SEP], [PAD]/[UNK]/[MASK]; llama: <s> text, </s> as eos and <pad> of its own.
    With `chat`, the template's markers are special tokens too (one id each, never split), and eos is its end of turn.
    Byte-level BPE for both, not WordPiece for distilbert: tokenizers' WordPieceTrainer assigns its `##` pieces in hash
    order, so its vocabulary changes from process to process (checked with tokenizers 0.22), while BPE over the sorted
    byte alphabet is reproducible, and the model step must be. It also never produces an unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if init.architecture == "distilbert":
        special = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
        single, pair, bracket = "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1", ["[CLS]", "[SEP]"]
    else:
        # A pad token of its own (Llama-2 pads with eos) so that a collator masking pads never masks eos.
        special = dict(LLAMA_SPECIAL)
        # Llama prepends <s>; the data step appends eos to training texts, so prompts at inference stay open.
        single, pair, bracket = "<s> $A", "<s> $A <s>:1 $B:1", ["<s>"]
    markers = chat_markers(chat.template) if chat is not None else []
    if chat is not None:
        special["eos_token"] = chat.special["eos_token"]
    tok = Tokenizer(models.BPE(unk_token=special["unk_token"]))
    if init.architecture == "distilbert":
        tok.normalizer = normalizers.Lowercase()  # uncased, as distilbert-base-uncased: more words per small vocabulary
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=init.vocab_size,
        special_tokens=list(dict.fromkeys([*special.values(), *markers])),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer, length=count)
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(name, tok.token_to_id(name)) for name in bracket]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=init.max_position_embeddings,
        model_input_names=["input_ids", "attention_mask"],
        **({"extra_special_tokens": [m for m in markers if m not in special.values()]} if markers else {}),
        **special,
    )


def build_model(
    init: ModelInit, task: str, tokenizer: PreTrainedTokenizerBase, names: list[str] | None, seed: int
) -> PreTrainedModel:
    """A model with seeded random weights whose config follows `init` and the tokenizer's vocabulary and special ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    labels: dict[str, Any] = {}
    if names is not None:
        labels = {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}
    tokens = {"pad_token_id": tokenizer.pad_token_id}
    if init.architecture != "distilbert":
        tokens |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = init_config(init, len(tokenizer), **tokens, **labels)
    auto = AutoModelForSequenceClassification if task == CLASSIFIER else AutoModelForCausalLM
    torch.manual_seed(seed)  # the weights are the only randomness here: same seed, byte-identical safetensors
    return auto.from_config(config)
