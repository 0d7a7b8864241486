"""The Trainer a train step runs: RngPreservingTrainer (evaluation keeps the RNG state; the L2-SP penalty), the
collators (padded, or packed with data.packing), the TrainingArguments from the recipe, the classifier metrics and the
callbacks (the gradient guard, LogAtCheckpoints).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    EvalPrediction,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from runner.names import CLASSIFIER
from runner.recipe.sections import Model
from runner.stages.shared import macro_f1
from runner.stages.train import regularize
from runner.stages.train.checkpoints import CHECKPOINTS
from runner.stages.train.guard import GUARD_STEPS, GUARD_STEPS_FP16, GradientGuard
from runner.stages.train.job import Job, TrainConfig
from runner.stages.train.packing import PackingCollator


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
        """train.l2sp: the training loss gets the L2-SP penalty (runner/stages/train/regularize.py); evaluation's does not."""
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
    """data.packing (runner/stages/train/packing.py): one row per batch for flash_attention_2, else rows as wide as the
    batch's longest example."""
    return PackingCollator(tokenizer.pad_token_id, one_row=model.attn_implementation == "flash_attention_2")


def make_trainer(job: Job, model: torch.nn.Module, tokenizer: Any, splits: Any,
                 callbacks: Sequence[TrainerCallback] = ()) -> Trainer:
    classifier = job.model.task == CLASSIFIER
    padded = padded_collator(tokenizer, classifier)
    collator = packed_collator(tokenizer, job.model) if job.packing else padded
    # transformers 5 takes the TensorBoard folder from this variable (read when the Trainer builds its callbacks)
    previous = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(job.out / "tensorboard")
    try:
        trainer = _trainer(job, model, tokenizer, splits, collator, classifier, callbacks)
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
             classifier: bool, callbacks: Sequence[TrainerCallback]) -> RngPreservingTrainer:
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
            *callbacks,
        ],
    )


def training_arguments(job: Job) -> TrainingArguments:
    return TrainingArguments(**training_kwargs(job))


def training_kwargs(job: Job) -> dict[str, Any]:
    """TrainingArguments' settings from the recipe; TRL's configs (train/preference.py) take the same on top of theirs."""
    t = job.train
    dist = t.distributed
    return dict(
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
        # torchrun multi-node: every machine resumes from, and commits, its own folder. Ray's workers share one out folder
        # (one machine, or a shared filesystem) and resume from Ray's checkpoint, so rank 0 alone writes.
        save_on_each_node=bool(dist and dist.nnodes > 1 and dist.launcher == "torchrun"),
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        report_to=["tensorboard"],
        seed=job.seed,
        data_seed=job.seed,
        label_names=["labels"],  # Trainer cannot read them off a peft model's forward signature
        remove_unused_columns=False,  # read_splits already kept only model inputs
        ddp_backend=ddp_backend(t) if dist else None,
        fsdp=(dist.fsdp or "") if dist else "",
        fsdp_config=dist.fsdp_config if dist else None,
    )


def ddp_backend(train: TrainConfig) -> str:
    chosen = train.distributed.backend if train.distributed else "auto"
    return ("nccl" if torch.cuda.is_available() else "gloo") if chosen == "auto" else chosen


def classifier_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy and macro-F1 (runner.stages.shared.macro_f1, the definition evaluate and the report use)."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    predicted = np.argmax(logits, axis=-1)
    truth = np.asarray(prediction.label_ids)
    return {"accuracy": float(np.mean(predicted == truth)), "f1": macro_f1(truth.tolist(), predicted.tolist())}


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

