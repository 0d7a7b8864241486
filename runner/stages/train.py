"""The train step: full fine-tune, LoRA or QLoRA with transformers' Trainer, peft and bitsandbytes.

Output folder (the stage contract in runner/stages/__init__.py):
- `model/` (full fine-tune: safetensors, config with the label map, tokenizer) or `adapter/` (peft adapter, tokenizer), each
  with `labels.json` beside it for classifiers;
- `metrics.json`, `trainer_state.json`, `loss.png` (train/eval loss curves and the metrics table), `tensorboard/`.
While it runs the folder also holds `checkpoints/` (and `launch/` under torchrun); both are removed once the step succeeded,
so the cached result stays small. The step is resumable: a killed attempt's folder comes back, and the next attempt goes on
from the newest complete checkpoint. Trainer restores the optimizer, scheduler and RNG states from it, so the result equals
an uninterrupted run's.

Several processes: with `train.distributed` the step relaunches itself through torchrun (`runner.stages.train_worker`),
one process per device; Trainer then runs DDP (or FSDP with `fsdp`/`fsdp_config`). Multi-node: run the same recipe on every
machine with MASTER_ADDR, MASTER_PORT (the first machine's address and a free port) and NODE_RANK (0..nnodes-1) set in the
environment. Every node keeps its own checkpoints and writes the outputs into its own out folder (Trainer's
save_on_each_node), so each machine can resume on its own; TensorBoard events are written on node 0 only. The nodes may
share one cache (NFS): each then works in a folder and under a lock of its own, and node 0's copy becomes the entry
(runner/execute.py); with a cache per machine, every node commits its own copy.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from runner.names import CLASSIFIER
from runner.recipe.models import FullTrain, LoraTrain, Model, QloraTrain, Train
from runner.stages import StageError, data_chat, regularize
from runner.stages import model as model_stage  # called through the module: tests wrap load_model
from runner.stages.packing import PackingCollator
from runner.stages.shared import EXTRA_HEADS, bnb_config, read_labels

log = logging.getLogger(__name__)

TrainConfig = FullTrain | LoraTrain | QloraTrain
CHECKPOINTS = "checkpoints"
LAUNCH = "launch"
MODEL_COLUMNS = ("input_ids", "attention_mask", "labels")
# How many optimizer steps the gradient guard inspects; fp16 needs more, since the loss scaler skips its first steps
# (gradients overflow to inf on purpose until the scale has come down).
GUARD_STEPS = 2
GUARD_STEPS_FP16 = 20


class OutOfMemory(Exception):
    """An attempt ran out of accelerator memory; `run` retries it with a smaller batch."""


# --- the job: parsed config plus what the out-of-memory retry changes ------------------------------------------------


@dataclass(frozen=True)
class Job:
    model: Model
    train: TrainConfig
    seed: int
    inputs: dict[str, Path]
    out: Path
    batch_size: int
    accumulation: int
    oom_retries: int = 0
    packing: bool = False  # data.packing: the plan passes it as the train step's `packing` (only when on)

    @classmethod
    def parse(cls, config: dict[str, Any], inputs: dict[str, Path], out: Path) -> Job:
        train = TypeAdapter(Train).validate_python(config["train"])
        return cls(
            model=Model.model_validate(config["model"]),
            train=train,
            seed=int(config.get("seed", 42)),
            inputs={kind: Path(path) for kind, path in inputs.items()},
            out=Path(out),
            batch_size=train.batch_size,
            accumulation=train.gradient_accumulation,
            packing=bool(config.get("packing", False)),
        )

    @property
    def model_json(self) -> dict[str, Any]:
        return self.model.model_dump(mode="json")

    def to_json(self) -> dict[str, Any]:
        """The form the torchrun workers read back (see train_worker.py)."""
        return {
            "config": {"model": self.model_json, "train": self.train.model_dump(mode="json"),
                       "seed": self.seed, "packing": self.packing},
            "inputs": {kind: str(path) for kind, path in self.inputs.items()},
            "out": str(self.out),
            "retry": {"batch_size": self.batch_size, "accumulation": self.accumulation, "oom_retries": self.oom_retries},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        job = cls.parse(data["config"], data["inputs"], Path(data["out"]))
        return replace(job, **data["retry"])


# --- entry point ---------------------------------------------------------------------------------------------------------


def run(config: dict[str, Any], inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    job = Job.parse(config, inputs, out)
    check_hardware(job.train, job.model)
    drop_incomplete_checkpoints(job.out / CHECKPOINTS)
    attempt = launch_distributed if job.train.distributed else train_here
    while True:
        try:
            metrics = attempt(job)
            break
        except OutOfMemory as exc:
            job = smaller_batch(job, str(exc))
    # Checkpoints only serve a resume; the committed result keeps the final model alone.
    shutil.rmtree(job.out / CHECKPOINTS, ignore_errors=True)
    return metrics


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
    if isinstance(train, QloraTrain) and train.quantization.bits == 4 and not cuda:
        # Checked here (design.md): on CPU, bitsandbytes repacks 4-bit weights after any no-grad forward and from then
        # on every gradient is exactly zero; training "runs" and learns nothing.
        raise StageError(
            "4-bit QLoRA needs a CUDA GPU: on CPU bitsandbytes' 4-bit layers silently stop passing gradients. "
            "Use `quantization.bits: 8` (8-bit QLoRA trains on CPU), `method: lora`, or run on a GPU."
        )
    bf16_ok = not cuda or torch.cuda.is_bf16_supported()
    if train.precision == "fp16" and not cuda:
        raise StageError("`precision: fp16` needs a CUDA GPU; use `fp32` (or `bf16`) on CPU")
    if train.precision == "bf16" and not bf16_ok:
        raise StageError("this GPU has no bfloat16 support (needs compute capability 8.0+); use `precision: fp16` or fp32")
    if isinstance(train, QloraTrain) and train.quantization.compute_dtype == "bfloat16" and not bf16_ok:
        raise StageError("this GPU has no bfloat16 support; set `quantization.compute_dtype: float16`")
    if train.distributed and _backend(train) == "nccl" and not cuda:
        raise StageError("`distributed.backend: nccl` needs CUDA GPUs; use `gloo` (or `auto`) on CPU")


def liger_problem(cuda: bool) -> str | None:
    """Why `train.liger` cannot run here, or None. The doctor (runner/hardware.py) says the same before a run."""
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


def train_here(job: Job) -> dict[str, Any]:
    try:
        return _train_once(job)
    except torch.cuda.OutOfMemoryError as exc:
        reason = str(exc)
    # Outside the except block the traceback, and the frames holding the model, are gone, so the memory can be freed.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise OutOfMemory(reason)


def _train_once(job: Job) -> dict[str, Any]:
    started = time.perf_counter()
    set_seed(job.seed)  # before the model is built: fresh heads and LoRA matrices start the same on every run
    labels = read_labels(job.inputs["data"])
    splits = read_splits(job.inputs["data"])
    tokenizer = model_stage.load_tokenizer(job.model_json, job.inputs)
    # chat recipes: the template the data step rendered with is saved with this tokenizer, so export and the server
    # render conversations as training did (data.chat_template may replace the tokenizer's own)
    template = data_chat.saved_template(job.inputs["data"])
    if template is not None:
        tokenizer.chat_template = template
    model = build_model(job, labels, tokenizer)
    counts = parameter_counts(model)
    trainer = make_trainer(job, model, tokenizer, splits)
    # The starting point (chance for a fresh classifier head) for the metrics and the loss plot. Deterministic, and
    # every attempt runs it at the same point, so it cannot make a resumed run differ from an uninterrupted one.
    before = trainer.evaluate() if job.train.eval_before_training else {}
    resume = resume_point(job.out / CHECKPOINTS)
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


# --- model -----------------------------------------------------------------------------------------------------------


def build_model(job: Job, labels: dict[str, Any] | None, tokenizer: Any) -> torch.nn.Module:
    kwargs: dict[str, Any] = {}
    if job.model.task == CLASSIFIER:
        kwargs |= classifier_kwargs(labels, tokenizer)
    if isinstance(job.train, QloraTrain):
        kwargs |= {"quantization_config": qlora_bnb_config(job.train), "device_map": {"": _device()}}
    if job.model.attn_implementation is not None:
        kwargs["attn_implementation"] = job.model.attn_implementation
    kwargs |= regularize.load_kwargs(job.train.l2sp)  # L2-SP: from_pretrained also reports which weights it loaded
    # train.l2sp: the frozen copy of the pretrained weights is taken here, from the base (a resume loads the checkpoint
    # later, inside Trainer.train)
    model = regularize.attach(model_stage.load_model(job.model_json, job.inputs, job.model.task, **kwargs), job.train.l2sp)
    if job.model.task == CLASSIFIER:
        # Sequence classifiers declare **kwargs in forward() but return a per-batch mean loss, so Trainer takes them
        # for models that divide by num_items_in_batch and stops dividing by gradient_accumulation_steps: the update
        # was k times too large under accumulation (16x1 vs 8x2 ended 0.109 apart in weights, 1.7e-6 with this), and
        # DDP logged twice the loss (transformers #47688)
        model.accepts_loss_kwargs = False
    if isinstance(job.train, FullTrain):
        return model
    if isinstance(job.train, QloraTrain):
        from peft import prepare_model_for_kbit_training

        # Casts norms/heads to fp32 and makes the embedding output require grad (needed with checkpointing).
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=job.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return add_lora(model, job)


def classifier_kwargs(labels: dict[str, Any] | None, tokenizer: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id  # Llama-like classifiers need it to find the last token
    if labels is None:
        return kwargs
    id2label = {int(i): name for i, name in labels["id2label"].items()}
    # The label map rides in the model config from here to export and serving. A base whose head has another size gets
    # a fresh head of the right size instead of a load error.
    return kwargs | {
        "num_labels": len(id2label), "id2label": id2label, "label2id": dict(labels["label2id"]),
        "ignore_mismatched_sizes": True,
    }


def qlora_bnb_config(train: QloraTrain):  # noqa: ANN201 - transformers.BitsAndBytesConfig
    q = train.quantization
    return bnb_config(q.bits, q.type, q.double_quant, q.compute_dtype)


def add_lora(model: PreTrainedModel, job: Job) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    lora = job.train.lora  # type: ignore[union-attr]
    classifier = job.model.task == CLASSIFIER
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type] # annotated int; peft scales by alpha / r in floats
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        task_type=TaskType.SEQ_CLS if classifier else TaskType.CAUSAL_LM,
        # Fully trained (not adapted) modules: the recipe's, plus a classifier's head, which starts untrained.
        modules_to_save=sorted({*lora.modules_to_save, *(h for h in EXTRA_HEADS if h in names and classifier)}) or None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise StageError(f"LoRA target_modules do not fit this model ({exc}); its linear layers are: {linear}") from exc


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    peft_counts = getattr(model, "get_nb_trainable_parameters", None)
    if callable(peft_counts):  # peft counts packed 4-bit weights at their real size
        trainable, total = peft_counts()
    else:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": int(trainable), "total_params": int(total)}


def _device() -> int | str:
    return int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.is_available() else "cpu"


# --- trainer ---------------------------------------------------------------------------------------------------------


class RngPreservingTrainer(Trainer):
    """Evaluation leaves the random state as it found it.

    A checkpoint saved at an epoch boundary is written before that epoch's evaluation, which draws from the global torch
    RNG (dropout off or not, the eval DataLoader does). A run resumed from it skips that evaluation, so without this its
    next epoch would see another random state than the uninterrupted run's: different weights under the same cache key.
    """

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        import random

        states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                  torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
            if states[3] is not None:
                torch.cuda.set_rng_state_all(states[3])

    eval_collator: Any = None  # set by make_trainer: evaluation batches are padded even when training packs

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        training, self.data_collator = self.data_collator, self.eval_collator
        try:  # the DataLoader keeps the collator it was built with
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = training

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """train.l2sp: the training loss gets the L2-SP penalty (runner/stages/regularize.py); evaluation's does not."""
        result: Any = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
        anchor = regularize.anchor_of(self.accelerator.unwrap_model(model))
        if anchor is None or not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        # the same test training_step makes before dividing the loss by the accumulation steps
        scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
        term = regularize.penalty(self.accelerator.unwrap_model(model), anchor)
        loss = loss + regularize.micro_batch_term(term, bool(scaled), self.current_gradient_accumulation_steps)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        anchor = regularize.anchor_of(self.model)
        if anchor is not None and "loss" in logs:  # a training log entry: the penalty's share of its loss
            logs = {**logs, **regularize.log_entries(anchor)}
        super().log(logs, *args, **kwargs)


