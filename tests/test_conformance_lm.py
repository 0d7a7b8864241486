"""The causal-LM benches, `nox -s forgetting`, `nox -s fuzz` and the server stress of `nox -s faults`, as a user runs them
at their `--smoke` sizes.

First `nox -s recipe -- tiny_llama_lora` (the causal-LM path through every stage) at the size the LM benches' `--smoke`
uses (bench/common.py TINY_LM_SMOKE): decode_speed.py (P9), lm_quant_sweep.py and export_memory.py then find its steps in
the clone's cache ($RECIPE_CACHE) and run on them, so the file trains and exports one tiny LM. Without --smoke they use the real SmolLM2 (the smollm2_lora recipe's model step), as `nox -s real_lm` does.
A file of its own (tests/conformance.py says why).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.conformance import REPO, bench, copy_checkout, figure, recipe, sh

sys.path.insert(0, str(REPO / "bench"))
from common import TINY_LM, TINY_LM_SMOKE  # noqa: E402 - bench/common.py: the size the LM benches' --smoke runs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return copy_checkout(tmp_path_factory.mktemp("clone"))


def test_tiny_llama_lora_serves_generation_probes(clone):
    """The shipped causal-LM recipe end to end: LoRA learns, the ONNX decoder passes its validation, the server answers
    every /generate probe."""
    recipe(clone, "run", TINY_LM, *TINY_LM_SMOKE)
    run = json.loads((clone / "runs" / TINY_LM / "latest" / "run.json").read_text())
    assert [(s["kind"], s["status"]) for s in run["steps"]] == [
        (kind, "ran") for kind in ("model", "data", "train", "export", "quantize", "evaluate", "serve")]
    outputs = {s["kind"]: Path(s["outputs"]) for s in run["steps"]}
    train = json.loads((outputs["train"] / "metrics.json").read_text())
    assert train["eval_loss"] < train["eval_loss_before"]
    assert json.loads((outputs["export"] / "export_report.json").read_text())["validation"]["passed"]
    serve = json.loads((outputs["serve"] / "serve_report.json").read_text())
    assert serve["passed"] and serve["probes"] and all(probe["passed"] for probe in serve["probes"])


def test_lm_quant_sweep_prints_the_default_weight_only_loss_increase(clone, tmp_path):
    """`python bench/lm_quant_sweep.py`: candidates quantized with the quantize stage's gates, the default's figure."""
    increase = figure(bench(clone, "lm_quant_sweep.py", "--smoke", "--json", str(tmp_path / "sweep.json")), "LMQ")
    assert abs(increase) < 5  # int8 weights, block 32: the tiny recipe ships a 1% gate and measured +0.02%
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [(r["bits"], r["algorithm"]) for r in rows] == [(8, "default"), (4, "k_quant")]
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_decode_speed_prints_p9(clone, tmp_path):
    """`nox -s real_lm`'s P9: served decode tokens/s against torch generate on the same model, same prompts."""
    ratio = figure(bench(clone, "decode_speed.py", "--smoke", "--json", str(tmp_path / "p9.json")), "P9")
    assert ratio > 0
    p9 = json.loads((tmp_path / "p9.json").read_text())
    assert re.fullmatch(r"[0-2]/2", p9["greedy_agreement"]) and p9["new_tokens"] == 32


def test_export_memory_compares_the_estimate_with_measured_peaks(clone, tmp_path):
    """`python bench/export_memory.py`: export and quantize in fresh processes, their peak RSS against the doctor's."""
    figure(bench(clone, "export_memory.py", "--smoke", "--json", str(tmp_path / "mem.json")), "EXPMEM")
    result = json.loads((tmp_path / "mem.json").read_text())
    assert [r["step"] for r in result["rows"]] == ["export", "quantize"]
    assert all(r["measured_peak_gib"] > 0.1 and r["estimated_peak_gib"] > 0 for r in result["rows"])  # a whole process


def test_forgetting_session_measures_with_and_without_l2sp(clone, tmp_path):
    """`nox -s forgetting`: bench/forgetting.py at --smoke (l2sp off and 0.1)."""
    out = bench(clone, "forgetting.py", "--smoke", "--cache-dir", str(clone / ".recipe-cache"), "--json",
                str(tmp_path / "forgetting.json"))
    figure(out, "forgetting")
    rows = json.loads((tmp_path / "forgetting.json").read_text())["rows"]
    assert [r["l2sp"] for r in rows] == [0.0, 0.1]
    assert rows[1]["l2sp_distance_logged"] is not None and rows[0]["distance"] > 0


def test_fuzz_session_runs_the_fuzzer_on_a_few_recipes(clone):
    """`nox -s fuzz`: the fuzzer's tests with FUZZ_EXAMPLES set (a handful here, 1,000 per property there)."""
    done = sh(clone, sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz_recipes.py",
              FUZZ_EXAMPLES="5")
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) >= 5 and "failed" not in done.stdout


def test_faults_session_stress_keeps_the_server_up(clone, tmp_path):
    """`nox -s faults`'s second part: bench/serve_stress.py (load, hostile bodies, schemathesis) finds no problem."""
    stress = sh(clone, sys.executable, "bench/serve_stress.py", "--smoke", "--json", str(tmp_path / "stress.json"))
    assert figure(stress.stdout, "stress") == 0
