"""Multi-node training on one shared cache: two `recipe run` processes as node 0 and node 1 of a real torchrun rendezvous
(gloo on CPU, one process per node, MASTER_ADDR 127.0.0.1), both on the same RECIPE_CACHE as machines sharing an NFS
folder would be. With one lock per key for both nodes this deadlocked: node 0 held the train key's lock while torchrun
waited for node 1, which waited for that lock.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.store.local import Cache
from tests.conftest import REPO, sentiment_rows

RECIPE = """\
name: multinode
seed: 3
model:
  init: {architecture: distilbert, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, vocab_size: 200,
         max_position_embeddings: 64}
  task: sequence-classification
data:
  source: {path: reviews.csv}
  max_length: 32
  test_size: 0.2
train:
  method: full
  max_steps: 2
  batch_size: 4
  eval_before_training: false
  distributed: {nproc_per_node: 1, nnodes: 2, backend: gloo}
"""
TIMEOUT_S = 150  # a pass takes about 40 s on 2 busy cores; the old deadlock never ends


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_one_shared_cache_train_and_commit_one_entry(tmp_path: Path) -> None:
    texts, labels = sentiment_rows(60)
    with open(tmp_path / "reviews.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("text", "label"), *zip(texts, labels, strict=True)])
    (tmp_path / "multinode.yaml").write_text(RECIPE)
    cache = tmp_path / "shared-cache"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RECIPE_CACHE": str(cache), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen([sys.executable, "-m", "runner.cli", "run", "multinode.yaml", "--until", "train",
                          "--runs-dir", f"runs-node{rank}"], cwd=tmp_path, env={**env, "NODE_RANK": str(rank)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for rank in (0, 1)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        outputs = [node.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for node in nodes]
    finally:
        for node in nodes:  # torchrun and its workers too: each node is a process group of its own
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], outputs

    store = Cache(cache)
    trains = [entry for entry in store.entries() if entry.kind == "train"]
    assert len(trains) == 1 and store.verify(trains[0], full=True) == []
    assert (trains[0].outputs / "model" / "model.safetensors").is_file()
    assert json.loads((trains[0].outputs / "metrics.json").read_text())["world_size"] == 2
    assert sorted(entry.kind for entry in store.entries()) == ["data", "model", "train"]  # each step ran once
    assert list((cache / "work").glob("train-*")) == []  # node 1's copy was dropped, node 0's became the entry
    for rank in (0, 1):
        run = json.loads((tmp_path / f"runs-node{rank}" / "multinode" / "latest" / "run.json").read_text())
        train = next(step for step in run["steps"] if step["kind"] == "train")
        assert train["status"] == "ran" and train["outputs"] == str(trains[0].outputs)


@pytest.mark.parametrize("rank", ["2", "-1", "one", ""])
def test_a_node_rank_outside_the_nodes_is_refused_with_its_value(rank: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.recipe.sections import Distributed, FullTrain
    from runner.stages import StageError
    from runner.stages.train.torchrun import torchrun_args

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("NODE_RANK", rank)
    train = FullTrain(method="full", distributed=Distributed(nproc_per_node=1, nnodes=2))
    with pytest.raises(StageError, match=rf"NODE_RANK='{rank}': expected this machine's number, 0..1"):
        torchrun_args(train)
    monkeypatch.setenv("NODE_RANK", "1")
    assert torchrun_args(train)[-6:] == ["--node_rank", "1", "--master_addr", "127.0.0.1", "--master_port", "29500"]


@pytest.mark.parametrize("rank", ["2", "-1", "node1", "\u00b2"])
def test_the_executor_refuses_a_bad_node_rank_before_taking_any_lock(rank: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad NODE_RANK taken for node 0 would wait on node 0's key lock through its rendezvous: it is refused first, with
    its value (a superscript two is a digit to str.isdigit, and no number to int)."""
    from runner.execute import node_rank
    from runner.plan import Step
    from runner.stages import StageError

    step = Step("train", {"train": {"distributed": {"nnodes": 2, "nproc_per_node": 1}}}, [])
    monkeypatch.setenv("NODE_RANK", rank)
    with pytest.raises(StageError, match=r"expected this machine's number, 0\.\.1"):
        node_rank(step)
    monkeypatch.setenv("NODE_RANK", "1")
    assert node_rank(step) == 1
