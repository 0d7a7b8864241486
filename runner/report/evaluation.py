"""The report's evaluation part, from evaluate_report.json (its format: the evaluate stage, runner/stages/evaluate/__init__.py):
the forgetting table with its verdict, then one table per set with every artifact's scores beside the base model's,
per-class precision/recall and the confusion matrix for classifiers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.names import CAUSAL_LM
from runner.report.formatting import DASH, metric, num, pct, signed_metric, signed_pct
from runner.report.render import Block, Callout, Cell, Heading, Image, Para, Table
from runner.stages.shared import MACRO_F1

Rows = list[list[str | Cell]]

# Short names for the artifacts, in the order a model travels.
ARTIFACTS = {"base": "base model", "train": "trained (PyTorch)", "export": "ONNX export", "quantize": "quantized ONNX"}


def artifact_name(kind: str, quantize_report: dict[str, Any] | None = None) -> str:
    """"int8 ONNX" / "int4 ONNX" / "bnb 4-bit" from the quantize report's method, so the name says what shipped."""
    if kind != "quantize" or not quantize_report:
        return ARTIFACTS.get(kind, kind)
    method = str(quantize_report.get("method", ""))
    if method.startswith("bnb-"):
        return f"bitsandbytes {method.removeprefix('bnb-')}"
    if "int8" in method or quantize_report.get("bits") == 8:
        return "int8 ONNX"
    if quantize_report.get("bits") == 4:
        return "int4 ONNX"
    return ARTIFACTS["quantize"]


def change_text(task: str, value: Any) -> str:
    """A forgetting change or budget in its unit: classifiers lose probe-accuracy points, LMs gain relative perplexity."""
    if not isinstance(value, (int, float)):
        return DASH
    if task == CAUSAL_LM:
        return f"{signed_pct(value)} perplexity"
    return f"{100 * value:.1f} points"


def verdict_cell(within: Any) -> Cell:
    if within is None:
        return Cell("not gated", "muted")
    return Cell("within budget", "ok") if within else Cell("OVER BUDGET", "bad")


def forgetting(report: dict[str, Any]) -> list[Block]:
    task = report.get("task", "")
    f = report.get("forgetting") or {}
    verdict = f.get("verdict", "no general sets")
    blocks: list[Block] = [Heading("Forgetting", 2, "forgetting")]
    if not f.get("sets"):
        return blocks + [Para(f"Verdict: {verdict}. Add a `general` set under evaluate.sets to measure what the tuned "
                              "model forgot.", "muted")]
    lm = task == CAUSAL_LM
    measure = "perplexity" if lm else "probe accuracy"
    budget = change_text(task, f.get("budget")) if f.get("budget") is not None else "not set"
    rows: Rows = [[s["name"], metric(s.get("base")), metric(s.get("tuned")), change_text(task, s.get("change")), budget,
             verdict_cell(s.get("within"))] for s in f["sets"]]
    style = {"within budget": "ok", "over budget": "bad"}.get(verdict, "warn")
    what = ("Perplexity on each general set, base vs tuned model; change = relative perplexity increase" if lm else
            "Linear-probe accuracy of the frozen encoder on each general set (logistic regression on mean-pooled "
            "features, cross-validated: every row predicted once), base vs tuned encoder; change = accuracy drop in "
            "points")
    blocks.append(Callout(f"Forgetting verdict: {verdict}", f"{what}. Budget (evaluate.max_forgetting): {budget}.", style))
    change = "perplexity increase" if lm else "accuracy drop"
    blocks.append(Table(["set", f"base {measure}", f"tuned {measure}", change, "budget", "verdict"], rows))
    return blocks


def _source(s: dict[str, Any]) -> str:
    return f"{s.get('role', '')} set, {num(s.get('rows'))} rows, {s.get('source', '')}".strip(", ")


def _artifacts(report: dict[str, Any], s: dict[str, Any]) -> list[str]:
    order = list(report.get("artifacts") or ARTIFACTS)
    return [a for a in order if a in (s.get("scores") or {})] + [a for a in s.get("scores") or {} if a not in order]


def _probe_set(scores: dict[str, Any], names: dict[str, str], artifacts: list[str], reused: set[str]) -> list[Block]:
    """A general set on a classifier: the linear probe on frozen features (base and tuned encoder)."""
    base = scores.get("base", {}).get("probe_accuracy")
    rows: Rows = [[names[a], metric(scores[a].get("probe_accuracy")), _delta(scores[a].get("probe_accuracy"), base, a),
                   _probe_rows(scores[a]), _origin(a, reused)]
                  for a in artifacts]
    return [Table(["artifact", "probe accuracy", "vs base", "probe rows", "score"], rows)]


def _probe_rows(score: dict[str, Any]) -> str:
    # by name: a memoized score comes back with its keys sorted (test before train)
    rows = score.get("probe_rows") or {}
    if score.get("probe_folds"):  # cross-validated: every row tested once, each fold's probe fitted on the others
        return f"{num(rows.get('test'))} rows, {score['probe_folds']}-fold (each fit on {num(rows.get('train'))})"
    return f"{num(rows.get('train'))} train / {num(rows.get('test'))} test"


