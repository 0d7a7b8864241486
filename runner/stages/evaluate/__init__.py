"""The evaluate step: every model the recipe made, scored offline on every set, and the forgetting gate.

What it scores (runner.stages.evaluate.artifacts): the base model before fine-tuning, the trained model (torch), the ONNX
export and the quantized model, where the recipe has those steps and `evaluate.artifacts` names them; the ONNX ones
through the server's own loader (the served model itself is covered by smoke-serve, whose answers equal these; no
server is started here). On which sets (runner.stages.evaluate.sets): the recipe's test split and `evaluate.sets`.

- Classifiers: accuracy, macro-F1, per-class precision/recall and the confusion matrix on task sets; on `general`
  sets the linear-probe accuracy of the frozen encoder, base and tuned (runner.stages.evaluate.linear_probe; ONNX
  graphs give logits, not features, so the probe covers base and train).
- Causal LMs: loss and perplexity on every set, exact match / contains where a set has reference answers (the test
  split of a `mask_prompt` recipe has them: its answers).

Forgetting: each `general` set, base vs tuned (the train artifact): the relative perplexity increase (causal LM) or
the probe-accuracy drop (classifier). Over `evaluate.max_forgetting`, evaluate_report.json is written first (the
executor keeps a failed step's folder) and the step fails with the set, both scores, the budget and the remedies.

Caching: each (set, artifact) score is memoized in the cache's memo folder under the sha256 of the stage version, the
artifact's step key, the sha256 of the set's rows as scored, and the scoring settings; so adding a set scores only that
set, and a retrained model rescores only its own column. evaluate_report.json lists per set which scores were reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from runner import stages
from runner.atomic import read_memo, write_memo
from runner.keys import canonical, package_version
from runner.names import CLASSIFIER
from runner.recipe.sections import Evaluate, Model
from runner.stages import StageError
from runner.stages.data import rows as data_rows
from runner.stages.evaluate import artifacts as models
from runner.stages.evaluate.linear_probe import PROBE_C, PROBE_MAX_ITER, probe_accuracy
from runner.stages.evaluate.scores import answer_metrics, classifier_metrics
from runner.stages.evaluate.sets import ScoredSet, label_names, load_sets
from runner.stages.export import greedy_prompt

log = logging.getLogger(__name__)

KINDS = ("base", "train", "export", "quantize")
TUNED = "train"  # forgetting compares the base with the trained torch model
REPORT = "evaluate_report.json"


def run(config: dict[str, Any], inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    """Score base, trained, exported and quantized models on every evaluation set; judge forgetting on `general` sets.

    Raises:
        StageError: forgetting over `evaluate.max_forgetting` on a general set (after evaluate_report.json is
            written); nothing to score (no test split, no sets); two sets with one name; a set that cannot be read,
            lacks a column, has no rows or a row without a label; labels the model does not know; a general set with
            fewer than two labels or fewer rows per label than `probe_folds`; an upstream output without a model;
            lm-eval asked for but not installed, a missing task file, or lm-eval failing.
    """
    model_cfg = Model.model_validate(config["model"])
    cfg = Evaluate.model_validate(config["evaluate"])
    seed = int(config["seed"])
    keys: dict[str, str] = dict(config["artifact_keys"])
    task = model_cfg.task
    if cfg.lm_eval is not None:
        from runner.stages.evaluate.lm_eval import require_lm_eval

        require_lm_eval()  # before any scoring: a missing package is found in a second, not after the whole step
    with data_rows.scratch_dir(out) as scratch:
        sets = load_sets(cfg, task, inputs["data"], scratch)
    labels = label_names(inputs["data"]) if task == CLASSIFIER else None
    check_task_labels(sets, labels)

    results, reused, skipped = score_all(sets, keys, model_cfg, cfg, inputs, seed, labels, inputs.get("memo"))
    report = build_report(task, sets, keys, results, reused, skipped, cfg, inputs)
    if cfg.lm_eval is not None and TUNED in keys:
        from runner.stages.evaluate.lm_eval import run_lm_eval

        report["lm_eval"] = run_lm_eval(cfg.lm_eval, model_cfg, inputs, seed)
    if "objective" in config and TUNED in keys:  # train.objective dpo/orpo/kto/simpo/grpo: base vs tuned, held out
        from runner.stages.evaluate.preference import scores as preference_scores

        report["preference"] = preference_scores(config["objective"], model_cfg, inputs, seed, cfg.max_rows)
    (out / REPORT).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    if task == CLASSIFIER:
        draw_confusions(report, out)
    over = [row for row in report["forgetting"]["sets"] if row["within"] is False]
    if over:
        raise StageError(forgetting_message(over, report["forgetting"], task))
    return summary(report, sets)


# --- which scores, memoized ---------------------------------------------------------------------------------------------


def wanted(scored: ScoredSet, task: str, keys: dict[str, str]) -> list[str]:
    """The artifacts a set is scored on: all of them, except a classifier's general set (probe: torch encoders only)."""
    kinds = [kind for kind in KINDS if kind in keys]
    if task == CLASSIFIER and scored.role == "general":
        return [kind for kind in kinds if kind in ("base", TUNED)]
    return kinds


