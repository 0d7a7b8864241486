"""Loading a recipe: safe YAML with line numbers, `extends`, command-line overrides, validation, local paths.

`load_recipe(path, overrides)` returns a `Loaded` recipe or raises one `RecipeError` listing every problem at once.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import TypeAdapter, ValidationError

from runner.names import X_LOCAL_PATH
from runner.recipe import local_checks, rules
from runner.recipe.document import RULES_ERROR, Recipe
from runner.recipe.problems import Loc, Pos, Problem, RecipeError, did_you_mean, dotted, relative
from runner.recipe.schema import _resolve as _schema_alternatives
from runner.recipe.schema import field_has, recipe_schema, schema_children
from runner.recipe.sections import SOURCE_TAGS

Positions = dict[Loc, Pos]


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader (no Python objects, ever) that also refuses the other non-plain YAML tags: a recipe holds plain values
    (strings, numbers, booleans, null, lists, mappings), so `!!binary` bytes or `!!set` values cannot sneak into a field
    (pydantic would quietly turn b"..." into a str)."""

    def _refuse(self, node: yaml.Node) -> Any:
        raise yaml.constructor.ConstructorError(
            None, None, f"the tag '{node.tag}' is not allowed in a recipe (plain values only)", node.start_mark
        )

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, LookupError, TypeError, AttributeError, OverflowError) as exc:
            # PyYAML's scalar constructors raise these, not a YAMLError, for an explicit tag the value does not fit
            # (`!!bool yesname`, `!!int x`, `!!float` with no value, `!!timestamp soon`) and for an int longer than
            # sys.get_int_max_str_digits()
            text = node.value if isinstance(node.value, str) else ""
            text = text if len(text) <= 40 else text[:40] + "..."
            message = f"cannot read {text!r} as {node.tag.rsplit(':', 1)[-1]} ({type(exc).__name__}: {exc})"
            raise yaml.constructor.ConstructorError(None, None, message, node.start_mark) from None


for _tag in ("binary", "set", "omap", "pairs"):
    _RecipeLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _RecipeLoader._refuse)

