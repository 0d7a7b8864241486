"""The `recipe` command. Only this module prints.

Exit codes: 0 success, 1 the run/check failed (a step failed, a lock mismatch, a verify difference), 2 bad input
(a recipe problem, an unknown step name, a missing lock). A user mistake never shows a traceback.
torch and friends are imported only when a step runs, so `validate`, `plan` and `schema` stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from runner.errors import RunnerError
from runner.recipe import Loaded, RecipeError, find_recipe, load_recipe
from runner.recipe.problems import relative
from runner.stages import STAGES, record_patterns
from runner.store import gc
from runner.store.local import ARTIFACT, RECORD, Cache, output_role, tree_size

# Rich wraps at 80 columns when output is not a terminal (CI logs, pipes); plans and tables read better wider.
_WIDTH = None if sys.stdout.isatty() else 140
# emoji=False: a key written `:thumbs_up:` must be reported as written
out = Console(highlight=False, emoji=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, emoji=False, width=None if sys.stderr.isatty() else 140)


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while they wait starve each other (and the server, and the tokenizer) when the cores are
    # shared: measured here, a training step took 0.60 s with spinning threads and 0.11 s with passive ones. Set before
    # torch is imported; a value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"] and "--container" in argv and len(argv) > 1:
        # The same `recipe run` inside the CUDA image (Dockerfile.cuda), with the GPU, the repo and the caches mounted.
        from runner.container import run_in_container

        rest = [a for a in argv[1:] if a != "--container"]
        if not rest or rest[0].startswith("-"):  # the recipe comes first, as in `recipe run NAME --container`
            err.print("[red]error:[/red] `recipe run --container` needs a recipe name first: "
                      "recipe run NAME --container \\[field=value ...]")
            return 2
        return run_in_container(rest[0], rest[1:], echo=lambda line: out.print(line, markup=False, soft_wrap=True))
    parser = _parser()
    # Overrides may come after options (`run NAME --force train train.epochs=1`): collect the leftovers as overrides.
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except RecipeError as exc:
        for problem in exc.problems:
            err.print(str(problem), markup=False, soft_wrap=True)
        n = len(exc.problems)
        err.print(f"[red]{n} problem{'s' if n != 1 else ''}[/red]")
        return 2
    except RunnerError as exc:  # UsageError, StageError, ProfileError, ...: one message, no traceback
        err.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)  # one line, however long
        return 2
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/yellow]: finished steps stay cached; run again to continue")
        return 130


class UsageError(RunnerError):
    """A command line that cannot work: the message says what to type instead."""


# --- shared helpers -----------------------------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> Loaded:
    overrides = [o for o in args.overrides if "=" in o]
    stray = [o for o in args.overrides if "=" not in o]
    if stray:
        raise UsageError(f"unexpected argument(s) {' '.join(stray)}: overrides look like `train.epochs=1`")
    loaded = load_recipe(find_recipe(args.recipe), overrides)
    for warning in loaded.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    return loaded


def _cache(args: argparse.Namespace) -> Cache:
    return Cache(Path(args.cache_dir) if getattr(args, "cache_dir", None) else None, kinds=tuple(STAGES))


def _plan(loaded: Loaded, cache: Cache):
    from runner.plan import build_plan

    return build_plan(loaded, cache.memo)


def _remote(args: argparse.Namespace, required: bool = False):
    """The remote a command uses: --remote URL, else $RECIPE_REMOTE (never part of a key: it says where results are
    kept, not what they are)."""
    from runner.store.remote import Remote, remote_url

    url = remote_url(getattr(args, "remote", None) or None)
    if url is None:
        if required:
            raise UsageError("no remote: pass --remote URL (s3://bucket/prefix, file:///path, ...) or set RECIPE_REMOTE")
        return None
    return Remote(url, getattr(args, "jobs", None))


def _check_step_names(names: list[str], steps) -> None:
    known = [s.kind for s in steps]
    for name in names:
        if name not in known:
            raise UsageError(f"no step '{name}' in this recipe (steps: {', '.join(known)})")


# --- commands -----------------------------------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    loaded = _load(args)
    from runner.plan import step_names

    kinds = " -> ".join(step_names(loaded))
    extends = f" (extends {', '.join(relative(p) for p in loaded.files[1:])})" if len(loaded.files) > 1 else ""
    out.print(f"[green]ok[/green] {relative(loaded.path)}{extends}: {loaded.recipe.name}: {kinds}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from runner.cli_remote import plan_sources
    from runner.plan import plan_status

    loaded = _load(args)
    cache = _cache(args)
    rows = plan_status(_plan(loaded, cache), cache, loaded.recipe.name)
    remote_has = plan_sources(_remote(args), rows)
    if args.json:
        out.print_json(json.dumps([
            {"step": s.kind, "key": s.key, "depends": s.depends, "cached": c, "pull": remote_has.get(s.kind, False),
             "why": why} for s, c, why in rows
        ]))
        return 0
    table = Table(title=f"plan for {loaded.recipe.name}", title_justify="left")
    for column in ("step", "key", "needs", "status", "why"):
        table.add_column(column, overflow="fold")
    for step, cached, why in rows:
        status = "[green]cached[/green]" if cached else "[blue]pull[/blue]" if remote_has.get(step.kind) \
            else "[yellow]will run[/yellow]"
        table.add_row(step.kind, step.key[:12], ", ".join(step.depends) or "-", status, "\n".join(why))
    out.print(table)
    return 0


def _check_online(loaded: Loaded) -> None:
    """What validate could not check offline (a hub model's config.json): fetched now, before any step runs."""
    again = load_recipe(loaded.path, loaded.overrides, fetch_configs=True)
    for warning in again.warnings:
        err.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)


