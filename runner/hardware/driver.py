"""The NVIDIA driver a CUDA environment needs, against the one installed (standard library only: nox imports it).

Each CUDA env file records its minimum driver in a `# min-driver: N` line (envs/cuda13.in: 580, what CUDA 13.0 needs on
Linux). A CUDA 13 build of torch under an older driver installs gigabytes and then reports
`torch.cuda.is_available() == False`, so nox's hwcheck and recipe sessions refuse before installing, `python -m
runner.hwcheck` before importing torch, and `recipe doctor` says it in a finding.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from runner.hardware.platform_facts import nvidia_smi_query

ENVS = Path(__file__).resolve().parent.parent.parent / "envs"
MIN_DRIVER_LINE = re.compile(r"^#\s*min-driver:\s*(\d+(?:\.\d+)*)\s*$", re.MULTILINE)


def min_driver(env: str, envs: Path = ENVS) -> str | None:
    """The minimum driver the env's file records, or None (a CPU env, or no envs/ folder beside an installed runner)."""
    for name in (f"{env}.in", f"{env}.txt"):
        try:
            found = MIN_DRIVER_LINE.search((envs / name).read_text())
        except (OSError, ValueError):  # no such file, or an env name the OS refuses
            continue
        if found:
            return found.group(1)
    return None


def installed_driver() -> str | None:
    """The driver version nvidia-smi reports (the first GPU's), or None without a working nvidia-smi."""
    try:
        rows = nvidia_smi_query(("driver_version",), timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    return rows[0][0] if rows and rows[0] and rows[0][0] else None


def driver_problem(env: str, found: str | None, envs: Path = ENVS) -> str | None:
    """Why env `env` cannot run under driver `found`, or None (it can, or there is nothing to compare)."""
    needed = min_driver(env, envs)
    if needed is None or found is None:
        return None
    if _version(found) >= _version(needed):
        return None
    return (f"env {env} needs NVIDIA driver >= {needed} (envs/{env}.in), this machine has {found}: its CUDA build of "
            f"torch would not see the GPU. Update the driver, or run on a machine that has >= {needed}")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text))
