"""Fast fault cases beyond tests/test_cache_and_plan.py: deaths at the worst moments of a commit, stale locks, crashes
inside a stage, a killed hash-memo write, racing quarantines, and a half-made entry folder.

Real processes are killed with SIGKILL where the case is about a death (a monkeypatched os.rename/os.replace in a
subprocess kills its own process at the exact instant); the stages are the fast test-only ones of tests/fake_stages.py.
The long version, with the real stages of the quickstart, is `python bench/faults.py`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runner.cli import main
from runner.store.local import Cache, HashMemo
from tests import fake_stages
from tests.test_cache_and_plan import ALL, REPO, executed, last_run

# A prelude for subprocesses: the real CLI with the fake stages, and a hook that SIGKILLs this process at one moment.
PRELUDE = textwrap.dedent("""
    import os, signal, sys
    from tests import fake_stages

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
""")


def run_dying(project: Path, hook: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`recipe ARGS` in a subprocess whose `hook` code (run before the CLI) may patch something to call die()."""
    code = PRELUDE + textwrap.dedent(hook) + "\nsys.exit(fake_stages.main(sys.argv[1:]))\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_STAGE_COUNTER": str(project / "counter.txt")}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=project, env=env, capture_output=True, text=True,
                          timeout=timeout)


def entry_dirs(project: Path, kind: str) -> list[Path]:
    return sorted((project / ".recipe-cache/entries" / kind).glob("*"))


def assert_cache_clean(project: Path) -> None:
    """Every folder under entries/ has its manifest and passes a full verify."""
    cache = Cache(project / ".recipe-cache")
    for folder in (project / ".recipe-cache/entries").glob("*/*"):
        assert (folder / "manifest.json").is_file(), f"{folder} has no manifest: it looks committed but is not"
    for entry in cache.entries():
        assert cache.verify(entry, full=True) == [], entry


# --- a death inside the commit --------------------------------------------------------------------------------------------


KILL_AT_COMMIT_RENAME = """
    real_rename = os.rename
    def rename(src, dst, *a, **k):
        if "/work/train-" in str(src) and "/entries/train/" in str(dst):
            die()  # the manifest is written and fsynced; the atomic rename never happens
        return real_rename(src, dst, *a, **k)
    os.rename = rename
"""


def test_kill_between_manifest_write_and_rename_leaves_no_entry_and_the_next_run_commits(project):
    done = run_dying(project, KILL_AT_COMMIT_RENAME, "run", "core.yaml")
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert executed(project) == ["model", "data", "train"]
    assert entry_dirs(project, "train") == [], "an entry must not appear without its rename"
    work = list((project / ".recipe-cache/work").glob("train-*"))
    assert len(work) == 1 and (work[0] / "manifest.json").is_file()  # the manifest was written, then the process died
    assert_cache_clean(project)
    assert main(["run", "core.yaml"]) == 0
    assert executed(project) == ["train", "export", "quantize", "serve"]
    assert [s["status"] for s in last_run(project)["steps"]] == ["cached", "cached", "ran", "ran", "ran", "ran"]
    assert not list((project / ".recipe-cache/work").glob("train-*")), "the commit moved the work folder"
    assert_cache_clean(project)


KILL_AFTER_QUARANTINE = """
    real_rename = os.rename
    def rename(src, dst, *a, **k):
        result = real_rename(src, dst, *a, **k)
        if "/quarantine/train-" in str(dst):
            die()  # a forced re-run moved the old entry aside and died before swapping the new one in
        return result
    os.rename = rename
"""


def test_kill_in_a_forced_rerun_between_moving_the_old_entry_aside_and_committing(project):
    assert main(["run", "core.yaml"]) == 0
    executed(project)
    done = run_dying(project, KILL_AFTER_QUARANTINE, "run", "core.yaml", "--force", "train")
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert executed(project) == ["train"]
    assert entry_dirs(project, "train") == []  # old entry in quarantine, new one not committed: a miss, never a mix
    assert len(list((project / ".recipe-cache/quarantine").glob("train-*"))) == 1
    assert_cache_clean(project)
    assert main(["run", "core.yaml"]) == 0
    assert executed(project) == ["train"]  # same key: export and later stay valid
    assert_cache_clean(project)


# --- locks ------------------------------------------------------------------------------------------------------------------


