"""Merge the benchmark JSON files of one `nox -s bench` run into bench/results/summary.md (and summary.json).

    python bench/summary.py bench/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info  # noqa: E402


def _get(data: dict, *path: str):
    for part in path:
        data = data.get(part, {}) if isinstance(data, dict) else {}
    return data if data != {} else None


def rows(results: Path) -> list[tuple[str, str, str, str]]:
    def load(name: str) -> dict:
        file = results / name
        return json.loads(file.read_text()) if file.is_file() else {}

    p1, p2, p3 = load("p1.json").get("P1", {}), load("p2.json").get("P2", {}), load("p3.json").get("P3", {})
    out = []
    if p1:
        ratios, extra = p1["ratios"], p1["fixed_overhead_s"]
        out.append(("P1 train: runner / by hand", f"{ratios['runner']:.3f} ({extra['runner']:+.1f} s)", "<= 1.03",
                    str(p1["met"])))
        side = "runner, eval_before_training=false"
        if side in ratios:  # not measured by `--smoke`
            out.append((f"P1 ({side}) / by hand", f"{ratios[side]:.3f} ({extra[side]:+.1f} s)", "-", "-"))
    if p2:
        out.append(("P2 quickstart: cached / cold", f"{p2['ratio']:.4f} ({p2['cached_s']:.2f} s)", "<= 0.03, <= 2 s",
                    str(p2["met"])))
    if p3:
        out.append(("P3 validate / import torch", f"{p3['ratio']:.3f}", "<= 0.3", str(p3["met"])))
    p4 = load("p4.json")
    ratio = _get(p4, "int8_over_torch_p50")
    if ratio is not None:
        out.append(("P4 ORT int8 / torch fp32 p50", f"{ratio:.3f}", "<= 0.15", str(ratio <= 0.15)))
        gemm = _get(p4, "int8_gemm")
        if gemm:
            out.append(("P4 floor: int8 matmul kernels alone / torch fp32 p50", f"{gemm['ratio_to_torch_p50']:.3f}", "-",
                        "-"))
    p5 = load("p5.json")
    ratio = _get(p5, "ratio")
    if ratio is not None:
        out.append(("P5 throughput batching / none (c=16)", f"{ratio:.2f}", ">= 1.5", str(ratio >= 1.5)))
        ceiling = _get(p5, "inference_ceiling")
        if ceiling:
            out.append(("P5 ceiling: ONNX Runtime alone, batches / concurrent singles", f"{ceiling['ratio']:.2f}", "-",
                        "-"))
    p6 = load("p6.json")
    errors = [row[mode]["error"] for row in p6.get("rows", []) for mode in ("pinned", "glibc") if mode in row]
    worst = max(errors, key=abs) if errors else None
    if worst is not None:
        out.append(("P6 memory estimate vs measured (worst)", f"{worst:+.1%}", "within ±15%", str(abs(worst) <= 0.15)))
    p8 = load("p8.json")
    if p8:
        out.append(("P8 packing / padded, non-pad tokens/s (ceiling C)", f"{p8['ratio']:.2f} (C {p8['ceiling']:.2f})",
                    ">= 0.9 x C", str(p8["met"])))
    p12 = load("p12.json").get("P12", {})
    if p12:
        out.append(("P12 remote: s3fs put+get / push+pull", f"{p12['transfer_ratio']:.3f}", ">= 0.8",
                    str(p12["transfer_ratio"] >= 0.8)))
        out.append(("P12 remote: pulled run / cold run", f"{p12['pulled_run_ratio']:.4f}", "<= 0.05",
                    str(p12["pulled_run_ratio"] <= 0.05)))
        large = p12["large_file"]
        out.append((f"P12 remote: RSS growth pulling {large['file_mb']} MB", f"{large['rss_growth_mb']:.0f} MB",
                    "< 200 MB", str(large["rss_growth_mb"] < 200)))
    p10_dpo = load("p10_dpo.json").get("P10")
    if p10_dpo:
        out.append(("P10 dpo overhead: runner / TRL by hand (median step)", f"{p10_dpo['ratio']:.3f}", "<= 1.03",
                    str(p10_dpo["met"])))
    return out


def main() -> int:
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
    table = rows(results)
    lines = ["| figure | measured | target | met |", "|---|---|---|---|"] + [f"| {' | '.join(r)} |" for r in table]
    machine = machine_info()
    text = "\n".join(["# Benchmarks", "", *lines, "", f"Machine: {json.dumps(machine)}", ""])
    (results / "summary.md").write_text(text)
    (results / "summary.json").write_text(json.dumps({"rows": table, "machine": machine}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
