"""The content-addressed step cache: one committed entry per step key, written so that a crash never looks complete.

Layout under the cache root (only this module knows it):

    entries/<kind>/<key>/outputs/...    what the stage wrote
    entries/<kind>/<key>/manifest.json  written last, before the atomic rename that commits the entry; each output
                                        with its sha256, size and role (artifact or record, see output_role), and
                                        the platform the entry was produced on (runner.hardware.platform_facts.describe)
    pull/<kind>-<key>/outputs/          an entry being pulled from a remote (runner.store.remote): only verified
                                        files are renamed in, so an interrupted pull resumes without re-downloading
    work/<kind>-<key>/outputs/          a step in progress (kept between attempts for resumable stages); nodes
                                        above 0 of a multi-node train step use <key>.node<N> (node_work_key)
    memo/<kind>/<key>.json              sub-results a stage memoizes across step keys (evaluate: one score per
                                        set and artifact), written atomically
    locks/<key>.lock                    per-key lock (flock: released by the kernel when its holder dies)
    quarantine/<kind>-<key>-<time>/     entries that failed verification, kept for inspection
    index/<recipe>.json                 the last key and key material of each step of a recipe (for "why stale")
    hash-memo.json                      sha256 of files memoized by (path, size, mtime)
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from runner.atomic import atomic_write
from runner.hardware import platform_facts

MANIFEST = "manifest.json"
KEY_PATTERN = re.compile(r"[0-9a-f]{24}")  # runner.plan.key_of: a sha256 prefix
WORK_KEY_PATTERN = re.compile(r"[0-9a-f]{24}(\.node[0-9]+)?")  # a step key, or a node's key (node_work_key)
KIND_PATTERN = re.compile(r"[a-z][a-z_]*")  # a stage's name (runner.stages.STAGES); the store knows no stage list
ARTIFACT, RECORD = "artifact", "record"


def node_work_key(key: str, node_rank: int) -> str:
    """The key a node of a multi-node step locks and works under: node 0 (and every other step) uses the step key; the
    other nodes a key of their own (why: runner.execute._run_step), which parse() and gc recognise."""
    return key if not node_rank else f"{key}.node{node_rank}"


def default_root() -> Path:
    return Path(os.environ.get("RECIPE_CACHE") or ".recipe-cache")


# --- hashing ------------------------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class HashMemo:
    """sha256 of files, remembered by (path, size, mtime_ns) so unchanged inputs are not re-read on every plan."""

    def __init__(self, path: Path | None):
        self.path = path
        self.changed = False
        self.memo: dict[str, list[Any]] = {}
        if path is not None and path.is_file():
            try:
                self.memo = json.loads(path.read_text())
            except (OSError, ValueError):
                self.memo = {}  # a damaged memo only costs re-hashing

    def file(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        known = self.memo.get(key)
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return str(known[2])
        digest = sha256_file(path)
        self.memo[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self.changed = True
        return digest

    def tree(self, path: Path) -> str:
        """A file's sha256, or for a folder the sha256 of its sorted (relative path, file sha256) list."""
        if path.is_file():
            return self.file(path)
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{self.file(file)}\n".encode())
        return digest.hexdigest()

    def seed(self, path: Path, digest: str) -> None:
        """Remember a digest computed elsewhere (a commit hashes its outputs once), so the next lookup needn't re-hash."""
        stat = path.stat()
        self.memo[str(path.resolve())] = [stat.st_size, stat.st_mtime_ns, digest]
        self.changed = True

    def save(self) -> None:
        if self.path is None or not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(self.memo, sort_keys=True))
        self.changed = False


def output_role(rel: str, meta: dict[str, Any] | None = None, records: tuple[str, ...] = ()) -> str:
    """ARTIFACT (the same recipe and seed give the same bytes; `recipe verify` compares it) or RECORD (timings, logs,
    plots: kept, not compared). The manifest's word wins; otherwise the stage's record patterns decide (`records`,
    fnmatch patterns the caller takes from StageSpec.records: the store knows no stages)."""
    if meta and meta.get("role") in (ARTIFACT, RECORD):
        return str(meta["role"])
    return RECORD if any(fnmatch.fnmatchcase(rel, pattern) for pattern in records) else ARTIFACT


