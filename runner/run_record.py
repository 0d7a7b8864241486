"""What a run leaves behind, as data: `RunResult` (the run folder and one `StepResult` per planned step).

The executor (runner/execute.py) fills these in as steps finish and writes them to RUN_DIR/run.json; the report
(runner/report.py) and the CLI's summary read them. Neither reader needs the executor: `read_run` rebuilds the same
result from a finished run folder's run.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STEP_STATUSES = ("cached", "ran", "failed", "skipped")


@dataclass
class StepResult:
    kind: str
    key: str
    status: str  # cached | ran | failed | skipped
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: str | None = None
    error: str | None = None
    reasons: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    recipe: str
    run_dir: Path
    steps: list[StepResult]

    @property
    def ok(self) -> bool:
        return all(step.status in ("cached", "ran", "skipped") for step in self.steps)


def read_run(run_dir: Path) -> RunResult:
    """The result a finished (or interrupted) run wrote to RUN_DIR/run.json."""
    data = json.loads((run_dir / "run.json").read_text())
    return RunResult(data["recipe"], run_dir, [StepResult(**step) for step in data["steps"]])
