"""The data step as a recipe author relies on it: sources, columns, labels, templates, prompt masking, split, stats.

Configs are built from the recipe models, so these tests follow the recipe language; tokenizers are the tiny ones from
conftest, loaded through the same `from_pretrained` path as hub models.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from datasets import DatasetDict, load_from_disk

from runner.recipe.sections import Data, FileSource, HubSource, InlineSource, Model
from runner.stages import StageError
from runner.stages import data as data_stage
from runner.stages.pretrained import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
REVIEWS = REPO / "recipes" / "data" / "reviews.csv"
INSTRUCTIONS = REPO / "recipes" / "data" / "instructions.jsonl"
ALPACA = "### Instruction:\n{instruction}\n### Response:\n{output}"


@pytest.fixture
def classifier(tiny_classifier_dir: Path) -> Model:
    return Model(path=str(tiny_classifier_dir), task="sequence-classification")


@pytest.fixture
def llama(tiny_llama_dir: Path) -> Model:
    return Model(path=str(tiny_llama_dir), task="causal-lm")


def step_config(model: Model, data: Data, seed: int = 42) -> dict[str, Any]:
    return {"model": model.model_dump(mode="json"), "data": data.model_dump(mode="json"), "seed": seed}


def run_data(tmp_path: Path, model: Model, data: Data, seed: int = 42, name: str = "out") -> tuple[Path, dict[str, Any]]:
    out = tmp_path / name
    out.mkdir()
    return out, data_stage.run(step_config(model, data, seed), {}, out)


def saved(out: Path) -> DatasetDict:
    return load_from_disk(str(out / "dataset"))


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def reviews_by_text() -> dict[str, str]:
    with REVIEWS.open(newline="") as handle:
        return {row["text"]: row["label"] for row in csv.DictReader(handle)}


# --- classification ------------------------------------------------------------------------------------------------------


def test_csv_classifier_data_has_the_contract_layout_and_labels(tmp_path: Path, classifier: Model) -> None:
    out, metrics = run_data(tmp_path, classifier, Data(source=FileSource(path=str(REVIEWS)), max_length=128))

    splits = saved(out)
    assert set(splits) == {"train", "test"}
    assert {name: len(split) for name, split in splits.items()} == {"train": 3600, "test": 400}
    assert metrics["rows"] == 4000 and metrics["train_rows"] == 3600 and metrics["test_rows"] == 400
    for split in splits.values():
        assert split.column_names == ["text", "input_ids", "attention_mask", "labels"]
        assert split.features["labels"].names == ["negative", "positive"]
    # The label ids carry the file's label names: every row keeps its own label.
    truth = reviews_by_text()
    names = splits["train"].features["labels"].names
    assert all(truth[row["text"]] == names[row["labels"]] for split in splits.values() for row in split)
    assert json.loads((out / "labels.json").read_text()) == {
        "id2label": {"0": "negative", "1": "positive"},
        "label2id": {"negative": 0, "positive": 1},
    }
    assert not (out / ".scratch").exists()  # the private datasets cache is gone


def test_stratified_split_keeps_label_shares(tmp_path: Path, classifier: Model) -> None:
    rows = {"text": [f"review number {i}" for i in range(100)], "label": ["a"] * 70 + ["b"] * 30}
    out, _ = run_data(tmp_path, classifier, Data(source=InlineSource(rows=rows), test_size=0.2))

    stats = json.loads((out / "stats.json").read_text())
    assert stats["label_balance"] == {"train": {"a": 56, "b": 24}, "test": {"a": 14, "b": 6}}
    test = saved(out)["test"]
    assert sorted(test["labels"]) == [0] * 14 + [1] * 6


def test_renamed_columns_and_integer_labels_map_to_recipe_label_names(tmp_path: Path, classifier: Model) -> None:
    rows = {"review": [f"the film was {w}" for w in ["great", "awful"] * 10], "stars": [1, 0] * 10}
    data = Data(source=InlineSource(rows=rows), columns={"review": "text", "stars": "label"}, labels=["bad", "good"])
    out, _ = run_data(tmp_path, classifier, data)

    assert json.loads((out / "labels.json").read_text())["id2label"] == {"0": "bad", "1": "good"}
    for split in saved(out).values():
        for row in split:
            assert row["labels"] == (1 if row["text"].endswith("great") else 0)


def test_labels_given_in_the_recipe_set_the_id_order(tmp_path: Path, classifier: Model) -> None:
    data = Data(source=FileSource(path=str(REVIEWS)), labels=["positive", "negative"], select=100)
    out, _ = run_data(tmp_path, classifier, data)

    assert json.loads((out / "labels.json").read_text())["label2id"] == {"positive": 0, "negative": 1}
    truth = reviews_by_text()
    assert all(truth[row["text"]] == ("positive", "negative")[row["labels"]] for row in saved(out)["train"])


def test_sources_mix_by_weight_without_repeating_rows(tmp_path: Path, classifier: Model) -> None:
    inline = {"text": [f"inline row {i}" for i in range(100)], "label": ["positive", "negative"] * 50}
    data = Data(sources=[FileSource(path=str(REVIEWS), weight=3), InlineSource(rows=inline, weight=1)])
    out, metrics = run_data(tmp_path, classifier, data)

    # 100 inline rows are a quarter of the mix, so the file gives 300 of its 1,200: 400 rows, each used once.
    texts = [text for split in saved(out).values() for text in split["text"]]
    assert metrics["rows"] == len(texts) == len(set(texts)) == 400
    assert sum(text.startswith("inline row") for text in texts) == 100


def write_rows(path: Path, rows: dict[str, list[Any]]) -> None:
    """Small files in each format the step reads, written with the standard library or pyarrow."""
    records = [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:  # .tsv, or a csv under another name
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows), delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(records)


@pytest.mark.parametrize(("name", "fmt"), [("rows.parquet", None), ("rows.jsonl", None), ("rows.tsv", None), ("rows.dat", "csv")])
def test_file_formats_are_read_by_extension_or_format(tmp_path: Path, classifier: Model, name: str, fmt: str | None) -> None:
    rows = {"text": [f"the plot was {w}, really" for w in ("fun", "dull") * 10], "label": ["positive", "negative"] * 10}
    write_rows(tmp_path / name, rows)
    out, metrics = run_data(tmp_path, classifier, Data(source=FileSource(path=str(tmp_path / name), format=fmt)))

    assert metrics["rows"] == 20
    assert {text for split in saved(out).values() for text in split["text"]} == set(rows["text"])


def test_text_files_feed_a_causal_lm(tmp_path: Path, llama: Model) -> None:
    (tmp_path / "lines.txt").write_text("".join(f"line {i} of the story\n" for i in range(20)))
    out, _ = run_data(tmp_path, llama, Data(source=FileSource(path=str(tmp_path / "lines.txt")), template="{text}"))
    texts = {text for split in saved(out).values() for text in split["text"]}
    assert texts == {f"line {i} of the story</s>" for i in range(20)}  # one row per line, eos appended


# --- causal LM ----------------------------------------------------------------------------------------------------------


def test_template_fills_jsonl_rows_and_appends_eos(tmp_path: Path, llama: Model) -> None:
    out, _ = run_data(tmp_path, llama, Data(source=FileSource(path=str(INSTRUCTIONS)), template=ALPACA))

    expected = {ALPACA.format_map(json.loads(line)) + "</s>" for line in INSTRUCTIONS.read_text().splitlines()}
    tokenizer = load_tokenizer(llama.model_dump(mode="json"), {})
    splits = saved(out)
    assert {text for split in splits.values() for text in split["text"]} == expected
    for row in splits["train"]:
        assert row["labels"] == row["input_ids"]  # no masking: every token is learned
        assert row["input_ids"][0] == tokenizer.bos_token_id and row["input_ids"][-1] == tokenizer.eos_token_id
        assert set(row["attention_mask"]) == {1}  # unpadded: the collator pads


def test_mask_prompt_learns_exactly_the_answer_and_eos(tmp_path: Path, llama: Model) -> None:
    data = Data(source=FileSource(path=str(INSTRUCTIONS)), template=ALPACA, response_template="{output}", mask_prompt=True)
    out, _ = run_data(tmp_path, llama, data)

    tokenizer = load_tokenizer(llama.model_dump(mode="json"), {})
    for split in saved(out).values():
        for row in split:
            ids, labels = row["input_ids"], row["labels"]
            prompt, answer = row["text"].split("### Response:\n")
            boundary = len(tokenizer(prompt + "### Response:\n")["input_ids"])  # the prompt ends on "\n" here
            assert labels[:boundary] == [-100] * boundary
            assert labels[boundary:] == ids[boundary:]
            assert tokenizer.decode(ids[boundary:]) == answer  # the answer and "</s>", nothing of the prompt


def test_mask_prompt_learns_a_token_that_straddles_the_boundary(tmp_path: Path, llama: Model) -> None:
    # Byte-level BPE makes " great" one token, which starts in the prompt's trailing space. Tokenizing the prompt alone
    # ends on a " " token and would put the boundary after " great"; the step must learn " great" and mask the rest.
    rows = {"q": ["how was the film?"] * 20, "a": ["great"] * 20}
    data = Data(source=InlineSource(rows=rows), template="Q: {q} A: {a}", response_template="{a}", mask_prompt=True)
    out, _ = run_data(tmp_path, llama, data)

    tokenizer = load_tokenizer(llama.model_dump(mode="json"), {})
    row = saved(out)["train"][0]
    ids, labels = row["input_ids"], row["labels"]
    assert [tokenizer.decode([token]) for token in ids[-2:]] == [" great", "</s>"]
    assert labels == [-100] * (len(ids) - 2) + ids[-2:]
    assert len(tokenizer("Q: how was the film? A: ")["input_ids"]) == len(ids) - 1  # the naive boundary, one too late


# --- stats and warnings -------------------------------------------------------------------------------------------------


def test_truncation_is_measured_and_warned(tmp_path: Path, classifier: Model, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="runner.stages.data"):
        out, metrics = run_data(tmp_path, classifier, Data(source=FileSource(path=str(REVIEWS)), max_length=16))

    stats = json.loads((out / "stats.json").read_text())
    lengths = stats["token_length"]
    assert lengths["p50"] <= lengths["p90"] <= lengths["p99"] <= lengths["max"] and lengths["max"] > 16
    assert stats["truncated_share"] == metrics["truncated_share"] > 0.2
    assert stats["truncated_rows"] == round(stats["truncated_share"] * 4000)
    assert any("heavy truncation" in warning for warning in stats["warnings"])
    assert any("heavy truncation" in record.message for record in caplog.records)
    tokenizer = load_tokenizer(classifier.model_dump(mode="json"), {})
    for row in saved(out)["train"]:
        assert len(row["input_ids"]) <= 16
        assert row["input_ids"][-1] == tokenizer.sep_token_id  # truncated the tokenizer's way: [SEP] stays last


def test_balanced_untruncated_data_has_no_warnings(tmp_path: Path, classifier: Model) -> None:
    out, metrics = run_data(tmp_path, classifier, Data(source=FileSource(path=str(REVIEWS)), max_length=512))

    stats = json.loads((out / "stats.json").read_text())
    assert stats["truncated_share"] == 0 and stats["majority_share"] == 0.5
    assert stats["warnings"] == [] and metrics["warnings"] == 0


def test_strong_imbalance_is_warned(tmp_path: Path, classifier: Model) -> None:
    rows = {"text": [f"row {i}" for i in range(100)], "label": ["spam"] * 90 + ["ham"] * 10}
    out, _ = run_data(tmp_path, classifier, Data(source=InlineSource(rows=rows)))

    stats = json.loads((out / "stats.json").read_text())
    assert stats["majority_share"] == 0.9
    assert any("imbalance" in warning and "'spam'" in warning for warning in stats["warnings"])


# --- determinism --------------------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_order(tmp_path: Path, classifier: Model) -> None:
    data = Data(source=FileSource(path=str(REVIEWS)), select=300)
    first, _ = run_data(tmp_path, classifier, data, seed=1, name="first")
    again, _ = run_data(tmp_path, classifier, data, seed=1, name="again")
    other, _ = run_data(tmp_path, classifier, data, seed=2, name="other")

    assert file_hashes(first) == file_hashes(again)  # arrow files, state.json fingerprints, stats: all identical
    assert saved(first)["train"]["text"] != saved(other)["train"]["text"]


# --- errors a recipe author can fix -------------------------------------------------------------------------------------


ERRORS = [
    (
        "classifier",
        Data(source=FileSource(path=str(REVIEWS)), text_column="body"),
        "'body' not found; available columns: text, label",
    ),
    (
        "classifier",
        Data(source=FileSource(path=str(REVIEWS)), columns={"review": "text"}),
        "renames 'review', which no source has; available columns: label, text",
    ),
    (
        "classifier",
        Data(source=FileSource(path=str(REVIEWS)), labels=["negative", "neutral"]),
        "label 'positive' is in the data but not in data.labels",
    ),
    (
        "classifier",
        Data(source=InlineSource(rows={"text": ["a", "b", "c"], "label": [0, 1, 2]}), labels=["no", "yes"]),
        "label 2 is not an id of data.labels",
    ),
    ("classifier", Data(source=InlineSource(rows={"text": ["a", "b"], "label": ["x", "x"]})), "only one label ('x')"),
    (
        "llama",
        Data(source=FileSource(path=str(INSTRUCTIONS)), template="Q: {question}\nA: {output}"),
        "template field 'question' not found; available columns: instruction, output",
    ),
    (
        "llama",
        Data(source=FileSource(path=str(INSTRUCTIONS)), template="Q: {}\nA: {output}"),
        "template fields must name a column",
    ),
    (
        "classifier",
        Data(source=FileSource(path=str(REPO / "recipes" / "data" / "README.md"))),
        "set `format:` to csv, json, parquet or text",
    ),
    (
        "classifier",
        Data(source=InlineSource(rows={"text": ["a", "b", "c"], "label": ["x", "y", "y"]}), test_size=0.5),
        "cannot split 3 rows with test_size=0.5 stratified by label",
    ),
]


@pytest.mark.parametrize(("model", "data", "message"), ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_fixable_problems_raise_clear_stage_errors(
    tmp_path: Path, request: pytest.FixtureRequest, model: str, data: Data, message: str
) -> None:
    with pytest.raises(StageError) as caught:
        run_data(tmp_path, request.getfixturevalue(model), data)
    assert message in str(caught.value)


def test_unreachable_hub_dataset_names_id_and_revision(tmp_path: Path, classifier: Model) -> None:
    data = Data(source=HubSource(hub="nobody/no-such-dataset", revision="0123abc"))
    with pytest.raises(StageError, match=r"nobody/no-such-dataset .*revision 0123abc"):
        run_data(tmp_path, classifier, data)
