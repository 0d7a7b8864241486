"""The train step's result as one full-precision model: a full fine-tune as it is, a LoRA adapter merged into a freshly
loaded base, with the merge checked against base + adapter. Export, quantize and evaluate all load the trained model
here, so the model they export, quantize and score is the same one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runner.names import CLASSIFIER
from runner.recipe.sections import EXPORT_RTOL, Export, Model
from runner.stages import StageError
from runner.stages.compare import BATCH_SIZE, collect_logits, pad_token_id, torch_runner
from runner.stages.pretrained import load_dtype, load_model
from runner.stages.shared import read_labels

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def auto_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == CLASSIFIER else AutoModelForCausalLM


def label_kwargs(task: str, data_dir: Path) -> dict[str, Any]:
    """The classifier head's size and names come from the data step, so the base is built like the trained model."""
    labels = read_labels(data_dir)
    if task != CLASSIFIER or labels is None:
        return {}
    id2label = {int(i): name for i, name in labels["id2label"].items()}
    return {"num_labels": len(id2label), "id2label": id2label, "label2id": dict(labels["label2id"])}


def load_base(model_cfg: Model, inputs: dict[str, Path], **kwargs: Any) -> PreTrainedModel:
    """The base model in `model.dtype` (full precision when unset), through the model stage's loader (one way to resolve
    hub/path/init)."""
    import torch

    kwargs = {"dtype": load_dtype(model_cfg, torch.float32), **label_kwargs(model_cfg.task, inputs["data"]), **kwargs}
    return load_model(model_cfg, inputs, model_cfg.task, **kwargs)


def tokenizer_from(folder: Path, model_cfg: Model) -> PreTrainedTokenizerBase:
    """The tokenizer the train step saved beside its result (it is what the model was trained with)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=model_cfg.trust_remote_code)


def load_trained(
    model_cfg: Model, inputs: dict[str, Path], merge_adapter: bool, samples: list[dict], tolerance: Export
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """The train step's result as one full-precision model: a full fine-tune as is, an adapter merged into its base."""
    import torch

    train = inputs["train"]
    if (train / "model").is_dir():
        model = auto_class(model_cfg.task).from_pretrained(
            train / "model",
            dtype=load_dtype(model_cfg, torch.float32),
            trust_remote_code=model_cfg.trust_remote_code,
            use_safetensors=not model_cfg.allow_pickle,
        )
        refuse_quantized(model, f"the trained model in {train / 'model'}")
        return model.eval(), tokenizer_from(train / "model", model_cfg), {"merged": False}
    if not (train / "adapter").is_dir():
        raise StageError(f"the train step's output {train} has neither model/ nor adapter/: rerun the train step")
    if not merge_adapter:
        raise StageError(
            "the train step produced a LoRA adapter, and an adapter cannot be exported on its own: "
            "set `export.merge_adapter: true` to merge it into a full-precision copy of the base model"
        )
    tokenizer = tokenizer_from(train / "adapter", model_cfg)
    model, merge = merge_adapter_into_base(model_cfg, inputs, train / "adapter", samples, tokenizer, tolerance)
    return model, tokenizer, merge


def merge_adapter_into_base(
    model_cfg: Model, inputs: dict[str, Path], adapter: Path, samples: list[dict], tokenizer: Any, tolerance: Export
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Merge into a freshly loaded fp32 base (never the 4-bit one QLoRA trained over: merging into rounded weights would
    bake the rounding error into every weight), and check the merged model answers like base + adapter did.

    fp32 rounding over many layers moves logits by about 1e-5 of their scale; a broken merge moves them by the adapter's
    whole effect. The report keeps both numbers (the adapter's effect is base vs base + adapter) so a miss can be told
    apart from noise."""
    from peft import PeftModel

    base = load_base(model_cfg, inputs)
    refuse_quantized(base, f"the base model {model_cfg.hub or model_cfg.path or model_cfg.package or 'built by model.init'}")
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    pad_id = pad_token_id(tokenizer)
    before = collect_logits(torch_runner(peft_model), samples[:BATCH_SIZE], pad_id)
    with peft_model.disable_adapter():
        plain = collect_logits(torch_runner(peft_model), samples[:BATCH_SIZE], pad_id)
    merged = peft_model.merge_and_unload().eval()
    after = collect_logits(torch_runner(merged), samples[:BATCH_SIZE], pad_id)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(before, after, strict=True))
    effect = max(float(np.abs(a - b).max()) for a, b in zip(before, plain, strict=True))
    scale = max(float(np.abs(a).max()) for a in before)
    allowed = tolerance.tolerance(scale)
    # model.dtype bfloat16/float16: the merged weights are rounded to that dtype, so the gate allows its rounding
    rounding = {"bfloat16": "bf16", "float16": "fp16"}.get(str(next(merged.parameters()).dtype).removeprefix("torch."))
    if rounding is not None:
        allowed = max(allowed, EXPORT_RTOL[rounding] * max(scale, 1.0))
    if not diff <= allowed:
        raise StageError(
            f"merging the adapter changed the logits by {diff:.3g} (> {allowed:.3g}, the export tolerance at logit scale "
            f"{scale:.3g}); the adapter itself moves them by {effect:.3g}: the merge is broken"
        )
    return merged, {"merged": True, "merge_max_abs_diff": diff, "adapter_effect_max_abs": effect, "tolerance": allowed}


def refuse_quantized(model: PreTrainedModel, what: str) -> None:
    """Rounded (bitsandbytes/GPTQ...) weights can neither take a merge exactly nor go through the ONNX exporter."""
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
        raise StageError(
            f"{what} is a quantized checkpoint; adapters are merged into, and exports made from, full-precision weights "
            "only: point `model` at the unquantized base (QLoRA's 4-bit base is reloaded in fp32 here automatically)"
        )


# --- classifiers: torch.onnx dynamo export ---------------------------------------------------------------------------
