"""The bytes autograd saves for the backward pass, per token: steps 3 and 4 of the memory estimate's method (its
docstring in runner/hardware/estimate.py says how they were counted and checked).

Widths (bytes per element of each kind of saved tensor, given the precision: widths_for), Training (the train section
resolved against the model) and Consumer (one linear reading a tensor); activation_bytes_per_token (norms, attention,
MLP, the inputs linears keep; gradient checkpointing) and loss_bytes_per_token (the causal-LM logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.hardware.probe import Device
from runner.hardware.shapes import SITES, ModelShape, in_any
from runner.names import CAUSAL_LM
from runner.recipe.sections import QloraTrain
from runner.stages.shared import CLASSIFIER_HEADS, EXTRA_HEADS


@dataclass(frozen=True)
class Widths:
    """Bytes per element of the kinds of tensors autograd saves, given the precision setup."""

    residual: int  # residual stream and norm inputs: fp32, since every method here trains over fp32 weights/norms
    linear_in: int  # the copy a trained or adapted linear saves of its input (half under autocast)
    inner: int  # MLP internals; bitsandbytes linears return their input dtype (fp32), so QLoRA keeps them fp32
    attn: int  # q, k, v, output saved by attention (autocast casts them to half)
    mask: int  # a dropout mask element: bool on CUDA (native_dropout), the input dtype on CPU
    logits: int


def widths_for(train: Any, device: Device, base: int = 4) -> Widths:
    """Bytes per activation element; `base`: the bytes of the base weights (model.dtype), whose activations match."""
    half = 2 if train.precision in ("bf16", "fp16") or base == 2 else 4
    quantized = isinstance(train, QloraTrain)
    return Widths(residual=4 if quantized else min(4, base), linear_in=half, inner=4 if quantized else half, attn=half,
                  mask=1 if device == "cuda" else half, logits=half)


@dataclass(frozen=True)
class Consumer:
    """A linear layer reading a saved-or-not tensor: what it keeps for the backward pass depends on these."""

    trained: bool  # its weight is trained (full fine-tune): it saves its input
    adapted: bool  # it carries a LoRA adapter
    bits: int | None  # bitsandbytes-quantized base (8-bit saves an fp16 copy of its input; 4-bit saves nothing)


@dataclass(frozen=True)
class Training:
    """The parts of the recipe's train section the activation model needs, resolved against the model."""

    full: bool
    bits: int | None
    r: int
    lora_dropout: float
    targets: frozenset[str]
    quantized: frozenset[str]
    saved: frozenset[str]  # modules trained in full beside the adapters (peft modules_to_save)
    saved_params: int

    def consumer(self, name: str) -> Consumer:
        return Consumer(trained=self.full or name in self.saved, adapted=name in self.targets,
                        bits=self.bits if name in self.quantized else None)


def math_attention(shape: ModelShape, device: Device, attn: str | None = None) -> bool:
    # CUDA's memory-efficient SDPA kernel handles masks and dropout in O(seq); on CPU (torch 2.13) SDPA falls back to
    # the math kernel when attention dropout is on, which keeps seq x seq tensors (checked with saved_tensors_hooks).
    # `eager` attention is that math everywhere: it keeps the seq x seq probabilities of every head.
    return attn == "eager" or (device == "cpu" and shape.attention_dropout > 0 and attn != "flash_attention_2")


def activation_bytes_per_token(shape: ModelShape, training: Training, w: Widths, seq: int, device: Device,
                               checkpointing: bool, attn: str | None = None) -> float:
    """`seq`: the length attention spans (max_length, or the packed row)."""
    layer = _layer_bytes(shape, training, w, seq, device, attn)
    if checkpointing:  # each layer keeps only its input; one layer is recomputed (all its tensors) in the backward pass
        layers = shape.layers * shape.hidden * w.residual + layer
    else:
        layers = shape.layers * layer - _frozen_input_saving(shape, training, w, math_attention(shape, device, attn))
    # one seq x seq padding mask for all layers (fp32 at most); flash_attention_2 takes no mask
    shared_mask = seq * 4 if device == "cuda" and attn != "flash_attention_2" else 0
    return layers + _outside_layers_bytes(shape, training, w) + shared_mask


