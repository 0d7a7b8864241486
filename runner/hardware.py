"""The hardware doctor: probe the machine, estimate a recipe's training memory, check the recipe against the machine.

`doctor(names, json_output, profile)` is what `recipe doctor` runs. Its exit codes: 0 every recipe fits, 1 one does not,
2 bad input (a recipe error, an unreadable profile).

How the memory estimate works (all from the model *config*; nothing is downloaded):

1. The model is instantiated on the meta device (no storage), so parameters are counted module by module exactly as
   transformers builds them. LoRA targets follow peft's rules (a name or a `.name` suffix; `all-linear` = every
   nn.Linear but the output head), the modules bitsandbytes keeps unquantized follow transformers'
   `get_keys_to_not_convert`, and classifier heads are trained fully as peft's `modules_to_save`.
2. Persistent memory, as the train stage actually loads the model: full/LoRA bases in fp32 (it passes no torch_dtype);
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

bench/memory_estimate.py compares the estimate with measured peak RSS on CPU.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runner.errors import RunnerError
from runner.export_memory import StepMemory, export_memory, quantize_memory
from runner.names import CAUSAL_LM
from runner.recipe.document import Recipe
from runner.recipe.local_checks import BUNDLED_CONFIGS
from runner.recipe.models import FullTrain, OnnxWeightOnly, QloraTrain, model_location
from runner.stages.shared import CLASSIFIER_HEADS, EXTRA_HEADS

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GIB = 1024**3
PROFILES_DIR = Path(__file__).parent / "profiles"

# GPUs and machines are sold by their physical memory; ECC and the driver keep some of it (a "16 GB" T4 shows torch
# 14.75 GiB, a "32 GiB" VM shows ~31 GiB in /proc/meminfo). requires.min_*_gb names the sold size, so it is compared
# with what is reported allowing for that share.
SOLD_VS_REPORTED = 0.9
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
# The estimate's measured accuracy is +-15% (bench/memory_estimate.py): closer than that to capacity is a warning.
TIGHT = 0.85

# Meta-model module names of one transformer block, by which tensor feeds them (see _layer_bytes).
LLAMA_TYPES = frozenset({"llama", "mistral", "qwen2"})
SITES = {
    "llama": {"attn_in": ("q_proj", "k_proj", "v_proj"), "o_in": ("o_proj",), "mlp_in": ("gate_proj", "up_proj"),
              "down_in": ("down_proj",)},
    "distilbert": {"attn_in": ("q_lin", "k_lin", "v_lin"), "o_in": ("out_lin",), "mlp_in": ("lin1",),
                   "down_in": ("lin2",)},
}


Device = Literal["cuda", "cpu"]


class ProfileError(RunnerError):
    """A hardware profile that cannot be read: bad input, exit code 2."""


class NotEstimated(Exception):
    """No estimate can be made (an architecture without an activation model, a config out of reach): a warning."""


class ModelMismatch(Exception):
    """The recipe does not fit its own model (LoRA targets it lacks, an unreadable config): the train step would fail."""


# --- the machine --------------------------------------------------------------------------------------------------------


class Gpu(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    memory_gib: float = Field(gt=0, description="Total memory as torch reports it (what allocations can use).")
    compute_capability: str = Field(pattern=r"^\d+\.\d+$")
    bf16: bool = Field(description="Native bfloat16 (compute capability 8.0+); older GPUs only emulate it.")


class Machine(BaseModel):
    """A probed machine or a hardware profile (runner/profiles/*.json); both have this shape."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str = "profile"
    notes: str | None = None
    cpu_model: str | None = None
    cpu_cores: int | None = None
    ram_gib: float = Field(gt=0)
    ram_available_gib: float | None = None
    disk_free_gib: float | None = None
    disk_path: str | None = None
    gpus: list[Gpu] = Field(default_factory=list)
    torch_cuda: bool = Field(True, description="torch can use the GPUs (False: a CPU build of torch, or no driver).")
    driver_version: str | None = None
    cuda_version: str | None = None
    bitsandbytes_cuda: bool = False
    flash_attn: bool | None = Field(None, description="The flash-attn package is installed (None: not probed, a profile).")
    liger_kernel: bool | None = Field(None, description="The liger-kernel package is installed (None: not probed).")
    onnxruntime_providers: list[str] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list, description="What the probe could not find out, and why.")

    @property
    def trains_on_gpu(self) -> bool:
        return bool(self.gpus) and self.torch_cuda


def probe(cache_dir: Path | None = None) -> dict[str, Any]:
    """This machine: CPU, RAM, disk free where the cache lives, CUDA devices, bitsandbytes CUDA, ONNX Runtime providers.

    Cheap without a GPU: bitsandbytes is imported only when torch sees CUDA, nvidia-smi only when it exists."""
    import psutil

    problems: list[str] = []
    mem = psutil.virtual_memory()
    disk_path = _existing_parent(cache_dir or _default_cache())
    facts: dict[str, Any] = {
        "name": platform.node() or "this machine",
        "source": "probe",
        "cpu_model": cpu_model(),
        "cpu_cores": psutil.cpu_count(logical=True),
        "ram_gib": round(mem.total / GIB, 2),
        "ram_available_gib": round(mem.available / GIB, 2),
        "disk_free_gib": round(shutil.disk_usage(disk_path).free / GIB, 2),
        "disk_path": str(disk_path),
    }
    facts |= _probe_cuda(problems)
    facts["bitsandbytes_cuda"] = _bitsandbytes_cuda(facts["torch_cuda"], problems)
    facts["flash_attn"], facts["liger_kernel"] = (_installed(name) for name in ("flash_attn", "liger_kernel"))
    facts["onnxruntime_providers"] = _onnxruntime_providers(problems)
    facts["problems"] = problems
    return facts


def _default_cache() -> Path:
    from runner.cache import default_root

    return default_root().resolve()


def _existing_parent(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _probe_cuda(problems: list[str]) -> dict[str, Any]:
    """GPUs through torch.cuda; nvidia-smi fills the driver version and finds GPUs a CPU build of torch cannot see."""
    smi = _nvidia_smi(problems)
    try:
        import torch
    except ImportError:
        problems.append("torch is not importable: GPUs listed from nvidia-smi only")
        return {"gpus": smi["gpus"], "torch_cuda": False, "driver_version": smi["driver"], "cuda_version": None}
    if not torch.cuda.is_available():
        if smi["gpus"]:
            problems.append(f"nvidia-smi sees {len(smi['gpus'])} GPU(s) but torch {torch.__version__} cannot use them "
                            f"(torch.version.cuda={torch.version.cuda})")
        return {"gpus": smi["gpus"], "torch_cuda": False, "driver_version": smi["driver"], "cuda_version": torch.version.cuda}
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"name": props.name, "memory_gib": round(props.total_memory / GIB, 2),
                     "compute_capability": f"{props.major}.{props.minor}", "bf16": props.major >= 8})
    return {"gpus": gpus, "torch_cuda": True, "driver_version": smi["driver"], "cuda_version": torch.version.cuda}


def _nvidia_smi(problems: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {"gpus": [], "driver": None}
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return found
    query = "--query-gpu=name,memory.total,compute_cap,driver_version"
    try:
        out = subprocess.run([exe, query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        problems.append(f"nvidia-smi failed: {exc}")
        return found
    for line in out.strip().splitlines():
        name, mib, cc, driver = (part.strip() for part in line.split(","))
        major = int(cc.split(".")[0]) if cc[:1].isdigit() else 0
        found["gpus"].append({"name": name, "memory_gib": round(float(mib) / 1024, 2),
                              "compute_capability": cc if major else "0.0", "bf16": major >= 8})
        found["driver"] = driver
    return found


def _bitsandbytes_cuda(torch_cuda: bool, problems: list[str]) -> bool:
    if not torch_cuda:
        return False  # bitsandbytes' CUDA kernels need a torch that sees the GPU: nothing to import
    try:
        import bitsandbytes  # noqa: F401  (the import loads the native library for the visible GPU)
        from bitsandbytes.cextension import lib
    except Exception as exc:  # any failure here means 4-bit training cannot run; say why
        problems.append(f"bitsandbytes unusable: {exc}")
        return False
    return lib is not None


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None  # found without importing it (flash_attn loads CUDA code)


def _onnxruntime_providers(problems: list[str]) -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        problems.append("onnxruntime is not importable")
        return []
    return list(onnxruntime.get_available_providers())


def load_profile(name_or_file: str | Path) -> Machine:
    """A hardware profile: a name from runner/profiles (t4-16gb, a100-80gb, ...) or a JSON file of the same shape."""
    path = Path(name_or_file)
    if not path.is_file():
        path = PROFILES_DIR / f"{name_or_file}.json"
    if not path.is_file():
        known = ", ".join(profile_names())
        raise ProfileError(f"no profile {name_or_file!r}: give a JSON file or one of {known}")
    try:
        return Machine.model_validate({"source": f"profile {path.stem}", **json.loads(path.read_text())})
    except (OSError, ValueError) as exc:  # ValidationError and JSONDecodeError are ValueErrors
        raise ProfileError(f"profile {path} is not a valid hardware profile:\n{exc}") from None


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


# --- the model, from its config -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    name: str
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model, read off a meta-device instance built from its config."""

    model_type: str
    family: Literal["llama", "distilbert"]
    task: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int  # key/value width per token (grouped-query attention shrinks it)
    vocab: int
    attention_dropout: float
    hidden_dropout: float
    total_params: int
    linears: tuple[Linear, ...]
    keep_full: frozenset[str]  # linears bitsandbytes leaves unquantized
    output_head: str | None  # lm_head: never a LoRA target for all-linear
    heads_to_save: tuple[str, ...]  # classifier heads peft trains fully (copies)
    module_params: dict[str, int]  # parameters per module that holds some directly (for modules_to_save)
    embeddings: tuple[str, ...]  # nn.Embedding modules


def model_config(recipe: Recipe) -> tuple[PretrainedConfig, str]:
    """The transformers config of the recipe's model and a line saying where it came from.

    hub: the local HF cache, then the hub when it is reachable, then the copy bundled in runner/model_configs.
    path: the folder's config.json. init: built from the init fields as the model step builds it."""
    model = recipe.model
    if model.init is not None:
        return _init_config(recipe), "built from model.init"
    from transformers import AutoConfig

    if model.path is not None or model.package is not None:
        folder = str(model_location(model))  # the package's folder was found when the recipe was validated
        try:
            return AutoConfig.from_pretrained(folder, trust_remote_code=False), f"local folder {folder}"
        except (OSError, ValueError) as exc:
            raise ModelMismatch(f"cannot read the model config in {folder}: {exc}") from None
    assert model.hub is not None
    return _hub_config(model.hub, model.revision)


@lru_cache(maxsize=16)  # one look-up per model, however many remedies are estimated
def _hub_config(hub: str, revision: str | None) -> tuple[PretrainedConfig, str]:
    from transformers import AutoConfig

    try:
        # trust_remote_code=False: the doctor needs the config only, never the model's own code
        config = AutoConfig.from_pretrained(hub, revision=revision, local_files_only=True, trust_remote_code=False)
        return config, f"{hub}@{_short(revision)} (HF cache)"
    except (OSError, ValueError):
        pass
    if _hub_reachable():
        try:
            return (AutoConfig.from_pretrained(hub, revision=revision, trust_remote_code=False),
                    f"{hub}@{_short(revision)} (hub)")
        except (OSError, ValueError):
            pass
    bundled = BUNDLED_CONFIGS / f"{hub.replace('/', '--')}.json"
    if not bundled.is_file():
        raise NotEstimated(f"cannot reach the hub for {hub}'s config and no bundled copy {bundled.name} exists; "
                       "run once with network (the config is then cached) or add the file to runner/model_configs")
    config = AutoConfig.for_model(**json.loads(bundled.read_text()))
    return config, f"bundled runner/model_configs/{bundled.name} (hub unreachable)"


def _short(revision: str | None) -> str:
    return (revision or "main")[:12]


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect instead of huggingface_hub's five retries (~30 s) when there is no network."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _init_config(recipe: Recipe) -> PretrainedConfig:
    """The config runner.stages.model.build_model makes (the tokenizer's vocabulary is at most init.vocab_size)."""
    from transformers import DistilBertConfig, LlamaConfig

    init = recipe.model.init
    assert init is not None
    if init.architecture == "distilbert":
        return DistilBertConfig(vocab_size=init.vocab_size, dim=init.hidden_size, hidden_dim=init.intermediate_size,
                                n_layers=init.num_layers, n_heads=init.num_heads,
                                max_position_embeddings=init.max_position_embeddings)
    return LlamaConfig(vocab_size=init.vocab_size, hidden_size=init.hidden_size, intermediate_size=init.intermediate_size,
                       num_hidden_layers=init.num_layers, num_attention_heads=init.num_heads,
                       num_key_value_heads=init.num_heads, max_position_embeddings=init.max_position_embeddings,
                       tie_word_embeddings=False)


def model_shape(config: PretrainedConfig, task: str, num_labels: int = 2) -> ModelShape:
    key = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return _model_shape(key, task, num_labels)


@lru_cache(maxsize=32)
def _model_shape(config_json: str, task: str, num_labels: int) -> ModelShape:
    """Build the model on the meta device (no storage, no download) and read its structure."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.quantizers.base import get_keys_to_not_convert  # transformers 5 moved it here

    raw = json.loads(config_json)
    model_type = raw.get("model_type", "")
    if model_type not in LLAMA_TYPES and model_type != "distilbert":
        raise NotEstimated(f"no activation model for model_type {model_type!r} (supported: llama-like, distilbert)")
    config = AutoConfig.for_model(**{**raw, "num_labels": num_labels})
    auto = AutoModelForCausalLM if task == CAUSAL_LM else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config)
    linears = tuple(Linear(name, m.in_features, m.out_features, m.bias is not None)
                    for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    output = model.get_output_embeddings()
    output_head = next((n for n, m in model.named_modules() if output is not None and m is output), None)
    modules = dict(model.named_modules())
    heads = tuple(n for n in (*EXTRA_HEADS, *CLASSIFIER_HEADS) if task != CAUSAL_LM and n in modules)
    distilbert = model_type == "distilbert"
    return ModelShape(
        model_type=model_type,
        family="distilbert" if distilbert else "llama",
        task=task,
        hidden=config.hidden_size,
        intermediate=config.hidden_dim if distilbert else config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=config.num_attention_heads,
        kv_dim=(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        * (config.hidden_size // config.num_attention_heads),
        vocab=config.vocab_size,
        attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
        hidden_dropout=float(config.dropout) if distilbert else 0.0,
        total_params=sum(p.numel() for p in model.parameters()),
        linears=linears,
        keep_full=frozenset(get_keys_to_not_convert(model)),
        output_head=output_head,
        heads_to_save=heads,
        module_params={n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in modules.items()
                       if any(True for _ in m.parameters(recurse=False))},
        embeddings=tuple(n for n, m in modules.items() if isinstance(m, torch.nn.Embedding)),
    )


# --- the estimate -------------------------------------------------------------------------------------------------------


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
        "copy of the pretrained weights), runtime, allocator")
    phases: dict[str, int] = Field(description="The two candidate peaks without the runtime: backward_start, optimizer_step.")
    peak_bytes: int = Field(description="One process: the larger phase plus the runtime and the allocator's share.")
    total_bytes: int = Field(description="All processes that share the memory checked (CPU: peak * processes).")
    notes: list[str] = Field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB


@dataclass(frozen=True)
class Widths:
    """Bytes per element of the kinds of tensors autograd saves, given the precision setup."""

    residual: int  # residual stream and norm inputs: fp32, since every method here trains over fp32 weights/norms
    linear_in: int  # the copy a trained or adapted linear saves of its input (half under autocast)
    inner: int  # MLP internals; bitsandbytes linears return their input dtype (fp32), so QLoRA keeps them fp32
    attn: int  # q, k, v, output saved by attention (autocast casts them to half)
    mask: int  # a dropout mask element: bool on CUDA (native_dropout), the input dtype on CPU
    logits: int


def _widths(train: Any, device: Device) -> Widths:
    half = 2 if train.precision in ("bf16", "fp16") else 4
    quantized = isinstance(train, QloraTrain)
    return Widths(residual=4, linear_in=half, inner=4 if quantized else half, attn=half,
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
    # data.packing (runner/stages/packing.py) lays a batch out in rows no wider than its longest example, so at worst
    # (every example max_length long) the tokens and the seq x seq masks are those of padding; flash_attention_2 packs
    # one row of up to batch_size x max_length tokens, but its attention keeps nothing seq-dependent. The worst-case
    # peak is the padded one; packing saves on typical batches (by the padded/real tokens ratio; bench/packing.py).
    row = tokens if recipe.data.packing and recipe.model.attn_implementation == "flash_attention_2" else seq
    attn = recipe.model.attn_implementation
    widths = _widths(train, device)
    parts = _parameter_parts(shape, train, training)
    parts["activations"] = int(tokens * _activation_bytes_per_token(shape, training, widths, row, device,
                                                                   train.gradient_checkpointing, attn))
    parts["loss"] = int(tokens * _loss_bytes_per_token(shape, widths))
    parts["ddp"] = parts["gradients"] if train.distributed else 0  # DDP's gradient buckets: a second copy of the gradients
    # train.l2sp: the frozen fp32 copy of the pretrained weights (all of them: a fresh head's few are left out, not counted
    # out here); and its penalty's gradient reaches every weight first thing in the backward pass (runner/stages/
    # regularize.py), so the gradients are alive through the whole of it, as with accumulation.
    parts["l2sp_reference"] = 4 * shape.total_params if train.l2sp else 0
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
        linear.name for linear in shape.linears if not _in_any(linear.name, shape.keep_full))
    return Training(full=full, bits=bits, r=lora.r if lora else 0, lora_dropout=lora.dropout if lora else 0.0,
                    targets=targets, quantized=quantized - saved, saved=saved,
                    saved_params=sum(n_params for name, n_params in shape.module_params.items() if _in_any(name, saved)))


def _modules_to_save(shape: ModelShape, names: list[str]) -> frozenset[str]:
    """The classifier heads and the recipe's lora.modules_to_save, matched by name or `.name` suffix as peft does."""
    wanted = (*shape.heads_to_save, *names)
    return frozenset(m for m in shape.module_params if any(m == w or m.endswith("." + w) for w in wanted)) | frozenset(
        shape.heads_to_save)


def _in_any(name: str, modules: frozenset[str] | tuple[str, ...]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def _lora_targets(shape: ModelShape, target_modules: list[str] | str, saved: frozenset[str]) -> frozenset[str]:
    """peft's matching: `all-linear` is every nn.Linear but the output head and the classifier head; a listed name
    matches a module called that or ending in `.name`. Heads trained fully (modules_to_save) get no adapter."""
    names = [linear.name for linear in shape.linears if not _in_any(linear.name, saved)]
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


def _parameter_parts(shape: ModelShape, train: Any, training: Training) -> dict[str, int]:
    trainable = _trainable(shape, train, training)
    quantized = _quantized_numel(shape, training)
    double_quant = isinstance(train, QloraTrain) and train.quantization.double_quant
    # Everything not quantized is fp32: the train stage loads full/LoRA bases without torch_dtype, and
    # prepare_model_for_kbit_training casts a quantized model's remaining parameters to fp32. Heads trained as
    # modules_to_save exist twice (the original and the trained copy).
    copies = 0 if training.full else training.saved_params
    adapters = 0 if training.full else trainable - training.saved_params
    weights = _quantized_bytes(shape, training, double_quant) + 4 * (shape.total_params - quantized + copies + adapters)
    half = 0
    if train.precision in ("bf16", "fp16"):  # autocast's half copies of linear weights live until their backward
        half = 2 * sum(linear.in_features * linear.out_features for linear in shape.linears
                       if linear.name not in training.quantized)
    return {"weights": int(weights), "half_copies": half, "gradients": 4 * trainable, "optimizer": 8 * trainable}


def _allocator_bytes(parts: dict[str, int], device: Device) -> int:
    """Memory glibc keeps after the tensors in it are freed (see GLIBC_RETENTION); none on CUDA (torch's own caching
    allocator reuses its blocks) or with a fixed mmap threshold."""
    if device != "cpu" or platform.libc_ver()[0] != "glibc" or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return 0
    return int(GLIBC_RETENTION * (parts["activations"] + parts["loss"]))


def _phases(parts: dict[str, int], accumulating: bool) -> dict[str, int]:
    """The two moments that can be the peak (see the module docstring), without the runtime."""
    persistent = parts["weights"] + parts["optimizer"] + parts["ddp"] + parts.get("l2sp_reference", 0)
    kept_gradients = parts["gradients"] if accumulating else 0  # accumulation keeps them between micro-batches (L2-SP too)
    return {
        "backward_start": persistent + parts["half_copies"] + parts["activations"] + parts["loss"] + kept_gradients,
        "optimizer_step": persistent + parts["gradients"],
    }


def _math_attention(shape: ModelShape, device: Device, attn: str | None = None) -> bool:
    # CUDA's memory-efficient SDPA kernel handles masks and dropout in O(seq); on CPU (torch 2.13) SDPA falls back to
    # the math kernel when attention dropout is on, which keeps seq x seq tensors (checked with saved_tensors_hooks).
    # `eager` attention is that math everywhere: it keeps the seq x seq probabilities of every head.
    return attn == "eager" or (device == "cpu" and shape.attention_dropout > 0 and attn != "flash_attention_2")


def _activation_bytes_per_token(shape: ModelShape, training: Training, w: Widths, seq: int, device: Device,
                                checkpointing: bool, attn: str | None = None) -> float:
    """`seq`: the length attention spans (max_length, or the packed row)."""
    layer = _layer_bytes(shape, training, w, seq, device, attn)
    if checkpointing:  # each layer keeps only its input; one layer is recomputed (all its tensors) in the backward pass
        layers = shape.layers * shape.hidden * w.residual + layer
    else:
        layers = shape.layers * layer - _frozen_input_saving(shape, training, w)
    # one seq x seq padding mask for all layers (fp32 at most); flash_attention_2 takes no mask
    shared_mask = seq * 4 if device == "cuda" and attn != "flash_attention_2" else 0
    return layers + _outside_layers_bytes(shape, training, w) + shared_mask


def _frozen_input_saving(shape: ModelShape, training: Training, w: Widths) -> float:
    """With frozen embeddings (LoRA) the first block's input needs no gradient: its first norm keeps nothing, and
    neither do the dropout masks of adapters reading that norm's output directly (llama: pre-norm blocks)."""
    if training.full or any(_in_any(name, training.saved) for name in shape.embeddings):
        return 0.0  # the embeddings train: the first block's input needs its gradient like any other
    if shape.family == "distilbert":  # the embeddings' LayerNorm and dropout keep nothing (post-norm blocks)
        return shape.hidden * w.residual + 2 * 4 + (shape.hidden * w.mask if shape.hidden_dropout > 0 else 0)
    else:
        layer0 = _layer0_names(shape)
        adapted = sum(training.consumer(layer0[n]).adapted for n in SITES["llama"]["attn_in"])
        norm = shape.hidden * w.residual + 4
    return norm + (adapted * shape.hidden * w.mask if training.lora_dropout > 0 else 0)


def _layer_bytes(shape: ModelShape, training: Training, w: Widths, seq: int, device: Device,
                 attn_implementation: str | None = None) -> float:
    """Bytes autograd saves per token in one block: norms, attention, MLP internals, and the inputs linears keep."""
    h, i, kv, a = shape.hidden, shape.intermediate, shape.kv_dim, shape.heads
    math_attn = _math_attention(shape, device, attn_implementation)
    if shape.family == "llama":  # RMSNorm in HF: saves its input and rstd; its normalised fp32 output when trained
        norms = 2 * h * w.residual + 2 * 4 + (2 * h * 4 if training.full else 0)
        mlp = 3 * i * w.inner  # SiLU input, SiLU output, up_proj output (the product's operands)
    else:  # LayerNorm: input plus mean and rstd; GELU keeps its input; the FFN dropout keeps its mask
        norms = 2 * h * w.residual + 4 * 4
        mlp = i * w.inner + (h * w.mask if shape.hidden_dropout > 0 else 0)
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
    """Short name -> full name of the first block's linears (all blocks are alike)."""
    found: dict[str, str] = {}
    for linear in shape.linears:
        parts = linear.name.split(".")
        if "0" in parts and parts[-1] not in found:
            found[parts[-1]] = linear.name
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
    else:
        own = h * w.residual + 2 * 4 + (h * w.mask if shape.hidden_dropout > 0 else 0)  # embedding LayerNorm + dropout
    return own + _site_bytes([consumer], h, w.residual, w, training)


def _loss_bytes_per_token(shape: ModelShape, w: Widths) -> float:
    if shape.task != CAUSAL_LM:
        return 0.0  # a few logits per example
    # fp32 log_softmax kept for backward, plus the gradient in and out of it at the start of backward; the half
    # precision logits themselves too under autocast.
    return shape.vocab * (12 + (w.logits if w.logits != 4 else 0))


def _notes(shape: ModelShape, train: Any, device: Device, attn: str | None = None,
           packing: bool = False) -> list[str]:
    notes = []
    if packing:
        notes.append("packing: estimated for the worst case, every example max_length long, which packs into as many "
                     "tokens as padding; typical batches need less")
    if train.distributed and train.distributed.fsdp:
        notes.append("FSDP shards weights, gradients and optimizer states across processes: this per-process "
                     "estimate (DDP-like) is an upper bound")
    if _math_attention(shape, device, attn):
        notes.append("attention keeps seq x seq tensors here (math SDPA kernel: attention dropout on CPU)")
    if isinstance(train, QloraTrain) and device == "cpu" and train.quantization.bits == 4:
        notes.append("4-bit QLoRA does not train on CPU (see the train stage); estimated as if it did")
    return notes


# --- the check ----------------------------------------------------------------------------------------------------------

Status = Literal["ok", "warn", "fail", "skip"]


class Finding(BaseModel):
    check: str
    status: Status
    detail: str
    fix: list[str] = Field(default_factory=list, description="Overrides that would fix it, e.g. `train.precision=fp16`.")


class Remedy(BaseModel):
    """One way to need less memory, with the estimate after applying it alone and after it and every remedy above it."""

    title: str
    overrides: list[str]
    alone_gib: float | None
    fits_alone: bool
    cumulative_gib: float
    fits_cumulative: bool
    first_fit: bool = False


class Verdict(BaseModel):
    recipe: str
    machine: str
    device: Device
    capacity_gib: float | None = Field(description="GPU memory (one GPU) or RAM the estimate is compared with.")
    fits: bool
    findings: list[Finding]
    estimate: Estimate | None
    step_memory: list[StepMemory] = Field(default_factory=list, description="Causal LM: export/quantize peak RAM.")
    remedies: list[Remedy] = Field(default_factory=list)
    remedy_note: str | None = None


def check(recipe: Recipe, machine: Machine | dict[str, Any]) -> Verdict:
    """Compare the recipe's `requires`, methods and memory estimate with the machine (a probe or a profile)."""
    machine = machine if isinstance(machine, Machine) else Machine.model_validate(machine)
    device: Device = "cuda" if machine.trains_on_gpu else "cpu"  # the train stage uses CUDA when it can
    findings = _requirement_findings(recipe, machine, device)
    capacity = _capacity(machine, device)
    estimated: Estimate | None = None
    remedies: list[Remedy] = []
    note = None
    try:
        estimated = estimate(recipe, device)
    except NotEstimated as exc:
        findings.append(Finding(check="memory", status="warn", detail=f"not estimated: {exc}"))
    except ModelMismatch as exc:
        findings.append(Finding(check="memory", status="fail", detail=str(exc)))
    steps: list[StepMemory] = []
    if estimated is not None:
        memory = _memory_finding(estimated, capacity, device)
        findings += [memory, *_disk_findings(recipe, estimated, machine)]
        if memory.status == "fail":
            remedies, note = _remedies(recipe, machine, device, capacity)
        steps = _step_memory(recipe, estimated)
        findings += [_step_ram_finding(step, recipe, machine) for step in steps]
    fits = all(f.status != "fail" for f in findings)
    return Verdict(recipe=recipe.name, machine=machine.name, device=device, capacity_gib=round(capacity / GIB, 2),
                   fits=fits, findings=findings, estimate=estimated, step_memory=steps, remedies=remedies,
                   remedy_note=note)


def _step_memory(recipe: Recipe, estimated: Estimate) -> list[StepMemory]:
    """Peak host RAM of the causal-LM export (onnxruntime-genai builder) and weight-only quantize steps."""
    export = recipe.export
    if recipe.model.task != CAUSAL_LM or export is None or export.format != "onnx":
        return []
    config, _ = model_config(recipe)
    vocab, seq = int(getattr(config, "vocab_size", 32000)), recipe.data.max_length
    steps = [export_memory(estimated.params_total, vocab, seq, export.precision, export.execution_provider)]
    if isinstance(recipe.quantize, OnnxWeightOnly):
        steps.append(quantize_memory(estimated.params_total, export.precision, recipe.quantize.bits,
                                     export.execution_provider))
    return steps


def _step_ram_finding(step: StepMemory, recipe: Recipe, machine: Machine) -> Finding:
    """The step's peak against the RAM the recipe declares (and the machine's, when it has less)."""
    declared = recipe.requires.min_ram_gb
    limits = [(declared * SOLD_VS_REPORTED, "requires.min_ram_gb")] if declared else []
    limits.append((machine.ram_available_gib or machine.ram_gib, "this machine's RAM"))
    limit, name = min(limits)
    worst = max(step.phases, key=step.phases.__getitem__)
    text = f"{step.step} step: estimated peak {step.peak_gib:.1f} GiB of RAM ({worst}) against {limit:.1f} GiB ({name})"
    return Finding(check=f"{step.step}_ram", status="ok" if step.peak_gib <= limit else "fail", detail=text)


def _capacity(machine: Machine, device: Device) -> int:
    if device == "cuda":
        return int(min(gpu.memory_gib for gpu in machine.gpus) * GIB)
    return int((machine.ram_available_gib or machine.ram_gib) * GIB)


def _requirement_findings(recipe: Recipe, machine: Machine, device: Device) -> list[Finding]:
    return [f for f in (
        _accelerator(recipe, machine), _gpu_memory(recipe, machine, device), _compute_capability(recipe, machine, device),
        _ram(recipe, machine), _precision(recipe, machine, device), _quantization(recipe, machine, device),
        _distributed(recipe, machine, device), _attention(recipe, machine, device), _liger(recipe, machine, device),
    ) if f is not None]


def _gpu_text(machine: Machine) -> str:
    gpu = machine.gpus[0]
    count = f"{len(machine.gpus)}x " if len(machine.gpus) > 1 else ""
    return f"{count}{gpu.name} ({gpu.memory_gib:.2f} GiB, compute capability {gpu.compute_capability})"


def _accelerator(recipe: Recipe, machine: Machine) -> Finding:
    wanted = recipe.requires.accelerator
    if machine.trains_on_gpu:
        return Finding(check="accelerator", status="ok", detail=f"{wanted}: trains on {_gpu_text(machine)}")
    if machine.gpus:
        why = f"{_gpu_text(machine)} is present but torch cannot use it (a CPU build of torch, or no CUDA driver)"
        return Finding(check="accelerator", status="fail" if wanted == "cuda" else "warn",
                       detail=f"{wanted}: {why}; install the CUDA environment (envs/cuda12)")
    if wanted == "cuda":
        return Finding(check="accelerator", status="fail", detail="cuda: this machine has no CUDA GPU")
    return Finding(check="accelerator", status="ok", detail=f"{wanted}: trains on the CPU ({machine.cpu_cores} cores)")


def _gpu_memory(recipe: Recipe, machine: Machine, device: Device) -> Finding | None:
    need = recipe.requires.min_gpu_memory_gb
    if need is None:
        return None
    if device != "cuda":
        return Finding(check="min_gpu_memory_gb", status="skip", detail=f"{need:g} GB: no usable GPU")
    have = min(gpu.memory_gib for gpu in machine.gpus)
    ok = have >= need * SOLD_VS_REPORTED
    # Cards are sold by physical memory; ECC and the driver keep part of it (see SOLD_VS_REPORTED).
    return Finding(check="min_gpu_memory_gb", status="ok" if ok else "fail",
                   detail=f"needs a {need:g} GB GPU (>= {need * SOLD_VS_REPORTED:.1f} GiB reported); has {have:.2f} GiB")


def _compute_capability(recipe: Recipe, machine: Machine, device: Device) -> Finding | None:
    need = recipe.requires.min_compute_capability
    if need is None:
        return None
    if device != "cuda":
        return Finding(check="min_compute_capability", status="skip", detail=f"{need}: no usable GPU")
    have = min((gpu.compute_capability for gpu in machine.gpus), key=_version)
    ok = _version(have) >= _version(need)
    return Finding(check="min_compute_capability", status="ok" if ok else "fail", detail=f"needs {need}, has {have}")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _ram(recipe: Recipe, machine: Machine) -> Finding | None:
    need = recipe.requires.min_ram_gb
    if need is None:
        return None
    ok = machine.ram_gib >= need * SOLD_VS_REPORTED
    return Finding(check="min_ram_gb", status="ok" if ok else "fail",
                   detail=f"needs {need:g} GB of RAM (>= {need * SOLD_VS_REPORTED:.1f} GiB reported); has "
                          f"{machine.ram_gib:.1f} GiB")


def _native_bf16(machine: Machine) -> bool:
    return all(gpu.bf16 for gpu in machine.gpus)


def _precision(recipe: Recipe, machine: Machine, device: Device) -> Finding:
    precision = recipe.train.precision
    if precision == "fp16" and device == "cpu":
        return Finding(check="precision", status="fail", detail="fp16 training needs a CUDA GPU",
                       fix=["train.precision=fp32"])
    if precision == "bf16" and device == "cuda" and not _native_bf16(machine):
        return Finding(check="precision", status="fail",
                       detail="bf16 needs native bfloat16 (compute capability 8.0+); this GPU would only emulate it, "
                              "slowly or not at all; fp16 is native here", fix=["train.precision=fp16"])
    return Finding(check="precision", status="ok", detail=f"{precision} on {device}")


def _quantization(recipe: Recipe, machine: Machine, device: Device) -> Finding | None:
    train = recipe.train
    if not isinstance(train, QloraTrain):
        return None
    q = train.quantization
    if q.bits == 4 and device != "cuda":
        return Finding(check="quantization", status="fail",
                       detail="4-bit QLoRA needs CUDA: on CPU bitsandbytes' 4-bit layers stop learning after the first "
                              "evaluation (see the train stage)", fix=["train.quantization.bits=8"])
    if device == "cuda" and not machine.bitsandbytes_cuda:
        return Finding(check="quantization", status="fail", detail="bitsandbytes cannot use this GPU")
    if q.bits == 4 and q.compute_dtype == "bfloat16" and device == "cuda" and not _native_bf16(machine):
        return Finding(check="quantization", status="fail", detail="compute_dtype bfloat16 needs compute capability 8.0+",
                       fix=["train.quantization.compute_dtype=float16"])
    return Finding(check="quantization", status="ok", detail=f"{q.bits}-bit bitsandbytes on {device}")


def _distributed(recipe: Recipe, machine: Machine, device: Device) -> Finding | None:
    dist = recipe.train.distributed
    if dist is None:
        return None
    if dist.backend == "nccl" and device != "cuda":
        return Finding(check="distributed", status="fail", detail="the nccl backend needs CUDA GPUs",
                       fix=["train.distributed.backend=gloo"])
    if device == "cuda" and dist.nproc_per_node > len(machine.gpus):
        return Finding(check="distributed", status="fail",
                       detail=f"{dist.nproc_per_node} processes per node need as many GPUs; this machine has "
                              f"{len(machine.gpus)}", fix=[f"train.distributed.nproc_per_node={len(machine.gpus)}"])
    return Finding(check="distributed", status="ok", detail=f"{dist.nproc_per_node} processes on {device}")


def _attention(recipe: Recipe, machine: Machine, device: Device) -> Finding | None:
    """model.attn_implementation: sdpa and eager run anywhere; flash_attention_2 needs CUDA, compute capability 8.0+
    and the flash-attn package (the train stage refuses the same before loading anything)."""
    attn = recipe.model.attn_implementation
    if attn is None:
        return None
    if attn != "flash_attention_2":
        return Finding(check="attention", status="ok", detail=f"{attn} runs on {device}")
    fix = ["model.attn_implementation=sdpa"]
    if device != "cuda":
        return Finding(check="attention", status="fail", detail="flash_attention_2 needs a CUDA GPU", fix=fix)
    oldest = min((gpu.compute_capability for gpu in machine.gpus), key=_version)
    if _version(oldest) < (8, 0):
        return Finding(check="attention", status="fail",
                       detail=f"flash_attention_2 needs compute capability 8.0+ (Ampere or newer); has {oldest}", fix=fix)
    if machine.flash_attn is False:
        return Finding(check="attention", status="fail", detail="flash_attention_2 needs the flash-attn package, which "
                       "is not installed here", fix=fix)
    if machine.flash_attn is None:
        return Finding(check="attention", status="warn", detail="flash_attention_2: the GPU can run it; a profile does "
                       "not say whether the flash-attn package is installed (no env in envs/ pins it)")
    return Finding(check="attention", status="ok", detail=f"flash_attention_2 on compute capability {oldest}")


def _liger(recipe: Recipe, machine: Machine, device: Device) -> Finding | None:
    """train.liger: Liger's Triton kernels run on CUDA only, from the liger-kernel package (pinned in envs/cuda13)."""
    if not recipe.train.liger:
        return None
    fix = ["train.liger=false"]
    if device != "cuda":
        return Finding(check="liger", status="fail", detail="train.liger needs a CUDA GPU: Liger's kernels are Triton "
                       "GPU kernels and do not run on CPU", fix=fix)
    if machine.liger_kernel is False:
        return Finding(check="liger", status="fail", detail="train.liger needs the liger-kernel package, which is not "
                       "installed here (envs/cuda13 pins it: `env: cuda13`)", fix=fix)
    if machine.liger_kernel is None and recipe.env != "cuda13":
        return Finding(check="liger", status="warn", detail=f"train.liger: the recipe's env `{recipe.env}` does not "
                       "install liger-kernel; envs/cuda13 pins it (`env: cuda13`)")
    return Finding(check="liger", status="ok", detail="Liger kernels on CUDA")


def _memory_finding(estimated: Estimate, capacity: int, device: Device) -> Finding:
    where = "GPU memory" if device == "cuda" else "RAM"
    text = f"estimated peak {estimated.total_gib:.2f} GiB of {capacity / GIB:.2f} GiB {where}"
    if estimated.processes > 1:
        text += f" ({estimated.processes} processes of {estimated.peak_bytes / GIB:.2f} GiB)"
    if estimated.total_bytes > capacity:
        return Finding(check="memory", status="fail", detail=text + ": does not fit")
    if estimated.total_bytes > TIGHT * capacity:
        return Finding(check="memory", status="warn", detail=text + ": tight (the estimate is good to about +-15%)")
    return Finding(check="memory", status="ok", detail=text)


def _disk_findings(recipe: Recipe, estimated: Estimate, machine: Machine) -> list[Finding]:
    """Only for a probed machine (profiles say nothing of disks): the hub download and an fp32 ONNX export."""
    if machine.disk_free_gib is None:
        return []
    need = estimated.params_total * ((2 if recipe.model.hub else 0) + (4 if recipe.export else 0)) / GIB
    if need < 1:
        return []
    ok = machine.disk_free_gib >= need
    return [Finding(check="disk", status="ok" if ok else "warn",
                    detail=f"about {need:.0f} GiB for the fp16 download and fp32 export; {machine.disk_free_gib:.0f} GiB "
                           f"free at {machine.disk_path}")]


# --- remedies -----------------------------------------------------------------------------------------------------------

Changes = dict[str, Any]  # dotted recipe path -> new value, printable as overrides


def _remedies(recipe: Recipe, machine: Machine, device: Device, capacity: int) -> tuple[list[Remedy], str]:
    """The seed guide's out-of-memory remedies, least intrusive first: each estimated alone and on top of the ones above."""
    rows: list[Remedy] = []
    current = recipe
    for title, make in _REMEDIES:
        title = title.format(bits="4-bit NF4" if device == "cuda" else "8-bit (4-bit needs CUDA)")
        step = make(current, machine, device, capacity)
        if not step:
            continue  # already in the recipe (or in a row above)
        alone_changes = make(recipe, machine, device, capacity)
        alone = _try_estimate(recipe, alone_changes, device) if alone_changes else None
        current = _apply(current, step)
        total = estimate(current, device).total_bytes
        rows.append(Remedy(
            title=title, overrides=_overrides(step),
            alone_gib=None if alone is None else round(alone / GIB, 2), fits_alone=alone is not None and alone <= capacity,
            cumulative_gib=round(total / GIB, 2), fits_cumulative=total <= capacity,
        ))
    first = next((row for row in rows if row.fits_cumulative), None)
    if first is None:
        best = min((row.cumulative_gib for row in rows), default=estimate(recipe, device).total_gib)
        return rows, f"nothing here fits in {capacity / GIB:.2f} GiB; with all of them it needs {best:.2f} GiB"
    first.first_fit = True
    needed: dict[str, str] = {}
    for row in rows[: rows.index(first) + 1]:
        needed.update(dict(item.split("=", 1) for item in row.overrides))
    return rows, "first fit (cumulative): " + " ".join(f"{k}={v}" for k, v in needed.items())


def _try_estimate(recipe: Recipe, changes: Changes, device: Device) -> int | None:
    try:
        return estimate(_apply(recipe, changes), device).total_bytes
    except (NotEstimated, ModelMismatch, ValidationError):
        return None


def _apply(recipe: Recipe, changes: Changes) -> Recipe:
    data = recipe.model_dump()
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = data
        for part in path:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return Recipe.model_validate(data)


def _overrides(changes: Changes) -> list[str]:
    def text(value: Any) -> str:
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, list):
            return "[" + ", ".join(map(str, value)) + "]"
        return str(value)

    return [f"{key}={text(value)}" for key, value in changes.items()]


def _checkpointing(recipe: Recipe, machine: Machine, device: Device, capacity: int) -> Changes:
    return {} if recipe.train.gradient_checkpointing else {"train.gradient_checkpointing": True}


def _smaller_batch(recipe: Recipe, machine: Machine, device: Device, capacity: int) -> Changes:
    """The largest smaller batch (a divisor, so the effective batch stays exact) that fits; batch 1 if none does."""
    train = recipe.train
    for batch in (d for d in range(train.batch_size - 1, 0, -1) if train.batch_size % d == 0):
        changes = _batch_changes(recipe, batch)
        total = _try_estimate(recipe, changes, device)
        if total is not None and total <= capacity:
            return changes
    return _batch_changes(recipe, 1) if train.batch_size > 1 else {}


def _batch_changes(recipe: Recipe, batch: int) -> Changes:
    train = recipe.train
    changes: Changes = {"train.batch_size": batch,
                        "train.gradient_accumulation": train.gradient_accumulation * train.batch_size // batch}
    if train.min_batch_size > batch:
        changes["train.min_batch_size"] = batch
    return changes


# No adapter dropout: each LoRA dropout keeps a mask and a copy of its input for backward, which can cost more
# activation memory than the full fine-tune it replaces.
LORA_DEFAULTS: Changes = {"train.lora.r": 8, "train.lora.alpha": 16, "train.lora.dropout": 0.0,
                          "train.lora.target_modules": "all-linear"}


def _lora(recipe: Recipe, machine: Machine, device: Device, capacity: int) -> Changes:
    return {"train.method": "lora", **LORA_DEFAULTS} if isinstance(recipe.train, FullTrain) else {}


def _qlora(recipe: Recipe, machine: Machine, device: Device, capacity: int) -> Changes:
    train = recipe.train
    bits = 4 if device == "cuda" else 8  # 4-bit needs CUDA; 8-bit QLoRA trains on CPU
    if isinstance(train, QloraTrain) and train.quantization.bits <= bits:
        return {}
    changes: Changes = {"train.method": "qlora", **(LORA_DEFAULTS if isinstance(train, FullTrain) else {}),
                        "train.quantization.bits": bits}
    if bits == 4:
        compute = "bfloat16" if _native_bf16(machine) else "float16"
        changes |= {"train.quantization.type": "nf4", "train.quantization.double_quant": True,
                    "train.quantization.compute_dtype": compute}
    return changes


_REMEDIES = [
    ("gradient checkpointing", _checkpointing),
    ("smaller batch, same effective batch (gradient accumulation)", _smaller_batch),
    ("LoRA instead of a full fine-tune", _lora),
    ("QLoRA over a {bits} base", _qlora),
]


# --- the doctor ---------------------------------------------------------------------------------------------------------


def doctor(recipe_paths: Sequence[str | Path] = (), json_output: bool = False, profile: str | Path | None = None,
           overrides: Sequence[str] = ()) -> int:
    """`recipe doctor [NAME...] [OVERRIDE...] [--json] [--profile NAME_OR_FILE]`: 0 all fit, 1 one does not, 2 bad input.

    No names: every recipe under ./recipes. `profile` replaces the probe with a hardware profile (a name under
    runner/profiles or a JSON file). Overrides (`train.batch_size=4`) apply to every recipe; they may come in
    `overrides` or mixed into `recipe_paths`, as the CLI collects them."""
    from rich.console import Console

    from runner.recipe import RecipeError, find_recipe, load_recipe

    out = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 140)
    try:
        machine = load_profile(profile) if profile else Machine.model_validate(probe())
    except ProfileError as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    given = [str(item) for item in recipe_paths]
    overrides = [*overrides, *(item for item in given if _is_override(item))]
    names = [item for item in given if not _is_override(item)] or sorted(str(p) for p in Path("recipes").glob("*.yaml"))
    verdicts: list[Verdict] = []
    errors: list[str] = []
    for name in names:
        try:
            verdicts.append(check(load_recipe(find_recipe(name), list(overrides)).recipe, machine))
        except RecipeError as exc:
            errors += [str(problem) for problem in exc.problems]
    if json_output:
        document = {"machine": machine.model_dump(), "verdicts": [v.model_dump() for v in verdicts], "errors": errors}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        _print_machine(out, machine)
        for verdict in verdicts:
            _print_verdict(out, verdict)
        for line in errors:
            err.print(line, markup=False, soft_wrap=True)
    if errors:
        return 2
    return 0 if all(v.fits for v in verdicts) else 1


def _is_override(item: str) -> bool:
    return "=" in item and not Path(item).exists() and item.split("=", 1)[0].replace(".", "").replace("_", "").isalnum()


def _print_machine(out: Any, m: Machine) -> None:
    gpus = ", ".join(f"{g.name} {g.memory_gib:.2f} GiB cc {g.compute_capability}{' bf16' if g.bf16 else ''}"
                     for g in m.gpus) or "none"
    out.print(f"[bold]{m.name}[/bold] ({m.source}): {m.cpu_model or 'CPU'}, {m.cpu_cores} cores, RAM {m.ram_gib:.1f} GiB"
              + (f" ({m.ram_available_gib:.1f} available)" if m.ram_available_gib is not None else ""))
    out.print(f"  GPUs: {gpus}; CUDA {m.cuda_version or '-'}, driver {m.driver_version or '-'}, torch sees CUDA: "
              f"{m.torch_cuda and bool(m.gpus)}, bitsandbytes CUDA: {m.bitsandbytes_cuda}")
    out.print(f"  ONNX Runtime providers: {', '.join(m.onnxruntime_providers) or '-'}"
              + (f"; disk free {m.disk_free_gib:.0f} GiB at {m.disk_path}" if m.disk_free_gib is not None else ""))
    for problem in m.problems:
        out.print(f"  [yellow]note:[/yellow] {problem}", markup=True)


STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "dim"}


def _print_verdict(out: Any, v: Verdict) -> None:
    from rich.table import Table

    state = "[green]fits[/green]" if v.fits else "[red]does not fit[/red]"
    out.print(f"\n[bold]{v.recipe}[/bold] on {v.machine} ({v.device}): {state}")
    if v.estimate is not None:
        _print_estimate(out, v.estimate, v.capacity_gib)
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column in ("check", "status", "detail"):
        table.add_column(column, overflow="fold")
    for f in v.findings:
        fix = f" -> fix: {' '.join(f.fix)}" if f.fix else ""
        table.add_row(f.check, f"[{STATUS_STYLE[f.status]}]{f.status}[/]", f.detail + fix)
    out.print(table)
    if v.remedies:
        _print_remedies(out, v)


def _print_estimate(out: Any, e: Estimate, capacity: float | None) -> None:
    quant = f" {e.bits}-bit" if e.bits else ""
    lora = f", LoRA on {', '.join(e.lora_targets)}" if e.lora_targets else ""
    out.print(f"  model: {e.model_type}, {_count(e.params_total)} parameters; config: {e.config_source}")
    out.print(f"  training: {e.method}{quant}{lora}, {_count(e.params_trainable)} trainable; batch {e.batch_size} x "
              f"{e.seq_len} tokens (accumulation {e.gradient_accumulation}), {e.precision}, gradient checkpointing "
              f"{'on' if e.gradient_checkpointing else 'off'}")
    parts = "  ".join(f"{name} {size / GIB:.2f}" for name, size in e.parts.items() if size)
    phases = ", ".join(f"{name} {size / GIB:.2f}" for name, size in e.phases.items())
    out.print(f"  memory (GiB): {parts}", markup=False)
    out.print(f"  peak = max({phases}) + runtime = {e.peak_bytes / GIB:.2f} GiB"
              + (f" x {e.processes} processes" if e.processes > 1 else "")
              + (f" of {capacity:.2f}" if capacity is not None else ""), markup=False)
    if e.parts.get("l2sp_reference"):
        out.print(f"  l2sp: frozen fp32 copy of the pretrained weights {e.parts['l2sp_reference'] / GIB:.2f} GiB, and the "
                  "gradients live through the whole backward pass", markup=False)
    for note in e.notes:
        out.print(f"  note: {note}", markup=False)


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def _print_remedies(out: Any, v: Verdict) -> None:
    from rich.table import Table

    table = Table(title="remedies (alone: applied by itself; cumulative: with every row above)", title_justify="left",
                  header_style="bold", box=None, pad_edge=False)
    for column in ("remedy", "overrides", "alone GiB", "cumulative GiB", ""):
        table.add_column(column, overflow="fold")
    for r in v.remedies:
        alone = "-" if r.alone_gib is None else f"{r.alone_gib:.2f}" + (" fits" if r.fits_alone else "")
        mark = "[green]<- first that fits[/green]" if r.first_fit else ""
        table.add_row(r.title, " ".join(r.overrides), alone, f"{r.cumulative_gib:.2f}"
                      + (" fits" if r.fits_cumulative else ""), mark)
    out.print(table)
    if v.remedy_note:
        out.print(f"  {v.remedy_note}", markup=False, soft_wrap=True)
