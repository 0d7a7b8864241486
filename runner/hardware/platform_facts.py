"""What this machine is, as far as results depend on it: CPU instruction-set family, GPUs, OS and architecture.

Stdlib only and cheap (planning calls it): no torch import. Also the one place that runs nvidia-smi (nvidia_smi,
nvidia_smi_query), for the doctor's probe and runner.hardware.hwcheck too. Two consumers of the facts:
- planning puts the parts that change a step's bytes into that step's key (the int8 preset picks u8 or s8 weights; the
  GPU count changes Trainer's effective batch);
- the lock records the whole description, so `recipe verify` on another machine can tell platform-dependent
  differences (expected) from unexpected ones.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=1)
def cpu_isa() -> tuple[str, str]:
    """The CPU's int8-relevant instruction-set family (avx512_vnni, avx512, avx2, arm64), and why.

    VNNI (and arm64's dot-product) CPUs multiply u8 activations by s8 weights in one instruction; plain AVX2/AVX-512
    can saturate on u8*s8, so the int8 presets keyed by this family quantize weights to u8 there."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return "arm64", f"machine {machine}"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "avx2", f"no /proc/cpuinfo on {platform.system()}; avx2 is the portable x86-64 preset"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    for flag, family in (("avx512_vnni", "avx512_vnni"), ("avx512f", "avx512"), ("avx2", "avx2")):
        if flag in flags:
            return family, f"/proc/cpuinfo has {flag}"
    return "avx2", "no AVX2/AVX512 flag in /proc/cpuinfo; avx2 is the portable x86-64 preset"


def nvidia_smi(*args: str, timeout: float) -> str | None:
    """nvidia-smi's standard output for `args`; None when it is not installed. The one place that runs nvidia-smi.

    Raises OSError or subprocess.SubprocessError (a non-zero exit, the timeout): each caller decides what that means."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout, check=True).stdout


def nvidia_smi_query(fields: Sequence[str], timeout: float, units: bool = True) -> list[list[str]] | None:
    """`nvidia-smi --query-gpu=FIELDS` as one row of stripped fields per GPU; None without nvidia-smi.

    units=False asks for bare numbers (`16384`, not `16384 MiB`). Raises as nvidia_smi does."""
    out = nvidia_smi(f"--query-gpu={','.join(fields)}", "--format=csv,noheader" + ("" if units else ",nounits"),
                     timeout=timeout)
    if out is None:
        return None
    return [[part.strip() for part in line.split(",")] for line in out.strip().splitlines()]


@lru_cache(maxsize=1)
def gpus() -> tuple[dict[str, str], ...]:
    """The CUDA GPUs this process may use (CUDA_VISIBLE_DEVICES applied), as nvidia-smi names them; () without any."""
    try:
        rows = nvidia_smi_query(("index", "name", "compute_cap"), timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ()
    found = [{"index": parts[0], "name": parts[1], "compute_capability": parts[2]}
             for parts in rows or () if len(parts) >= 3]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        found = [g for g in found if g["index"] in wanted]
    return tuple(found)


def describe() -> dict[str, Any]:
    """The platform as the lock records it."""
    family, _ = cpu_isa()
    return {
        "system": platform.system(),
        "machine": platform.machine(),
        "cpu_isa": family,
        "gpus": [f"{g['name']} (sm {g['compute_capability']})" for g in gpus()],
    }
