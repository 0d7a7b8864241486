"""Two models run on the same samples, and their outputs compared: the machinery of every gate.

export checks the ONNX graph against the PyTorch model, quantize the int8/int4 model against the fp32 one, and evaluate
scores each artifact with the same batches. All of them read the data step's rows (`load_samples`), pad them the same
way (`batches`: right-padded, -100 on padded labels) and run a model through a `Runner` (a padded batch -> float32
logits): `torch_runner` for PyTorch, `ort_runner` for an ONNX Runtime session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runner import genai
from runner.names import CLASSIFIER
from runner.stages import StageError

if TYPE_CHECKING:
    import onnxruntime
    import torch

BATCH_SIZE = 8
Batch = dict[str, np.ndarray]
Runner = Callable[[Batch], np.ndarray]  # a padded batch -> logits as float32 numpy


def load_samples(data_dir: Path, split: str, n: int) -> list[dict[str, Any]]:
    """The first n rows of a split (the data step shuffled with the recipe seed already): the same rows on every run."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(data_dir / "dataset"))
    if split not in dataset or len(dataset[split]) == 0:
        raise StageError(f"the data step's dataset has no `{split}` rows to validate with")
    rows = dataset[split].select(range(min(n, len(dataset[split]))))
    return [{k: row[k] for k in ("input_ids", "attention_mask", "labels") if k in row} for row in rows]


def pad_token_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def batches(samples: list[dict], pad_id: int, size: int = BATCH_SIZE) -> Iterator[Batch]:
    """Right-padded int64 batches; token labels (causal LM) are padded with -100 so padding never counts."""
    for start in range(0, len(samples), size):
        chunk = samples[start : start + size]
        width = max(len(s["input_ids"]) for s in chunk)
        batch: Batch = {
            "input_ids": np.array([s["input_ids"] + [pad_id] * (width - len(s["input_ids"])) for s in chunk]),
            "attention_mask": np.array([s["attention_mask"] + [0] * (width - len(s["attention_mask"])) for s in chunk]),
        }
        if "labels" in chunk[0]:
            labels = [s["labels"] for s in chunk]
            batch["labels"] = (
                np.array([row + [-100] * (width - len(row)) for row in labels])
                if isinstance(labels[0], list)
                else np.array(labels)
            )
        yield {k: v.astype(np.int64) for k, v in batch.items()}


def torch_runner(model: torch.nn.Module) -> Runner:
    import torch

    device = next(model.parameters()).device

    def forward(batch: Batch) -> np.ndarray:
        with torch.no_grad():
            logits = model(
                input_ids=torch.from_numpy(batch["input_ids"]).to(device),
                attention_mask=torch.from_numpy(batch["attention_mask"]).to(device),
            ).logits
        return logits.float().cpu().numpy()

    return forward


def ort_session(onnx_path: Path, optimization: str | None = None, provider: str = "cpu") -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimization:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(onnx_path), options, providers=providers)


def ort_runner(session: onnxruntime.InferenceSession) -> Runner:
    """Whole sequences through the ONNX graph; a decoder with a KV cache gets an empty cache (past length 0)."""

    def forward(batch: Batch) -> np.ndarray:
        return session.run(["logits"], ort_feed(session, batch))[0]

    return forward


def ort_feed(session: onnxruntime.InferenceSession, batch: Batch) -> dict[str, np.ndarray]:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    feed: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        if arg.name in ("input_ids", "attention_mask"):
            feed[arg.name] = batch[arg.name]
        elif arg.name == "position_ids":  # what transformers derives from the mask
            feed[arg.name] = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int64)
        elif arg.name == "token_type_ids":
            feed[arg.name] = np.zeros_like(ids)
        elif arg.name.startswith("past_key_values"):
            heads, head_dim = _past_dims(session, arg)
            dtype = {"tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}.get(arg.type, np.float32)
            feed[arg.name] = np.zeros((ids.shape[0], heads, 0, head_dim), dtype=dtype)
        else:
            raise StageError(f"the ONNX graph wants an input this stage cannot provide: {arg.name} {arg.shape}")
    return feed


def _past_dims(session: onnxruntime.InferenceSession, arg: Any) -> tuple[int, int]:
    """KV-cache heads and head size: from the graph where it fixes them, else from the builder's genai_config.json."""
    heads, head_dim = arg.shape[1], arg.shape[3]
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads, head_dim
    folder = Path(getattr(session, "_model_path", "") or ".").parent
    decoder = genai.genai_config(folder)["model"]["decoder"]
    return (heads if isinstance(heads, int) else decoder["num_key_value_heads"],
            head_dim if isinstance(head_dim, int) else decoder["head_size"])


def collect_logits(run_model: Runner, samples: list[dict], pad_id: int) -> list[np.ndarray]:
    return [run_model(batch) for batch in batches(samples, pad_id)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(reference: Runner, candidate: Runner, samples: list[dict], task: str, pad_id: int) -> dict[str, Any]:
    """Run both models batch by batch (a 7B vocabulary's logits never all sit in memory) and compare them: largest logit
    difference, top-1 agreement (per example for classifiers, per token for causal LM) and the eval metric of each
    (accuracy for classifiers, mean token loss for causal LM)."""
    max_diff, scale, agree, total, score_ref, score_cand, count = 0.0, 0.0, 0, 0, 0.0, 0.0, 0
    for batch in batches(samples, pad_id):
        ref, cand = reference(batch).astype(np.float64), candidate(batch).astype(np.float64)
        if task == CLASSIFIER:
            keep = np.ones(len(ref), dtype=bool)
            score_ref += float((ref.argmax(-1) == batch["labels"]).sum())
            score_cand += float((cand.argmax(-1) == batch["labels"]).sum())
            count += len(ref)
        else:
            keep = batch["attention_mask"].astype(bool)
            labels = batch.get("labels", np.where(keep, batch["input_ids"], -100))[:, 1:]
            valid = labels != -100
            picked = np.where(valid, labels, 0)[..., None]
            score_ref -= float((np.take_along_axis(log_softmax(ref[:, :-1]), picked, -1)[..., 0] * valid).sum())
            score_cand -= float((np.take_along_axis(log_softmax(cand[:, :-1]), picked, -1)[..., 0] * valid).sum())
            count += int(valid.sum())
        max_diff = max(max_diff, float(np.abs(ref - cand)[keep].max()))
        scale = max(scale, float(np.abs(ref)[keep].max()))
        agree += int((ref.argmax(-1) == cand.argmax(-1))[keep].sum())
        total += int(keep.sum())
    metric = "accuracy" if task == CLASSIFIER else "loss"
    return {
        "samples": len(samples),
        "max_abs_diff": max_diff,
        "reference_scale": scale,
        "top1_agreement": agree / max(total, 1),
        "metric": metric,
        "metric_reference": score_ref / max(count, 1),
        "metric_candidate": score_cand / max(count, 1),
    }
