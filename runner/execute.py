"""Executing a plan: skip what is cached, run the rest in order, commit each success, leave a run folder behind.

With a remote (runner.store.remote), a step missing locally is pulled before it would run (`--pull`: verified, then
committed like any entry; a refused or unreachable remote only means the step runs here), and each committed step is
pushed (`--push`). A remote problem never fails a step: it is told through `notice` and recorded in run.json.

A run folder `runs/<recipe>/<timestamp>/` holds the resolved recipe, `run.json` (keys, statuses, timings, metrics,
output folders) and one log per step. A failing step stops the run; every step that succeeded before it stays cached.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from runner import stages
from runner.fetch import localize
from runner.plan import Step, plan_status
from runner.recipe import Loaded
from runner.redact import RedactedFile, redact
from runner.report.build import write_report
from runner.run_record import RunResult, StepResult
from runner.stages import StageError
from runner.store.local import Cache, Entry, node_work_key
from runner.store.remote import Progress as TransferProgress
from runner.store.remote import Remote, RemoteError

log = logging.getLogger("runner")


Progress = Callable[[str, StepResult | None, Step], None]  # ("start" | "done", result, step)


class RemoteUse:
    """What a run does with a remote: pull missing steps, push committed ones. `expect`: the lock's artifact hashes per
    step kind (`--locked`), which a pulled entry must match; `notice` tells the user (the CLI prints)."""

    def __init__(self, remote: Remote, pull: bool, push: bool, expect: dict[str, dict[str, str]] | None = None,
                 notice: Callable[[str], None] = log.warning, transfer: TransferProgress | None = None):
        self.remote, self.pull, self.push = remote, pull, push
        self.expect, self.notice, self.transfer = expect or {}, notice, transfer
        self.push_failed = False
        self.unreachable = False  # after one failed pull the others would fail alike: run locally without asking

    def fetch(self, step: Step, cache: Cache) -> Entry | None:
        if not self.pull or self.unreachable:
            return None
        try:
            pulled = self.remote.pull(cache, step.stage, step.key, self.expect.get(step.kind), self.transfer)
        except RemoteError as exc:
            self.unreachable = True
            self.notice(f"{exc}; running locally")
            return None
        if pulled.refused:
            lines = "; ".join(pulled.refused[:5]) + (f" (+{len(pulled.refused) - 5} more)" if len(pulled.refused) > 5 else "")
            self.notice(f"refused the remote entry of {step.kind} {step.key[:12]}: {lines}; running it locally")
        return pulled.entry

    def send(self, step: Step, cache: Cache, entry: Entry) -> str:
        try:
            pushed = self.remote.push(cache, entry, self.transfer)
        except RemoteError as exc:
            self.push_failed = True
            self.notice(f"push of {step.kind} failed: {exc}")
            return f"push failed: {exc}"
        for line in pushed.findings:
            self.notice(f"reproducibility finding (same key, different bytes): {line}")
        return f"{pushed.status} ({pushed.uploaded} object(s) uploaded)"


def execute(
    loaded: Loaded,
    steps: list[Step],
    cache: Cache,
    runs_root: Path,
    force: set[str] = frozenset(),  # type: ignore[assignment]
    until: str | None = None,
    progress: Progress | None = None,
    remote: RemoteUse | None = None,
) -> RunResult:
    name = loaded.recipe.name
    run_dir = new_run_dir(runs_root, name)
    (run_dir / "logs").mkdir()
    (run_dir / "recipe.yaml").write_text(resolved_yaml(loaded))
    result = RunResult(name, run_dir, [])
    statuses = {step.kind: (cached, reasons) for step, cached, reasons in plan_status(steps, cache, name)}
    entries: dict[str, Entry] = {}
    stopped = False
    for step in steps:
        if stopped:
            result.steps.append(StepResult(step.kind, step.key, "skipped"))
            continue
        if progress:
            progress("start", None, step)
        step_result = _run_step(step, cache, entries, run_dir, name, step.kind in force, remote,
                                loaded.recipe.requires.accelerator)
        step_result.reasons = [] if step_result.status in ("cached", "pulled") else statuses[step.kind][1]
        if remote is not None and remote.push and step_result.status in ("cached", "ran"):
            step_result.remote = remote.send(step, cache, entries[step.kind])
        result.steps.append(step_result)
        if progress:
            progress("done", step_result, step)
        _write_run_json(result, loaded)
        stopped = step_result.status == "failed" or step.kind == until
    _write_run_json(result, loaded)
    write_report(result, loaded, environment(steps))
    _point_latest(run_dir)
    return result


def _run_step(step: Step, cache: Cache, entries: dict[str, Entry], run_dir: Path, recipe: str, force: bool,
              remote: RemoteUse | None = None, accelerator: str = "any") -> StepResult:
    if not force and (hit := cache.lookup(step.stage, step.key)):
        entries[step.kind] = hit
        cache.remember(recipe, step.kind, step.key, step.material)
        return StepResult(step.kind, step.key, "cached", metrics=hit.manifest.get("metrics", {}), outputs=str(hit.outputs))
    if not force and remote is not None:
        started = time.time()
        if pulled := remote.fetch(step, cache):
            entries[step.kind] = pulled
            cache.remember(recipe, step.kind, step.key, step.material)
            return StepResult(step.kind, step.key, "pulled", round(time.time() - started, 3),
                              pulled.manifest.get("metrics", {}), str(pulled.outputs), remote=f"pulled from {remote.remote.url}")
    try:
        rank = node_rank(step)
    except stages.StageError as exc:
        return StepResult(step.kind, step.key, "failed", 0.0, error=str(exc))
    # Node 0 of a multi-node step (and every other step) works under the key's own lock and folder. The other nodes take
    # a lock and a folder of their own: on a shared cache (NFS), one lock for all would be held by node 0 through
    # torchrun's rendezvous, which waits for the very nodes blocked on that lock.
    work_key = node_work_key(step.key, rank)
    previous = _manifest_id(cache.entry(step.stage, step.key))
    with cache.lock(work_key):
        # Another run may have committed this key while we waited for the lock.
        if not force and (hit := cache.lookup(step.stage, step.key)):
            entries[step.kind] = hit
            cache.remember(recipe, step.kind, step.key, step.material)
            return StepResult(step.kind, step.key, "cached", metrics=hit.manifest.get("metrics", {}),
                              outputs=str(hit.outputs))
        spec = stages.STAGES[step.stage]  # looked up per call: tests swap in test-only stages
        out = cache.workdir(step.stage, work_key, keep=spec.resumable)
        inputs = {step.input_name(dep): entries[dep].outputs for dep in step.depends}
        if spec.memo:
            inputs["memo"] = cache.memo_dir(step.stage)
        started = time.time()
        with _step_log(run_dir / "logs" / f"{step.kind}.log"):
            try:
                module = importlib.import_module(spec.module)
                placed = {"placement": placement(step, entries, remote, accelerator)} if spec.placed else {}
                metrics = module.run(step.config, inputs, out, **placed) or {}
            except StageError as exc:
                log.error("%s failed: %s", step.kind, exc)
                return _failed(step, work_key, cache, spec.resumable, str(exc), started, out, run_dir)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # a bug or an environment problem: full traceback in the step log
                log.error("%s crashed:\n%s", step.kind, traceback.format_exc())
                message = f"{type(exc).__name__}: {exc} (traceback in {run_dir / 'logs' / (step.kind + '.log')})"
                return _failed(step, work_key, cache, spec.resumable, message, started, out, run_dir)
        seconds = time.time() - started
        manifest = {
            "kind": step.stage,
            "key": step.key,
            "material": step.material,
            "config": step.config,
            "metrics": metrics,
            "started": _iso(started),
            "seconds": round(seconds, 3),
            "hardware": hardware_summary(),
        }
        if rank:
            entry = _commit_as_other_node(cache, step, work_key, out, manifest, previous)
        else:
            entry = cache.commit(step.stage, step.key, out, manifest, stages.record_patterns(step.stage))
        entries[step.kind] = entry
        cache.remember(recipe, step.kind, step.key, step.material)
        return StepResult(step.kind, step.key, "ran", round(seconds, 3), metrics, str(entry.outputs))


def placement(step: Step, entries: dict[str, Entry], remote: RemoteUse | None, accelerator: str) -> stages.Placement:
    """What a placed stage (train) learns beyond its config: its inputs' keys, the remote, the recipe's accelerator, and
    runner.fetch.localize, which its Ray workers call to get the inputs on their nodes. With `--push` the inputs are
    on the remote already: execute pushes every step as it is committed or found cached, before the next one runs."""
    url = remote.remote.url if remote is not None and not remote.unreachable else None
    # keyed as the stage names its inputs; the cache kind is the input's stage (a referenced recipe's `x.data` is data)
    return stages.Placement(accelerator=accelerator, key=step.key, remote=url,
                            sources={step.input_name(dep): (entries[dep].kind, entries[dep].key) for dep in step.depends},
                            localize=localize)


def node_rank(step: Step) -> int:
    """This machine's NODE_RANK in a multi-node train step (`train.distributed.nnodes` > 1), else 0. The executor reads
    the stage's config here only because the cache lock around the step must not span machines (see _run_step)."""
    if step.stage != "train":
        return 0
    distributed = (step.config.get("train") or {}).get("distributed") or {}
    if int(distributed.get("nnodes") or 1) <= 1:
        return 0
    rank, nnodes = os.environ.get("NODE_RANK", "0"), int(distributed.get("nnodes") or 1)
    # Checked here, before any lock: a bad rank taken for 0 would wait on node 0's lock through its rendezvous.
    if not (rank.isascii() and rank.isdigit()) or int(rank) >= nnodes:
        raise stages.StageError(f"NODE_RANK={rank!r}: expected this machine's number, 0..{nnodes - 1} "
                                f"(train.distributed.nnodes is {nnodes})")
    return int(rank)


