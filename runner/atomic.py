"""Files written whole or not at all: a crash or a kill -9 leaves the old file or the new one, never a torn one.
The store's manifests and index and the stages' memo files use it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: Path, text: str) -> None:
    """Write beside the target, fsync, then rename over it (rename is atomic within a filesystem)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_memo(folder: Path, key: str, value: dict[str, Any]) -> None:
    """One memoized sub-result (the folder the executor hands a memo stage at inputs["memo"]), written atomically."""
    atomic_write(folder / f"{key}.json", json.dumps(value, sort_keys=True, indent=1))


def read_memo(folder: Path, key: str) -> dict[str, Any] | None:
    """A memoized sub-result, or None when absent or unreadable (a damaged memo costs a recomputation, not a wrong result)."""
    try:
        value = json.loads((folder / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
