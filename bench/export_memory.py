"""Export/quantize memory: the doctor's estimate (runner/hardware/export_memory.py) against the measured peak RSS of the real
135M model's export and quantize steps, each run in a fresh process on the cached inputs of a finished smollm2_lora run.

    python bench/export_memory.py [--run runs/smollm2_lora/<stamp>/run.json] [--json out.json]
    python bench/export_memory.py --smoke     # the tiny_llama_lora recipe's steps (one epoch): seconds (not the figure)

Measured: the step process's own peak RSS and its largest child's (the builder), from getrusage. The phases of a step
do not overlap in time (the runner frees its copy before the builder starts), so the step's peak is the larger of the
two; the estimate is compared with that. Then it prints the estimate for llama2_lora (6.7B) against its min_ram_gb.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, TINY_LM, TINY_LM_SMOKE, figure, recipe_outputs, save

GIB = 1024**3
CHILD = """
import json, resource, sys
from pathlib import Path
from runner.stages import STAGES
import importlib
kind, config, inputs, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4])
stage = importlib.import_module(STAGES[kind].module)
stage.run(config, {k: Path(v) for k, v in inputs.items()}, out)
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"self": own, "child": child}))
"""


def latest_run() -> Path:
    runs = sorted((ROOT / "runs" / "smollm2_lora").glob("*/run.json"))
    if not runs:
        raise SystemExit("no smollm2_lora run: `nox -s real_lm` (or `recipe run smollm2_lora`) first, or --smoke")
    return runs[-1]


def model_size(folder: Path) -> tuple[int, int]:
    """Parameters (from the safetensors header: no weights read) and vocabulary of a transformers folder."""
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as weights:
        params = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118
    return params, json.loads((folder / "config.json").read_text())["vocab_size"]


def measure(kind: str, config: dict, inputs: dict[str, str]) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, "-c", CHILD, kind, json.dumps(config), json.dumps(inputs), out],
                              capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                                                            "PATH": "/usr/bin:/bin"})
    if done.returncode:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    from runner.hardware.export_memory import export_memory, quantize_memory
    from runner.hardware.probe import load_profile
    from runner.hardware.verdict import check

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--smoke", action="store_true", help="the tiny_llama_lora recipe's cached steps (one epoch, run "
                        "here if not cached): checks the bench runs")
    args = parser.parse_args()
    from runner.recipe import find_recipe, load_recipe

    if args.smoke:
        outputs = {k: str(v) for k, v in recipe_outputs(TINY_LM, TINY_LM_SMOKE, "quantize").items()}
        recipe_name = TINY_LM
    else:
        outputs = {s["kind"]: s["outputs"] for s in json.loads((args.run or latest_run()).read_text())["steps"]}
        recipe_name = "smollm2_lora"
    def config(kind: str) -> dict:  # exactly what the step ran with: its manifest in the cache entry
        return json.loads((Path(outputs[kind]).parent / "manifest.json").read_text())["config"]

    export_inputs = {"data": outputs["data"], "train": outputs["train"]}
    if "model" in outputs:  # a model step (model.init, model.gguf_file): export merges the adapter into its output
        export_inputs["model"] = outputs["model"]
    measured_export = measure("export", config("export"), export_inputs)
    quantize_inputs = {"data": outputs["data"], "export": outputs["export"]}
    measured_quantize = measure("quantize", config("quantize"), quantize_inputs)

    seq = load_recipe(find_recipe(recipe_name, ROOT / "recipes")).recipe.data.max_length
    params, vocab = model_size(Path(outputs["export"]) / "merged")
    estimated_export = export_memory(params, vocab, seq, "fp32", "cpu")
    estimated_quantize = quantize_memory(params, "fp32", 8, "cpu")
    rows = []
    for name, measured, estimated in (("export", measured_export, estimated_export),
                                      ("quantize", measured_quantize, estimated_quantize)):
        peak = max(measured.values())
        rows.append({"step": name, "measured_self_gib": measured["self"] / GIB, "measured_child_gib": measured["child"] / GIB,
                     "measured_peak_gib": peak / GIB, "estimated_peak_gib": estimated.peak_bytes / GIB,
                     "error": estimated.peak_bytes / peak - 1, "estimated_phases_gib":
                     {k: v / GIB for k, v in estimated.phases.items()}})
        print(f"{name:9} measured peak {peak / GIB:.2f} GiB (runner {measured['self'] / GIB:.2f}, builder "
              f"{measured['child'] / GIB:.2f}); estimate {estimated.peak_bytes / GIB:.2f} GiB "
              f"({estimated.peak_bytes / peak - 1:+.1%})")
    llama = load_recipe(find_recipe("llama2_lora", ROOT / "recipes")).recipe
    verdict = check(llama, load_profile("a100-40gb"))
    llama_rows = [{"step": s.step, "peak_gib": s.peak_gib, "phases_gib": {k: v / GIB for k, v in s.phases.items()}}
                  for s in verdict.step_memory]
    for row in llama_rows:
        print(f"llama2_lora {row['step']}: estimated peak {row['peak_gib']:.1f} GiB "
              f"(min_ram_gb {llama.requires.min_ram_gb:g})")
    save(args.json, {"figure": "export memory", "recipe": recipe_name, "rows": rows, "llama2_lora": llama_rows})
    worst = max((row["error"] for row in rows), key=abs)
    figure("EXPMEM", f"{recipe_name} export/quantize peak RSS, estimate vs measured (worst of the two)", 100 * worst,
           "none", None, unit="%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
