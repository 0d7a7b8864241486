"""A train attempt on Ray Train workers (`train.distributed.launcher: ray`): a TorchTrainer with nnodes x nproc_per_node
workers, each running the same attempt a torchrun process runs (train_here, handed in by the train stage).

Ray's torch backend sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT and opens the process group (gloo on
CPU, nccl on GPUs), so transformers' Trainer finds a normal DDP run. GPUs per worker: ray.gpus_per_worker, else what the
recipe requires (`requires.accelerator: cuda`: one each, `cpu`: none, `any`: one when the cluster has GPUs).

Data to and from the workers. The executor hands the step a Placement (runner/stages/__init__.py): the key of each
input's entry, the remote's URL (never its credentials) and `localize`, a function of the store (runner/fetch.py)
the workers call, since a stage never imports the store. On each worker:
- an input is the driver's folder when that node sees it and it verifies (one machine, or a cache on a shared
  filesystem), else that node's own cache entry, else pulled from the remote by key and verified file by file, as
  `recipe pull` does;
- the out folder is the driver's when that node sees it; otherwise a work folder of that node's cache, and rank 0 hands
  the finished outputs (no checkpoints) to Ray as a last checkpoint, which the driver downloads into its out folder;
- checkpoints go to Ray's storage_path: ray.storage_path, else `<remote>/ray` (Ray reaches s3:// through pyarrow, with
  each node's AWS_* settings), else the step's own folder. So a restarted group resumes on whatever nodes Ray gives it.
The driver (this process) reads metrics.json back, and the executor commits the out folder as for any step and pushes it.

Checkpoints: each Trainer save is reported to Ray (ReportCheckpoints) and kept under Ray's storage_path. When a worker
dies, Ray restarts the whole group (FailureConfig.max_failures) and every worker resumes from the last reported
checkpoint (ray.train.get_checkpoint). Failures the user can act on are found before anything runs (no cluster, too
few CPUs/GPUs) or reported by the workers through the same `launch/` files as under torchrun (out of memory, a
StageError); such a failure would only repeat, so the workers Ray restarts after one stop at once. (A worker on a node
that does not see the driver's folder reports into its own: its failure reaches the driver as Ray's error line.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from runner.stages import Localize, StageError
from runner.stages.train.checkpoints import CHECKPOINTS, drop_incomplete_checkpoints, is_complete, resume_point
from runner.stages.train.job import Job, OutOfMemory
from runner.stages.train.torchrun import LAUNCH, report_failure, worker_failure

log = logging.getLogger(__name__)

RAY_STORAGE = "ray"  # the default storage_path, inside the step's out folder; removed once the step succeeded
FINAL = "final-outputs"  # the last checkpoint of a run whose rank 0 could not write into the driver's out folder
CONNECT_TIMEOUT_S = 5.0
# Settings of the driver's environment the workers need too (Ray starts them from the cluster's environment).
PASSED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
              "OMP_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG")

Attempt = Callable[..., dict[str, Any]]


def launch_ray(job: Job, attempt: Attempt) -> dict[str, Any]:
    """Run the attempt on Ray Train workers; their outputs land in job.out (or come back through Ray's storage), we
    read metrics.json back.

    Raises:
        StageError: ray is not installed; the cluster cannot be reached, or has too few CPUs/GPUs for the workers, or
            no GPU for a recipe that requires CUDA (before any worker starts); a worker's StageError (an input its node
            cannot fetch, refused or missing on the remote); workers that kept dying past max_failures (which worker,
            on which node, and why); OutOfMemory when a worker ran out of accelerator memory (the stage retries).
    """
    try:
        import ray
    except ImportError:
        raise StageError("`train.distributed.launcher: ray` needs Ray Train, which is not installed here: "
                         "`pip install -r envs/ray.txt -c envs/cpu.txt` (`nox -s recipe` installs it for such recipes)"
                         ) from None
    dist = job.train.distributed
    assert dist is not None
    address = dist.ray.address or os.environ.get("RAY_ADDRESS") or "auto"
    connect(address)
    try:
        gpus = gpus_per_worker(job, ray.cluster_resources())
        check_capacity(worker_count(job), dist.ray.cpus_per_worker, gpus, ray.cluster_resources(),
                       job.placement.accelerator)
        folder = job.out / LAUNCH
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        (job.out / "metrics.json").unlink(missing_ok=True)  # a stale one must not pass for this attempt's result
        storage = storage_path(job)
        _fit(job, attempt, storage, gpus)
    finally:
        ray.shutdown()
    if dist.ray.storage_path is None:
        _remove_storage(storage, run_name(job))
    shutil.rmtree(folder, ignore_errors=True)
    return json.loads((job.out / "metrics.json").read_text())


def storage_path(job: Job) -> str:
    """Where Ray keeps the checkpoints: ray.storage_path as written (a path, or a URI Ray's storage understands), else
    a folder of the remote, which every node reaches, else the step's own folder (one machine, or a shared cache)."""
    dist = job.train.distributed
    assert dist is not None
    if dist.ray.storage_path:
        return dist.ray.storage_path
    if job.placement.remote:
        return f"{job.placement.remote.rstrip('/')}/{RAY_STORAGE}"
    return str(job.out / RAY_STORAGE)


def _remove_storage(storage: str, name: str) -> None:
    """Drop the finished run's checkpoints from the default storage (they only served a restart)."""
    if "://" not in storage:
        shutil.rmtree(storage, ignore_errors=True)
        return
    import pyarrow.fs

    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(storage)
        fs.delete_dir(f"{root.rstrip('/')}/{name}")
    except (OSError, pyarrow.lib.ArrowException) as exc:  # left behind, not a failed step: a later run reuses the name
        log.warning("could not remove the Ray checkpoints under %s/%s: %s", storage, name, exc)


def worker_count(job: Job) -> int:
    dist = job.train.distributed
    assert dist is not None
    return dist.nnodes * dist.nproc_per_node


def gpus_per_worker(job: Job, cluster: dict[str, float]) -> int:
    """ray.gpus_per_worker; else from the recipe's `requires.accelerator`: `cuda` one GPU per worker (check_capacity
    refuses a cluster without), `cpu` none, `any` one on a cluster with GPUs and none on one without."""
    dist = job.train.distributed
    assert dist is not None
    if dist.ray.gpus_per_worker is not None:
        return dist.ray.gpus_per_worker
    accelerator = job.placement.accelerator
    if accelerator in ("cuda", "cpu"):
        return int(accelerator == "cuda")
    return 1 if cluster.get("GPU", 0) > 0 else 0


def connect(address: str) -> None:
    """ray.init, failing in seconds with the address when nothing answers there (ray.init itself retries for a minute)."""
    import ray

    host, _, port = address.rpartition(":")
    if host and port.isdigit() and "://" not in address:
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            raise StageError(f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one with "
                             "`ray start --head`, or set RAY_ADDRESS / `recipe run --ray-address` to its address"
                             ) from None
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False,
                 runtime_env={"env_vars": worker_env()})
    except ConnectionError as exc:
        raise StageError(f"cannot join the Ray cluster at {address!r}: {str(exc).splitlines()[0]} "
                         "(start one with `ray start --head`, or set RAY_ADDRESS / `recipe run --ray-address`)") from None


