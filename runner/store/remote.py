"""A remote step store, reached through fsspec: `s3://bucket/prefix`, `gs://...`, `az://...`, `hf://...`, `file:///path`.

Layout under the remote's root (only this module knows it):

    objects/<sha[:2]>/<sha[2:]>               a file's bytes, named by their own sha256 (as DVC's object store): two
                                              pushers never overwrite each other's bytes, and a file shared by several
                                              steps (a tokenizer) is stored once
    entries/<kind>/<key>/manifest.json        the local entry's manifest (each output path -> sha256, size, role; the
                                              key material, metrics, platform): written LAST, create-only

The protocol, like the local cache's: a crash never looks complete.
- Push uploads every missing object, then the manifest with a create-only write (S3 `If-None-Match: *`). An entry
  without a manifest is invisible, so a killed push leaves nothing anyone pulls; its objects are reused by the next push.
- Pull downloads each file into the local store's pull folder under a temporary name, re-hashes it against the
  manifest, renames it into place, and only when every file matches makes the ordinary atomic local commit. A mismatch
  refuses the entry (naming the file and both hashes) and commits nothing. Files already verified by an earlier,
  interrupted pull are re-hashed in place instead of downloaded again.
- Two pushers of one key: one manifest wins. The other compares the winner's artifact hashes with its own and reports
  each difference as a reproducibility finding (same key, different bytes), not as an error. Run records (logs,
  timings) travel with the entry and are not compared, as in `recipe verify`.

Endpoint and credentials come from each store's standard chain (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, profiles); they never reach a manifest, and every error message goes through runner.redact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from runner.errors import RunnerError
from runner.redact import redact
from runner.store.local import ARTIFACT, Cache, Entry, output_role

MANIFEST = "manifest.json"
SHA256 = re.compile(r"[0-9a-f]{64}")
# Which package brings each URL scheme's filesystem (fsspec names it only in prose).
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "hf": "huggingface_hub"}
# Parts of 16 MiB (S3's minimum is 5 MiB), at most 4 in flight per file: a file's transfer holds ~64 MiB, whatever its
# size (s3fs's defaults, 50 MiB x 10, hold 500 MiB per file).
PART_BYTES = 16 << 20
PARTS_IN_FLIGHT = 4
# Files in flight at once. DVC defaults to 4 x CPUs, and its users hit "too many open files" and timeouts with more
# (dvc #2473, #4121): a bounded default, and --jobs.
DEFAULT_JOBS = max(4, min(16, 2 * (os.cpu_count() or 2)))
LIST_ABOVE = 32  # objects to check: above this, a listing may be cheaper than one request each


class RemoteError(RunnerError):
    """The remote cannot be used: one line naming the URL and the cause (never a credential)."""


class Progress:
    """Transfer progress hooks; the CLI shows them as a bar (bytes, rate, ETA). The default shows nothing."""

    def begin(self, label: str, total_bytes: int) -> None: ...

    def advance(self, n_bytes: int) -> None: ...

    def end(self) -> None: ...


@dataclass
class Pushed:
    kind: str
    key: str
    status: str  # "pushed" | "present" (the remote had it) | "lost race" (another pusher's manifest won)
    uploaded: int = 0  # objects uploaded
    uploaded_bytes: int = 0
    findings: list[str] = field(default_factory=list)  # same key, different artifact bytes: which files, both hashes


@dataclass
class Pulled:
    kind: str
    key: str
    entry: Entry | None  # None: not on the remote, or refused
    refused: list[str] = field(default_factory=list)  # why the entry was refused: file, both hashes
    downloaded: int = 0  # files downloaded
    downloaded_bytes: int = 0
    reused: int = 0  # files already verified in the pull folder by an interrupted pull


def display_url(url: str) -> str:
    """The URL as it may be printed: no user:password, no query (a signed URL's signature lives there)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def remote_url(given: str | None) -> str | None:
    """The remote a command uses: --remote, else $RECIPE_REMOTE, else none."""
    return given or os.environ.get("RECIPE_REMOTE") or None


class Remote:
    def __init__(self, url: str, jobs: int | None = None):
        if "://" not in url:
            raise RemoteError(f"remote {url!r} is not a URL: expected s3://bucket/prefix, gs://..., az://..., hf://... "
                              "or file:///path")
        self.url = display_url(url)
        self.protocol = url.split("://", 1)[0].lower()
        self.jobs = max(1, jobs or DEFAULT_JOBS)
        options: dict[str, Any] = {"skip_instance_cache": True}  # credentials may change between uses in one process
        if self.protocol in ("s3", "s3a"):
            options["config_kwargs"] = {
                # botocore >= 1.36 sends CRC checksums by default, which S3-compatible servers reject (s3fs #931,
                # dvc-s3 #142): only where the API requires one.
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
                "connect_timeout": 10,
                "retries": {"max_attempts": 3, "mode": "standard"},
            }
        try:
            import fsspec

            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError:
            package = PACKAGES.get(self.protocol, "the fsspec filesystem for it")
            raise RemoteError(f"remote {self.url}: {self.protocol}:// needs the {package} package "
                              f"(pip install {package})") from None
        except ValueError as exc:  # an unknown protocol
            raise RemoteError(f"remote {self.url}: {redact(str(exc))}") from None
        if self.protocol in ("s3", "s3a"):
            self.fs.retries = 2  # s3fs retries each call 5 times by default, on top of botocore's 3 attempts: an
            # unreachable endpoint took 7 s to report instead of 2
        self.root = root.rstrip("/")
        self.local = self.protocol in ("file", "local")
        self._lock = threading.Lock()

    # --- layout: built here, nowhere else ----------------------------------------------------------------------

    def object_path(self, sha: str) -> str:
        return f"{self.root}/objects/{sha[:2]}/{sha[2:]}"

    def manifest_path(self, kind: str, key: str) -> str:
        return f"{self.root}/entries/{kind}/{key}/{MANIFEST}"

    # --- errors ------------------------------------------------------------------------------------------------

    def error(self, exc: BaseException, doing: str) -> RemoteError:
        """One line naming the remote and the cause, for anything a store can throw."""
        return RemoteError(f"remote {self.url}: {doing}: {self.cause(exc)}")

    def cause(self, exc: BaseException) -> str:
        name = type(exc).__name__
        text = redact(" ".join(str(exc).split()) or name)  # one line: some libraries break theirs
        if isinstance(exc, PermissionError):
            return f"access denied (wrong credentials or no permission): {text}"
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ConnectionClosedError",
                    "ReadTimeoutError", "ServerDisconnectedError") or isinstance(exc, ConnectionError | TimeoutError):
            return f"cannot reach the store ({name}): {text}"
        if isinstance(exc, FileNotFoundError):
            return f"not found: {text}"
        return f"{name}: {text}"

    def check(self, create: bool = False) -> None:
        """Fail early with one clear line when the remote cannot be used at all (unreachable, missing bucket, wrong
        credentials): before a long run starts, not half-way through a transfer."""
        try:
            if self.local:
                if create:
                    self.fs.makedirs(self.root, exist_ok=True)
                elif not self.fs.isdir(self.root):
                    raise RemoteError(f"remote {self.url}: no such folder")
                return
            if self.protocol in ("s3", "s3a"):
                bucket = self.root.split("/", 1)[0]
                try:
                    self.fs.ls(bucket, refresh=True)
                except FileNotFoundError:
                    raise RemoteError(f"remote {self.url}: bucket {bucket!r} does not exist (create it first)") from None
                return
            self.fs.exists(self.root)
        except RemoteError:
            raise
        except Exception as exc:  # noqa: BLE001 - every store library raises its own kinds: one line each
            raise self.error(exc, "cannot use it") from None

    # --- manifests ---------------------------------------------------------------------------------------------

    def manifest(self, kind: str, key: str) -> dict[str, Any] | None:
        """The remote entry's manifest, or None when the remote has no (complete) entry for the key."""
        try:
            data = self.fs.cat_file(self.manifest_path(kind, key))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001
            raise self.error(exc, f"reading the manifest of {kind} {key[:12]}") from None
        try:
            manifest = json.loads(data)
        except ValueError:
            raise RemoteError(f"remote {self.url}: the manifest of {kind} {key[:12]} is not JSON") from None
        return manifest if isinstance(manifest, dict) else None

    def entries(self) -> list[dict[str, Any]]:
        """Every complete entry's manifest (`recipe cache ls --remote`)."""
        try:
            paths = sorted(self.fs.glob(f"{self.root}/entries/*/*/{MANIFEST}"))
        except FileNotFoundError:
            return []
        except Exception as exc:  # noqa: BLE001
            raise self.error(exc, "listing entries") from None
        found = []
        for path in paths:
            kind, key = PurePosixPath(path).parts[-3:-1]
            manifest = self.manifest(kind, key)
            if manifest is not None:
                found.append({"kind": kind, "key": key, **manifest})
        return found

    def _create_only(self, path: str, data: bytes) -> None:
        """Write `path` only if it does not exist (FileExistsError otherwise), atomically."""
        if self.local:
            # A hard link fails if the name exists, and the name appears with its whole content at once.
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(path).with_name(f".{MANIFEST}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            try:
                os.link(tmp, path)
            finally:
                tmp.unlink()
            return
        # s3fs sends If-None-Match: * with mode="create" (a PUT the server refuses if the key exists); other stores
        # fall back to fsspec's check-then-write
        self.fs.pipe_file(path, data, mode="create")

    # --- push --------------------------------------------------------------------------------------------------

    def push(self, cache: Cache, entry: Entry, progress: Progress | None = None) -> Pushed:
        """Upload a committed local entry: missing objects first, the manifest last and create-only."""
        progress = progress or Progress()
        manifest = entry.manifest
        problems = cache.verify(entry, full=False)
        if problems:
            raise RemoteError(f"{entry.kind} {entry.key[:12]}: the local entry is damaged, not pushed: {problems[0]} "
                              "(run `recipe cache verify`)")
        outputs: dict[str, dict[str, Any]] = manifest["outputs"]
        existing = self.manifest(entry.kind, entry.key)
        if existing is not None:
            return Pushed(entry.kind, entry.key, "present", findings=findings(entry.kind, existing, manifest))
        objects: dict[str, tuple[Path, int]] = {}
        for rel, meta in outputs.items():
            objects.setdefault(meta["sha256"], (entry.outputs / rel, int(meta["size"])))
        missing = [sha for sha, present in zip(objects, self._present(objects), strict=True) if not present]
        total = sum(objects[sha][1] for sha in missing)
        progress.begin(f"push {entry.kind} {entry.key[:12]}", total)
        try:
            self._pool(lambda sha: self._upload(objects[sha][0], sha, progress), missing, "uploading")
        finally:
            progress.end()
        document = json.dumps({**manifest, "remote_layout": 1}, indent=2, sort_keys=True).encode()
        try:
            self._create_only(self.manifest_path(entry.kind, entry.key), document)
        except Exception as exc:  # noqa: BLE001 - FileExistsError, or a store that says 412 its own way
            winner = self.manifest(entry.kind, entry.key)
            if winner is None:
                raise self.error(exc, f"writing the manifest of {entry.kind} {entry.key[:12]}") from None
            return Pushed(entry.kind, entry.key, "lost race", len(missing), total,
                          findings(entry.kind, winner, manifest))
        return Pushed(entry.kind, entry.key, "pushed", len(missing), total)

    def _present(self, objects: dict[str, tuple[Path, int]]) -> list[bool]:
        """Which objects the remote holds already, whole (a size check: an object of the wrong size is re-sent).

        As DVC does: one request per object for a few, one listing for many, whichever costs fewer requests. The
        remote's size is estimated from one of its 256 prefix folders (a listing returns 1000 names a page)."""
        if len(objects) > LIST_ABOVE:
            try:
                sample = len(self.fs.ls(f"{self.root}/objects/00", detail=False, refresh=True))
            except FileNotFoundError:
                sample = 0
            except Exception as exc:  # noqa: BLE001
                raise self.error(exc, "listing objects") from None
            if sample * 256 / 1000 < len(objects):
                try:
                    listed = self.fs.find(f"{self.root}/objects", detail=True)
                except FileNotFoundError:
                    listed = {}
                except Exception as exc:  # noqa: BLE001
                    raise self.error(exc, "listing objects") from None
                sizes = {"".join(PurePosixPath(name).parts[-2:]): int(info.get("size", -1))
                         for name, info in listed.items()}
                return [sizes.get(sha) == size for sha, (_, size) in objects.items()]

        def probe(sha: str) -> bool:
            try:
                return int(self.fs.info(self.object_path(sha))["size"]) == objects[sha][1]
            except FileNotFoundError:
                return False

        return self._pool(probe, list(objects), "checking objects")

    def _upload(self, path: Path, sha: str, progress: Progress) -> None:
        target = self.object_path(sha)
        if self.local:
            # a plain copy is not atomic: copy to a temporary name, then rename (a killed push leaves a .tmp, no object)
            tmp = f"{target}.{os.getpid()}.{threading.get_ident()}.tmp"
            self.fs.makedirs(self.fs._parent(target), exist_ok=True)
            self.fs.put_file(str(path), tmp)
            self.fs.mv(tmp, target)
            progress.advance(path.stat().st_size)
            return
        # S3 PUTs and multipart uploads become visible only when complete: a killed upload leaves no object
        kwargs = {"chunksize": PART_BYTES, "max_concurrency": PARTS_IN_FLIGHT} if self.protocol in ("s3", "s3a") else {}
        self.fs.put_file(str(path), target, callback=_Callback(progress), **kwargs)

    # --- pull --------------------------------------------------------------------------------------------------

    def pull(self, cache: Cache, kind: str, key: str, expect: dict[str, str] | None = None,
             progress: Progress | None = None) -> Pulled:
        """Bring a remote entry into the local cache, verified; `expect` (path -> sha256, from a lock) must match too.

        Returns Pulled with entry None when the remote has no entry for the key, or when it was refused (`refused`
        says why); the local cache is then unchanged."""
        progress = progress or Progress()
        manifest = self.manifest(kind, key)
        if manifest is None:
            return Pulled(kind, key, None)
        refused = _check_manifest(manifest, kind, key)
        if not refused and expect is not None:
            refused = _against_lock(kind, manifest, expect)
        if refused:
            return Pulled(kind, key, None, refused)
        outputs: dict[str, dict[str, Any]] = manifest["outputs"]
        with cache.lock(key):
            if hit := cache.lookup(kind, key):  # another run committed it meanwhile
                return Pulled(kind, key, hit)
            out = cache.pull_dir(kind, key)
            for stray in sorted(p for p in out.rglob("*") if p.is_file()):  # from another manifest, or a killed pull
                if stray.relative_to(out).as_posix() not in outputs:
                    stray.unlink()
            result = Pulled(kind, key, None)
            todo = [rel for rel in outputs if not _verified(out / rel, outputs[rel])]
            result.reused = len(outputs) - len(todo)
            total = sum(int(outputs[rel]["size"]) for rel in todo)
            progress.begin(f"pull {kind} {key[:12]}", total)
            try:
                problems = self._pool(lambda rel: self._download(out / rel, outputs[rel], rel, progress), todo,
                                      "downloading")
            finally:
                progress.end()
            result.refused = [p for p in problems if p]
            result.downloaded, result.downloaded_bytes = len(todo), total
            if result.refused:
                return result
            fields = {k: v for k, v in manifest.items() if k not in ("outputs", "remote_layout")}
            fields["pulled_from"] = self.url
            hashes = {rel: meta["sha256"] for rel, meta in outputs.items()}
            result.entry = cache.commit(kind, key, out, fields, known=hashes, roles={
                rel: output_role(rel, meta) for rel, meta in outputs.items()})
            return result

    def _download(self, target: Path, meta: dict[str, Any], rel: str, progress: Progress) -> str:
        """Fetch one file to a temporary name beside its place, hash it, rename it in: '' when it matches, else the
        refusal line (the temporary file is deleted: nothing unverified stays)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            # ranges of 8 MiB: each part is held whole (and buffered again by aiohttp) until written; 16 MiB parts
            # measured 202 MB of extra RSS pulling a 2 GB file
            kwargs = {"chunksize": PART_BYTES // 2, "max_concurrency": PARTS_IN_FLIGHT} \
                if self.protocol in ("s3", "s3a") else {}
            self.fs.get_file(self.object_path(meta["sha256"]), str(tmp), callback=_Callback(progress), **kwargs)
            if self.local:
                progress.advance(tmp.stat().st_size)
            got = _sha256(tmp)
            if got != meta["sha256"]:
                return f"{rel}: sha256 {got} on the remote, {meta['sha256']} in its manifest"
            os.replace(tmp, target)
            return ""
        except FileNotFoundError:
            return f"{rel}: object {meta['sha256']} missing on the remote"
        finally:
            tmp.unlink(missing_ok=True)

    # --- helpers -----------------------------------------------------------------------------------------------

    def _pool(self, work: Callable[[Any], Any], items: Iterable[Any], doing: str) -> list[Any]:
        """Run `work` over items, `jobs` at a time, in order; the first failure cancels what has not started and
        becomes one RemoteError line."""
        items = list(items)
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.jobs, len(items))) as pool:
            futures = [pool.submit(work, item) for item in items]
            wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f.done() and f.exception() is not None), None)
            if failed is not None:
                for future in futures:
                    future.cancel()
                exc = failed.exception()
                if isinstance(exc, RemoteError):
                    raise exc
                raise self.error(exc, doing) from None  # type: ignore[arg-type]
            return [f.result() for f in futures]


class _Callback:
    """fsspec's callback protocol, forwarding byte counts to a Progress (s3fs reports each part as it lands)."""

    def __new__(cls, progress: Progress):  # noqa: ANN204 - an fsspec Callback, built lazily (fsspec imports late)
        from fsspec.callbacks import Callback

        class Forward(Callback):
            def relative_update(self, inc: int = 1) -> None:
                progress.advance(inc)

        return Forward()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, meta: dict[str, Any]) -> bool:
    """A file an earlier pull already placed (only verified files are ever renamed into place): re-hashed, not
    re-downloaded."""
    try:
        return path.stat().st_size == int(meta["size"]) and _sha256(path) == meta["sha256"]
    except OSError:
        return False


