"""`nox -s faults` as a user runs it, at its smoke size: kill -9 in train and in evaluate, then the cache checked.

A file of its own (tests/conformance.py says why): the kill trials are the suite's longest command, so xdist runs them on
one worker while the other files' commands run on the rest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conformance import STEPS, copy_checkout, figure, sh

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return copy_checkout(tmp_path_factory.mktemp("clone"))


def test_faults_session_kills_train_and_evaluate_and_the_cache_stays_clean(clone, tmp_path):
    """`nox -s faults`'s kill -9 trials (train after a complete checkpoint, evaluate at random): after each kill no entry
    is half-written, corrupt or wrong, and the rerun resumes, reuses what was committed and reproduces the reference."""
    done = sh(clone, sys.executable, "bench/faults.py", "--smoke", "--json", str(tmp_path / "faults.json"))
    assert figure(done.stdout, "faults") == 0
    result = json.loads((tmp_path / "faults.json").read_text())
    assert [t["stage"] for t in result["trials"]] == ["train", "evaluate"]
    assert all(t["rerun_exit"] == 0 and not t["problems"] for t in result["trials"])
    assert list(result["keys"]) == STEPS  # the plan's steps, evaluate included
    train = result["trials"][0]
    assert train["killed_in"] == "train" and train["complete_checkpoints_at_kill"], train  # killed mid-train, resumable
    assert train["resumed_from_step"] == train["complete_checkpoints_at_kill"][-1]
