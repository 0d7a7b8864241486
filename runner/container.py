"""Run a recipe inside the CUDA image (Dockerfile.cuda) with the GPU, the repository and the caches mounted.

`recipe run NAME --container` calls `run_in_container`: where docker or podman answers (`docker info`), it runs the command;
where none does, it prints the exact command and returns NO_ENGINE. Standard library only: `nox -s docker` imports this too.

The command mounts the repository at /work (recipes, their data and the run folders stay on the host), the Hugging Face
cache at /data/hf and the recipe cache at /data/recipe-cache (the image's VOLUMEs), and passes secrets by name only
(`-e HF_TOKEN`: the engine copies the value from its own environment, so it never appears on a command line or in a log).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from runner.hub import hf_home, hub_cache_root

IMAGE = "recipe-runner:cuda13"  # what `nox -s docker` builds from Dockerfile.cuda
ENGINES = ("docker", "podman")
NO_ENGINE = 125  # docker's own code for "the container could not be run"
CONTAINER_REPO = "/work"
CONTAINER_HF = "/data/hf"
CONTAINER_CACHE = "/data/recipe-cache"
CONTAINER_RECIPE_DIR = "/mnt/recipe"
# Passed through by name when set on the host; never by value.
PASS_THROUGH = ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def hf_mounts() -> list[tuple[Path, str]]:
    """The host's Hugging Face folders and where they go in the container: its home at /data/hf, and its hub cache at
    /data/hf/hub when $HF_HUB_CACHE puts it elsewhere (runner.hub locates both, as huggingface_hub does)."""
    mounts = [(hf_home(), CONTAINER_HF)]
    if not hub_cache_root().is_relative_to(hf_home()):
        mounts.append((hub_cache_root(), f"{CONTAINER_HF}/hub"))
    return mounts


def host_recipe_cache(repo: Path) -> Path:
    """The step cache the runner uses on the host: $RECIPE_CACHE, else ./.recipe-cache of the repository."""
    configured = os.environ.get("RECIPE_CACHE")
    return Path(configured).expanduser().resolve() if configured else repo / ".recipe-cache"


def container_command(recipe: str | Path, args: Sequence[str] = (), *, engine: str = "docker", image: str = IMAGE,
                      repo: Path | None = None) -> list[str]:
    """The `docker run` / `podman run` command that runs `recipe run RECIPE ARGS...` in the image.

    `recipe` is a name under recipes/ or a path to a recipe file; a path inside the repository is passed as the same path
    relative to /work, one outside it has its folder mounted read-only. `args` (overrides like train.epochs=1 and runner
    flags like --force train) are passed through unchanged.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown container engine {engine!r}: use one of {', '.join(ENGINES)}")
    repo = (repo or repo_root()).resolve()
    command = [engine, "run", "--rm", "--ipc=host"]  # --ipc=host: torch DataLoader workers and torchrun need shared memory
    if engine == "docker":
        # the NVIDIA Container Toolkit; files written to the mounts belong to the calling user, not to root
        command += ["--gpus", "all", "--user", f"{os.getuid()}:{os.getgid()}", "-e", "HOME=/tmp"]
    else:
        # CDI device names (nvidia-ctk cdi generate); rootless podman maps the calling user into the container
        command += ["--device", "nvidia.com/gpu=all", "--security-opt", "label=disable", "--userns=keep-id"]
    command += ["-v", f"{repo}:{CONTAINER_REPO}", "-w", CONTAINER_REPO,
                *[arg for host, inside in hf_mounts() for arg in ("-v", f"{host}:{inside}")],
                "-v", f"{host_recipe_cache(repo)}:{CONTAINER_CACHE}"]
    recipe_arg = str(recipe)
    path = Path(recipe).expanduser()
    if path.is_file():
        path = path.resolve()
        if path.is_relative_to(repo):
            recipe_arg = f"{CONTAINER_REPO}/{path.relative_to(repo).as_posix()}"
        else:
            command += ["-v", f"{path.parent}:{CONTAINER_RECIPE_DIR}:ro"]
            recipe_arg = f"{CONTAINER_RECIPE_DIR}/{path.name}"
    for name in PASS_THROUGH:
        if name in os.environ:
            command += ["-e", name]  # by name only: the engine copies the value from its own environment
    return command + [image, "run", recipe_arg, *args]


def engine_answers(engine: str, timeout: float = 30.0) -> bool:
    """Whether `ENGINE info` succeeds: the client is installed and a daemon (or podman itself) answers."""
    if shutil.which(engine) is None:
        return False
    try:
        done = subprocess.run([engine, "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def find_engine(preferred: str | None = None) -> str | None:
    """The first of docker, podman (or only `preferred`) that answers `info`; None where none does."""
    for engine in (preferred,) if preferred else ENGINES:
        if engine_answers(engine):
            return engine
    return None


def run_in_container(recipe: str | Path, args: Sequence[str] = (), *, engine: str | None = None, image: str = IMAGE,
                     repo: Path | None = None, echo: Callable[[str], None] | None = None) -> int:
    """Run the recipe in the image where an engine answers; else print the exact command and return NO_ENGINE (125).

    Returns the container's exit code (that of `recipe run` inside it) when it ran."""
    say = echo or (lambda line: print(line, file=sys.stderr))
    found = find_engine(engine)
    if found is None:
        tried = engine or " / ".join(ENGINES)
        command = container_command(recipe, args, engine=engine or "docker", image=image, repo=repo)
        say(f"no container engine answers here (`{tried} info` failed or is not installed); the command would be:")
        say(f"  {shlex.join(command)}")
        say(f"(build the image first with `nox -s docker`; it is {image})")
        return NO_ENGINE
    command = container_command(recipe, args, engine=found, image=image, repo=repo)
    for folder in (*[host for host, _ in hf_mounts()], host_recipe_cache((repo or repo_root()).resolve())):
        folder.mkdir(parents=True, exist_ok=True)  # else the engine creates them, owned by root
    say(f"$ {shlex.join(command)}")
    return subprocess.run(command).returncode