def _manifest_id(entry: Entry | None) -> tuple[int, int] | None:
    """Which committed entry this is (a forced re-run replaces it under the same path): the manifest's inode and mtime."""
    if entry is None:
        return None
    try:
        stat = (entry.path / "manifest.json").stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _commit_as_other_node(cache: Cache, step: Step, work_key: str, out: Path, manifest: dict[str, Any],
                          previous: tuple[int, int] | None) -> Entry:
    """Node 1..n-1 of a multi-node step: node 0 commits the entry. On a shared cache node 0 holds the key's lock from
    before the rendezvous until its commit, so waiting for that lock here means waiting for node 0's entry, and this
    node's identical copy (DDP replicas) is dropped. With a cache of its own (no entry from node 0 ever appears) this
    node commits its copy."""
    with cache.lock(step.key):
        hit = cache.lookup(step.stage, step.key)
        if hit is not None and _manifest_id(hit) != previous:  # committed during this run, not the one a --force replaces
            log.info("%s: node 0 committed the step; this node's copy is dropped", step.kind)
            cache.discard_work(step.stage, work_key)
            return hit
        return cache.commit(step.stage, step.key, out, manifest, stages.record_patterns(step.stage))


def _failed(step: Step, work_key: str, cache: Cache, resumable: bool, message: str, started: float, out: Path,
            run_dir: Path) -> StepResult:
    # The reports a stage wrote before its gate failed are the post-mortem: keep them in the run folder, since the work
    # folder that held them is discarded, and point the message there.
    kept = run_dir / "failed" / step.kind
    for report in sorted(out.glob("*_report.json")):
        kept.mkdir(parents=True, exist_ok=True)
        shutil.copy2(report, kept / report.name)
    if kept.is_dir():
        message = message.replace(str(out), str(kept))
    if not resumable:  # a resumable stage keeps its checkpoints for the next attempt
        cache.discard_work(step.stage, work_key)
    return StepResult(step.kind, step.key, "failed", round(time.time() - started, 3), error=redact(message))


