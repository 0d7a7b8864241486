"""The smoke-serve stage end to end: a real uvicorn server in its own process, probed over loopback."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from runner.serving import ServerSettings, generate_offline, predict_offline
from runner.stages import StageError
from runner.stages import serve as serve_stage
from tests.conftest import export_artifact

FAST = {"latency_requests": 15, "concurrency": 4, "startup_timeout_s": 60}


@pytest.fixture(scope="module")
def classifier_outputs(tiny_classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An export step's output and a quantize step's output (dynamic int8 of the same graph), as the stages leave them.

    The random tiny model's head is scaled up 50x: its logits are then large enough for dynamic int8's batch
    dependence to show in the scores (about 2e-3 in a run beside other texts, 4e-5 unscaled), as in a trained model."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import AutoModelForSequenceClassification

    model_dir = tmp_path_factory.mktemp("sensitive-classifier")
    shutil.copytree(tiny_classifier_dir, model_dir, dirs_exist_ok=True)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir)
    with torch.no_grad():
        model.classifier.weight.mul_(50)
    model.save_pretrained(model_dir, safe_serialization=True)
    export = tmp_path_factory.mktemp("export")
    export_artifact(model_dir, export, "sequence-classification")
    quantize = tmp_path_factory.mktemp("quantize")
    shutil.copytree(export / "onnx", quantize / "onnx", ignore=shutil.ignore_patterns("model.onnx"))
    quantize_dynamic(export / "onnx" / "model.onnx", quantize / "onnx" / "model.onnx", weight_type=QuantType.QInt8)
    return {"export": export, "quantize": quantize}


@pytest.fixture(scope="module")
def llama_export(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    export = tmp_path_factory.mktemp("llama-export")
    export_artifact(tiny_llama_dir, export, "causal-lm")
    return export


def config(model_dir: Path, task: str, probes: list[dict[str, Any]], **serve: Any) -> dict[str, Any]:
    return {"model": {"path": str(model_dir), "task": task}, "serve": {"probes": probes, **FAST, **serve}, "seed": 0}


def assert_stopped(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_classifier_serves_the_quantized_artifact(classifier_outputs: dict[str, Path], tiny_classifier_dir: Path,
                                                  tmp_path: Path) -> None:
    texts = ["the film was wonderful", "awful and dull"]
    expected = predict_offline(classifier_outputs["quantize"] / "onnx", texts)
    probes = [{"text": t, "expect_label": p["label"]} for t, p in zip(texts, expected, strict=True)]
    metrics = serve_stage.run(config(tiny_classifier_dir, "sequence-classification", probes),
                              classifier_outputs, tmp_path)
    report = json.loads((tmp_path / "serve_report.json").read_text())
    assert report["passed"] and report["quantized"] and report["artifact"].startswith(str(classifier_outputs["quantize"]))
    assert metrics["probes_passed"] == 2 and metrics["quantized"] and 0 < metrics["p50_ms"] <= metrics["p95_ms"]
    assert metrics["throughput_rps"] > 0
    statuses = [b["status"] for b in report["bad_inputs"]]
    assert len(statuses) >= 8 and all(400 <= s < 500 for s in statuses) and 413 in statuses
    assert report["auth_required"] and report["concurrency"]["identical"] and report["concurrency"]["mixed_match_offline"]
    # Dynamic int8 is not batch-invariant: the server runs each text alone, so a text among 16 concurrent others gets
    # exactly its answer alone.
    assert report["batching"] == "per request"
    invariance = report["invariance"]
    assert invariance["concurrent_others"] == 16 and invariance["label_flips"] == 0
    assert invariance["max_score_drift"] <= 1e-4 and metrics["max_score_drift"] == invariance["max_score_drift"]
    assert_stopped(report["server"]["pid"])


SAME_LENGTH = ["the film was wonderful", "the plot was awful", "the music was lovely", "the cast was dull",
               "the ending was superb", "the script was weak"]


def test_dynamic_int8_batched_across_requests_is_detected_and_fails(classifier_outputs: dict[str, Path],
                                                                     tiny_classifier_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The old serving (dynamic int8 merged into shared runs) measured through the real server: the step fails."""
    monkeypatch.setattr(serve_stage, "ServerSettings", functools.partial(ServerSettings, invariant=False))
    cfg = config(tiny_classifier_dir, "sequence-classification", [{"text": t} for t in SAME_LENGTH], max_wait_ms=50)
    with pytest.raises(StageError, match=r"served answers depend on the other requests: .* among 16 concurrent others"):
        serve_stage.run(cfg, classifier_outputs, tmp_path)
    report = json.loads((tmp_path / "serve_report.json").read_text())
    assert report["batching"] == "across requests" and report["invariance"]["max_score_drift"] > 1e-4
    assert_stopped(report["server"]["pid"])


