"""The train step as a process of its own: `python tests/ray_train_job.py JOB.json`, JOB holding the stage's config,
its inputs and out folder, and optionally the executor's placement (runner.stages.Placement as JSON; its `localize`
is runner.fetch's, as the executor's). tests/test_ray_train.py and bench/ray_overhead.py run it inside the Ray cluster's namespaces
(tests/ray_cluster.py), where the driver must be to reach the cluster. It writes RESULT.json beside JOB: the metrics and
Trainer's log history, or the StageError's message (as the CLI would print it).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.fetch import localize  # noqa: E402 - after the path
from runner.stages import Placement, StageError, train  # noqa: E402


def main(job_file: str) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    job = json.loads(Path(job_file).read_text())
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    try:
        placement = Placement.from_json(job["placement"], localize) if "placement" in job else None
        metrics = train.run(job["config"], {k: Path(v) for k, v in job["inputs"].items()}, out, placement)
    except StageError as exc:
        result = {"error": str(exc), "seconds": time.perf_counter() - began}
    else:
        state = json.loads((out / "trainer_state.json").read_text())
        result = {"metrics": metrics, "log_history": state["log_history"], "seconds": time.perf_counter() - began}
    Path(job_file).with_name("result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