def cmd_run(args: argparse.Namespace) -> int:
    if args.ray_address:
        os.environ["RAY_ADDRESS"] = args.ray_address  # Ray's own variable, read by the Ray launcher (and by ray.init)
    from runner.execute import execute
    from runner.plan import plan_status

    loaded = _load(args)
    cache = _cache(args)
    steps = _plan(loaded, cache)
    _check_step_names(list(args.force) + ([args.until] if args.until else []), steps)
    if args.locked:
        from runner.lockfile import lock_differences, lock_path, read_lock

        path = lock_path(loaded)
        if not path.is_file():
            raise UsageError(f"--locked: no lock file {relative(path)}; create it with `recipe lock {args.recipe}`")
        document = read_lock(path)
        differences = lock_differences(document, loaded, steps)
        if differences:
            err.print(f"[red]refusing to run:[/red] {loaded.recipe.name} resolves differently from {relative(path)}:")
            for line in differences:
                err.print(f"  {line}", markup=False, soft_wrap=True)
            return 1
    remote = _remote_use(args)
    if args.locked and remote is not None and remote.pull:
        _adopt_locked(document, steps, cache, remote.remote)
        # a pulled entry must carry the very bytes the lock pins (where the key is the lock's own)
        remote.expect = {s.kind: document.steps[s.kind].artifacts for s in steps if document.steps[s.kind].key == s.key}
    if loaded.warnings and not args.dry_run:
        _check_online(loaded)
    if args.dry_run:
        from runner.cli_remote import plan_sources

        rows = plan_status(steps, cache, loaded.recipe.name)
        remote_has = plan_sources(remote.remote if remote and remote.pull else None, rows)
        for step, cached, why in rows:
            forced = step.kind in args.force
            state = "cached" if cached and not forced else "would pull" if remote_has.get(step.kind) and not forced \
                else "would run"
            out.print(f"{step.kind:9} {step.key[:12]}  {state}  {'; '.join(why)}", markup=False)
        return 0
    result = execute(loaded, steps, cache, Path(args.runs_dir), set(args.force), args.until, _progress, remote)
    _summary(result)
    if remote is not None and remote.push_failed:
        err.print("[red]push failed[/red] for some steps (see the warnings above): the run itself succeeded")
        return 1
    return 0 if result.ok else 1


def _adopt_locked(document, steps, cache: Cache, remote) -> None:  # noqa: ANN001 - a Lock, Steps, a Remote or None
    """--locked --pull (and verify): a step whose key differs from the lock's by platform facts alone (the lock passed)
    takes the lock's entry when this cache (or the remote) holds it, and later steps are keyed on it
    (runner.plan.adopt): what a GPU trained is used on a CPU machine instead of training again."""
    from runner.plan import adopt
    from runner.store.remote import RemoteError

    for step in steps:
        locked = document.steps.get(step.kind)
        if locked is None or locked.key == step.key or cache.entry(step.stage, step.key):
            continue
        try:
            held = cache.entry(step.stage, locked.key) is not None or (
                remote is not None and remote.manifest(step.stage, locked.key) is not None)
        except RemoteError as exc:
            err.print(f"[yellow]warning:[/yellow] {escape(str(exc))}", soft_wrap=True)
            return
        if held:
            changed = adopt(steps, step.kind, locked.key, locked.material)
            platform = ", ".join(f"{k} {v}" for k, v in locked.platform.model_dump().items() if v)
            out.print(f"{step.kind}: using the lock's entry {locked.key[:12]} (made on {platform}); keyed on it: "
                      f"{', '.join(changed)}", markup=False, soft_wrap=True)


