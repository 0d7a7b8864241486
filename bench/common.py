"""What the benchmarks share: the machine they ran on, timing a whole process, and saving a result."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def machine_info() -> dict[str, object]:
    from runner.hardware import cpu_model  # cheap: the doctor imports torch only when it probes CUDA

    cpu = cpu_model()
    threads = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "threads": threads, "load_average": os.getloadavg()}


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    """Wall time of a whole fresh process (imports included), which must succeed."""
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def save(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "machine": machine_info()}, indent=2))
