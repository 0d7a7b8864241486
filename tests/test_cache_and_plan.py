"""The planner and the cache: what re-runs after which change, kill safety, concurrency, tampering, locks.

These tests swap in the fast test-only stage of tests/fake_stages.py through the STAGES table, so they exercise the real
planner, cache, executor and CLI in seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.cli import main
from runner.stages import STAGES
from runner.store import gc
from runner.store.local import Cache, node_work_key

REPO = Path(__file__).resolve().parent.parent
ALL = ["model", "data", "train", "export", "quantize", "serve"]


def executed(project: Path) -> list[str]:
    """Stage kinds executed since the last call (and reset the counter)."""
    counter = project / "counter.txt"
    kinds = [line.split()[0] for line in counter.read_text().splitlines()] if counter.exists() else []
    counter.unlink(missing_ok=True)
    return kinds


def last_run(project: Path) -> dict:
    return json.loads((project / "runs/core/latest/run.json").read_text())


def test_first_run_runs_everything_and_second_run_is_fully_cached(project):
    assert main(["run", "core.yaml"]) == 0
    assert executed(project) == ALL
    assert main(["run", "core.yaml"]) == 0
    assert executed(project) == []
    assert [s["status"] for s in last_run(project)["steps"]] == ["cached"] * 6


def test_changing_a_train_field_reruns_train_and_what_follows(project):
    main(["run", "core.yaml"])
    executed(project)
    assert main(["run", "core.yaml", "train.learning_rate=0.001"]) == 0
    assert executed(project) == ["train", "export", "quantize", "serve"]


def test_editing_one_byte_of_a_data_file_reruns_data_and_what_follows(project):
    main(["run", "core.yaml"])
    executed(project)
    data = project / "reviews.csv"
    data.write_bytes(data.read_bytes().replace(b"good", b"goad"))
    assert main(["run", "core.yaml"]) == 0
    # the built model's tokenizer is trained on the data, so the model step re-runs too
    assert executed(project) == ALL


def test_a_field_that_cannot_change_the_result_reruns_nothing(project):
    main(["run", "core.yaml"])
    executed(project)
    assert main(["run", "core.yaml", "train.logging_steps=1", "description=just words"]) == 0
    assert executed(project) == []


def test_plan_says_why_a_step_is_stale(project, capsys):
    main(["run", "core.yaml"])
    capsys.readouterr()
    assert main(["plan", "core.yaml", "train.epochs=2", "--json"]) == 0
    rows = {row["step"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["data"]["cached"] and not rows["train"]["cached"]
    assert rows["train"]["why"] == ["train.epochs: 1.0 -> 2.0"]
    assert rows["export"]["why"] == ["upstream step 'train' changed"]
    (project / "reviews.csv").write_text("text,label\nnew,positive\nrows,negative\n")
    main(["plan", "core.yaml", "--json"])
    rows = {row["step"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["data"]["why"] == ["data.source.path: file content changed", "upstream step 'model' changed"]


def test_a_failing_step_stops_the_run_and_earlier_steps_stay_cached(project, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_STAGE_FAIL", "export")
    assert main(["run", "core.yaml"]) == 1
    assert "export failed on purpose" in capsys.readouterr().err
    assert [s["status"] for s in last_run(project)["steps"]] == ["ran", "ran", "ran", "failed", "skipped", "skipped"]
    assert not list((project / ".recipe-cache/work").glob("export-*")), "a failed step leaves no work folder"
    monkeypatch.delenv("FAKE_STAGE_FAIL")
    executed(project)
    assert main(["run", "core.yaml"]) == 0
    assert executed(project) == ["export", "quantize", "serve"]


def test_a_failed_gate_keeps_its_report_in_the_run_folder_and_the_message_points_there(project, monkeypatch, capsys):
    """The work folder of a failed step is discarded; the report its gate wrote first is the post-mortem."""
    monkeypatch.setenv("FAKE_STAGE_FAIL", "quantize")
    assert main(["run", "core.yaml"]) == 1
    failed = next(s for s in last_run(project)["steps"] if s["status"] == "failed")
    kept = [p for p in (project / "runs").glob("core/*/failed/quantize/quantize_report.json") if "latest" not in p.parts]
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == {"gate": "failed"}
    assert str(kept[0].relative_to(project)) in failed["error"] and ".recipe-cache/work" not in failed["error"]


def test_force_until_and_dry_run(project, capsys):
    assert main(["run", "core.yaml", "--until", "data"]) == 0
    assert executed(project) == ["model", "data"]
    assert main(["run", "core.yaml", "--dry-run"]) == 0
    assert executed(project) == []
    printed = capsys.readouterr().out
    assert "data" in printed and "cached" in printed and "would run" in printed
    assert main(["run", "core.yaml", "--force", "data", "--until", "data"]) == 0
    assert executed(project) == ["data"]
    assert main(["run", "core.yaml", "--force", "nosuch"]) == 2


def test_tampered_output_is_found_on_use_and_by_verify_then_recomputed(project, capsys):
    main(["run", "core.yaml"])
    executed(project)
    result = next((project / ".recipe-cache/entries/train").glob("*/outputs/result.txt"))
    result.write_text("0" * 64 + "\n")  # same size: only the content hash can tell
    assert main(["cache", "verify"]) == 1
    assert "content changed" in capsys.readouterr().out
    assert list((project / ".recipe-cache/quarantine").glob("train-*"))
    assert main(["run", "core.yaml"]) == 0
    assert executed(project) == ["train"]  # same key, same result: downstream stays valid
    # tampering is caught on use too, without `cache verify`
    result = next((project / ".recipe-cache/entries/data").glob("*/outputs/result.txt"))
    result.write_text("tampered: a different size\n")
    assert main(["run", "core.yaml"]) == 0
    assert executed(project) == ["data"]
    assert main(["cache", "verify"]) == 0


def test_entries_record_manifest_with_hashes_versions_and_timings(project):
    main(["run", "core.yaml"])
    manifest_path = next((project / ".recipe-cache/entries/train").glob("*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    assert manifest["material"]["upstream"].keys() == {"data", "model"}
    assert manifest["material"]["packages"]["torch"] not in ("", None)
    assert manifest["outputs"]["result.txt"]["size"] == 65
    assert len(manifest["outputs"]["result.txt"]["sha256"]) == 64
    assert manifest["config"]["train"]["learning_rate"] == 5e-05
    assert {"seconds", "started", "hardware", "metrics"} <= manifest.keys()


def test_lock_then_locked_run_and_verify(project, capsys):
    main(["run", "core.yaml"])
    assert main(["lock", "core.yaml"]) == 0
    lock = json.loads((project / "core.lock").read_text())
    assert set(lock["steps"]) == set(ALL) and lock["env"] == "cpu"
    assert main(["run", "core.yaml", "--locked"]) == 0
    assert main(["verify", "core.yaml"]) == 0
    capsys.readouterr()
    assert main(["run", "core.yaml", "--locked", "train.epochs=5"]) == 1
    assert "train: train.epochs: 1.0 -> 5.0" in capsys.readouterr().err
    result = next((project / ".recipe-cache/entries/serve").glob("*/outputs/result.txt"))
    result.write_text("0" * 64 + "\n")  # as if this machine had produced other bytes (verify reads the files)
    assert main(["verify", "core.yaml"]) == 1
    assert "serve/result.txt: sha256" in capsys.readouterr().out


def test_lock_refuses_before_a_run(project, capsys):
    assert main(["lock", "core.yaml"]) == 1
    assert "not run yet" in capsys.readouterr().err


def test_cache_ls_lists_every_run_s_entries(project, capsys):
    main(["run", "core.yaml"])
    main(["run", "core.yaml", "train.epochs=2"])
    assert main(["cache", "ls"]) == 0
    assert capsys.readouterr().out.count("train") >= 2


def test_gc_after_an_override_run_and_a_killed_train_keeps_both(project, capsys):
    """The override run is not its recipe's last run (the index forgets it), and the killed train left checkpoints that
    the next run resumes from: gc keeps both by default, and lets them go only when told (--keep-days 0, --work)."""
    assert main(["run", "core.yaml", "train.epochs=2"]) == 0
    override_train = next((project / ".recipe-cache/entries/train").iterdir())
    assert main(["run", "core.yaml"]) == 0  # the recipe's last run: the index now names these steps
    killed = cli(project, "run", "core.yaml", "train.epochs=3", FAKE_STAGE_SLOW="train", FAKE_STAGE_SLEEP="60")
    wait_for(lambda: list(project.glob(".recipe-cache/work/train-*/outputs/part1.txt")))
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    checkpoints = next(project.glob(".recipe-cache/work/train-*"))
    capsys.readouterr()
    assert main(["cache", "gc"]) == 0
    said = capsys.readouterr().out
    assert override_train.is_dir() and (checkpoints / "outputs/part1.txt").is_file(), said
    assert "kept 1: resumable work folder" in said and "removed 0 folder(s)" in said
    # without the window, the override run's entries go (the index names the last full run's steps, not these)...
    assert main(["cache", "gc", "--keep-days", "0", "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert f"would remove {override_train.relative_to(project)}" in said and override_train.is_dir()
    assert "would remove 4 folder(s), would free" in said  # train, export, quantize, serve of the override run
    # ...unless a lock names them
    assert main(["lock", "core.yaml", "train.epochs=2"]) == 0
    assert main(["cache", "gc", "--keep-days", "0", "--lock", "core.lock"]) == 0
    assert "kept 6: named by a lock file" in capsys.readouterr().out and override_train.is_dir()
    assert main(["cache", "gc", "--keep-days", "0", "--work"]) == 0
    said = capsys.readouterr().out
    assert not override_train.exists() and not checkpoints.exists(), said
    assert main(["cache", "gc", "--lock", "missing.lock"]) == 2
    assert "--lock missing.lock: no such lock file" in capsys.readouterr().err


def test_gc_keeps_what_recent_runs_used_and_what_recipes_lock_files_name(project, capsys):
    main(["run", "core.yaml"])
    main(["run", "core.yaml", "train.epochs=2"])
    entries = project / ".recipe-cache/entries/train"
    first, second = sorted(entries.iterdir(), key=lambda p: p.stat().st_mtime)
    week_ago = time.time() - 8 * gc.DAY
    for manifest in (project / ".recipe-cache/entries").glob("*/*/manifest.json"):  # committed a week ago...
        data = json.loads(manifest.read_text())
        data["started"] = "2020-01-01T00:00:00+00:00"
        manifest.write_text(json.dumps(data))
    records = sorted((project / "runs/core").glob("2*/run.json"))
    os.utime(records[0], (week_ago, week_ago))  # ...the first run too; the override run is recent
    cache = Cache(project / ".recipe-cache")
    planned = gc.plan(cache, locks=[], runs_dir=project / "runs", resumable={"train"}, keep_days=7)
    assert first in [d.path for d in planned.remove] and second not in [d.path for d in planned.remove]
    os.utime(records[1], (week_ago, week_ago))  # both runs old: only the index's last run is kept
    planned = gc.plan(cache, locks=[], runs_dir=project / "runs", resumable={"train"}, keep_days=7)
    assert {d.path.parent.name for d in planned.remove} == {"train", "export", "quantize", "serve"}
    assert second not in [d.path for d in planned.remove]
    (project / "recipes").mkdir()  # recipes/*.lock count without being named
    main(["lock", "core.yaml"])
    (project / "core.lock").rename(project / "recipes/core.lock")
    (project / "recipes/broken.lock").write_text("{not json")
    capsys.readouterr()
    assert main(["cache", "gc", "--dry-run"]) == 2  # an unreadable lock stops gc before it removes anything
    assert "recipes/broken.lock: not a lock file gc can read" in capsys.readouterr().err
    (project / "recipes/broken.lock").unlink()
    main(["run", "core.yaml", "train.epochs=3"])  # now the first run is no recipe's last run, but its lock names it
    for record in (project / "runs/core").glob("2*/run.json"):
        os.utime(record, (week_ago, week_ago))
    assert main(["cache", "gc", "--keep-days", "0.5"]) == 0
    assert first.is_dir() and not second.exists()


def test_cache_paths_are_built_and_parsed_in_one_place_and_gc_leaves_foreign_folders(tmp_path):
    cache = Cache(tmp_path, kinds=tuple(STAGES))  # as the CLI builds it: the store learns the stage names from its caller
    key = "0123456789abcdef01234567"
    assert cache.parse(cache.entry_path("train", key)) == ("train", key)
    assert cache.parse(cache.work_path("quantize", key)) == ("quantize", key)
    for stranger in (tmp_path / "entries" / "train", tmp_path / "work" / f"nostage-{key}",
                     tmp_path / "work" / "train-notakey", tmp_path.parent / "entries" / "train" / key):
        with pytest.raises(ValueError):
            cache.parse(stranger)
    (tmp_path / "work" / "my-notes").mkdir(parents=True)  # not the cache's: gc must not delete it
    stale = cache.workdir("train", key, keep=False)
    planned = gc.plan(cache, locks=[], runs_dir=tmp_path / "runs", resumable={"train"})
    assert [d.path for d in planned.remove] == [stale.parent]
    assert (tmp_path / "work" / "my-notes").is_dir()


def test_gc_collects_the_work_folders_of_other_nodes_when_asked_unless_their_node_holds_them(tmp_path):
    cache = Cache(tmp_path)
    key = "0123456789abcdef01234567"
    node_1, node_2 = node_work_key(key, 1), node_work_key(key, 2)
    assert node_work_key(key, 0) == key and cache.parse(cache.work_path("train", node_1)) == ("train", node_1)
    left_by_node_1 = cache.workdir("train", node_1, keep=True).parent  # a killed run's checkpoints
    held_by_node_2 = cache.workdir("train", node_2, keep=True).parent
    for folder in (left_by_node_1, held_by_node_2):
        (folder / "outputs/checkpoint-2").mkdir()
        (folder / "outputs/checkpoint-2/model.safetensors").write_bytes(b"0" * 100)
    with cache.lock(node_2):
        kept = gc.plan(cache, locks=[], runs_dir=tmp_path / "runs", resumable={"train"})
        assert kept.remove == [] and kept.kept == {"resumable work folder (`--work` removes it)": 2}
        planned = gc.plan(cache, locks=[], runs_dir=tmp_path / "runs", resumable={"train"}, work=True)
        assert [(d.path, d.size) for d in planned.remove] == [(left_by_node_1, 100)]
        gc.collect(cache, planned)
    assert not left_by_node_1.exists() and held_by_node_2.is_dir()


def test_cache_ls_and_gc_still_see_entries_of_a_stage_this_version_does_not_know(tmp_path):
    cache = Cache(tmp_path)
    foreign = tmp_path / "entries" / "distill" / "0123456789abcdef01234567"  # from a newer runner sharing the cache
    foreign.mkdir(parents=True)
    (foreign / "manifest.json").write_text("{}")
    assert [(e.kind, e.key) for e in cache.entries()] == [("distill", foreign.name)]
    planned = gc.plan(cache, locks=[], runs_dir=tmp_path / "runs", resumable={"train"}, keep_days=0)
    assert [d.path for d in planned.remove] == [foreign]
    gc.collect(cache, planned)
    assert not foreign.exists()


def test_a_relative_path_into_the_cache_parses_like_the_absolute_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = Cache(Path("cache"))
    key = "0123456789abcdef01234567"
    assert cache.parse(Path("cache") / "entries" / "export" / key) == ("export", key)


# --- real processes: kill -9 and concurrent runs ------------------------------------------------------------------------


def cli(project: Path, *args: str, **env: str) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "FAKE_STAGE_COUNTER": str(project / "counter.txt"), **env}
    return subprocess.Popen([sys.executable, "-m", "tests.fake_stages", *args], cwd=project, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_kill_9_in_the_middle_of_a_step_leaves_nothing_that_looks_complete(project):
    process = cli(project, "run", "core.yaml", FAKE_STAGE_SLOW="train", FAKE_STAGE_SLEEP="60")
    cache = project / ".recipe-cache"
    wait_for(lambda: list(cache.glob("work/train-*/outputs/part1.txt")))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (cache / "entries/train").exists(), "no train entry may look complete"
    assert executed(project) == ["model", "data", "train"]
    finished = cli(project, "run", "core.yaml")
    output, _ = finished.communicate(timeout=60)
    assert finished.returncode == 0, output
    assert executed(project) == ["train", "export", "quantize", "serve"]
    entry = next((cache / "entries/train").iterdir())
    assert (entry / "outputs/result.txt").exists() and (entry / "manifest.json").exists()


def test_two_concurrent_runs_execute_each_step_once_and_agree(project):
    runs = [cli(project, "run", "core.yaml", FAKE_STAGE_SLOW="data", FAKE_STAGE_SLEEP="1.5") for _ in range(2)]
    outputs = [run.communicate(timeout=90)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    assert sorted(executed(project)) == sorted(ALL)
    folders = sorted((project / "runs/core").glob("2*"))
    assert len(folders) == 2
    results = [{s["kind"]: (s["key"], s["outputs"]) for s in json.loads((f / "run.json").read_text())["steps"]}
               for f in folders]
    assert results[0] == results[1]


def test_validate_and_plan_do_not_import_torch(project):
    code = ("import sys; from runner.cli import main; assert main(['validate', 'core.yaml']) == 0;"
            "assert main(['plan', 'core.yaml']) == 0; bad = [m for m in ('torch', 'transformers', 'datasets') "
            "if m in sys.modules]; print('heavy imports:', bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=project, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_token_in_the_environment_never_lands_in_runs_or_cache(project):
    secret = "hf_SECRETtoken1234567890"
    run = cli(project, "run", "core.yaml", HF_TOKEN=secret, HUGGING_FACE_HUB_TOKEN=secret)
    output, _ = run.communicate(timeout=60)
    assert run.returncode == 0, output
    main(["lock", "core.yaml"])
    for path in [*(project / "runs").rglob("*"), *(project / ".recipe-cache").rglob("*"), project / "core.lock"]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
