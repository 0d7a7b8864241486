"""Sharing a recipe reproducibly: `NAME.lock` beside the recipe records how it resolved and what it produced.

The lock holds the resolved recipe's hash, every step's key and key material (config, upstream keys, package versions),
each output file's sha256, and the env name. `recipe run --locked` refuses to run when anything resolves differently;
`recipe verify` lists every output whose hash differs from the lock. Nothing secret is in key material, so the lock is
safe to commit.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from runner.cache import Cache
from runner.plan import Step, canonical, why_stale
from runner.recipe import Loaded

LOCK_VERSION = 1


def lock_path(loaded: Loaded) -> Path:
    return loaded.path.with_suffix(".lock")


def recipe_hash(steps: list[Step]) -> str:
    """The resolved recipe, as the steps see it (local files by content), hashed."""
    return hashlib.sha256(canonical([s.material["config"] for s in steps]).encode()).hexdigest()


def build_lock(loaded: Loaded, steps: list[Step], cache: Cache) -> tuple[dict[str, Any], list[str]]:
    """The lock document, and the steps whose outputs are not in the cache yet (run the recipe first)."""
    missing = []
    locked_steps = {}
    for step in steps:
        entry = cache.entry(step.kind, step.key)
        outputs = {}
        if entry is None:
            missing.append(step.kind)
        else:
            outputs = {rel: meta["sha256"] for rel, meta in entry.manifest["outputs"].items()}
        locked_steps[step.kind] = {"key": step.key, "material": step.material, "outputs": outputs}
    document = {
        "lock_version": LOCK_VERSION,
        "recipe": loaded.recipe.name,
        "env": loaded.recipe.env,
        "overrides": loaded.overrides,
        "recipe_sha256": recipe_hash(steps),
        "steps": locked_steps,
    }
    return document, missing


def write_lock(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def read_lock(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    if document.get("lock_version") != LOCK_VERSION:
        raise ValueError(f"{path}: lock_version {document.get('lock_version')} is not {LOCK_VERSION}; run `recipe lock`")
    return document


def lock_differences(document: dict[str, Any], loaded: Loaded, steps: list[Step]) -> list[str]:
    """Everything that resolves differently from the lock, one line each (empty when it matches)."""
    problems = []
    if document.get("env") != loaded.recipe.env:
        problems.append(f"env: locked {document.get('env')}, recipe says {loaded.recipe.env}")
    locked = document.get("steps", {})
    for step in steps:
        if step.kind not in locked:
            problems.append(f"{step.kind}: step is not in the lock")
            continue
        if locked[step.kind]["key"] != step.key:
            previous = {"key": locked[step.kind]["key"], "material": locked[step.kind]["material"]}
            problems += [f"{step.kind}: {reason}" for reason in why_stale(step, previous)]
    problems += [f"{kind}: step is in the lock but not in the recipe" for kind in locked if kind not in {s.kind for s in steps}]
    return problems


def verify_outputs(document: dict[str, Any], steps: list[Step], cache: Cache) -> tuple[list[str], int]:
    """Outputs whose sha256 differs from the lock (and steps not run or resolved differently); and files matched."""
    problems, matched = [], 0
    for step in steps:
        locked = document.get("steps", {}).get(step.kind)
        if locked is None or locked["key"] != step.key:
            problems.append(f"{step.kind}: resolves differently from the lock (see `recipe run --locked`)")
            continue
        entry = cache.entry(step.kind, step.key)
        if entry is None:
            problems.append(f"{step.kind}: not in the cache; run the recipe first")
            continue
        mine = {rel: meta["sha256"] for rel, meta in entry.manifest["outputs"].items()}
        for rel in sorted(set(mine) | set(locked["outputs"])):
            if rel not in mine:
                problems.append(f"{step.kind}/{rel}: in the lock, not produced here")
            elif rel not in locked["outputs"]:
                problems.append(f"{step.kind}/{rel}: produced here, not in the lock")
            elif mine[rel] != locked["outputs"][rel]:
                problems.append(f"{step.kind}/{rel}: sha256 {mine[rel][:12]} != locked {locked['outputs'][rel][:12]}")
            else:
                matched += 1
    return problems, matched
