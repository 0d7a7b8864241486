"""The data step: the recipe's sources -> one table of texts (and labels) -> tokenized train/test splits, with stats.

Outputs in `out` (the layout downstream stages rely on, see runner.stages):
- `dataset/`: a DatasetDict `train`/`test` with columns `text`, `input_ids`, `attention_mask`, `labels`, unpadded (the
  train stage's collator pads). Classification: `labels` is a ClassLabel id. Causal LM: `labels` are the input ids, with
  -100 on the prompt tokens when `mask_prompt` is set.
- `labels.json` (classification): `{"id2label": {"0": name, ...}, "label2id": {name: 0, ...}}`, carried to serving.
- `stats.json`: rows per split, label balance, token-length percentiles, truncated share, and warnings.

Reproducibility: every random choice (mixing, shuffling, the split) is drawn from the recipe's seed, and each saved split
gets a fingerprint computed from its content, so the same recipe writes a byte-identical `dataset/` on any machine.
Rows stay in memory after loading (`keep_in_memory`): fine-tuning sets are small, and nothing is left in shared caches.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict

from runner.names import CLASSIFIER
from runner.recipe.sections import Data, Model
from runner.stages import StageError
from runner.stages.data import chat as data_chat
from runner.stages.data import preference as data_preference
from runner.stages.data.rows import encode_labels, freeze, label_names, load_rows, scratch_dir, split_rows
from runner.stages.pretrained import load_tokenizer

log = logging.getLogger(__name__)

IMBALANCE_WARN = 0.8  # majority label share above which stats warn
TRUNCATION_WARN = 0.2  # share of truncated rows above which stats warn
COLUMNS = ["text", "input_ids", "attention_mask", "labels"]  # what is saved, in this order


# --- the step -----------------------------------------------------------------------------------------------------------


def run(config: dict[str, Any], inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    """Load, mix, label or template, tokenize, split and save the recipe's data; write labels.json and stats.json.

    Raises:
        StageError: a classifier given `data.messages_column`; `mask_prompt` without `data.template` or with a slow
            tokenizer; `data.max_length` above what the model accepts; the base's tokenizer cannot be loaded; a source
            cannot be read (missing file, unknown format, wrong hub revision), lacks a column, has no rows or rows
            without a label; only one label; a label outside `data.labels`; a template field that names no column;
            conversations that do not render (runner.stages.data.chat); too few rows for `test_size`.
    """
    if "objective" in config:  # train.objective dpo/orpo/kto/simpo/grpo: rows by columns, saved as text for TRL
        return data_preference.run(config, load_tokenizer(config["model"], inputs), out)
    task = Model.model_validate(config["model"]).task
    data = Data.model_validate(config["data"])
    seed = int(config["seed"])
    classify = task == CLASSIFIER
    masking = data.mask_prompt and not classify
    if classify and data.messages_column is not None:
        raise StageError("data.messages_column is for causal-lm chat training; a classifier reads data.text_column")
    if masking and not data.template:
        raise StageError("`mask_prompt` needs `data.template` (the answer is found as its `response_template` part)")
    tokenizer = load_tokenizer(config["model"], inputs)
    if data.max_length > tokenizer.model_max_length:  # unset, it is a huge sentinel; set, the model's position limit
        raise StageError(
            f"data.max_length {data.max_length} is more than the model accepts ({tokenizer.model_max_length} tokens)"
        )
    if masking and not tokenizer.is_fast:
        raise StageError(
            "`mask_prompt` needs a fast tokenizer (it finds the answer by character offsets); "
            "this model only has a slow one: set `mask_prompt: false`"
        )

    # chat rows: rendered with the recipe's (or the tokenizer's) template, labels on assistant turns only
    chat = data_chat.format_for(data, tokenizer) if data.messages_column is not None else None

    with scratch_dir(out) as cache_dir:
        rows = load_rows(config["data"], seed, task, cache_dir, chat=chat)
        names = label_names(config["data"], rows) if classify else None
        if names is not None:
            rows = encode_labels(rows, names)
        rows = _tokenize(rows, tokenizer, data, lm=not classify, mask=masking, chat=chat is not None)
        splits = split_rows(rows, data, seed, stratify=classify and data.stratify)
        stats = _stats(rows, splits, data, names, masking or chat is not None)
        frozen = DatasetDict({name: _freeze(split) for name, split in splits.items()})
        frozen.save_to_disk(out / "dataset")

    if names is not None:
        labels = {"id2label": {str(i): name for i, name in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}
        (out / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    if chat is not None:  # the train step saves it with the tokenizer, so the server renders as training did
        data_chat.save_template(chat, out)
    for warning in stats["warnings"]:
        log.warning(warning)
    return {
        "rows": len(rows),
        "train_rows": stats["rows"]["train"],
        "test_rows": stats["rows"]["test"],
        "truncated_share": stats["truncated_share"],
        "token_length_p99": stats["token_length"]["p99"],
        "warnings": len(stats["warnings"]),
    }


# --- tokenization, split, stats -----------------------------------------------------------------------------------------


def _tokenize(rows: Dataset, tokenizer: Any, data: Data, lm: bool, mask: bool, chat: bool = False) -> Dataset:
    encode: Any = partial(
        _encode_batch,
        tokenizer=tokenizer,
        max_length=data.max_length,
        lm=lm,
        eos=(tokenizer.eos_token or "") if lm else "",
        mask=mask,
    )
    if chat:  # no eos appended: the template ends each turn itself
        encode = partial(data_chat.encode_batch, tokenizer=tokenizer, max_length=data.max_length)
    drop = [name for name in rows.column_names if name not in ("text", "labels")]
    return rows.map(encode, batched=True, remove_columns=drop, num_proc=data.num_proc, keep_in_memory=True, desc="Tokenizing")


def _encode_batch(
    batch: dict[str, list[Any]], *, tokenizer: Any, max_length: int, lm: bool, eos: str, mask: bool
) -> dict[str, list[Any]]:
    """Tokenize a batch; causal LM texts get eos and labels (-100 on the prompt with `mask`)."""
    texts = [text + eos for text in batch["text"]]
    options = {"return_token_type_ids": False, "return_offsets_mapping": mask}
    enc = tokenizer(texts, verbose=False, **options)  # untruncated first: its lengths feed the stats
    lengths = [len(ids) for ids in enc["input_ids"]]
    if max(lengths, default=0) > max_length:
        # Encode again and let the tokenizer truncate (BERT keeps [SEP] last); only batches with a long row pay twice.
        enc = tokenizer(texts, truncation=True, max_length=max_length, **options)
    out = {"text": texts, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "n_tokens": lengths}
    if lm and mask:
        out["labels"] = [
            _mask_prompt(ids, offsets, boundary)
            for ids, offsets, boundary in zip(enc["input_ids"], enc["offset_mapping"], batch["prompt_length"], strict=True)
        ]
    elif lm:
        out["labels"] = [list(ids) for ids in enc["input_ids"]]
    return out


def _mask_prompt(ids: list[int], offsets: list[tuple[int, int]], boundary: int) -> list[int]:
    """Labels that learn only the answer: -100 on every token that ends at or before the answer's first character.

    Character offsets rather than tokenizing the prompt alone: a token may straddle the boundary (byte-level BPE makes
    " 4" of "A: 4" one token), and then the prompt's own tokens ("A", ":", " ") would misplace it. Such a token carries
    answer text, so it is learned. Special tokens added by the tokenizer (offsets (0, 0), e.g. <s>) count as prompt.
    """
    return [token if end > boundary else -100 for token, (_, end) in zip(ids, offsets, strict=True)]


def _stats(rows: Dataset, splits: DatasetDict, data: Data, names: list[str] | None, masking: bool) -> dict[str, Any]:
    """Rows, label balance, token lengths (before truncation, special tokens included), truncation and warnings."""
    lengths = np.asarray(rows.with_format("numpy")["n_tokens"])
    truncated = lengths > data.max_length
    share = round(float(truncated.mean()), 4)
    percentiles = {f"p{q}": int(np.percentile(lengths, q, method="nearest")) for q in (50, 90, 99)}
    stats: dict[str, Any] = {
        "rows": {name: len(split) for name, split in splits.items()},
        "max_length": data.max_length,
        "token_length": {**percentiles, "max": int(lengths.max())},
        "truncated_rows": int(truncated.sum()),
        "truncated_share": share,
    }
    warnings = []
    if names is not None:
        counts = {name: np.bincount(split.with_format("numpy")["labels"], minlength=len(names)) for name, split in splits.items()}
        stats["label_balance"] = {split: dict(zip(names, c.tolist(), strict=True)) for split, c in counts.items()}
        total = np.sum(list(counts.values()), axis=0)
        majority = float(total.max() / total.sum())
        stats["majority_share"] = round(majority, 4)
        if majority > IMBALANCE_WARN:
            warnings.append(
                f"strong label imbalance: {names[int(total.argmax())]!r} is {majority:.0%} of the rows, so always "
                "answering it scores as much; balance the data or judge the model by F1 rather than accuracy"
            )
    if share > TRUNCATION_WARN:
        warnings.append(
            f"heavy truncation: {share:.0%} of the rows are longer than max_length={data.max_length} tokens "
            f"(p90 is {percentiles['p90']}); raise data.max_length or shorten the texts"
        )
    if masking:
        empty = sum(all(label == -100 for label in labels) for labels in rows["labels"])
        stats["rows_without_answer_tokens"] = empty
        if empty:
            warnings.append(
                f"{empty} rows have no answer tokens left after truncation (they teach nothing); raise data.max_length"
            )
    stats["warnings"] = warnings
    return stats


def _freeze(split: Dataset) -> Dataset:
    """The split with the saved columns in contract order, fingerprinted by its content (data_rows.freeze). Dropped
    here: `n_tokens`, the untruncated lengths the stats were computed from."""
    return freeze(split, COLUMNS)
