"""The run report: `report.md` and `report.html` in the run folder, and the headline the CLI prints last.

`collect` gathers the facts once, from run.json's steps and the reports the stages wrote (a failed evaluate step's
report from RUN_DIR/failed/evaluate/): what was trained on what, the headline metric of every artifact, the served
latency and the forgetting verdict. `write_report` lays them out: headline, forgetting, the evaluation sets, the plan
with why each step ran, one section per stage, the environment, the resolved recipe. Every figure comes from a file a
stage wrote; the report computes nothing but differences. Layout: runner/report/render.py; stage sections:
runner/report/stage_sections.py; evaluation: runner/report/evaluation.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.recipe import Loaded
from runner.recipe.document import Recipe
from runner.recipe.problems import relative
from runner.report import evaluation as report_eval
from runner.report import preference as report_preference
from runner.report import recipe_section as report_recipe
from runner.report import stage_sections as report_stages
from runner.report.formatting import SHARES, metric, num, seconds, signed, signed_metric
from runner.report.render import Block, Callout, Cell, Code, Grid, Heading, Image, Para, Table, markdown, page
from runner.run_record import RunResult, StepResult

# Which file of each stage's output folder holds its report (shown instead of the step's small metrics, never beside
# them: the metrics are a summary of the same figures).
STAGE_REPORTS = {
    "data": "stats.json",
    "train": "metrics.json",
    "export": "export_report.json",
    "quantize": "quantize_report.json",
    "evaluate": "evaluate_report.json",
    "serve": "serve_report.json",
}
TITLES = {
    "model": "Model built from a config",
    "data": "Data",
    "train": "Training",
    "export": "Export gate (ONNX vs PyTorch)",
    "quantize": "Quantization gate",
    "serve": "Smoke-serve",
}


@dataclass
class Score:
    artifact: str  # base | train | export | quantize | served
    name: str  # what a person calls it: "int8 ONNX"
    value: float
    rows: int | None
    source: str  # where the figure was measured


@dataclass
class Facts:
    result: RunResult
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    evaluate: dict[str, Any] | None = None  # evaluate_report.json, also a failed step's
    metric: str = ""
    metric_set: str = ""  # which rows the headline metric is measured on
    scores: list[Score] = field(default_factory=list)

    @property
    def latency(self) -> dict[str, Any] | None:
        return (self.reports.get("serve") or {}).get("latency")

    @property
    def forgetting_verdict(self) -> str:
        if self.evaluate is not None:
            return str((self.evaluate.get("forgetting") or {}).get("verdict", "no general sets"))
        if any(s.kind == "evaluate" for s in self.result.steps):
            return "not measured (the evaluate step did not finish)"
        return "not measured (the recipe has no evaluate step)"

    def names(self) -> dict[str, str]:
        return {kind: report_eval.artifact_name(kind, self.reports.get("quantize")) for kind in report_eval.ARTIFACTS}


def _read(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def collect(result: RunResult) -> Facts:
    facts = Facts(result)
    for step in result.steps:
        if step.outputs:
            facts.outputs[step.kind] = Path(step.outputs)
        found = None
        stage = stage_of(step)
        if stage in STAGE_REPORTS:
            # a failed step's report (written before its gate raised) is kept by the executor in RUN_DIR/failed/<kind>/
            folder = Path(step.outputs) if step.outputs else result.run_dir / "failed" / step.kind
            found = _read(folder / STAGE_REPORTS[stage])
        if found is not None:
            facts.reports[step.kind] = found
        elif step.metrics:
            facts.reports[step.kind] = dict(step.metrics)
    if "evaluate" in facts.reports and "task" in facts.reports["evaluate"]:
        facts.evaluate = facts.reports["evaluate"]
    _headline(facts)
    return facts


def _headline(facts: Facts) -> None:
    names = facts.names()
    if facts.evaluate and facts.evaluate.get("sets"):
        metric = str(facts.evaluate.get("headline_metric", "accuracy"))
        sets = facts.evaluate["sets"]
        chosen = next((s for s in sets if s.get("name") == "test"), None) or next(
            (s for s in sets if s.get("role") == "task"), sets[0])
        facts.metric, facts.metric_set = metric, f"set {chosen['name']} ({num(chosen.get('rows'))} rows)"
        for kind, scores in (chosen.get("scores") or {}).items():
            if isinstance(scores.get(metric), (int, float)):
                facts.scores.append(Score(kind, names.get(kind, kind), scores[metric], chosen.get("rows"),
                                          "evaluate step"))
        # an artifact left out of evaluate.artifacts still gets the figure its own stage measured, labelled as such
        scored = {score.artifact for score in facts.scores}
        facts.scores += [score for score in _stage_scores(facts, metric) if score.artifact not in scored]
        facts.scores.sort(key=lambda score: list(report_eval.ARTIFACTS).index(score.artifact)
                          if score.artifact in report_eval.ARTIFACTS else 99)
    else:
        metric = "accuracy" if "eval_accuracy" in (facts.reports.get("train") or {}) else "loss"
        facts.metric, facts.metric_set = metric, "the test split"
        facts.scores = _stage_scores(facts, metric)
    served = (facts.reports.get("serve") or {}).get("served_eval") or {}
    if facts.metric == "accuracy" and isinstance(served.get("accuracy"), (int, float)):
        shipped = names["quantize"] if "quantize" in facts.reports else names["export"]
        facts.scores.append(Score("served", f"served ({shipped} over HTTP)", served["accuracy"], served.get("samples"),
                                  "smoke-serve, over HTTP"))


def _stage_scores(facts: Facts, metric: str) -> list[Score]:
    """Each stage's own measurement of `metric` on (part of) the test split: train's eval before and after training,
    the export and quantize gates' candidate."""
    names, train, found = facts.names(), facts.reports.get("train") or {}, []
    test_rows = ((facts.reports.get("data") or {}).get("rows") or {}).get("test")
    for kind, value, source in (("base", train.get(f"eval_{metric}_before"), "train step, before training"),
                                ("train", train.get(f"eval_{metric}"), "train step's eval")):
        if isinstance(value, (int, float)):
            found.append(Score(kind, names[kind], value, test_rows, source))
    for kind, part in (("export", "validation"), ("quantize", "comparison")):
        gate = (facts.reports.get(kind) or {}).get(part) or {}
        if gate.get("metric") == metric and isinstance(gate.get("metric_candidate"), (int, float)):
            found.append(Score(kind, names[kind], gate["metric_candidate"], gate.get("samples"), f"{kind} step's gate"))
    return found


