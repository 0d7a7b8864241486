"""Forgetting with and without L2-SP (`train.l2sp`), measured on the same recipe.

    python bench/forgetting.py [--recipe quickstart] [--values 0,0.001,0.01,0.03,0.1,0.3,1] [--set data.select=1000 ...]
                               [--json bench/results/forgetting.json]
    python bench/forgetting.py --smoke     # l2sp off and 0.1 on 200 reviews, 3 fold draws (a minute or two; not the
                                           # README's figure)

Each value of train.l2sp is one `recipe run` of the same offline recipe through the CLI, as a user runs it (0 = the
option unset), with the same data, seed, learning rate and steps; export, quantize and serve are switched off
(overrides `export=null quantize=null serve=null`), so a run is data -> train -> evaluate, and the forgetting gate is
off (`evaluate.max_forgetting=null`: measured and reported, never failed). The default overrides make it
affordable on 2 CPU cores and make the quickstart's full fine-tune of the real all-MiniLM-L6-v2 forget measurably: one
epoch over 800 reviews at learning rate 3e-4 (6x the quickstart's).

Figures, all read back from the run folder (run.json -> each step's outputs):
- task accuracy: the trained model on the recipe's test split (evaluate_report.json, set `test`, artifact `train`);
- forgetting: the evaluate step's figure for each `general` set: linear-probe accuracy (logistic regression on the
  frozen mean-pooled encoder features, trained and tested on the set) of the base encoder minus the tuned one's;
- forgetting over 20 fold draws: the same probe (the evaluate step's code, stratified k-fold cross-validation) with 20
  other fold seeds on the same set, base vs tuned, mean and standard deviation of the drop (how much is the folds' luck);
- distance: how far the pretrained weights moved, sqrt(sum((w - w0)^2)) over the weights the base checkpoint has,
  computed here from the saved model against the base package's (with L2-SP the train step logs the same figure as
  l2sp_distance; both are kept);
- train s: the train step's training loop (Trainer's train_runtime, recorded when the step ran; the penalty's own cost
  is in it, and so is whatever else ran on the machine's shared cores at the time).

The data step and the base model's scores are cached after the first run; each train + evaluate then takes minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
# the other artifacts' steps off; the forgetting gate off (measured and reported, not failed: this measures it)
OFF = ["export=null", "quantize=null", "serve=null", "evaluate.max_forgetting=null"]
AFFORDABLE = ["data.select=1000", "train.epochs=1", "train.learning_rate=3e-4"]
# --smoke: 200 reviews, and 200 rows of each evaluate set (the probe's features are the smoke's largest cost)
SMOKE = ["data.select=200", "train.epochs=1", "train.learning_rate=3e-4", "evaluate.max_rows=200"]


def run_recipe(recipe: str, overrides: list[str], cache_dir: str | None, runs_dir: Path) -> dict[str, Any]:
    """One `recipe run`; returns its run.json (the run folder is the newest under runs_dir/<recipe name>)."""
    command = [sys.executable, "-m", "runner.cli", "run", recipe, *overrides, "--runs-dir", str(runs_dir)]
    if cache_dir:
        command += ["--cache-dir", cache_dir]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"recipe run failed ({' '.join(overrides)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    folders = sorted(p for p in runs_dir.glob("*/*") if p.is_dir() and (p / "run.json").exists())
    return json.loads((folders[-1] / "run.json").read_text())


def step(run: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(s for s in run["steps"] if s["kind"] == kind)


def moved(trained: Path, base: Path) -> float:
    """sqrt(sum((w - w0)^2)) over the weights the base checkpoint has (the encoder; a fresh head has no w0)."""
    from safetensors.torch import load_file

    start = load_file(str(base / "model.safetensors"))
    after = load_file(str(trained / "model.safetensors"))
    # the classifier's names carry the architecture's prefix (`bert.`); the bare encoder's do not
    total = 0.0
    for name, tensor in after.items():
        reference = start.get(name.split(".", 1)[1]) if "." in name else None
        if reference is not None and reference.shape == tensor.shape:
            total += float(((tensor - reference) ** 2).sum())
    return math.sqrt(total)


SPLITS = 20  # resampled probe: other fold seeds on the same general set (--smoke: SMOKE_SPLITS)
SMOKE_SPLITS = 3


@cache
def _features(model_dir: str, texts: tuple[str, ...], head: bool) -> Any:
    """Mean-pooled features of the frozen encoder, with the evaluate step's own pooling and truncation."""
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from runner.stages.evaluate.artifacts import MAX_TOKENS
    from runner.stages.evaluate.linear_probe import mean_pooled

    torch.manual_seed(0)
    model = (AutoModelForSequenceClassification if head else AutoModel).from_pretrained(model_dir).eval()
    encoder = model.base_model if head else model
    return mean_pooled(encoder, AutoTokenizer.from_pretrained(model_dir), list(texts), MAX_TOKENS)


