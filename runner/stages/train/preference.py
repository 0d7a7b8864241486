"""The train step for a preference objective, through TRL's own trainers (no loss code of ours):
dpo -> DPOTrainer (`preference.loss_type`: sigmoid, ipo, hinge ...), kto -> KTOTrainer, orpo -> trl.experimental's
ORPOTrainer, simpo -> trl.experimental's CPOTrainer with `loss_type="simpo"`, grpo -> GRPOTrainer with the recipe's
rewards (train/rewards.py).

The reference model: with lora/qlora TRL gets the base and a `peft_config` and loads nothing more; the reference
log-probs come from the same weights with the adapter disabled. With `full`, the reference is a frozen copy taken here
before training (or none with `precompute_ref_log_probs`, which scores the data once first). ORPO, SimPO and GRPO with
`beta: 0` need no reference at all.

The TRL config takes the same TrainingArguments the SFT path builds (train_trainer.training_kwargs): the seed, the
precision said explicitly (TRL's configs default bf16 on, which CPUs refuse or emulate slowly), the checkpoints a
killed step resumes from. What comes out is what SFT leaves (train_results.save_outputs): `adapter/` or `model/`,
metrics.json, trainer_state.json whose log history carries TRL's metric names unchanged (rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, kl, reward ...), and loss.png.
"""

from __future__ import annotations

import copy
import importlib
import logging
import time
from typing import Any

import torch
from transformers import set_seed

from runner.recipe.objectives import Grpo, Preference
from runner.recipe.sections import FullTrain, QloraTrain
from runner.stages import StageError, pretrained
from runner.stages.data import chat as data_chat
from runner.stages.data.preference import SAMPLE_COLUMNS
from runner.stages.train.build import parameter_counts, qlora_bnb_config
from runner.stages.train.checkpoints import CHECKPOINTS, checkpoint_step, resume_point
from runner.stages.train.guard import GUARD_STEPS, GradientGuard
from runner.stages.train.job import Job
from runner.stages.train.results import final_eval, mean_train_loss, save_outputs
from runner.stages.train.trainer import LogAtCheckpoints, training_kwargs

log = logging.getLogger(__name__)

# The final eval's TRL metrics copied into metrics.json (before and after training), where the report reads them.
EVAL_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "kl", "reward")


def train_objective(job: Job) -> dict[str, Any]:
    """One attempt of a dpo/orpo/kto/simpo/grpo train step in this process."""
    started = time.perf_counter()
    set_seed(job.seed)  # before the model is built: LoRA matrices and the sampling of GRPO start the same every run
    splits = read_text_splits(job)
    tokenizer = pretrained.load_tokenizer(job.model_json, job.inputs)
    template = data_chat.saved_template(job.inputs["data"])  # data.chat_template rendered the rows: saved with the model
    if template is not None:
        tokenizer.chat_template = template
    if tokenizer.pad_token is None:  # TRL pads with it; saved with the tokenizer, so export pads the same way
        tokenizer.pad_token = tokenizer.eos_token
    model = load_policy(job)
    counts = parameter_counts(model)
    trainer = make_trainer(job, model, tokenizer, splits)
    if job.train.objective != "grpo":
        counts["reference_copy"] = getattr(trainer, "ref_model", None) is not None
    counts |= parameter_counts(trainer.model)  # with LoRA: the trainable share after TRL added the adapter
    evaluates = splits.get("test") is not None and job.train.objective != "grpo"
    before = trainer.evaluate() if evaluates and job.train.eval_before_training else {}
    resume = resume_point(job.out / CHECKPOINTS)
    if resume is not None:
        log.info("resuming from %s (step %d)", resume, checkpoint_step(resume))
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    after = final_eval(trainer) if evaluates else {}
    history = trainer.state.log_history
    metrics: dict[str, Any] = {
        "method": job.train.method,
        "objective": job.train.objective,
        "train_loss": mean_train_loss(history),
        "train_loss_last": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        **{f"eval_{name}_before": before.get(f"eval_{name}") for name in EVAL_METRICS if f"eval_{name}" in before},
        **{f"eval_{name}": after.get(f"eval_{name}") for name in EVAL_METRICS if f"eval_{name}" in after},
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0), 4),
        "world_size": trainer.args.world_size,
        **counts,
        "batch_size": job.batch_size,
        "gradient_accumulation": job.accumulation,
        "effective_batch_size": job.batch_size * job.accumulation * trainer.args.world_size,
        "oom_retries": job.oom_retries,
        "resumed_from_step": checkpoint_step(resume) if resume else None,
        "train_runtime_s": round(result.metrics["train_runtime"], 3),
    }
    metrics.setdefault("eval_loss_before", None)  # the loss plot reads it
    if job.train.objective == "grpo":
        metrics["reward_first"] = next((h["reward"] for h in history if "reward" in h), None)
        metrics["reward_last"] = next((h["reward"] for h in reversed(history) if "reward" in h), None)
    save_outputs(trainer, job, None, metrics, started)
    if trainer.args.should_save:  # loss.png again, with TRL's preference curves beside the loss (the report shows it)
        plot_curves(history, job.out / "loss.png")
    return metrics


