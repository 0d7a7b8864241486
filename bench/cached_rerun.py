"""P2: a fully cached re-run of the quickstart vs its cold run, whole processes, side by side in one run.

    python bench/cached_rerun.py [--recipe recipes/quickstart.yaml] [--cached-runs 5] [--json bench/results/p2.json]
    python bench/cached_rerun.py --smoke     # the quickstart's data step alone, one cached run: seconds, for the suite

The cold run starts from an empty cache; the cached runs follow it (median taken). Targets: ratio <= 0.03 and <= 2 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import figure, save, timed  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--cached-runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true",
                        help="only the data step (`--until data`) of a 200-row quickstart, one cached run")
    args = parser.parse_args()
    extra = ["data.select=200", "--until", "data"] if args.smoke else []
    if args.smoke:
        args.cached_runs = 1
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "runner.cli", "run", args.recipe, "--cache-dir", f"{tmp}/cache",
                   "--runs-dir", f"{tmp}/runs", *extra]
        cold = timed(command, env)
        cached = statistics.median(timed(command, env) for _ in range(args.cached_runs))
    ratio = cached / cold
    met = ratio <= 0.03 and cached <= 2.0
    result = {"P2": {"cold_s": cold, "cached_s": cached, "ratio": ratio, "target": "<= 0.03 and <= 2 s", "met": met}}
    print("| figure | cold (s) | cached (s) | ratio | target |\n|---|---|---|---|---|")
    print(f"| P2 quickstart re-run | {cold:.1f} | {cached:.2f} | {ratio:.4f} | <= 0.03 and <= 2 s |")
    save(args.json, result)
    figure("P2", "cached re-run / cold run", ratio, "<= 0.03 and <= 2 s", met)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