def what(scored: ScoredSet, task: str) -> str:
    if task == CLASSIFIER:
        return "probe" if scored.role == "general" else "classify"
    return "lm"


def settings(kind_of_score: str, cfg: Evaluate, seed: int) -> dict[str, Any]:
    """Everything besides the artifact and the rows that shapes a score (so a change rescores, and nothing else does)."""
    spec = stages.STAGES["evaluate"]
    common: dict[str, Any] = {"score": kind_of_score, "max_tokens": models.MAX_TOKENS,
                              "packages": {name: package_version(name) for name in spec.packages}}
    if kind_of_score == "probe":
        common.update(probe_folds=cfg.probe_folds, seed=seed, C=PROBE_C, max_iter=PROBE_MAX_ITER)
    if kind_of_score == "lm":
        common.update(max_new_tokens=cfg.max_new_tokens)
    return common


def memo_key(artifact_key: str, scored: ScoredSet, task: str, cfg: Evaluate, seed: int) -> str:
    material = {
        "stage": "evaluate",
        "version": stages.STAGES["evaluate"].version,
        "artifact": artifact_key,
        "set": scored.content_hash(),
        "settings": settings(what(scored, task), cfg, seed),
    }
    return hashlib.sha256(canonical(material).encode()).hexdigest()


def score_all(
    sets: list[ScoredSet], keys: dict[str, str], model_cfg: Model, cfg: Evaluate, inputs: dict[str, Path], seed: int,
    labels: list[str] | None, memo: Path | None,
) -> tuple[dict[tuple[str, str], dict[str, Any]], dict[str, list[str]], dict[str, str]]:
    """Every (set, artifact) score: from the memo where it is there, else computed (one artifact loaded at a time)."""
    task = model_cfg.task
    results: dict[tuple[str, str], dict[str, Any]] = {}
    reused: dict[str, list[str]] = {s.name: [] for s in sets}
    skipped: dict[str, str] = {}
    for kind in (k for k in KINDS if k in keys):
        pending = []
        for scored in sets:
            if kind not in wanted(scored, task, keys):
                continue
            key = memo_key(keys[kind], scored, task, cfg, seed)
            found = read_memo(memo, key) if memo is not None else None
            if found is not None and "scores" in found:
                results[(scored.name, kind)] = found["scores"]
                reused[scored.name].append(kind)
            else:
                pending.append((scored, key))
        if not pending:
            continue
        reason = models.skipped_reason(kind, inputs)
        if reason:
            skipped[kind] = reason
            log.warning("evaluate: %s not scored: %s", kind, reason)
            continue
        scorer = models.load(kind, model_cfg, inputs, seed)
        try:
            for scored, key in pending:
                scores = score(scorer, scored, task, cfg, seed, labels)
                log.info("evaluate: %s on %s: %s", kind, scored.name, _brief(scores))
                results[(scored.name, kind)] = scores
                if memo is not None:
                    write_memo(memo, key, {"set": scored.name, "artifact": kind, "scores": scores})
        finally:
            scorer.close()
    return results, reused, skipped


