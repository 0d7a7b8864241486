"""The train step on a real Ray cluster (`train.distributed.launcher: ray`), started by the tests themselves.

The cluster (tests/ray_cluster.py) is `ray start --head --num-cpus=2` inside network and PID namespaces of its own, with
only loopback up: Ray would otherwise advertise, and send traffic to, this machine's outside address. The train step's
driver must reach it, so each run is tests/ray_train_job.py started inside those namespaces. The model and data are the
tiny ones of the other train tests (conftest). What a user relies on:
- two Ray workers train what torchrun's two processes train, step for step (same seed, same loss curve), even when they
  cannot see the driver's folder (the outputs come back through Ray's storage on the remote);
- a recipe that requires CUDA is refused on a cluster without GPUs;
- a cluster too small for the workers, or no cluster at the address, is refused before any step runs, with what was
  asked and what is there;
- a worker killed in mid-training is restarted by Ray from the last checkpoint, and the step finishes; past
  max_failures, one line says which worker died on which node;
(That the launcher is in no cache key is checked in tests/test_golden_keys.py.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from runner.recipe.sections import Distributed, Lora, LoraTrain, Model, RayLaunch
from runner.report import stage_sections
from runner.report.render import markdown
from tests.conftest import sentiment_rows

REPO = Path(__file__).resolve().parent.parent
JOB_SCRIPT = REPO / "tests" / "ray_train_job.py"


ray = pytest.importorskip("ray", reason="Ray Train is not installed: envs/ray.txt (`nox -s tests` installs it)")

from tests import ray_cluster  # noqa: E402 - only with ray installed

_why_not = ray_cluster.namespaces_available()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_why_not is not None, reason=f"the Ray cluster {_why_not}")]


# --- the cluster, the model and the data ---------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def node_cache(tmp_path_factory) -> Path:
    """The cluster node's own cache (RECIPE_CACHE of `ray start`): its workers' folder when they cannot see the driver's."""
    return tmp_path_factory.mktemp("node-cache")


@pytest.fixture(scope="module")
def cluster(node_cache):
    started = ray_cluster.start(num_cpus=2, env={**_env(), "RECIPE_CACHE": str(node_cache)})
    yield started
    started.stop()


