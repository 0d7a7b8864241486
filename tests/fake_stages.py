"""A test-only stage, swapped in for every stage kind through the same STAGES table the real stages use.

It is fast and observable: it writes a result derived from its config and its inputs, appends one line per execution to
$FAKE_STAGE_COUNTER, sleeps $FAKE_STAGE_SLEEP seconds inside the step named by $FAKE_STAGE_SLOW (after writing a first
file, so a kill leaves a half-written folder), and fails in the step named by $FAKE_STAGE_FAIL. In the step named by
$FAKE_STAGE_PRINT it prints $HF_TOKEN and a token-shaped string the way stages and libraries do: Python's print, a raw
write to fd 2 (native code), a progress bar's carriage returns, and a child process's stdout and stderr.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

from runner import stages
from runner.stages import StageError, StageSpec


def install() -> None:
    for kind, spec in list(stages.STAGES.items()):
        module = types.ModuleType(f"fake_stage_{kind}")
        module.run = functools.partial(run, kind)  # type: ignore[attr-defined]
        sys.modules[module.__name__] = module
        stages.STAGES[kind] = StageSpec(kind, module.__name__, spec.version, spec.packages, spec.resumable)


def run(kind: str, config: dict, inputs: dict[str, Path], out: Path) -> dict:
    counter = os.environ.get("FAKE_STAGE_COUNTER")
    if counter:
        with open(counter, "a") as handle:
            handle.write(f"{kind} {os.getpid()}\n")
    if os.environ.get("FAKE_STAGE_FAIL") == kind:
        # as a gate does: the report first, then the failure that points at it
        (out / f"{kind}_report.json").write_text(json.dumps({"gate": "failed"}))
        raise StageError(f"{kind} failed on purpose (see {out / f'{kind}_report.json'})")
    if os.environ.get("FAKE_STAGE_PRINT") == kind:
        print_secrets()
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(inputs):
        digest.update((inputs[name] / "result.txt").read_bytes())
    source = config.get("data", {}).get("source") or {}
    if kind == "data" and source.get("path"):
        digest.update(Path(source["path"]).read_bytes())
    (out / "part1.txt").write_text("written before the slow part\n")
    if os.environ.get("FAKE_STAGE_SLOW") == kind:
        time.sleep(float(os.environ.get("FAKE_STAGE_SLEEP", "30")))
    (out / "result.txt").write_text(digest.hexdigest() + "\n")
    return {"inputs": sorted(inputs)}


# Shaped like a Hugging Face token but in no environment variable: only the pattern can catch it.
PATTERN_TOKEN = "hf_" + "Q7x" * 12


def print_secrets() -> None:
    token = os.environ.get("HF_TOKEN", "")
    print(f"python print: token={token}", flush=True)
    os.write(2, f"native write: {PATTERN_TOKEN}\n".encode())
    os.write(1, f"progress 1/2 {token}\rprogress 2/2 {token}\r".encode())
    child = (f"import os, sys; print('child stdout', os.environ['HF_TOKEN']); "
             f"print('child stderr {PATTERN_TOKEN}', file=sys.stderr)")
    subprocess.run([sys.executable, "-c", child], check=True)
    sys.stdout.write("stage done\n")


def main(argv: list[str]) -> int:
    """`python -m tests.fake_stages ARGS...`: the real `recipe` CLI with the fake stages installed (for subprocesses)."""
    install()
    from runner.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
