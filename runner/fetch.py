"""A step's inputs on a machine other than the one that planned it (a Ray Train worker's node): what the executor hands a
placed stage as `Placement.localize` (runner/stages/__init__.py), since a stage never imports the store.

An input is found, in order: in the driver's own folder when this machine sees it and it verifies (one machine, or a
cache on a shared filesystem); in this machine's cache (RECIPE_CACHE, as `recipe run` there would use); else pulled from
the remote by its key and verified file by file into this machine's cache, as `recipe pull` does. The remote's URL comes
without credentials: each machine's environment holds its own (AWS_* and the rest of the store's standard chain).
"""

from __future__ import annotations

from pathlib import Path

from runner.stages import Placement, StageError
from runner.store.local import Cache, node_work_key
from runner.store.remote import Remote, RemoteError


def localize(placement: Placement, name: str | None, seen: Path | None = None) -> Path:
    """The folder of input `name` on this machine (`seen`: where the driver has it); None: a work folder for the step.

    Raises:
        StageError: the input is neither here nor on the remote, the remote refused it (a file's hash differs from its
            manifest) or cannot be reached.
    """
    cache = Cache()
    if name is None:
        # a folder of this machine's cache, kept between attempts like the step's own work folder, and apart from it
        return cache.workdir("train", node_work_key(placement.key, 1), keep=True)
    kind, key = placement.sources[name]
    if seen is not None and seen.is_dir() and (driver := _cache_of(seen, kind, key)) is not None:
        if (hit := driver.lookup(kind, key)) is not None:
            return hit.outputs
    if (hit := cache.lookup(kind, key)) is not None:
        return hit.outputs
    if placement.remote is None:
        raise StageError(f"the {name} step's output ({kind} {key[:12]}) is not on this machine and no remote is set: "
                         "give every node the same cache (a shared filesystem) or a remote (`recipe run --push --remote "
                         "URL`)")
    try:
        pulled = Remote(placement.remote).pull(cache, kind, key)
    except RemoteError as exc:
        raise StageError(f"cannot fetch the {name} step's output ({kind} {key[:12]}): {exc}") from None
    if pulled.entry is None:
        why = "; ".join(pulled.refused[:3]) or "the remote has no entry for it"
        raise StageError(f"cannot fetch the {name} step's output ({kind} {key[:12]}) from {placement.remote}: {why}")
    return pulled.entry.outputs


def _cache_of(outputs: Path, kind: str, key: str) -> Cache | None:
    """The cache an entry's outputs folder (<root>/entries/<kind>/<key>/outputs) belongs to, or None for another path."""
    parts = outputs.parts
    if len(parts) < 5 or parts[-4:] != ("entries", kind, key, "outputs"):
        return None
    return Cache(outputs.parents[3])