def _classifier_set(s: dict[str, Any], names: dict[str, str], artifacts: list[str], reused: set[str]) -> list[Block]:
    scores = s["scores"]
    if any("probe_accuracy" in scores[a] for a in artifacts):
        return _probe_set(scores, names, artifacts, reused)
    base = scores.get("base", {}).get("accuracy")
    rows: Rows = [[names[a], metric(scores[a].get("accuracy")), _delta(scores[a].get("accuracy"), base, a),
                   metric(scores[a].get("macro_f1")), _origin(a, reused)] for a in artifacts]
    blocks: list[Block] = [Table(["artifact", "accuracy", "vs base", "macro-F1", "score"], rows,
                                 caption=f"macro-F1: {MACRO_F1}")]
    labels = next((scores[a].get("labels") for a in artifacts if scores[a].get("labels")), None) or list(
        next((scores[a]["per_class"] for a in artifacts if scores[a].get("per_class")), {}))
    if labels:
        rows = []
        for name in labels:
            support = next((scores[a]["per_class"][name].get("support") for a in artifacts
                            if name in (scores[a].get("per_class") or {})), None)
            cells = [_pr((scores[a].get("per_class") or {}).get(name)) for a in artifacts]
            rows.append([name, num(support), *cells])
        blocks.append(Table(["label", "rows", *(f"{names[a]} P / R" for a in artifacts)], rows,
                            caption="per class: precision / recall"))
    return blocks


def _pr(entry: dict[str, Any] | None) -> str:
    return DASH if not entry else f"{_fixed3(entry.get('precision'))} / {_fixed3(entry.get('recall'))}"


def _fixed3(value: Any) -> str:  # three decimals always, so 0.8 and 0.838 line up as 0.800 / 0.838
    return f"{value:.3f}" if isinstance(value, float) else num(value)


def _delta(value: Any, base: Any, artifact: str) -> str:
    if artifact == "base" or not isinstance(value, (int, float)) or not isinstance(base, (int, float)):
        return ""
    return signed_metric(value - base)


def _origin(artifact: str, reused: set[str]) -> Cell:
    return Cell("reused (memo)", "muted") if artifact in reused else Cell("scored")


LM_COLUMNS = [("loss", "loss"), ("perplexity", "perplexity"), ("tokens", "tokens"), ("exact_match", "exact match"),
              ("contains", "contains")]


def _lm_set(s: dict[str, Any], names: dict[str, str], artifacts: list[str], reused: set[str]) -> list[Block]:
    scores = s["scores"]
    columns = [(k, h) for k, h in LM_COLUMNS if any(k in scores[a] for a in artifacts)]
    base = scores.get("base", {}).get("perplexity")
    rows: Rows = []
    for a in artifacts:
        ppl = scores[a].get("perplexity")
        change = "" if a == "base" or not isinstance(ppl, (int, float)) or not base else signed_pct(ppl / base - 1)
        cells = [pct(scores[a].get(k)) if k in ("exact_match", "contains") else num(scores[a].get(k)) for k, _ in columns]
        rows.append([names[a], *cells, change, _origin(a, reused)])
    return [Table(["artifact", *(h for _, h in columns), "perplexity vs base", "score"], rows)]


def sets(report: dict[str, Any], names: dict[str, str], pictures: dict[str, Path]) -> list[Block]:
    blocks: list[Block] = [Heading("Evaluation sets", 2, "sets")]
    lm = report.get("task") == CAUSAL_LM
    if artifacts := report.get("artifacts"):
        blocks.append(Table(["artifact", "what it is", "key", "note"], [
            [names.get(kind, kind), str(a.get("about", "")), str(a.get("key", ""))[:12],
             Cell(f"not scored: {a['skipped']}", "bad") if a.get("skipped") else ""] for kind, a in artifacts.items()],
            caption="artifacts scored"))
    for s in report.get("sets") or []:
        artifacts = _artifacts(report, s)
        reused = set(s.get("reused") or [])
        blocks += [Heading(f"Set {s['name']}", 3), Para(_source(s), "muted")]
        if not artifacts:
            blocks.append(Para("no scores recorded", "muted"))
            continue
        local = {a: names.get(a, ARTIFACTS.get(a, a)) for a in artifacts}
        blocks += (_lm_set if lm else _classifier_set)(s, local, artifacts, reused)
        if s["name"] in pictures:
            blocks.append(Image(pictures[s["name"]], f"confusion matrix, set {s['name']}",
                                f"confusion matrix on {s['name']}: rows are the true label, columns the predicted one"))
    if lm_eval := report.get("lm_eval"):
        from runner.report.formatting import generic

        rows, tables = generic(lm_eval if isinstance(lm_eval, dict) else {"results": lm_eval})
        blocks += [Heading("lm-evaluation-harness", 3), Table(["figure", "value"], rows, compact=True), *tables]
    return blocks


def confusion_source(report: dict[str, Any], s: dict[str, Any]) -> tuple[str, list[list[int]], list[str]] | None:
    """The matrix to draw when the stage left no picture: the last artifact scored (the one that ships)."""
    for a in reversed(_artifacts(report, s)):
        entry = (s.get("scores") or {}).get(a) or {}
        if entry.get("confusion") and entry.get("labels"):
            return a, entry["confusion"], entry["labels"]
    return None


def not_run(reason: str) -> list[Block]:
    return [Heading("Forgetting", 2, "forgetting"), Para(f"Not measured: {reason}.", "muted")]
