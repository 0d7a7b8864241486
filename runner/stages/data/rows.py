"""The data step's rows: the recipe's sources read, renamed, labelled or templated, mixed and selected, then split.

Everything before tokenization lives here, because three stages read rows the same way: the data step (which then
tokenizes and saves them, data.py), the model step (which trains a tokenizer on the train split, `train_split_rows`)
and the evaluate step (which reads its extra sets like data sources, `read_source`). All of it runs in a private
`datasets` cache (`scratch_dir`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import string
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    DatasetInfo,
    Features,
    List,
    Value,
    concatenate_datasets,
    load_dataset,
)
from datasets.table import InMemoryTable

from runner.names import CLASSIFIER
from runner.recipe.sections import Data, FileSource, HubSource, InlineSource
from runner.stages import StageError
from runner.stages.data import chat as data_chat

log = logging.getLogger(__name__)

_FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
    ".txt": "text",
}


@contextmanager
def scratch_dir(out: Path) -> Iterator[Path]:
    """A private `datasets` cache inside the step's folder, removed at the end.

    Local files are converted to Arrow here rather than in the shared ~/.cache, so a step neither reuses another run's
    conversion nor leaves one behind. Hub downloads still go to the normal Hugging Face cache (download once)."""
    path = out / ".scratch"
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- rows: sources, columns, labels, templates, mixing ------------------------------------------------------------------


def load_rows(data_cfg: dict[str, Any], seed: int, task: str, cache_dir: Path | None = None,
              chat: data_chat.ChatFormat | None = None) -> Dataset:
    """The recipe's rows before tokenization, shuffled with `seed` and cut to `select`.

    Columns: `text` (the filled template, or the text column), `label` (the label name as a string; classification) and
    `prompt_length` (characters before `response_template`; only with `mask_prompt`); with `messages_column`, `text` is
    the conversation rendered with `chat` and `spans` its assistant turns' characters. The model step trains its
    tokenizer on these texts; the data step tokenizes them.
    """
    data = Data.model_validate(data_cfg)
    sources = data.all_sources()
    raw = [_load_source(source, cache_dir) for source in sources]
    _check_renames(data.columns, raw)
    parts = [_prepare(_rename(ds, data.columns), data, task, _describe(source)) for ds, source in zip(raw, sources, strict=True)]
    rows = parts[0] if len(parts) == 1 else _mix(parts, [s.weight for s in sources], seed, data.shuffle)
    if data.shuffle:
        rows = rows.shuffle(seed=seed, keep_in_memory=True)
    if data.select is not None:
        if data.select > len(rows):
            log.warning("data.select is %d but only %d rows are there; using all of them", data.select, len(rows))
        rows = rows.select(range(min(data.select, len(rows))), keep_in_memory=True)
    rows = rows.flatten_indices(keep_in_memory=True)
    if data.messages_column is not None and task != CLASSIFIER:
        rows = _render_chats(rows, chat)  # only the selected rows: rendering every prefix costs
    return rows


def train_split_rows(data_cfg: dict[str, Any], seed: int, task: str, cache_dir: Path | None = None,
                     chat: data_chat.ChatFormat | None = None) -> Dataset:
    """The rows the data step puts in its train split, before tokenization: what a tokenizer may learn from.

    The split is the data step's own (`split_rows` on the same rows in the same order, labels encoded the same way), so a
    tokenizer trained on these never sees a test row: the test accuracy then measures text the pipeline never read."""
    data = Data.model_validate(data_cfg)
    classify = task == CLASSIFIER
    rows = load_rows(data_cfg, seed, task, cache_dir, chat=chat)
    if classify:
        rows = encode_labels(rows, label_names(data_cfg, rows))
    return split_rows(rows, data, seed, stratify=classify and data.stratify)["train"]


def label_names(data_cfg: dict[str, Any], rows: Dataset) -> list[str]:
    """Label names in id order: `data.labels` when given (every label in the data must be among them), else the sorted
    distinct labels of the data (numbers in numeric order)."""
    data = Data.model_validate(data_cfg)
    present = rows.unique("label")
    if data.labels is not None:
        unknown = sorted(set(present) - set(data.labels))
        if unknown:
            raise StageError(
                f"label {', '.join(map(repr, unknown))} is in the data but not in data.labels {data.labels}; "
                "add it to data.labels or fix the data"
            )
        return list(data.labels)
    if len(present) < 2:
        raise StageError(f"the data has only one label ({present[0]!r}); a classifier needs at least two")
    return sorted(present, key=lambda name: (0, int(name), "") if re.fullmatch(r"-?\d+", name) else (1, 0, name))


def read_source(source: HubSource | FileSource | InlineSource, cache_dir: Path | None) -> Dataset:
    """One source's rows as written (no renames, templates or labels): how the evaluate step reads its extra sets, so
    an eval set is read exactly like a data source."""
    return _load_source(source, cache_dir)


def _load_source(source: HubSource | FileSource | InlineSource, cache_dir: Path | None) -> Dataset:
    if isinstance(source, InlineSource):
        try:
            return Dataset.from_dict(source.rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise StageError(f"inline rows: a column mixes value types ({exc})") from exc
    if isinstance(source, HubSource):
        try:
            ds = load_dataset(source.hub, source.config, split=source.split, revision=source.revision)
        except Exception as exc:  # noqa: BLE001 - offline, unknown id, bad split or revision: all fixable in the recipe
            raise StageError(
                f"could not load the hub dataset {source.hub} (config {source.config}, split {source.split!r}, "
                f"revision {source.revision}): {exc}"
            ) from exc
        _check_revision(ds, source)
        return ds
    return _load_file(source, cache_dir)


def _check_revision(ds: Dataset, source: HubSource) -> None:
    """Offline, `datasets` serves the newest prepared copy whatever revision is asked for; online it prepares the data
    in a folder named by the resolved commit. A pinned commit whose folder is not the one served is refused, so a
    recipe that bumps its revision never trains on the old data under a key that names the new one."""
    pinned = re.fullmatch(r"[0-9a-f]{40}", source.revision or "")
    files = [entry["filename"] for entry in ds.cache_files]
    if pinned and files and not all(f"{os.sep}{source.revision}{os.sep}" in name for name in files):
        raise StageError(
            f"the cached copy of hub dataset {source.hub} is not at revision {source.revision} (offline, `datasets` "
            "serves the newest cached copy whatever revision is asked for); run once with network access"
        )


def _load_file(source: FileSource, cache_dir: Path | None) -> Dataset:
    path = Path(source.path)
    if not path.is_file():
        raise StageError(f"data file {path} does not exist")
    builder = source.format or _FORMATS.get(path.suffix.lower())
    if builder is None:
        raise StageError(f"cannot tell the format of {path} from its extension; set `format:` to csv, json, parquet or text")
    options: dict[str, Any] = {"delimiter": "\t"} if builder == "csv" and path.suffix.lower() == ".tsv" else {}
    try:
        return load_dataset(
            builder,
            data_files=str(path),
            split="train",
            cache_dir=str(cache_dir) if cache_dir else None,
            keep_in_memory=True,
            **options,
        )
    except Exception as exc:  # noqa: BLE001 - malformed files surface as many exception types
        raise StageError(f"could not read {path} as {builder}: {exc}") from exc


def _describe(source: HubSource | FileSource | InlineSource) -> str:
    if isinstance(source, HubSource):
        return f"hub dataset {source.hub}"
    if isinstance(source, FileSource):
        return f"file {source.path}"
    return "inline rows"


def _check_renames(columns: dict[str, str], raw: list[Dataset]) -> None:
    """A rename must match a column of at least one source (with several sources, not every source needs every one)."""
    present = {name for ds in raw for name in ds.column_names}
    missing = [old for old in columns if old not in present]
    if missing:
        raise StageError(
            f"data.columns renames {', '.join(map(repr, missing))}, which no source has; "
            f"available columns: {', '.join(sorted(present))}"
        )


def _rename(ds: Dataset, columns: dict[str, str]) -> Dataset:
    mapping = {old: new for old, new in columns.items() if old in ds.column_names}
    try:
        return ds.rename_columns(mapping) if mapping else ds
    except ValueError as exc:
        raise StageError(f"data.columns {columns}: {exc}") from exc


def _template_fields(template: str) -> list[str]:
    """The column names a `{column}` template reads, in order of first use."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise StageError(
            f"data.template is not a valid template ({exc}); write fields as {{column}} and literal braces as {{{{ and }}}}"
        ) from exc
    fields: list[str] = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name or name.isdigit():
            raise StageError("data.template fields must name a column, e.g. {instruction}; got {" + name + "}")
        root = re.split(r"[.\[]", name)[0]
        if root not in fields:
            fields.append(root)
    return fields