def _check_manifest(manifest: dict[str, Any], kind: str, key: str) -> list[str]:
    """A manifest this runner can trust to name files: its own kind and key, hashes, sizes, and relative paths that
    stay inside the entry (a crafted `../` must not write outside the cache)."""
    outputs = manifest.get("outputs")
    if manifest.get("kind", kind) != kind or manifest.get("key", key) != key or not isinstance(outputs, dict):
        return [f"{kind} {key[:12]}: the remote manifest is not this step's"]
    problems = []
    for rel, meta in outputs.items():
        parts = PurePosixPath(rel).parts
        if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
            problems.append(f"{rel!r}: not a path inside the entry")
        elif not isinstance(meta, dict) or not SHA256.fullmatch(str(meta.get("sha256", ""))) \
                or not isinstance(meta.get("size"), int):
            problems.append(f"{rel}: no sha256 and size in the manifest")
    return problems


def artifacts(kind: str, manifest: dict[str, Any]) -> dict[str, str]:
    """Artifact path -> sha256 (run records left out: they are kept, not compared)."""
    return {rel: meta["sha256"] for rel, meta in manifest.get("outputs", {}).items()
            if output_role(rel, meta) == ARTIFACT}


def findings(kind: str, theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """Same key, different artifact bytes: one line per file, with both hashes."""
    a, b = artifacts(kind, theirs), artifacts(kind, ours)
    lines = []
    for rel in sorted(set(a) | set(b)):
        if a.get(rel) != b.get(rel):
            lines.append(f"{kind} {rel}: remote {a.get(rel, 'absent')}, this machine {b.get(rel, 'absent')}")
    return lines


def _against_lock(kind: str, manifest: dict[str, Any], expect: dict[str, str]) -> list[str]:
    have = artifacts(kind, manifest)
    return [f"{rel}: sha256 {have.get(rel, 'absent')} on the remote, {sha} in the lock"
            for rel, sha in sorted(expect.items()) if have.get(rel) != sha]