def _remote_use(args: argparse.Namespace, expect: dict[str, dict[str, str]] | None = None):
    """--pull / --push: the remote checked once, up front. An unusable remote only warns: the run goes on locally."""
    if not (args.pull or args.push):
        return None
    from runner.cli_remote import TransferBar
    from runner.execute import RemoteUse
    from runner.store.remote import RemoteError

    remote = _remote(args, required=True)
    try:
        remote.check(create=args.push)
    except RemoteError as exc:
        err.print(f"[yellow]warning:[/yellow] {escape(str(exc))}; running locally without it", soft_wrap=True)
        use = RemoteUse(remote, False, False)
        use.push_failed = args.push  # the user asked for a push that cannot happen: the exit code says so
        return use

    def notice(line: str) -> None:
        _stop_spinner()
        err.print(f"[yellow]warning:[/yellow] {escape(line)}", soft_wrap=True)

    return RemoteUse(remote, args.pull, args.push, expect, notice, TransferBar(before=_stop_spinner))


def _stop_spinner() -> None:
    global _status
    if _status is not None:
        _status.stop()
        _status = None
        out.print("", end="")


_status = None


def _progress(event: str, result, step) -> None:
    """One line per step; while a step runs, a spinner on a terminal (its output goes to the step's log file)."""
    global _status
    if event == "start":
        if out.is_terminal:
            _status = out.status(f"[bold]{step.kind}[/bold] {step.key[:12]} running (log: logs/{step.kind}.log)")
            _status.start()
        else:
            out.print(f"[bold]{step.kind}[/bold] {step.key[:12]} ...", end=" ")
        return
    if _status is not None or out.is_terminal:
        _stop_spinner()
        out.print(f"[bold]{step.kind}[/bold] {step.key[:12]} ...", end=" ")
    colour = {"cached": "green", "pulled": "blue", "ran": "cyan", "failed": "red"}.get(result.status, "white")
    pushed = f"; {result.remote}" if result.remote and result.status != "pulled" else ""
    out.print(f"[{colour}]{result.status}[/{colour}] ({result.seconds:.1f}s){escape(pushed)}")
    if result.error:
        err.print(f"  {result.error}", markup=False, soft_wrap=True)


def _summary(result) -> None:
    """The run's last lines: what happened, the headline numbers (metric per artifact, served latency, forgetting
    verdict), then where the report is, so the result reads without opening a file."""
    from runner.report.build import collect, headline_lines

    ran = sum(s.status == "ran" for s in result.steps)
    cached = sum(s.status == "cached" for s in result.steps)
    pulled = sum(s.status == "pulled" for s in result.steps)
    failed = [s.kind for s in result.steps if s.status == "failed"]
    state = "[green]succeeded[/green]" if result.ok else f"[red]failed[/red] at {', '.join(failed) or 'a step'}"
    counts = f"{ran} ran, {cached} cached" + (f", {pulled} pulled" if pulled else "")
    out.print(f"{result.recipe} {state}: {counts}. Run folder: {relative(result.run_dir)}")
    for line in headline_lines(collect(result)):
        style = "red" if "over budget" in line else "green" if "within budget" in line else None
        out.print(f"  {line}", markup=False, style=style, soft_wrap=True)
    page, report = result.run_dir / "report.html", result.run_dir / "report.md"
    if page.is_file():
        out.print(f"Report: {relative(page)} (and {report.name} beside it)", markup=False, soft_wrap=True)


