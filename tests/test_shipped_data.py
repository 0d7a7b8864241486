"""The shipped review data, as the quickstart's accuracy relies on it: real rows, no repeats, and no test row that is a
near copy of a train row, so the test accuracy measures text the model never saw."""

from __future__ import annotations

import csv
import importlib.util
from collections import Counter
from pathlib import Path

import yaml

from runner.recipe.sections import Data
from runner.stages.data import rows as data_rows

REPO = Path(__file__).resolve().parent.parent
REVIEWS = REPO / "recipes" / "data" / "reviews.csv"


def _fetch_reviews():
    spec = importlib.util.spec_from_file_location("fetch_reviews", REPO / "recipes" / "data" / "fetch_reviews.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fetch_reviews = _fetch_reviews()


def rows() -> list[tuple[str, str]]:
    with open(REVIEWS, encoding="utf-8", newline="") as handle:
        return [(r["text"], r["label"]) for r in csv.DictReader(handle)]


def test_reviews_are_balanced_with_no_two_rows_alike():
    shipped = rows()
    assert Counter(label for _, label in shipped) == {"positive": 2000, "negative": 2000}
    assert fetch_reviews.near_duplicate_pairs([text for text, _ in shipped]) == []


def test_quickstart_split_has_no_near_duplicates_across_train_and_test():
    recipe = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    data_cfg = {**recipe["data"], "source": {"path": str(REVIEWS)}}
    Data.model_validate(data_cfg)
    train = list(data_rows.train_split_rows(data_cfg, recipe["seed"], "sequence-classification")["text"])
    everything = [text for text, _ in rows()]
    test = sorted(set(everything) - set(train))
    assert len(train) + len(test) == len(everything) and len(test) >= 0.19 * len(everything)
    normalized_train = {fetch_reviews.normalized(t) for t in train}
    assert not [t for t in test if fetch_reviews.normalized(t) in normalized_train]
    pairs = fetch_reviews.near_duplicate_pairs(train + test)
    assert not [(a, b) for a, b in pairs if (a < len(train)) != (b < len(train))]


def test_near_duplicate_check_finds_copies_and_reworded_copies():
    """The check itself can fail: an exact copy (case, punctuation) and a copy with one word changed are caught."""
    texts = [
        "A remarkable 179-minute meditation on the nature of revolution and memory.",
        "a remarkable 179 minute meditation on the nature of revolution and memory",
        "A remarkable 179-minute meditation on the nature of revolution and of memory.",
        "Not once does it come close to being exciting.",
    ]
    pairs = fetch_reviews.near_duplicate_pairs(texts)
    assert (0, 1) in pairs and (0, 2) in pairs and not [p for p in pairs if 3 in p]
    kept = fetch_reviews.deduplicated([(t, "positive") for t in texts])
    assert [t for t, _ in kept] == [texts[0], texts[3]]