HOLD_LOCK_AND_DIE = """
    from runner.store.local import Cache
    cache = Cache(sys.argv[1])
    with cache.lock(sys.argv[2]):
        print("holding", flush=True)
        die()
"""


def test_a_lock_file_left_by_a_dead_holder_does_not_block(project):
    cache = Cache(project / ".recipe-cache")
    key = "deadbeef" * 3
    code = PRELUDE + textwrap.dedent(HOLD_LOCK_AND_DIE)
    done = subprocess.run([sys.executable, "-c", code, str(cache.root), key], cwd=project,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=30)
    assert done.returncode == -signal.SIGKILL and "holding" in done.stdout, done.stderr
    assert (cache.root / "locks" / f"{key}.lock").exists(), "the dead holder's lock file is still there"
    started = time.monotonic()
    with cache.lock(key, timeout=2):
        pass
    assert time.monotonic() - started < 1


def test_a_live_holder_does_block_and_a_stale_lock_file_with_junk_does_not(project):
    """The control for the test above (a live holder blocks), and a lock file with leftover bytes in it."""
    cache = Cache(project / ".recipe-cache")
    key = "cafebabe" * 3
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from runner.store.local import Cache\n"
         "with Cache(sys.argv[1]).lock(sys.argv[2]):\n    print('holding', flush=True); time.sleep(30)",
         str(cache.root), key], cwd=project, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(TimeoutError):
            with cache.lock(key, timeout=0.3):
                pass
    finally:
        holder.kill()
        holder.wait()
    (cache.root / "locks" / f"{key}.lock").write_text("12345 some other process wrote this\n")
    with cache.lock(key, timeout=2):
        pass


