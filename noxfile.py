"""Pinned environments for running recipes and for the project's own checks.

    nox -s recipe -- quickstart [train.epochs=1] [--force train]   run a recipe in the env its `env:` names
    nox -s tests                                                   the test suite (what CI runs)
    nox -s lint                                                    ruff and mypy

Every session installs exact pins from envs/, so a recipe runs in the environment it was written for.
Venvs are reused between runs (pip then finds everything satisfied in seconds).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import nox

nox.options.reuse_venv = "yes"
nox.options.default_venv_backend = "venv"  # pip-based: uv ignores pip's configuration and would pull a CUDA torch
nox.options.sessions = ["tests"]

ROOT = Path(__file__).parent
PYTHON = "3.11"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def install_env(session: nox.Session, variant: str, dev: bool = False) -> None:
    pins = ROOT / "envs" / f"{variant}.txt"
    args = ["-r", str(pins)]
    if dev:
        args += ["-r", str(ROOT / "envs" / "dev.txt"), "-c", str(pins)]
    session.install(*args)
    session.install("--no-deps", "-e", str(ROOT))


def recipe_env(recipe_arg: str) -> str:
    """The `env:` a recipe names (read without importing the runner: the env may not exist yet)."""
    for candidate in (Path(recipe_arg), ROOT / "recipes" / f"{recipe_arg}.yaml", ROOT / "recipes" / recipe_arg):
        if candidate.is_file():
            match = re.search(r"^env:\s*([\w-]+)", candidate.read_text(), re.MULTILINE)
            return match.group(1) if match else "cpu"
    return "cpu"


def has_cuda() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").exists()


@nox.session(python=PYTHON)
def recipe(session: nox.Session) -> None:
    """Run a recipe: `nox -s recipe -- NAME [field=value ...] [runner flags]`."""
    if not session.posargs:
        session.error("name a recipe: nox -s recipe -- quickstart")
    variant = recipe_env(session.posargs[0])
    if variant != "cpu" and not has_cuda():
        session.warn(f"the recipe asks for env '{variant}' but this machine has no NVIDIA GPU: using envs/cpu.txt")
        variant = "cpu"
    install_env(session, variant)
    session.run("recipe", "run", *session.posargs, env=OFFLINE if os.environ.get("CI") else {})


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite on the pinned cpu environment (no network: models are built from configs)."""
    install_env(session, "cpu", dev=True)
    session.run("pytest", "-q", "-p", "no:cacheprovider", *session.posargs, env=OFFLINE)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (style and bugs) and mypy (types) on the runner."""
    install_env(session, "cpu", dev=True)
    session.run("ruff", "check", "runner", "tests", "noxfile.py")
    session.run("mypy", "runner")
