"""Export stage: the trained model (LoRA merged into a full-precision base) to ONNX behind a hard accuracy gate.

optimum-onnx does the export (the legacy torch.onnx exporter fails on Llama with transformers 4.57). optimum's own check
only warns and uses random dummy inputs, so it is switched off; `validate_onnx` compares ONNX Runtime with PyTorch on real
eval samples from the data step and raises `StageError` on a miss. `format: safetensors` writes the merged model instead.

The loading, batching and comparison helpers here are shared with the quantize stage (same samples, same metrics).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runner.recipe.models import Export, Model
from runner.stages import StageError
from runner.stages.model import load_model

if TYPE_CHECKING:
    import onnxruntime
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
ONNX_TASKS = {"sequence-classification": "text-classification", "causal-lm": "text-generation"}
BATCH_SIZE = 8
GREEDY_PROMPTS = 4  # few prompts, few tokens: enough to catch a broken KV cache, cheap on a 7B model on CPU
GREEDY_NEW_TOKENS = 8
ORT_LEVELS = {0: "ORT_DISABLE_ALL", 1: "ORT_ENABLE_BASIC", 2: "ORT_ENABLE_EXTENDED", 99: "ORT_ENABLE_ALL"}

Batch = dict[str, np.ndarray]
Runner = Callable[[Batch], np.ndarray]  # a padded batch -> logits as float32 numpy


def run(config: dict, inputs: dict[str, Path], out: Path) -> dict:
    model_cfg = Model.model_validate(config["model"])
    cfg = Export.model_validate(config["export"])
    _seed(config.get("seed", 0))
    samples = load_samples(inputs["data"], "test", cfg.validation_samples)
    model, tokenizer, merge = load_trained(model_cfg, inputs, cfg.merge_adapter, samples, cfg.atol)
    if cfg.format == "safetensors":
        report = {"format": "safetensors", **save_merged(model, tokenizer, inputs["data"], out / "merged")}
    else:
        report = {"format": "onnx", **export_onnx(model, tokenizer, model_cfg.task, cfg, out / "onnx")}
        copy_labels(inputs["data"], out / "onnx")
        report["validation"] = validate_onnx(out / "onnx", model, samples, cfg)
    report = {"task": model_cfg.task, "merge": merge, **report}
    (out / "export_report.json").write_text(json.dumps(report, indent=2))
    return report


# --- loading the trained model ------------------------------------------------------------------------------------------


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def auto_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "sequence-classification" else AutoModelForCausalLM


def read_labels(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / "labels.json"
    return json.loads(path.read_text()) if path.is_file() else None


def label_kwargs(task: str, data_dir: Path) -> dict[str, Any]:
    """The classifier head's size and names come from the data step, so the base is built like the trained model."""
    labels = read_labels(data_dir)
    if task != "sequence-classification" or labels is None:
        return {}
    id2label = {int(i): name for i, name in labels["id2label"].items()}
    return {"num_labels": len(id2label), "id2label": id2label, "label2id": dict(labels["label2id"])}


def load_base(model_cfg: Model, inputs: dict[str, Path], **kwargs: Any) -> PreTrainedModel:
    """The base model in full precision, through the model stage's loader (one way to resolve hub/path/init)."""
    import torch

    kwargs = {"dtype": torch.float32, **label_kwargs(model_cfg.task, inputs["data"]), **kwargs}
    return load_model(model_cfg, inputs, model_cfg.task, **kwargs)


