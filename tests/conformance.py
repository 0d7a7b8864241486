"""What the conformance tests (tests/test_conformance*.py) share: a copy of the checkout as a fresh clone has it, and a
documented command run in it as a user runs it.

The conformance tests are split over several files so that `nox -s tests` (pytest-xdist, `--dist loadfile`: one file per
worker at a time) spreads the heavy ones (the kill -9 trials, the benches, the tour) over every core. Each file copies
the checkout once (its module-scoped `clone` fixture: `copy_checkout(tmp_path_factory.mktemp("clone"))`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from common import QUICKSTART_SMOKE  # noqa: E402 - bench/common.py: the smoke size the benches use too

TIMEOUT_S = 1800  # per command; a loaded shared machine ran the faults smoke past 15 minutes


# --- a copy of the repository and how commands run in it ---------------------------------------------------------------


def copy_checkout(target: Path) -> Path:
    """The files a fresh clone has (tracked, plus new files not yet committed that git does not ignore)."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "-co", "--exclude-standard"], check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = REPO / rel
        if source.is_file():
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / rel)
    return target


def env_for(clone: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(clone), "RECIPE_CACHE": str(clone / ".recipe-cache"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE", **extra}


def sh(clone: Path, *argv: str, expect: int | None = 0, **env: str) -> subprocess.CompletedProcess:
    done = subprocess.run(list(argv), cwd=clone, env=env_for(clone, **env), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    if expect is not None:
        assert done.returncode == expect, f"{' '.join(argv)}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def recipe(clone: Path, *args: str, expect: int | None = 0) -> subprocess.CompletedProcess:
    """`recipe ARGS` (the console script is runner.cli:main) with the clone's runner."""
    return sh(clone, sys.executable, "-m", "runner.cli", *args, expect=expect)


def figure(output: str, name: str) -> float:
    """The value of the `FIGURE NAME ... = VALUE (target ...)` line a bench prints (bench/common.py figure)."""
    found = re.findall(rf"^FIGURE {re.escape(name)} .* = (-?[0-9.]+(?:e[-+]?[0-9]+)?)%? \(target .*\)$", output, re.M)
    assert len(found) == 1, f"no single FIGURE {name} line in:\n{output[-3000:]}"
    return float(found[0])


Q = QUICKSTART_SMOKE  # every tour command names the same overrides, so they all mean the same run
STEPS = ["data", "train", "export", "quantize", "evaluate", "serve"]


def bench(clone: Path, script: str, *args: str, expect: int | None = 0) -> str:
    """`python bench/SCRIPT ARGS` in the clone, on one torch thread (the suite runs on every core); its stdout."""
    return sh(clone, sys.executable, f"bench/{script}", *args, expect=expect, OMP_NUM_THREADS="1").stdout


def step_lines(output: str) -> dict[str, str]:
    """step -> its row in a plan table."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
        if cells and cells[0] in ("data", "train", "export", "quantize", "evaluate", "serve"):
            rows[cells[0]] = " ".join(cells[1:])
    return rows
