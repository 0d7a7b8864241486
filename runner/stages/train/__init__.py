"""The train step: full fine-tune, LoRA or QLoRA with transformers' Trainer, peft and bitsandbytes.

Output folder (the stage contract in runner/stages/__init__.py):
- `model/` (full fine-tune: safetensors, config with the label map, tokenizer) or `adapter/` (peft adapter, tokenizer), each
  with `labels.json` beside it for classifiers;
- `metrics.json`, `trainer_state.json`, `loss.png` (train/eval loss curves and the metrics table), `tensorboard/`.
While it runs the folder also holds `checkpoints/` (and `launch/` under torchrun); both are removed once the step succeeded,
so the cached result stays small. The step is resumable: a killed attempt's folder comes back, and the next attempt goes on
from the newest complete checkpoint. Trainer restores the optimizer, scheduler and RNG states from it, so the result equals
an uninterrupted run's.

Several processes: with `train.distributed` the step relaunches itself through torchrun (`runner.stages.train.worker`),
one process per device; Trainer then runs DDP (or FSDP with `fsdp`/`fsdp_config`). Multi-node: run the same recipe on every
machine with MASTER_ADDR, MASTER_PORT (the first machine's address and a free port) and NODE_RANK (0..nnodes-1) set in the
environment. Every node keeps its own checkpoints and writes the outputs into its own out folder (Trainer's
save_on_each_node), so each machine can resume on its own; TensorBoard events are written on node 0 only. The nodes may
share one cache (NFS): each then works in a folder and under a lock of its own, and node 0's copy becomes the entry
(runner/execute.py); with a cache per machine, every node commits its own copy.

With `distributed.launcher: ray` the workers are Ray Train workers on a Ray cluster instead (train/ray.py): each runs
train_here as a torchrun process would, Ray restarts them from their last reported checkpoint when one dies, and this
process (the driver) gets the outputs in the out folder. Nodes that do not share a disk with the driver get the inputs by
key through the remote cache and hand the outputs back through Ray's storage (the `placement` the executor passes).

This module holds the entry point (`run`), the hardware refusals (check_hardware) and one attempt in this process
(train_here) with the out-of-memory retry around it (smaller_batch). The parts it puts together, one job each:
train_job (the Job and OutOfMemory), train_model (the model, LoRA), train_trainer (Trainer, collators, arguments),
train_guard (the gradient guard), train_checkpoints (resume points), train_results (metrics, saved outputs, loss.png)
train_torchrun (several processes; train_worker is the worker's entry point) and train/ray.py (Ray Train workers).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments, set_seed

from runner.recipe.sections import Model, QloraTrain
from runner.stages import (
    Placement,
    StageError,
    pretrained,  # called through the module: tests wrap load_model
)
from runner.stages.data import chat as data_chat
from runner.stages.shared import read_labels
from runner.stages.train import regularize
from runner.stages.train.build import build_model, parameter_counts
from runner.stages.train.checkpoints import CHECKPOINTS, checkpoint_step, drop_incomplete_checkpoints, resume_point
from runner.stages.train.job import Job, OutOfMemory, TrainConfig
from runner.stages.train.preference import train_objective
from runner.stages.train.ray import launch_ray
from runner.stages.train.results import final_eval, loss_metrics, save_outputs
from runner.stages.train.torchrun import launch_distributed
from runner.stages.train.trainer import ddp_backend, make_trainer

log = logging.getLogger(__name__)

MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")


# --- entry point ---------------------------------------------------------------------------------------------------------


def run(config: dict[str, Any], inputs: dict[str, Path], out: Path, placement: Placement | None = None) -> dict[str, Any]:
    """Train the model of `config` on the data step's dataset, resuming from the newest complete checkpoint in `out`,
    retrying with half the batch (twice the accumulation) while it runs out of accelerator memory. `placement` (from the
    executor): the inputs' keys, the remote and the recipe's requires, for Ray workers on other nodes.

    Raises:
        StageError: settings this machine cannot run (`train.liger` without CUDA or liger-kernel; flash_attention_2
            without CUDA, compute capability 8.0+ or flash-attn; `precision: fp16` on CPU; bfloat16
            precision or QLoRA compute dtype on a GPU without it; `distributed.backend: nccl` on CPU); the base or its
            tokenizer cannot be loaded (runner.stages.pretrained: no folder at model.path, a bad model.package, model.init
            without the model step's output, pickle-only weights, code that needs `trust_remote_code`); the data
            step's dataset lacks its train or test split; LoRA target_modules that do not fit the model; the gradient
            guard finds no usable gradient in the first optimizer steps; out of memory at `min_batch_size`; under
            torchrun, multi-node without MASTER_ADDR, MASTER_PORT and a valid NODE_RANK, a worker's StageError, or
            torchrun failing; on Ray, the failures runner.stages.train.ray.launch_ray lists (no cluster, too few
            CPUs/GPUs for the workers or for `requires.accelerator: cuda`, an input a node cannot fetch, workers dying
            past max_failures).
    """
    job = Job.parse(config, inputs, out, placement)
    check_hardware(job.train, job.model)
    drop_incomplete_checkpoints(job.out / CHECKPOINTS)
    attempt = launcher(job.train)
    while True:
        try:
            metrics = attempt(job)
            break
        except OutOfMemory as exc:
            job = smaller_batch(job, str(exc))
    # Checkpoints only serve a resume; the committed result keeps the final model alone.
    shutil.rmtree(job.out / CHECKPOINTS, ignore_errors=True)
    return metrics


def launcher(train: TrainConfig) -> Callable[[Job], dict[str, Any]]:
    """One attempt of the step: in this process, through torchrun, or on Ray Train workers. The Ray launcher is handed
    train_here, the code each worker runs, rather than importing this module (which imports it)."""
    if not train.distributed:
        return train_here
    if train.distributed.launcher == "ray":
        return partial(launch_ray, attempt=train_here)
    return launch_distributed


def smaller_batch(job: Job, reason: str) -> Job:
    """Half the batch, twice the accumulation: the same effective batch in less memory."""
    smaller = job.batch_size // 2
    if smaller < job.train.min_batch_size:
        raise StageError(
            f"out of accelerator memory at batch size {job.batch_size} (min_batch_size is {job.train.min_batch_size}): "
            "shorten data.max_length, set train.gradient_checkpointing, use qlora, or use a device with more memory "
            f"({reason.splitlines()[0] if reason else 'no detail'})"
        )
    log.warning(
        "out of memory at batch size %d x accumulation %d; retrying with batch size %d x accumulation %d",
        job.batch_size, job.accumulation, smaller, job.accumulation * 2,
    )
    return replace(job, batch_size=smaller, accumulation=job.accumulation * 2, oom_retries=job.oom_retries + 1)


def check_hardware(train: TrainConfig, model: Model | None = None) -> None:
    """Refuse settings this machine cannot run, before loading anything."""
    cuda = torch.cuda.is_available()
    if train.liger:
        problem = liger_problem(cuda)
        if problem:
            raise StageError(problem)
    if model is not None and model.attn_implementation == "flash_attention_2":
        problem = flash_attention_problem(cuda)
        if problem:
            raise StageError(problem)
    bf16_ok = not cuda or torch.cuda.is_bf16_supported()
    if train.precision == "fp16" and not cuda:
        raise StageError("`precision: fp16` needs a CUDA GPU; use `fp32` (or `bf16`) on CPU")
    if train.precision == "bf16" and not bf16_ok:
        raise StageError("this GPU has no bfloat16 support (needs compute capability 8.0+); use `precision: fp16` or fp32")
    if isinstance(train, QloraTrain) and train.quantization.compute_dtype == "bfloat16" and not bf16_ok:
        raise StageError("this GPU has no bfloat16 support; set `quantization.compute_dtype: float16`")
    if train.distributed and ddp_backend(train) == "nccl" and not cuda:
        raise StageError("`distributed.backend: nccl` needs CUDA GPUs; use `gloo` (or `auto`) on CPU")


def liger_problem(cuda: bool) -> str | None:
    """Why `train.liger` cannot run here, or None. The doctor (runner/hardware/verdict.py) says the same before a run."""
    if not cuda:
        return ("`train.liger: true` needs a CUDA GPU: Liger's kernels are Triton GPU kernels, and on CPU transformers "
                "would fail mid-setup; set `train.liger: false` on this machine")
    if importlib.util.find_spec("liger_kernel") is None:
        return ("`train.liger: true` needs the liger-kernel package, which is not installed here; use the CUDA "
                "environment (`env: cuda13`, envs/cuda13.txt pins it) or set `train.liger: false`")
    return None


def flash_attention_problem(cuda: bool) -> str | None:
    """Why `model.attn_implementation: flash_attention_2` cannot run here, or None (sdpa and eager run anywhere)."""
    if not cuda:
        return ("`model.attn_implementation: flash_attention_2` needs a CUDA GPU; use `sdpa` (or leave it unset) on CPU")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return (f"`model.attn_implementation: flash_attention_2` needs compute capability 8.0+ (Ampere or newer); this "
                f"GPU has {major}.{minor}: use `sdpa`")
    if importlib.util.find_spec("flash_attn") is None:
        return ("`model.attn_implementation: flash_attention_2` needs the flash-attn package, which is not installed "
                "here; install it or use `sdpa`")
    return None


# --- one attempt in this process (also what every torchrun worker runs) ----------------------------------------------


def train_here(job: Job, callbacks: Sequence[TrainerCallback] = (), resume: Path | None = None) -> dict[str, Any]:
    """One attempt in this process. A launcher may add Trainer callbacks (Ray's checkpoint reporting) and name the
    checkpoint to resume from (Ray's); otherwise the newest complete one in `checkpoints/` is taken."""
    try:
        if job.train.objective != "sft":  # dpo/orpo/kto/simpo/grpo through TRL's trainers (one process)
            return train_objective(job)
        return _train_once(job, callbacks, resume)
    except torch.cuda.OutOfMemoryError as exc:
        reason = str(exc)
    # Outside the except block the traceback, and the frames holding the model, are gone, so the memory can be freed.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise OutOfMemory(reason)


def _train_once(job: Job, callbacks: Sequence[TrainerCallback], resume: Path | None) -> dict[str, Any]:
    started = time.perf_counter()
    set_seed(job.seed)  # before the model is built: fresh heads and LoRA matrices start the same on every run
    labels = read_labels(job.inputs["data"])
    splits = read_splits(job.inputs["data"])
    tokenizer = pretrained.load_tokenizer(job.model_json, job.inputs)
    # chat recipes: the template the data step rendered with is saved with this tokenizer, so export and the server
    # render conversations as training did (data.chat_template may replace the tokenizer's own)
    template = data_chat.saved_template(job.inputs["data"])
    if template is not None:
        tokenizer.chat_template = template
    model = build_model(job, labels, tokenizer)
    counts = parameter_counts(model)
    trainer = make_trainer(job, model, tokenizer, splits, callbacks)
    # The starting point (chance for a fresh classifier head) for the metrics and the loss plot. Deterministic, and
    # every attempt runs it at the same point, so it cannot make a resumed run differ from an uninterrupted one.
    before = trainer.evaluate() if job.train.eval_before_training else {}
    resume = resume or resume_point(job.out / CHECKPOINTS)
    if resume is not None:
        log.info("resuming from %s (step %d)", resume, checkpoint_step(resume))
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    after = final_eval(trainer)
    metrics = {
        "method": job.train.method,
        **loss_metrics(trainer.state.log_history, job.model.task, before, after),
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0), 4),
        "world_size": trainer.args.world_size,
        **counts,
        "batch_size": job.batch_size,
        "gradient_accumulation": job.accumulation,
        "gpus_per_process": trainer.args.n_gpu,
        "effective_batch_size": effective_batch_size(trainer.args),
        "oom_retries": job.oom_retries,
        "resumed_from_step": checkpoint_step(resume) if resume else None,
        "train_runtime_s": round(result.metrics["train_runtime"], 3),
        **regularize.final_metrics(model),  # train.l2sp: strength, anchored parameters, final distance
    }
    save_outputs(trainer, job, labels, metrics, started)
    return metrics


def effective_batch_size(args: TrainingArguments) -> int:
    """Examples per optimizer update. `train_batch_size` is the per-device batch times the GPUs of this process: with
    several GPUs and no torchrun, Trainer wraps the model in DataParallel (world_size stays 1, n_gpu is the count)."""
    return args.train_batch_size * args.gradient_accumulation_steps * args.world_size


# --- inputs ----------------------------------------------------------------------------------------------------------


def read_splits(data: Path):  # noqa: ANN201 - datasets.DatasetDict
    from datasets import load_from_disk

    splits = load_from_disk(str(data / "dataset"))
    missing = {"train", "test"} - set(splits)
    if missing:
        raise StageError(f"the data step's dataset lacks the split(s) {sorted(missing)}")
    # Only model inputs go to the collator (the `text` column would break padding); done here rather than through
    # Trainer's signature inspection, which cannot see through a peft wrapper's **kwargs.
    return splits.select_columns([c for c in MODEL_COLUMNS if c in splits["train"].column_names])

