"""`recipe lock` and `recipe verify`: artifacts re-read from disk, run records listed but not compared, the platform in
the lock, lock problems as one line (exit 2), and the same bytes from two "machines" (two folders, two caches).

The first tests use the fast test-only stages (tests/fake_stages.py, through the `project` fixture); the two-machine
tests run the real stages on tiny config-built models.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

import runner.stages
from runner.cli import main
from tests.conftest import sentiment_rows


def entry_file(project: Path, kind: str, name: str = "result.txt", cache: str = ".recipe-cache") -> Path:
    return next((project / cache / "entries" / kind).glob(f"*/outputs/{name}"))


def lock_of(folder: Path, name: str = "core") -> dict:
    return json.loads((folder / f"{name}.lock").read_text())


def test_verify_rereads_every_artifact_a_flipped_byte_under_intact_size_and_mtime_is_found(project, capsys):
    assert main(["run", "core.yaml"]) == 0
    assert main(["lock", "core.yaml"]) == 0
    assert main(["verify", "core.yaml"]) == 0
    result = entry_file(project, "data")
    stat = result.stat()
    data = bytearray(result.read_bytes())
    data[0] ^= 0x01  # one bit, same size
    result.write_bytes(bytes(data))
    os.utime(result, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the mtime the manifest and the memo saw
    capsys.readouterr()
    assert main(["verify", "core.yaml"]) == 1
    printed = capsys.readouterr().out
    assert "differs data/result.txt: sha256" in printed and "1 unexpected difference" in printed


def test_run_records_are_marked_in_manifest_and_lock_and_never_compared(project, monkeypatch, capsys):
    train = runner.stages.STAGES["train"]
    monkeypatch.setitem(runner.stages.STAGES, "train", dataclasses.replace(train, records=("part1.txt",)))
    assert main(["run", "core.yaml"]) == 0
    manifest = json.loads(next((project / ".recipe-cache/entries/train").glob("*/manifest.json")).read_text())
    assert manifest["outputs"]["part1.txt"]["role"] == "record"
    assert manifest["outputs"]["result.txt"]["role"] == "artifact"
    assert manifest["platform"].keys() == {"system", "machine", "cpu_isa", "gpus"}
    assert main(["lock", "core.yaml"]) == 0
    locked = lock_of(project)["steps"]["train"]
    assert locked["records"] == ["part1.txt"] and set(locked["artifacts"]) == {"result.txt"}
    entry_file(project, "train", "part1.txt").write_text("another machine, another timing\n")
    capsys.readouterr()
    assert main(["verify", "core.yaml"]) == 0
    assert "run records not compared: train 1" in capsys.readouterr().out


def pretend_cpu(monkeypatch, family: str) -> None:
    monkeypatch.setattr("runner.hardware.platform_facts.cpu_isa", lambda: (family, "pretended by the test"))


def test_verify_on_another_platform_tells_expected_differences_from_unexpected_ones(project, monkeypatch, capsys):
    pretend_cpu(monkeypatch, "avx512_vnni")  # machine A
    assert main(["run", "core.yaml", "--cache-dir", "cache-a"]) == 0
    assert main(["lock", "core.yaml", "--cache-dir", "cache-a"]) == 0
    lock = lock_of(project)
    assert lock["lock_version"] == 2 and lock["platform"]["cpu_isa"] == "avx512_vnni"
    assert lock["steps"]["train"]["platform"]["cpu_isa"] == "avx512_vnni"

    pretend_cpu(monkeypatch, "avx2")  # machine B, its own cache: a key holding cpu_isa differs, nothing else
    assert main(["run", "core.yaml", "--locked", "--cache-dir", "cache-b"]) == 0
    capsys.readouterr()
    assert main(["verify", "core.yaml", "--cache-dir", "cache-b"]) == 0
    captured = capsys.readouterr()
    assert "cpu_isa: avx512_vnni -> avx2" in captured.out and "0 unexpected" in captured.out

    # A's train wrote other bytes than B's: a step whose floats follow the CPU, so expected, with the reason
    lock["steps"]["train"]["artifacts"]["result.txt"] = "1" * 64
    (project / "core.lock").write_text(json.dumps(lock))
    assert main(["verify", "core.yaml", "--cache-dir", "cache-b"]) == 0
    captured = capsys.readouterr()
    assert "expected train differs on this platform: cpu_isa: avx512_vnni -> avx2" in captured.out
    assert "float kernels" in captured.out and "    train/result.txt: sha256" in captured.out
    assert "1 explained by the platform" in captured.out and "verify passes" in captured.err

    # data is integer work: a difference there is never the platform's
    lock["steps"]["data"]["artifacts"]["result.txt"] = "2" * 64
    (project / "core.lock").write_text(json.dumps(lock))
    assert main(["verify", "core.yaml", "--cache-dir", "cache-b"]) == 1
    captured = capsys.readouterr()
    assert "differs data/result.txt: sha256" in captured.out
    # downstream of an unexpected difference: not excused, and pointed at its likely cause
    assert "differs train/result.txt" in captured.out and "(its inputs from data differ too)" in captured.out

    # and on the lock's own platform nothing is excused
    pretend_cpu(monkeypatch, "avx512_vnni")
    del lock["steps"]["data"]["artifacts"]["result.txt"]
    (project / "core.lock").write_text(json.dumps(lock))
    assert main(["verify", "core.yaml", "--cache-dir", "cache-a"]) == 1
    captured = capsys.readouterr().out
    assert "differs train/result.txt" in captured and "data/result.txt: produced here, not in the lock" in captured


def _break_missing_key(lock: dict) -> str:
    del lock["steps"]["train"]["key"]
    return json.dumps(lock)


BROKEN_LOCKS = {
    "not JSON": (lambda lock: json.dumps(lock)[:-20], "not valid JSON"),
    "old lock_version": (lambda lock: json.dumps({**lock, "lock_version": 1}), "lock_version 1 is from an older runner"),
    "no lock_version": (lambda lock: json.dumps({k: v for k, v in lock.items() if k != "lock_version"}), "no lock_version"),
    "missing key": (_break_missing_key, "steps.train.key: field required"),
    "not an object": (lambda lock: "[1, 2]", "a lock is a JSON object"),
    "a stray field": (lambda lock: json.dumps({**lock, "extra": 1}), "extra: extra inputs are not permitted"),
}


@pytest.mark.parametrize("case", list(BROKEN_LOCKS))
def test_a_broken_lock_is_one_line_naming_the_file_and_the_remedy_exit_2(project, capsys, case):
    assert main(["run", "core.yaml"]) == 0
    assert main(["lock", "core.yaml"]) == 0
    damage, expected = BROKEN_LOCKS[case]
    (project / "core.lock").write_text(damage(lock_of(project)))
    for command in (["verify", "core.yaml"], ["run", "core.yaml", "--locked"]):
        capsys.readouterr()
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "Traceback" not in err
        line = next(line for line in err.splitlines() if "core.lock" in line)
        assert line.startswith("core.lock") and expected in line and "run `recipe lock core.yaml`" in line, line


# --- two machines, real stages ------------------------------------------------------------------------------------------

CLASSIFIER = """\
name: tiny
seed: 3
model:
  init: {architecture: distilbert, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, vocab_size: 200,
         max_position_embeddings: 64}
  task: sequence-classification
