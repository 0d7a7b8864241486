"""The gradient guard: a Trainer callback that fails the train step when its first optimizer steps get no usable
gradient (all exactly zero or not finite). The train stage adds it to every Trainer; runner/hardware/hwcheck.py runs it too.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from runner.stages import StageError

# How many optimizer steps the gradient guard inspects; fp16 needs more, since the loss scaler skips its first steps
# (gradients overflow to inf on purpose until the scale has come down).
GUARD_STEPS = 2
GUARD_STEPS_FP16 = 20


class GradientGuard(TrainerCallback):
    """Fails the step when the first optimizer steps get no usable gradient at all.

    A model can "train" with every gradient exactly zero (4-bit bitsandbytes layers repacked for CPU inference after an
    eval pass, which train.build.keep_4bit_layout prevents; a frozen graph, a detached loss) or non-finite; the loss
    curve then looks plausible while nothing is learned. The check runs in on_pre_optimizer_step: gradients are
    complete there (accumulated, clipped and, under DDP, all-reduced); by on_step_end Trainer has already zeroed them.
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
                "layers that lost their backward (bitsandbytes' CPU inference layout), fp16 overflow (use bf16 or "
                "fp32), a learning setup with no trainable parameter on the loss path."
            )


def has_usable_gradient(model: torch.nn.Module) -> bool:
    for param in model.parameters():
        grad = param.grad
        if param.requires_grad and grad is not None and bool(((grad != 0) & torch.isfinite(grad)).any()):
            return True
    return False
