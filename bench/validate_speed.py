"""P3: `recipe validate` wall time as a ratio of `python -c "import torch"`, measured side by side in one run.

    python bench/validate_speed.py [--repeat 7] [--recipe recipes/quickstart.yaml] [--json bench/results/p3.json]
    python bench/validate_speed.py --smoke          # one round: seconds, for the test suite

Each round runs both commands once, alternating, as fresh processes; the medians are compared. Target: ratio <= 0.3.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from common import figure, save, timed  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--recipe", default="recipes/quickstart.yaml")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="one round (seconds); not a figure to report")
    args = parser.parse_args()
    if args.smoke:
        args.repeat = 1
    validate = [sys.executable, "-m", "runner.cli", "validate", args.recipe]
    torch = [sys.executable, "-c", "import torch"]
    timed(validate), timed(torch)  # warm the file-system cache for both
    times: dict[str, list[float]] = {"validate": [], "import torch": []}
    for _ in range(args.repeat):
        times["validate"].append(timed(validate))
        times["import torch"].append(timed(torch))
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["validate"] / medians["import torch"]
    result = {"P3": {"validate_s": medians["validate"], "import_torch_s": medians["import torch"], "ratio": ratio,
                     "target": 0.3, "met": ratio <= 0.3, "repeat": args.repeat}}
    print("| figure | validate (s) | import torch (s) | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| P3 | {medians['validate']:.3f} | {medians['import torch']:.3f} | {ratio:.3f} | <= 0.3 |")
    save(args.json, result)
    figure("P3", "validate / import torch", ratio, "<= 0.3", ratio <= 0.3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
