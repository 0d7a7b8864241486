"""The machine: what `recipe doctor` compares a recipe with, probed here or read from a hardware profile.

Machine and Gpu (one shape for both), Device (what a machine trains on), probe() (CPU, RAM, disk, CUDA through torch
and nvidia-smi, bitsandbytes, the ONNX Runtime providers), and the profiles under runner/profiles (load_profile,
profile_names, ProfileError).
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runner.errors import RunnerError
from runner.hardware.platform_facts import nvidia_smi_query

GIB = 1024**3
PROFILES_DIR = Path(__file__).parent.parent / "profiles"

Device = Literal["cuda", "cpu"]


class ProfileError(RunnerError):
    """A hardware profile that cannot be read: bad input, exit code 2."""


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
    from runner.store.local import default_root

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
    try:
        rows = nvidia_smi_query(("name", "memory.total", "compute_cap", "driver_version"), timeout=15, units=False)
    except (OSError, subprocess.SubprocessError) as exc:
        problems.append(f"nvidia-smi failed: {exc}")
        return found
    for name, mib, cc, driver in rows or ():
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


def native_bf16(machine: Machine) -> bool:
    return all(gpu.bf16 for gpu in machine.gpus)
