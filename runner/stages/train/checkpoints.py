"""The train step's checkpoints (`checkpoints/` in its out folder, while it runs): which are whole, which one a
resumed attempt goes on from, and the removal of half-written ones a killed attempt left.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def _checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.rsplit("-", 1)[-1].isdigit()]
    return sorted(found, key=checkpoint_step, reverse=True)


def is_complete(checkpoint: Path) -> bool:
    """Trainer writes trainer_state.json last (after weights, optimizer, scheduler and RNG states): if it parses, the
    checkpoint is whole. A step killed while saving leaves a folder without it, or with a truncated one."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return True


def resume_point(folder: Path) -> Path | None:
    """The newest complete checkpoint (transformers' get_last_checkpoint takes the newest folder, whole or not)."""
    return next((c for c in _checkpoints(folder) if is_complete(c)), None)


def drop_incomplete_checkpoints(folder: Path) -> None:
    """Remove half-written checkpoints, so checkpoint rotation and the resume never meet them."""
    for checkpoint in _checkpoints(folder):
        if not is_complete(checkpoint):
            log.warning("removing incomplete checkpoint %s (the previous attempt was killed while saving it)", checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)
