"""Two Ray "nodes" on this machine with no shared folder, for tests/test_ray_nodes.py.

Each node is a network namespace of its own (`ip netns add`), joined to the other by a veth pair with addresses we assign
(10.77.0.1 and 10.77.0.2, the link named `rn0` in both, loopback up): only these namespaces and loopback carry traffic.
Inside each, a PID and mount namespace (`unshare --pid --mount-proc`): killing its first process ends every process of
the node (Ray's, SeaweedFS's); and in its mount namespace the other node's folders are covered by an empty tmpfs, so
neither node can read what the other writes. Node A runs the Ray head; node B joins it as a worker node. Gloo is told to
use `rn0` (GLOO_SOCKET_IFNAME): it would otherwise pick the address this machine's host name resolves to.

Teardown (stop) kills each node's first process by PID, deletes the veth pair and both namespaces, even after a failure.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.ray_cluster import PORT, ray_cli

LINK = "rn0"
SUBNET = "10.77.0"
START_TIMEOUT_S = 120


def available() -> str | None:
    """Why two namespaced nodes cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root for ip netns, unshare and nsenter"
    missing = [tool for tool in ("ip", "unshare", "nsenter", "mount") if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)}"
    probe = f"rnprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


@dataclass
class Node:
    netns: str
    ip: str
    root: Path  # this node's own folder (cache, Ray's temp, logs); hidden from the other node
    holder: subprocess.Popen | None = None  # `ip netns exec ... unshare ...`, whose child is the node's first process
    init_pid: int = 0

    def command(self, argv: list[str]) -> list[str]:
        """argv run on this node: its network, PID and mount namespaces."""
        return ["nsenter", f"--target={self.init_pid}", "--net", "--pid", "--mount", f"--wd={os.getcwd()}", *argv]

    def run(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), env=env, capture_output=True, text=True, timeout=timeout)

    def popen(self, argv: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), env=env, **kwargs)

    @property
    def cache(self) -> Path:
        return self.root / "cache"


@dataclass
class Nodes:
    head: Node
    worker: Node
    base: Path
    made: list[str] = field(default_factory=list)  # namespaces created, deleted by stop()

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{PORT}"

    def stop(self) -> None:
        for node in (self.worker, self.head):
            if node.init_pid:
                try:
                    os.kill(node.init_pid, signal.SIGKILL)  # the kernel ends every process of the node's PID namespace
                except ProcessLookupError:
                    pass
            if node.holder is not None:
                try:
                    node.holder.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    node.holder.kill()
        for name in self.made:  # deleting a namespace deletes the veth end in it, and with it the pair
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def start(env: dict[str, str], cpus_per_node: int = 1) -> Nodes:
    """Node A (head, 10.77.0.1) and node B (worker node, 10.77.0.2), each with `cpus_per_node` CPUs for Ray."""
    tag = uuid.uuid4().hex[:6]
    base = Path(f"/tmp/rn{tag}")  # short: Ray's unix socket paths live under it
    head = Node(f"rn{tag}a", f"{SUBNET}.1", base / "a")
    worker = Node(f"rn{tag}b", f"{SUBNET}.2", base / "b")
    nodes = Nodes(head, worker, base)
    try:
        for node in (head, worker):
            node.root.mkdir(parents=True)
            node.cache.mkdir()
            _ip("netns", "add", node.netns)
            nodes.made.append(node.netns)
        # created inside A with its peer inside B: the pair never exists outside the two namespaces
        _ip("-n", head.netns, "link", "add", LINK, "type", "veth", "peer", "name", LINK, "netns", worker.netns)
        for node in (head, worker):
            _ip("-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", LINK)
            _ip("-n", node.netns, "link", "set", LINK, "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")
        cli = shlex.join(ray_cli())
        common = (f"--num-cpus={cpus_per_node} --disable-usage-stats --object-store-memory=100000000 "
                  f"--node-ip-address=")
        temp = head.root / "ray"  # Ray's temp folder, the same path on both nodes; B's is its own folder bound there
        _boot(head, worker, env, f"{cli} start --head {common}{head.ip} --port={PORT} --include-dashboard=false "
                                 f"--temp-dir={temp}")
        _boot(worker, head, env, f"{cli} start --address={nodes.address} {common}{worker.ip} --temp-dir={temp}",
              f"mkdir -p {temp} {worker.root / 'ray'}; mount --bind {worker.root / 'ray'} {temp}; ")
    except BaseException:
        nodes.stop()
        raise
    return nodes


def _boot(node: Node, other: Node, env: dict[str, str], ray_start: str, mounts: str = "") -> None:
    """Start the node's namespaces: hide the other node's folder, run `ray start`, then hold the namespaces open."""
    ready, log = node.root / "ready", node.root / "start.log"
    script = (f"set -e; mount -t tmpfs tmpfs {other.root}; {mounts}"
              f"{ray_start} > {log} 2>&1; touch {ready}; exec sleep infinity")
    node_env = {**env, "RECIPE_CACHE": str(node.cache), "GLOO_SOCKET_IFNAME": LINK}
    node.holder = subprocess.Popen(["ip", "netns", "exec", node.netns, "unshare", "--pid", "--fork", "--mount-proc",
                                    "bash", "-c", script], env=node_env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    own = os.readlink("/proc/self/ns/pid")
    while not node.init_pid:  # the first process down the holder's line that is in another PID namespace
        pid = node.holder.pid
        while pid and _pid_ns(pid) == own:
            pid = next(iter(_children(pid)), 0)
        node.init_pid = pid
        if node.holder.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"node {node.netns} did not start")
        time.sleep(0.05)
    while not ready.exists():
        if node.holder.poll() is not None or time.monotonic() > deadline:
            text = log.read_text() if log.exists() else ""
            raise RuntimeError(f"ray start on {node.netns} did not come up: {text[-2000:]}")
        time.sleep(0.1)


def _pid_ns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def python(node: Node, code: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """This interpreter running `code` on the node."""
    return node.run([sys.executable, "-c", code], env=env, timeout=timeout)
