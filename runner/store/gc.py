"""`recipe cache gc`: what the local cache may delete, and what it keeps because someone still needs it.

An entry is kept when any of these names it:
- a lock file (recipes/*.lock, and every lock named with `--lock`): a shared lock promises its outputs can be verified;
- a recipe's last run (the cache's index), so `recipe plan` can still say why a step is stale;
- a run within the retention window (`--keep-days`): a run record under the runs folder that is newer than the window,
  or the entry's own commit time. An override run (`train.epochs=2`) is a run like any other: only the index forgets it.

A work folder is kept while a step holds its lock (it is running), and, unless `--work` asks, when it belongs to a
resumable stage (train): a killed train leaves its checkpoints there and the next run resumes from them. Quarantined
entries and the work folders of crashed non-resumable steps are removed.

Nothing is removed until the whole plan is made: a lock that cannot be read stops gc before it deletes anything.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.store.local import Cache, tree_size

DAY = 86400.0
DEFAULT_KEEP_DAYS = 7.0


class GcError(RunnerError):
    """A lock file gc was told to honour cannot be read: nothing is removed."""


@dataclass(frozen=True)
class Doomed:
    path: Path
    size: int
    why: str  # "entry", "quarantined", "work folder of a crashed step", "resumable work folder (--work)"


@dataclass
class GcPlan:
    remove: list[Doomed] = field(default_factory=list)
    kept: dict[str, int] = field(default_factory=dict)  # reason -> how many entries or work folders it kept

    @property
    def freed(self) -> int:
        return sum(d.size for d in self.remove)

    def keep(self, reason: str) -> None:
        self.kept[reason] = self.kept.get(reason, 0) + 1


def lock_keys(path: Path) -> set[str]:
    """The step keys a lock file pins. Read leniently (any lock_version): gc must keep what an older lock names too."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        steps = document["steps"]
        return {str(step["key"]) for step in steps.values()}
    except FileNotFoundError:
        raise GcError(f"--lock {path}: no such lock file") from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise GcError(f"{path}: not a lock file gc can read ({type(exc).__name__}: {exc}); nothing was removed; "
                      "fix or move it, then run gc again") from None


def recent_run_keys(runs_dir: Path, since: float) -> set[str]:
    """Keys of every step recorded by a run (runs/<recipe>/<stamp>/run.json) written at or after `since`."""
    keys: set[str] = set()
    for record in runs_dir.glob("*/*/run.json"):
        try:
            if record.stat().st_mtime < since:
                continue
            steps = json.loads(record.read_text())["steps"]
            keys |= {str(step["key"]) for step in steps if step.get("key")}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged run record keeps nothing; the entry's own time still counts
    return keys


def last_run_keys(cache: Cache) -> set[str]:
    """Keys of each recipe's last run (the index `recipe plan` explains staleness with)."""
    keys: set[str] = set()
    for index in (cache.root / "index").glob("*.json"):
        try:
            keys |= {str(item["key"]) for item in json.loads(index.read_text()).values()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return keys


def committed_at(manifest: dict[str, Any], fallback: float) -> float:
    started = manifest.get("started")
    try:
        return datetime.fromisoformat(str(started)).timestamp()
    except (TypeError, ValueError):
        return fallback


def plan(cache: Cache, *, locks: list[Path], runs_dir: Path, resumable: set[str], keep_days: float = DEFAULT_KEEP_DAYS,
         work: bool = False, now: float | None = None) -> GcPlan:
    """What gc would remove, and why the rest stays. Reads everything before anything is deleted.

    `resumable`: the stage kinds whose work folders hold checkpoints a next attempt resumes from (StageSpec.resumable;
    the caller knows the stages, the store does not)."""
    since = (time.time() if now is None else now) - keep_days * DAY
    pinned = set().union(*(lock_keys(path) for path in locks)) if locks else set()
    last = last_run_keys(cache)
    recent = recent_run_keys(runs_dir, since)
    result = GcPlan()
    for entry in cache.entries():
        if entry.key in pinned:
            result.keep("named by a lock file")
        elif entry.key in last:
            result.keep("a recipe's last run")
        elif entry.key in recent:
            result.keep(f"used by a run in the last {keep_days:g} day(s)")
        else:
            manifest_file = entry.path / "manifest.json"
            try:
                manifest, mtime = entry.manifest, manifest_file.stat().st_mtime
            except (OSError, ValueError):
                manifest, mtime = {}, 0.0
            if committed_at(manifest, mtime) >= since:
                result.keep(f"committed in the last {keep_days:g} day(s)")
            else:
                result.remove.append(Doomed(entry.path, tree_size(entry.path), "entry"))
    for folder in sorted((cache.root / "quarantine").glob("*")):
        result.remove.append(Doomed(folder, tree_size(folder), "quarantined"))
    # a pull folder (runner.store.remote) is a work folder too: verified files a next pull reuses
    for folder in sorted([*(cache.root / "work").glob("*"), *(cache.root / "pull").glob("*")]):
        try:
            kind, key = cache.parse(folder)
        except ValueError:  # not a step's folder: not the cache's to delete
            continue
        resumes = kind in resumable and any(p.is_file() for p in folder.rglob("*"))
        if resumes and not work:
            result.keep("resumable work folder (`--work` removes it)")
            continue
        try:
            with cache.lock(key, timeout=0):
                pass
        except TimeoutError:
            result.keep("work folder of a running step")
            continue
        why = "resumable work folder (--work)" if resumes else "work folder of a crashed step"
        result.remove.append(Doomed(folder, tree_size(folder), why))
    return result


def collect(cache: Cache, gc_plan: GcPlan) -> None:
    """Remove what the plan lists. A work folder is re-checked under its key's lock: a step may have started since."""
    for doomed in gc_plan.remove:
        if doomed.why.startswith(("work", "resumable")):
            _, key = cache.parse(doomed.path)
            try:
                with cache.lock(key, timeout=0):
                    shutil.rmtree(doomed.path, ignore_errors=True)
            except TimeoutError:
                continue
        else:
            shutil.rmtree(doomed.path, ignore_errors=True)
