"""A real one-node Ray cluster for tests/test_ray_train.py and bench/ray_overhead.py, in namespaces of its own.

Left alone, Ray advertises the machine's first non-loopback address and sends traffic to it (design.md, 2026-12-06). So
`ray start --head` runs inside a new network namespace with only loopback up, and a new PID namespace: the processes
that talk to the cluster (the train step's driver) join both with `nsenter`. Stopping is by process ID: killing the
namespace's first process (a `sleep` holding it open) makes the kernel end every Ray process in it; no `ray stop`, no
kill by name.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PORT = 6379  # the namespace has nothing else listening
START_TIMEOUT_S = 90


def ray_cli() -> list[str]:
    """`ray` through this interpreter, so Ray's workers run the same Python, packages and PYTHONPATH as we do."""
    return [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()"]


def namespaces_available() -> str | None:
    """Why the cluster cannot be started here, or None."""
    if os.geteuid() != 0:
        return "needs root for unshare/nsenter (network and PID namespaces)"
    missing = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    return f"needs {', '.join(missing)}" if missing else None


@dataclass
class Cluster:
    holder: subprocess.Popen  # `unshare`, whose child is PID 1 of the namespaces
    init_pid: int  # that child, as this machine sees it
    temp: Path
    started_s: float

    @property
    def address(self) -> str:
        return f"127.0.0.1:{PORT}"

    def command(self, argv: list[str], mounts: bool = True) -> list[str]:
        """argv run inside the cluster's network, PID and mount namespaces (`mounts=False`: a copy of this machine's
        mounts with the cluster's /proc, so a folder the cluster's mount namespace covers stays visible to argv)."""
        enter = ["nsenter", f"--target={self.init_pid}", "--net", "--pid"]
        if not mounts:
            return [*enter, f"--wd={os.getcwd()}", "unshare", "--mount-proc", *argv]
        return [*enter, "--mount", f"--wd={os.getcwd()}", *argv]

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 600,
            mounts: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv, mounts), env=env, capture_output=True, text=True, timeout=timeout)

    def popen(self, argv: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), env=env, **kwargs)

    def stop(self) -> None:
        """SIGKILL to the namespace's first process ends every process in it (Ray's included)."""
        try:
            os.kill(self.init_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.holder.wait(timeout=30)
        shutil.rmtree(self.temp, ignore_errors=True)


def start(num_cpus: int = 2, env: dict[str, str] | None = None) -> Cluster:
    """`ray start --head` with `num_cpus` CPUs, a 100 MB object store and no dashboard, in fresh namespaces."""
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's unix socket paths live under it
    ready = temp / "ready"
    cli = shlex.join(ray_cli())
    script = (
        "set -e; ip link set lo up; "
        f"{cli} start --head --num-cpus={num_cpus} --include-dashboard=false --disable-usage-stats "
        f"--node-ip-address=127.0.0.1 --port={PORT} --object-store-memory=100000000 --temp-dir={temp} "
        f"> {temp}/start.log 2>&1; touch {ready}; exec sleep infinity"
    )
    began = time.perf_counter()
    holder = subprocess.Popen(["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", script],
                              env=env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.exists():
        if holder.poll() is not None or time.monotonic() > deadline:
            log = (temp / "start.log").read_text() if (temp / "start.log").exists() else ""
            if holder.poll() is None:
                holder.kill()
            shutil.rmtree(temp, ignore_errors=True)
            raise RuntimeError(f"ray start did not come up: {log[-2000:]}")
        time.sleep(0.1)
    children = Path(f"/proc/{holder.pid}/task/{holder.pid}/children").read_text().split()
    return Cluster(holder=holder, init_pid=int(children[0]), temp=temp, started_s=time.perf_counter() - began)
