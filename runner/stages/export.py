"""Export stage: the trained model (LoRA merged into a full-precision base) to ONNX behind a hard accuracy gate.

Two maintained exporters, by task:
- classifiers: `torch.onnx.export(dynamo=True)` with dynamic batch and sequence axes (see `export_encoder`);
- causal LMs: onnxruntime-genai's model builder, from the merged checkpoint, which this step also keeps (`merged/`) so
  the quantize step can rebuild it with int8/int4 weights (see runner.genai).
The gate compares ONNX Runtime with PyTorch on real eval samples from the data step and raises `StageError` on a miss:
logits within a tolerance relative to their scale (`Export.tolerance`), equal top-1 predictions, and for causal LMs
greedy tokens decoded by onnxruntime-genai (what the server runs) equal to torch's. `format: safetensors` writes the
merged model instead.

The trained model is loaded (an adapter merged into its base) by runner.stages.merge, as quantize and evaluate load it;
the batching and comparison helpers are in runner.stages.compare (same samples, same metrics for every gate).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runner import genai
from runner.names import CAUSAL_LM, CLASSIFIER
from runner.recipe.sections import EXPORT_RTOL, Export, Model
from runner.stages import StageError
from runner.stages.compare import (
    Batch,
    Runner,
    batches,
    compare,
    load_samples,
    ort_runner,
    ort_session,
    pad_token_id,
    torch_runner,
)
from runner.stages.merge import load_trained

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
# Weights go to one external-data file beside the graph (ONNX_NAME + ".data", the name the dynamo exporter, onnxruntime's
# quantizer and onnxruntime-genai's builder all write) from this many bytes of parameters: a protobuf holds at most
# 2 GB, and the graph is rewritten twice after export (metadata stripped, optionally optimized), so the margin is wide.
EXTERNAL_DATA_BYTES = 1 << 30
EXTERNAL_DATA_NAME = ONNX_NAME + ".data"
GREEDY_PROMPTS = 4  # few prompts, few tokens: enough to catch a broken KV cache, cheap on a 7B model on CPU
GREEDY_NEW_TOKENS = 8
ORT_LEVELS = {0: "ORT_DISABLE_ALL", 1: "ORT_ENABLE_BASIC", 2: "ORT_ENABLE_EXTENDED", 99: "ORT_ENABLE_ALL"}
# Node metadata the dynamo exporter writes: source stack traces with absolute paths, FX node names. None of it is read
# by any runtime, and it makes the bytes of the graph depend on where the code was installed.
DROPPED_METADATA = ("pkg.torch.onnx.", "pkg.onnxscript.", "namespace")



def run(config: dict, inputs: dict[str, Path], out: Path) -> dict:
    """Export the trained model to ONNX (or merged safetensors) and check it against PyTorch on the test rows.

    Raises:
        StageError: the train step's output holds neither model/ nor adapter/; a LoRA adapter without
            `export.merge_adapter`; a merge that moves the logits more than the tolerance; a quantized base; the ONNX
            logits differ from PyTorch's beyond the tolerance (`export.rtol` / `atol`), top-1 agreement is under
            `min_top1_agreement`, the accuracy or loss moved, or greedy tokens differ; the decoder builder fails or
            `execution_provider: cuda` has no GPU; the graph wants an input the gate cannot feed; the data step left
            no test rows; the saved merged checkpoint differs from the one in memory.
    """
    model_cfg = Model.model_validate(config["model"])
    cfg = Export.model_validate(config["export"])
    _seed(config.get("seed", 0))
    samples = load_samples(inputs["data"], "test", cfg.validation_samples)
    if cfg.format == "onnx" and model_cfg.task == CAUSAL_LM:
        # the decoder path loads the model itself: it must be able to free it before the builder runs
        report, merge = export_decoder(model_cfg, inputs, cfg, out, samples)
    else:
        model, tokenizer, merge = load_trained(model_cfg, inputs, cfg.merge_adapter, samples, cfg)
        if cfg.format == "onnx":
            model = model.float()  # an fp32 graph, whatever dtype model.dtype loaded and merged in
        if cfg.format == "safetensors":
            report = {"format": "safetensors", **save_merged(model, tokenizer, inputs["data"], out / "merged")}
        else:
            report = {"format": "onnx", "exporter": "torch.onnx.export(dynamo=True)",
                      **export_encoder(model, tokenizer, cfg, out / "onnx")}
            copy_labels(inputs["data"], out / "onnx")
            report["validation"] = validate_onnx(out / "onnx", model, samples, cfg)
    report = {"task": model_cfg.task, "merge": merge, **report}
    (out / "export_report.json").write_text(json.dumps(report, indent=2))
    return report


# --- loading the trained model ------------------------------------------------------------------------------------------


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def export_encoder(model: PreTrainedModel, tokenizer: Any | None, cfg: Export, onnx_dir: Path) -> dict[str, Any]:
    """`torch.onnx.export(dynamo=True)` with dynamic batch and sequence axes, inputs input_ids and attention_mask (the
    model's own zero token_type_ids buffer is baked in), output logits; then the tokenizer and config beside it."""
    import onnx
    import torch

    onnx_dir.mkdir(parents=True)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 0, 0, 0]])
    kwargs = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with torch.no_grad():
        program = torch.onnx.export(
            model, (), kwargs=kwargs, dynamo=True, opset_version=cfg.opset, optimize=True, verbose=False,
            input_names=list(kwargs), output_names=["logits"],
            dynamic_shapes={name: {0: batch, 1: sequence} for name in kwargs},
        )
    if program is None:  # only without dynamo; here it always returns the program
        raise StageError("torch.onnx.export returned no program")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    program.save(str(onnx_dir / ONNX_NAME), external_data=weights >= EXTERNAL_DATA_BYTES)
    strip_metadata(onnx_dir / ONNX_NAME)
    if tokenizer is not None:  # the trained tokenizer, not whatever the base's name_or_path points at
        tokenizer.save_pretrained(onnx_dir)
    model.config.save_pretrained(onnx_dir)
    if cfg.optimization_level is not None:
        optimize_graph(onnx_dir / ONNX_NAME, cfg.optimization_level)
    graph = onnx.load(str(onnx_dir / ONNX_NAME), load_external_data=False)
    return {
        "opset": max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
        "external_data": any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer),
        "optimization_level": cfg.optimization_level,
        "size_bytes": onnx_size(onnx_dir),
    }