def tokenizer_from(folder: Path, model_cfg: Model) -> PreTrainedTokenizerBase:
    """The tokenizer the train step saved beside its result (it is what the model was trained with)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=model_cfg.trust_remote_code)


def load_trained(
    model_cfg: Model, inputs: dict[str, Path], merge_adapter: bool, samples: list[dict], atol: float
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """The train step's result as one full-precision model: a full fine-tune as is, an adapter merged into its base."""
    import torch

    train = inputs["train"]
    if (train / "model").is_dir():
        model = auto_class(model_cfg.task).from_pretrained(
            train / "model",
            dtype=torch.float32,
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
    model, merge = merge_adapter_into_base(model_cfg, inputs, train / "adapter", samples, tokenizer, atol)
    return model, tokenizer, merge


def merge_adapter_into_base(
    model_cfg: Model, inputs: dict[str, Path], adapter: Path, samples: list[dict], tokenizer: Any, atol: float
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Merge into a freshly loaded fp32 base (never the 4-bit one QLoRA trained over: merging into rounded weights would
    bake the rounding error into every weight), and check the merged model answers like base + adapter did."""
    from peft import PeftModel

    base = load_base(model_cfg, inputs)
    refuse_quantized(base, f"the base model {model_cfg.hub or model_cfg.path or 'built by model.init'}")
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    pad_id = pad_token_id(tokenizer)
    before = collect_logits(torch_runner(peft_model), samples[:BATCH_SIZE], pad_id)
    merged = peft_model.merge_and_unload().eval()
    after = collect_logits(torch_runner(merged), samples[:BATCH_SIZE], pad_id)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(before, after, strict=True))
    if diff > atol:
        raise StageError(f"merging the adapter changed the logits by {diff:.3g} (> atol {atol:g}): the merge is broken")
    return merged, {"merged": True, "merge_max_abs_diff": diff}


def refuse_quantized(model: PreTrainedModel, what: str) -> None:
    """Rounded (bitsandbytes/GPTQ...) weights can neither take a merge exactly nor go through the ONNX exporter."""
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
        raise StageError(
            f"{what} is a quantized checkpoint; adapters are merged into, and exports made from, full-precision weights "
            "only: point `model` at the unquantized base (QLoRA's 4-bit base is reloaded in fp32 here automatically)"
        )


# --- samples, runners, comparison ---------------------------------------------------------------------------------------


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


def ort_session(onnx_path: Path, optimization: str | None = None) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimization:
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, optimization)
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def ort_runner(session: onnxruntime.InferenceSession) -> Runner:
    """Whole sequences through the ONNX graph; a with-past decoder gets an empty cache (past length 0)."""

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
            _, heads, _, head_dim = arg.shape
            dtype = np.float16 if "float16" in arg.type else np.float32
            feed[arg.name] = np.zeros((ids.shape[0], heads, 0, head_dim), dtype=dtype)
        else:
            raise StageError(f"the ONNX graph wants an input this stage cannot provide: {arg.name} {arg.shape}")
    return feed


def collect_logits(run_model: Runner, samples: list[dict], pad_id: int) -> list[np.ndarray]:
    return [run_model(batch) for batch in batches(samples, pad_id)]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(reference: Runner, candidate: Runner, samples: list[dict], task: str, pad_id: int) -> dict[str, Any]:
    """Run both models batch by batch (a 7B vocabulary's logits never all sit in memory) and compare them: largest logit
    difference, top-1 agreement (per example for classifiers, per token for causal LM) and the eval metric of each
    (accuracy for classifiers, mean token loss for causal LM)."""
    max_diff, agree, total, score_ref, score_cand, count = 0.0, 0, 0, 0.0, 0.0, 0
    for batch in batches(samples, pad_id):
        ref, cand = reference(batch).astype(np.float64), candidate(batch).astype(np.float64)
        if task == "sequence-classification":
            keep = np.ones(len(ref), dtype=bool)
            score_ref += float((ref.argmax(-1) == batch["labels"]).sum())
            score_cand += float((cand.argmax(-1) == batch["labels"]).sum())
            count += len(ref)
        else:
            keep = batch["attention_mask"].astype(bool)
            labels = batch.get("labels", np.where(keep, batch["input_ids"], -100))[:, 1:]
            valid = labels != -100
            picked = np.where(valid, labels, 0)[..., None]
            score_ref -= float((np.take_along_axis(_log_softmax(ref[:, :-1]), picked, -1)[..., 0] * valid).sum())
            score_cand -= float((np.take_along_axis(_log_softmax(cand[:, :-1]), picked, -1)[..., 0] * valid).sum())
            count += int(valid.sum())
        max_diff = max(max_diff, float(np.abs(ref - cand)[keep].max()))
        agree += int((ref.argmax(-1) == cand.argmax(-1))[keep].sum())
        total += int(keep.sum())
    metric = "accuracy" if task == "sequence-classification" else "loss"
    return {
        "samples": len(samples),
        "max_abs_diff": max_diff,
        "top1_agreement": agree / max(total, 1),
        "metric": metric,
        "metric_reference": score_ref / max(count, 1),
        "metric_candidate": score_cand / max(count, 1),
    }


# --- ONNX export, optimization, validation ------------------------------------------------------------------------------


def export_onnx(model: PreTrainedModel, tokenizer: Any, task: str, cfg: Export, onnx_dir: Path) -> dict[str, Any]:
    from optimum.exporters.onnx import onnx_export_from_model

    onnx_task = ONNX_TASKS[task] + ("-with-past" if task == "causal-lm" and cfg.with_past else "")
    # optimum's validation only warns, on random inputs; validate_onnx below is the real gate
    onnx_export_from_model(model, onnx_dir, task=onnx_task, opset=cfg.opset, do_validation=False)
    tokenizer.save_pretrained(onnx_dir)  # the trained tokenizer, not whatever the base's name_or_path points at
    if cfg.optimization_level is not None:
        optimize_graph(onnx_dir / ONNX_NAME, cfg.optimization_level)
    import onnx

    graph = onnx.load(str(onnx_dir / ONNX_NAME), load_external_data=False)
    return {
        "onnx_task": onnx_task,
        "opset": max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
        "external_data": any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer),
        "optimization_level": cfg.optimization_level,
        "size_bytes": onnx_size(onnx_dir),
    }


def onnx_size(onnx_dir: Path) -> int:
    """The graph and its external data: every file the runtime reads, tokenizer and configs left out."""
    return sum(p.stat().st_size for p in onnx_dir.iterdir() if p.is_file() and p.name.startswith("model.onnx"))


def optimize_graph(onnx_path: Path, level: int) -> None:
    """Let ONNX Runtime rewrite the graph offline (constant folding, fusions) so the served model starts optimized.
    Levels above 1 may use fused kernels of this CPU type; validation runs on the rewritten graph."""
    import onnxruntime as ort

    tmp = onnx_path.parent / "_optimized"
    tmp.mkdir()
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_LEVELS[level])
    options.optimized_model_filepath = str(tmp / ONNX_NAME)
    external = (onnx_path.parent / "model.onnx_data").is_file()
    if external:  # a graph over 2 GB must keep its weights outside the protobuf
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx_data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    for produced in tmp.iterdir():
        shutil.move(str(produced), onnx_path.parent / produced.name)
    tmp.rmdir()


def copy_labels(data_dir: Path, onnx_dir: Path) -> None:
    if (data_dir / "labels.json").is_file():
        shutil.copy2(data_dir / "labels.json", onnx_dir / "labels.json")


def validate_onnx(onnx_dir: Path, torch_model: PreTrainedModel, samples: list[dict], cfg: Export) -> dict[str, Any]:
    """The gate: ONNX Runtime against PyTorch on real eval samples. Raises StageError naming the numbers on any miss."""
    from transformers import AutoTokenizer

    task = task_of(torch_model)
    # explicit False: left unset, transformers would ask on stdin (mid-step) for a tokenizer config with an auto_map
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir, trust_remote_code=False)
    pad_id = pad_token_id(tokenizer)
    result = compare(torch_runner(torch_model), ort_runner(ort_session(onnx_dir / ONNX_NAME)), samples, task, pad_id)
    result["metric_diff"] = abs(result["metric_candidate"] - result["metric_reference"])
    if task == "causal-lm":
        result["greedy"] = greedy_match(onnx_dir, torch_model, samples, pad_id)
    problems = gate_problems(result, task, cfg)
    result["passed"] = not problems
    log.info("ONNX validation: %s", json.dumps(result))
    if problems:
        raise StageError("the ONNX export does not match PyTorch: " + "; ".join(problems))
    return result


def task_of(model: PreTrainedModel) -> str:
    return "sequence-classification" if type(model).__name__.endswith("ForSequenceClassification") else "causal-lm"


def gate_problems(result: dict[str, Any], task: str, cfg: Export) -> list[str]:
    problems = []
    if not result["max_abs_diff"] <= cfg.atol:  # `not <=` so a NaN fails too
        problems.append(f"max abs logit difference {result['max_abs_diff']:.3g} > atol {cfg.atol:g}")
    if task == "sequence-classification":
        if not result["top1_agreement"] >= cfg.min_top1_agreement:
            problems.append(f"top-1 agreement {result['top1_agreement']:.4f} < {cfg.min_top1_agreement}")
        # accuracy can differ by at most the share of disagreeing predictions
        if not result["metric_diff"] <= 1 - cfg.min_top1_agreement:
            problems.append(f"accuracy differs by {result['metric_diff']:.4f}")
    else:
        # logits within atol move a token's cross-entropy by at most 2 * atol
        if not result["metric_diff"] <= 2 * cfg.atol:
            problems.append(f"eval loss differs by {result['metric_diff']:.3g} (> 2 * atol)")
        bad = [g for g in result["greedy"] if not g["identical"]]
        if bad:
            problems.append(f"greedy tokens differ on {len(bad)} of {len(result['greedy'])} prompts: {bad[0]}")
    return problems


def greedy_match(onnx_dir: Path, torch_model: Any, samples: list[dict], pad_id: int) -> list[dict]:
    """Greedy generation from the first half of a few eval texts: PyTorch against ONNX Runtime with its KV cache."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    ort_model = ORTModelForCausalLM.from_pretrained(onnx_dir, provider="CPUExecutionProvider")
    results = []
    for sample in samples[:GREEDY_PROMPTS]:
        prompt = torch.tensor([sample["input_ids"][: max(1, len(sample["input_ids"]) // 2)]])
        options = {"max_new_tokens": GREEDY_NEW_TOKENS, "do_sample": False, "pad_token_id": pad_id}
        mask = torch.ones_like(prompt)
        with torch.no_grad():
            expected = torch_model.generate(input_ids=prompt, attention_mask=mask, **options)[0, prompt.shape[1] :]
        got = ort_model.generate(input_ids=prompt, attention_mask=mask, **options)[0, prompt.shape[1] :]
        results.append(
            {
                "prompt_tokens": prompt.shape[1],
                "torch": expected.tolist(),
                "onnx": got.tolist(),
                "identical": expected.tolist() == got.tolist(),
            }
        )
    return results


# --- merged safetensors -------------------------------------------------------------------------------------------------


def save_merged(model: PreTrainedModel, tokenizer: Any, data_dir: Path, folder: Path) -> dict[str, Any]:
    """The merged model for people who serve with transformers; reloaded once to prove the files are complete."""
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    copy_labels(data_dir, folder)
    saved = type(model).from_pretrained(folder).state_dict()
    for name, tensor in model.state_dict().items():
        if name in saved and not saved[name].equal(tensor):
            raise StageError(f"the saved merged model differs from the merged model in memory at {name}")
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"size_bytes": size}