def _prepare(ds: Dataset, data: Data, task: str, where: str) -> Dataset:
    """One source as the common columns (text, label, prompt_length), so that sources can be mixed."""
    if len(ds) == 0:
        raise StageError(f"{where} has no rows")
    if data.messages_column is not None and task != CLASSIFIER:
        return _prepare_chat(ds, data, where)
    classify = task == CLASSIFIER
    needed = _template_fields(data.template) if data.template else [data.text_column]
    if classify:
        needed.append(data.label_column)
    missing = [name for name in needed if name not in ds.column_names]
    if missing:
        what = "template field" if data.template else "column"
        raise StageError(
            f"{where}: {what} {', '.join(map(repr, missing))} not found; available columns: "
            f"{', '.join(ds.column_names)} (rename with data.columns, or set data.text_column/label_column)"
        )
    features = {"text": Value("string")}
    class_names = None
    if classify:
        class_names = _check_label_values(ds, data, where)
        features["label"] = Value("string")
    prompt = None
    if data.mask_prompt and task != CLASSIFIER and data.template and data.response_template:
        prompt = data.template[: data.template.index(data.response_template)]
        features["prompt_length"] = Value("int64")
    build = partial(
        _build_batch,
        template=data.template,
        text_column=data.text_column,
        label_column=data.label_column if classify else None,
        class_names=class_names,
        labels=data.labels,
        prompt=prompt,
    )
    return ds.map(
        build,
        batched=True,
        remove_columns=ds.column_names,
        features=Features(features),
        keep_in_memory=True,
        desc=f"Reading {where}",
    )