def strip_metadata(onnx_path: Path) -> None:
    """Drop the exporter's per-node debugging metadata (see DROPPED_METADATA) so the same model gives the same bytes
    wherever it was exported from. Only the graph is read and rewritten: external weights stay where they are (loading
    them into the protobuf would break past 2 GB)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    for graph in [proto.graph, *(f for f in proto.functions)]:
        for node in graph.node:
            keep = [e for e in node.metadata_props if not e.key.startswith(DROPPED_METADATA)]
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
    onnx.save(proto, str(onnx_path))


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
    if external_data_files(onnx_path):  # then the rewritten graph keeps its weights outside the protobuf too
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", EXTERNAL_DATA_NAME)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    for old in external_data_files(onnx_path):  # replaced by what the optimizer wrote (or folded into the graph)
        (onnx_path.parent / old).unlink()
    for produced in tmp.iterdir():
        shutil.move(str(produced), onnx_path.parent / produced.name)
    tmp.rmdir()


def external_data_files(onnx_path: Path) -> list[str]:
    """The external-data files the graph's initializers point at (names relative to its folder), read from the graph
    itself rather than guessed: exporters differ (`model.onnx.data`, `model.onnx_data`, one file per tensor)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return sorted({entry.value for tensor in graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
                   for entry in tensor.external_data if entry.key == "location"})


def copy_labels(data_dir: Path, onnx_dir: Path) -> None:
    if (data_dir / "labels.json").is_file():
        shutil.copy2(data_dir / "labels.json", onnx_dir / "labels.json")


def validate_onnx(onnx_dir: Path, torch_model: PreTrainedModel, samples: list[dict], cfg: Export) -> dict[str, Any]:
    """The classifier gate: ONNX Runtime against PyTorch on real eval samples. Raises StageError naming the numbers."""
    from transformers import AutoTokenizer

    # explicit False: left unset, transformers would ask on stdin (mid-step) for a tokenizer config with an auto_map
    tokenizer = AutoTokenizer.from_pretrained(onnx_dir, trust_remote_code=False)
    pad_id = pad_token_id(tokenizer)
    task = CLASSIFIER
    result = compare(torch_runner(torch_model), ort_runner(ort_session(onnx_dir / ONNX_NAME)), samples, task, pad_id)
    return _gate(result, task, cfg)


