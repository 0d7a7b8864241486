"""What the benchmarks share: the machine they ran on, timing a whole process, and saving a result."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# `--smoke`: every bench has a size that runs in seconds to a minute, so the test suite runs each one as a user would
# (tests/test_conformance.py) and a renamed step breaks a test, not the bench. Smoke figures are not the README's figures.
# The quickstart at its smallest size that still passes every gate it ships with (probes, accuracy, forgetting budget):
QUICKSTART_SMOKE = ["data.select=600", "train.epochs=1", "train.batch_size=16", "train.learning_rate=2e-4",
                    "export.validation_samples=40", "quantize.eval_samples=40", "serve.eval_samples=40",
                    "serve.latency_requests=10"]


def figure(name: str, what: str, value: float, target: str, met: bool | None, unit: str = "") -> str:
    """The one line each bench prints for its figure: `FIGURE P3 validate / import torch = 0.190 (target <= 0.3: met)`.
    Tests and readers look for this line, whatever tables the bench prints above it."""
    verdict = "no target" if met is None else ("met" if met else "missed")
    line = f"FIGURE {name} {what} = {value:.4g}{unit} (target {target}: {verdict})"
    print(line, flush=True)
    return line


def machine_info() -> dict[str, object]:
    from runner.hardware.probe import cpu_model  # cheap: the doctor imports torch only when it probes CUDA

    cpu = cpu_model()
    threads = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "threads": threads, "load_average": os.getloadavg()}


def timed(command: list[str], env: dict[str, str] | None = None) -> float:
    """Wall time of a whole fresh process (imports included), which must succeed."""
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def timed_with_cpu(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall time and CPU time (user + system, the process and its children) of a whole fresh process. CPU time barely
    moves when other processes or the VM host take a share of the cores, so it separates a slower program from a
    busier machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = timed(command, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def save(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "machine": machine_info()}, indent=2))
