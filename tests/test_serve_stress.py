"""The server under stress, small: schemathesis on the served /openapi.json, the bad-payload set, 500 requests at
concurrency 32, against real uvicorn servers in their own processes serving the tiny exported classifier and generator.

The same functions at full size are `python bench/serve_stress.py` (5,000 requests). schemathesis is a dev-only
dependency: without it the schemathesis tests skip, saying so; everything else runs with the pinned runtime packages.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.conftest import export_artifact

REPO = Path(__file__).resolve().parent.parent


def _load_bench():  # noqa: ANN202 - the bench module
    spec = importlib.util.spec_from_file_location("bench_serve_stress", REPO / "bench" / "serve_stress.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


stress = _load_bench()
SCHEMATHESIS = stress.schemathesis_available()
needs_schemathesis = pytest.mark.skipif(
    SCHEMATHESIS is None, reason="schemathesis is not importable here (a dev-only pin: envs/dev.in); the rest still runs")

# Server errors the bad-payload set may still find (none now: the 422 handler no longer echoes the input, which JSON cannot
# always encode, and sampling survives a denormal temperature). A new entry here must name the bug it stands for.
KNOWN_5XX: dict[str, set[str]] = {"sequence-classification": set(), "causal-lm": set()}


@pytest.fixture(scope="module")
def servers(tiny_classifier_dir: Path, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Both servers, started once for the module and always stopped (their process groups)."""
    folder = tmp_path_factory.mktemp("stress")
    classifier = export_artifact(tiny_classifier_dir, folder / "classifier", "sequence-classification")
    generator = export_artifact(tiny_llama_dir, folder / "generator", "causal-lm")
    started = {}
    try:
        started["classifier"] = stress.start(classifier, folder / "classifier.log", ready_timeout_s=60)
        started["generator"] = stress.start(generator, folder / "generator.log", ready_timeout_s=60)
        yield started
    finally:
        for served in started.values():
            served.server.stop()


def problems_of(result: dict) -> set[str]:
    return {p.rsplit(": ", 1)[0] for p in result["problems"]}


@pytest.mark.parametrize("name", ["classifier", "generator"])
def test_load_at_concurrency_32_all_answers_right_and_server_ready(servers: dict, name: str) -> None:
    served = servers[name]
    result = stress.run_load(served, 500 if name == "classifier" else 64, 32, deadline_s=40, request_timeout_s=30)
    assert result["statuses"] == {"200": result["requests"]} and not result["deadline_hit"], result
    assert result["wrong_answers"] == 0, result["wrong_examples"]
    assert result["ready_after"] == 200 and result["alive_after"], result
    assert result["server_5xx_during_load"] == 0, result["server_counted_statuses"]


@pytest.mark.parametrize("name", ["classifier", "generator"])
def test_bad_payloads_get_a_4xx_and_the_server_stays_ready(servers: dict, name: str) -> None:
    served = servers[name]
    result = stress.run_bad_payloads(served)
    assert result["requests"] >= 35
    unexpected = problems_of(result) - KNOWN_5XX[served.task]
    assert not unexpected, {k: result["statuses"].get(k) for k in unexpected}
    assert result["ready_after"] == 200 and served.server.proc.poll() is None


@needs_schemathesis
def test_schemathesis_classifier_no_server_errors(servers: dict, tmp_path: Path) -> None:
    result = stress.run_schemathesis(servers["classifier"], tmp_path, max_examples=10, timeout_s=40)
    assert not result["timed_out"], result
    assert result["requests"] >= 30, result
    assert result["server_errors"] == 0 and result["passed"], result["failures"] or result["output_tail"]


@needs_schemathesis
def test_schemathesis_generator_no_server_errors(servers: dict, tmp_path: Path) -> None:
    result = stress.run_schemathesis(servers["generator"], tmp_path, max_examples=10, timeout_s=40)
    assert not result["timed_out"], result
    assert result["requests"] >= 30, result
    assert result["server_errors"] == 0 and result["passed"], result["failures"] or result["output_tail"]
