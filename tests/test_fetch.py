"""runner/fetch.py: how a Ray worker's node gets a step's inputs (runner.stages.Placement.localize). A node that sees the
driver's cache uses it; another node uses its own cache, else pulls the entry from the remote by key, every file
re-hashed; a damaged remote copy is refused in one line naming the file, and nothing unverified is committed."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.fetch import localize
from runner.stages import Placement, StageError
from runner.store.local import Cache
from runner.store.remote import Remote

KEY = "0123456789abcdef01234567"
STEP = "89abcdef0123456789abcdef"


@pytest.fixture
def driver(tmp_path) -> tuple[Cache, Path]:
    """The driver's cache with a committed data entry, pushed to a file:// remote."""
    cache = Cache(tmp_path / "driver-cache")
    work = cache.workdir("data", KEY, keep=False)
    (work / "dataset").mkdir()
    (work / "dataset" / "rows.arrow").write_bytes(b"rows" * 100)
    entry = cache.commit("data", KEY, work, {"kind": "data", "key": KEY})
    remote = tmp_path / "remote"
    Remote(f"file://{remote}").push(cache, entry)
    return cache, remote


def _placement(remote: Path | None) -> Placement:
    return Placement(key=STEP, remote=f"file://{remote}" if remote else None, sources={"data": ("data", KEY)})


def test_a_node_that_sees_the_drivers_cache_uses_it(driver, tmp_path, monkeypatch):
    cache, remote = driver
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "node-cache"))
    seen = cache.entry("data", KEY).outputs
    assert localize(_placement(remote), "data", seen) == seen
    assert not (tmp_path / "node-cache" / "entries").exists()  # nothing pulled


def test_a_node_without_the_drivers_folder_pulls_the_input_by_key_into_its_own_cache(driver, tmp_path, monkeypatch):
    _, remote = driver
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "node-cache"))
    got = localize(_placement(remote), "data", tmp_path / "elsewhere" / "entries" / "data" / KEY / "outputs")
    assert got == (tmp_path / "node-cache").resolve() / "entries" / "data" / KEY / "outputs"
    assert (got / "dataset" / "rows.arrow").read_bytes() == b"rows" * 100
    assert localize(_placement(None), "data", None) == got  # the next time: this node's cache, no remote needed


def test_a_damaged_remote_copy_is_refused_and_nothing_is_committed(driver, tmp_path, monkeypatch):
    _, remote = driver
    obj = next(p for p in (remote / "objects").rglob("*") if p.is_file())
    obj.write_bytes(b"tampered")
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "node-cache"))
    with pytest.raises(StageError, match=r"^cannot fetch the data step's output \(data 0123456789ab\) from file://.*: "
                                         r"dataset/rows\.arrow: sha256 [0-9a-f]{64} on the remote, [0-9a-f]{64} in its "
                                         r"manifest$"):
        localize(_placement(remote), "data", None)
    assert Cache(tmp_path / "node-cache").entry("data", KEY) is None


def test_without_a_remote_a_missing_input_names_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "node-cache"))
    with pytest.raises(StageError, match=r"not on this machine and no remote is set: give every node the same cache"):
        localize(_placement(None), "data", tmp_path / "nowhere")


def test_the_step_itself_gets_a_work_folder_of_the_nodes_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / "node-cache"))
    folder = localize(_placement(None), None, None)
    assert folder.is_dir() and folder.is_relative_to((tmp_path / "node-cache").resolve() / "work")
    assert Cache(tmp_path / "node-cache").parse(folder.parent) == ("train", f"{STEP}.node1")
