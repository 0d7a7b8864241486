"""The `model` step for `model.recipe`: another recipe's trained model made this recipe's base (SFT, then DPO on it).

The source recipe's train step left a full model (`model/`: taken as it is) or a LoRA adapter (`adapter/`). An adapter
is merged into a freshly loaded full-precision copy of the source's base, with the check export makes (runner.stages.
merge: the merged model answers like base + adapter on the source's test rows), and saved as one folder. This recipe
then trains, exports and evaluates on that folder like on any local model, so nothing downstream needs to know about
the source: export merges this recipe's own adapter into it, evaluate's `base` is the source's tuned model.

Why merge rather than keep training the source's adapter: with LoRA, TRL's reference model is the policy with its
adapter disabled. On the merged weights that reference is the SFT model, which is what DPO's KL term should hold the
policy to; training on with the SFT adapter would make the untuned base the reference instead.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from runner.recipe.sections import Export, Model
from runner.stages import StageError
from runner.stages.compare import load_samples
from runner.stages.merge import merge_adapter_into_base, tokenizer_from

log = logging.getLogger(__name__)

CHECK_SAMPLES = 8  # test rows of the source recipe the merge is checked on


def run(config: dict[str, Any], inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    """Save the source recipe's trained model to out/model. `inputs`: the source's `train` and `data` steps, and its
    `model` step when that built its base.

    Raises:
        StageError: the source's train output has neither model/ nor adapter/; its base cannot be loaded
            (runner.stages.pretrained); the merge moved the logits past the export tolerance.
    """
    source = Model.model_validate(config["source"]["model"])
    train, target = inputs["train"], out / "model"
    if (train / "model").is_dir():  # a full fine-tune: already one model
        shutil.copytree(train / "model", target)
        log.info("took the full fine-tune in %s as the base", train / "model")
        return {"source": "model", "merged": False}
    if not (train / "adapter").is_dir():
        raise StageError(f"the source recipe's train output {train} has neither model/ nor adapter/: rerun its train step")
    tokenizer = tokenizer_from(train / "adapter", source)  # saved by its train step, chat template included
    samples = load_samples(inputs["data"], "test", CHECK_SAMPLES)
    merged, report = merge_adapter_into_base(source, inputs, train / "adapter", samples, tokenizer, Export())
    merged.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    log.info("merged the source recipe's adapter into its base (logits moved by %.3g)", report["merge_max_abs_diff"])
    return {"source": "adapter", **report, "parameters": merged.num_parameters()}