def resampled(recipe_obj: Any, base: Path, trained: Path, splits: int = SPLITS) -> dict[str, dict[str, float]]:
    """The probe-accuracy drop averaged over `splits` fold draws (seeds 0..splits-1) of each local general set, with the
    evaluate step's probe (runner.stages.evaluate.linear_probe, cross-validated): the spread says how much of a difference is the
    folds' luck."""
    import csv
    import statistics

    from runner.stages.evaluate.linear_probe import probe_accuracy

    out = {}
    evaluate = recipe_obj.evaluate
    for spec in evaluate.sets if evaluate else []:
        path = getattr(spec.source, "path", None)
        if spec.role != "general" or path is None:
            continue
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))[: spec.max_rows or evaluate.max_rows]
        texts = tuple(row[spec.text_column] for row in rows)
        labels = [row[spec.label_column] for row in rows]
        before, after = _features(str(base), texts, False), _features(str(trained), texts, True)
        drops = [probe_accuracy(before, labels, evaluate.probe_folds, seed)["probe_accuracy"]
                 - probe_accuracy(after, labels, evaluate.probe_folds, seed)["probe_accuracy"] for seed in range(splits)]
        # the step's own folds (the recipe seed), recomputed here: they must give the step's figure
        own = (probe_accuracy(before, labels, evaluate.probe_folds, recipe_obj.seed)["probe_accuracy"]
               - probe_accuracy(after, labels, evaluate.probe_folds, recipe_obj.seed)["probe_accuracy"])
        out[spec.name] = {"mean": statistics.mean(drops), "sd": statistics.stdev(drops), "splits": splits,
                          "recipe_seed_split": own}
    return out


def measure(recipe: str, value: float, overrides: list[str], cache_dir: str | None, runs_dir: Path,
            splits: int = SPLITS) -> dict[str, Any]:
    extra = [f"train.l2sp={value}"] if value else []
    run = run_recipe(recipe, [*OFF, *overrides, *extra], cache_dir, runs_dir)
    train, evaluate = step(run, "train"), step(run, "evaluate")
    report = json.loads((Path(evaluate["outputs"]) / "evaluate_report.json").read_text())
    test = next(s for s in report["sets"] if s["name"] == "test")
    from runner.recipe import find_recipe, load_recipe
    from runner.recipe.sections import model_location

    recipe_obj = load_recipe(find_recipe(recipe), [*OFF, *overrides]).recipe
    base = Path(model_location(recipe_obj.model) or "")
    distance = moved(Path(train["outputs"]) / "model", base)
    again = resampled(recipe_obj, base, Path(train["outputs"]) / "model", splits)
    for name, figure in again.items():
        step_figure = next(f["change"] for f in report["forgetting"]["sets"] if f["name"] == name)
        if abs(figure["recipe_seed_split"] - step_figure) > 1e-9:
            print(f"warning: {name}: the evaluate step's split gives {step_figure:.4f}, recomputed here "
                  f"{figure['recipe_seed_split']:.4f}", flush=True)
    return {
        "l2sp": value,
        "task_accuracy": test["scores"]["train"]["accuracy"],
        "task_accuracy_base": test["scores"]["base"]["accuracy"],
        "forgetting": {s["name"]: {"base": s["base"], "tuned": s["tuned"], "change": s["change"]}
                       for s in report["forgetting"]["sets"]},
        "forgetting_resampled": again,
        "probe_rows": {s["name"]: s["scores"]["base"].get("probe_rows") for s in report["sets"] if s["role"] == "general"},
        "distance": distance,
        "l2sp_distance_logged": train["metrics"].get("l2sp_distance"),  # the train step's own figure: the same sum
        "l2sp_penalty_final": train["metrics"].get("l2sp_penalty"),
        "train_loss": train["metrics"].get("train_loss"),
        "eval_loss": train["metrics"].get("eval_loss"),
        "train_s": train["metrics"]["train_runtime_s"],  # the training loop, as measured when it ran (cached or not)
        "train_status": train["status"],
        "run_folder": str(runs_dir),
    }


