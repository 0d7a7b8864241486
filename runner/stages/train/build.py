"""The model a train step trains: the base loaded with its label map (classifiers), quantized for QLoRA, anchored
for L2-SP, wrapped in a LoRA adapter for lora/qlora; and its parameter counts for the metrics.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import PreTrainedModel

from runner.names import CLASSIFIER
from runner.recipe.sections import FullTrain, QloraTrain
from runner.stages import (
    StageError,
    pretrained,  # called through the module: tests wrap load_model
)
from runner.stages.shared import EXTRA_HEADS, bnb_config
from runner.stages.train import regularize
from runner.stages.train.job import Job


def build_model(job: Job, labels: dict[str, Any] | None, tokenizer: Any) -> torch.nn.Module:
    kwargs: dict[str, Any] = {}
    if job.model.task == CLASSIFIER:
        kwargs |= classifier_kwargs(labels, tokenizer)
    if isinstance(job.train, QloraTrain):
        kwargs |= {"quantization_config": qlora_bnb_config(job.train), "device_map": {"": _device()}}
    if job.model.dtype is not None:  # model.dtype; unset: the library's default, as before the field existed
        kwargs["dtype"] = pretrained.load_dtype(job.model_json)
    if job.model.attn_implementation is not None:
        kwargs["attn_implementation"] = job.model.attn_implementation
    kwargs |= regularize.load_kwargs(job.train.l2sp)  # L2-SP: from_pretrained also reports which weights it loaded
    # train.l2sp: the frozen copy of the pretrained weights is taken here, from the base (a resume loads the checkpoint
    # later, inside Trainer.train)
    model = regularize.attach(pretrained.load_model(job.model_json, job.inputs, job.model.task, **kwargs), job.train.l2sp)
    if isinstance(job.train, QloraTrain) and job.train.quantization.bits == 4:
        keep_4bit_layout(model)
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


def keep_4bit_layout(model: torch.nn.Module) -> int:
    """Keep bitsandbytes' 4-bit layers in their trainable weight layout; returns how many layers it set.

    bitsandbytes 0.50.2 on a CPU with AVX512-BF16 repacks a Linear4bit's weights into an inference layout the first time
    it runs in eval mode without grad (Trainer.evaluate, generate), and from then on computes it with `gemv_4bit`,
    which has no backward: no gradient crosses any 4-bit layer, so every LoRA adapter's gradient is exactly zero
    (measured in bench/bnb_4bit_cpu.py: |dL/dx| 8.16 before an eval forward, None after; 8.16 after with this). The layer
    decides by its `support_avx512bf16_for_cpu` attribute; off, it keeps the dequantize-and-matmul path, which does
    have a backward. GPUs never take that path.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 - a bitsandbytes attribute torch types hide
            count += 1
    return count


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
