"""P1: the train step through the runner vs the same Trainer training written by hand, wall time side by side.

"The same" includes what the recipe asks of training: evaluation each epoch, checkpoints every save_steps, TensorBoard.
The runner's extra work (the gradient guard, an evaluation before training, the loss plot, hashing and the cache
commit) is what the ratio measures.

    python bench/train_overhead.py [--rounds 3] [--recipe recipes/quickstart.yaml] [--json bench/results/p1.json]

Both sides are whole fresh processes (imports included) training the same model on the same tokenized data with the
same TrainingArguments: the runner as `recipe run RECIPE --force train --until train` (model and data come from its
cache), the hand-written script below as `python bench/train_overhead.py --by-hand MODEL DATA OUT`. Rounds alternate;
medians are compared. Target: ratio <= 1.03.
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
        warmup_ratio=cfg["warmup_ratio"], weight_decay=cfg["weight_decay"], lr_scheduler_type=cfg["scheduler"],
        eval_strategy="epoch", logging_steps=cfg["logging_steps"], seed=42,
        # what the recipe asks of its train step too: resumable checkpoints and TensorBoard curves
        save_strategy="steps", save_steps=cfg["save_steps"], report_to=["tensorboard"], logging_dir=f"{out}/tensorboard",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"],
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    trainer.train()
    print(json.dumps(trainer.evaluate()))
    trainer.save_model(out)




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--by-hand", nargs=4, metavar=("MODEL", "DATA", "OUT", "TRAIN_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.by_hand:
        by_hand(*args.by_hand)
        return 0
    from common import save, timed

    from runner.cache import Cache
    from runner.plan import build_plan
    from runner.recipe import load_recipe

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir, runs = Path(tmp) / "cache", Path(tmp) / "runs"
        runner = [sys.executable, "-m", "runner.cli", "run", args.recipe, "--cache-dir", str(cache_dir),
                  "--runs-dir", str(runs), "--until", "train", "--force", "train"]
        timed(runner, env)  # builds the model and data steps once (cached from here on) and warms the file cache
        loaded = load_recipe(Path(args.recipe))
        cache = Cache(cache_dir)
        steps = {s.kind: s for s in build_plan(loaded, cache.memo)}
        model_dir = cache.entry("model", steps["model"].key).outputs / "model"  # type: ignore[union-attr]
        data_dir = cache.entry("data", steps["data"].key).outputs  # type: ignore[union-attr]
        hand = [sys.executable, __file__, "--by-hand", str(model_dir), str(data_dir), str(Path(tmp) / "hand"),
                json.dumps(steps["train"].config["train"])]
        times: dict[str, list[float]] = {"runner": [], "by hand": []}
        for _ in range(args.rounds):
            times["runner"].append(timed(runner, env))
            times["by hand"].append(timed(hand, env))
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["runner"] / medians["by hand"]
    result = {"P1": {"runner_s": medians["runner"], "by_hand_s": medians["by hand"], "ratio": ratio, "target": 1.03,
                     "met": ratio <= 1.03, "rounds": times}}
    print("| figure | runner (s) | by hand (s) | ratio | target |\n|---|---|---|---|---|")
    print(f"| P1 train wall time | {medians['runner']:.1f} | {medians['by hand']:.1f} | {ratio:.3f} | <= 1.03 |")
    save(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