def _prepare_chat(ds: Dataset, data: Data, where: str) -> Dataset:
    """A source of conversations, checked, as one `conversation` column (JSON text: sources whose turns carry different
    keys still mix); `_render_chats` renders them once rows are selected (see runner.stages.data.chat)."""
    column = str(data.messages_column)
    if column not in ds.column_names:
        raise StageError(f"{where}: data.messages_column {column!r} not found; available columns: "
                         f"{', '.join(ds.column_names)} (rename with data.columns)")
    return ds.map(
        partial(data_chat.check_batch, column=column, where=where),
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        features=Features({"conversation": Value("string")}),
        keep_in_memory=True,
        desc=f"Reading {where}",
    )


def _render_chats(rows: Dataset, chat: data_chat.ChatFormat | None) -> Dataset:
    """`conversation` -> `text` (rendered) and `spans` (the assistant turns' characters)."""
    if chat is None:
        raise StageError("data.messages_column: rows of conversations need a chat template to be read")
    return rows.map(
        partial(data_chat.render_batch, format=chat),
        batched=True,
        remove_columns=["conversation"],
        features=Features({"text": Value("string"), "spans": List(Value("int64"))}),
        keep_in_memory=True,
        desc="Rendering conversations",
    )


def _check_label_values(ds: Dataset, data: Data, where: str) -> list[str] | None:
    """Fail on missing labels and on integer labels outside `data.labels`; return a ClassLabel column's names."""
    feature = ds.features[data.label_column]
    values = ds.unique(data.label_column)
    if any(value is None or value != value for value in values):  # value != value: NaN, an empty CSV cell
        raise StageError(f"{where}: some rows have no label in column {data.label_column!r}")
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    if data.labels is not None:
        for value in values:
            if _is_int(value) and not 0 <= value < len(data.labels):
                raise StageError(
                    f"{where}: label {value} is not an id of data.labels {data.labels} "
                    f"(integer labels are ids 0..{len(data.labels) - 1})"
                )
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _build_batch(
    batch: dict[str, list[Any]],
    *,
    template: str | None,
    text_column: str,
    label_column: str | None,
    class_names: list[str] | None,
    labels: list[str] | None,
    prompt: str | None,
) -> dict[str, list[Any]]:
    size = len(next(iter(batch.values())))
    records = [{name: values[i] for name, values in batch.items()} for i in range(size)]
    out: dict[str, list[Any]] = {}
    if template is not None:
        out["text"] = [template.format_map(record) for record in records]
    else:
        out["text"] = [str(value) for value in batch[text_column]]
    if label_column is not None:
        out["label"] = [_label_name(value, class_names, labels) for value in batch[label_column]]
    if prompt is not None:
        # The answer starts where the template's prompt part ends; counted in characters, mapped to tokens later.
        out["prompt_length"] = [len(prompt.format_map(record)) for record in records]
    return out


