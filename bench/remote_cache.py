"""P12: the remote cache against a real S3 server (SeaweedFS `weed mini` on loopback), side by side in one run.

    python bench/remote_cache.py [--recipe quickstart] [--large-mb 2048] [--json bench/results/p10.json]
    python bench/remote_cache.py --smoke        (a minute: the test recipe with the test-only stages, a 32 MB file)

Three figures:
- transfer: push + pull of a run's entries (runner.store.remote, in this process) vs a plain s3fs put + get of the
  same files (same server, same bytes, s3fs's own batching); ratio = plain / ours, target >= 0.8 (hashing, existence
  checks and manifests cost at most 20%); `recipe pull` as a user types it (planning included) is reported beside;
- pulled run: `recipe run --pull` into an empty cache vs the cold run, in wall time; target <= 0.05;
- memory: the RSS a process gains while it pulls one large file (default 2 GB); target < 200 MB.
The quickstart runs with reduced overrides (QUICK: 1,200 rows, one epoch) unless --overrides says
otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from common import figure, save  # noqa: E402

from tests import seaweed  # noqa: E402

QUICK = ["data.select=1200", "train.epochs=1", "train.learning_rate=1e-4"]


def recipe_cli(smoke: bool) -> list[str]:
    # --smoke: the test-only stages (tests/fake_stages.py) behind the same CLI; real stages otherwise
    return [sys.executable, "-m", "tests.fake_stages" if smoke else "runner.cli"]


def timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def entry_files(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "entries").rglob("*") if p.is_file() and "outputs" in p.parts)


# The peak RSS of this process's own memory (VmHWM): getrusage's ru_maxrss would start at the forking parent's peak,
# which Linux carries across exec.
PULL_ONE = """
import sys, time
from pathlib import Path
from runner.store.local import Cache
from runner.store.remote import Remote

def peak():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

