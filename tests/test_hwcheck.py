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
