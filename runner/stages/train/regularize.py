"""L2-SP (`train.l2sp`): a full fine-tune pulled toward its pretrained weights, against catastrophic forgetting.

The loss becomes `task loss + l2sp * sum((w - w0)^2)` over the pretrained parameters, w0 being a frozen copy of the
weights as the base checkpoint gave them (Li, Grandvalet and Davoine 2018, "Explicit inductive bias for transfer learning
with convolutional networks"). A parameter the checkpoint lacked (the classifier head that a bare encoder such as
all-MiniLM-L6-v2 has no weights for, or a head resized to another label count) was freshly initialized: it has no
pretrained value to be pulled to, so it is left out, as the paper leaves the new task layers out of the SP term.

How it fits the train stage (runner/stages/train/__init__.py, train_model.py and train_trainer.py call these, nothing else):
- `load_kwargs` asks `from_pretrained` for its loading report and `attach` takes the copy right after loading, from the
  base model. A resumed attempt rebuilds the model from the base and only then loads the checkpoint's weights (inside
  `Trainer.train`), so w0 stays the *pretrained* weights, never the checkpoint's.
- The copy rides on the model as a plain attribute (not a buffer: buffers would go into the saved weights and DDP would
  broadcast them every step). It is moved to each parameter's device the first time the penalty is computed (Trainer
  moves the model after it is built).
- `micro_batch_term` gives the penalty's share of one micro-batch's loss, so that one optimizer step adds it once
  whatever the gradient accumulation (see its docstring). Under DDP every rank holds the same weights and the same copy,
  so each computes the same penalty and the averaged gradient is that penalty's gradient.
- The penalty is computed with `mse_loss(w, w0, reduction="sum")`, which saves its two inputs (tensors that exist
  anyway) for the backward pass, not the difference: the only memory it adds is the copy itself. Its gradient reaches
  every parameter at the start of the backward pass, so the gradients are alive during the whole of it (the doctor,
  runner/hardware/estimate.py, counts both).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional

ATTRIBUTE = "l2sp_anchor"


@dataclass
class Anchor:
    """The frozen pretrained weights (by parameter name) and what the penalty added since the last log."""

    strength: float
    weights: dict[str, torch.Tensor]
    excluded: tuple[str, ...]  # parameters the checkpoint did not have (fresh heads)
    # Kept as tensors, so that no step waits for the device to report a number; read at each log.
    logged_sum: torch.Tensor | float = 0.0
    logged_count: int = 0
    last_distance_sq: torch.Tensor | float = math.nan

    @property
    def numel(self) -> int:
        return sum(w.numel() for w in self.weights.values())


def load_kwargs(l2sp: float | None) -> dict[str, Any]:
    """What `from_pretrained` needs for L2-SP: its loading report, which names the freshly initialized parameters."""
    return {"output_loading_info": True} if l2sp else {}


def fresh_names(loading_info: dict[str, Any]) -> set[str]:
    """Parameters `from_pretrained` initialized itself: missing from the checkpoint, or there with another shape
    (`ignore_mismatched_sizes`; transformers reports those as (name, checkpoint shape, model shape))."""
    mismatched = {item[0] if isinstance(item, (tuple, list)) else item for item in loading_info.get("mismatched_keys", ())}
    return set(loading_info.get("missing_keys", ())) | mismatched


def snapshot(model: torch.nn.Module, strength: float, fresh: Iterable[str] = ()) -> Anchor:
    """A frozen copy of every trainable parameter but the fresh ones, in the parameter's own dtype."""
    fresh = set(fresh)
    weights, excluded = {}, []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in fresh:
            excluded.append(name)
        else:
            weights[name] = param.detach().clone()
    return Anchor(strength=strength, weights=weights, excluded=tuple(sorted(excluded)))


def attach(loaded: Any, l2sp: float | None) -> Any:
    """The model from `from_pretrained` (with `load_kwargs`: a (model, loading report) pair), carrying its Anchor."""
    if not l2sp:
        return loaded
    model, info = loaded
    setattr(model, ATTRIBUTE, snapshot(model, l2sp, fresh_names(info)))
    return model


def anchor_of(model: Any) -> Anchor | None:
    return getattr(model, ATTRIBUTE, None)


def distance_sq(model: torch.nn.Module, anchor: Anchor) -> torch.Tensor:
    """sum((w - w0)^2) over the anchored parameters, differentiable in w."""
    total: torch.Tensor | None = None
    for name, param in model.named_parameters():
        reference = anchor.weights.get(name)
        if reference is None:
            continue
        if reference.device != param.device:
            reference = anchor.weights[name] = reference.to(param.device)  # once: Trainer moved the model
        term = functional.mse_loss(param, reference, reduction="sum")
        total = term if total is None else total + term
    if total is None:
        raise ValueError("train.l2sp: none of the anchored parameters is in the model")
    return total


def penalty(model: torch.nn.Module, anchor: Anchor) -> torch.Tensor:
    """`l2sp * sum((w - w0)^2)`; remembers the value for `log_entries`."""
    squared = distance_sq(model, anchor)
    term = anchor.strength * squared
    anchor.last_distance_sq = squared.detach()
    anchor.logged_sum = anchor.logged_sum + term.detach()
    anchor.logged_count += 1
    return term


def micro_batch_term(term: torch.Tensor, loss_scaled_for_accumulation: bool, accumulation_steps: int) -> torch.Tensor:
    """The penalty's share of one micro-batch's loss, so that an optimizer step adds `term` once.

    Trainer divides a micro-batch's loss by the accumulation steps, unless the loss is already normalized over the whole
    accumulated batch (causal LMs: summed over tokens and divided by the step's token count); then the micro-batches'
    losses add up, and each must carry 1/steps of the penalty itself.
    """
    return term / accumulation_steps if loss_scaled_for_accumulation else term


def log_entries(anchor: Anchor) -> dict[str, float]:
    """For a training log entry: the mean penalty added to the loss since the previous log (`l2sp_penalty`, in loss
    units; the logged `loss` includes it) and the L2 distance of the pretrained weights from where they started."""
    if not anchor.logged_count:
        return {}
    entries = {"l2sp_penalty": float(anchor.logged_sum) / anchor.logged_count,
               "l2sp_distance": math.sqrt(float(anchor.last_distance_sq))}
    anchor.logged_sum, anchor.logged_count = 0.0, 0
    return entries


def final_metrics(model: torch.nn.Module) -> dict[str, Any]:
    """For metrics.json: the strength, the parameters anchored and left out, and the distance at the end of training."""
    anchor = anchor_of(model)
    if anchor is None:
        return {}
    with torch.no_grad():
        squared = float(distance_sq(model, anchor))
    return {"l2sp": anchor.strength, "l2sp_penalty": anchor.strength * squared, "l2sp_distance": math.sqrt(squared),
            "l2sp_params": anchor.numel, "l2sp_excluded": ", ".join(anchor.excluded) or None}