def padded_collator(tokenizer: Any, classifier: bool) -> Any:
    if classifier:
        return DataCollatorWithPadding(tokenizer)
    # Pads input_ids/attention_mask with the tokenizer and labels with -100 (ignored by the loss), on the same side.
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding="longest")


def packed_collator(tokenizer: Any, model: Model) -> PackingCollator:
    """data.packing (runner/stages/packing.py): one row per batch for flash_attention_2, else rows as wide as the
    batch's longest example."""
    return PackingCollator(tokenizer.pad_token_id, one_row=model.attn_implementation == "flash_attention_2")


def make_trainer(job: Job, model: torch.nn.Module, tokenizer: Any, splits: Any) -> Trainer:
    classifier = job.model.task == CLASSIFIER
    padded = padded_collator(tokenizer, classifier)
    collator = packed_collator(tokenizer, job.model) if job.packing else padded
    # transformers 5 takes the TensorBoard folder from this variable (read when the Trainer builds its callbacks)
    previous = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(job.out / "tensorboard")
    try:
        trainer = _trainer(job, model, tokenizer, splits, collator, classifier)
    finally:
        if previous is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = previous
    # Evaluation stays on padded batches with packing: Trainer averages eval loss per batch weighted by the batch's
    # size in rows, which a packed batch (one row) would change; padded, eval_loss is the same number with or without
    # packing for the same weights, so runs compare.
    if job.packing:
        trainer.eval_collator = padded
    return trainer


