"""P10: a DPO step through the runner vs the same TRL DPOTrainer script written by hand, median step time side by side.

    python bench/dpo_overhead.py [--recipe recipes/tiny_dpo_lora.yaml] [--rounds 3] [--steps 20] [--json FILE] [--smoke]

Both sides are fresh processes training the same model (the recipe's model step output) on the same data (its data
step output) with the same DPOConfig settings, LoRA adapter and seed: the runner as `recipe run RECIPE --force train
--until train`, the hand-written script below as `python bench/dpo_overhead.py --by-hand ...`, which is what the TRL
documentation's DPO example becomes with the recipe's settings. Each side times every optimizer step with one
callback (from on_step_begin to on_step_end; the first two steps, which warm up allocators, are left out) and the
medians are compared. Rounds alternate. Target: ratio <= 1.03. Prints `P10 dpo overhead: R`.

--smoke: one round of 6 steps (a check that both sides run, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
WARMUP = 2


def step_timer(path: Path):  # noqa: ANN201 - a transformers.TrainerCallback
    """Writes each optimizer step's seconds to `path` (one JSON list) when training ends."""
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            self.times.append(time.perf_counter() - self.started)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            path.write_text(json.dumps(self.times))

    return StepTimer()


def through_runner(recipe: str, cache_dir: str, runs: str, times: str, overrides: list[str]) -> None:
    """`recipe run` in this process, with the step timer added to the trainer the runner builds."""
    from runner import cli
    from runner.stages.train import preference as train_preference

    build = train_preference.make_trainer

    def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        trainer = build(*args, **kwargs)
        trainer.add_callback(step_timer(Path(times)))
        return trainer

    train_preference.make_trainer = timed
    code = cli.main(["run", recipe, *overrides, "--cache-dir", cache_dir, "--runs-dir", runs, "--until", "train",
                     "--force", "train"])
    if code:
        raise SystemExit(code)


def by_hand(model_dir: str, data_dir: str, out: str, train_json: str, times: str) -> None:
    """The TRL DPO example with the recipe's settings: load, LoraConfig, DPOConfig, DPOTrainer, train, save."""
    import torch
    from datasets import load_from_disk
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cfg = json.loads(train_json)
    stats = json.loads((Path(data_dir) / "stats.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = Path(data_dir) / "chat_template.jinja"
    if template.is_file():
        tokenizer.chat_template = template.read_text()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = load_from_disk(str(Path(data_dir) / "dataset")).select_columns(["prompt", "chosen", "rejected"])
    lora, pref = cfg["lora"], cfg["preference"]
    args = DPOConfig(
        output_dir=out, num_train_epochs=cfg["epochs"], max_steps=cfg["max_steps"] or -1,
        per_device_train_batch_size=cfg["batch_size"], per_device_eval_batch_size=cfg["batch_size"],
        learning_rate=cfg["learning_rate"], lr_scheduler_type=cfg["scheduler"], warmup_steps=cfg["warmup_ratio"],
        seed=42, data_seed=42, bf16=False, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
        beta=pref["beta"], loss_type=[pref["loss_type"]], max_length=stats["max_length"],
        eval_strategy=cfg["eval_strategy"], logging_steps=cfg["logging_steps"], save_strategy="steps",
        save_steps=cfg["save_steps"], report_to=["tensorboard"],
    )
    peft = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"],
                         processing_class=tokenizer, peft_config=peft, callbacks=[step_timer(Path(times))])
    trainer.train()
    trainer.save_model(out)


def run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{done.stderr[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/tiny_dpo_lora.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="one round of 6 steps: both sides run")
    parser.add_argument("--through-runner", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--by-hand", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.through_runner:
        through_runner(*args.through_runner, args.set)
        return 0
    if args.by_hand:
        by_hand(*args.by_hand)
        return 0
    from common import figure, save

    from runner.plan import build_plan
    from runner.recipe import load_recipe
    from runner.store.local import Cache

    rounds, steps = (1, 6) if args.smoke else (args.rounds, args.steps)
    # eval off on both sides: the figure is the step, and TRL's evaluation would add the same time to both anyway
    overrides = [f"train.max_steps={steps}", "train.eval_strategy=no", "train.eval_before_training=false",
                 "train.save_steps=1000"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    medians: dict[str, list[float]] = {"runner": [], "by hand": []}
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir, runs = Path(tmp) / "cache", Path(tmp) / "runs"
        times = Path(tmp) / "times.json"

        def runner_side() -> list[str]:
            return [sys.executable, __file__, "--through-runner", args.recipe, str(cache_dir), str(runs), str(times),
                    *[f"--set={o}" for o in overrides]]

        run(runner_side(), env)  # builds the model and data steps once (cached from here on)
        steps_of = {s.kind: s for s in build_plan(load_recipe(Path(args.recipe), overrides), Cache(cache_dir).memo)}
        cache = Cache(cache_dir)
        model_dir = cache.entry("model", steps_of["model"].key).outputs / "model"  # type: ignore[union-attr]
        data_dir = cache.entry("data", steps_of["data"].key).outputs  # type: ignore[union-attr]
        hand = [sys.executable, __file__, "--by-hand", str(model_dir), str(data_dir), str(Path(tmp) / "hand"),
                json.dumps(steps_of["train"].config["train"]), str(times)]
        for _ in range(rounds):
            for name, command in (("runner", runner_side()), ("by hand", hand)):
                run(command, env)
                step_times = json.loads(times.read_text())[WARMUP:]
                medians[name].append(statistics.median(step_times))
    runner_s, hand_s = statistics.median(medians["runner"]), statistics.median(medians["by hand"])
    ratio = runner_s / hand_s
    result = {"P10": {"recipe": args.recipe, "steps": steps, "rounds": rounds, "smoke": args.smoke,
                      "median_step_s": {"runner": runner_s, "by hand": hand_s}, "ratio": ratio, "target": 1.03,
                      "met": ratio <= 1.03, "round_medians_s": medians}}
    print(f"{args.recipe}: median optimizer step over {rounds} round(s) of {steps} steps (first {WARMUP} left out)")
    print(f"runner {runner_s * 1000:.1f} ms, by hand {hand_s * 1000:.1f} ms")
    save(args.json, result)
    print(f"P10 dpo overhead: {ratio:.3f}")
    figure("P10", "dpo overhead: runner / TRL DPOTrainer by hand, median optimizer step" + (" (smoke: not a measurement)"
           if args.smoke else ""), ratio, "<= 1.03", ratio <= 1.03)
    return 0 if args.smoke or ratio <= 1.03 else 1


if __name__ == "__main__":
    raise SystemExit(main())
