"""The evaluate step's sets: the recipe's test split (from the data step's dataset/) and the extra sets of
`evaluate.sets`, read like data sources (runner.stages.data.rows, the data step's own source loading).

A set is plain rows: texts, and where the set has them, labels (classifier), prompts and reference answers (causal LM),
and for the test split of a causal LM the data step's token rows (its labels mask the prompt when `mask_prompt` is set,
so the test loss is the loss training reported). `content_hash` is the sha256 of exactly the rows scored: a set's score
is memoized by it, so editing one row rescores that set and nothing else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.names import CLASSIFIER
from runner.recipe.sections import EvalSet, Evaluate, FileSource, HubSource
from runner.stages import StageError
from runner.stages.data import rows as data_rows

TEST = "test"


@dataclass
class ScoredSet:
    name: str
    role: str  # "task" or "general"
    source: str  # for the report: "the recipe's test split", a file name, a hub id
    texts: list[str]
    labels: list[str] | None = None  # classifier: label names (task sets: the model's names)
    prompts: list[str] | None = None  # causal LM: prompts answered greedily...
    answers: list[str] | None = None  # ...and their reference answers
    samples: list[dict[str, list[int]]] | None = None  # causal-LM test split: the data step's token rows
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.texts)

    def content_hash(self) -> str:
        rows = {"texts": self.texts, "labels": self.labels, "prompts": self.prompts, "answers": self.answers,
                "samples": self.samples}
        return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def load_sets(cfg: Evaluate, task: str, data_dir: Path, scratch: Path) -> list[ScoredSet]:
    """Every set the step scores, in order: `test` first (when `test_split`), then `evaluate.sets` as written."""
    sets = [test_split(cfg, task, data_dir)] if cfg.test_split else []
    names = {TEST} if cfg.test_split else set()
    for spec in cfg.sets:
        if spec.name in names:  # the rules refuse this at validate time; a recipe built in Python gets it here
            raise StageError(f"evaluate.sets: two sets are named {spec.name!r}; give each a name of its own")
        names.add(spec.name)
        sets.append(extra_set(spec, cfg, task, scratch))
    if not sets:
        raise StageError("evaluate has nothing to score: set `test_split: true` or add `evaluate.sets`")
    return sets


def label_names(data_dir: Path) -> list[str] | None:
    path = data_dir / "labels.json"
    if not path.is_file():
        return None
    id2label = json.loads(path.read_text())["id2label"]
    return [id2label[key] for key in sorted(id2label, key=int)]


def test_split(cfg: Evaluate, task: str, data_dir: Path) -> ScoredSet:
    """The first `max_rows` rows of the data step's test split (shuffled with the recipe seed already)."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(data_dir / "dataset"))
    if TEST not in dataset or len(dataset[TEST]) == 0:
        raise StageError("the data step's dataset has no `test` rows to evaluate: raise data.test_size")
    rows = dataset[TEST].select(range(min(cfg.max_rows, len(dataset[TEST]))))
    source = "the recipe's test split"
    if task == CLASSIFIER:
        names = label_names(data_dir)
        if names is None:
            raise StageError(f"the data step's output {data_dir} has no labels.json: rerun the data step")
        return ScoredSet(TEST, "task", source, list(rows["text"]), [names[i] for i in rows["labels"]])
    samples = [{k: list(row[k]) for k in ("input_ids", "attention_mask", "labels")} for row in rows]
    return ScoredSet(TEST, "task", source, list(rows["text"]), samples=samples)


def describe(source: Any) -> str:
    if isinstance(source, FileSource):
        return Path(source.path).name
    if isinstance(source, HubSource):
        return f"{source.hub}@{source.revision[:12]} ({source.split})"
    return "inline rows"


def extra_set(spec: EvalSet, cfg: Evaluate, task: str, scratch: Path) -> ScoredSet:
    """One of `evaluate.sets`, read through the data step's source loading, cut to its `max_rows`."""
    where = f"evaluate set {spec.name!r}"
    try:
        dataset = data_rows.read_source(spec.source, scratch)
    except StageError as exc:
        raise StageError(f"{where}: {exc}") from None
    wanted = [spec.text_column]
    if task == CLASSIFIER and spec.label_column:
        wanted.append(spec.label_column)
    if task != CLASSIFIER and spec.prompt_column:
        wanted += [spec.prompt_column, spec.answer_column or ""]
    missing = [name for name in wanted if name not in dataset.column_names]
    if missing:
        raise StageError(f"{where}: column {', '.join(map(repr, missing))} not found; its columns are "
                         f"{', '.join(dataset.column_names)} (set text_column/label_column/prompt_column/answer_column)")
    limit = min(cfg.max_rows, spec.max_rows or cfg.max_rows)
    rows = dataset.select(range(min(limit, len(dataset))))
    if len(rows) == 0:
        raise StageError(f"{where} has no rows")
    texts = [_text(value, where, spec.text_column) for value in rows[spec.text_column]]
    scored = ScoredSet(spec.name, spec.role, describe(spec.source), texts)
    if task == CLASSIFIER and spec.label_column:
        values = rows[spec.label_column]
        feature = rows.features[spec.label_column]
        names = getattr(feature, "names", None)  # a ClassLabel column holds ids
        if any(value is None or value != value for value in values):
            raise StageError(f"{where}: some rows have no label in column {spec.label_column!r}")
        scored.labels = [names[v] if names else str(v) for v in values]
    if task != CLASSIFIER and spec.prompt_column and spec.answer_column:
        scored.prompts = [_text(v, where, spec.prompt_column) for v in rows[spec.prompt_column]]
        scored.answers = [_text(v, where, spec.answer_column) for v in rows[spec.answer_column]]
    return scored


def _text(value: Any, where: str, column: str) -> str:
    if value is None:
        raise StageError(f"{where}: a row has no value in column {column!r}")
    return str(value)