def _frozen_input_saving(shape: ModelShape, training: Training, w: Widths, math_attn: bool = False) -> float:
    """With frozen embeddings (LoRA) the first block's input needs no gradient: its first norm keeps nothing, and
    neither do the dropout masks of adapters reading that norm's output directly (llama: pre-norm blocks)."""
    if training.full or any(in_any(name, training.saved) for name in shape.embeddings):
        return 0.0  # the embeddings train: the first block's input needs its gradient like any other
    embeddings = shape.hidden * w.residual + 2 * 4 + (shape.hidden * w.mask if shape.hidden_dropout > 0 else 0)
    if shape.family == "distilbert":  # the embeddings' LayerNorm and dropout keep nothing (post-norm blocks)
        return embeddings
    if shape.family == "bert":  # post-norm too; measured with saved_tensors_hooks, the first block also keeps less:
        layer0 = _layer0_names(shape)
        q, k, v = (training.consumer(layer0[n]).adapted for n in SITES["bert"]["attn_in"])
        # no dropout mask for adapters reading the gradient-free input
        masks = (q + k + v) * shape.hidden * w.mask if training.lora_dropout > 0 else 0
        # the math kernel's q @ k^T keeps q only for k's gradient and k only for q's: a frozen key reading a
        # gradient-free input needs neither
        unsaved = (shape.hidden * w.attn * (not k) + shape.kv_dim * w.attn * (not q)) if math_attn else 0
        return embeddings + masks + unsaved
    else:
        layer0 = _layer0_names(shape)
        adapted = sum(training.consumer(layer0[n]).adapted for n in SITES["llama"]["attn_in"])
        norm = shape.hidden * w.residual + 4
    return norm + (adapted * shape.hidden * w.mask if training.lora_dropout > 0 else 0)


def _layer_bytes(shape: ModelShape, training: Training, w: Widths, seq: int, device: Device,
                 attn_implementation: str | None = None) -> float:
    """Bytes autograd saves per token in one block: norms, attention, MLP internals, and the inputs linears keep."""
    h, i, kv, a = shape.hidden, shape.intermediate, shape.kv_dim, shape.heads
    math_attn = math_attention(shape, device, attn_implementation)
    if shape.family == "llama":  # RMSNorm in HF: saves its input and rstd; its normalised fp32 output when trained
        norms = 2 * h * w.residual + 2 * 4 + (2 * h * 4 if training.full else 0)
        mlp = 3 * i * w.inner  # SiLU input, SiLU output, up_proj output (the product's operands)
    else:  # LayerNorm: input plus mean and rstd; GELU keeps its input; the FFN dropout keeps its mask
        norms = 2 * h * w.residual + 4 * 4
        # BERT drops out the attention output too (before its LayerNorm), DistilBERT only the FFN's
        dropouts = 2 if shape.family == "bert" else 1
        mlp = i * w.inner + (dropouts * h * w.mask if shape.hidden_dropout > 0 else 0)
    if math_attn:  # q, k, v, the softmax output and, with dropout, its mask and the dropped weights (a*seq each)
        attn = (h + 2 * kv) * w.attn + a * seq * (w.attn + (w.mask + w.attn if shape.attention_dropout > 0 else 0))
    else:  # flash / memory-efficient kernels: q, k, v, the output and the log-sum-exp
        attn = (2 * h + 2 * kv) * w.attn + a * 4
    # The padding mask: the CPU flash kernel keeps an fp32 seq x seq copy per layer (measured); the math kernel only
    # adds it, and on CUDA one mask is shared by all layers (counted outside the layers).
    mask = seq * 4 if device == "cpu" and not math_attn and attn_implementation != "flash_attention_2" else 0
    sites = SITES[shape.family]
    layer0 = _layer0_names(shape)
    linear_inputs = (
        _site_bytes([training.consumer(layer0[n]) for n in sites["attn_in"]], h, w.residual, w, training)
        + _site_bytes([training.consumer(layer0[n]) for n in sites["o_in"]], h, w.attn, w, training,
                      already_saved=not math_attn)  # efficient kernels' output is the o_proj input itself
        + _site_bytes([training.consumer(layer0[n]) for n in sites["mlp_in"]], h, w.residual, w, training)
        + _site_bytes([training.consumer(layer0[n]) for n in sites["down_in"]], i, w.inner, w, training)
    )
    return norms + attn + mlp + mask + linear_inputs