def score(scorer: models.Scorer, scored: ScoredSet, task: str, cfg: Evaluate, seed: int,
          labels: list[str] | None) -> dict[str, Any]:
    if task == CLASSIFIER:
        assert scored.labels is not None  # the rules and load_sets make sure a classifier's set has labels
        if scored.role == "general":
            return probe_accuracy(scorer.features(scored.texts), scored.labels, cfg.probe_folds, seed)
        assert labels is not None
        return classifier_metrics(scored.labels, scorer.classify(scored.texts), labels)
    samples = scored.samples or scorer.encode(scored.texts)
    scores = scorer.loss(samples)
    if scored.prompts and scored.answers:
        outputs = scorer.greedy([scorer.prompt_ids(p) for p in scored.prompts], cfg.max_new_tokens)
        scores.update(answer_metrics(outputs, scored.answers))
    elif scored.samples and any(-100 in sample["labels"] for sample in scored.samples):
        # the test split of a mask_prompt recipe: its prompts are the tokens before each answer, as the export gate uses
        answers = [scorer.decode([t for t in s["labels"] if t != -100]) for s in scored.samples]
        outputs = scorer.greedy([greedy_prompt(s) for s in scored.samples], cfg.max_new_tokens)
        scores.update(answer_metrics(outputs, answers))
    return scores


def check_task_labels(sets: list[ScoredSet], labels: list[str] | None) -> None:
    """A task set's labels must be the model's label names; integer labels are read as label ids (as data.labels
    reads them in the data step)."""
    if labels is None:
        return
    for scored in sets:
        if scored.role == "task" and scored.labels is not None:
            if set(scored.labels) - set(labels) and all(v.isdigit() and int(v) < len(labels) for v in scored.labels):
                scored.labels = [labels[int(v)] for v in scored.labels]
            unknown = sorted(set(scored.labels) - set(labels))
            if unknown:
                raise StageError(f"evaluate set {scored.name!r} has labels {unknown} that the model does not know "
                                 f"(its labels: {labels}); a task set uses the model's label names (or make it "
                                 "`role: general` to probe it)")


def _brief(scores: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in scores.items() if isinstance(v, float))


# --- the report -------------------------------------------------------------------------------------------------------


def build_report(task: str, sets: list[ScoredSet], keys: dict[str, str], results: dict[tuple[str, str], dict[str, Any]],
                 reused: dict[str, list[str]], skipped: dict[str, str], cfg: Evaluate,
                 inputs: dict[str, Path]) -> dict[str, Any]:
    artifacts: dict[str, Any] = {}
    for kind in (k for k in KINDS if k in keys):
        artifacts[kind] = {"key": keys[kind], "about": models.artifact_about(kind, inputs)}
        if kind in skipped:
            artifacts[kind]["skipped"] = skipped[kind]
    return {
        "task": task,
        "headline_metric": "accuracy" if task == CLASSIFIER else "perplexity",
        "artifacts": artifacts,
        "sets": [
            {"name": s.name, "role": s.role, "rows": s.rows, "source": s.source,
             "scores": {kind: results[(s.name, kind)] for kind in KINDS if (s.name, kind) in results},
             "reused": reused[s.name]}
            for s in sets
        ],
        "forgetting": forgetting(sets, results, task, cfg.max_forgetting),
    }