# Curves drawn per objective, each a panel: TRL's metric names as logged.
PANELS: dict[str, list[tuple[str, Any]]] = {
    "grpo": [("loss", ("loss", "kl")), ("reward", ("reward", "reward_std")), ("rewards", "rewards/")],
    "pairs": [("loss", ("loss",)), ("rewards", ("rewards/chosen", "rewards/rejected", "rewards/margins")),
              ("accuracy", ("rewards/accuracies",)), ("kl", ("kl",))],
}


def plot_curves(history: list[dict[str, Any]], path: Any) -> None:
    """The train loss and TRL's preference metrics per logged step (train and eval_ entries), one panel each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = PANELS["grpo" if any("reward" in h for h in history) else "pairs"]
    panels = [(title, names) for title, names in panels
              if any(_matches(key, names) for h in history for key in h)]
    figure = Figure(figsize=(4.5 * len(panels), 4))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (title, names) in zip(axes, panels, strict=True):
        keys = sorted({k.removeprefix("eval_") for h in history for k in h if _matches(k.removeprefix("eval_"), names)})
        for key in keys:
            for prefix, style in (("", "-"), ("eval_", "o--")):
                points = [(h["step"], h[prefix + key]) for h in history if prefix + key in h and "step" in h]
                if points:
                    axis.plot(*zip(*points, strict=True), style, label=prefix + key)
        axis.set(xlabel="optimizer step", title=title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _matches(key: str, names: Any) -> bool:
    if isinstance(names, str):  # a prefix: every reward's own curve (GRPO's rewards/<name>/mean)
        return key.startswith(names) and key.endswith("/mean")
    return key in names


def read_text_splits(job: Job) -> dict[str, Any]:
    from datasets import load_from_disk

    # in memory: TRL tokenizes with Dataset.map, which would otherwise write its cache-*.arrow files into the data
    # step's committed entry (the next run finds files its manifest does not list, and quarantines the entry)
    splits = load_from_disk(str(job.inputs["data"] / "dataset"), keep_in_memory=True)
    if "train" not in splits:
        raise StageError("the data step's dataset lacks its train split")
    # TRL reads its own columns; the tokenized preferred answers are for export, quantize and evaluate (and some of
    # TRL's collators would pass them through as lists)
    splits = splits.remove_columns([c for c in SAMPLE_COLUMNS if c in splits["train"].column_names])
    return {"train": splits["train"], "test": splits["test"] if "test" in splits and len(splits["test"]) else None}


def load_policy(job: Job) -> torch.nn.Module:
    """The base the objective tunes; TRL adds the LoRA adapter itself (from `peft_config`)."""
    kwargs: dict[str, Any] = {}
    if isinstance(job.train, QloraTrain):
        kwargs |= {"quantization_config": qlora_bnb_config(job.train),
                   "device_map": {"": 0 if torch.cuda.is_available() else "cpu"}}
    if job.model.attn_implementation is not None:
        kwargs["attn_implementation"] = job.model.attn_implementation
    model = pretrained.load_model(job.model_json, job.inputs, job.model.task, **kwargs)
    if isinstance(job.train, QloraTrain):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=job.train.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def peft_config(job: Job) -> Any:
    if isinstance(job.train, FullTrain):
        return None
    from peft import LoraConfig, TaskType

    lora = job.train.lora  # type: ignore[union-attr]
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,  # type: ignore[arg-type]
                      target_modules=lora.target_modules, bias=lora.bias, task_type=TaskType.CAUSAL_LM,
                      modules_to_save=list(lora.modules_to_save) or None)


def common_kwargs(job: Job) -> dict[str, Any]:
    """The SFT path's TrainingArguments, minus what only its own Trainer reads; precision stated explicitly."""
    kwargs = training_kwargs(job)
    for name in ("label_names", "remove_unused_columns"):  # TRL's collators choose their columns themselves
        kwargs.pop(name)
    kwargs["bf16"] = job.train.precision == "bf16"  # TRL configs default bf16 on; on CPU it must be said
    kwargs["fp16"] = job.train.precision == "fp16"
    kwargs["gradient_checkpointing"] = job.train.gradient_checkpointing  # TRL's default is on
    return kwargs


