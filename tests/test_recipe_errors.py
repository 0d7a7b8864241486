"""Every mistake in a recipe is reported as FILE:LINE:COL: field.path: message, all at once, exit code 2, no traceback."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from runner.cli import main
from runner.recipe import RecipeError, load_recipe

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
  method: lora
  lora: {r: 8, target_modules: [q_lin, v_lin]}
  learning_rate: 0.001
export: {format: onnx}
quantize: {method: onnx-dynamic-int8}
serve:
  probes:
    - {text: great, expect_label: positive}
"""


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    (tmp_path / "reviews.csv").write_text("text,label\ngood,positive\nbad,negative\n")
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, overrides)
    return [str(p).replace(str(path), "r.yaml") for p in caught.value.problems]


def edit(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new)


def test_the_good_recipe_loads(tmp_path):
    loaded = load_recipe(write(tmp_path, GOOD))
    assert loaded.recipe.train.lora.r == 8
    assert loaded.recipe.data.source.path == str((tmp_path / "reviews.csv").resolve())


# (recipe text, the exact start of the expected message: file:line:col: field.path: message)
BROKEN = [
    # unknown keys, with did-you-mean
    (edit("  learning_rate: 0.001", "  learning_rat: 0.001"),
     "r.yaml:12:3: train.learning_rat: unknown field 'learning_rat'; did you mean 'learning_rate'?"),
    (edit("seed: 1", "sed: 1"), "r.yaml:2:1: sed: unknown field 'sed'; did you mean 'seed'?"),
    (edit("  max_length: 64", "  max_lenght: 64"), "r.yaml:8:3: data.max_lenght: unknown field 'max_lenght'; did you mean 'max_length'?"),
    (edit("{r: 8,", "{rank: 8,"), "r.yaml:11:10: train.lora.rank: unknown field 'rank'"),
    (edit("{format: onnx}", "{format: onnx, opsett: 17}"), "r.yaml:13:24: export.opsett: unknown field 'opsett'; did you mean 'opset'?"),
    (edit("{method: onnx-dynamic-int8}", "{method: onnx-dynamic-int8, max_drop: 0.1}"),
     "r.yaml:14:39: quantize.max_drop: unknown field 'max_drop'"),
    (edit("    - {text: great, expect_label: positive}", "    - {text: great, expected_label: positive}"),
     "r.yaml:17:21: serve.probes.0.expected_label: unknown field 'expected_label'; did you mean 'expect_label'?"),
    (edit("  task: sequence-classification", "  task: sequence-classification\n  trust_remote: true"),
     "r.yaml:6:3: model.trust_remote: unknown field 'trust_remote'; did you mean 'trust_remote_code'?"),
    (edit("{path: reviews.csv}", "{path: reviews.csv, delimiter: ';'}"), "r.yaml:7:31: data.source.delimiter: unknown field 'delimiter'"),
    (edit("  init: {architecture: distilbert}", "  init: {architecture: distilbert, layers: 2}"),
     "r.yaml:4:36: model.init.layers: unknown field 'layers'; did you mean 'num_layers'?"),
    # wrong types and values
    (edit("seed: 1", "seed: one"), "r.yaml:2:1: seed: Input should be a valid integer"),
    (edit("  max_length: 64", "  max_length: -3"), "r.yaml:8:3: data.max_length: Input should be greater than 0"),
    (edit("{r: 8,", "{r: 0,"), "r.yaml:11:10: train.lora.r: Input should be greater than 0"),
    (edit("  learning_rate: 0.001", "  learning_rate: fast"), "r.yaml:12:3: train.learning_rate: Input should be a valid number"),
    (edit("{format: onnx}", "{format: tflite}"), "r.yaml:13:10: export.format: Input should be 'onnx' or 'safetensors'"),
    (edit("name: demo", "name: 'bad name!'"), "r.yaml:1:1: name: String should match pattern"),
    (edit("  max_length: 64", "  max_length: 64\n  test_size: 1.5"), "r.yaml:9:3: data.test_size: Input should be less than 1"),
    (edit("  task: sequence-classification", "  task: translation"), "r.yaml:5:3: model.task: Input should be 'sequence-classification' or 'causal-lm'"),
    (edit("seed: 1", "seed: 1\nenv: cuda11"), "r.yaml:3:1: env: Input should be 'cpu' or 'cuda13'"),
    (edit("  method: lora", "  method: prefix"), "r.yaml:9:1: train: Input tag 'prefix' found using 'method' does not match"),
    (edit("{method: onnx-dynamic-int8}", "{method: gptq}"), "r.yaml:14:1: quantize: Input tag 'gptq' found using 'method' does not match"),
    (edit("  source: {path: reviews.csv}", "  source: {url: x}"), "r.yaml:7:3: data.source: a data source needs one of `hub`, `path` or `rows`"),
    (edit("serve:\n  probes:\n    - {text: great, expect_label: positive}\n", "serve:\n  probes: great\n"),
     "r.yaml:16:3: serve.probes: Input should be a valid list"),
    # missing fields
    (edit("  task: sequence-classification\n", ""), "r.yaml:3:1: model.task: required field is missing"),
    (edit("name: demo\n", ""), "r.yaml:1:1: name: required field is missing"),
    (edit("  lora: {r: 8, target_modules: [q_lin, v_lin]}\n", ""), "r.yaml:9:1: train.lora: required field is missing"),
    # cross-field rules
    (edit("  lora: {r: 8, target_modules: [q_lin, v_lin]}", "  lora: {r: 8, target_modules: []}"),
     "r.yaml:11:16: train.lora.target_modules: `target_modules` must name at least one module"),
    (edit("  method: lora", "  method: qlora"), "r.yaml:9:1: train.quantization: required field is missing"),
    (edit("export: {format: onnx}\n", ""), "r.yaml:13:12: quantize.method: an ONNX quantize needs an `export` section with `format: onnx`"),
    (edit("  init: {architecture: distilbert}", "  init: {architecture: distilbert}\n  hub: org/model"),
     "r.yaml:5:3: model.hub: give exactly one of hub, path, package, init, recipe (got init, hub)"),
    (edit("  init: {architecture: distilbert}", "  hub: org/model"), "r.yaml:4:3: model.hub: a hub model needs a pinned `revision`"),
    (edit("  init: {architecture: distilbert}", "  init: {architecture: distilbert, hidden_size: 30, num_heads: 4}"),
     "r.yaml:4:53: model.init.num_heads: num_heads (4) must divide hidden_size (30)"),
    (edit("    - {text: great, expect_label: positive}", "    - {prompt: hi}"),
     "r.yaml:17:8: serve.probes.0.prompt: a sequence-classification model is probed with `text` probes"),
    (edit("    - {text: great, expect_label: positive}", "    - {text: great, prompt: hi}"),
     "r.yaml:17:7: serve.probes.0: a probe has exactly one of `text` (classifier) or `prompt` (generator)"),
    (edit("  max_length: 64", "  max_length: 64\n  mask_prompt: true"), "r.yaml:9:3: data.mask_prompt: `mask_prompt` needs `response_template`"),
    (edit("{format: onnx}", "{format: onnx, optimization_level: 99}"),
     "r.yaml:13:24: export.optimization_level: ONNX Runtime cannot quantize a fused graph"),
    # missing local files
    (edit("{path: reviews.csv}", "{path: nothere.csv}"), "r.yaml:7:12: data.source.path: no such file or folder:"),
    (edit("  init: {architecture: distilbert}", "  path: ./no-model"), "r.yaml:4:3: model.path: no such file or folder:"),
    # YAML itself
    (edit("  max_length: 64", "  max_length: [64"), "r.yaml:9:6: (recipe): YAML: while parsing a flow sequence"),
    (edit("seed: 1", "seed: 1\nseed: 2"), "r.yaml:3:1: seed: key given twice in the same mapping"),
    (edit("seed: 1", "seed: !!python/object/apply:os.system [echo hi]"),
     "r.yaml:2:7: (recipe): YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("- just\n- a list\n", "r.yaml:1:1: (recipe): a recipe is a mapping of sections"),
    ("\n", "r.yaml:1:1: (recipe): the recipe file is empty"),
    ("name: x\n\tbad: tab\n", "r.yaml:2:1: (recipe): YAML:"),
]


@pytest.mark.parametrize("text,expected", BROKEN, ids=[e.split(": ")[1] + f"-{i}" for i, (_, e) in enumerate(BROKEN)])
def test_broken_recipe_is_pointed_at_its_line(tmp_path, text, expected):
    found = problems(tmp_path, text)
    assert any(p.startswith(expected) for p in found), f"expected {expected!r} in {found}"


def test_there_are_at_least_thirty_broken_recipes():
    assert len(BROKEN) >= 30


def test_all_problems_are_reported_at_once(tmp_path):
    text = edit("  learning_rate: 0.001", "  learning_rat: 0.001")
    text = text.replace("  max_length: 64", "  max_length: -1").replace("{path: reviews.csv}", "{path: gone.csv}")
    found = problems(tmp_path, text)
    assert [p.split(": ")[1] for p in found] == ["data.source.path", "data.max_length", "train.learning_rat"]


# --- overrides --------------------------------------------------------------------------------------------------------


def test_null_override_removes_a_key_so_a_method_can_change(tmp_path):
    loaded = load_recipe(write(tmp_path, GOOD), ["train.method=full", "train.lora=null"])
    assert loaded.recipe.train.method == "full"


def test_override_sets_a_yaml_typed_value(tmp_path):
    loaded = load_recipe(write(tmp_path, GOOD), ["train.epochs=1", "train.lora.target_modules=[q_lin]", "seed=3"])
    assert loaded.recipe.train.epochs == 1 and loaded.recipe.seed == 3
    assert loaded.recipe.train.lora.target_modules == ["q_lin"]


@pytest.mark.parametrize("override,expected", [
    ("train.learning_rat=1", "override 'train.learning_rat=1': train.learning_rat: unknown field 'learning_rat' in train; did you mean 'learning_rate'?"),
    ("trian.epochs=1", "override 'trian.epochs=1': trian.epochs: unknown field 'trian' in the recipe; did you mean 'train'?"),
    ("train.epochs=abc", "override 'train.epochs=abc': train.epochs: Input should be a valid number"),
    ("train.epochs", "override 'train.epochs': (recipe): an override looks like `section.field=value`"),
    ("data.source.path=missing.csv", "override 'data.source.path=missing.csv': data.source.path: no such file or folder"),
    ("serve.probes.5.text=x", "override 'serve.probes.5.text=x': serve.probes.5: list index out of range"),
])
def test_bad_override_is_named(tmp_path, override, expected):
    found = problems(tmp_path, GOOD, (override,))
    assert any(p.startswith(expected) for p in found), found


# --- extends ----------------------------------------------------------------------------------------------------------


def test_extends_deep_merges_and_resolves_paths_against_the_base(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "reviews.csv").write_text("text,label\na,x\nb,y\n")
    write(tmp_path / "base", GOOD, "base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base/base.yaml\nname: child\ntrain:\n  method: lora\n  lora: {r: 4, target_modules: [q_lin]}\n")
    loaded = load_recipe(child)
    assert loaded.recipe.name == "child" and loaded.recipe.train.lora.r == 4
    assert loaded.recipe.train.learning_rate == 0.001  # kept from the base
    assert loaded.recipe.data.source.path == str((tmp_path / "base" / "reviews.csv").resolve())
    assert loaded.files == [child, (tmp_path / "base" / "base.yaml").resolve()]


def test_error_inside_the_base_file_names_the_base(tmp_path):
    write(tmp_path, edit("  max_length: 64", "  max_length: -1"), "base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nname: child\nseed: x\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(child)
    lines = [str(p) for p in caught.value.problems]
    assert any("base.yaml:8:3: data.max_length: Input should be greater than 0" in line for line in lines), lines
    assert any("child.yaml:3:1: seed:" in line for line in lines), lines


def test_extends_cycle_and_missing_base(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    with pytest.raises(RecipeError, match="extends itself in a cycle"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("name: c\nextends: nope.yaml\n")
    with pytest.raises(RecipeError, match=r"c.yaml:2:1: extends: base recipe not found"):
        load_recipe(tmp_path / "c.yaml")


# --- the CLI: exit 2, no traceback ------------------------------------------------------------------------------------


def test_cli_prints_every_problem_and_exits_2(tmp_path, capsys):
    path = write(tmp_path, edit("  learning_rate: 0.001", "  learning_rat: 0.001"))
    assert main(["validate", str(path), "seed=x"]) == 2
    printed = capsys.readouterr().err
    assert "train.learning_rat: unknown field 'learning_rat'; did you mean 'learning_rate'?" in printed
    assert "override 'seed=x': seed:" in printed
    assert "Traceback" not in printed and "2 problems" in printed


def test_cli_unknown_recipe_name_suggests(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "recipes" if (tmp_path / "recipes").mkdir() is None else tmp_path, GOOD, "quickstart.yaml")
    assert main(["validate", "quikstart"]) == 2
    assert "did you mean 'quickstart'?" in capsys.readouterr().err


def test_valid_recipe_validates(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, GOOD))]) == 0
    assert "model -> data -> train -> export -> quantize -> serve" in capsys.readouterr().out


LM = """\
name: lm
model:
  path: ./lm
  task: causal-lm
data:
  source: {path: reviews.csv}
  template: "{text}"
train:
  method: lora
  lora: {r: 8, target_modules: [q_proj]}
export: {format: onnx}
"""


def lm_folder(tmp_path: Path, architecture: str, model_type: str = "x") -> None:
    import json

    (tmp_path / "lm").mkdir(exist_ok=True)
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": model_type}))
    (tmp_path / "lm" / "model.safetensors").write_bytes(b"")  # the local checks look for weights, never load them


def test_a_causal_lm_export_of_an_architecture_the_builder_lacks_is_refused_before_anything_runs(tmp_path):
    lm_folder(tmp_path, "GPTNeoXForCausalLM", "gpt_neox")
    found = problems(tmp_path, LM)
    assert any(p.startswith("r.yaml:11:10: export.format: the causal-LM ONNX exporter (onnxruntime-genai's model builder) "
                            "does not support the architecture GPTNeoXForCausalLM; it supports ") and "LlamaForCausalLM" in p
               for p in found), found


def test_a_causal_lm_recipe_on_an_encoder_is_refused_at_its_task_line(tmp_path):
    lm_folder(tmp_path, "BertModel", "bert")
    found = problems(tmp_path, LM)
    assert any(p.startswith("r.yaml:4:3: model.task: task causal-lm needs a model with a causal language-model head")
               for p in found), found


def test_a_supported_decoder_passes_the_local_checks(tmp_path):
    lm_folder(tmp_path, "LlamaForCausalLM", "llama")
    assert load_recipe(write(tmp_path, LM)).recipe.export.format == "onnx"


@pytest.mark.parametrize(("quantize", "expected"), [
    ("{method: onnx-dynamic-int8}", "onnx-dynamic-int8 quantizes activations, which ruins a causal LM"),
    ("{method: onnx-static-int8}", "onnx-static-int8 quantizes activations"),
])
def test_activation_int8_on_a_causal_lm_points_to_weight_only(tmp_path, quantize, expected):
    lm_folder(tmp_path, "LlamaForCausalLM", "llama")
    found = problems(tmp_path, LM + f"quantize: {quantize}\n")
    assert any(expected in p and "onnx-weight-only" in p for p in found), found


def test_fp16_needs_the_cuda_provider(tmp_path):
    lm_folder(tmp_path, "LlamaForCausalLM", "llama")
    found = problems(tmp_path, LM.replace("export: {format: onnx}", "export: {format: onnx, precision: fp16}"))
    assert any("`export.precision: fp16` builds a decoder for the CUDA provider" in p for p in found), found


def test_a_head_size_the_onnx_decoder_cannot_run_is_refused_before_anything_runs(tmp_path):
    import json

    (tmp_path / "lm").mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 48, "num_attention_heads": 2}
    (tmp_path / "lm" / "config.json").write_text(json.dumps(config))
    (tmp_path / "lm" / "model.safetensors").write_bytes(b"")
    found = problems(tmp_path, LM)
    assert any("export.format: the ONNX decoder's attention needs a head size that is a multiple of 16, and this "
               "model's is 24" in p for p in found), found


def test_an_uncached_hub_model_is_a_warning_at_validate_and_checked_online_before_any_step(tmp_path, monkeypatch, capsys):
    """Offline, `recipe validate` cannot see a hub model's config and warns; `recipe run` fetches config.json first and
    refuses an unsupported architecture before the data step runs."""
    import json

    from runner import hub

    text = LM.replace("  path: ./lm\n", "  hub: org/neox\n  revision: " + "a" * 40 + "\n")
    path = write(tmp_path, text)
    monkeypatch.chdir(tmp_path)
    assert main(["validate", str(path)]) == 0
    assert "cannot check the model's architecture offline: org/neox@" in capsys.readouterr().err
    fetched = tmp_path / "fetched-config.json"
    fetched.write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}))
    monkeypatch.setattr(hub, "fetch_config", lambda repo, revision: fetched)
    assert main(["run", str(path), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "does not support the architecture GPTNeoXForCausalLM" in err and not (tmp_path / "cache" / "entries").exists()
