"""Remedies for a recipe whose training memory does not fit: the seed guide's out-of-memory remedies, least intrusive
first (gradient checkpointing, a smaller batch with the same effective batch, LoRA, QLoRA), each estimated alone and
on top of the ones above it, and the overrides of the first that fits.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from runner.hardware.estimate import estimate
from runner.hardware.probe import GIB, Device, Machine, native_bf16
from runner.hardware.shapes import ModelMismatch, NotEstimated
from runner.recipe.document import Recipe
from runner.recipe.sections import FullTrain, QloraTrain


class Remedy(BaseModel):
    """One way to need less memory, with the estimate after applying it alone and after it and every remedy above it."""

    title: str
    overrides: list[str]
    alone_gib: float | None
    fits_alone: bool
    cumulative_gib: float
    fits_cumulative: bool
    first_fit: bool = False


Changes = dict[str, Any]  # dotted recipe path -> new value, printable as overrides


def propose_remedies(recipe: Recipe, machine: Machine, device: Device, capacity: int) -> tuple[list[Remedy], str]:
    """The seed guide's out-of-memory remedies, least intrusive first: each estimated alone and on top of the ones above."""
    rows: list[Remedy] = []
    current = recipe
    for title, make in _REMEDIES:
        title = title.format(bits="4-bit NF4" if device == "cuda" else "8-bit (4-bit needs CUDA)")
        step = make(current, machine, device, capacity)
        if not step:
            continue  # already in the recipe (or in a row above)
        alone_changes = make(recipe, machine, device, capacity)
        alone = _try_estimate(recipe, alone_changes, device) if alone_changes else None
        current = _apply(current, step)
        total = estimate(current, device).total_bytes
        rows.append(Remedy(
            title=title, overrides=_overrides(step),
            alone_gib=None if alone is None else round(alone / GIB, 2), fits_alone=alone is not None and alone <= capacity,
            cumulative_gib=round(total / GIB, 2), fits_cumulative=total <= capacity,
        ))
    first = next((row for row in rows if row.fits_cumulative), None)
    if first is None:
        best = min((row.cumulative_gib for row in rows), default=estimate(recipe, device).total_gib)
        return rows, f"nothing here fits in {capacity / GIB:.2f} GiB; with all of them it needs {best:.2f} GiB"
    first.first_fit = True
    needed: dict[str, str] = {}
    for row in rows[: rows.index(first) + 1]:
        needed.update(dict(item.split("=", 1) for item in row.overrides))
    return rows, "first fit (cumulative): " + " ".join(f"{k}={v}" for k, v in needed.items())


def _try_estimate(recipe: Recipe, changes: Changes, device: Device) -> int | None:
    try:
        return estimate(_apply(recipe, changes), device).total_bytes
    except (NotEstimated, ModelMismatch, ValidationError):
        return None


def _apply(recipe: Recipe, changes: Changes) -> Recipe:
    data = recipe.model_dump()
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = data
        for part in path:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return Recipe.model_validate(data)


def _overrides(changes: Changes) -> list[str]:
    def text(value: Any) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, list):
            return "[" + ", ".join(map(str, value)) + "]"
        return str(value)

    return [f"{key}={text(value)}" for key, value in changes.items()]


def _checkpointing(recipe: Recipe, machine: Machine, device: Device, capacity: int) -> Changes:
    return {} if recipe.train.gradient_checkpointing else {"train.gradient_checkpointing": True}


def _smaller_batch(recipe: Recipe, machine: Machine, device: Device, capacity: int) -> Changes:
    """The largest smaller batch (a divisor, so the effective batch stays exact) that fits; batch 1 if none does."""
    train = recipe.train
    for batch in (d for d in range(train.batch_size - 1, 0, -1) if train.batch_size % d == 0):
        changes = _batch_changes(recipe, batch)
        total = _try_estimate(recipe, changes, device)
        if total is not None and total <= capacity:
            return changes
    return _batch_changes(recipe, 1) if train.batch_size > 1 else {}


def _batch_changes(recipe: Recipe, batch: int) -> Changes:
    train = recipe.train
    changes: Changes = {"train.batch_size": batch,
                        "train.gradient_accumulation": train.gradient_accumulation * train.batch_size // batch}
    if train.min_batch_size > batch:
        changes["train.min_batch_size"] = batch
    return changes


# No adapter dropout: each LoRA dropout keeps a mask and a copy of its input for backward, which can cost more
# activation memory than the full fine-tune it replaces.
LORA_DEFAULTS: Changes = {"train.lora.r": 8, "train.lora.alpha": 16, "train.lora.dropout": 0.0,
                          "train.lora.target_modules": "all-linear"}


def _lora(recipe: Recipe, machine: Machine, device: Device, capacity: int) -> Changes:
    return {"train.method": "lora", **LORA_DEFAULTS} if isinstance(recipe.train, FullTrain) else {}


def _qlora(recipe: Recipe, machine: Machine, device: Device, capacity: int) -> Changes:
    train = recipe.train
    bits = 4 if device == "cuda" else 8  # 4-bit needs CUDA; 8-bit QLoRA trains on CPU
    if isinstance(train, QloraTrain) and train.quantization.bits <= bits:
        return {}
    changes: Changes = {"train.method": "qlora", **(LORA_DEFAULTS if isinstance(train, FullTrain) else {}),
                        "train.quantization.bits": bits}
    if bits == 4:
        compute = "bfloat16" if native_bf16(machine) else "float16"
        changes |= {"train.quantization.type": "nf4", "train.quantization.double_quant": True,
                    "train.quantization.compute_dtype": compute}
    return changes


_REMEDIES = [
    ("gradient checkpointing", _checkpointing),
    ("smaller batch, same effective batch (gradient accumulation)", _smaller_batch),
    ("LoRA instead of a full fine-tune", _lora),
    ("QLoRA over a {bits} base", _qlora),
]
