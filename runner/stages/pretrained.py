"""How every stage loads a base model and its tokenizer: `load_model` / `load_tokenizer`.

Hub ids, local folders, model packages and models built by the model step (`model.init`) all take the same
`from_pretrained` path, with the same safety switches:

- only safetensors weights are read unless the recipe sets `allow_pickle: true` (a pickle file can run code when loaded);
- model-shipped Python runs only with `trust_remote_code: true`. We always pass an explicit bool: transformers treats
  `None` as "ask the user on stdin", which would hang a step.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.names import CAUSAL_LM, CLASSIFIER
from runner.recipe.packages import PackageMissing
from runner.recipe.sections import Model, model_location
from runner.stages import StageError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


ModelConfig = dict[str, Any] | Model  # the JSON form from a step's config, or the validated model


def pretrained_source(model_cfg: ModelConfig, inputs: dict[str, Path]) -> tuple[str, dict[str, Any]]:
    """What to hand to `from_pretrained`: the id or folder, and the keyword arguments that pin and guard the load.

    hub  -> (hub id, {revision}); path or package -> (absolute folder, {}); init, or a path/package with gguf_file -> (the
    model step's `model/` folder, {}).
    Every source also gets `trust_remote_code` and `use_safetensors` from the recipe.
    """
    cfg = Model.model_validate(model_cfg)
    kwargs: dict[str, Any] = {}
    if cfg.hub is not None:
        source = cfg.hub
        kwargs["revision"] = cfg.revision
    elif (cfg.path is not None or cfg.package is not None) and cfg.gguf_file is None:
        try:
            folder = Path(model_location(cfg) or "").resolve()
        except PackageMissing as exc:  # uninstalled since the recipe was validated
            raise StageError(f"model.package: {exc}") from None
        if not folder.is_dir():
            # Without this check transformers would take the string for a hub id and fail with an unrelated message.
            raise StageError(f"model.path {folder} is not a folder; give a folder written by save_pretrained")
        source = str(folder)
    else:
        if "model" not in inputs:  # init, or gguf_file: the model step built or converted the model
            raise StageError("the model step's output was not passed in (inputs['model']): model.init or model.gguf_file "
                             "needs it")
        source = str(Path(inputs["model"]) / "model")
    kwargs["trust_remote_code"] = cfg.trust_remote_code
    kwargs["use_safetensors"] = not cfg.allow_pickle
    return source, kwargs


def load_dtype(model_cfg: ModelConfig, default: Any = None) -> Any:
    """The `dtype` to load the base in: `model.dtype` as a torch dtype (or "auto": the checkpoint's own); `default` when
    the recipe leaves it unset (train passes none: the library's default; export and evaluate pass float32)."""
    import torch

    name = Model.model_validate(model_cfg).dtype
    if name is None:
        return default
    return "auto" if name == "auto" else getattr(torch, name)


def load_tokenizer(model_cfg: ModelConfig, inputs: dict[str, Path]) -> PreTrainedTokenizerBase:
    """The model's tokenizer, ready for training: a pad token (eos when it has none, as Llama) and right padding."""
    from transformers import AutoTokenizer

    source, kwargs = pretrained_source(model_cfg, inputs)
    kwargs.pop("use_safetensors")  # a weights option; tokenizers would keep it as an unknown init kwarg
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, source, kwargs, "tokenizer")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Llama-like tokenizers ship without one; padded positions are masked by attention_mask (and -100 labels).
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # causal LM training wants the real tokens first; generation sets left itself
    return tokenizer


def load_model(model_cfg: ModelConfig, inputs: dict[str, Path], task: str | None = None, **kwargs: Any) -> PreTrainedModel:
    """The base model for `task` (default: the recipe's), through `from_pretrained`.

    `kwargs` go through unchanged (num_labels, id2label, label2id, ignore_mismatched_sizes, quantization_config,
    torch_dtype, device_map ...), except that the recipe's revision, trust_remote_code and use_safetensors always win.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    task = task or Model.model_validate(model_cfg).task
    autos = {CLASSIFIER: AutoModelForSequenceClassification, CAUSAL_LM: AutoModelForCausalLM}
    if task not in autos:
        raise StageError(f"unknown task {task!r}; expected one of {sorted(autos)}")
    source, guarded = pretrained_source(model_cfg, inputs)
    return _from_pretrained(autos[task].from_pretrained, source, {**kwargs, **guarded}, "model")


def _from_pretrained(loader: Callable[..., Any], source: str, kwargs: dict[str, Any], what: str) -> Any:
    """Call a `from_pretrained`, turning the failures a recipe can fix into StageErrors that say how."""
    try:
        return loader(source, **kwargs)
    except OSError as exc:
        if kwargs.get("use_safetensors") and "safetensors" in str(exc):
            raise StageError(
                f"{source} has no safetensors weights (only pickle `.bin` files?). Pickle files can run code when "
                "loaded, so they are refused: convert the model to safetensors, or set `model.allow_pickle: true` "
                f"if you trust its authors. ({exc})"
            ) from exc
        raise StageError(f"could not load the {what} from {source}: {exc}") from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise StageError(
                f"{source} needs to run Python code shipped with it; set `model.trust_remote_code: true` only if "
                f"you trust its authors. ({exc})"
            ) from exc
        raise
