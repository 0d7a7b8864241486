"""The verdict: does a recipe fit a machine? check() compares the recipe's `requires`, its methods and its memory
estimate with the machine (a probe or a profile) and returns a Verdict of Findings, with remedies when memory does not
fit (runner/hardware/remedies.py). Nothing here prints: `recipe doctor` (runner/hardware/doctor.py) renders the verdicts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from runner.hardware.driver import driver_problem, min_driver
from runner.hardware.estimate import Estimate, estimate
from runner.hardware.export_memory import StepMemory, export_memory, quantize_memory
from runner.hardware.probe import GIB, Device, Machine, native_bf16
from runner.hardware.remedies import Remedy, propose_remedies
from runner.hardware.shapes import ModelMismatch, NotEstimated, model_config
from runner.names import CAUSAL_LM
from runner.recipe.document import Recipe
from runner.recipe.sections import OnnxWeightOnly, QloraTrain

# GPUs and machines are sold by their physical memory; ECC and the driver keep some of it (a "16 GB" T4 shows torch
# 14.75 GiB, a "32 GiB" VM shows ~31 GiB in /proc/meminfo). requires.min_*_gb names the sold size, so it is compared
# with what is reported allowing for that share.
SOLD_VS_REPORTED = 0.9
# The estimate's measured accuracy is +-15% (bench/memory_estimate.py): closer than that to capacity is a warning.
TIGHT = 0.85

Status = Literal["ok", "warn", "fail", "skip"]


class Finding(BaseModel):
    check: str
    status: Status
    detail: str
    fix: list[str] = Field(default_factory=list, description="Overrides that would fix it, e.g. `train.precision=fp16`.")


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
            remedies, note = propose_remedies(recipe, machine, device, capacity)
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
        _driver(recipe, machine),
    ) if f is not None]


def _driver(recipe: Recipe, machine: Machine) -> Finding | None:
    """The NVIDIA driver the recipe's env needs (the `# min-driver:` line of its envs/*.in file) against the one the machine
    has."""
    needed = min_driver(recipe.env)
    if needed is None or not machine.gpus:
        return None
    if machine.driver_version is None:
        return Finding(check="driver", status="skip", detail=f"env {recipe.env} needs NVIDIA driver >= {needed}; "
                       "the driver version is not known here (a profile, or nvidia-smi did not answer)")
    problem = driver_problem(recipe.env, machine.driver_version)
    if problem:
        return Finding(check="driver", status="fail", detail=problem)
    return Finding(check="driver", status="ok", detail=f"NVIDIA driver {machine.driver_version} >= {needed} "
                   f"(env {recipe.env})")


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
                       detail=f"{wanted}: {why}; install the CUDA environment (envs/cuda13.txt)")
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


def _precision(recipe: Recipe, machine: Machine, device: Device) -> Finding:
    precision = recipe.train.precision
    if precision == "fp16" and device == "cpu":
        return Finding(check="precision", status="fail", detail="fp16 training needs a CUDA GPU",
                       fix=["train.precision=fp32"])
    if precision == "bf16" and device == "cuda" and not native_bf16(machine):
        return Finding(check="precision", status="fail",
                       detail="bf16 needs native bfloat16 (compute capability 8.0+); this GPU would only emulate it, "
                              "slowly or not at all; fp16 is native here", fix=["train.precision=fp16"])
    return Finding(check="precision", status="ok", detail=f"{precision} on {device}")


def _quantization(recipe: Recipe, machine: Machine, device: Device) -> Finding | None:
    train = recipe.train
    if not isinstance(train, QloraTrain):
        return None
    q = train.quantization
    if device == "cuda" and not machine.bitsandbytes_cuda:
        return Finding(check="quantization", status="fail", detail="bitsandbytes cannot use this GPU")
    if q.bits == 4 and q.compute_dtype == "bfloat16" and device == "cuda" and not native_bf16(machine):
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