def table(rows: list[dict[str, Any]]) -> str:
    sets = sorted({name for row in rows for name in row["forgetting"]})
    splits = next((r["splits"] for row in rows for r in row["forgetting_resampled"].values()), SPLITS)
    head = ["l2sp", "task accuracy", *[f"{s}: probe base -> tuned (forgetting, points)" for s in sets],
            *[f"{s}: forgetting over {splits} fold draws (points, mean +- sd)" for s in sets], "distance from w0", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row['l2sp']:g}" if row["l2sp"] else "off", f"{row['task_accuracy']:.3f}"]
        for name in sets:
            f = row["forgetting"][name]
            cells.append(f"{f['base']:.3f} -> {f['tuned']:.3f} ({100 * f['change']:+.1f})")
        for name in sets:
            r = row["forgetting_resampled"].get(name)
            cells.append(f"{100 * r['mean']:+.1f} +- {100 * r['sd']:.1f}" if r else "-")
        cells += [f"{row['distance']:.2f}", f"{row['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--values", default="0,0.001,0.01,0.03,0.1,0.3,1", help="train.l2sp values, 0 = unset")
    parser.add_argument("--set", action="append", dest="overrides", help=f"overrides (default: {' '.join(AFFORDABLE)})")
    parser.add_argument("--cache-dir", default=None, help="the runner's cache (default: its own default)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help=f"--values 0,0.1 with {' '.join(SMOKE)}, {SMOKE_SPLITS} fold draws")
    args = parser.parse_args()
    if args.smoke:
        args.values = "0,0.1"
    overrides = args.overrides if args.overrides is not None else (SMOKE if args.smoke else AFFORDABLE)
    values = [float(v) for v in args.values.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="forgetting-runs-") as tmp:
        for value in values:
            runs = Path(tmp) / f"l2sp-{value:g}"
            splits = SMOKE_SPLITS if args.smoke else SPLITS
            rows.append(measure(args.recipe, value, overrides, args.cache_dir, runs, splits))
            print(f"l2sp={value:g}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'run_folder'})}", flush=True)
    print(f"\n{args.recipe} {' '.join([*OFF, *overrides])}\n")
    print(table(rows))
    if args.json:
        from common import save

        save(args.json, {"recipe": args.recipe, "overrides": [*OFF, *overrides], "rows": rows})
    from common import figure

    for name in rows[0]["forgetting"]:
        drops = ", ".join(f"l2sp {row['l2sp']:g}: {100 * row['forgetting'][name]['change']:+.1f}" for row in rows)
        figure("forgetting", f"{name} probe accuracy change in points ({drops}), largest l2sp minus off",
               100 * (rows[-1]["forgetting"][name]["change"] - rows[0]["forgetting"][name]["change"]), "none", None)


if __name__ == "__main__":
    main()
