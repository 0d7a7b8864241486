"""What a finished train attempt leaves: the final eval, the loss metrics (mean train loss over a resume, perplexity),
the saved model or adapter with a portable adapter_config.json, metrics.json, trainer_state.json and loss.png.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from transformers import Trainer

from runner.names import CLASSIFIER
from runner.recipe.sections import FullTrain
from runner.stages.shared import perplexity
from runner.stages.train.job import Job

log = logging.getLogger(__name__)


def final_eval(trainer: Trainer) -> dict[str, float]:
    """The eval at the last step: reused when the eval strategy just ran it, else run now."""
    history = trainer.state.log_history
    last = next((h for h in reversed(history) if "eval_loss" in h), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return last
    return trainer.evaluate()


def loss_metrics(history: list[dict[str, Any]], task: str, before: dict, after: dict) -> dict[str, Any]:
    names = ("loss", "accuracy", "f1") if task == CLASSIFIER else ("loss",)
    metrics: dict[str, Any] = {"train_loss": mean_train_loss(history)}
    metrics["train_loss_last"] = next((h["loss"] for h in reversed(history) if "loss" in h), None)
    for name in names:
        metrics[f"eval_{name}_before"] = before.get(f"eval_{name}")
        metrics[f"eval_{name}"] = after.get(f"eval_{name}")
    if task != CLASSIFIER:
        metrics["eval_perplexity_before"] = _perplexity(before.get("eval_loss"))
        metrics["eval_perplexity"] = _perplexity(after.get("eval_loss"))
    return metrics


def mean_train_loss(history: list[dict[str, Any]]) -> float | None:
    """Mean training loss over all steps, from the log history (which comes back with a checkpoint).

    Trainer's own `train_loss` divides the loss summed since the *resume* by all steps, so it is wrong after a resume.
    Each logged value is the mean since the previous log: weighted by interval length (LogAtCheckpoints keeps the
    intervals whole across a resume).
    """
    total, steps, previous = 0.0, 0, 0
    for entry in history:
        if "loss" in entry and "step" in entry:
            span = entry["step"] - previous
            total, steps, previous = total + entry["loss"] * span, steps + span, entry["step"]
    return round(total / steps, 6) if steps else None


def _perplexity(loss: float | None) -> float | None:
    return None if loss is None else perplexity(loss)  # a run without eval rows has no eval loss


def save_outputs(trainer: Trainer, job: Job, labels: dict | None, metrics: dict[str, Any], started: float) -> None:
    target = job.out / ("model" if isinstance(job.train, FullTrain) else "adapter")
    trainer.save_model(str(target))  # on every rank: under FSDP saving gathers the shards; only savers write
    if not trainer.args.should_save:  # rank 0, or each node's local rank 0 with save_on_each_node
        return
    (target / "training_args.bin").unlink(missing_ok=True)  # a pickle of TrainingArguments; nothing downstream reads it
    if labels is not None:
        (target / "labels.json").write_text(json.dumps(labels, indent=2))
    if target.name == "adapter":
        portable_adapter_config(target / "adapter_config.json")
        metrics["adapter_bytes"] = sum(p.stat().st_size for p in target.glob("adapter_model.*"))
    metrics["wall_time_s"] = round(time.perf_counter() - started, 3)
    trainer.state.save_to_json(str(job.out / "trainer_state.json"))
    (job.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_losses(trainer.state.log_history, metrics, job.out / "loss.png")
    log.info("trained %d steps: %s", metrics["steps"], {k: v for k, v in metrics.items() if k.startswith("eval_")})


def portable_adapter_config(path: Path) -> None:
    """The same recipe gives the same adapter_config.json on every machine: peft writes the base model's location (for
    a built or local model an absolute path into this machine's cache) and, for `all-linear`, target_modules in set
    order (which follows PYTHONHASHSEED). Nothing loads the base from that field: export passes the base model itself."""
    config = json.loads(path.read_text())
    base = config.get("base_model_name_or_path")
    if isinstance(base, str) and Path(base).is_absolute():
        config["base_model_name_or_path"] = Path(base).name
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def plot_losses(history: list[dict[str, Any]], metrics: dict[str, Any], path: Path) -> None:
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 5))
    FigureCanvasAgg(figure)
    curves, table = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(0, metrics["eval_loss_before"])] if metrics["eval_loss_before"] is not None else []
    evals += [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o--")):
        if points:
            curves.plot(*zip(*points, strict=True), style, label=label)
    curves.set(xlabel="optimizer step", ylabel="loss", title="loss")
    curves.grid(alpha=0.3)
    curves.legend()
    table.axis("off")
    rows = [[name, _cell(value)] for name, value in metrics.items() if value is not None]
    table.table(cellText=rows, colLabels=["metric", "value"], loc="center").scale(1, 1.2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)