def _gate(result: dict[str, Any], task: str, cfg: Export) -> dict[str, Any]:
    result["metric_diff"] = abs(result["metric_candidate"] - result["metric_reference"])
    result["tolerance"] = cfg.tolerance(result["reference_scale"])
    problems = gate_problems(result, task, cfg)
    result["passed"] = not problems
    log.info("ONNX validation: %s", json.dumps(result))
    if problems:
        raise StageError("the ONNX export does not match PyTorch: " + "; ".join(problems))
    return result


def gate_problems(result: dict[str, Any], task: str, cfg: Export) -> list[str]:
    problems = []
    allowed = result["tolerance"]
    if not result["max_abs_diff"] <= allowed:  # `not <=` so a NaN fails too
        how = f"atol {cfg.atol:g}" if cfg.atol is not None else (
            f"rtol {cfg.rtol or EXPORT_RTOL[cfg.precision]:g} x logit scale {result['reference_scale']:.3g}")
        problems.append(f"max abs logit difference {result['max_abs_diff']:.3g} > {allowed:.3g} ({how})")
    if task == CLASSIFIER:
        if not result["top1_agreement"] >= cfg.min_top1_agreement:
            problems.append(f"top-1 agreement {result['top1_agreement']:.4f} < {cfg.min_top1_agreement}")
        # accuracy can differ by at most the share of disagreeing predictions
        if not result["metric_diff"] <= 1 - cfg.min_top1_agreement:
            problems.append(f"accuracy differs by {result['metric_diff']:.4f}")
    else:
        # logits within the tolerance move a token's cross-entropy by at most twice that
        if not result["metric_diff"] <= 2 * allowed:
            problems.append(f"eval loss differs by {result['metric_diff']:.3g} (> 2 x {allowed:.3g})")
        bad = [g for g in result["greedy"] if not g["identical"]]
        if bad:
            problems.append(f"greedy tokens differ on {len(bad)} of {len(result['greedy'])} prompts: {bad[0]}")
    return problems


# --- causal LMs: onnxruntime-genai's model builder ----------------------------------------------------------------------


