"""The shipped offline recipes, end to end through the real `recipe` CLI and every real stage (the slow checks).

What a newcomer sees: the quickstart (the real MiniLM checkpoint on real reviews) learns, keeps its accuracy from
training through the served int8 model, a second run is fully cached, and the tiny Llama LoRA recipe serves /generate
probes. The quickstart runs here with reduced overrides (QUICK: 960 train rows, one epoch) to keep the suite fast; the
full-size figures come from `nox -s recipe -- quickstart` and go into the README.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from runner.cli import main

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A copy of recipes/ (recipes and shipped data) in a fresh folder, with its own cache and runs."""
    root = tmp_path_factory.mktemp("e2e")
    shutil.copytree(REPO / "recipes", root / "recipes", ignore=shutil.ignore_patterns("*.lock"))
    return root


def run_recipe(workdir: Path, monkeypatch, *args: str) -> dict:
    monkeypatch.chdir(workdir)
    assert main(["run", *args]) == 0
    return json.loads((workdir / "runs" / args[0] / "latest" / "run.json").read_text())


QUICK = ["data.select=1200", "train.epochs=1", "train.learning_rate=1e-4"]


def test_quickstart_reaches_its_accuracy_through_the_served_int8_model(workdir, monkeypatch):
    run = run_recipe(workdir, monkeypatch, "quickstart", *QUICK)
    steps = {s["kind"]: s for s in run["steps"]}
    assert [(s["kind"], s["status"]) for s in run["steps"]] == [
        (kind, "ran") for kind in ("data", "train", "export", "quantize", "evaluate", "serve")]
    outputs = {kind: Path(step["outputs"]) for kind, step in steps.items()}
    train = json.loads((outputs["train"] / "metrics.json").read_text())
    export = json.loads((outputs["export"] / "export_report.json").read_text())
    quantize = json.loads((outputs["quantize"] / "quantize_report.json").read_text())
    serve = json.loads((outputs["serve"] / "serve_report.json").read_text())
    # a pretrained encoder with a fresh head: chance before, well above it after 30 steps on 960 real reviews
    assert train["eval_accuracy_before"] < 0.6 and train["eval_accuracy"] >= 0.68
    assert export["validation"]["passed"] and export["validation"]["top1_agreement"] == 1.0
    assert abs(quantize["comparison"]["metric_candidate"] - train["eval_accuracy"]) <= 0.02
    assert serve["passed"] and serve["served_eval"]["accuracy"] == quantize["comparison"]["metric_candidate"]
    report = (workdir / "runs/quickstart/latest/report.md").read_text()
    assert "## Headline" in report and (workdir / "runs/quickstart/latest/report.html").is_file()
    # the forgetting table (base vs tuned probe accuracy on the general set) and the three pictures
    assert "| set | base probe accuracy | tuned probe accuracy | accuracy drop | budget | verdict |" in report
    assert len(serve["latency"]["samples_ms"]) == serve["latency"]["requests"]
    for picture in ("train-loss.png", "serve-latency.png", "evaluate-confusion_test.png"):
        assert f"]({picture})" in report and (workdir / "runs/quickstart/latest" / picture).is_file()
    assert re.search(r"^- \*\*int8 ONNX:\*\* 0\.\d{4} \(", report, re.M)  # the headline names every artifact's figure
    # the weights' provenance, checkable against the upstream file: all-MiniLM-L6-v2's model.safetensors
    assert "| base model package: model.safetensors sha256 | 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db |" in report


def test_quickstart_again_is_fully_cached(workdir, monkeypatch):
    run = run_recipe(workdir, monkeypatch, "quickstart", *QUICK)
    assert [s["status"] for s in run["steps"]] == ["cached"] * 6


def test_tiny_llama_lora_serves_generation_probes(workdir, monkeypatch):
    run = run_recipe(workdir, monkeypatch, "tiny_llama_lora", "train.epochs=3")  # the shipped 10 epochs: 28 s more
    steps = {s["kind"]: s for s in run["steps"]}
    train = json.loads((Path(steps["train"]["outputs"]) / "metrics.json").read_text())
    assert train["eval_loss"] < train["eval_loss_before"]
    export = json.loads((Path(steps["export"]["outputs"]) / "export_report.json").read_text())
    assert export["validation"]["passed"]
    serve = json.loads((Path(steps["serve"]["outputs"]) / "serve_report.json").read_text())
    assert serve["passed"] and all(probe["passed"] for probe in serve["probes"])
