"""The data step's chat rows: `data.messages_column` conversations -> rendered text and assistant-only labels.

Rendering is runner.chat's (the server's renderer too). A row becomes `text` (the whole rendered conversation) and
`spans` (the character spans of its assistant turns, flattened start, end, start, end ...); tokenizing then labels a
token when it carries assistant text (by offsets) and gives -100 to everything else: system and user turns, the
template's role headers and the generation prompt. The rendered text is encoded without adding special tokens, as
transformers' apply_chat_template does: the template writes BOS itself where the model wants one.

The template is the recipe's `data.chat_template` when set, else the tokenizer's own. The data step writes the one it
used to `chat_template.jinja` in its output, and the train step saves it with the trained tokenizer (see
`saved_template`), so export copies it beside the graph and the server renders chats with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner import chat
from runner.recipe.sections import Data
from runner.stages import StageError

TEMPLATE_FILE = "chat_template.jinja"  # in the data step's output: the template the rows were rendered with


@dataclass(frozen=True)
class ChatFormat:
    """What renders a conversation: the template and the special-token texts it may read (bos_token, eos_token)."""

    template: str
    special: dict[str, str]


def format_for(data: Data, tokenizer: Any) -> ChatFormat:
    """The recipe's template, or the tokenizer's; a StageError when there is neither or it does not compile."""
    template = data.chat_template or getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template.strip():
        raise StageError(
            "data.messages_column needs a chat template, and this model's tokenizer has none: set data.chat_template "
            "(a Jinja template, e.g. ChatML: see recipes/tiny_chat_lora.yaml)"
        )
    if not tokenizer.is_fast:
        raise StageError("data.messages_column needs a fast tokenizer (assistant turns are found by character offsets); "
                         "this model only has a slow one")
    special = chat.template_tokens(tokenizer.special_tokens_map)
    try:
        chat.render(template, [{"role": "user", "content": "hi"}], special)
    except chat.ChatTemplateError as exc:
        raise StageError(f"data.chat_template: {exc}") from None
    return ChatFormat(template, special)


def check_batch(batch: dict[str, list[Any]], indices: list[int], *, column: str, where: str) -> dict[str, list[Any]]:
    """Conversations checked (`indices`: their rows in the source, for the error) and kept as JSON text."""
    out = []
    for index, messages in zip(indices, batch[column], strict=True):
        problem = chat.check_messages(messages)
        if problem is not None:
            raise StageError(f"{where}: conversation {index + 1} (column {column!r}): {problem} "
                             f"(got {str(messages)[:120]})")
        out.append(json.dumps(messages, ensure_ascii=False))
    return {"conversation": out}


def render_batch(batch: dict[str, list[Any]], *, format: ChatFormat) -> dict[str, list[Any]]:
    """Rendered text and flattened assistant spans (start, end, start, end ...) for a batch of checked conversations."""
    texts, spans = [], []
    for conversation in batch["conversation"]:
        try:
            text, found = chat.assistant_spans(format.template, json.loads(conversation), format.special)
        except chat.ChatTemplateError as exc:
            raise StageError(f"data.messages_column: {exc} (conversation {conversation[:120]})") from None
        texts.append(text)
        spans.append([edge for span in found for edge in span])
    return {"text": texts, "spans": spans}


def encode_batch(batch: dict[str, list[Any]], *, tokenizer: Any, max_length: int) -> dict[str, list[Any]]:
    """Token ids of the rendered conversations (no special tokens added: no second BOS), labels -100 outside the
    assistant spans, truncated to max_length; `n_tokens` keeps the untruncated lengths for the stats."""
    options = {"add_special_tokens": False, "return_token_type_ids": False, "return_offsets_mapping": True}
    enc = tokenizer(batch["text"], verbose=False, **options)
    lengths = [len(ids) for ids in enc["input_ids"]]
    if max(lengths, default=0) > max_length:
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length, **options)
    labels = []
    for ids, offsets, flat in zip(enc["input_ids"], enc["offset_mapping"], batch["spans"], strict=True):
        spans = list(zip(flat[::2], flat[1::2], strict=True))
        labels.append([token if keep else -100 for token, keep in zip(ids, chat.learned(offsets, spans), strict=True)])
    return {"text": batch["text"], "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": labels, "n_tokens": lengths}


def save_template(format: ChatFormat, out: Path) -> None:
    (out / TEMPLATE_FILE).write_text(format.template)


def saved_template(data_dir: Path) -> str | None:
    """The template the data step rendered with (None for a non-chat recipe): the train step sets it on the tokenizer
    it saves, so every later artifact renders chats the way training did."""
    path = Path(data_dir) / TEMPLATE_FILE
    return path.read_text() if path.is_file() else None