def cmd_lock(args: argparse.Namespace) -> int:
    from runner.lockfile import build_lock, lock_path, write_lock

    loaded = _load(args)
    cache = _cache(args)
    document, problems = build_lock(loaded, _plan(loaded, cache), cache)
    not_run = [line.split(":")[0] for line in problems if line.endswith(": not run yet")]
    if not_run:
        err.print(f"[red]cannot lock:[/red] not run yet: {', '.join(not_run)}. Run `recipe run {args.recipe}` first.")
    for line in problems:
        if not line.endswith(": not run yet"):
            err.print(f"[red]cannot lock:[/red] {escape(line)}", soft_wrap=True)
    if problems:
        return 1
    path = lock_path(loaded)
    write_lock(path, document)
    platform = document["platform"]
    out.print(f"wrote {relative(path)} ({len(document['steps'])} steps, recipe {document['recipe_sha256'][:12]}, "
              f"platform {platform['system']} {platform['machine']} {platform['cpu_isa']}"
              f"{', ' + ', '.join(platform['gpus']) if platform['gpus'] else ''})", markup=False)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 1 on an unexpected difference; differences the platform explains alone pass, with a warning."""
    from runner.hardware.platform_facts import describe
    from runner.lockfile import lock_path, platform_changes, read_lock, verify_outputs

    loaded = _load(args)
    cache = _cache(args)
    path = lock_path(loaded)
    if not path.is_file():
        raise UsageError(f"no lock file {relative(path)}; create it with `recipe lock {args.recipe}`")
    document = read_lock(path)  # a bad lock is a LockError: one line, exit 2
    if args.remote is not None:  # the lock against the remote's manifests, not this machine's files
        from runner.cli_remote import verify as verify_remote

        return verify_remote(_remote(args, required=True), document.steps, relative(path))
    changes = platform_changes(document.platform.model_dump(), describe())
    if changes:
        out.print(f"this machine is not the lock's: {escape('; '.join(changes))}", soft_wrap=True)
    steps = _plan(loaded, cache)
    _adopt_locked(document, steps, cache, None)  # entries pulled from the lock's machine are verified as they are
    result = verify_outputs(document, steps, cache)
    for difference in result.unexpected:
        out.print(f"[red]differs[/red] {escape(difference.line)}", soft_wrap=True)
    reasons: dict[tuple[str, str], list[str]] = {}
    for difference in result.expected:
        reasons.setdefault((difference.step, difference.reason or ""), []).append(difference.line)
    for (step, reason), lines in reasons.items():
        out.print(f"[yellow]expected[/yellow] {step} differs on this platform: {escape(reason)}", soft_wrap=True)
        for line in lines:
            out.print(f"    {line}", markup=False, soft_wrap=True)
    records = ", ".join(f"{step} {len(names)}" for step, names in result.records.items())
    out.print(f"{result.matched} artifact file(s) match {relative(path)}; {len(result.unexpected)} unexpected "
              f"difference(s), {len(result.expected)} explained by the platform; run records not compared: "
              f"{records or 'none'}", markup=False, soft_wrap=True)
    if result.unexpected:
        return 1
    if result.expected:
        err.print(f"[yellow]warning:[/yellow] {len(result.expected)} difference(s) come from platform-dependent steps "
                  "(listed above): expected on another machine, so verify passes")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a run's ONNX artifact (the quantized one when the recipe quantizes) for real, until Ctrl-C."""
    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise UsageError(f"--api-key-env {args.api_key_env}: the variable is unset or empty")
    from runner.serving.server import public_without_key  # exposing a model without a key is a decision

    if refusal := public_without_key(args.host, key, args.allow_public_without_key):
        raise UsageError(refusal)
    artifact = _artifact_of(args)
    from runner.serving import ServerSettings, serve

    out.print(f"serving {relative(artifact)} on http://{args.host}:{args.port} (docs at /docs; Ctrl-C stops)")
    serve(artifact, args.host, args.port, ServerSettings(api_key=key))
    return 0


def _artifact_of(args: argparse.Namespace) -> Path:
    run_json = Path(args.recipe) / "run.json"
    if run_json.is_file():  # a run folder: take the last ONNX-producing step it recorded
        steps = {s["kind"]: s for s in json.loads(run_json.read_text())["steps"]}
        for kind in ("quantize", "export"):
            outputs = steps.get(kind, {}).get("outputs")
            if outputs and (Path(outputs) / "onnx" / "model.onnx").is_file():
                return Path(outputs) / "onnx"
        raise UsageError(f"{args.recipe}: this run has no ONNX export or quantize output to serve")
    loaded = _load(args)
    cache = _cache(args)
    for step in reversed(_plan(loaded, cache)):
        entry = cache.entry(step.stage, step.key) if step.kind in ("quantize", "export") else None
        if entry and (entry.outputs / "onnx" / "model.onnx").is_file():
            return entry.outputs / "onnx"
    raise UsageError(f"nothing to serve for {loaded.recipe.name}: run it first (`recipe run {args.recipe}`)")