# --- the terminal's last lines ------------------------------------------------------------------------------------------


def headline_lines(facts: Facts) -> list[str]:
    """The numbers a person wants at the end of `recipe run`: metric per artifact, latency, forgetting."""
    lines = []
    if facts.scores:
        figures = ", ".join(f"{s.name} {metric(s.value, facts.metric)}" for s in facts.scores)
        lines.append(f"{facts.metric} on {facts.metric_set}: {figures}")
    if latency := facts.latency:
        lines.append(f"served latency: p50 {num(latency.get('p50_ms'))} ms, p95 {num(latency.get('p95_ms'))} ms "
                     f"({num(latency.get('throughput_rps'))} requests/s at concurrency "
                     f"{num(latency.get('throughput_concurrency'))})")
    line = f"forgetting: {facts.forgetting_verdict}"
    task = (facts.evaluate or {}).get("task", "")
    rows = ((facts.evaluate or {}).get("forgetting") or {}).get("sets") or []
    if rows:
        line += " (" + "; ".join(f"{r['name']} {metric(r.get('base'))} -> {metric(r.get('tuned'))}, "
                                 f"{report_eval.change_text(task, r.get('change'))}" for r in rows) + ")"
    lines.append(line)
    return lines


# --- the report ---------------------------------------------------------------------------------------------------------


def write_report(result: RunResult, loaded: Loaded, environment: dict[str, Any]) -> tuple[Path, Path]:
    facts = collect(result)
    recipe_yaml = (result.run_dir / "recipe.yaml").read_text()
    blocks = _blocks(facts, loaded.recipe, environment, recipe_yaml)
    title = f"{result.recipe}: {'succeeded' if result.ok else 'FAILED'}"
    (result.run_dir / "report.md").write_text(markdown(title, blocks))
    verdict = ("succeeded", "ok") if result.ok else ("failed", "bad")
    (result.run_dir / "report.html").write_text(page(result.recipe, verdict, blocks))
    return result.run_dir / "report.md", result.run_dir / "report.html"