# --- entries ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    kind: str
    key: str
    path: Path

    @property
    def outputs(self) -> Path:
        return self.path / "outputs"

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.path / MANIFEST).read_text())


class Cache:
    def __init__(self, root: Path | None = None, kinds: tuple[str, ...] | None = None):
        """`kinds`: the stage names (runner.stages.STAGES) the caller knows; parse() and gc then treat a folder named
        after anything else as not the cache's. The store itself knows no stages; None accepts any stage-like name."""
        self.root = Path(root or default_root()).resolve()
        self.kinds = kinds
        self.memo = HashMemo(self.root / "hash-memo.json")

    # store paths: built here and parsed here, nowhere else

    def entry_path(self, kind: str, key: str) -> Path:
        return self.root / "entries" / kind / key

    def work_path(self, kind: str, key: str) -> Path:
        return self.root / "work" / f"{kind}-{key}"

    def pull_dir(self, kind: str, key: str) -> Path:
        """The folder a pull from a remote fills (call under the key's lock); kept between attempts."""
        path = self.root / "pull" / f"{kind}-{key}" / "outputs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def parse(self, path: Path) -> tuple[str, str]:
        """(kind, key) of an entry folder or a work folder of this cache; ValueError for any other path.

        A work folder's key is the one it is locked by: the step key, or `<key>.node<N>` on nodes above 0."""
        path = path.resolve()  # the root is resolved: a relative or symlinked path must compare equal
        rel = path.relative_to(self.root).parts if path.is_relative_to(self.root) else ()
        if len(rel) == 3 and rel[0] == "entries":
            kind, key, pattern = rel[1], rel[2], KEY_PATTERN
        elif len(rel) == 2 and rel[0] in ("work", "pull") and "-" in rel[1]:
            (kind, key), pattern = rel[1].rsplit("-", 1), WORK_KEY_PATTERN
        else:
            raise ValueError(f"{path} is not an entry or work folder of the cache at {self.root}")
        known = kind in self.kinds if self.kinds is not None else KIND_PATTERN.fullmatch(kind)
        if not known or not pattern.fullmatch(key):
            raise ValueError(f"{path}: {kind!r} is not a stage name or {key!r} not a step key")
        return kind, key

    # lookups

    def entry(self, kind: str, key: str) -> Entry | None:
        """The committed entry for a key, or None. An entry without its manifest was never committed."""
        path = self.entry_path(kind, key)
        return Entry(kind, key, path) if (path / MANIFEST).is_file() else None

    def entries(self) -> list[Entry]:
        found = []
        # Listed by folder names, not parse(): a cache shared with another runner version may hold kinds this one
        # does not know, and `cache ls` and `cache gc` must still show and collect them.
        for manifest in sorted((self.root / "entries").glob(f"*/*/{MANIFEST}")):
            found.append(Entry(manifest.parent.parent.name, manifest.parent.name, manifest.parent))
        return found

    def lookup(self, kind: str, key: str) -> Entry | None:
        """A committed entry whose outputs still match their manifest; a damaged one is quarantined (a miss)."""
        entry = self.entry(kind, key)
        if entry is None:
            return None
        if self.verify(entry, full=False):
            self._quarantine_if_present(entry)
            return None
        return entry

    # verification

    def verify(self, entry: Entry, full: bool = True) -> list[str]:
        """Problems with an entry's outputs against its manifest (empty when intact).

        full=False trusts the hash memo for files whose size and mtime are unchanged (fast enough on every use);
        full=True re-reads every byte (`recipe cache verify`)."""
        try:
            recorded = entry.manifest["outputs"]
        except (OSError, ValueError, KeyError) as exc:
            return [f"manifest unreadable: {exc}"]
        problems = []
        present = {p.relative_to(entry.outputs).as_posix() for p in entry.outputs.rglob("*") if p.is_file()}
        for rel, meta in recorded.items():
            file = entry.outputs / rel
            try:
                if rel not in present:
                    problems.append(f"{rel}: missing")
                elif file.stat().st_size != meta["size"]:
                    problems.append(f"{rel}: size {file.stat().st_size} != {meta['size']}")
                elif (sha256_file(file) if full else self.memo.file(file)) != meta["sha256"]:
                    problems.append(f"{rel}: content changed (sha256 differs)")
            except FileNotFoundError:  # another process quarantined the entry while we read it
                problems.append(f"{rel}: vanished while being verified")
        problems += [f"{rel}: not in the manifest" for rel in sorted(present - set(recorded))]
        self.memo.save()
        return problems

    def _quarantine_if_present(self, entry: Entry) -> None:
        """Quarantine, unless another process (a run racing this one, `cache verify`) already moved the entry away.

        Lookups verify outside the key's lock, so two readers can find the same damaged entry; the second one's rename
        then fails with FileNotFoundError, which means the entry is gone: a miss, not a crash."""
        try:
            self.quarantine(entry)
        except FileNotFoundError:
            if entry.path.exists():
                raise

    def quarantine(self, entry: Entry) -> Path:
        target = self.root / "quarantine" / f"{entry.kind}-{entry.key}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(entry.path, target)
        return target

    # writing

    @contextmanager
    def lock(self, key: str, timeout: float = -1) -> Iterator[None]:
        """Hold the per-key lock. Concurrent runs of one step wait here; a dead holder's lock is freed by the kernel."""
        path = self.root / "locks" / f"{key}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path), timeout=timeout):
            yield

    def memo_dir(self, kind: str) -> Path:
        """A stage's memo of sub-results across keys (StageSpec.memo): files named by their own content key, each
        written whole by write_memo, so a crash leaves a result or nothing."""
        path = self.root / "memo" / kind
        path.mkdir(parents=True, exist_ok=True)
        return path

    def workdir(self, kind: str, key: str, keep: bool) -> Path:
        """The folder a step writes into (call under the key's lock). Emptied unless `keep` (resumable stages)."""
        work = self.work_path(kind, key)
        if work.exists() and not keep:
            shutil.rmtree(work)
        (work / "outputs").mkdir(parents=True, exist_ok=True)
        return work / "outputs"

    def commit(self, kind: str, key: str, outputs: Path, manifest: dict[str, Any], records: tuple[str, ...] = (),
               known: dict[str, str] | None = None, roles: dict[str, str] | None = None) -> Entry:
        """Record output hashes, write the manifest, then rename the work folder into place in one atomic step.

        `known`: sha256 of files the caller has just verified (a pull), not read again; `roles`: the roles a pulled
        manifest gave its files (the producer's word, kept)."""
        work = outputs.parent
        files = sorted(p for p in outputs.rglob("*") if p.is_file())
        known, roles = known or {}, roles or {}
        described = {}
        for p in files:
            rel = p.relative_to(outputs).as_posix()
            described[rel] = {"sha256": known.get(rel) or sha256_file(p), "size": p.stat().st_size,
                              "role": roles.get(rel) or output_role(rel, records=records)}
        manifest = {"platform": platform_facts.describe(), **manifest, "outputs": described}
        atomic_write(work / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        final = self.entry_path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # a forced re-run replaces the old entry: move it aside first, then swap in
            self._quarantine_if_present(Entry(kind, key, final))
        _fsync_dir(work)
        os.rename(work, final)
        _fsync_dir(final.parent)
        entry = Entry(kind, key, final)
        for rel, meta in manifest["outputs"].items():
            self.memo.seed(entry.outputs / rel, meta["sha256"])
        self.memo.save()
        return entry

    def discard_work(self, kind: str, key: str) -> None:
        shutil.rmtree(self.work_path(kind, key), ignore_errors=True)

    # the per-recipe index of last keys (for explaining why a step is stale)

    def last_run(self, recipe: str) -> dict[str, Any]:
        path = self.root / "index" / f"{recipe}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def remember(self, recipe: str, kind: str, key: str, material: dict[str, Any]) -> None:
        path = self.root / "index" / f"{recipe}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            index = self.last_run(recipe)
            index[kind] = {"key": key, "material": material}
            atomic_write(path, json.dumps(index, indent=2, sort_keys=True))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