@pytest.fixture(scope="module")
def causal_data(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts, names = sentiment_rows(160)
    texts = [f"### Instruction:\n{t}\n### Response:\n{n}{tokenizer.eos_token}" for t, n in zip(texts, names, strict=True)]
    encoded = tokenizer(texts, truncation=True, max_length=48, return_token_type_ids=False)
    columns = {"text": texts, **encoded, "labels": [list(ids) for ids in encoded["input_ids"]]}
    folder = tmp_path_factory.mktemp("causal-data")
    Dataset.from_dict(columns).train_test_split(test_size=0.2, seed=0).save_to_disk(str(folder / "dataset"))
    return folder


def _job(folder: Path, model_dir: Path, data: Path, launcher: str, seed: int = 42, placement: dict | None = None,
         **overrides: Any) -> Path:
    """tiny_llama_lora's training, shortened: LoRA on every linear layer, 2 processes (gloo), 24 steps of 8 rows each,
    a checkpoint every 4."""
    ray_settings = overrides.pop("ray", {})
    settings = {"method": "lora", "lora": Lora(r=8, target_modules="all-linear"), "max_steps": 24, "batch_size": 8,
                "learning_rate": 3e-3, "save_steps": 4, "logging_steps": 1, "eval_strategy": "no",
                "distributed": Distributed(nproc_per_node=2, backend="gloo", launcher=launcher,
                                           ray=RayLaunch(**ray_settings)), **overrides}
    train = LoraTrain(**settings)
    folder.mkdir(parents=True, exist_ok=True)
    job = {"config": {"model": Model(path=str(model_dir), task="causal-lm").model_dump(mode="json"),
                      "train": train.model_dump(mode="json"), "seed": seed},
           "inputs": {"data": str(data)}, "out": str(folder / "out"), **({"placement": placement} if placement else {})}
    (folder / "job.json").write_text(json.dumps(job))
    return folder / "job.json"


def _result(job: Path) -> dict[str, Any]:
    return json.loads(job.with_name("result.json").read_text())


def _run_on_ray(cluster: ray_cluster.Cluster, job: Path) -> dict[str, Any]:
    done = cluster.run([sys.executable, str(JOB_SCRIPT), str(job)], env={**_env(), "RAY_ADDRESS": cluster.address})
    assert done.returncode == 0, done.stderr[-3000:]
    return _result(job)


def _run_with_torchrun(job: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, str(JOB_SCRIPT), str(job)], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return _result(job)


def losses(result: dict[str, Any]) -> list[float]:
    return [entry["loss"] for entry in result["log_history"] if "loss" in entry]


# --- what the user relies on ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchrun_reference(tiny_llama_dir, causal_data, tmp_path_factory) -> dict[str, Any]:
    """The same training through torchrun's two processes: what the Ray runs must reproduce."""
    return _run_with_torchrun(_job(tmp_path_factory.mktemp("torchrun"), tiny_llama_dir, causal_data, "torchrun"))


def test_two_ray_workers_train_what_two_torchrun_processes_train(cluster, tiny_llama_dir, causal_data,
                                                                 torchrun_reference, node_cache, tmp_path,
                                                                 tmp_path_factory):
    """Here the workers cannot see the driver's folder (an empty tmpfs covers it in the cluster's mount namespace), as
    on a node without a shared disk: they train in their node's cache, checkpoints go to the remote, and rank 0 hands the
    outputs back through Ray's storage there."""
    remote = tmp_path_factory.mktemp("remote")
    job = _job(tmp_path, tiny_llama_dir, causal_data, "ray",
               placement={"remote": f"file://{remote}", "key": "0123456789abcdef01234567"})
    assert cluster.run(["mount", "-t", "tmpfs", "tmpfs", str(tmp_path)], timeout=30).returncode == 0
    try:
        done = cluster.run([sys.executable, str(JOB_SCRIPT), str(job)], mounts=False,
                           env={**_env(), "RAY_ADDRESS": cluster.address})
    finally:
        cluster.run(["umount", str(tmp_path)], timeout=30)
    assert done.returncode == 0, done.stderr[-3000:]
    on_ray = _result(job)
    assert "error" not in on_ray, on_ray.get("error")
    # the remote keeps no checkpoints of a finished run; the node's cache held the workers' folder, emptied
    assert not [p for p in remote.rglob("*") if p.is_file()]
    assert list(node_cache.glob("work/train-*")) and not list(node_cache.glob("work/*/outputs/*"))
    metrics = on_ray["metrics"]
    assert metrics["world_size"] == 2 and metrics["effective_batch_size"] == 16 and metrics["steps"] == 24
    # The same seed, data order and process group: the curves agree far inside seed-to-seed noise (bench/ray_overhead.py
    # measures that noise on torchrun's side: 3 seeds).
    assert len(losses(on_ray)) == len(losses(torchrun_reference)) == 24
    assert losses(on_ray) == pytest.approx(losses(torchrun_reference), rel=1e-4)
    assert metrics["eval_loss"] == pytest.approx(torchrun_reference["metrics"]["eval_loss"], rel=1e-4)
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # what only served the run is gone: the committed result holds the trained adapter and its records alone
    assert not [name for name in ("launch", "ray", "checkpoints") if (out / name).exists()]


def test_a_cluster_too_small_for_the_workers_is_refused_before_any_step(cluster, tiny_llama_dir, causal_data, tmp_path):
    job = _job(tmp_path, tiny_llama_dir, causal_data, "ray", distributed=Distributed(nproc_per_node=3, backend="gloo",
                                                                                      launcher="ray"))
    result = _run_on_ray(cluster, job)
    assert result["error"] == (
        "the Ray cluster is too small for 3 workers: they need 3 CPU (1 CPU each), the cluster has 2 CPU, 0 GPU; "
        "lower train.distributed.nproc_per_node/nnodes or ray.cpus_per_worker, or add nodes")
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "launch").exists()


def test_a_recipe_that_requires_cuda_is_refused_on_a_cluster_without_gpus(cluster, tiny_llama_dir, causal_data,
                                                                          tmp_path):
    """`requires.accelerator: cuda` asks one GPU per worker (the executor passes the recipe's requires to the step)."""
    job = _job(tmp_path, tiny_llama_dir, causal_data, "ray", placement={"accelerator": "cuda"})
    result = _run_on_ray(cluster, job)
    assert result["error"] == (
        "the recipe requires CUDA (requires.accelerator: cuda): its 2 Ray workers need 2 CPU, 2 GPU (1 CPU + 1 GPU "
        "each), the cluster has 2 CPU, 0 GPU; add GPU nodes to the cluster, or run where a GPU is")
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "launch").exists()