def forgetting(sets: list[ScoredSet], results: dict[tuple[str, str], dict[str, Any]], task: str,
               budget: float | None) -> dict[str, Any]:
    """Each general set's base and tuned score and the change (positive = worse), against the budget."""
    classify = task == CLASSIFIER
    metric = "probe_accuracy" if classify else "perplexity"
    rows = []
    for scored in sets:
        if scored.role != "general" or (scored.name, "base") not in results or (scored.name, TUNED) not in results:
            continue
        base, tuned = results[(scored.name, "base")][metric], results[(scored.name, TUNED)][metric]
        change = base - tuned if classify else tuned / base - 1.0
        # `not change > budget` would let a NaN through; a NaN score is never within a budget
        within = None if budget is None else bool(change <= budget)
        rows.append({"name": scored.name, "metric": metric, "base": base, "tuned": tuned, "change": change,
                     "within": within})
    if not rows:
        verdict = "no general sets"
    elif budget is None:
        verdict = "not gated"
    else:
        verdict = "within budget" if all(row["within"] for row in rows) else "over budget"
    unit = "probe accuracy drop (points as a fraction)" if classify else "relative perplexity increase"
    return {"budget": budget, "unit": unit, "sets": rows, "verdict": verdict}


REMEDIES = (
    "mix general data back in (`data.sources` with a general source and `weight`s, so the tune keeps seeing it); "
    "lower `train.learning_rate`; train fewer `train.epochs`; LoRA instead of a full fine-tune (`train.method: lora`); "
    "or `train.l2sp` (full fine-tune: an L2 pull toward the pretrained weights)"
)


def forgetting_message(over: list[dict[str, Any]], table: dict[str, Any], task: str) -> str:
    what_ = "linear-probe accuracy of the frozen encoder" if task == CLASSIFIER else "perplexity"
    parts = []
    for row in over:
        if task == CLASSIFIER:
            change = f"a drop of {row['change']:.4f} ({row['change'] * 100:.1f} points)"
        else:
            change = f"an increase of {row['change']:.2%}"
        parts.append(f"general set {row['name']!r}: {what_} {row['base']:.4f} on the base model -> {row['tuned']:.4f} "
                     f"after training, {change}")
    return (f"the model forgot too much: {'; '.join(parts)}; over evaluate.max_forgetting {table['budget']} "
            f"({table['unit']}). Remedies: {REMEDIES}. Every score is in {REPORT} (kept in the run's failed/evaluate/).")


def summary(report: dict[str, Any], sets: list[ScoredSet]) -> dict[str, Any]:
    """The step's small, flat metrics: counts, the headline metric per artifact on the first task set, the verdict."""
    entries = report["sets"]
    metrics: dict[str, Any] = {
        "sets": len(entries),
        "scored": sum(len(e["scores"]) - len(e["reused"]) for e in entries),
        "reused": sum(len(e["reused"]) for e in entries),
    }
    headline = report["headline_metric"]
    first = next((e for e in entries if e["role"] == "task"), None)
    if first is not None:
        for kind, scores in first["scores"].items():
            metrics[f"{headline}.{kind}"] = scores.get(headline)
    for row in report["forgetting"]["sets"]:
        metrics[f"forgetting.{row['name']}"] = row["change"]
    metrics["forgetting"] = report["forgetting"]["verdict"]
    for kind in ("base", "train"):  # a preference objective's held-out figures
        for name, value in report.get("preference", {}).get(kind, {}).items():
            if isinstance(value, float):
                metrics[f"{name}.{kind}"] = value
    return metrics


def draw_confusions(report: dict[str, Any], out: Path) -> None:
    """confusion_<set>.png for each classifier task set, of the last artifact scored (what would be served)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for entry in report["sets"]:
        scored = [(kind, s) for kind, s in entry["scores"].items() if "confusion" in s]
        if not scored:
            continue
        kind, scores = scored[-1]
        matrix, names = scores["confusion"], scores["labels"]
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 1.2 * len(names) + 2))
        ax.imshow(matrix, cmap="Blues")
        top = max((max(row) for row in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{entry['name']}: {report['artifacts'][kind]['about']}\naccuracy {scores['accuracy']:.3f}, "
                     f"{entry['rows']} rows", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"confusion_{entry['name']}.png", dpi=100)
        plt.close(fig)
