"""The models the evaluate step scores, each behind one small interface, loaded the way their own consumers load them:

- `base`: the model before fine-tuning, through the model stage's loader (hub, path, package, or the model step's
  `model/` for `model.init`); a classifier's head is built from the data step's labels with the recipe seed, as the
  train step builds it, so its task accuracy is the "before" figure (chance for a bare encoder such as MiniLM).
- `train`: the train step's result through the export stage's `load_trained` (a full fine-tune as saved, an adapter
  merged into an fp32 base and checked), so evaluate scores exactly the model that was exported.
- `export` / `quantize`: the ONNX folder through the server's own loader (runner.serving.artifact.load_model): classifier
  answers from `Classifier.predict` (its tokenization, truncation and batch rule), greedy answers from `Generator`, and
  a causal LM's token loss from the graph through ONNX Runtime as the quantize stage measures it.
"""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from runner.recipe.sections import Export, Model
from runner.stages import StageError, compare, merge
from runner.stages import export as export_stage
from runner.stages.evaluate.linear_probe import mean_pooled
from runner.stages.evaluate.scores import token_loss
from runner.stages.pretrained import load_tokenizer

log = logging.getLogger(__name__)

MAX_TOKENS = 256  # longest text scored (tokens); longer texts are truncated, on every artifact alike
BATCH = 16
ABOUT = {
    "base": "base model before fine-tuning",
    "train": "trained model (torch)",
    "export": "ONNX export",
    "quantize": "quantized model",
}


class Scorer:
    """One artifact. Classifier: `classify` (label names) and, for torch models, `features` (the linear probe).
    Causal LM: `loss` over token rows, `encode` texts into token rows, `greedy` answers."""

    torch_model = False
    max_tokens = MAX_TOKENS

    def classify(self, texts: list[str]) -> list[str]:
        raise NotImplementedError

    def features(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def encode(self, texts: list[str]) -> list[dict[str, list[int]]]:
        raise NotImplementedError

    def loss(self, samples: list[dict[str, list[int]]]) -> dict[str, Any]:
        raise NotImplementedError

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        raise NotImplementedError

    def prompt_ids(self, prompt: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def close(self) -> None:
        gc.collect()


class TorchScorer(Scorer):
    torch_model = True

    def __init__(self, model: Any, tokenizer: Any, task: str) -> None:
        self.model, self.tokenizer, self.task = model.eval(), tokenizer, task
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        positions = getattr(model.config, "max_position_embeddings", None) or MAX_TOKENS
        # a classifier's text is cut where the server cuts it (the model's positions); probe and LM texts at MAX_TOKENS
        self.positions = min(int(positions), int(getattr(tokenizer, "model_max_length", positions)))
        self.max_tokens = min(MAX_TOKENS, self.positions)
        self.pad_id = compare.pad_token_id(tokenizer)

    def classify(self, texts: list[str]) -> list[str]:
        import torch

        id2label = self.model.config.id2label
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        predicted: list[str] = [""] * len(texts)
        with torch.no_grad():
            for start in range(0, len(order), BATCH):
                chunk = order[start : start + BATCH]
                enc = self.tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                     max_length=self.positions, return_tensors="pt", return_token_type_ids=False)
                logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
                for i, row in zip(chunk, logits.argmax(-1).tolist(), strict=True):
                    predicted[i] = id2label[row]
        return predicted

    def features(self, texts: list[str]) -> np.ndarray:
        return mean_pooled(self.model.base_model, self.tokenizer, texts, self.max_tokens)

    def encode(self, texts: list[str]) -> list[dict[str, list[int]]]:
        return [_row(self.tokenizer(text, truncation=True, max_length=self.max_tokens)["input_ids"]) for text in texts]

    def loss(self, samples: list[dict[str, list[int]]]) -> dict[str, Any]:
        return token_loss(compare.torch_runner(self.model), samples, self.pad_id)

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        import torch

        eos = export_stage.eos_ids(self.model, self.tokenizer)
        outputs = []
        for prompt in prompts:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=max_new_tokens, pad_token_id=self.pad_id)
            tokens = out[0, len(prompt):].tolist()
            cut = next((i for i, token in enumerate(tokens) if token in eos), len(tokens))
            outputs.append(self.decode(tokens[:cut]))
        return outputs

    def close(self) -> None:
        del self.model
        super().close()


