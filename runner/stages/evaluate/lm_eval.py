"""Optional lm-evaluation-harness tasks on the trained causal LM (`evaluate.lm_eval`).

The harness is not in the pinned environments (its dependency sqlitedict ships no wheel, and the lock installs wheels
only), so a recipe that asks for it is refused at validate time (runner.recipe.eval_checks) and again here, with the
command that installs it. With the package installed, the trained model (merged, fp32, as the export sees it) is wrapped
in the harness's own HFLM and run with `lm_eval.simple_evaluate`; tasks are harness task names (hub datasets: they
need the network) or local task YAML files (their folder is added to the harness's task search path).
"""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from runner.recipe.eval_checks import LM_EVAL_MISSING
from runner.recipe.sections import Export, LmEval, Model
from runner.stages import StageError, compare, merge


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise StageError(LM_EVAL_MISSING)


def task_names(tasks: list[str]) -> tuple[list[str], list[str]]:
    """Harness task names and the folders of local task files: a `.yaml` entry names its file's `task:`."""
    names, folders = [], []
    for task in tasks:
        path = Path(task)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise StageError(f"evaluate.lm_eval.tasks: {path} does not exist")
            spec = yaml.safe_load(path.read_text())
            if not isinstance(spec, dict) or not spec.get("task"):
                raise StageError(f"evaluate.lm_eval.tasks: {path} has no `task:` name (an lm-eval task file needs one)")
            names.append(str(spec["task"]))
            folders.append(str(path.resolve().parent))
        else:
            names.append(task)
    return names, sorted(set(folders))


def run_lm_eval(cfg: LmEval, model_cfg: Model, inputs: dict[str, Path], seed: int) -> dict[str, Any]:
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names, folders = task_names(cfg.tasks)
    samples = compare.load_samples(inputs["data"], "test", compare.BATCH_SIZE)
    model, tokenizer, _ = merge.load_trained(model_cfg, inputs, True, samples, Export())
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=names, num_fewshot=cfg.num_fewshot, limit=cfg.limit,
            task_manager=TaskManager(include_path=folders or None), random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed,
        )
    except Exception as exc:  # noqa: BLE001 - an unknown task, no network for a hub task: the harness says which
        raise StageError(f"lm-eval failed on tasks {names}: {exc}") from exc
    if results is None:  # simple_evaluate returns None on non-zero ranks of a distributed run
        return {"tasks": names, "results": {}}
    return {"package": f"lm-eval {metadata.version('lm-eval')}", "tasks": names, "limit": cfg.limit,
            "num_fewshot": cfg.num_fewshot, "results": results.get("results", {})}