def test_static_graphs_batch_across_requests_and_stay_invariant(classifier_outputs: dict[str, Path],
                                                                tiny_classifier_dir: Path, tmp_path: Path) -> None:
    """The fp32 export keeps cross-request batching (padding included: texts of several lengths) and still passes."""
    probes = [{"text": t} for t in [*SAME_LENGTH, "fun", "awful and dull and long and tedious and bland"]]
    cfg = config(tiny_classifier_dir, "sequence-classification", probes, max_wait_ms=50)
    serve_stage.run(cfg, {"export": classifier_outputs["export"]}, tmp_path)
    report = json.loads((tmp_path / "serve_report.json").read_text())
    assert report["batching"] == "across requests" and not report["quantized"]
    assert report["invariance"]["label_flips"] == 0 and report["invariance"]["max_score_drift"] <= 1e-4


def test_the_served_accuracy_is_recorded_unrounded_so_it_equals_the_quantize_gates_figure() -> None:
    # 169 of 240 right: rounded to 4 places (0.7042) it no longer equals the gate's 169/240 (found on an AMX Xeon)
    served = serve_stage._served_accuracy(["pos"] * 169 + ["neg"] * 71, ["pos"] * 240, samples=240)
    assert served == {"samples": 240, "correct": 169, "accuracy": 169 / 240}


def test_served_accuracy_equals_the_recorded_offline_accuracy(tiny_classifier_dir: Path, classifier_inputs: dict,
                                                              classifier_export: tuple[Path, dict],
                                                              tmp_path: Path) -> None:
    export, _ = classifier_export
    cfg = config(tiny_classifier_dir, "sequence-classification", [{"text": "fun"}], eval_samples=10)
    (tmp_path / "ok").mkdir()
    (tmp_path / "bad").mkdir()
    serve_stage.run(cfg, {"data": classifier_inputs["data"], "export": export}, tmp_path / "ok")
    report = json.loads((tmp_path / "ok" / "serve_report.json").read_text())
    gate = report["served_vs_offline"]
    assert gate["passed"] and gate["recorded_in"] == "export_report.json"
    assert gate["samples"] == 24 and report["served_eval"]["samples"] == 10  # the rows the export gate used
    assert gate["served"] == gate["offline_in_process"] == pytest.approx(gate["recorded"])

    # The same artifact, with a report that recorded another accuracy: the served one no longer matches it.
    tampered = tmp_path / "tampered"
    shutil.copytree(export, tampered)
    recorded = json.loads((tampered / "export_report.json").read_text())
    recorded["validation"]["metric_candidate"] = 1.25 - recorded["validation"]["metric_candidate"]
    (tampered / "export_report.json").write_text(json.dumps(recorded))
    with pytest.raises(StageError, match=r"served accuracy \S+ differs from the offline accuracy \S+ that "
                                         r"export_report.json recorded on the same 24 test rows"):
        serve_stage.run(cfg, {"data": classifier_inputs["data"], "export": tampered}, tmp_path / "bad")


