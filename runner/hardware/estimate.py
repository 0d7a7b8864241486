"""A recipe's peak training memory, estimated from its model's config: Estimate, and estimate() that makes it.

How the memory estimate works (all from the model *config*; nothing is downloaded):

1. The model is instantiated on the meta device (no storage), so parameters are counted module by module exactly as
   transformers builds them. LoRA targets follow peft's rules (a name or a `.name` suffix; `all-linear` = every
   nn.Linear but the output head), the modules bitsandbytes keeps unquantized follow transformers'
   `get_keys_to_not_convert`, and classifier heads are trained fully as peft's `modules_to_save`.
2. Persistent memory, as the train stage actually loads the model: full/LoRA bases in fp32 (in `model.dtype` when set);
   QLoRA 4-bit NF4/FP4 = 0.5 byte per weight plus one absmax constant per 64-weight block (fp32, 4/64 byte per weight;
   with double quantization an 8-bit constant plus an fp32 one per 256 blocks, 1/64 + 4/16384 byte: QLoRA, Dettmers et
   al. 2023, section 3); 8-bit LLM.int8 = 1 byte plus an fp32 scale per output row. prepare_model_for_kbit_training casts
   every unquantized parameter (embeddings, norms, lm_head) to fp32. Trainable parameters are fp32: gradients 4 bytes
   each, AdamW 8 bytes each (exp_avg and exp_avg_sq). Trainer's bf16/fp16 is autocast over fp32 weights, so the weights
   are their own master copy; but every half-precision copy autocast makes of a linear weight is saved for the backward
   pass and stays alive until it (2 bytes per linear weight).
3. Activations: the bytes autograd saves for backward per token and layer, counted tensor by tensor in the way of
   Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (section 4.1: 34*s*b*h +
   5*a*s^2*b bytes per GPT layer in 16-bit), adapted to the HF implementations and checked against
   torch.autograd.graph.saved_tensors_hooks on CPU: SDPA kernels keep q, k, v and the output (no s^2 term) unless torch
   falls back to the math kernel (on CPU when attention dropout is on: softmax, dropout mask and dropped weights,
   a*s each); a linear saves its input only when its weight is trained; LoRA adds its dropout output/mask and the rank-r
   input of lora_B; under autocast the residual stream and norms stay fp32 while linear inputs are half-precision copies.
   With gradient checkpointing only each layer's input is kept, plus one layer recomputed in the backward pass.
4. The causal-LM loss materialises logits of batch*seq*vocab: cross_entropy keeps the fp32 log_softmax and its backward
   holds two more fp32 copies at once (12 bytes per logit, +2 for the half-precision logits under autocast).
5. Peak = the larger of two moments: the start of the backward pass (weights, optimizer states, every saved activation
   and the loss tensors; gradients too when gradient accumulation keeps them between micro-batches) and the optimizer
   step (weights, states and all gradients; Trainer's default fused AdamW needs no full-size temporaries). Plus the
   runtime: the CUDA context on a GPU, the Python/torch/transformers baseline RSS on CPU; and on CPU with glibc, the
   freed memory malloc keeps in its heap (GLIBC_RETENTION, measured).

Steps 3 and 4, the bytes saved per token, are in runner/hardware/activations.py.

bench/memory_estimate.py compares the estimate with measured peak RSS on CPU.
"""

from __future__ import annotations

import os
import platform
from typing import Any

from pydantic import BaseModel, Field

from runner.hardware.activations import Training, activation_bytes_per_token, loss_bytes_per_token, math_attention, widths_for
from runner.hardware.probe import GIB, Device
from runner.hardware.shapes import ModelMismatch, ModelShape, in_any, model_config, model_shape
from runner.recipe.document import Recipe
from runner.recipe.sections import FullTrain, QloraTrain
from runner.stages.shared import CLASSIFIER_HEADS

# torch's CUDA context with lazy module loading plus cuBLAS/cuDNN workspaces: typically 0.5-1 GiB on recent GPUs.
CUDA_CONTEXT_BYTES = int(0.75 * GIB)
# RSS of a Python 3.11 process after importing torch, transformers and Trainer with the pinned set (measured here:
# ~550 MB; the train stage also imports datasets, peft and tokenizers).
CPU_BASELINE_BYTES = int(0.6 * GIB)
# glibc's malloc raises its mmap threshold to the largest block freed (up to 32 MiB), so after the first step the
# activations come from the heap, which keeps freed memory and fragments it. Measured (bench/memory_estimate.py, two
# runs), peak RSS exceeds live tensors by 0.4-0.9x the per-step memory (activations + loss), varying from run to run;
# 0.65 was calibrated on the two DistilBERT configurations of the first run alone, the three Llama ones held out.
# A fixed MALLOC_MMAP_THRESHOLD_ turns this off (and saves that memory).
GLIBC_RETENTION = 0.65


