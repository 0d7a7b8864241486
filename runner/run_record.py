"""What a run leaves behind, as data: `RunResult` (the run folder and one `StepResult` per planned step).

The executor (runner/execute.py) fills these in as steps finish and writes them to RUN_DIR/run.json; the report
(runner/report/build.py) and the CLI's summary read them. They are plain data, so the readers never import the executor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STEP_STATUSES = ("cached", "pulled", "ran", "failed", "skipped")


@dataclass
class StepResult:
    kind: str
    key: str
    status: str  # cached | pulled (from a remote, verified) | ran | failed | skipped
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    outputs: str | None = None
    error: str | None = None
    reasons: list[str] = field(default_factory=list)
    remote: str | None = None  # what the remote did for this step: pulled, pushed, refused, failed (one line)


@dataclass
class RunResult:
    recipe: str
    run_dir: Path
    steps: list[StepResult]

    @property
    def ok(self) -> bool:
        return all(step.status in ("cached", "pulled", "ran", "skipped") for step in self.steps)