url, root, key = sys.argv[1:]
remote, cache = Remote(url), Cache(Path(root))
remote.manifest("train", key)  # connections and imports warm before the baseline
before = peak()
start = time.perf_counter()
pulled = remote.pull(cache, "train", key)
seconds = time.perf_counter() - start
assert pulled.entry is not None, pulled.refused
print(before, peak(), seconds)
"""


def large_file_rss(url: str, env: dict[str, str], tmp: Path, megabytes: int) -> dict[str, float]:
    """Push one file of `megabytes` (random bytes), then pull it in a fresh process: its peak RSS growth."""
    from runner.store.local import Cache
    from runner.store.remote import Remote

    cache = Cache(tmp / "large-source")
    key = os.urandom(12).hex()
    out = cache.workdir("train", key, keep=False)
    with open(out / "weights.bin", "wb") as handle:
        for _ in range(megabytes):
            handle.write(os.urandom(1 << 20))
    cache.commit("train", key, out, {"kind": "train", "key": key, "metrics": {}})
    start = time.perf_counter()
    Remote(url).push(cache, cache.entry("train", key))
    push_s = time.perf_counter() - start
    shutil.rmtree(tmp / "large-source")  # the disk holds the server's copy and the pulled one, not a third
    done = subprocess.run([sys.executable, "-c", PULL_ONE, url, str(tmp / "large-target"), key], env=env,
                          capture_output=True, text=True, check=True)
    before, after, pull_s = (float(x) for x in done.stdout.split())
    shutil.rmtree(tmp / "large-target")
    return {"file_mb": megabytes, "rss_before_mb": before / 2**20, "rss_peak_mb": after / 2**20,
            "rss_growth_mb": (after - before) / 2**20, "push_s": push_s, "pull_s": pull_s,
            "pull_mb_s": megabytes / pull_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--overrides", nargs="*", default=QUICK)
    parser.add_argument("--large-mb", type=int, default=2048)
    parser.add_argument("--smoke", action="store_true", help="the test recipe and test-only stages, a 32 MB file")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.recipe, args.overrides, args.large_mb = "core", [], 32
    with tempfile.TemporaryDirectory(prefix="bench-remote-") as name:
        tmp = Path(name)
        server = seaweed.start(tmp / "seaweed")
        try:
            path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
            env = {**os.environ, **server.env, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
            os.environ.update(server.env)
            result = measure(args, env, tmp, server)
        finally:
            server.stop()
    report(result)
    save(args.json, {"P12": result})
    figure("P12", f"remote cache: s3fs put + get / our push + pull (pulled run / cold run {result['pulled_run_ratio']:.4f}, "
           f"RSS growth pulling {result['large_file']['file_mb']} MB {result['large_file']['rss_growth_mb']:.0f} MB, "
           f"verify exit {result['verify_exit']})", result["transfer_ratio"], ">= 0.8, pulled run <= 0.05, RSS < 200 MB",
           result["met"])
    return 0 if result["met"] else 1


def measure(args: argparse.Namespace, env: dict[str, str], tmp: Path, server: seaweed.Seaweed) -> dict:
    import fsspec

    from runner.store.local import Cache
    from runner.store.remote import Remote

    cli = recipe_cli(args.smoke)
    recipe = [args.recipe, *args.overrides]
    url = f"s3://{seaweed.BUCKET}/bench"
    # two clones (copies of recipes/ at two paths), each with its own cache: A runs cold, B pulls
    clone_a, clone_b = tmp / "A", tmp / "B"
    for clone in (clone_a, clone_b):
        if args.smoke:
            (clone / "recipes").mkdir(parents=True)
            for name in ("core.yaml", "reviews.csv"):
                shutil.copy(ROOT / "tests/recipes" / name, clone / "recipes" / name)
        else:
            shutil.copytree(ROOT / "recipes", clone / "recipes", ignore=shutil.ignore_patterns("*.lock"))
    runs = ["--runs-dir", str(tmp / "runs")]
    cold_s = timed([*cli, "run", *recipe, "--cache-dir", str(tmp / "a"), *runs], env, clone_a)
    timed([*cli, "lock", *recipe, "--cache-dir", str(tmp / "a")], env, clone_a)
    # Transfers timed in this process, imports and planning left out on both sides: ours (every entry of the run,
    # pushed, then pulled into an empty cache) against plain s3fs put + get of the same files (its own batching)
    source = Cache(tmp / "a")
    entries = source.entries()
    files = entry_files(tmp / "a")
    plain = fsspec.filesystem("s3", skip_instance_cache=True, config_kwargs={
        "request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"})
    targets = [f"{seaweed.BUCKET}/plain/{i}" for i in range(len(files))]
    start = time.perf_counter()
    plain.put([str(p) for p in files], targets)
    plain_put_s = time.perf_counter() - start
    (tmp / "plain-get").mkdir()
    start = time.perf_counter()
    plain.get(targets, [str(tmp / "plain-get" / str(i)) for i in range(len(files))])
    plain_get_s = time.perf_counter() - start
    remote = Remote(url)
    start = time.perf_counter()
    for entry in entries:
        remote.push(source, entry)
    push_s = time.perf_counter() - start
    target = Cache(tmp / "b")
    start = time.perf_counter()
    for entry in entries:
        assert remote.pull(target, entry.kind, entry.key).entry is not None
    pull_s = time.perf_counter() - start
    # the commands as a user types them (planning included), and a run that pulls everything
    cli_pull_s = timed([*cli, "pull", *recipe, "--remote", url, "--cache-dir", str(tmp / "d")], env, clone_b)
    pulled_run_s = timed([*cli, "run", *recipe, "--pull", "--remote", url, "--cache-dir", str(tmp / "c"), *runs], env,
                         clone_b)
    pulled = json.loads((tmp / "runs" / Path(args.recipe).stem / "latest" / "run.json").read_text())
    lock = f"recipes/{Path(args.recipe).stem}.lock"
    shutil.copy(clone_a / lock, clone_b / lock)
    verify = subprocess.run([*cli, "verify", *recipe, "--cache-dir", str(tmp / "c")], cwd=clone_b, env=env,
                            capture_output=True, text=True)
    objects = plain.find(f"{seaweed.BUCKET}/bench/objects")
    total = sum(p.stat().st_size for p in files)
    transfer_ratio = (plain_put_s + plain_get_s) / (push_s + pull_s)
    pulled_ratio = pulled_run_s / cold_s
    memory = large_file_rss(f"s3://{seaweed.BUCKET}/bench-large", env, tmp, args.large_mb)
    met = transfer_ratio >= 0.8 and pulled_ratio <= 0.05 and memory["rss_growth_mb"] < 200 and verify.returncode == 0
    return {
        "recipe": " ".join(recipe), "smoke": args.smoke, "entries": len(entries), "entry_files": len(files),
        "objects": len(objects), "bytes": total, "cold_run_s": cold_s, "push_s": push_s, "pull_s": pull_s,
        "plain_put_s": plain_put_s, "plain_get_s": plain_get_s, "transfer_ratio": transfer_ratio,
        "cli_pull_s": cli_pull_s, "pulled_run_s": pulled_run_s, "pulled_run_ratio": pulled_ratio, "large_file": memory,
        "pulled_run_statuses": [step["status"] for step in pulled["steps"]], "verify_exit": verify.returncode,
        "verify_summary": verify.stdout.strip().splitlines()[-1:],
        "targets": {"transfer_ratio": ">= 0.8", "pulled_run_ratio": "<= 0.05", "rss_growth_mb": "< 200"}, "met": met,
    }


def report(r: dict) -> None:
    mb = r["bytes"] / 2**20
    large = r["large_file"]
    print(f"P12 remote cache ({r['recipe']}: {r['entry_files']} files, {mb:.1f} MB, {r['objects']} objects)")
    print("| figure | ours | plain / cold | ratio | target |\n|---|---|---|---|---|")
    print(f"| push + pull vs s3fs put + get | {r['push_s']:.2f} + {r['pull_s']:.2f} s | "
          f"{r['plain_put_s']:.2f} + {r['plain_get_s']:.2f} s | {r['transfer_ratio']:.3f} | >= 0.8 |")
    print(f"| pulled run vs cold run | {r['pulled_run_s']:.2f} s | {r['cold_run_s']:.1f} s | "
          f"{r['pulled_run_ratio']:.4f} | <= 0.05 |")
    print(f"| RSS growth pulling {large['file_mb']} MB | {large['rss_growth_mb']:.1f} MB (peak {large['rss_peak_mb']:.0f} "
          f"MB) | - | - | < 200 MB (pull {large['pull_mb_s']:.0f} MB/s) |")
    print(f"`recipe pull` as typed (planning included): {r['cli_pull_s']:.1f} s")
    print(f"clone B's pulled run: {', '.join(r['pulled_run_statuses'])}; `recipe verify` with clone A's lock: exit "
          f"{r['verify_exit']} ({' '.join(r['verify_summary'])})")


if __name__ == "__main__":
    raise SystemExit(main())