def _trainer(job: Job, model: torch.nn.Module, tokenizer: Any, splits: Any, collator: Any,
             classifier: bool) -> RngPreservingTrainer:
    return RngPreservingTrainer(
        model=model,
        args=training_arguments(job),
        train_dataset=splits["train"],
        eval_dataset=splits["test"],
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=classifier_metrics if classifier else None,
        callbacks=[
            GradientGuard(GUARD_STEPS_FP16 if job.train.precision == "fp16" else GUARD_STEPS),
            LogAtCheckpoints(),
        ],
    )


def training_arguments(job: Job) -> TrainingArguments:
    t = job.train
    dist = t.distributed
    return TrainingArguments(
        output_dir=str(job.out / CHECKPOINTS),
        num_train_epochs=float(t.epochs),
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=job.batch_size,
        per_device_eval_batch_size=job.batch_size,
        gradient_accumulation_steps=job.accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a share of the total steps
        weight_decay=t.weight_decay,
        bf16=t.precision == "bf16",
        fp16=t.precision == "fp16",
        use_liger_kernel=t.liger,  # check_hardware refused it without CUDA and liger-kernel
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=t.gradient_checkpointing,
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without the enable_input_require_grads hook.
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        eval_strategy=t.eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,  # the newest may be half-written when the step is killed; the one before is still whole
        save_on_each_node=bool(dist and dist.nnodes > 1),  # every machine resumes from, and commits, its own folder
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        report_to=["tensorboard"],
        seed=job.seed,
        data_seed=job.seed,
        label_names=["labels"],  # Trainer cannot read them off a peft model's forward signature
        remove_unused_columns=False,  # read_splits already kept only model inputs
        ddp_backend=_backend(t) if dist else None,
        fsdp=(dist.fsdp or "") if dist else "",
        fsdp_config=dist.fsdp_config if dist else None,
    )