def _blocks(facts: Facts, recipe: Recipe, environment: dict[str, Any], recipe_yaml: str) -> list[Block]:
    result = facts.result
    ran = sum(s.status == "ran" for s in result.steps)
    cached = sum(s.status == "cached" for s in result.steps)
    work = sum(s.seconds for s in result.steps)
    blocks: list[Block] = [Para(f"Run folder {relative(result.run_dir)}: {len(result.steps)} steps, {ran} ran, "
                                f"{cached} from the cache" + (f", {seconds(work)} of work." if work else "."), "muted")]
    for step in result.steps:
        if step.status == "failed":
            blocks.append(Callout(f"Step {step.kind} failed", step.error or "no message"))
    blocks += _headline_blocks(facts, recipe, environment)
    if facts.evaluate is not None:
        pictures = _confusion_pictures(facts)
        blocks += report_eval.forgetting(facts.evaluate) + report_eval.sets(facts.evaluate, facts.names(), pictures)
    elif any(s.kind == "evaluate" for s in result.steps):
        blocks += report_eval.not_run("the evaluate step did not finish and left no report")
    else:
        blocks += report_eval.not_run("the recipe has no evaluate step (add an evaluate section to the recipe)")
    blocks += _plan(result)
    for step in result.steps:
        blocks += _stage(facts, step)
    blocks += _environment(environment)
    blocks += [Heading("Resolved recipe", 2, "recipe"), Code(recipe_yaml, "yaml")]
    return blocks


def _headline_blocks(facts: Facts, recipe: Recipe, environment: dict[str, Any]) -> list[Block]:
    what = report_recipe.what(recipe, environment, facts.reports.get("data"), facts.evaluate)
    blocks: list[Block] = [Heading("Headline", 2, "headline"), Table(["", ""], what, compact=True)]
    if facts.scores:
        base = next((s.value for s in facts.scores if s.artifact == "base"), None)
        tiles = []
        for s in facts.scores:
            change = "" if base is None or s.artifact == "base" else (
                f", {signed_metric(s.value - base)} vs base" if facts.metric in SHARES else f", {signed(s.value - base)} vs base")
            tiles.append((s.name, metric(s.value, facts.metric), f"{num(s.rows)} rows · {s.source}{change}", ""))
        blocks += [Para(f"{facts.metric} on {facts.metric_set}, at every artifact:", "lead"), Grid(tiles)]
    latency = facts.latency
    verdict = facts.forgetting_verdict
    style = "ok" if verdict == "within budget" else "bad" if verdict == "over budget" else "muted"
    tiles = [("served p50", f"{num(latency.get('p50_ms'))} ms", f"{num(latency.get('requests'))} requests, one at a time", ""),
             ("served p95", f"{num(latency.get('p95_ms'))} ms",
              f"{num(latency.get('throughput_rps'))} requests/s at concurrency {num(latency.get('throughput_concurrency'))}",
              "")] if latency else []
    tiles.append(("forgetting", verdict if style != "muted" else verdict.split(" (")[0], _forgetting_note(facts),
                  "" if style == "muted" else style))
    blocks.append(Grid(tiles))
    return blocks


def _forgetting_note(facts: Facts) -> str:
    rows = ((facts.evaluate or {}).get("forgetting") or {}).get("sets") or []
    if not rows:
        return facts.forgetting_verdict.partition(" (")[2].rstrip(")")
    task = (facts.evaluate or {}).get("task", "")
    worst = max(rows, key=lambda r: r.get("change") if isinstance(r.get("change"), (int, float)) else float("-inf"))
    return f"worst: {worst['name']}, {report_eval.change_text(task, worst.get('change'))}"


def _plan(result: RunResult) -> list[Block]:
    failed_before = False
    rows: list[list[str | Cell]] = []
    for step in result.steps:
        style = {"cached": "ok", "failed": "bad", "skipped": "muted"}.get(step.status, "")
        rows.append([step.kind, step.key[:12], Cell(step.status, style), seconds(step.seconds) if step.seconds else "",
                     _why(step, failed_before)])
        failed_before = failed_before or step.status == "failed"
    return [Heading("Plan: what ran and why", 2, "plan"),
            Table(["step", "key", "status", "time", "why"], rows)]


def _why(step: StepResult, failed_before: bool) -> str:
    if step.status == "cached":
        return "same inputs as a finished earlier run: taken from the cache"
    if step.status == "skipped":
        return "not run: an earlier step failed" if failed_before else "not run: the run stopped before it (--until)"
    why = "; ".join(step.reasons) or "forced (--force)"
    return why + (" — failed (see above)" if step.status == "failed" else "")


def _stage(facts: Facts, step: StepResult) -> list[Block]:
    if step.kind == "evaluate":
        return []  # its report is the forgetting and set tables above
    details, stage = facts.reports.get(step.kind), stage_of(step)
    title = TITLES.get(stage, stage)
    if step.kind == "model" and details and "source" in details:  # model.recipe: another recipe's trained model
        title = "Model: the trained model of the recipe this one starts from"
    elif step.kind != stage:  # a step of the recipe `model.recipe` names
        title = f"{title} (recipe {step.kind.rpartition('.')[0]}, which this one starts from)"
    blocks: list[Block] = [Heading(title, 2, step.kind)]
    if step.status == "skipped":
        return blocks + [Para(_why(step, any(s.status == "failed" for s in facts.result.steps)), "muted")]
    if step.status == "failed":  # its error is in the box at the top; what it measured before failing follows
        blocks.append(Para("This step failed: its error is at the top of the report.", "muted"))
    if details:
        blocks += report_stages.SECTIONS.get(stage, report_stages.other)(details)
    blocks += _pictures(facts, step)
    return blocks