class Estimate(BaseModel):
    """Peak training memory of one process, with its parts (bytes)."""

    recipe: str
    device: Device
    config_source: str
    model_type: str
    task: str
    method: str
    precision: str
    bits: int | None
    batch_size: int
    seq_len: int
    packed_row_len: int | None = Field(
        None, description="data.packing: the widest packed row (seq_len; batch_size x seq_len with flash_attention_2).")
    attn_implementation: str | None = None
    gradient_accumulation: int
    gradient_checkpointing: bool
    processes: int = Field(description="Training processes on this machine (torchrun); on CPU they share the RAM.")
    params_total: int
    params_trainable: int
    params_quantized: int
    lora_targets: list[str] = Field(description="Module names (last part) that get LoRA adapters.")
    parts: dict[str, int] = Field(
        description="weights, half_copies, gradients, optimizer, activations, loss, ddp, l2sp_reference (train.l2sp's "
        "copy of the pretrained weights), reference (a full fine-tune's frozen DPO/KTO reference), runtime, allocator")
    phases: dict[str, int] = Field(description="The two candidate peaks without the runtime: backward_start, optimizer_step.")
    peak_bytes: int = Field(description="One process: the larger phase plus the runtime and the allocator's share.")
    total_bytes: int = Field(description="All processes that share the memory checked (CPU: peak * processes).")
    notes: list[str] = Field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB


def estimate(recipe: Recipe, device: Device | None = None) -> Estimate:
    """Peak memory of training `recipe` on `device` (default: cuda when the recipe requires it, else cpu)."""
    device = device or ("cuda" if recipe.requires.accelerator == "cuda" else "cpu")
    config, source = model_config(recipe)
    num_labels = len(recipe.data.labels) if recipe.data.labels else 2
    shape = model_shape(config, recipe.model.task, num_labels)
    train = recipe.train
    training = _training(shape, train)
    seq = min(recipe.data.max_length, getattr(config, "max_position_embeddings", recipe.data.max_length))
    tokens = train.batch_size * seq
    # data.packing (runner/stages/train/packing.py) lays a batch out in rows no wider than its longest example, so at worst
    # (every example max_length long) the tokens and the seq x seq masks are those of padding; flash_attention_2 packs
    # one row of up to batch_size x max_length tokens, but its attention keeps nothing seq-dependent. The worst-case
    # peak is the padded one; packing saves on typical batches (by the padded/real tokens ratio; bench/packing.py).
    row = tokens if recipe.data.packing and recipe.model.attn_implementation == "flash_attention_2" else seq
    attn = recipe.model.attn_implementation
    base = base_bytes(recipe.model.dtype, config)
    widths = widths_for(train, device, base)
    parts = _parameter_parts(shape, train, training, base)
    parts["activations"] = int(tokens * activation_bytes_per_token(shape, training, widths, row, device,
                                                                  train.gradient_checkpointing, attn))
    parts["loss"] = int(tokens * loss_bytes_per_token(shape, widths))
    parts["ddp"] = parts["gradients"] if train.distributed else 0  # DDP's gradient buckets: a second copy of the gradients
    # train.l2sp: the frozen fp32 copy of the pretrained weights (all of them: a fresh head's few are left out, not counted
    # out here); and its penalty's gradient reaches every weight first thing in the backward pass (runner/stages/
    # regularize.py), so the gradients are alive through the whole of it, as with accumulation.
    parts["l2sp_reference"] = 4 * shape.total_params if train.l2sp else 0
    # preference objectives (runner/stages/train/preference.py): pairwise ones run chosen and rejected in one batch, so
    # twice the tokens; a full fine-tune's DPO/KTO holds a frozen copy of the weights as its reference (LoRA disables
    # the adapter instead, precompute_ref_log_probs holds none)
    if train.objective in ("dpo", "orpo", "simpo"):
        parts["activations"] *= 2
        parts["loss"] *= 2
    pref = train.preference
    holds_copy = train.method == "full" and train.objective in ("dpo", "kto") and not (pref and pref.precompute_ref_log_probs)
    parts["reference"] = parts["weights"] if holds_copy else 0
    parts["runtime"] = CUDA_CONTEXT_BYTES if device == "cuda" else CPU_BASELINE_BYTES
    parts["allocator"] = _allocator_bytes(parts, device)
    phases = _phases(parts, train.gradient_accumulation > 1 or bool(train.l2sp))
    processes = train.distributed.nproc_per_node if train.distributed and device == "cpu" else 1
    peak = max(phases.values()) + parts["runtime"] + parts["allocator"]
    return Estimate(
        recipe=recipe.name, device=device, config_source=source, model_type=shape.model_type, task=shape.task,
        method=train.method, precision=train.precision, bits=training.bits, batch_size=train.batch_size, seq_len=seq,
        gradient_accumulation=train.gradient_accumulation, gradient_checkpointing=train.gradient_checkpointing,
        processes=processes, params_total=shape.total_params, params_trainable=_trainable(shape, train, training),
        params_quantized=_quantized_numel(shape, training),
        lora_targets=sorted({n.rsplit(".", 1)[-1] for n in training.targets}), parts=parts, phases=phases,
        peak_bytes=peak, total_bytes=peak * processes, notes=_notes(shape, train, device, attn, recipe.data.packing),
        packed_row_len=row if recipe.data.packing else None, attn_implementation=attn,
    )


