"""The documented multi-node launches (docs/launch/): a Slurm batch script and a SkyPilot task. Both run `recipe run` on
every node with NODE_RANK and MASTER_ADDR taken from the scheduler's own variables; what they pass must be a valid
recipe run. SkyPilot's own parser checks the task where SkyPilot is installed (it is not in the pinned envs: ~460 MB)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from runner.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "docs" / "launch"


def test_the_slurm_script_is_valid_bash_and_takes_the_rank_from_slurm():
    script = (LAUNCH / "slurm.sh").read_text()
    subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sh")], check=True)
    assert script.splitlines()[1].startswith("# ")  # says how to run it
    assert "NODE_RANK=$SLURM_NODEID" in script and "scontrol show hostnames" in script
    assert re.search(r"srun .*recipe run", script)


def test_the_skypilot_task_sets_rank_and_master_from_skypilot_and_runs_the_recipe():
    task = yaml.safe_load((LAUNCH / "skypilot.yaml").read_text())
    assert task["num_nodes"] >= 2
    run = task["run"]
    assert "NODE_RANK=$SKYPILOT_NODE_RANK" in run
    assert re.search(r"MASTER_ADDR=\$\(echo \"\$SKYPILOT_NODE_IPS\" \| head -n 1\)", run)
    assert "recipe run \"$RECIPE\"" in run and "MASTER_PORT" in task["envs"]


def test_the_overrides_both_pass_are_a_valid_run_of_the_named_recipe():
    task = yaml.safe_load((LAUNCH / "skypilot.yaml").read_text())
    overrides = ["train.distributed.nnodes=2", "train.distributed.nproc_per_node=4"]
    loaded = load_recipe(REPO / "recipes" / f"{task['envs']['RECIPE']}.yaml", overrides)
    dist = loaded.recipe.train.distributed
    assert (dist.nnodes, dist.nproc_per_node, dist.launcher) == (2, 4, "torchrun")


@pytest.mark.skipif(importlib.util.find_spec("sky") is None, reason="SkyPilot is not installed (pip install skypilot)")
def test_skypilot_parses_the_task():
    import sky

    task = sky.Task.from_yaml(str(LAUNCH / "skypilot.yaml"))
    assert task.num_nodes == 2 and "SKYPILOT_NODE_RANK" in task.run