def test_generator_probes_and_offline_match(llama_export: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    offline = generate_offline(llama_export / "onnx", "the film was", 8)
    assert offline["text"].strip()  # the probe below relies on it
    probes = [{"prompt": "the film was", "max_new_tokens": 8, "expect_nonempty": True,
               "expect_pattern": re.escape(offline["text"][:3])}, {"prompt": "hi", "max_new_tokens": 4}]
    metrics = serve_stage.run(config(tiny_llama_dir, "causal-lm", probes), {"export": llama_export}, tmp_path)
    report = json.loads((tmp_path / "serve_report.json").read_text())
    assert metrics["probes_passed"] == 2 and all(p["matches_offline"] for p in report["probes"])
    assert report["concurrency"] == {"requests": 4, "identical": True, "mixed_match_offline": True,
                                     "mixed_max_score_diff": 0.0}
    assert all(400 <= b["status"] < 500 for b in report["bad_inputs"])
    assert_stopped(report["server"]["pid"])


def test_failures_are_reported_and_the_server_stopped(classifier_outputs: dict[str, Path], tiny_classifier_dir: Path,
                                                      tmp_path: Path) -> None:
    (label,) = (p["label"] for p in predict_offline(classifier_outputs["export"] / "onnx", ["fun"]))
    wrong = "positive" if label == "negative" else "negative"
    cfg = config(tiny_classifier_dir, "sequence-classification", [{"text": "fun", "expect_label": wrong}],
                 max_p95_ms=0.001)
    with pytest.raises(StageError, match=r"(?s)expected label.*p95 latency"):
        serve_stage.run(cfg, {"export": classifier_outputs["export"]}, tmp_path)
    report = json.loads((tmp_path / "serve_report.json").read_text())
    assert not report["passed"] and len(report["failures"]) == 2
    assert_stopped(report["server"]["pid"])


def test_ctrl_c_still_stops_the_server(classifier_outputs: dict[str, Path], tiny_classifier_dir: Path,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*_: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(serve_stage, "_check_bad_inputs", interrupted)  # Ctrl-C in the middle of the checks
    cfg = config(tiny_classifier_dir, "sequence-classification", [{"text": "fun"}])
    with pytest.raises(KeyboardInterrupt):
        serve_stage.run(cfg, {"export": classifier_outputs["export"]}, tmp_path)
    report = json.loads((tmp_path / "serve_report.json").read_text())
    assert report["failures"] == ["KeyboardInterrupt"] and report["server"]["exit_code"] is not None
    assert_stopped(report["server"]["pid"])


def test_missing_onnx_artifact_is_a_stage_error(tiny_classifier_dir: Path, tmp_path: Path) -> None:
    cfg = config(tiny_classifier_dir, "sequence-classification", [{"text": "fun"}])
    with pytest.raises(StageError, match="no onnx/model.onnx"):
        serve_stage.run(cfg, {"export": tmp_path}, tmp_path)


def test_accuracy_gate_holds_served_to_recorded_unless_the_data_step_truncated_the_rows():
    """Rows the data step cut at data.max_length were scored on other input than the server reads (whole texts), so the
    recorded figure is not comparable there; served must still equal the same model in-process, text by text."""
    from runner.stages.serve.gates import check_accuracy

    expected = ["pos", "neg", "pos", "neg"]
    recorded = {"accuracy": 1.0, "samples": 4, "report": "quantize_report.json"}
    answers = ["pos", "neg", "neg", "neg"]  # 0.75 served, 1.0 recorded
    _, problems = check_accuracy(answers, answers, expected, [True] * 4, recorded, True)
    assert problems and "differs from the offline accuracy" in problems[0]
    result, problems = check_accuracy(answers, answers, expected, [True, True, False, True], recorded, True)
    assert not problems and result["rows_truncated_by_the_data_step"] == 1 and result["passed"]
    _, problems = check_accuracy(answers, expected, expected, [True, True, False, True], recorded, True)
    assert problems == ["the server answered 1 of 4 test rows differently from the same model run in-process"]
