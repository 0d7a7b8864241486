"""One torchrun process of a distributed train step: `python -m torch.distributed.run ... -m runner.stages.train.worker JOB`.

JOB is the JSON file train_torchrun.launch_distributed wrote. Every rank runs the same attempt; Trainer sets up the
process group (DDP, or FSDP when asked) from torchrun's environment, and rank 0 alone writes the outputs. A failure is
reported through a file in the job's launch folder (out of memory, or a StageError's message) so the launching process
can act on it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from runner.stages import StageError
from runner.stages.train import train_here
from runner.stages.train.job import Job, OutOfMemory
from runner.stages.train.torchrun import report_failure


def teardown() -> None:
    """Leave the process group together: without the barrier and destroy, about 1 run in 8 aborted at exit (measured
    with torchrun, 2 processes on gloo on CPU)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str]) -> int:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    job = Job.from_json(json.loads(Path(argv[0]).read_text()))
    try:
        train_here(job)
    except (OutOfMemory, StageError) as exc:
        # No teardown here: the other ranks may be blocked in a collective; torchrun stops them once this one exits.
        report_failure(job, rank, exc)
        logging.getLogger(__name__).error("%s", exc)
        return 1
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