def test_no_cluster_at_the_address_is_refused_in_seconds(tiny_llama_dir, causal_data, tmp_path, monkeypatch):
    from runner.stages import StageError, train

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job = json.loads(_job(tmp_path, tiny_llama_dir, causal_data, "ray").read_text())
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    began = time.perf_counter()
    with pytest.raises(StageError, match=rf"^no Ray cluster answers at 127\.0\.0\.1:{port} \(.*\): start one with"):
        train.run(job["config"], {"data": causal_data}, tmp_path / "out")
    assert time.perf_counter() - began < 10
    assert not (tmp_path / "out" / "checkpoints").exists()


def _kill_rank_after_checkpoint(cluster: ray_cluster.Cluster, job: Path, rank: int, step: int) -> dict[str, Any]:
    """Start the run, wait for its checkpoint at `step`, SIGKILL worker `rank` by its PID (inside the namespace), and
    let the run end."""
    out = json.loads(job.read_text())["out"]
    run = cluster.popen([sys.executable, str(JOB_SCRIPT), str(job)], env={**_env(), "RAY_ADDRESS": cluster.address},
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    node, checkpoint = Path(out) / "launch" / f"node-{rank}", Path(out) / "checkpoints" / f"checkpoint-{step}"
    deadline = time.monotonic() + 300
    while not (node.exists() and (checkpoint / "trainer_state.json").exists()):
        assert run.poll() is None, f"the run ended before its checkpoint at step {step}: {run.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint in 300 s"
        time.sleep(0.05)
    pid = json.loads(node.read_text())["pid"]
    assert cluster.run(["kill", "-9", str(pid)], timeout=30).returncode == 0
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    return {**_result(job), "killed_pid": pid}


@pytest.fixture(scope="module")
def torchrun_resumed(tiny_llama_dir, causal_data, tmp_path_factory) -> dict[str, Any]:
    """torchrun's two processes killed once their checkpoint at step 8 is written, then run again: the step's own
    resume, which a Ray restart must reproduce. (A resumed 2-process run is not bit-equal to an uninterrupted one: the
    losses after the resume differ by up to ~1e-3 relative, with torchrun as with Ray.)"""
    job = _job(tmp_path_factory.mktemp("torchrun-resumed"), tiny_llama_dir, causal_data, "torchrun", save_steps=8)
    out = Path(json.loads(job.read_text())["out"])
    first = subprocess.Popen([sys.executable, str(JOB_SCRIPT), str(job)], env=_env(), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "checkpoint-8" / "trainer_state.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, "torchrun ended before its checkpoint at step 8"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the process group this fixture started: torchrun and its two workers
    first.wait()
    result = _run_with_torchrun(job)
    assert result["metrics"]["resumed_from_step"] == 8
    return result


def test_a_worker_killed_mid_run_is_restarted_from_the_last_checkpoint(cluster, tiny_llama_dir, causal_data,
                                                                       torchrun_resumed, tmp_path):
    job = _job(tmp_path, tiny_llama_dir, causal_data, "ray", save_steps=8)
    result = _kill_rank_after_checkpoint(cluster, job, rank=1, step=8)
    assert "error" not in result, result["error"]
    metrics = result["metrics"]
    assert metrics["steps"] == 24 and metrics["world_size"] == 2
    assert metrics["resumed_from_step"] == 8  # Ray's last checkpoint before the kill (the next is 8 steps later)
    # the restarted workers go on as the step's own resume does: weights, optimizer, scheduler and RNG states came back
    assert losses(result) == pytest.approx(losses(torchrun_resumed), rel=1e-4)
    assert metrics["eval_loss"] == pytest.approx(torchrun_resumed["metrics"]["eval_loss"], rel=1e-4)
    # the run report's train section, read from the metrics.json the step committed, says so with the final figures
    written = json.loads((Path(json.loads(job.read_text())["out"]) / "metrics.json").read_text())
    section = markdown("train", stage_sections.train(written))
    assert "| resumed from checkpoint at step | 8 |" in section
    assert "| optimizer steps | 24 " in section and "eval loss (before → after)" in section


def test_past_max_failures_one_line_says_which_worker_died_where(cluster, tiny_llama_dir, causal_data, tmp_path):
    job = _job(tmp_path, tiny_llama_dir, causal_data, "ray", ray={"max_failures": 0})
    result = _kill_rank_after_checkpoint(cluster, job, rank=1, step=4)
    error = result["error"]
    assert "\n" not in error
    assert error.startswith("the Ray train run failed after no restart (train.distributed.ray.max_failures: 0): "
                            "worker rank 1 on node 127.0.0.1 (")
    assert f"pid {result['killed_pid']})" in error
