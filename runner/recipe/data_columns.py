"""Validate-time check that every local data file has the columns the recipe reads, from its first bytes only.

The data step would find a missing `label_column` (or template field) only after loading everything, minutes into a
run; here the CSV/TSV header, the JSON-lines keys, or the parquet schema are read (no `datasets`, no pandas) and a
missing column is reported at the field that names it, with the columns the file has. The data step reads files the
same way (runner.stages.data.rows: `.tsv` is tab-separated, a `text` file has one column `text`, `data.columns` renames come
first), so the two agree on what a column is.
"""

from __future__ import annotations

import csv
import json
import string
from pathlib import Path
from typing import Any

from runner.names import CLASSIFIER
from runner.recipe.document import Recipe
from runner.recipe.problems import relative
from runner.recipe.rules import OBJECTIVE_COLUMNS
from runner.recipe.sections import FileSource

Loc = tuple[str | int, ...]
FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet",
           ".txt": "text"}
JSON_SCAN_BYTES = 64 << 20  # keys of JSON lines are gathered over at most this much of the file


def check(recipe: Recipe) -> list[tuple[Loc, str]]:
    data = recipe.data
    sources: list[tuple[Loc, Any]] = (
        [(("data", "sources", i), s) for i, s in enumerate(data.sources)] if data.sources is not None
        else [(("data", "source"), data.source)]
    )
    needed = _needed(recipe)
    found: list[tuple[Loc, str]] = []
    for at, source in sources:
        if not isinstance(source, FileSource):
            continue
        path = Path(source.path)
        if path.is_dir():
            found.append(((*at, "path"), f"{path} is a folder; give a data file (csv, tsv, json, jsonl, parquet, txt)"))
            continue
        try:
            columns = file_columns(path, source.format)
        except (OSError, ValueError, csv.Error, RecursionError) as exc:  # unreadable, not UTF-8, a NUL byte, broken JSON
            found.append(((*at, "path"), f"cannot read the columns of {path}: {exc}"))
            continue
        if columns is None:  # unknown format (the data step asks for `format:`) or a large JSON document
            continue
        renamed = [data.columns.get(name, name) for name in columns]
        for field, column in needed:
            if column not in renamed:
                shown = ", ".join(columns) or "none"
                rename = f" (after data.columns renames: {', '.join(renamed)})" if renamed != columns else ""
                loc = tuple(field.split(".")) if "." in field else ("data", field)
                fix = f"set data.{field} or rename" if "." not in field else "rename"
                found.append((loc, f"column {column!r} is not in {relative(path)} ({_describe(at)}); its "
                              f"columns are: {shown}{rename}; {fix} with data.columns"))
    return found


def _describe(at: Loc) -> str:
    return ".".join(map(str, at))


def _needed(recipe: Recipe) -> list[tuple[str, str]]:
    """(the field that names it, column) for every column the data step reads."""
    data = recipe.data
    needed: list[tuple[str, str]] = []
    objective = recipe.train.objective if recipe.train is not None else "sft"
    if objective != "sft":  # preference rows are read by their columns (runner.stages.data.preference)
        needed += [("train.objective", column) for column in OBJECTIVE_COLUMNS[objective]]
        if objective == "grpo" and recipe.train.grpo is not None:
            needed += [("train.grpo.rewards", r.column) for r in recipe.train.grpo.rewards if r.column is not None]
        return needed
    if data.messages_column is not None:  # a chat recipe reads its conversations, nothing else
        needed.append(("messages_column", data.messages_column))
    elif data.template:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(data.template) if name]
        except ValueError:  # a malformed template: the data step explains how to write one
            fields = []
        for name in fields:
            root = name.split(".")[0].split("[")[0]
            if root and not root.isdigit() and ("template", root) not in needed:
                needed.append(("template", root))
    else:
        needed.append(("text_column", data.text_column))
    if recipe.model is not None and recipe.model.task == CLASSIFIER:
        needed.append(("label_column", data.label_column))
    return needed


def file_columns(path: Path, format: str | None) -> list[str] | None:
    """The column names of a data file as the data step will see them, or None when they cannot be read cheaply."""
    kind = format or FORMATS.get(path.suffix.lower())
    if kind == "text":
        return ["text"]
    if kind == "csv":
        with open(path, encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ","), [])
        return list(header)
    if kind == "json":
        return _json_keys(path)
    if kind == "parquet":
        import pyarrow.parquet as pq  # only for a parquet source: a schema read, no rows

        return list(pq.read_schema(path).names)
    return None


def _json_keys(path: Path) -> list[str] | None:
    """The keys of a JSON-lines file's rows, in first-seen order (the loader unions them); None for one JSON document
    (an array or {"data": [...]}) too large to read here."""
    with open(path, encoding="utf-8-sig") as handle:
        first = handle.read(1)
        while first.isspace():
            first = handle.read(1)
        handle.seek(0)
        if first == "[" or (first == "{" and not _is_json_line(handle)):
            handle.seek(0)
            if path.stat().st_size > JSON_SCAN_BYTES:
                return None
            document = json.load(handle)
            rows = document.get("data") if isinstance(document, dict) else document
            return _keys(rows if isinstance(rows, list) else [])
        handle.seek(0)
        keys: dict[str, None] = {}
        read = 0
        for line in handle:
            read += len(line)
            if line.strip():
                row = json.loads(line)
                keys.update(dict.fromkeys(row if isinstance(row, dict) else []))
            if read > JSON_SCAN_BYTES:  # a column may first appear further on: do not guess
                return None
        return list(keys)


def _is_json_line(handle: Any) -> bool:
    try:
        json.loads(handle.readline())
        return True
    except ValueError:
        return False


def _keys(rows: list[Any]) -> list[str]:
    keys: dict[str, None] = {}
    for row in rows:
        if isinstance(row, dict):
            keys.update(dict.fromkeys(row))
    return list(keys)