def _label_name(value: Any, class_names: list[str] | None, labels: list[str] | None) -> str:
    """A label as its name: ClassLabel ids by the column's names, integers by `data.labels` when given, else as text."""
    if class_names is not None:
        return class_names[value]
    if labels is not None and _is_int(value):
        return labels[value]
    return str(value)


def _mix(parts: list[Dataset], weights: list[float], seed: int, shuffle: bool) -> Dataset:
    """Mix sources so that each makes up `weight / sum(weights)` of the rows, without repeating any row.

    The mix is as large as that rule allows, so the source with the fewest rows per unit of weight sets its size: 1,000
    task rows (weight 3) mixed with 100,000 general rows (weight 1) give 1,000 + 333 rows. Which rows of a source are
    used is drawn with the seed (the first ones with `shuffle: false`); `select` then applies to the mix.
    """
    shares = [weight / sum(weights) for weight in weights]
    size = min(len(part) / share for part, share in zip(parts, shares, strict=True))
    picked = []
    for i, (part, share) in enumerate(zip(parts, shares, strict=True)):
        count = min(len(part), round(size * share))
        if shuffle:
            part = part.shuffle(seed=seed + i, keep_in_memory=True)
        picked.append(part.select(range(count), keep_in_memory=True))
        log.info("source %d: %d of %d rows (share %.3f)", i, count, len(part), share)
    return concatenate_datasets(picked)


def encode_labels(rows: Dataset, names: list[str]) -> Dataset:
    """Label names -> ids as a ClassLabel column `labels` (stratified splitting needs ClassLabel; it also keeps names)."""
    ids = {name: i for i, name in enumerate(names)}
    features = rows.features.copy()
    del features["label"]
    features["labels"] = ClassLabel(names=names)
    return rows.map(
        lambda batch: {"labels": [ids[name] for name in batch["label"]]},
        batched=True,
        remove_columns=["label"],
        features=features,
        keep_in_memory=True,
    )


def split_rows(rows: Dataset, data: Data, seed: int, stratify: bool) -> DatasetDict:
    """Seeded train/test split; stratified on `labels` keeps label shares equal (it always draws rows at random)."""
    try:
        return rows.train_test_split(
            test_size=data.test_size,
            shuffle=stratify or data.shuffle,
            seed=seed,
            stratify_by_column="labels" if stratify else None,
            keep_in_memory=True,
        )
    except ValueError as exc:
        how = " stratified by label" if stratify else ""
        raise StageError(
            f"cannot split {len(rows)} rows with test_size={data.test_size}{how}: {exc} "
            "(use more rows, another test_size, or `stratify: false`)"
        ) from exc


def freeze(split: Dataset, columns: list[str]) -> Dataset:
    """The split in memory with `columns` in that order, fingerprinted by its content.

    datasets derives fingerprints from cache-file paths and modification times, which differ between runs; a content
    hash makes the saved folder (state.json included) byte-identical whenever the data is identical."""
    # one chunk per column: the chunk layout depends on how the rows were processed, and it would leak into the hash
    table = split.flatten_indices(keep_in_memory=True).data.table.select(columns).combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    fingerprint = hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:16]
    features = Features({name: split.features[name] for name in columns})
    return Dataset(InMemoryTable(table), info=DatasetInfo(features=features), fingerprint=fingerprint)