def export_decoder(
    model_cfg: Model, inputs: dict[str, Path], cfg: Export, out: Path, samples: list[dict]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge and save the checkpoint, take torch's reference answers, free the torch model, build the decoder in a child
    process (so the torch weights and the builder's copy are never resident together), then gate it."""
    if cfg.execution_provider == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise StageError("`export.execution_provider: cuda` builds and validates the decoder on the GPU, but this "
                             "environment's ONNX Runtime has no CUDA provider: run in the cuda13 environment on a GPU, "
                             "or set `export.precision: fp32` and `export.execution_provider: cpu`")
    import torch

    model, tokenizer, merge = load_trained(model_cfg, inputs, cfg.merge_adapter, samples, cfg)
    report: dict[str, Any] = {"format": "onnx", "exporter": "onnxruntime-genai model builder", "merged_dir": "merged"}
    pad_id = pad_token_id(tokenizer)
    references = reference_answers(model, samples, pad_id, tokenizer)  # from the fp32 model, whatever the build's precision
    # The builder loads the checkpoint in the dtype it was saved in: an fp16/bf16 build from a half-precision copy needs
    # half the memory (a 7B model: 13.5 GB instead of 27 GB), and the merged folder on disk halves too.
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.precision)
    model = model.to(half or torch.float32)  # type: ignore[arg-type]  # the build's precision, whatever model.dtype loaded
    report["merged_size_bytes"] = save_merged(model, tokenizer, inputs["data"], out / "merged")["size_bytes"]
    report["merged_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    del model
    gc.collect()
    try:
        log.info("%s", genai.build(out / "merged", out / "onnx", cfg.precision, cfg.execution_provider))
    except genai.BuildError as exc:
        raise StageError(str(exc)) from None
    report.update(precision=cfg.precision, execution_provider=cfg.execution_provider, size_bytes=onnx_size(out / "onnx"))
    session = ort_session(out / "onnx" / ONNX_NAME, provider=cfg.execution_provider)
    try:
        result = compare(references.runner(), ort_runner(session), samples, CAUSAL_LM, pad_id)
        del session  # onnxruntime-genai loads its own copy of the weights for the greedy check
        gc.collect()
        result["greedy"] = greedy_match(out / "onnx", references.greedy)
    finally:
        shutil.rmtree(references.folder, ignore_errors=True)
    report["validation"] = _gate(result, CAUSAL_LM, cfg)
    return report, merge


class ReferenceAnswers:
    """Torch's logits for every validation batch (kept on disk: a 7B vocabulary's logits do not fit in memory) and its
    greedy continuations of a few prompts, taken before the torch model is freed."""

    def __init__(self, folder: Path, batches_done: int, greedy: list[dict]) -> None:
        self.folder, self.count, self.greedy = folder, batches_done, greedy

    def runner(self) -> Runner:
        index = iter(range(self.count))

        def forward(_: Batch) -> np.ndarray:
            return np.load(self.folder / f"{next(index)}.npy")

        return forward


def reference_answers(model: PreTrainedModel, samples: list[dict], pad_id: int, tokenizer: Any) -> ReferenceAnswers:
    import tempfile

    import torch

    folder = Path(tempfile.mkdtemp(prefix="export-reference-"))
    run_model = torch_runner(model)
    count = 0
    for count, batch in enumerate(batches(samples, pad_id), start=1):
        np.save(folder / f"{count - 1}.npy", run_model(batch))
    eos = eos_ids(model, tokenizer)
    greedy = []
    for sample in samples[:GREEDY_PROMPTS]:
        prompt = greedy_prompt(sample)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(  # type: ignore[operator]  # transformers types generate loosely
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GREEDY_NEW_TOKENS, do_sample=False,
                pad_token_id=pad_id)
        tokens = out[0, len(prompt):].tolist()
        cut = next((i for i, token in enumerate(tokens) if token in eos), len(tokens))
        greedy.append({"prompt": prompt, "torch": tokens[:cut]})
    return ReferenceAnswers(folder, count, greedy)


def greedy_prompt(sample: dict[str, Any]) -> list[int]:
    """What a user would send: the tokens before the answer (where the data step masked the prompt out of the loss),
    else the first half of the text."""
    ids, labels = sample["input_ids"], sample.get("labels")
    if isinstance(labels, list):
        start = next((i for i, label in enumerate(labels) if label != -100), 0)
        if 0 < start < len(ids):
            return ids[:start]
    return ids[: max(1, len(ids) // 2)]


def eos_ids(model: PreTrainedModel, tokenizer: Any) -> set[int]:
    """Every id generation stops at: the generation config's eos (one or a list) and the tokenizer's."""
    found = getattr(model.generation_config, "eos_token_id", None)
    ids = set(found) if isinstance(found, list) else ({found} if found is not None else set())
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def greedy_match(onnx_dir: Path, references: list[dict]) -> list[dict]:
    """Greedy decoding through onnxruntime-genai (the server's loader) from the same token ids torch continued, both
    stopping at eos (eos itself left out)."""
    from runner.serving.artifact import Generator
    from runner.serving.artifact import load_model as load_served

    served = load_served(onnx_dir)
    assert isinstance(served, Generator), f"{onnx_dir} does not hold a causal LM"
    results = []
    for ref in references:
        got = served.generate_ids(ref["prompt"], max_new_tokens=GREEDY_NEW_TOKENS)["tokens"]
        results.append({"prompt_tokens": len(ref["prompt"]), "torch": ref["torch"], "onnx": got,
                        "identical": got == ref["torch"]})
    return results


# --- merged safetensors -------------------------------------------------------------------------------------------------


def save_merged(model: PreTrainedModel, tokenizer: Any, data_dir: Path, folder: Path) -> dict[str, Any]:
    """The merged model (for people who serve with transformers, and the causal-LM builder's input); read back tensor by
    tensor to prove the files are complete, without a second copy of the model in memory."""
    from safetensors import safe_open

    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    copy_labels(data_dir, folder)
    state = model.state_dict()
    seen = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as saved:
            for name in saved.keys():  # noqa: SIM118 - safe_open is not a mapping
                seen.add(name)
                if name in state and not saved.get_tensor(name).equal(state[name].detach().cpu().contiguous()):
                    raise StageError(f"the saved merged model differs from the merged model in memory at {name}")
    if not seen:
        raise StageError(f"saving the merged model wrote no safetensors into {folder}")
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"size_bytes": size}
