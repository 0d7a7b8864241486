"""Sharing a recipe reproducibly: `NAME.lock` beside the recipe records how it resolved and what it produced.

The lock holds the resolved recipe's hash, every step's key and key material (config, upstream keys, package versions,
platform facts), the platform each step ran on (runner.hardware.platform_facts.describe: system, machine, cpu_isa, gpus), the
sha256 of each *artifact* and the names of the *run records* (StageSpec.records: timings, logs, plots; kept, never
compared), and the env name. Nothing secret is in key material, so the lock is safe to commit.

- `recipe run --locked` refuses to run when the recipe resolves differently from the lock. A key that differs only in
  its platform facts (the int8 preset's cpu_isa, the GPUs a train uses) is not a different recipe: it runs.
- `recipe verify` re-reads every artifact byte on disk (not the manifest's sha256, not the hash memo) and compares it
  with the lock. Where this machine's platform differs from the one a step ran on in the lock, differences in steps
  whose bytes depend on those facts (PLATFORM_DEPENDENT), and in the steps that consume them, are *expected*: listed
  with the reason, they pass with a warning. Any other difference is *unexpected* and fails (exit 1).
- A lock that is missing, not JSON, of another lock_version or missing fields is a LockError: one line naming the lock
  file and saying to run `recipe lock` (exit 2 in the CLI), never a traceback.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from runner.hardware import platform_facts
from runner.keys import canonical
from runner.plan import Step, why_stale
from runner.recipe import Loaded, Pos, Problem, RecipeError
from runner.recipe.problems import dotted, relative
from runner.stages import record_patterns
from runner.store.local import RECORD, Cache, Entry, output_role, sha256_file

LOCK_VERSION = 2  # 2: artifacts and records apart, the platform of the lock and of each step


@dataclass(frozen=True)
class PlatformDependence:
    facts: tuple[str, ...]  # keys of platform_facts.describe() that change the step's bytes
    reason: str


# Which steps' bytes follow the platform, and why. Data (tokenizing, splitting with the seed) is integer work: the same
# bytes everywhere, so a data difference is always unexpected. Serve writes only run records.
_FLOAT = ("system", "machine", "cpu_isa", "gpus")
PLATFORM_DEPENDENT: dict[str, PlatformDependence] = {
    "model": PlatformDependence(
        ("system", "machine", "cpu_isa"),
        "a built model's initial weights come from torch's vectorized normal sampler, compiled per CPU instruction set",
    ),
    "train": PlatformDependence(
        _FLOAT, "training's float kernels (matmul, reductions, the optimizer) round differently on another CPU "
        "instruction set or GPU architecture, and the rounding compounds over the steps",
    ),
    "export": PlatformDependence(
        _FLOAT, "the LoRA merge and graph optimizations compute in float, and the report's validation figures are "
        "ONNX Runtime's float kernels on this CPU or GPU",
    ),
    "quantize": PlatformDependence(
        _FLOAT, "the int8 preset (u8 or s8 weights) follows cpu_isa, and the gate's figures are this CPU's int8 kernels",
    ),
}


# --- the document ---------------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Platform(_Strict):
    system: str
    machine: str
    cpu_isa: str
    gpus: list[str]


class LockedStep(_Strict):
    key: str
    material: dict[str, Any]
    platform: Platform  # where this step's entry was produced
    artifacts: dict[str, str]  # relative path -> sha256: what verify compares
    records: list[str]  # run records: listed, not compared


class Lock(_Strict):
    lock_version: int
    recipe: str
    env: str
    overrides: list[str]
    recipe_sha256: str
    platform: Platform  # the machine that wrote the lock
    steps: dict[str, LockedStep]


@dataclass(frozen=True)
class LockProblem(Problem):
    """A problem with a lock file: `FILE[:LINE:COL]: message` (no recipe field path)."""

    def __str__(self) -> str:
        where = str(self.pos) if self.pos.line else self.pos.file
        return f"{where}: {self.message}"


class LockError(RecipeError):
    """The lock cannot be used; the CLI prints it like a recipe problem (one line, exit 2)."""

    def __init__(self, path: Path, message: str, line: int = 0, col: int = 0):
        super().__init__([LockProblem(Pos(relative(path), line, col), (), f"{message}; {_remedy(path)}")])


def _remedy(path: Path) -> str:
    recipe = next((c for c in (path.with_suffix(".yaml"), path.with_suffix(".yml")) if c.is_file()), None)
    return f"run `recipe lock {relative(recipe) if recipe else '<recipe>'}` to write it again"


def lock_path(loaded: Loaded) -> Path:
    return loaded.path.with_suffix(".lock")


def recipe_hash(steps: list[Step]) -> str:
    """The resolved recipe, as the steps see it (local files by content), hashed."""
    return hashlib.sha256(canonical([s.material["config"] for s in steps]).encode()).hexdigest()


def entry_platform(entry: Entry) -> dict[str, Any]:
    """The platform an entry was produced on (entries from before manifests recorded it: this machine's)."""
    recorded = entry.manifest.get("platform")
    return recorded if isinstance(recorded, dict) else platform_facts.describe()


def build_lock(loaded: Loaded, steps: list[Step], cache: Cache) -> tuple[dict[str, Any], list[str]]:
    """The lock document, and what keeps it from being written (steps not run yet, damaged entries), one line each.

    Every entry is re-hashed first: a lock must not pin bytes the cache no longer holds."""
    problems: list[str] = []
    locked_steps = {}
    for step in steps:
        entry = cache.entry(step.stage, step.key)
        if entry is None:
            problems.append(f"{step.kind}: not run yet")
            continue
        damage = cache.verify(entry, full=True)
        if damage:
            problems += [f"{step.kind}: cache entry damaged: {line} (`recipe cache verify` quarantines it)" for line in damage]
            continue
        outputs = entry.manifest["outputs"]
        roles = {rel: output_role(rel, meta, record_patterns(step.stage)) for rel, meta in outputs.items()}
        locked_steps[step.kind] = LockedStep(
            key=step.key, material=step.material, platform=Platform(**entry_platform(entry)),
            artifacts={rel: meta["sha256"] for rel, meta in outputs.items() if roles[rel] != RECORD},
            records=sorted(rel for rel, role in roles.items() if role == RECORD),
        )
    document = Lock(
        lock_version=LOCK_VERSION, recipe=loaded.recipe.name, env=loaded.recipe.env, overrides=loaded.overrides,
        recipe_sha256=recipe_hash(steps), platform=Platform(**platform_facts.describe()), steps=locked_steps,
    )
    return document.model_dump(mode="json"), problems


def write_lock(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")


def read_lock(path: Path) -> Lock:
    """The lock, or a LockError that names the file and what to do."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LockError(path, "no such lock file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LockError(path, f"cannot be read ({exc})") from None
    try:
        document = json.loads(text)
    except ValueError as exc:  # JSONDecodeError knows where
        line, col = getattr(exc, "lineno", 0), getattr(exc, "colno", 0)
        raise LockError(path, f"not valid JSON ({getattr(exc, 'msg', exc)})", line, col) from None
    if not isinstance(document, dict):
        raise LockError(path, f"a lock is a JSON object, this is a {type(document).__name__}")
    version = document.get("lock_version")
    if version is None:
        raise LockError(path, "no lock_version: not a lock written by `recipe lock`")
    if isinstance(version, int) and version < LOCK_VERSION:
        raise LockError(path, f"lock_version {version} is from an older runner (this one reads {LOCK_VERSION})")
    if version != LOCK_VERSION:
        raise LockError(path, f"lock_version {version!r} is not one this runner reads ({LOCK_VERSION})")
    try:
        return Lock.model_validate(document)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        where = dotted(tuple(first["loc"])) or "(top level)"
        raise LockError(path, f"{where}: {first['msg'].lower()}{more}: hand-edited or damaged") from None


# --- comparing keys -------------------------------------------------------------------------------------------------


def _key_reasons(step: Step, locked: LockedStep, platform_keyed: set[str]) -> tuple[list[str], list[str]]:
    """Why the step's key differs from the lock's: (reasons the platform explains, the other reasons).

    Platform facts in the key material (`platform.*`) are the platform's doing; so is an upstream key that differs for
    the same reason (`platform_keyed`: the steps already found to differ only by platform)."""
    previous = {"key": locked.key, "material": locked.material}
    explained, other = [], []
    for reason in why_stale(step, previous):
        if reason.split(":")[0].split(".")[0] == "platform":
            explained.append(reason)
        elif reason.startswith("upstream step '") and reason.split("'")[1] in platform_keyed:
            explained.append(reason)
        else:
            other.append(reason)
    return explained, other


def lock_differences(document: Lock, loaded: Loaded, steps: list[Step]) -> list[str]:
    """Everything that resolves differently from the lock, one line each (empty when it matches).

    Platform facts are left out: another CPU family or GPU count keys a step differently without the recipe, its
    packages or its data resolving differently; `recipe verify` says what that changed."""
    problems = []
    if document.env != loaded.recipe.env:
        problems.append(f"env: locked {document.env}, recipe says {loaded.recipe.env}")
    platform_keyed: set[str] = set()
    for step in steps:
        locked = document.steps.get(step.kind)
        if locked is None:
            problems.append(f"{step.kind}: step is not in the lock")
            continue
        if locked.key != step.key:
            explained, other = _key_reasons(step, locked, platform_keyed)
            if other:
                problems += [f"{step.kind}: {reason}" for reason in other]
            else:
                platform_keyed.add(step.kind)
    kinds = {s.kind for s in steps}
    problems += [f"{kind}: step is in the lock but not in the recipe" for kind in document.steps if kind not in kinds]
    return problems


# --- verifying outputs ----------------------------------------------------------------------------------------------


@dataclass
class Difference:
    step: str
    line: str
    reason: str | None = None  # why the platform explains it; None: unexpected


@dataclass
class Verification:
    matched: int = 0
    differences: list[Difference] = field(default_factory=list)
    records: dict[str, list[str]] = field(default_factory=dict)  # step -> run records present (not compared)

    @property
    def unexpected(self) -> list[Difference]:
        return [d for d in self.differences if d.reason is None]

    @property
    def expected(self) -> list[Difference]:
        return [d for d in self.differences if d.reason is not None]


def platform_changes(locked: dict[str, Any], here: dict[str, Any], facts: tuple[str, ...] | None = None) -> list[str]:
    """`fact: lock's value -> this machine's`, for each fact that differs."""
    names = facts or tuple(sorted(set(locked) | set(here)))
    return [f"{name}: {_fact(locked.get(name))} -> {_fact(here.get(name))}" for name in names
            if locked.get(name) != here.get(name)]


def _fact(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def _compare_files(step: Step, locked: LockedStep, entry: Entry, result: Verification) -> list[str]:
    """Every artifact on disk, re-hashed, against the lock; the lines that differ."""
    manifest = entry.manifest.get("outputs", {})
    on_disk = sorted(p.relative_to(entry.outputs).as_posix() for p in entry.outputs.rglob("*") if p.is_file())
    records = {rel for rel in on_disk if output_role(rel, manifest.get(rel), record_patterns(step.stage)) == RECORD}
    if records:
        result.records[step.kind] = sorted(records)
    artifacts = set(on_disk) - records
    lines = []
    for rel in sorted(artifacts | (set(locked.artifacts) - records)):
        if rel not in artifacts:
            lines.append(f"{step.kind}/{rel}: in the lock, not produced here")
        elif rel not in locked.artifacts:
            lines.append(f"{step.kind}/{rel}: produced here, not in the lock")
        elif (digest := sha256_file(entry.outputs / rel)) != locked.artifacts[rel]:
            lines.append(f"{step.kind}/{rel}: sha256 {digest[:12]} != locked {locked.artifacts[rel][:12]}")
        else:
            result.matched += 1
    return lines


def verify_outputs(document: Lock, steps: list[Step], cache: Cache) -> Verification:
    """Each artifact's bytes on disk against the lock, with the differences the platform explains told apart."""
    result = Verification()
    platform_keyed: set[str] = set()
    explained: dict[str, str] = {}  # steps whose differences the platform explains -> why
    failed: set[str] = set()  # steps with unexpected differences (or none to compare)
    for step in steps:
        locked = document.steps.get(step.kind)
        if locked is None:
            result.differences.append(Difference(step.kind, f"{step.kind}: not in the lock"))
            failed.add(step.kind)
            continue
        key_note: list[str] = []  # why the key differs, when only the platform makes it differ
        if locked.key != step.key:
            key_explained, other = _key_reasons(step, locked, platform_keyed)
            if other:
                line = f"{step.kind}: resolves differently from the lock: {'; '.join(other)}"
                result.differences.append(Difference(step.kind, line))
                failed.add(step.kind)
                continue
            platform_keyed.add(step.kind)
            key_note = key_explained
        entry = cache.entry(step.stage, step.key)
        if entry is None:
            result.differences.append(Difference(step.kind, f"{step.kind}: not in the cache; run the recipe first"))
            failed.add(step.kind)
            continue
        lines = _compare_files(step, locked, entry, result)
        if not lines:
            continue
        reason = _explanation(step, locked, entry_platform(entry), key_note, explained, failed)
        if reason is None:
            upstream = [dep for dep in step.depends if dep in failed]
            if upstream:  # most likely a consequence: say so, so the first cause is looked at first
                lines = [f"{line} (its inputs from {', '.join(upstream)} differ too)" for line in lines]
            failed.add(step.kind)
        else:
            explained[step.kind] = reason
        result.differences += [Difference(step.kind, line, reason) for line in lines]
    return result


def _explanation(step: Step, locked: LockedStep, here: dict[str, Any], key_note: list[str], explained: dict[str, str],
                 failed: set[str]) -> str | None:
    """Why the platform explains this step's differences, or None when it does not."""
    if any(dep in failed for dep in step.depends):
        return None  # an upstream step already differs unexpectedly: nothing here can be put down to the platform
    dependence = PLATFORM_DEPENDENT.get(step.stage)
    changes = platform_changes(locked.platform.model_dump(), here, dependence.facts) if dependence else []
    if key_note:
        changes.append("its cache key differs by platform only" if changes else
                       f"its cache key differs by platform only ({'; '.join(key_note)})")
    if changes:
        return "; ".join([*changes, dependence.reason if dependence else "the planner keys this step by platform"])
    upstream = [dep for dep in step.depends if dep in explained]
    if upstream:
        return f"its inputs from {', '.join(upstream)} differ for platform reasons"
    return None