class _Redact(logging.Filter):
    """Replaces secret values in every record that reaches a step log (the log's pipe redacts again, byte by byte)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:  # render the traceback now, so the redaction covers it too
            message += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = record.exc_text = None
        record.msg, record.args = redact(message), None
        return True


class _step_log:
    """Send everything a step prints to its log file while it runs: log records, and the stdout/stderr of Python, of
    native libraries (progress bars, ONNX Runtime and tracer warnings) and of every child process (torchrun workers,
    the model builder, the smoke server), so the console shows one line per step. All of it goes through one pipe
    into a redacting process (runner/redact.py): no byte reaches the file with a token in it, and records and raw output
    stay in the order they were written."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.sink = RedactedFile(self.path)
        # Records are written to the pipe as well, not to the file beside it: one stream, in order.
        self.stream = os.fdopen(os.dup(self.sink.fd), "w", encoding="utf-8", errors="backslashreplace", buffering=1)
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.addFilter(_Redact())
        root = logging.getLogger()
        root.addHandler(self.handler)
        self.level = root.level
        root.setLevel(min(root.level, logging.INFO) if root.level else logging.INFO)
        self.saved = (os.dup(1), os.dup(2))
        os.dup2(self.sink.fd, 1)
        os.dup2(self.sink.fd, 2)

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        root = logging.getLogger()
        root.removeHandler(self.handler)
        root.setLevel(self.level)
        self.handler.close()
        self.stream.close()
        if not self.sink.close():
            log.warning("a process the step started still writes to %s", self.path)


