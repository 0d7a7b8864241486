"""runner.hardware.hwcheck without a GPU: its own exit code, and result files a CI system can read."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from runner.hardware import hwcheck
from runner.hardware.hwcheck import NO_GPU, Check, CheckFailed, run_check, write_results


def test_no_gpu_says_so_and_exits_with_its_own_code(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(hwcheck, "gpu_names", lambda: [])
    assert hwcheck.main(["--out", str(tmp_path)]) == NO_GPU == 3
    assert "no NVIDIA GPU" in capsys.readouterr().err
    document = json.loads((tmp_path / "hwcheck.json").read_text())
    assert document["exit_code"] == 3 and document["checks"][0]["status"] == "skipped"
    suite = ET.parse(tmp_path / "hwcheck-junit.xml").getroot().find("testsuite")
    assert suite.get("skipped") == "1" and suite.find("testcase/skipped") is not None


def test_checks_become_junit_cases_with_failures_and_errors(tmp_path):
    def fails():
        raise CheckFailed("adapter did not move", {"lora_B_max_abs": 0.0})

    checks = [run_check("smoke", "ok", lambda: {"x": 1}), run_check("smoke", "fails", fails),
              run_check("smoke", "breaks", lambda: 1 / 0), Check("doctor", "quickstart")]
    assert [c.status for c in checks] == ["passed", "failed", "error", "passed"]
    write_results(tmp_path, "cuda13", checks, "2026-11-29T00:00:00+00:00", 1)
    root = ET.parse(tmp_path / "hwcheck-junit.xml").getroot()
    suite = root.find("testsuite")
    assert (root.get("tests"), suite.get("failures"), suite.get("errors")) == ("4", "1", "1")
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert cases["fails"].find("failure").get("message") == "adapter did not move"
    assert "ZeroDivisionError" in cases["breaks"].find("error").get("message")
    assert cases["ok"].get("classname") == "hwcheck.smoke"
    document = json.loads((tmp_path / "hwcheck.json").read_text())
    assert document["passed"] is False and [c["name"] for c in document["checks"]] == ["ok", "fails", "breaks", "quickstart"]


def test_the_qlora_smoke_trains_a_4bit_adapter_on_cpu(tmp_path):
    """The CPU rehearsal of the GPU check's QLoRA smoke: 4-bit NF4, eval and generate first, then training must move
    the adapter and lower the eval loss (bitsandbytes' CPU inference layout used to cut every gradient here)."""
    details = hwcheck.check_qlora("cpu", 4, 4, tmp_path)
    assert details["bits"] == 4 and details["lora_B_max_abs"] > 0
    assert details["eval_loss_after"] < details["eval_loss_before"]


def test_an_old_driver_is_refused_before_anything_is_imported_or_installed(tmp_path):
    """envs/cuda13.in records `# min-driver: 580`: under a 550 driver hwcheck stops at once with exit 4, naming both
    versions, before torch is imported (a CUDA 13 torch could not see the GPU there)."""
    import os
    import subprocess
    import sys

    from .conftest import REPO, fake_nvidia_smi

    bin_dir = fake_nvidia_smi(tmp_path / "bin", "550.54.15")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    code = ("import sys, runner.hwcheck as h; rc = h.main(['--env', 'cuda13', '--out', sys.argv[1]]); "
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == hwcheck.OLD_DRIVER == 4, done.stderr
    assert "needs NVIDIA driver >= 580" in done.stderr and "this machine has 550.54.15" in done.stderr
    assert "torch not imported" in done.stdout
    document = json.loads((tmp_path / "out" / "hwcheck.json").read_text())
    assert [(c["name"], c["status"]) for c in document["checks"]] == [("driver", "failed")]


def test_a_new_enough_driver_passes_the_driver_check(tmp_path, monkeypatch):
    from runner.hardware.driver import driver_problem, min_driver

    assert min_driver("cuda13") == "580" and min_driver("cpu") is None
    assert driver_problem("cuda13", "580.65.06") is None and driver_problem("cuda13", "590.1") is None
    assert "550.54.15" in driver_problem("cuda13", "550.54.15")
    assert driver_problem("cpu", "450.1") is None  # a CPU env needs no driver


def test_the_cpu_rehearsal_judges_cuda_recipes_against_a_gpu_profile_and_skips_absent_models(tmp_path, monkeypatch):
    """On a machine without a GPU, llama2_lora (requires cuda) is judged against the named profile, not this machine;
    a recipe whose local model is not here is a skipped case: neither is a failure of the machine."""
    from functools import partial

    from .conftest import REPO

    monkeypatch.setattr(hwcheck.shutil, "which", lambda name: None)  # the doctor in-process (same function as the CLI)
    llama2 = REPO / "recipes" / "llama2_lora.yaml"
    assert hwcheck.needs_cuda(llama2) and not hwcheck.needs_cuda(REPO / "recipes" / "tiny_llama_lora.yaml")
    judged = run_check("doctor", "llama2_lora@a100-40gb", partial(hwcheck.check_doctor, llama2, tmp_path, "a100-40gb"))
    assert judged.status == "passed" and judged.details["machine"] == "NVIDIA A100 40 GB" and judged.details["fits"]
    absent = tmp_path / "absent.yaml"
    absent.write_text("name: absent\nmodel: {path: not-here, task: causal-lm}\ndata:\n  source: {rows: {q: [a, b, c, d]}}\n"
                      "  template: '{q}'\ntrain: {method: lora, lora: {r: 4, target_modules: [q_proj]}}\n")
    skipped = run_check("doctor", "absent", partial(hwcheck.check_doctor, absent, tmp_path))
    assert skipped.status == "skipped" and skipped.message.startswith("model not present: ")