def cmd_doctor(args: argparse.Namespace) -> int:
    """Exit 0 when every recipe fits, 1 when one does not, 2 on bad input."""
    from runner.hardware.doctor import doctor

    return doctor(args.recipes + args.overrides, args.json, args.profile)


def cmd_schema(args: argparse.Namespace) -> int:
    from runner.recipe.schema import schema_json

    sys.stdout.write(schema_json())
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from runner.cli_remote import push

    loaded = _load(args)
    cache = _cache(args)
    steps = _plan(loaded, cache)
    if args.step:
        _check_step_names([args.step], steps)
    return push(_remote(args, required=True), cache, steps, args.step)


def cmd_pull(args: argparse.Namespace) -> int:
    from runner.cli_remote import pull

    loaded = _load(args)
    cache = _cache(args)
    return pull(_remote(args, required=True), cache, _plan(loaded, cache))


def cmd_cache(args: argparse.Namespace) -> int:
    cache = _cache(args)
    if args.remote is not None and args.action != "ls":
        raise UsageError(f"`recipe cache {args.action}` works on the local cache; only `cache ls` takes --remote")
    if args.action == "ls" and args.remote is not None:
        from runner.cli_remote import list_entries

        return list_entries(_remote(args, required=True))
    if args.action == "ls":
        table = Table(title=f"cache {relative(cache.root)}", title_justify="left")
        for column in ("step", "key", "size", "artifacts", "records", "seconds", "created"):
            table.add_column(column)
        for entry in cache.entries():
            manifest = entry.manifest
            size = tree_size(entry.outputs)
            roles = [output_role(rel, meta, record_patterns(entry.kind)) for rel, meta in manifest.get("outputs", {}).items()]
            table.add_row(entry.kind, entry.key[:12], _human(size), str(roles.count(ARTIFACT)), str(roles.count(RECORD)),
                          str(manifest.get("seconds", "")), str(manifest.get("started", "")))
        out.print(table)
        return 0
    if args.action == "verify":
        bad = 0
        for entry in cache.entries():
            problems = cache.verify(entry, full=True)
            if problems:
                bad += 1
                try:
                    where = f"quarantined at {relative(cache.quarantine(entry))}"
                except FileNotFoundError:  # a run found it damaged first and moved it away
                    where = "already moved away by another process"
                out.print(f"[red]corrupt[/red] {entry.kind} {entry.key[:12]} -> {where}")
                for line in problems:
                    out.print(f"    {line}", markup=False)
        out.print(f"{len(cache.entries()) + bad} entries checked, {bad} corrupt")
        return 1 if bad else 0
    # gc: keep what locks, recent runs and each recipe's last run still need (runner/store/gc.py says why)
    if args.keep_days < 0:
        raise UsageError(f"--keep-days {args.keep_days:g}: a number of days, 0 or more")
    locks = sorted(Path("recipes").glob("*.lock")) + [Path(p) for p in args.lock]
    resumable = {kind for kind, spec in STAGES.items() if spec.resumable}
    planned = gc.plan(cache, locks=locks, runs_dir=Path(args.runs_dir), resumable=resumable, keep_days=args.keep_days,
                      work=args.work)
    if not args.dry_run:
        gc.collect(cache, planned)
    verb = "would remove" if args.dry_run else "removed"
    for doomed in planned.remove:
        out.print(f"{verb} {relative(doomed.path)} ({_human(doomed.size)}, {doomed.why})", markup=False)
    out.print(f"{verb} {len(planned.remove)} folder(s), {'would free' if args.dry_run else 'freed'} "
              f"{_human(planned.freed)}", markup=False)
    for reason, count in sorted(planned.kept.items()):
        out.print(f"kept {count}: {reason}", markup=False)
    return 0


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024:
            return f"{size:.0f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


