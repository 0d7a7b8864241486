"""The remote-cache commands' output: `recipe push`, `recipe pull`, `recipe cache ls --remote`, `recipe verify --remote`,
and the transfer bar that `recipe run --pull/--push` shows too. runner.cli parses and loads; runner.store.remote moves
the bytes; this module prints.

Exit codes as elsewhere: 0 done, 1 something was refused or differs, 2 the remote cannot be used (one line naming the
URL and the cause: RemoteError, printed by runner.cli).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from runner.plan import Step
from runner.stages import record_patterns
from runner.store.local import ARTIFACT, RECORD, Cache, output_role
from runner.store.remote import Progress as TransferProgress
from runner.store.remote import Remote, artifacts

out = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True, highlight=False, emoji=False, width=None if sys.stderr.isatty() else 140)
QUIET_SECONDS = 2.0  # a transfer shorter than this shows no bar


class TransferBar(TransferProgress):
    """Bytes, rate and ETA for a transfer that lasts more than a couple of seconds, on a terminal only (CI logs get
    the one summary line per step instead). `before` is called first (the run's step spinner must stop: rich shows one
    live display at a time)."""

    def __init__(self, before: Any = None):
        self.before = before
        self.bar: Progress | None = None
        self.task: Any = None
        self.label, self.total, self.done, self.started = "", 0, 0, 0.0

    def begin(self, label: str, total_bytes: int) -> None:
        self.label, self.total, self.done, self.started = label, total_bytes, 0, time.monotonic()

    def advance(self, n_bytes: int) -> None:
        self.done += n_bytes
        if self.bar is None and out.is_terminal and time.monotonic() - self.started > QUIET_SECONDS:
            if self.before is not None:
                self.before()
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TimeRemainingColumn(), console=out, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total or None)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)

    def end(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def push(remote: Remote, cache: Cache, steps: list[Step], only: str | None) -> int:
    """`recipe push`: every committed step of the plan (or `--step KIND`); 1 when nothing could be pushed."""
    remote.check(create=True)
    pushed = 0
    for step in steps:
        if only and step.kind != only:
            continue
        entry = cache.lookup(step.stage, step.key)
        if entry is None:
            out.print(f"{step.kind:9} {step.key[:12]}  not in the local cache: run it first", markup=False)
            continue
        started = time.monotonic()
        result = remote.push(cache, entry, TransferBar())
        seconds = time.monotonic() - started
        detail = {"pushed": f"pushed {result.uploaded} object(s), {human(result.uploaded_bytes)} in {seconds:.1f}s",
                  "present": "already on the remote",
                  "lost race": f"another machine pushed it first ({result.uploaded} object(s) uploaded)"}[result.status]
        out.print(f"{step.kind:9} {step.key[:12]}  {detail}", markup=False)
        for line in result.findings:
            out.print(f"  [yellow]reproducibility finding[/yellow] (same key, different bytes): {escape(line)}",
                      soft_wrap=True)
        pushed += 1
    if not pushed:
        err.print("[red]nothing pushed:[/red] no step of this plan is in the local cache")
        return 1
    out.print(f"{pushed} step(s) on {remote.url}", markup=False)
    return 0


def pull(remote: Remote, cache: Cache, steps: list[Step]) -> int:
    """`recipe pull`: every step the remote holds, verified, then committed; 1 when an entry was refused."""
    remote.check()
    refused = pulled = 0
    for step in steps:
        if cache.lookup(step.stage, step.key):
            out.print(f"{step.kind:9} {step.key[:12]}  cached", markup=False)
            continue
        started = time.monotonic()
        result = remote.pull(cache, step.stage, step.key, progress=TransferBar())
        seconds = time.monotonic() - started
        if result.entry is not None:
            pulled += 1
            reused = f", {result.reused} already verified" if result.reused else ""
            out.print(f"{step.kind:9} {step.key[:12]}  pulled {result.downloaded} file(s), "
                      f"{human(result.downloaded_bytes)} in {seconds:.1f}s{reused}", markup=False)
        elif result.refused:
            refused += 1
            out.print(f"{step.kind:9} {step.key[:12]}  [red]refused[/red]: nothing committed", markup=False)
            for line in result.refused:
                out.print(f"    {line}", markup=False, soft_wrap=True)
        else:
            out.print(f"{step.kind:9} {step.key[:12]}  not on the remote", markup=False)
    out.print(f"{pulled} step(s) pulled from {remote.url}, {refused} refused", markup=False)
    return 1 if refused else 0


def plan_sources(remote: Remote | None, rows: list[tuple[Step, bool, list[str]]]) -> dict[str, bool]:
    """For `recipe plan` and `run --dry-run`: which steps missing here the remote holds (they will be pulled)."""
    if remote is None:
        return {}
    from runner.store.remote import RemoteError

    try:
        return {step.kind: remote.manifest(step.stage, step.key) is not None for step, cached, _ in rows if not cached}
    except RemoteError as exc:
        err.print(f"[yellow]warning:[/yellow] {escape(str(exc))}; the plan assumes nothing comes from it",
                  soft_wrap=True)
        return {}


def list_entries(remote: Remote) -> int:
    """`recipe cache ls --remote`."""
    remote.check()
    table = Table(title=f"remote {remote.url}", title_justify="left")
    for column in ("step", "key", "size", "artifacts", "records", "seconds", "created"):
        table.add_column(column)
    for manifest in remote.entries():
        outputs = manifest.get("outputs", {})
        roles = [output_role(rel, meta, record_patterns(manifest["kind"])) for rel, meta in outputs.items()]
        size = sum(int(meta.get("size", 0)) for meta in outputs.values())
        table.add_row(manifest["kind"], manifest["key"][:12], human(size), str(roles.count(ARTIFACT)),
                      str(roles.count(RECORD)), str(manifest.get("seconds", "")), str(manifest.get("started", "")))
    out.print(table)
    return 0


def verify(remote: Remote, locked_steps: dict[str, Any], lock_name: str) -> int:
    """`recipe verify --remote`: each locked step's artifacts against the remote's manifest of the same key."""
    remote.check()
    matched, differences = 0, []
    for kind, locked in locked_steps.items():
        manifest = remote.manifest(kind, locked.key)
        if manifest is None:
            differences.append(f"{kind} {locked.key[:12]}: not on the remote")
            continue
        have = artifacts(kind, manifest)
        for rel in sorted(set(have) | set(locked.artifacts)):
            if have.get(rel) == locked.artifacts.get(rel):
                matched += 1
            else:
                differences.append(f"{kind}/{rel}: remote {have.get(rel, 'absent')[:12]}, "
                                   f"locked {locked.artifacts.get(rel, 'absent')[:12]}")
    for line in differences:
        out.print(f"[red]differs[/red] {escape(line)}", soft_wrap=True)
    out.print(f"{matched} artifact file(s) on {remote.url} match {lock_name}; {len(differences)} difference(s)",
              markup=False, soft_wrap=True)
    return 1 if differences else 0
