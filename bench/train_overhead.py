"""P1: the train step through the runner vs the same Trainer training written by hand, wall time side by side.

"The same" includes what the recipe asks of training: evaluation each epoch, checkpoints every save_steps, TensorBoard.
The runner's extra work (the gradient guard, an evaluation before training, the loss plot, hashing and the cache
commit) is what the ratio measures.

    python bench/train_overhead.py [--rounds 3] [--recipe recipes/quickstart.yaml] [--json bench/results/p1.json]
    python bench/train_overhead.py --smoke     # one round of the two main sides on 200 rows: about a minute

Both sides are whole fresh processes (imports included) training the same model on the same tokenized data with the
same TrainingArguments: the runner as `recipe run RECIPE --force train --until train` (model and data come from its
cache; a model from a package or a local path is read where it lies), the hand-written script below as
`python bench/train_overhead.py --by-hand MODEL DATA OUT`. Rounds alternate; medians are compared. Target: ratio <= 1.03.

A third side runs the runner with `train.eval_before_training=false`: the hand-written script does not evaluate before
training, so that side shows the runner's own cost (plot, guard, hashing, commit) apart from that extra pass. The
runner's extra work is a fixed number of seconds: `--set train.epochs=6` shows how it weighs on a longer training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def by_hand(model_dir: str, data_dir: str, out: str, train_cfg: str) -> None:
    """What a user writes without the runner: the seed guide's Trainer script, with the recipe's settings."""
    import numpy as np
    from datasets import load_from_disk
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    cfg = json.loads(train_cfg)
    labels = json.loads((Path(data_dir) / "labels.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels["id2label"]), id2label={int(k): v for k, v in labels["id2label"].items()},
        label2id=labels["label2id"], ignore_mismatched_sizes=True)
    data = load_from_disk(str(Path(data_dir) / "dataset")).remove_columns(["text"])

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    args = TrainingArguments(
        output_dir=out, num_train_epochs=cfg["epochs"], per_device_train_batch_size=cfg["batch_size"],
        per_device_eval_batch_size=cfg["batch_size"], learning_rate=cfg["learning_rate"],
        warmup_steps=cfg["warmup_ratio"], weight_decay=cfg["weight_decay"], lr_scheduler_type=cfg["scheduler"],
        eval_strategy="epoch", logging_steps=cfg["logging_steps"], seed=42,
        # what the recipe asks of its train step too: resumable checkpoints and TensorBoard curves
        save_strategy="steps", save_steps=cfg["save_steps"], report_to=["tensorboard"],
    )
    os.environ["TENSORBOARD_LOGGING_DIR"] = f"{out}/tensorboard"  # transformers 5's place for it
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"],
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    trainer.train()
    print(json.dumps(trainer.evaluate()))
    trainer.save_model(out)




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="recipe override for every side, e.g. --set train.epochs=6 (a longer training)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="one round, 200 rows, one epoch, without the third side")
    parser.add_argument("--by-hand", nargs=4, metavar=("MODEL", "DATA", "OUT", "TRAIN_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.by_hand:
        by_hand(*args.by_hand)
        return 0
    from common import figure, save, timed, timed_with_cpu

    from runner.plan import build_plan
    from runner.recipe import load_recipe
    from runner.stages.pretrained import pretrained_source
    from runner.store.local import Cache

    if args.smoke:
        args.rounds, args.set = 1, [*args.set, "data.select=200", "train.epochs=1"]

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir, runs = Path(tmp) / "cache", Path(tmp) / "runs"

        def runner(*overrides: str) -> list[str]:
            return [sys.executable, "-m", "runner.cli", "run", args.recipe, *args.set, *overrides, "--cache-dir",
                    str(cache_dir), "--runs-dir", str(runs), "--until", "train", "--force", "train"]

        warm = runner()
        if args.smoke:  # the data step only: one training less (the file cache is then warm for everything but train)
            warm[warm.index("--until") + 1] = "data"
        timed(warm, env)  # builds the data step (and a model.init step) once, cached from here on; warms the file cache
        loaded = load_recipe(Path(args.recipe), args.set)
        cache = Cache(cache_dir)
        steps = {s.kind: s for s in build_plan(loaded, cache.memo)}
        inputs = {"model": cache.entry("model", steps["model"].key).outputs} if "model" in steps else {}  # type: ignore[union-attr]
        model_dir, _ = pretrained_source(steps["train"].config["model"], inputs)  # the folder the train step loads
        data_dir = cache.entry("data", steps["data"].key).outputs  # type: ignore[union-attr]
        hand = [sys.executable, __file__, "--by-hand", str(model_dir), str(data_dir), str(Path(tmp) / "hand"),
                json.dumps(steps["train"].config["train"])]
        sides = {"runner": runner(),
                 # the same training without the evaluation before it, which the hand-written script does not do
                 "runner, eval_before_training=false": runner("train.eval_before_training=false"),
                 "by hand": hand}
        if args.smoke:
            del sides["runner, eval_before_training=false"]
        times: dict[str, list[float]] = {name: [] for name in sides}
        cpu: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, command in sides.items():
                wall, cpu_s = timed_with_cpu(command, env)
                times[name].append(wall)
                cpu[name].append(cpu_s)
    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu.items()}
    hand_s = medians["by hand"]
    result = {"P1": {"recipe": args.recipe, "overrides": args.set, "medians_s": medians, "target": 1.03,
                     "ratios": {name: medians[name] / hand_s for name in sides if name != "by hand"},
                     "fixed_overhead_s": {name: medians[name] - hand_s for name in sides if name != "by hand"},
                     "cpu_medians_s": cpu_medians,
                     "cpu_ratios": {name: cpu_medians[name] / cpu_medians["by hand"] for name in sides if name != "by hand"},
                     "rounds": times, "cpu_rounds": cpu}}
    result["P1"]["met"] = result["P1"]["ratios"]["runner"] <= 1.03
    print(f"{args.recipe} {' '.join(args.set)}, median of {args.rounds} alternating rounds\n")
    print("| side | wall s | ratio to by hand | extra s | CPU s | CPU ratio | target |\n|---|---:|---:|---:|---:|---:|---|")
    for name in sides:
        ratio, cpu_ratio = medians[name] / hand_s, cpu_medians[name] / cpu_medians["by hand"]
        print(f"| {name} | {medians[name]:.1f} | {ratio:.3f} | {medians[name] - hand_s:+.1f} | {cpu_medians[name]:.1f} "
              f"| {cpu_ratio:.3f} | {'<= 1.03' if name == 'runner' else ''} |")
    save(args.json, result)
    figure("P1", "train through the runner / by hand", result["P1"]["ratios"]["runner"], "<= 1.03", result["P1"]["met"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