def test_every_step_lock_of_a_killed_run_is_free_for_the_next_run(project):
    """A run killed mid-step (holding that step's lock) must not stall the next run on it."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_STAGE_COUNTER": str(project / "counter.txt"),
                   "FAKE_STAGE_SLOW": "export", "FAKE_STAGE_SLEEP": "30"}
    process = subprocess.Popen([sys.executable, "-m", "tests.fake_stages", "run", "core.yaml"], cwd=project,
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not list((project / ".recipe-cache/work").glob("export-*/outputs/part1.txt")):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    started = time.monotonic()
    assert main(["run", "core.yaml"]) == 0
    assert time.monotonic() - started < 4
    assert_cache_clean(project)


# --- crashes inside a stage --------------------------------------------------------------------------------------------------


def crash_in(kind: str, exc: BaseException, monkeypatch):  # noqa: ANN001, ANN201
    """Make the fake stage `kind` write a file, then raise `exc` (a bug, not a StageError)."""
    module = sys.modules[f"fake_stage_{kind}"]

    def run(config, inputs, out):  # noqa: ANN001, ANN202
        (out / "stale.txt").write_text("from the attempt that crashed\n")
        raise exc

    monkeypatch.setattr(module, "run", run)


def test_a_crash_inside_a_non_resumable_stage_leaves_no_work_folder(project, monkeypatch, capsys):
    crash_in("export", ZeroDivisionError("division by zero"), monkeypatch)
    assert main(["run", "core.yaml"]) == 1
    err = capsys.readouterr().err
    assert "ZeroDivisionError" in err and "traceback in" in err
    assert not list((project / ".recipe-cache/work").glob("export-*")), "a crashed non-resumable step leaves nothing"
    assert entry_dirs(project, "export") == []
    log = next((project / "runs/core").glob("2*/logs/export.log")).read_text()
    assert "Traceback" in log and "ZeroDivisionError" in log
    monkeypatch.undo()


def test_a_crash_inside_a_resumable_stage_keeps_its_work_for_the_next_attempt(project, monkeypatch):
    crash_in("train", RuntimeError("boom"), monkeypatch)
    assert main(["run", "core.yaml"]) == 1
    work = list((project / ".recipe-cache/work").glob("train-*"))
    assert len(work) == 1 and (work[0] / "outputs/stale.txt").is_file(), "checkpoints survive a crash"
    assert entry_dirs(project, "train") == []


def test_ctrl_c_inside_a_stage_leaves_nothing_that_reaches_the_next_entry(project, monkeypatch):
    """KeyboardInterrupt skips the failure cleanup; the next run must still start that step from an empty folder."""
    crash_in("export", KeyboardInterrupt(), monkeypatch)
    assert main(["run", "core.yaml"]) == 130
    assert entry_dirs(project, "export") == []
    monkeypatch.setattr(sys.modules["fake_stage_export"], "run", lambda c, i, o: fake_stages.run("export", c, i, o))
    executed(project)
    assert main(["run", "core.yaml"]) == 0
    assert executed(project) == ["export", "quantize", "serve"]
    (entry,) = entry_dirs(project, "export")
    assert not (entry / "outputs/stale.txt").exists(), "a file from the interrupted attempt leaked into the entry"
    assert_cache_clean(project)


# --- the hash memo -------------------------------------------------------------------------------------------------------------


KILL_AT_MEMO_REPLACE = """
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if str(dst).endswith("hash-memo.json"):
            with open(src, "r+") as handle:  # and the temporary file is half-written, for good measure
                handle.truncate(max(1, os.path.getsize(src) // 2))
            die()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
"""


def test_a_kill_during_the_hash_memo_write_leaves_a_readable_memo(project):
    assert main(["run", "core.yaml"]) == 0
    memo_path = project / ".recipe-cache/hash-memo.json"
    before = json.loads(memo_path.read_text())
    assert before, "the run memoized its hashes"
    (project / "reviews.csv").write_text("text,label\nnew rows,positive\nmore rows,negative\n")  # forces a memo write
    done = run_dying(project, KILL_AT_MEMO_REPLACE, "plan", "core.yaml")
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    assert json.loads(memo_path.read_text()) == before, "the memo is the old one, whole"
    assert HashMemo(memo_path).memo == before
    assert list(memo_path.parent.glob(".hash-memo.json.*.tmp")), "(the dead writer's temporary file stays behind)"
    executed(project)
    assert main(["run", "core.yaml"]) == 0
    assert executed(project) == ALL  # the data changed; the memo's stale view of it must not hide that
    assert_cache_clean(project)


def test_a_damaged_memo_only_costs_rehashing(project):
    assert main(["run", "core.yaml"]) == 0
    executed(project)
    memo_path = project / ".recipe-cache/hash-memo.json"
    for damage in ('{"truncated": [1, 2', "", "\x00\x00garbage"):
        memo_path.write_text(damage)
        assert HashMemo(memo_path).memo == {}
        assert main(["run", "core.yaml"]) == 0
        assert executed(project) == []
        assert json.loads(memo_path.read_text()), "the next save writes a whole memo again"


# --- racing readers of a damaged entry -------------------------------------------------------------------------------------


def test_two_readers_quarantining_the_same_damaged_entry_do_not_crash(project, monkeypatch):
    """Runs look entries up outside the lock: two of them (or a run and `recipe cache verify`) can find the same damaged
    entry. The second to move it into quarantine finds it gone: that is a miss, not a crash."""
    assert main(["run", "core.yaml"]) == 0
    executed(project)
    (result,) = (project / ".recipe-cache/entries/data").glob("*/outputs/result.txt")
    result.write_text("tampered: a different size\n")
    other = Cache(project / ".recipe-cache")
    real_verify = Cache.verify

    def verify_then_lose_the_race(self, entry, full=True):  # noqa: ANN001, ANN202
        problems = real_verify(self, entry, full)
        if problems and self is not other and entry.path.exists():
            other.quarantine(entry)  # the other reader gets there first
        return problems

    monkeypatch.setattr(Cache, "verify", verify_then_lose_the_race)
    assert main(["run", "core.yaml"]) == 0
    assert executed(project) == ["data"]
    assert len(list((project / ".recipe-cache/quarantine").glob("data-*"))) == 1
    monkeypatch.undo()
    assert_cache_clean(project)


def test_an_entry_folder_without_manifest_is_a_miss_and_is_replaced(project):
    """A folder under entries/ without manifest.json (a copy cut short, a foreign tool) never counts as committed."""
    assert main(["run", "core.yaml", "--until", "data"]) == 0
    executed(project)
    keys = {row["step"]: row["key"] for row in plan_json(project)}
    junk = project / ".recipe-cache/entries/train" / keys["train"] / "outputs"
    junk.mkdir(parents=True)
    (junk / "result.txt").write_text("not a real result\n")
    assert main(["run", "core.yaml"]) == 0
    assert executed(project) == ["train", "export", "quantize", "serve"]
    (entry,) = entry_dirs(project, "train")
    assert (entry / "outputs/result.txt").read_text() != "not a real result\n"
    assert_cache_clean(project)


def plan_json(project: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "tests.fake_stages", "plan", "core.yaml", "--json"], cwd=project,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