def _training(shape: ModelShape, train: Any) -> Training:
    full = isinstance(train, FullTrain)
    lora = None if full else train.lora
    bits = train.quantization.bits if isinstance(train, QloraTrain) else None
    saved = frozenset() if lora is None else _modules_to_save(shape, lora.modules_to_save)
    targets = frozenset() if lora is None else _lora_targets(shape, lora.target_modules, saved)
    if lora is not None and not targets:
        names = sorted({linear.name.rsplit(".", 1)[-1] for linear in shape.linears})
        raise ModelMismatch(f"LoRA target_modules {lora.target_modules} match no linear layer of this model; "
                       f"its linear layers are: {', '.join(names)}")
    quantized = frozenset() if bits is None else frozenset(
        linear.name for linear in shape.linears if not in_any(linear.name, shape.keep_full))
    return Training(full=full, bits=bits, r=lora.r if lora else 0, lora_dropout=lora.dropout if lora else 0.0,
                    targets=targets, quantized=quantized - saved, saved=saved,
                    saved_params=sum(n_params for name, n_params in shape.module_params.items() if in_any(name, saved)))


def _modules_to_save(shape: ModelShape, names: list[str]) -> frozenset[str]:
    """The classifier heads and the recipe's lora.modules_to_save, matched by name or `.name` suffix as peft does."""
    wanted = (*shape.heads_to_save, *names)
    return frozenset(m for m in shape.module_params if any(m == w or m.endswith("." + w) for w in wanted)) | frozenset(
        shape.heads_to_save)


def _lora_targets(shape: ModelShape, target_modules: list[str] | str, saved: frozenset[str]) -> frozenset[str]:
    """peft's matching: `all-linear` is every nn.Linear but the output head and the classifier head; a listed name
    matches a module called that or ending in `.name`. Heads trained fully (modules_to_save) get no adapter."""
    names = [linear.name for linear in shape.linears if not in_any(linear.name, saved)]
    if target_modules == "all-linear":
        return frozenset(n for n in names if n != shape.output_head and n.rsplit(".", 1)[-1] not in CLASSIFIER_HEADS)
    return frozenset(n for n in names if any(n == t or n.endswith("." + t) for t in target_modules))


def _trainable(shape: ModelShape, train: Any, training: Training) -> int:
    if training.full:
        return shape.total_params
    linears = {linear.name: linear for linear in shape.linears}
    adapters = sum(training.r * (linears[n].in_features + linears[n].out_features) for n in training.targets)
    bias = train.lora.bias
    biased = [linear for linear in shape.linears if linear.bias and (bias == "all" or
                                                                     (bias == "lora_only" and linear.name in training.targets))]
    return adapters + sum(linear.out_features for linear in biased) + training.saved_params


def _quantized_numel(shape: ModelShape, training: Training) -> int:
    return sum(linear.in_features * linear.out_features for linear in shape.linears if linear.name in training.quantized)