def make_trainer(job: Job, model: torch.nn.Module, tokenizer: Any, splits: dict[str, Any]) -> Any:
    objective = job.train.objective
    callbacks = [GradientGuard(GUARD_STEPS), LogAtCheckpoints()]
    if objective == "grpo":
        return grpo_trainer(job, model, tokenizer, splits, callbacks)
    pref = job.train.preference or Preference()
    kwargs = common_kwargs(job)
    # data.max_length caps prompt + completion; the data step already cut prompts to preference.max_prompt_length
    max_length = _data_max_length(job)
    shared = {"model": model, "train_dataset": splits["train"], "eval_dataset": splits["test"],
              "processing_class": tokenizer, "peft_config": peft_config(job), "callbacks": callbacks}
    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**kwargs, beta=pref.beta, loss_type=[pref.loss_type], max_length=max_length,
                         label_smoothing=pref.label_smoothing, precompute_ref_log_probs=pref.precompute_ref_log_probs)
        return DPOTrainer(args=args, ref_model=reference_copy(job, model, pref), **shared)
    if objective == "kto":
        from trl import KTOConfig, KTOTrainer

        kto_args = KTOConfig(**kwargs, beta=pref.beta, max_length=max_length, desirable_weight=pref.desirable_weight,
                             undesirable_weight=pref.undesirable_weight,
                             precompute_ref_log_probs=pref.precompute_ref_log_probs)
        return KTOTrainer(args=kto_args, ref_model=reference_copy(job, model, pref), **shared)
    if objective == "orpo":
        config, trainer = experimental("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer", objective)
        return trainer(args=config(**kwargs, beta=pref.beta, max_length=max_length), **shared)
    # simpo: CPO's trainer with the SimPO loss and no behaviour-cloning term (cpo_alpha 0), as TRL documents it
    config, trainer = experimental("trl.experimental.cpo", "CPOConfig", "CPOTrainer", objective)
    return trainer(args=config(**kwargs, beta=pref.beta, max_length=max_length, loss_type="simpo", cpo_alpha=0.0,
                               simpo_gamma=pref.simpo_gamma, label_smoothing=pref.label_smoothing), **shared)


def reference_copy(job: Job, model: Any, pref: Preference) -> Any:
    """Full fine-tuning's reference: a frozen copy of the base as loaded (TRL would load it again from the config's path,
    with its own loader settings). None with LoRA (the adapter is disabled instead) or precomputed log-probs."""
    if not isinstance(job.train, FullTrain) or pref.precompute_ref_log_probs:
        return None
    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def grpo_trainer(job: Job, model: Any, tokenizer: Any, splits: dict[str, Any], callbacks: list) -> Any:
    from trl import GRPOConfig, GRPOTrainer

    from runner.stages.train.rewards import reward_functions

    grpo: Grpo = job.train.grpo  # type: ignore[assignment] # the rules require the block with objective grpo
    kwargs = common_kwargs(job)
    kwargs |= {"eval_strategy": "no", "eval_steps": None}  # held-out rewards are the evaluate step's job
    args = GRPOConfig(**kwargs, num_generations=grpo.num_generations, temperature=grpo.temperature,
                      max_completion_length=grpo.max_completion_length, beta=grpo.beta,
                      reward_weights=[reward.weight for reward in grpo.rewards], shuffle_dataset=True,
                      log_completions=False)
    rewards: list[Any] = list(reward_functions(grpo))
    return GRPOTrainer(model=model, reward_funcs=rewards, args=args, train_dataset=splits["train"],
                       processing_class=tokenizer, peft_config=peft_config(job), callbacks=callbacks)


def experimental(module: str, config: str, trainer: str, objective: str) -> tuple[Any, Any]:
    """A trainer from trl.experimental (unstable API): one clear line when this TRL lacks it."""
    import os
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the pinned version is the one tested
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = importlib.import_module(module)
        return getattr(found, config), getattr(found, trainer)
    except (ImportError, AttributeError) as exc:
        from importlib.metadata import version

        raise StageError(f"`objective: {objective}` needs {module}.{trainer}, which TRL {version('trl')} does not "
                         f"have ({exc}); install the TRL version envs/ pins") from None


def _data_max_length(job: Job) -> int:
    import json

    stats = json.loads((job.inputs["data"] / "stats.json").read_text())
    return int(stats["max_length"])