def _copy(source: Path, run_dir: Path, name: str) -> Path:
    target = run_dir / name
    shutil.copy(source, target)
    return target


def _pictures(facts: Facts, step: StepResult) -> list[Block]:
    out, run_dir = facts.outputs.get(step.kind) or run_dir_failed(facts, step), facts.result.run_dir
    preference = (facts.evaluate or {}).get("preference")
    if step.kind == "train" and preference:  # a preference objective: the held-out figures beside TRL's curves
        blocks = report_preference.table(preference)
        if (out / "loss.png").is_file():
            blocks.append(Image(_copy(out / "loss.png", run_dir, "train-loss.png"), "preference training curves",
                                report_preference.caption(report_preference.curves(out))))
        return blocks
    if stage_of(step) == "train" and (out / "loss.png").is_file():
        return [Image(_copy(out / "loss.png", run_dir, f"{step.kind}-loss.png"), "loss curves",
                      "train and eval loss by optimizer step, with the training metrics")]
    if step.kind == "serve":
        latency = facts.latency or {}
        if (out / "latency.png").is_file():
            path = _copy(out / "latency.png", run_dir, "serve-latency.png")
        elif latency.get("samples_ms"):
            from runner.report.plots import latency_histogram

            path = run_dir / "serve-latency.png"
            latency_histogram(latency["samples_ms"], latency["p50_ms"], latency["p95_ms"], path)
        else:
            return [Para("no latency histogram: this serve step recorded no latency samples", "muted")]
        return [Image(path, "latency histogram", "latency of the sequential requests; dashed lines: p50 and p95")]
    return []


def stage_of(step: StepResult) -> str:
    """The stage a step ran: its kind, or for a step of the recipe `model.recipe` names (RECIPE.kind) the last part."""
    return step.kind.rpartition(".")[2]


def run_dir_failed(facts: Facts, step: StepResult) -> Path:
    return facts.result.run_dir / "failed" / step.kind  # holds only the reports: pictures are drawn from them


def _confusion_pictures(facts: Facts) -> dict[str, Path]:
    """confusion_<set>.png from the evaluate step's folder, or drawn here from the matrix in its report (a failed step's
    folder keeps only the report)."""
    pictures: dict[str, Path] = {}
    run_dir, out = facts.result.run_dir, facts.outputs.get("evaluate")
    for s in (facts.evaluate or {}).get("sets") or []:
        name = str(s.get("name"))
        if out is not None and (out / f"confusion_{name}.png").is_file():
            pictures[name] = _copy(out / f"confusion_{name}.png", run_dir, f"evaluate-confusion_{name}.png")
        elif found := report_eval.confusion_source(facts.evaluate or {}, s):
            from runner.report.plots import confusion_matrix

            artifact, matrix, labels = found
            pictures[name] = run_dir / f"evaluate-confusion_{name}.png"
            confusion_matrix(matrix, labels, pictures[name], f"{name}: {facts.names().get(artifact, artifact)}")
    return pictures


# How the base model's source facts (runner.execute.environment) read in the Environment table.
SOURCE_FACTS = {"package": "import name", "folder": "folder", "distribution": "distribution", "version": "version",
                "sha256": "folder content sha256", "hub": "hub id", "revision": "revision", "path": "folder"}


def _environment(environment: dict[str, Any]) -> list[Block]:
    rows: list[list[str | Cell]] = [[k, num(v)] for k, v in environment.items() if not isinstance(v, dict)]
    for kind, value in (environment.get("model") or {}).items():
        for key, item in (value if isinstance(value, dict) else {kind: value}).items():
            if isinstance(item, dict):  # weights: file -> sha256
                rows += [[f"base model {kind}: {name} sha256", str(digest)] for name, digest in item.items()]
            else:
                rows.append([f"base model {kind}: {SOURCE_FACTS.get(key, key)}", num(item)])
    packages = environment.get("packages") or {}
    return [Heading("Environment", 2, "environment"), Table(["fact", "value"], rows, compact=True),
            Table(["package", "version"], [[name, str(version)] for name, version in packages.items()],
                  caption="packages that shaped a step")]