data:
  source: {path: reviews.csv}
  max_length: 32
  test_size: 0.25
train: {method: full, max_steps: 4, batch_size: 8}
export: {format: onnx, validation_samples: 16}
quantize: {method: onnx-dynamic-int8, eval_samples: 16, max_metric_drop: 1.0}
"""

LORA = """\
name: tiny
seed: 3
model:
  init: {architecture: llama, hidden_size: 64, num_layers: 1, num_heads: 2, intermediate_size: 128, vocab_size: 200,
         max_position_embeddings: 64}
  task: causal-lm
data:
  source: {path: reviews.csv}
  template: "{text} => {label}"
  max_length: 32
  test_size: 0.25
train:
  method: lora
  lora: {r: 4, alpha: 8, target_modules: all-linear}
  max_steps: 3
  batch_size: 8
"""


def machine(root: Path, recipe: str) -> Path:
    """A project folder with the recipe and its data, as someone else's checkout would have it."""
    root.mkdir(parents=True)
    (root / "tiny.yaml").write_text(recipe)
    texts, labels = sentiment_rows(80)
    with open(root / "reviews.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels, strict=True))
    return root


@pytest.mark.parametrize(("recipe", "steps"), [
    (CLASSIFIER, {"model", "data", "train", "export", "quantize"}),
    (LORA, {"model", "data", "train"}),
], ids=["classifier-export-quantize", "lora-adapter"])
def test_two_machines_produce_the_same_artifacts_and_verify_each_others_lock(tmp_path, monkeypatch, capsys, recipe,
                                                                             steps):
    monkeypatch.delenv("RECIPE_CACHE", raising=False)
    a = machine(tmp_path / "a", recipe)
    b = machine(tmp_path / "elsewhere" / "a much longer path" / "b", recipe)
    for folder in (a, b):
        monkeypatch.chdir(folder)
        assert main(["run", "tiny.yaml", "--cache-dir", "cache"]) == 0
        assert main(["lock", "tiny.yaml", "--cache-dir", "cache"]) == 0
    lock_a, lock_b = lock_of(a, "tiny"), lock_of(b, "tiny")
    assert set(lock_a["steps"]) == steps
    for kind in steps:
        assert lock_a["steps"][kind]["key"] == lock_b["steps"][kind]["key"]
        assert lock_a["steps"][kind]["artifacts"] == lock_b["steps"][kind]["artifacts"], kind
    artifacts = {f"{kind}/{rel}" for kind, step in lock_a["steps"].items() for rel in step["artifacts"]}
    weights = "train/model/model.safetensors" if "export" in steps else "train/adapter/adapter_model.safetensors"
    assert {"data/dataset/train/data-00000-of-00001.arrow", weights} <= artifacts
    if "export" in steps:
        assert {"data/labels.json", "export/onnx/model.onnx", "quantize/onnx/model.onnx"} <= artifacts
    else:
        assert "train/adapter/adapter_config.json" in artifacts  # no cache path in it, modules in a fixed order
    assert {"metrics.json", "trainer_state.json", "loss.png"} <= set(lock_a["steps"]["train"]["records"])
    assert any(rel.startswith("tensorboard/") for rel in lock_a["steps"]["train"]["records"])

    shutil.copy(a / "tiny.lock", b / "tiny.lock")  # A's lock, shared with the recipe
    monkeypatch.chdir(b)
    capsys.readouterr()
    assert main(["verify", "tiny.yaml", "--cache-dir", "cache"]) == 0
    printed = capsys.readouterr().out
    assert "0 unexpected difference(s), 0 explained by the platform" in printed


def test_adapter_config_is_written_without_machine_paths_and_in_a_fixed_order(tmp_path):
    from runner.stages.train.results import portable_adapter_config

    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"base_model_name_or_path": "/home/me/.recipe-cache/entries/model/k/outputs/model",
                                "target_modules": ["v_proj", "down_proj", "q_proj"], "r": 4}))
    portable_adapter_config(path)
    config = json.loads(path.read_text())
    assert config == {"base_model_name_or_path": "model", "target_modules": ["down_proj", "q_proj", "v_proj"], "r": 4}
    path.write_text(json.dumps({"base_model_name_or_path": "org/model", "target_modules": "all-linear"}))
    portable_adapter_config(path)
    assert json.loads(path.read_text()) == {"base_model_name_or_path": "org/model", "target_modules": "all-linear"}


def test_the_lm_builder_does_not_stamp_the_enclosing_repository_commit(llama_export):
    """onnxruntime-genai's builder writes `git rev-parse HEAD` of the repository around site-packages (this project's,
    for a venv in the checkout) into producer_version: export bytes would change with every commit of the project."""
    import onnx
    import onnxruntime_genai as og

    out, _ = llama_export
    graph = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False)
    commit = getattr(og, "__commit__", None)
    assert graph.producer_version == (f"{og.__version__}+{commit[:7]}" if commit else og.__version__)