# Plain scalars are typed by YAML 1.2's core schema, not PyYAML's YAML 1.1: `2e-4` and `1e5` are floats (1.1 wants a dot,
# so they were strings that pydantic then coerced), only true/false are booleans (`yes`, `no`, `on`, `off` stay strings:
# with strict types, `shuffle: yes` is an error instead of a silent True, and `country: NO` is not False), `012` is
# twelve (not octal ten), and `2024-01-01` or `1:30` stay strings (not a date, not ninety).
_CORE = "tag:yaml.org,2002:"
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag in (f"{_CORE}null", f"{_CORE}merge", f"{_CORE}yaml")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(f"{_CORE}bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_RecipeLoader.add_implicit_resolver(  # before float, whose pattern also matches integers
    f"{_CORE}int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_RecipeLoader.add_implicit_resolver(
    f"{_CORE}float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """YAML 1.2 integers: decimal (a leading zero is still decimal), 0o octal, 0x hex."""
    text = str(loader.construct_scalar(node))
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.removeprefix("+"))
    base = {"0o": 8, "0x": 16}.get(digits[:2], 10)
    return sign * int(digits[2:] if base != 10 else digits, base)


_RecipeLoader.add_constructor(f"{_CORE}int", _construct_int)

# Aliases (*name) may make a short file expand to billions of values ("billion laughs"); more than this is refused.
MAX_EXPANDED_VALUES = 100_000


@dataclass
class Loaded:
    """A validated recipe and where each of its parts came from."""

    recipe: Recipe
    path: Path
    files: list[Path]  # the recipe file, then every file it extends, nearest first
    overrides: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)  # the merged document before validation
    warnings: list[str] = field(default_factory=list)  # what could not be checked from local files
    source: Loaded | None = None  # `model.recipe`: the recipe whose trained model this one starts from


def find_recipe(name_or_path: str, recipes_dir: Path | None = None) -> Path:
    """A recipe given by path, or by name under ./recipes (NAME or NAME.yaml)."""
    direct = Path(name_or_path)
    if _lookup(direct, want_file=True):
        return direct
    folder = recipes_dir or Path("recipes")
    for candidate in (folder / name_or_path, folder / f"{name_or_path}.yaml", folder / f"{name_or_path}.yml"):
        if _lookup(candidate, want_file=True):
            return candidate
    known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
    hint = did_you_mean(name_or_path, known) or (f"; recipes here: {', '.join(known)}" if known else "")
    raise RecipeError([Problem(Pos(name_or_path, 1, 1), (), f"no such recipe file or recipe name{hint}")])


def load_recipe(path: Path, overrides: list[str] | tuple[str, ...] = (), fetch_configs: bool = False,
                chain: tuple[Path, ...] = ()) -> Loaded:
    """Load, merge, override and validate a recipe, then run the local checks; `fetch_configs` lets them download a
    hub model's config.json that no local copy has (`recipe run` does, before any step). A `model.recipe` is loaded too
    (without the overrides, which are this recipe's); `chain` holds the recipes that led here, to refuse a cycle."""
    path = Path(path)
    raw, positions, files = _load_with_extends(path, chain=())
    problems: list[Problem] = []
    for override in overrides:
        problems += _apply_override(raw, positions, override)
    raw.pop("extends", None)
    resolved_paths, path_problems = _resolve_local_paths(raw, positions)
    problems += path_problems
    recipe = None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        # the cross-field rules' own error (RULES_ERROR) is left out: they run below, pointed at their fields
        problems += [_problem_from_pydantic(err, raw, positions, path) for err in exc.errors() if err["type"] != RULES_ERROR]
    bad = {problem.loc for problem in problems if problem.loc}  # what the rules and local checks cannot read
    problems += [Problem(_nearest_position(loc, positions, path), loc, message) for loc, message in rules.check(raw, bad)]
    # The local checks run on the sections that validated, so their findings come with everything else at once.
    checked = recipe if recipe is not None and not problems else _valid_sections(raw, {p.loc for p in problems if p.loc})
    for loc, resolved in resolved_paths.items():
        if loc[:1] and getattr(checked, str(loc[0]), None) is not None:
            _set_at(checked, loc, resolved)
    findings = local_checks.check(checked, fetch=fetch_configs and not problems)
    problems += [Problem(_nearest_position(loc, positions, path), loc, message) for loc, message in findings.errors]
    source = None
    if not problems and checked.model.recipe is not None:
        source, found = _referenced(checked, positions, path, chain, fetch_configs)
        problems += found
    if problems:
        raise RecipeError(problems)
    return Loaded(recipe=checked, path=path, files=files, overrides=list(overrides), raw=raw, warnings=findings.warnings,
                  source=source)


def _referenced(recipe: Recipe, positions: Positions, path: Path, chain: tuple[Path, ...],
                fetch_configs: bool) -> tuple[Loaded | None, list[Problem]]:
    """`model.recipe` loaded: a recipe file (the loader resolved it and checked it exists), not one that leads back here,
    valid in itself, and training the same task."""
    loc = ("model", "recipe")
    pos = _nearest_position(loc, positions, path)
    target, here = Path(recipe.model.recipe or ""), path.resolve()
    if not target.is_file():
        return None, [Problem(pos, loc, f"{relative(target)} is a folder; give the recipe file whose model to start from")]
    if target == here or target in chain:
        cycle = " -> ".join(relative(p) for p in (*chain, here, target))
        return None, [Problem(pos, loc, f"recipes that start from each other's models form a cycle: {cycle}")]
    try:
        source = load_recipe(target, fetch_configs=fetch_configs, chain=(*chain, here))
    except RecipeError as exc:
        return None, [Problem(pos, loc, f"the recipe {relative(target)} is not valid (its problems follow)"), *exc.problems]
    if source.recipe.model.task != recipe.model.task:
        where = _nearest_position(("model", "task"), positions, path)
        return None, [Problem(where, ("model", "task"), f"{recipe.model.task}, but the recipe it starts from "
                              f"({relative(target)}) trains a {source.recipe.model.task} model")]
    return source, []


def _valid_sections(raw: dict[str, Any], bad: set[Loc]) -> Recipe:
    """A recipe holding only the top-level sections without errors, field or cross-field (the others None), for the
    local checks, which may rely on every rule of a section they read."""
    values: dict[str, Any] = {}
    for name, info in Recipe.model_fields.items():
        values[name] = None if info.is_required() else info.get_default(call_default_factory=True)
        if name in raw and not any(loc[:1] == (name,) for loc in bad):
            try:
                field_type: Any = Annotated[info.annotation, info]  # the field's type with its constraints
                values[name] = TypeAdapter(field_type).validate_python(raw[name])
            except ValidationError:  # not expected (its errors are in `bad`); then the checks skip it
                values[name] = None
    return Recipe.model_construct(**values)


# --- YAML with positions ------------------------------------------------------------------------------------------------


def _load_yaml(path: Path) -> tuple[dict[str, Any], Positions]:
    shown = relative(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem(Pos(shown), (), "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError([Problem(Pos(shown), (), f"cannot read file: {exc}")]) from None
    try:
        # safe: tags that would construct Python objects are refused (and the other non-plain tags, see _RecipeLoader)
        loader = _RecipeLoader(text)
    except yaml.reader.ReaderError as exc:  # control characters are refused before parsing starts, with no line
        line, col = _line_col(text, exc.position)
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        message = f"YAML: unacceptable character #x{code:04x}: {exc.reason}"
        raise RecipeError([Problem(Pos(shown, line, col), (), message)]) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise RecipeError([Problem(Pos(shown), (), "the recipe file is empty")])
        problems = _alias_problems(node, shown) or _duplicate_keys(node, (), shown)
        if problems:
            raise RecipeError(problems)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = " ".join(str(part) for part in (exc.context, exc.problem) if part)
        raise RecipeError([Problem(Pos(shown, line, col), (), f"YAML: {message}")]) from None
    except yaml.YAMLError as exc:
        raise RecipeError([Problem(Pos(shown), (), f"YAML: {exc}")]) from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise RecipeError([Problem(Pos(shown), (), "YAML: lists or mappings nested too deeply")]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise RecipeError([Problem(_pos(node, shown), (), "a recipe is a mapping of sections (name:, model:, data:, ...)")])
    positions: Positions = {(): Pos(shown, 1, 1)}
    _record_positions(node, (), shown, positions)
    return data, positions


def _pos(node: yaml.Node, shown: str) -> Pos:
    return Pos(shown, node.start_mark.line + 1, node.start_mark.column + 1)


def _record_positions(node: yaml.Node, loc: Loc, shown: str, positions: Positions) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            positions[(*loc, key)] = _pos(key_node, shown)
            _record_positions(value_node, (*loc, key), shown, positions)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            positions[(*loc, index)] = _pos(item, shown)
            _record_positions(item, (*loc, index), shown, positions)


def _line_col(text: str, offset: int) -> tuple[int, int]:
    return text.count("\n", 0, offset) + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _alias_problems(root: yaml.Node, shown: str) -> list[Problem]:
    """Aliases reuse a node: one inside the value it names (`a: &x [*x]`) is a cycle that every walk below would follow
    forever (RecursionError), and nested ones can expand a few lines into billions of values. Refuse both before walking.
    Sizes are memoized per node, so this costs one visit per distinct node however often aliases repeat it."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise _AliasCycle(node)
        open_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        sizes[id(node)] = total = 1 + sum(size(child) for child in children)
        open_nodes.discard(id(node))
        return total

    try:
        expanded = size(root)
    except _AliasCycle as cycle:
        return [Problem(_pos(cycle.node, shown), (), "YAML: an alias refers to the value that contains it (a cycle)")]
    if expanded > MAX_EXPANDED_VALUES and expanded > len(sizes):  # only aliases make it larger than its distinct nodes
        message = f"YAML: aliases expand this recipe to {expanded} values (at most {MAX_EXPANDED_VALUES})"
        return [Problem(_pos(root, shown), (), message)]
    return []


class _AliasCycle(Exception):
    def __init__(self, node: yaml.Node):
        self.node = node


def _duplicate_keys(node: yaml.Node, loc: Loc, shown: str) -> list[Problem]:
    problems = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # `? [a, b]: 1`: unhashable, and no field is named so
                problems.append(Problem(_pos(key_node, shown), loc, "a key must be a plain name, not a list or mapping"))
                continue
            key = key_node.value
            if key in seen:
                problems.append(Problem(_pos(key_node, shown), (*loc, key), "key given twice in the same mapping"))
            seen.add(key)
            problems += _duplicate_keys(value_node, (*loc, key), shown)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += _duplicate_keys(item, (*loc, index), shown)
    return problems


# --- extends ------------------------------------------------------------------------------------------------------------


def _load_with_extends(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], Positions, list[Path]]:
    data, positions = _load_yaml(path)
    base_name = data.get("extends")
    if base_name is None:
        return data, positions, [path]
    here = positions[("extends",)]
    if not isinstance(base_name, str) or not base_name:
        raise RecipeError([Problem(here, ("extends",), "`extends` names a base recipe file (a path)")])
    base_path = _lookup(path.parent / base_name, want_file=True)
    if base_path is None:
        raise RecipeError([Problem(here, ("extends",), f"base recipe not found: {relative(path.parent / base_name)}")])
    if base_path in chain or base_path == path.resolve():
        cycle = " -> ".join(relative(p) for p in (*chain, path.resolve(), base_path))
        raise RecipeError([Problem(here, ("extends",), f"extends itself in a cycle: {cycle}")])
    base, base_positions, files = _load_with_extends(base_path, (*chain, path.resolve()))
    base.pop("extends", None)
    merged = _deep_merge(base, data)
    merged_positions = {**base_positions, **positions}
    return merged, merged_positions, [path, *files]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) in `over` replaces what `base` had."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


# --- overrides ----------------------------------------------------------------------------------------------------------

_OVERRIDE = re.compile(r"^(?P<path>[A-Za-z_][\w-]*(\.[\w-]+)*)=(?P<value>.*)$", re.DOTALL)


def _apply_override(raw: dict[str, Any], positions: Positions, override: str) -> list[Problem]:
    """Apply `a.b.c=value` (value parsed as YAML) to the raw document; unknown paths are errors."""
    pos = Pos("<override>", override=override)
    match = _OVERRIDE.match(override)
    if not match:
        return [Problem(pos, (), "an override looks like `section.field=value`, e.g. `train.epochs=1`")]
    # ASCII digits only: '²'.isdigit() is True but int('²') raises
    parts: list[str | int] = [int(p) if p.isascii() and p.isdigit() else p for p in match["path"].split(".")]
    try:
        value = _override_value(match["value"]) if match["value"].strip() else None
    except yaml.YAMLError as exc:
        return [Problem(pos, tuple(parts), f"the value is not valid YAML: {exc}")]
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        return [Problem(pos, tuple(parts), "the value is not valid YAML: lists or mappings nested too deeply")]
    unknown = _unknown_schema_path(tuple(parts), raw)
    if unknown:
        return [Problem(pos, tuple(parts), unknown)]
    target: Any = raw
    for depth, part in enumerate(parts[:-1]):
        nxt = parts[depth + 1]
        if isinstance(target, dict):
            if not isinstance(target.get(part), (dict, list)):
                target[part] = [] if isinstance(nxt, int) else {}
            target = target[part]
        elif isinstance(target, list) and isinstance(part, int):
            if part >= len(target):
                return [Problem(pos, tuple(parts[: depth + 1]), f"list index out of range (the list has {len(target)} items)")]
            target = target[part]
        else:
            return [Problem(pos, tuple(parts[: depth + 1]), "cannot set a field inside this value")]
    last = parts[-1]
    if isinstance(target, list):
        if not isinstance(last, int) or last > len(target):
            return [Problem(pos, tuple(parts), f"list index out of range (the list has {len(target)} items)")]
        if last == len(target):
            target.append(value)
        else:
            target[last] = value
    elif isinstance(target, dict) and value is None:
        target.pop(last, None)  # `field=null` removes a key (e.g. `train.lora=null` with `train.method=full`)
    elif isinstance(target, dict):
        target[last] = value
    else:
        return [Problem(pos, tuple(parts[:-1]), "cannot set a field inside this value")]
    for loc in [loc for loc in positions if loc[: len(parts)] == tuple(parts)]:
        del positions[loc]
    positions[tuple(parts)] = pos
    return []


def _override_value(text: str) -> Any:
    """An override's value, parsed under the rules of a recipe file: plain tags only, and no alias cycle or alias bomb
    (`x=&a [*a]` made a list containing itself, which the local-path walk followed until RecursionError)."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        problems = _alias_problems(node, "<override>")
        if problems:
            raise yaml.YAMLError(problems[0].message.removeprefix("YAML: "))
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _unknown_schema_path(parts: Loc, raw: dict[str, Any]) -> str | None:
    nodes = [recipe_schema()]
    for depth, part in enumerate(parts):
        children = [child for node in nodes for child in schema_children(node, part)]
        if not children:
            choices = sorted({name for node in nodes for name in schema_children(node, None, names=True)})
            where = dotted(parts[:depth]) or "the recipe"
            return f"unknown field '{part}' in {where}{did_you_mean(str(part), choices)}"
        nodes = children
    return None


# --- pydantic errors -> problems ----------------------------------------------------------------------------------------


def _problem_from_pydantic(err: Any, raw: dict[str, Any], positions: Positions, path: Path) -> Problem:
    loc = _strip_tags(tuple(err["loc"]), raw)
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = f"unknown field '{loc[-1]}'{did_you_mean(str(loc[-1]), _known_fields(loc[:-1], raw))}"
    elif err["type"] == "missing":
        message = "required field is missing"
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    elif err["type"] == "union_tag_invalid":
        message = f"{message} (got {err.get('input')!r})"
    elif err["type"] in ("int_type", "float_type", "bool_type", "string_type"):
        message += _type_hint(err["type"], err.get("input"))
    return Problem(_nearest_position(loc, positions, path), loc, message)


def _type_hint(kind: str, value: Any) -> str:
    """Why a strictly typed field refused what the YAML gave it, and how to write it."""
    if isinstance(value, str) and kind != "string_type":
        try:
            parsed = _override_value(value)
        except (yaml.YAMLError, RecursionError):
            parsed = None
        wanted: dict[str, type | tuple[type, ...]] = {"int_type": int, "float_type": (int, float), "bool_type": bool}
        if isinstance(parsed, wanted[kind]) and not (kind != "bool_type" and isinstance(parsed, bool)):
            return f" (got the text {value!r}: write it without quotes)"
        if kind == "bool_type" and value.lower() in ("yes", "no", "on", "off", "y", "n"):
            return f" (got {value!r}: a recipe reads YAML 1.2, where only true and false are booleans)"
    if kind == "int_type" and isinstance(value, float):
        return f" (got {value!r}: write a whole number, without a decimal point)"
    if kind == "string_type" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f" (got the number {value!r}: quote it to make it text, e.g. \"{value}\")"
    if kind == "string_type" and isinstance(value, bool):
        return f" (got the boolean {str(value).lower()}: quote it to make it text)"
    return ""


def _strip_tags(loc: Loc, raw: Any) -> Loc:
    """Drop the union tags pydantic puts into error locations (`train.lora.lora.r` -> `train.lora.r`).

    A tag always comes right after the location of the union's value: a train section's `method` value, or one of the
    data-source tags. Only where the schema has a union: elsewhere a user's key that happens to read `file-source` (or
    equal a sibling `method:` value) is a key, and dropping it left `()` for an unknown top-level key (IndexError)."""
    kept: list[str | int] = []
    node = raw
    just_entered = True
    for part in loc:
        is_tag = isinstance(node, dict) and (part in SOURCE_TAGS or (part == node.get("method") and just_entered))
        if just_entered and is_tag and _is_union(tuple(kept)):
            just_entered = False
            continue
        kept.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
        just_entered = True
    return tuple(kept)


def _is_union(loc: Loc) -> bool:
    """Whether the schema offers several kinds of section at `loc` (train, quantize, a data source)."""
    nodes = [recipe_schema()]
    for part in loc:
        nodes = [child for node in nodes for child in schema_children(node, part)]
    return sum("properties" in alt for node in nodes for alt in _schema_alternatives(node)) > 1


def _known_fields(loc: Loc, raw: dict[str, Any]) -> list[str]:
    nodes = [recipe_schema()]
    for part in loc:
        nodes = [child for node in nodes for child in schema_children(node, part)]
    return sorted({name for node in nodes for name in schema_children(node, None, names=True)})


def _nearest_position(loc: Loc, positions: Positions, path: Path) -> Pos:
    for depth in range(len(loc), -1, -1):
        if loc[:depth] in positions:
            return positions[loc[:depth]]
    return Pos(relative(path), 1, 1)


# --- local paths --------------------------------------------------------------------------------------------------------


def _resolve_local_paths(raw: dict[str, Any], positions: Positions) -> tuple[dict[Loc, str], list[Problem]]:
    """Resolve every local-path field against the file that wrote it (overrides: the working directory)."""
    resolved: dict[Loc, str] = {}
    problems: list[Problem] = []
    for loc, value in _walk(raw, ()):
        if not isinstance(value, str) or not value or not field_has(loc, X_LOCAL_PATH):
            continue
        pos = _nearest_position(loc, positions, Path("recipe"))
        base = Path.cwd() if pos.override is not None else Path(pos.file).parent
        target = _lookup(base / value)
        if target is not None:
            resolved[loc] = str(target)
        else:
            problems.append(Problem(pos, loc, f"no such file or folder: {relative(base / value)}"))
    return resolved, problems


def _lookup(path: Path, want_file: bool = False) -> Path | None:
    """`path` resolved when it exists (and is a file, with want_file), else None. A name the OS refuses (a NUL byte, longer
    than the OS allows) exists nowhere: pathlib would raise ValueError or OSError instead, a traceback for the user."""
    try:
        resolved = path.resolve()
        return resolved if (resolved.is_file() if want_file else resolved.exists()) else None
    except (OSError, ValueError):
        return None


def _walk(value: Any, loc: Loc) -> Iterator[tuple[Loc, Any]]:
    yield loc, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, (*loc, index))


def _set_at(model: Any, loc: Loc, value: Any) -> None:
    for part in loc[:-1]:
        model = model[part] if isinstance(part, int) else getattr(model, part)
    setattr(model, str(loc[-1]), value)
