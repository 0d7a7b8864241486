"""The train step's job: its parsed config plus what the out-of-memory retry changes (batch size, accumulation), in
the form the torchrun workers read back; and OutOfMemory, the signal an attempt (here or in a worker) gives the retry.

Shared by every part of the train stage (runner/stages/train/__init__.py and its train_* modules); imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from runner.recipe.sections import FullTrain, LoraTrain, Model, QloraTrain, Train
from runner.stages import Placement

TrainConfig = FullTrain | LoraTrain | QloraTrain


class OutOfMemory(Exception):
    """An attempt ran out of accelerator memory; `run` retries it with a smaller batch."""


@dataclass(frozen=True)
class Job:
    model: Model
    train: TrainConfig
    seed: int
    inputs: dict[str, Path]
    out: Path
    batch_size: int
    accumulation: int
    oom_retries: int = 0
    packing: bool = False  # data.packing: the plan passes it as the train step's `packing` (only when on)
    placement: Placement = field(default_factory=Placement)  # from the executor: input keys, remote, requires

    @classmethod
    def parse(cls, config: dict[str, Any], inputs: dict[str, Path], out: Path,
              placement: Placement | None = None) -> Job:
        train = TypeAdapter(Train).validate_python(config["train"])
        return cls(
            model=Model.model_validate(config["model"]),
            train=train,
            seed=int(config.get("seed", 42)),
            inputs={kind: Path(path) for kind, path in inputs.items()},
            out=Path(out),
            batch_size=train.batch_size,
            accumulation=train.gradient_accumulation,
            packing=bool(config.get("packing", False)),
            placement=placement or Placement(),
        )

    @property
    def model_json(self) -> dict[str, Any]:
        return self.model.model_dump(mode="json")

    def to_json(self) -> dict[str, Any]:
        """The form the torchrun workers read back (see train_worker.py)."""
        return {
            "config": {"model": self.model_json, "train": self.train.model_dump(mode="json"),
                       "seed": self.seed, "packing": self.packing},
            "inputs": {kind: str(path) for kind, path in self.inputs.items()},
            "out": str(self.out),
            "retry": {"batch_size": self.batch_size, "accumulation": self.accumulation, "oom_retries": self.oom_retries},
            "placement": self.placement.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        job = cls.parse(data["config"], data["inputs"], Path(data["out"]), Placement.from_json(data.get("placement", {})))
        return replace(job, **data["retry"])
