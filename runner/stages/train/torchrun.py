"""A train attempt over several processes: torchrun relaunches the step as runner.stages.train.worker, one process
per device (or per device on each node, multi-node), and the workers report failures through files in `launch/`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from runner.stages import StageError
from runner.stages.train.job import Job, OutOfMemory, TrainConfig

log = logging.getLogger(__name__)

LAUNCH = "launch"


def launch_distributed(job: Job) -> dict[str, Any]:
    """Run the attempt as `torchrun ... -m runner.stages.train.worker`; the workers write the outputs, we read them."""
    folder = job.out / LAUNCH
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (job.out / "metrics.json").unlink(missing_ok=True)  # a stale one must not pass for this attempt's result
    spec = folder / "job.json"
    spec.write_text(json.dumps(job.to_json()))
    command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(job.train), "-m",
               "runner.stages.train.worker", str(spec)]
    log.info("launching: %s", " ".join(command))
    code, tail = _stream(command)
    failure = worker_failure(folder)
    if failure == "oom":
        raise OutOfMemory("a worker ran out of accelerator memory")
    if failure:
        raise StageError(failure)
    if code != 0 or not (job.out / "metrics.json").exists():
        raise StageError(f"torchrun exited with status {code}; its last lines:\n" + "".join(tail))
    shutil.rmtree(folder, ignore_errors=True)
    return json.loads((job.out / "metrics.json").read_text())


def torchrun_args(train: TrainConfig) -> list[str]:
    dist = train.distributed
    assert dist is not None
    args = ["--nproc_per_node", str(dist.nproc_per_node), "--nnodes", str(dist.nnodes)]
    if dist.nnodes == 1:
        return [*args, "--standalone"]  # a free local port, no rendezvous setup
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if name not in os.environ]
    if missing:
        raise StageError(
            f"multi-node training (nnodes={dist.nnodes}) needs {', '.join(missing)} in the environment on every machine: "
            "MASTER_ADDR/MASTER_PORT of node 0, and NODE_RANK 0..nnodes-1"
        )
    rank = os.environ["NODE_RANK"]
    if not (rank.isascii() and rank.isdigit()) or int(rank) >= dist.nnodes:
        raise StageError(f"NODE_RANK={rank!r}: expected this machine's number, 0..{dist.nnodes - 1} "
                         f"(train.distributed.nnodes is {dist.nnodes})")
    return [*args, "--node_rank", rank, "--master_addr", os.environ["MASTER_ADDR"],
            "--master_port", os.environ["MASTER_PORT"]]


def _stream(command: list[str]) -> tuple[int, deque[str]]:
    """Run the command, passing its output line by line to our log (the executor's step log) and keeping the tail."""
    root = str(Path(__file__).resolve().parents[2])  # the workers import `runner` from the same tree as we do
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as process:
        assert process.stdout is not None
        for line in process.stdout:
            log.info("%s", line.rstrip())
            tail.append(line)
    return process.returncode, tail


def worker_failure(folder: Path) -> str | None:
    """What a worker reported before it exited: "oom", a StageError message, or None."""
    if any(folder.glob("oom-*")):
        return "oom"
    reports = sorted(folder.glob("error-*"))
    return reports[0].read_text() if reports else None


def report_failure(job: Job, rank: int, exc: BaseException) -> None:
    """Called by a worker: leave the reason where launch_distributed looks for it."""
    folder = job.out / LAUNCH
    if isinstance(exc, OutOfMemory):
        (folder / f"oom-{rank}").write_text(str(exc))
    else:
        (folder / f"error-{rank}").write_text(str(exc))

