"""The data step for a preference objective (`train.objective` dpo, orpo, simpo, kto or grpo): rows read by their
columns, not through a template, and saved as text for TRL's trainers to tokenize.

Columns (after `data.columns` renames):
- dpo, orpo, simpo: `prompt`, `chosen`, `rejected`;
- kto: `prompt`, `completion` and a boolean `label` (desirable or not);
- grpo: `prompt`, plus whatever columns its rewards read (kept as they are).

Each of `prompt`, `chosen`, `rejected`, `completion` is text, or a conversation (a list of `{role, content}` turns)
rendered with the chat template through runner.chat, the one renderer SFT and the server use: the prompt with the
generation prompt, a completion as what the template writes after that prompt (its end-of-turn marker included).

Checks: a missing column; rows whose chosen equals rejected (counted, refused above `preference.max_identical_share`);
prompts longer than the prompt budget (`preference.max_prompt_length` tokens; grpo: `data.max_length`), which are cut
to their last tokens and counted. Output: `dataset/` (train/test of those text columns, content-fingerprinted like the
SFT data step's) and `stats.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict

from runner import chat
from runner.recipe.sections import Data
from runner.stages import StageError
from runner.stages.data.chat import TEMPLATE_FILE
from runner.stages.data.rows import freeze, read_source, scratch_dir, split_rows

log = logging.getLogger(__name__)

COLUMNS = {
    "dpo": ("prompt", "chosen", "rejected"),
    "orpo": ("prompt", "chosen", "rejected"),
    "simpo": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
    "grpo": ("prompt",),
}
TEXTS = ("prompt", "chosen", "rejected", "completion")  # the columns that may be conversations
# Saved beside the objective's text columns, as the SFT data step saves them: the prompt and the preferred answer
# tokenized, labels -100 on the prompt. The export and quantize gates, the evaluate step's loss and greedy answers and
# the report read these, so a preference-tuned LM goes through them unchanged (TRL reads only its own columns).
SAMPLE_COLUMNS = ["text", "input_ids", "attention_mask", "labels"]


def run(config: dict[str, Any], tokenizer: Any, out: Path) -> dict[str, Any]:
    """Read, render, check, cut, split and save preference rows; write stats.json.

    Raises:
        StageError: a source lacks a column the objective reads; a conversation without a chat template; a KTO label
            that is not a boolean; more rows with chosen equal to rejected than `preference.max_identical_share`; too
            few rows to split; and what reading a source raises (runner.stages.data.rows).
    """
    objective = config["objective"]
    data = Data.model_validate(config["data"])
    seed = int(config["seed"])
    with scratch_dir(out) as cache_dir:
        rows = read_rows(config["data"], objective, seed, cache_dir, tokenizer)
        identical = check_pairs(rows, objective, float(config.get("max_identical_share", 0.01)))
        budget = int(config.get("max_prompt_length") or data.max_length)
        rows, over = cut_prompts(rows, tokenizer, budget)
        rows = with_samples(rows, tokenizer, data.max_length)
        splits = split_rows(rows, data, seed, stratify=False)
        names = [*SAMPLE_COLUMNS, *[name for name in rows.column_names if name not in SAMPLE_COLUMNS]]
        frozen = DatasetDict({name: freeze(split, names) for name, split in splits.items()})
        frozen.save_to_disk(out / "dataset")
    if data.chat_template:  # the train step saves it with the tokenizer, so the server renders as training did
        (out / TEMPLATE_FILE).write_text(data.chat_template)
    stats = _stats(rows, splits, objective, identical, over, budget, tokenizer, data.max_length)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    for warning in stats["warnings"]:
        log.warning(warning)
    return {"rows": len(rows), "train_rows": len(splits["train"]), "test_rows": len(splits["test"]),
            "identical_pairs": identical, "prompts_over_budget": over, "warnings": len(stats["warnings"])}


def read_rows(data_cfg: dict[str, Any], objective: str, seed: int, cache_dir: Path | None, tokenizer: Any) -> Dataset:
    """The recipe's rows as the objective's columns, conversations rendered, shuffled with `seed`, cut to `select`."""
    data = Data.model_validate(data_cfg)
    parts = []
    for source in data.all_sources():
        ds = read_source(source, cache_dir)
        mapping = {old: new for old, new in data.columns.items() if old in ds.column_names}
        ds = ds.rename_columns(mapping) if mapping else ds
        missing = [name for name in COLUMNS[objective] if name not in ds.column_names]
        if missing:
            raise StageError(f"train.objective {objective} reads the column(s) {', '.join(missing)}, which "
                             f"{_describe(source)} lacks (it has {', '.join(ds.column_names)}); rename with data.columns")
        if len(ds) == 0:
            raise StageError(f"{_describe(source)} has no rows")
        keep = list(COLUMNS[objective]) if objective != "grpo" else ds.column_names
        parts.append(_as_text(ds.select_columns(keep), data, tokenizer, objective))
    rows = parts[0] if len(parts) == 1 else _concatenate(parts)
    if data.shuffle:
        rows = rows.shuffle(seed=seed, keep_in_memory=True)
    if data.select is not None:
        rows = rows.select(range(min(data.select, len(rows))), keep_in_memory=True)
    return rows.flatten_indices(keep_in_memory=True)


def train_texts(data_cfg: dict[str, Any], objective: str, seed: int, cache_dir: Path | None) -> Dataset:
    """The train split's texts (prompt and completions joined) for the model step's tokenizer: what the data step will
    put in its train split, never a test row. Conversations need a tokenizer with a template, which a built one lacks."""
    data = Data.model_validate(data_cfg)
    rows = read_rows(data_cfg, objective, seed, cache_dir, tokenizer=None)
    train = split_rows(rows, data, seed, stratify=False)["train"]
    fields = [name for name in TEXTS if name in train.column_names]
    return train.map(lambda row: {"text": "\n".join(str(row[name]) for name in fields)},
                     remove_columns=train.column_names, keep_in_memory=True)


def _concatenate(parts: list[Dataset]) -> Dataset:
    from datasets import concatenate_datasets

    return concatenate_datasets(parts)


def _describe(source: Any) -> str:
    return getattr(source, "path", None) or getattr(source, "hub", None) or "inline rows"


def _as_text(ds: Dataset, data: Data, tokenizer: Any, objective: str) -> Dataset:
    """Conversation cells rendered to text; KTO labels checked as booleans."""
    texts = [name for name in TEXTS if name in ds.column_names]
    first = ds[0]
    conversational = any(isinstance(first[name], list) for name in texts)
    template = None
    if conversational:
        template = data.chat_template or getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str) or not template.strip():
            raise StageError("preference rows written as conversations need a chat template: set data.chat_template, "
                             "or use a model whose tokenizer has one")
    if objective == "kto" and not all(isinstance(v, bool) for v in ds["label"]):
        raise StageError("train.objective kto: column `label` must hold booleans (true: a desirable completion)")
    special = chat.template_tokens(tokenizer.special_tokens_map) if tokenizer is not None else {}

    def render(row: dict[str, Any]) -> dict[str, Any]:
        if template is None:
            return {name: str(row[name]) for name in texts}
        prompt = _messages(row["prompt"], "prompt")
        try:
            rendered = {"prompt": chat.render(template, prompt, special, add_generation_prompt=True)}
            for name in texts[1:]:
                whole = chat.render(template, [*prompt, *_messages(row[name], name)], special)
                if not whole.startswith(rendered["prompt"]):
                    raise StageError(f"the chat template renders the prompt differently inside the conversation; "
                                     f"column {name!r} cannot be split from its prompt")
                rendered[name] = whole[len(rendered["prompt"]):].rstrip()
        except chat.ChatTemplateError as exc:
            raise StageError(f"rendering preference rows: {exc}") from None
        return rendered

    return ds.map(render, keep_in_memory=True, desc="Reading preference rows")


def _messages(value: Any, column: str) -> list[dict[str, Any]]:
    """A cell of turns: the prompt's any roles, a completion's assistant turns only (what the policy writes)."""
    messages = [value] if isinstance(value, dict) else value
    # check_messages wants an assistant turn (an SFT chat has to learn one); a prompt has none, a completion only those
    problem = chat.check_messages([*messages, {"role": "assistant", "content": ""}] if column == "prompt" else messages)
    if problem is None and column != "prompt" and any(m["role"] != "assistant" for m in messages):
        problem = "a completion holds assistant turns only"
    if problem is not None:
        raise StageError(f"column {column!r}: {problem} (got {str(value)[:120]})")
    return list(messages)


def with_samples(rows: Dataset, tokenizer: Any, max_length: int) -> Dataset:
    """`text` = prompt + the preferred completion (chosen; kto: completion; grpo: the prompt alone), tokenized, with
    labels -100 on every token that ends inside the prompt (found by character offsets, as the SFT data step does)."""
    answer = next((name for name in ("chosen", "completion") if name in rows.column_names), None)
    eos = tokenizer.eos_token or ""

    def encode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts = batch["prompt"]
        texts = [p + batch[answer][i] + eos for i, p in enumerate(prompts)] if answer else [p + eos for p in prompts]
        enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=tokenizer.is_fast,
                        return_token_type_ids=False, verbose=False)
        labels = []
        for i, ids in enumerate(enc["input_ids"]):
            if answer is None or not tokenizer.is_fast:
                labels.append(list(ids))
                continue
            boundary = len(prompts[i])
            labels.append([tok if end > boundary else -100 for tok, (_, end) in zip(ids, enc["offset_mapping"][i],
                                                                                     strict=True)])
        return {"text": texts, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    return rows.map(encode, batched=True, keep_in_memory=True, desc="Tokenizing preferred answers")


def check_pairs(rows: Dataset, objective: str, limit: float) -> int:
    """How many rows have chosen equal to rejected; a StageError above `limit` of the rows."""
    if "chosen" not in rows.column_names:
        return 0
    same = sum(a.strip() == b.strip() for a, b in zip(rows["chosen"], rows["rejected"], strict=True))
    if same > limit * len(rows):
        raise StageError(f"{same} of {len(rows)} rows have chosen equal to rejected (they teach {objective} nothing), "
                         f"more than preference.max_identical_share ({limit}): fix the pairs or drop those rows")
    return same


def cut_prompts(rows: Dataset, tokenizer: Any, budget: int) -> tuple[Dataset, int]:
    """Prompts over `budget` tokens cut to their last `budget` tokens (the end of a prompt is what the answer follows),
    by character offsets so the kept text is exactly what those tokens encode; returns the rows and how many were cut."""
    prompts = list(rows["prompt"])
    enc = tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast, verbose=False)
    over = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > budget]
    if not over:
        return rows, 0
    if not tokenizer.is_fast:
        raise StageError(f"{len(over)} prompts are longer than the prompt budget ({budget} tokens) and this tokenizer "
                         "is slow (no offsets to cut them by): raise preference.max_prompt_length")
    cut = list(prompts)
    for i in over:
        start = enc["offset_mapping"][i][-budget][0]
        cut[i] = prompts[i][start:]
    rows = rows.remove_columns("prompt").add_column("prompt", cut)
    return rows.select_columns(["prompt", *[c for c in rows.column_names if c != "prompt"]]), len(over)


def _stats(rows: Dataset, splits: DatasetDict, objective: str, identical: int, over: int, budget: int, tokenizer: Any,
           max_length: int) -> dict[str, Any]:
    def lengths(column: str) -> dict[str, int]:
        n = np.asarray([len(ids) for ids in tokenizer(list(rows[column]), add_special_tokens=False)["input_ids"]])
        return {f"p{q}": int(np.percentile(n, q, method="nearest")) for q in (50, 90, 99)} | {"max": int(n.max())}

    completions = [name for name in ("chosen", "rejected", "completion") if name in rows.column_names]
    stats: dict[str, Any] = {
        "objective": objective,
        "rows": {name: len(split) for name, split in splits.items()},
        "identical_pairs": identical,
        "max_length": max_length,
        "prompt_budget": budget,
        "prompts_over_budget": over,
        "prompt_tokens": lengths("prompt"),
        **{f"{name}_tokens": lengths(name) for name in completions},
    }
    warnings = []
    if over:
        warnings.append(f"{over} of {len(rows)} prompts were longer than the prompt budget ({budget} tokens) and were "
                        "cut to their last tokens; raise preference.max_prompt_length to keep them whole")
    if identical:
        warnings.append(f"{identical} rows have chosen equal to rejected; they teach nothing")
    long = [name for name in completions if stats[f"{name}_tokens"]["max"] + budget > max_length]
    if long:
        warnings.append(f"some prompt + {'/'.join(long)} are longer than data.max_length ({max_length}); TRL truncates "
                        "their completions")
    stats["warnings"] = warnings
    return stats