def _backend(train: TrainConfig) -> str:
    chosen = train.distributed.backend if train.distributed else "auto"
    return ("nccl" if torch.cuda.is_available() else "gloo") if chosen == "auto" else chosen


def classifier_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy and macro F1 (sklearn's definition: the mean F1 over every label in the truth or the predictions)."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted = np.argmax(logits, axis=-1)
    truth = np.asarray(prediction.label_ids)
    f1 = []
    for label in np.union1d(truth, predicted):
        tp = np.sum((predicted == label) & (truth == label))
        wrong = np.sum((predicted == label) != (truth == label))  # false positives + false negatives
        f1.append(2 * tp / (2 * tp + wrong))
    return {"accuracy": float(np.mean(predicted == truth)), "f1": float(np.mean(f1))}


class GradientGuard(TrainerCallback):
    """Fails the step when the first optimizer steps get no usable gradient at all.

    A model can "train" with every gradient exactly zero (4-bit bitsandbytes layers on CPU after an eval pass, a frozen
    graph, a detached loss) or non-finite; the loss curve then looks plausible while nothing is learned. The check runs in
    on_pre_optimizer_step: gradients are complete there (accumulated, clipped and, under DDP, all-reduced); by
    on_step_end Trainer has already zeroed them.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.checked = 0
        self.usable = 0

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):  # noqa: ANN001, ANN201
        if self.checked >= self.steps or model is None:
            return
        self.checked += 1
        self.usable += has_usable_gradient(model)
        if self.checked == self.steps:
            self._verdict(state.global_step + 1)

    def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if 0 < self.checked < self.steps:  # a run shorter than the window still gets its verdict
            self._verdict(state.global_step)

    def _verdict(self, step: int) -> None:
        if self.usable == 0:
            raise StageError(
                f"gradient guard: in the first {self.checked} optimizer step(s) (up to step {step}) every trainable "
                "gradient was exactly zero or not finite, so training would learn nothing. Common causes: 4-bit "
                "QLoRA on CPU (use 8-bit or a GPU), fp16 overflow (use bf16 or fp32), a learning setup with no "
                "trainable parameter on the loss path."
            )


class LogAtCheckpoints(TrainerCallback):
    """Logs the training loss at every checkpoint and at the last step, on top of `logging_steps`.

    A logged loss is the mean since the previous log, and a resumed run restarts that interval at its checkpoint. Logging
    at each checkpoint makes the intervals of a resumed run the same as an uninterrupted one's, so the log history (and
    the mean train loss computed from it) comes out equal; logging at the end leaves no step out of that mean.
    """

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        if control.should_save or control.should_training_stop:
            control.should_log = True
        return control


def has_usable_gradient(model: torch.nn.Module) -> bool:
    for param in model.parameters():
        grad = param.grad
        if param.requires_grad and grad is not None and bool(((grad != 0) & torch.isfinite(grad)).any()):
            return True
    return False


# --- checkpoints -----------------------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def _checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()]
    return sorted(found, key=checkpoint_step, reverse=True)


def is_complete(checkpoint: Path) -> bool:
    """Trainer writes trainer_state.json last (after weights, optimizer, scheduler and RNG states): if it parses, the
    checkpoint is whole. A step killed while saving leaves a folder without it, or with a truncated one."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def resume_point(folder: Path) -> Path | None:
    """The newest complete checkpoint (transformers' get_last_checkpoint takes the newest folder, whole or not)."""
    return next((c for c in _checkpoints(folder) if is_complete(c)), None)


