"""The report's "what was trained on what", from the resolved recipe and the base model's provenance (as the step keys
saw it: runner.execute.environment)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.recipe.document import Recipe
from runner.recipe.problems import relative
from runner.recipe.sections import FileSource, HubSource
from runner.report.formatting import num
from runner.report.render import Cell


def what(recipe: Recipe, environment: dict[str, Any], stats: dict[str, Any] | None, evaluate: dict[str, Any] | None
         ) -> list[list[str | Cell]]:
    """What was trained on what: the headline's first table."""
    rows: list[list[str | Cell]] = [["base model", base_model(recipe, environment)]]
    sources = recipe.data.all_sources()
    weighted = len(sources) > 1
    for i, source in enumerate(sources):
        what = (f"hub dataset {source.hub} ({source.split}, revision {source.revision[:12]})" if isinstance(source, HubSource)
                else f"file {relative(Path(source.path))}" if isinstance(source, FileSource)
                else f"{num(len(next(iter(source.rows.values()), [])))} inline rows")
        share = f", weight {num(source.weight)}" if weighted else ""
        rows.append([f"data source {i + 1}" if weighted else "data", what + share])
    split = (stats or {}).get("rows") or {}
    if split:
        rows.append(["rows", f"{num(sum(split.values()))}: " + ", ".join(f"{num(n)} {name}" for name, n in split.items())])
    rows.append(["method", method(recipe)])
    if sets := (evaluate or {}).get("sets"):
        rows.append(["evaluated on", "; ".join(f"{s['name']} ({s.get('role')}, {num(s.get('rows'))} rows)" for s in sets)])
    task = recipe.model.task + (f", labels {', '.join(recipe.data.labels)}" if recipe.data.labels else "")
    rows.append(["task", task])
    return rows


def base_model(recipe: Recipe, environment: dict[str, Any]) -> str:
    model, source = recipe.model, environment.get("model") or {}
    if model.init is not None:
        i = model.init
        return (f"built from a config (random weights): {i.architecture}, {i.num_layers} layers, hidden size "
                f"{i.hidden_size}, {i.vocab_size}-token tokenizer trained on the recipe's data")
    if isinstance(package := source.get("package"), dict):
        weights = "; ".join(f"{name} sha256 {digest[:12]}…" for name, digest in (package.get("weights") or {}).items())
        return (f"{model.package} (model package {package.get('distribution')} {package.get('version')}"
                + (f"; {weights}" if weights else "") + ")")
    if model.hub:
        return f"hub model {model.hub} at revision {(source.get('revision') or model.revision or '')[:12]}"
    return f"local folder {relative(Path(str(model.path)))}"


def method(recipe: Recipe) -> str:
    t = recipe.train
    method = {"full": "full fine-tune", "lora": "LoRA", "qlora": "QLoRA"}[t.method]
    if lora := getattr(t, "lora", None):
        method += f" (r {lora.r}, alpha {num(lora.alpha)})"
    if quant := getattr(t, "quantization", None):
        method += f" over a {quant.bits}-bit base"
    length = f"{num(t.max_steps)} steps" if t.max_steps else f"{num(t.epochs)} epoch{'s' if t.epochs != 1 else ''}"
    parts = [method, length, f"learning rate {num(t.learning_rate)}", f"batch {t.batch_size}"]
    if getattr(t, "l2sp", None):
        parts.append(f"L2-SP toward the pretrained weights ({num(t.l2sp)})")  # type: ignore[attr-defined]
    return ", ".join(parts)