# --- argument parsing ---------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipe", description="Run fine-tuning recipes: validated, planned, cached.")
    sub = parser.add_subparsers(dest="command", required=True)

    def recipe_command(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("recipe", help="recipe name (under ./recipes) or path to a recipe file")
        p.add_argument("overrides", nargs="*", help="field overrides, e.g. train.epochs=1 data.select=200")
        p.add_argument("--cache-dir", help="cache folder (default: $RECIPE_CACHE or ./.recipe-cache)")
        p.set_defaults(func=func)
        return p

    recipe_command("validate", cmd_validate, "Check a recipe; list every problem with file:line:col.")
    def remote_options(p: argparse.ArgumentParser, optional: bool = False) -> None:
        if optional:  # a switch that may name the URL: `--remote` alone uses $RECIPE_REMOTE
            p.add_argument("--remote", nargs="?", const="", default=None, metavar="URL",
                           help="use the remote cache (URL, or $RECIPE_REMOTE when none is given)")
        else:
            p.add_argument("--remote", metavar="URL", help="remote cache: s3://bucket/prefix, gs://, az://, hf://, "
                           "file:///path (default: $RECIPE_REMOTE)")
        p.add_argument("--jobs", type=int, metavar="N", help="files transferred at once (default: 2 x CPUs, 4..16)")

    p = recipe_command("plan", cmd_plan, "Show the steps, their cache keys, and why each stale step will run.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    remote_options(p)
    p = recipe_command("run", cmd_run, "Run a recipe: cached steps are skipped; a run folder records everything.")
    p.add_argument("--force", action="append", default=[], metavar="STEP", help="re-run this step even if cached")
    p.add_argument("--until", metavar="STEP", help="stop after this step")
    p.add_argument("--dry-run", action="store_true", help="show what would run, run nothing")
    p.add_argument("--locked", action="store_true", help="refuse to run if anything differs from NAME.lock")
    p.add_argument("--runs-dir", default="runs", help="where run folders go (default: ./runs)")
    p.add_argument("--container", action="store_true",
                   help="run inside the CUDA container (docker or podman; prints the command where neither runs)")
    p.add_argument("--pull", action="store_true", help="pull a step missing here from the remote before running it")
    p.add_argument("--push", action="store_true", help="push each step to the remote once it is committed")
    remote_options(p)
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="the Ray cluster for `train.distributed.launcher: ray` (default: $RAY_ADDRESS, else a local one)")
    recipe_command("lock", cmd_lock, "Write NAME.lock beside the recipe: keys, package versions, output hashes.")
    p = recipe_command("verify", cmd_verify, "Compare this machine's outputs (or the remote's, --remote) with NAME.lock.")
    remote_options(p, optional=True)
    p = recipe_command("push", cmd_push, "Upload the plan's committed steps to the remote cache.")
    p.add_argument("--step", metavar="KIND", help="push only this step")
    remote_options(p)
    p = recipe_command("pull", cmd_pull, "Download the plan's steps the remote holds: verified, then committed here.")
    remote_options(p)

    p = recipe_command("serve", cmd_serve, "Serve a run folder's or a recipe's ONNX model with FastAPI + ONNX Runtime.")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding an API key to require")
    p.add_argument("--allow-public-without-key", action="store_true",
                   help="serve on a non-loopback --host without an API key (refused otherwise)")
    p = sub.add_parser("doctor", help="Check recipes against this machine or a hardware profile: needs and memory.")
    p.add_argument("recipes", nargs="*", help="recipe names or paths (default: every recipe under ./recipes); overrides")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--profile", metavar="NAME_OR_FILE", help="check against a hardware profile instead of this machine")
    p.set_defaults(func=cmd_doctor, overrides=[])
    p = sub.add_parser("schema", help="Print the recipe JSON schema.")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("cache", help="Inspect and maintain the step cache.")
    p.add_argument("action", choices=["ls", "verify", "gc"])
    p.add_argument("--cache-dir", help="cache folder (default: $RECIPE_CACHE or ./.recipe-cache)")
    p.add_argument("--dry-run", action="store_true", help="gc: list what would be removed and the space it frees")
    p.add_argument("--keep-days", type=float, default=gc.DEFAULT_KEEP_DAYS, metavar="N",
                   help="gc: keep entries committed or used by a run in the last N days (default: %(default)g)")
    p.add_argument("--lock", action="append", default=[], metavar="FILE",
                   help="gc: also keep the entries this lock file names (recipes/*.lock always count)")
    p.add_argument("--runs-dir", default="runs", help="gc: where run records are (default: ./runs)")
    p.add_argument("--work", action="store_true",
                   help="gc: also remove resumable work folders (a killed train's checkpoints)")
    remote_options(p, optional=True)
    p.set_defaults(func=cmd_cache)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
