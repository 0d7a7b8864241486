"""Validate-time checks of the evaluate section that read local files or the environment (run by local_checks.check,
so before any step): every local eval-set file has the columns its set reads (read as data_columns reads data files:
a CSV header, JSON-lines keys, a parquet schema), and `evaluate.lm_eval` has its package."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from runner.names import CLASSIFIER
from runner.recipe.data_columns import file_columns
from runner.recipe.document import Recipe
from runner.recipe.problems import relative
from runner.recipe.sections import FileSource

Loc = tuple[str | int, ...]
LM_EVAL_MISSING = (
    "evaluate.lm_eval needs the lm-evaluation-harness package, which is not installed (it is not in the pinned "
    "environments: its dependency sqlitedict has no wheel); install it with `pip install lm-eval` into this "
    "environment, or remove `evaluate.lm_eval`"
)


def check(recipe: Recipe) -> list[tuple[Loc, str]]:
    evaluate = recipe.evaluate
    if evaluate is None or recipe.model is None:
        return []
    found: list[tuple[Loc, str]] = []
    if evaluate.lm_eval is not None and importlib.util.find_spec("lm_eval") is None:
        found.append((("evaluate", "lm_eval"), LM_EVAL_MISSING))
    classify = recipe.model.task == CLASSIFIER
    for i, spec in enumerate(evaluate.sets):
        at: Loc = ("evaluate", "sets", i)
        if not isinstance(spec.source, FileSource):
            continue
        path = Path(spec.source.path)
        if not path.is_file():
            found.append(((*at, "source", "path"), f"{path} is not a file; give a data file (csv, tsv, json, jsonl, "
                          "parquet, txt)"))
            continue
        try:
            columns = file_columns(path, spec.source.format)
        except (OSError, ValueError, csv.Error, RecursionError) as exc:
            found.append(((*at, "source", "path"), f"cannot read the columns of {path}: {exc}"))
            continue
        if columns is None:
            continue
        needed = [("text_column", spec.text_column)]
        if classify and spec.label_column:
            needed.append(("label_column", spec.label_column))
        if not classify:
            needed += [(name, getattr(spec, name)) for name in ("prompt_column", "answer_column") if getattr(spec, name)]
        for field, column in needed:
            if column not in columns:
                found.append(((*at, field), f"column {column!r} is not in {relative(path)}; its columns are: "
                              f"{', '.join(columns) or 'none'}"))
    return found