def drop_incomplete_checkpoints(folder: Path) -> None:
    """Remove half-written checkpoints, so checkpoint rotation and the resume never meet them."""
    for checkpoint in _checkpoints(folder):
        if not is_complete(checkpoint):
            log.warning("removing incomplete checkpoint %s (the previous attempt was killed while saving it)", checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)


# --- results ---------------------------------------------------------------------------------------------------------


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
        metrics["eval_perplexity_before"] = perplexity(before.get("eval_loss"))
        metrics["eval_perplexity"] = perplexity(after.get("eval_loss"))
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


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709


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


# --- several processes: torchrun ---------------------------------------------------------------------------------------


def launch_distributed(job: Job) -> dict[str, Any]:
    """Run the attempt as `torchrun ... -m runner.stages.train_worker`; the workers write the outputs, we read them."""
    folder = job.out / LAUNCH
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (job.out / "metrics.json").unlink(missing_ok=True)  # a stale one must not pass for this attempt's result
    spec = folder / "job.json"
    spec.write_text(json.dumps(job.to_json()))
    command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(job.train), "-m",
               "runner.stages.train_worker", str(spec)]
    log.info("launching: %s", " ".join(command))
    code, tail = _stream(command)
    failure = worker_failure(folder)
    if failure == "oom":
        raise OutOfMemory("a worker ran out of accelerator memory")
    if failure:
        raise StageError(failure)
    if code != 0 or not (job.out / "metrics.json").exists():
        raise StageError(f"torchrun exited with status {code}; its last lines:\n" + "".join(tail))
    shutil.rmtree(folder, ignore_errors=True)
    return json.loads((job.out / "metrics.json").read_text())


