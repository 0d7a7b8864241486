"""The smoke-serve stage end to end: a real uvicorn server in its own process, probed over loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from runner.serving import generate_offline, predict_offline
from runner.stages import StageError
from runner.stages import serve as serve_stage
from tests.conftest import export_artifact

FAST = {"latency_requests": 15, "concurrency": 4, "startup_timeout_s": 60}


@pytest.fixture(scope="module")
def classifier_outputs(tiny_classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An export step's output and a quantize step's output (dynamic int8 of the same graph), as the stages leave them."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    export = tmp_path_factory.mktemp("export")
    export_artifact(tiny_classifier_dir, export, "sequence-classification")
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
    assert report["auth_required"] and report["concurrency"]["identical"]
    # Batched with other texts, a dynamic-int8 graph shifts scores a little (one activation scale per run): recorded.
    assert "depend on the requests batched" in report["concurrency"]["note"]
    assert_stopped(report["server"]["pid"])


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