def new_run_dir(runs_root: Path, recipe: str) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for attempt in range(1000):
        path = runs_root / recipe / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {runs_root / recipe}")


def _point_latest(run_dir: Path) -> None:
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, latest)
    except OSError:
        pass  # a convenience only (e.g. no symlinks on this file system)


def resolved_yaml(loaded: Loaded) -> str:
    header = f"# Resolved from {loaded.path}" + (f" with overrides: {' '.join(loaded.overrides)}" if loaded.overrides else "")
    body = yaml.safe_dump(loaded.recipe.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)
    return f"{header}\n{body}"


def _write_run_json(result: RunResult, loaded: Loaded) -> None:
    data = {
        "recipe": result.recipe,
        "recipe_file": str(loaded.path),
        "overrides": loaded.overrides,
        "ok": result.ok,
        "steps": [step.__dict__ for step in result.steps],
        "hardware": hardware_summary(),
    }
    tmp = result.run_dir / ".run.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, result.run_dir / "run.json")


def environment(steps: list[Step]) -> dict[str, Any]:
    """The machine and the versions of every package that shaped a step (from the steps' key material)."""
    packages = {name: version for step in steps for name, version in step.material.get("packages", {}).items()}
    found = {**hardware_summary(), "packages": dict(sorted(packages.items()))}
    # where the base model came from, as its key saw it: hub id and commit, a local folder's content hash, or a model
    # package's distribution, version and weights sha256 (so a reader can check them against the upstream files)
    model: dict[str, Any] = next((s.material["config"]["model"] for s in steps if "model" in s.material.get("config", {})), {})
    source = {k: model[k] for k in ("hub", "revision", "path", "package") if model.get(k) is not None}
    if source:
        found["model"] = source
    return found


def hardware_summary() -> dict[str, Any]:
    """Cheap facts about the machine for manifests (no torch import: the doctor does the deep probe)."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