def torchrun_args(train: TrainConfig) -> list[str]:
    dist = train.distributed
    assert dist is not None
    args = ["--nproc_per_node", str(dist.nproc_per_node), "--nnodes", str(dist.nnodes)]
    if dist.nnodes == 1:
        return [*args, "--standalone"]  # a free local port, no rendezvous setup
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if name not in os.environ]
    if missing:
        raise StageError(
            f"multi-node training (nnodes={dist.nnodes}) needs {', '.join(missing)} in the environment on every machine: "
            "MASTER_ADDR/MASTER_PORT of node 0, and NODE_RANK 0..nnodes-1"
        )
    rank = os.environ["NODE_RANK"]
    if not (rank.isascii() and rank.isdigit()) or int(rank) >= dist.nnodes:
        raise StageError(f"NODE_RANK={rank!r}: expected this machine's number, 0..{dist.nnodes - 1} "
                         f"(train.distributed.nnodes is {dist.nnodes})")
    return [*args, "--node_rank", rank, "--master_addr", os.environ["MASTER_ADDR"],
            "--master_port", os.environ["MASTER_PORT"]]


def _stream(command: list[str]) -> tuple[int, deque[str]]:
    """Run the command, passing its output line by line to our log (the executor's step log) and keeping the tail."""
    root = str(Path(__file__).resolve().parents[2])  # the workers import `runner` from the same tree as we do
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as process:
        assert process.stdout is not None
        for line in process.stdout:
            log.info("%s", line.rstrip())
            tail.append(line)
    return process.returncode, tail


def worker_failure(folder: Path) -> str | None:
    """What a worker reported before it exited: "oom", a StageError message, or None."""
    if any(folder.glob("oom-*")):
        return "oom"
    reports = sorted(folder.glob("error-*"))
    return reports[0].read_text() if reports else None


def report_failure(job: Job, rank: int, exc: BaseException) -> None:
    """Called by a worker: leave the reason where launch_distributed looks for it."""
    folder = job.out / LAUNCH
    if isinstance(exc, OutOfMemory):
        (folder / f"oom-{rank}").write_text(str(exc))
    else:
        (folder / f"error-{rank}").write_text(str(exc))