class OnnxScorer(Scorer):
    """An ONNX artifact folder through the server's loader."""

    def __init__(self, folder: Path, model_cfg: Model) -> None:
        from runner.serving.artifact import load_model as load_served

        self.folder = folder
        self.served: Any = load_served(folder)
        self.tokenizer = merge.tokenizer_from(folder, model_cfg)  # the HF tokenizer saved beside the graph
        self.max_tokens = min(MAX_TOKENS, int(self.served.info.max_positions))
        self.session: Any = None

    def classify(self, texts: list[str]) -> list[str]:
        return [answer["label"] for answer in self.served.predict(texts)]

    def encode(self, texts: list[str]) -> list[dict[str, list[int]]]:
        return [_row(self.tokenizer(text, truncation=True, max_length=self.max_tokens)["input_ids"]) for text in texts]

    def loss(self, samples: list[dict[str, list[int]]]) -> dict[str, Any]:
        # the decoder graph over whole sequences with an empty KV cache, as the quantize stage scores it
        if self.session is None:
            provider = self.served.info.provider
            self.session = compare.ort_session(self.folder / export_stage.ONNX_NAME, provider=provider)
        return token_loss(compare.ort_runner(self.session), samples, compare.pad_token_id(self.tokenizer))

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.served.encode(prompt))

    def decode(self, ids: list[int]) -> str:
        return str(self.served.decode(ids))

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        return [self.served.decode(self.served.generate_ids(prompt, max_new_tokens=max_new_tokens)["tokens"])
                for prompt in prompts]

    def close(self) -> None:
        self.served = self.session = None
        super().close()


def _row(ids: list[int]) -> dict[str, list[int]]:
    return {"input_ids": list(ids), "attention_mask": [1] * len(ids), "labels": list(ids)}


def skipped_reason(kind: str, inputs: dict[str, Path]) -> str | None:
    """Why an artifact cannot be scored here (a bitsandbytes model on a machine without CUDA), else None."""
    if kind == "quantize" and (inputs["quantize"] / "model").is_dir() and not (inputs["quantize"] / "onnx").is_dir():
        import torch

        if not torch.cuda.is_available():
            return "a bitsandbytes model runs on CUDA only; this machine has no GPU"
    return None


def load(kind: str, model_cfg: Model, inputs: dict[str, Path], seed: int) -> Scorer:
    """The scorer for one artifact kind (base, train, export, quantize)."""
    import torch

    task = model_cfg.task
    if kind == "base":
        torch.manual_seed(seed)  # a classifier head the base lacks is drawn like the train step draws it
        return TorchScorer(merge.load_base(model_cfg, inputs), load_tokenizer(model_cfg, inputs), task)
    if kind == "train":
        samples = compare.load_samples(inputs["data"], "test", compare.BATCH_SIZE)
        model, tokenizer, _ = merge.load_trained(model_cfg, inputs, True, samples, Export())
        return TorchScorer(model, tokenizer, task)
    folder = inputs[kind]
    if (folder / "onnx" / export_stage.ONNX_NAME).is_file():
        return OnnxScorer(folder / "onnx", model_cfg)
    for name in ("merged", "model"):  # export format: safetensors; bitsandbytes quantize (on CUDA)
        if (folder / name / "config.json").is_file():
            model = merge.auto_class(task).from_pretrained(folder / name, trust_remote_code=model_cfg.trust_remote_code)
            return TorchScorer(model, merge.tokenizer_from(folder / name, model_cfg), task)
    raise StageError(f"the {kind} step's output {folder} holds no model this step can score: rerun the {kind} step")


def artifact_about(kind: str, inputs: dict[str, Path]) -> str:
    about = ABOUT[kind]
    if kind == "quantize":
        report = inputs["quantize"] / "quantize_report.json"
        if report.is_file():
            about += f" ({json.loads(report.read_text()).get('method')})"
    return about