def _layer0_names(shape: ModelShape) -> dict[str, str]:
    """Short name (and path inside the block, for BERT's three `dense`) -> full name of the first block's linears (all
    blocks are alike)."""
    found: dict[str, str] = {}
    for linear in shape.linears:
        parts = linear.name.split(".")
        if "0" in parts:
            found.setdefault(parts[-1], linear.name)
            found.setdefault(".".join(parts[parts.index("0") + 1:]), linear.name)
    return found


def _site_bytes(consumers: list[Consumer], width: int, x_width: int, w: Widths, training: Training,
                already_saved: bool = False) -> float:
    """What the linears reading one tensor x (width features per token, x_width bytes each) keep for backward.

    A trained linear keeps its input; under autocast that input is its own half-precision copy (casts of activations
    are not cached), otherwise x itself, shared by every reader. A LoRA adapter keeps lora_B's rank-r input and either
    x (shared) or, with dropout, the dropout mask and the dropped copy."""
    own_copy = x_width != w.linear_in
    shared = False
    total = 0.0
    for consumer in consumers:
        if consumer.bits == 8:
            total += width * 2  # bitsandbytes' int8 matmul keeps an fp16 copy of its input
        if consumer.trained:
            total += width * w.linear_in if own_copy else 0
            shared = shared or not own_copy
        if consumer.adapted:
            total += training.r * w.linear_in
            if training.lora_dropout > 0:
                total += width * (w.mask + w.linear_in)
            elif own_copy:
                total += width * w.linear_in
            else:
                shared = True
    return total + (width * x_width if shared and not already_saved else 0)


def _outside_layers_bytes(shape: ModelShape, training: Training, w: Widths) -> float:
    """Embeddings, the final norm and the head, per token."""
    h = shape.hidden
    head = shape.output_head if shape.task == CAUSAL_LM else next(
        (n for n in (*CLASSIFIER_HEADS, *EXTRA_HEADS) if n in shape.heads_to_save), None)
    if shape.task == CAUSAL_LM:
        consumer = training.consumer(head) if head else Consumer(False, False, None)
    else:  # classifier heads are trained in every method (modules_to_save), and read a view of the last hidden state
        consumer = Consumer(True, False, None)
    if shape.family == "llama":
        own = h * w.residual + 4 + (h * 4 if training.full else 0)  # final RMSNorm
    elif shape.family == "bert":  # the pooler and the classifier read the first token only: per example, not per token
        return h * w.residual + 2 * 4 + (h * w.mask if shape.hidden_dropout > 0 else 0)
    else:
        own = h * w.residual + 2 * 4 + (h * w.mask if shape.hidden_dropout > 0 else 0)  # embedding LayerNorm + dropout
    return own + _site_bytes([consumer], h, w.residual, w, training)


def loss_bytes_per_token(shape: ModelShape, w: Widths) -> float:
    if shape.task != CAUSAL_LM:
        return 0.0  # a few logits per example
    # fp32 log_softmax kept for backward, plus the gradient in and out of it at the start of backward; the half
    # precision logits themselves too under autocast.
    return shape.vocab * (12 + (w.logits if w.logits != 4 else 0))
