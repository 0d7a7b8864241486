"""The run report: `report.md` and `report.html` in the run folder, built from run.json and the steps' own reports.

Sections: the plan (what ran, what came from the cache), data stats, training curves and metrics, the export and quantize
gates, sizes, the serve latency table, the resolved recipe, and the environment. Every figure comes from a file a stage
wrote; the report computes nothing of its own.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

from runner.execute import RunResult
from runner.recipe import Loaded

# Which file of each stage's output folder holds its detailed report, and the images worth showing.
STAGE_REPORTS = {
    "data": "stats.json",
    "train": "metrics.json",
    "export": "export_report.json",
    "quantize": "quantize_report.json",
    "serve": "serve_report.json",
}
IMAGES = {"train": ["loss.png"]}
TITLES = {
    "model": "Model built from a config",
    "data": "Data",
    "train": "Training",
    "export": "Export gate (ONNX vs PyTorch)",
    "quantize": "Quantization gate",
    "serve": "Smoke-serve",
}


def write_report(result: RunResult, loaded: Loaded, environment: dict[str, Any]) -> tuple[Path, Path]:
    sections = _sections(result)
    for step in result.steps:
        for image in IMAGES.get(step.kind, []):
            if step.outputs and (Path(step.outputs) / image).is_file():
                shutil.copy(Path(step.outputs) / image, result.run_dir / f"{step.kind}-{image}")
    recipe_yaml = (result.run_dir / "recipe.yaml").read_text()
    md = _markdown(result, sections, recipe_yaml, environment)
    page = _html(result, sections, recipe_yaml, environment)
    (result.run_dir / "report.md").write_text(md)
    (result.run_dir / "report.html").write_text(page)
    return result.run_dir / "report.md", result.run_dir / "report.html"


# The metric that follows the model from training to the server: (step, path in its details, what it measures).
HEADLINE = [
    ("train", ("eval_accuracy",), "PyTorch after training"),
    ("export", ("validation", "metric_candidate"), "ONNX export"),
    ("quantize", ("comparison", "metric_candidate"), "int8 ONNX"),
    ("serve", ("served_eval", "accuracy"), "served by the running server"),
]


def headline(sections: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The eval accuracy at each stage (classifiers), from the stages' own reports."""
    by_kind = {section["kind"]: section["details"] for section in sections}
    rows = []
    for kind, path, label in HEADLINE:
        value: Any = by_kind.get(kind)
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, (int, float)):
            rows.append((label, value))
    return rows


def _sections(result: RunResult) -> list[dict[str, Any]]:
    sections = []
    for step in result.steps:
        details: dict[str, Any] = dict(step.metrics)
        report_file = STAGE_REPORTS.get(step.kind)
        if step.outputs and report_file and (Path(step.outputs) / report_file).is_file():
            try:
                details = {**details, **json.loads((Path(step.outputs) / report_file).read_text())}
            except ValueError:
                pass
        images = [f"{step.kind}-{name}" for name in IMAGES.get(step.kind, [])
                  if step.outputs and (Path(step.outputs) / name).is_file()]
        sections.append({"kind": step.kind, "title": TITLES.get(step.kind, step.kind), "status": step.status,
                         "details": details, "images": images, "error": step.error})
    return sections


def _flat(details: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in details.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and len(value) <= 40:
            rows += _flat(value, f"{name}.")
        else:
            rows.append((name, value))
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        text = ", ".join(_fmt(v) for v in value[:12])
        return text + (", ..." if len(value) > 12 else "")
    return str(value)


# --- Markdown -----------------------------------------------------------------------------------------------------------


def _markdown(result: RunResult, sections: list[dict[str, Any]], recipe_yaml: str, environment: dict[str, Any]) -> str:
    verdict = "succeeded" if result.ok else "FAILED"
    lines = [f"# {result.recipe}: {verdict}", ""]
    accuracy = headline(sections)
    if accuracy:
        lines += ["## Eval accuracy at each stage", "", "| stage | accuracy |", "|---|---|"]
        lines += [f"| {label} | {value:.4f} |" for label, value in accuracy] + [""]
    lines += ["## Plan", "", "| step | key | status | seconds | why it ran |", "|---|---|---|---|---|"]
    for step in result.steps:
        why = "; ".join(step.reasons) if step.status == "ran" else ""
        lines.append(f"| {step.kind} | `{step.key[:12]}` | {step.status} | {step.seconds:.1f} | {why} |")
    for section in sections:
        lines += ["", f"## {section['title']}", ""]
        if section["error"]:
            lines += [f"**Failed:** {section['error']}", ""]
        for image in section["images"]:
            lines += [f"![{section['kind']}]({image})", ""]
        rows = _flat(section["details"])
        if rows:
            lines += ["| figure | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]
    lines += ["", "## Environment", "", "| package or fact | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in _flat(environment)]
    lines += ["", "## Resolved recipe", "", "```yaml", recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


# --- HTML ---------------------------------------------------------------------------------------------------------------

_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#1d2330}
h1{margin-bottom:.2em} .ok{color:#137333} .bad{color:#b3261e} .muted{color:#667}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:14px} td,th{border:1px solid #dde;padding:4px 10px;text-align:left}
th{background:#f3f5f9} code,pre{font-family:ui-monospace,monospace;font-size:13px}
pre{background:#f6f8fa;padding:1em;overflow:auto}
.cached{color:#137333} .ran{color:#0b57d0} .failed{color:#b3261e} .skipped{color:#999} img{max-width:100%;border:1px solid #eee}
section{margin-top:1.5em}
"""


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("figure", "value")) -> str:
    body = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table><tr><th>{header[0]}</th><th>{header[1]}</th></tr>{body}</table>"


def _html(result: RunResult, sections: list[dict[str, Any]], recipe_yaml: str, environment: dict[str, Any]) -> str:
    verdict = '<span class="ok">succeeded</span>' if result.ok else '<span class="bad">failed</span>'
    plan_rows = "".join(
        f"<tr><td>{s.kind}</td><td><code>{s.key[:12]}</code></td><td class='{s.status}'>{s.status}</td>"
        f"<td>{s.seconds:.1f}</td><td>{html.escape('; '.join(s.reasons) if s.status == 'ran' else '')}</td></tr>"
        for s in result.steps
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(result.recipe)} report</title>"
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(result.recipe)}: {verdict}</h1><p class='muted'>{html.escape(str(result.run_dir))}</p>",
        (f"<section><h2>Eval accuracy at each stage</h2>{_table(headline(sections), ('stage', 'accuracy'))}</section>"
         if headline(sections) else ""),
        "<section><h2>Plan</h2><table><tr><th>step</th><th>key</th><th>status</th><th>seconds</th>"
        f"<th>why it ran</th></tr>{plan_rows}</table></section>",
    ]
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section['title'])}</h2>")
        if section["error"]:
            parts.append(f"<p class='bad'><b>Failed:</b> {html.escape(section['error'])}</p>")
        parts += [f"<img src='{html.escape(image)}' alt='{section['kind']}'>" for image in section["images"]]
        rows = _flat(section["details"])
        if rows:
            parts.append(_table(rows))
        parts.append("</section>")
    parts.append(f"<section><h2>Environment</h2>{_table(_flat(environment), ('package or fact', 'value'))}</section>")
    parts.append(f"<section><h2>Resolved recipe</h2><pre>{html.escape(recipe_yaml)}</pre></section></body></html>")
    return "\n".join(parts)