def _quantized_bytes(shape: ModelShape, training: Training, double_quant: bool) -> float:
    numel = _quantized_numel(shape, training)
    if training.bits == 8:  # LLM.int8: int8 weights and an fp32 scale per output row
        rows = sum(linear.out_features for linear in shape.linears if linear.name in training.quantized)
        return numel + 4 * rows
    # NF4/FP4: two weights per byte, one absmax per 64-weight block; double quantization stores it in 8 bits with an
    # fp32 constant per 256 blocks (QLoRA, Dettmers et al. 2023: 0.5 -> 0.127 bits per parameter).
    constants = (1 / 64 + 4 / (64 * 256)) if double_quant else 4 / 64
    return numel * (0.5 + constants)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def base_bytes(dtype: str | None, config: Any) -> int:
    """Bytes per base weight as the train stage loads them: `model.dtype`, `auto` being the checkpoint's own (its
    config's dtype); unset: 4 (every checkpoint the runner ships or builds is fp32, and so is the library's default)."""
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return DTYPE_BYTES.get(str(dtype).removeprefix("torch."), 4) if dtype else 4


def _parameter_parts(shape: ModelShape, train: Any, training: Training, base: int = 4) -> dict[str, int]:
    trainable = _trainable(shape, train, training)
    quantized = _quantized_numel(shape, training)
    qlora = isinstance(train, QloraTrain)
    double_quant = qlora and train.quantization.double_quant
    # The base in `base` bytes (model.dtype; fp32 unless set), but a quantized model's remaining parameters are fp32:
    # prepare_model_for_kbit_training casts them. Heads trained as modules_to_save exist twice (the original and the
    # trained copy). LoRA adapters are fp32 whatever the base (peft's autocast_adapter_dtype upcasts bf16/fp16 ones);
    # a full fine-tune's gradients and AdamW states take the weights' dtype.
    frozen = 4 if qlora else base
    copies = 0 if training.full else training.saved_params
    adapters = 0 if training.full else trainable - training.saved_params
    weights = _quantized_bytes(shape, training, double_quant) + frozen * (shape.total_params - quantized + copies) \
        + 4 * adapters
    trained = base if training.full else 4
    half = 0
    if train.precision in ("bf16", "fp16") and base == 4:  # autocast's half copies of fp32 linear weights
        half = 2 * sum(linear.in_features * linear.out_features for linear in shape.linears
                       if linear.name not in training.quantized)
    return {"weights": int(weights), "half_copies": half, "gradients": trained * trainable,
            "optimizer": 2 * trained * trainable}


def _allocator_bytes(parts: dict[str, int], device: Device) -> int:
    """Memory glibc keeps after the tensors in it are freed (see GLIBC_RETENTION); none on CUDA (torch's own caching
    allocator reuses its blocks) or with a fixed mmap threshold."""
    if device != "cpu" or platform.libc_ver()[0] != "glibc" or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return 0
    return int(GLIBC_RETENTION * (parts["activations"] + parts["loss"]))


def _phases(parts: dict[str, int], accumulating: bool) -> dict[str, int]:
    """The two moments that can be the peak (see the module docstring), without the runtime."""
    persistent = (parts["weights"] + parts["optimizer"] + parts["ddp"] + parts.get("l2sp_reference", 0)
                  + parts.get("reference", 0))
    kept_gradients = parts["gradients"] if accumulating else 0  # accumulation keeps them between micro-batches (L2-SP too)
    return {
        "backward_start": persistent + parts["half_copies"] + parts["activations"] + parts["loss"] + kept_gradients,
        "optimizer_step": persistent + parts["gradients"],
    }


def _notes(shape: ModelShape, train: Any, device: Device, attn: str | None = None,
           packing: bool = False) -> list[str]:
    notes = []
    if packing:
        notes.append("packing: estimated for the worst case, every example max_length long, which packs into as many "
                     "tokens as padding; typical batches need less")
    if train.distributed and train.distributed.fsdp:
        notes.append("FSDP shards weights, gradients and optimizer states across processes: this per-process "
                     "estimate (DDP-like) is an upper bound")
    if math_attention(shape, device, attn):
        notes.append("attention keeps seq x seq tensors here (math SDPA kernel: attention dropout on CPU)")
    if isinstance(train, QloraTrain) and device == "cpu" and train.quantization.bits == 4:
        notes.append("4-bit QLoRA on CPU trains through bitsandbytes' dequantize-and-matmul path "
                     "(runner/stages/train/build.py keep_4bit_layout: the layout that has a backward)")
    return notes