def worker_env() -> dict[str, str]:
    """The workers import `runner` from the same tree as we do (as torchrun's do) and share our offline settings."""
    root = str(Path(__file__).resolve().parents[2])
    env = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    return env


def check_capacity(workers: int, cpus: float, gpus: int, cluster: dict[str, float], accelerator: str = "any") -> None:
    """Refuse before anything starts when the cluster cannot place every worker at once (Ray would wait forever)."""
    needs = {"CPU": workers * cpus, "GPU": workers * gpus}
    short = {name: need for name, need in needs.items() if need > cluster.get(name, 0)}
    if short:
        asked = ", ".join(f"{_num(need)} {name}" for name, need in needs.items() if need)
        has = ", ".join(f"{_num(cluster.get(name, 0))} {name}" for name in needs)
        if "GPU" in short and not cluster.get("GPU"):
            raise StageError(f"the recipe requires CUDA (requires.accelerator: {accelerator}): its {workers} Ray "
                             f"workers need {asked} ({_num(cpus)} CPU + {gpus} GPU each), the cluster has {has}; add "
                             "GPU nodes to the cluster, or run where a GPU is")
        raise StageError(f"the Ray cluster is too small for {workers} workers: they need {asked} "
                         f"({_num(cpus)} CPU{f' + {gpus} GPU' if gpus else ''} each), the cluster has {has}; lower "
                         "train.distributed.nproc_per_node/nnodes or ray.cpus_per_worker, or add nodes")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _fit(job: Job, attempt: Attempt, storage: str, gpus: int) -> None:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    dist = job.train.distributed
    assert dist is not None
    trainer = TorchTrainer(
        train_loop_per_worker=_worker_loop(attempt, job.placement.localize),
        train_loop_config={"job": job.to_json()},
        torch_config=TorchConfig(backend={"auto": "nccl" if gpus else "gloo"}.get(dist.backend, dist.backend)),
        scaling_config=ScalingConfig(
            num_workers=worker_count(job), use_gpu=gpus > 0,
            resources_per_worker={"CPU": dist.ray.cpus_per_worker, **({"GPU": gpus} if gpus else {})}),
        run_config=RunConfig(
            # a fixed name: a rerun of the same step (same out folder) goes on from the same storage
            name=run_name(job), storage_path=storage,
            failure_config=FailureConfig(max_failures=dist.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),  # as Trainer's save_total_limit
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # ray.train.TrainingFailedError, after Ray's restarts
        failure = worker_failure(job.out / LAUNCH)
        if failure == "oom":
            raise OutOfMemory("a Ray worker ran out of accelerator memory") from None
        if failure:
            raise StageError(failure) from None
        raise StageError(describe_failure(exc, job.out / LAUNCH, dist.ray.max_failures)) from None
    failure = worker_failure(job.out / LAUNCH)  # reported, then Ray's restart stopped at once (see worker_main)
    if failure == "oom":
        raise OutOfMemory("a Ray worker ran out of accelerator memory")
    if failure:
        raise StageError(failure)
    if not (job.out / "metrics.json").exists() and result.checkpoint is not None \
            and Path(result.checkpoint.path).name == FINAL:
        result.checkpoint.to_directory(str(job.out))  # rank 0 ran on a node that does not see this folder
    if not (job.out / "metrics.json").exists():
        raise StageError("the Ray workers finished without writing metrics.json (see the worker logs above)")


def run_name(job: Job) -> str:
    return f"train-{job.out.name}"


def describe_failure(exc: BaseException, folder: Path, max_failures: int) -> str:
    """One line: which worker failed, on which node, and why. A worker whose process died is named before the others,
    which only saw their peer vanish from the process group."""
    import ray.exceptions

    failures = getattr(exc, "worker_failures", None) or {}
    retries = "no restart" if max_failures == 0 else f"{max_failures} restart(s)" if max_failures > 0 else "restarts"
    if not failures:
        reason = [line for line in str(exc).strip().splitlines() if line.strip()]
        return f"the Ray train run failed after {retries}: {reason[-1].strip() if reason else type(exc).__name__}"
    # a dead worker comes back wrapped (Ray Train's WorkerHealthCheckFailedError around the RayActorError)
    causes = {rank: getattr(error, "health_check_failure", error) for rank, error in failures.items()}
    died = [rank for rank, cause in causes.items() if isinstance(cause, ray.exceptions.RayActorError)]
    rank = min(died or causes)
    error = causes[rank]
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    why = next((line for line in lines if "died" in line or "killed" in line.lower()), lines[-1] if lines else "")
    why = why if len(why) <= 160 else why[:157] + "..."
    return (f"the Ray train run failed after {retries} (train.distributed.ray.max_failures: {max_failures}): worker "
            f"rank {rank}{_node_of(folder, rank)} - {type(error).__name__}: {why}")


def _node_of(folder: Path, rank: int) -> str:
    try:
        node = json.loads((folder / f"node-{rank}").read_text())
    except (OSError, ValueError):
        return ""
    return f" on node {node['ip']} ({node['host']}, pid {node['pid']})"


# --- on each worker ----------------------------------------------------------------------------------------------------


def _worker_loop(attempt: Attempt, localize: Localize | None) -> Callable[[dict[str, Any]], None]:
    def train_loop_per_worker(config: dict[str, Any]) -> None:
        worker_main(config, attempt, localize)

    return train_loop_per_worker


def on_this_node(job: Job, localize: Localize | None) -> Job:
    """The job with inputs and out folder this node can use (see the module docstring); as is without `localize` (the
    step was not run by the executor: every path is taken to be reachable)."""
    if localize is None:
        return job
    inputs = {name: localize(job.placement, name, path) if name in job.placement.sources else path
              for name, path in job.inputs.items()}
    out = job.out if job.out.is_dir() else localize(job.placement, None, None)
    (out / LAUNCH).mkdir(parents=True, exist_ok=True)
    return replace(job, inputs=inputs, out=out)


def worker_main(config: dict[str, Any], attempt: Attempt, localize: Localize | None = None) -> None:
    """One Ray worker: the attempt a torchrun process runs, resuming from Ray's last checkpoint after a restart."""
    import ray.train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format=f"[ray rank {rank}] %(levelname)s %(name)s: %(message)s")
    driver = Job.from_json(config["job"])
    try:
        job = on_this_node(driver, localize)
    except StageError as exc:  # an input that cannot reach this node: it would only fail again after a restart
        if driver.out.is_dir():
            report_failure(driver, rank, exc)
        raise
    folder = job.out / LAUNCH
    if worker_failure(folder):
        return  # a failure that would only repeat was reported before this restart: the driver acts on it
    (folder / f"node-{rank}").write_text(json.dumps(
        {"ip": ray.util.get_node_ip_address(), "host": socket.gethostname(), "pid": os.getpid()}))
    if context.get_local_rank() == 0:
        drop_incomplete_checkpoints(job.out / CHECKPOINTS)  # a killed worker may have been saving
    checkpoint = ray.train.get_checkpoint()
    try:
        callbacks = [ReportCheckpoints(own_folder=job.out != driver.out)]
        if checkpoint is None:
            metrics = attempt(job, callbacks=callbacks)
        else:
            with checkpoint.as_directory() as path:
                metrics = attempt(job, callbacks=callbacks, resume=newest(Path(path), job.out / CHECKPOINTS))
    except (OutOfMemory, StageError) as exc:
        report_failure(job, rank, exc)
        raise
    if localize is not None:
        # every rank reports (Ray's report is collective, so the condition is the same on all); rank 0 attaches the
        # outputs when the driver cannot see its folder
        ship_outputs(job, driver, rank, metrics)
    if job.out != driver.out:  # reported: this node's folder only served the run
        shutil.rmtree(job.out, ignore_errors=True)
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # leave together; Ray's backend destroys the process group


def ship_outputs(job: Job, driver: Job, rank: int, metrics: dict[str, Any]) -> None:
    """Hand the finished outputs to Ray as the run's last checkpoint (named FINAL) when rank 0 wrote them in a folder
    the driver cannot see: the driver downloads it from Ray's storage into its out folder."""
    import ray.train

    shipped = rank == 0 and job.out != driver.out
    staging = job.out.parent / FINAL
    if shipped:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(job.out, staging, ignore=lambda folder, names: [n for n in names if Path(folder) == job.out and
                                                                          n in (CHECKPOINTS, LAUNCH, RAY_STORAGE)])
    checkpoint = ray.train.Checkpoint.from_directory(str(staging)) if shipped else None
    ray.train.report({"step": metrics.get("steps", 0), "final": 1}, checkpoint=checkpoint, checkpoint_dir_name=FINAL)
    if shipped:
        shutil.rmtree(staging, ignore_errors=True)


def newest(reported: Path, local: Path) -> Path:
    """Ray's last checkpoint, unless the out folder holds a newer complete one (saved, then killed before reporting)."""
    here = resume_point(local)
    return here if here is not None and _step(here) > _step(reported) else reported


def _step(checkpoint: Path) -> int:
    if not is_complete(checkpoint):
        return -1
    return int(json.loads((checkpoint / "trainer_state.json").read_text()).get("global_step", -1))


class ReportCheckpoints(TrainerCallback):
    """After each Trainer save, hand the checkpoint to Ray (as Ray's RayTrainReportCallback does): rank 0 reports the
    folder, once every rank has written its part of it (rank 0 the weights and optimizer, each rank its RNG state).
    On a node that works in a folder of its own (`own_folder`: it does not see the driver's), that node's first worker
    reports its folder too, which holds its ranks' RNG states: Ray merges every rank's files into one checkpoint."""

    def __init__(self, own_folder: bool = False):
        self.own_folder = own_folder

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
        import ray.train
        import torch.distributed

        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        name = f"checkpoint-{state.global_step}"
        path = Path(args.output_dir) / name
        metrics = {"step": state.global_step, **{k: v for k, v in state.log_history[-1].items() if k != "step"}}
        context, checkpoint = ray.train.get_context(), None
        if (context.get_world_rank() == 0 and is_complete(path)) or (
                self.own_folder and context.get_world_rank() != 0 and context.get_local_rank() == 0 and path.is_dir()):
            checkpoint = ray.train.Checkpoint.from_directory(str(path))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        return control
