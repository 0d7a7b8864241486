"""Fuzzing the recipe loader: whatever a recipe file or an override says, the user gets RecipeError or a recipe, never a
traceback, and every problem names a field path (or is a YAML/file-level problem) at a real line of the right file.

Run:
    pytest -q tests/test_fuzz_recipes.py                        # FUZZ_EXAMPLES=200 per property (5 properties: 1,000)
    FUZZ_EXAMPLES=5000 pytest -q tests/test_fuzz_recipes.py     # the long run; `nox -s fuzz` sets this
    FUZZ_EXAMPLES=5000 FUZZ_SEED=7 pytest -q tests/test_fuzz_recipes.py   # another fixed seed (default: derandomized)

Generated cases: (a) valid recipes with a few mutations (wrong types, out-of-range numbers, bad enums, removed required
fields, extra keys at random depths), sometimes split across a base file and an `extends` child; (b) random keys and
nesting, built around the real section and field names; (c) random YAML text: a valid recipe with fragments spliced in
(tabs, unbalanced brackets, anchors and aliases, odd unicode, huge numbers, tags such as !!python/object, duplicate keys),
and free text or bytes; (d) random command-line overrides. Each case is also run through `recipe validate` (runner.cli.main):
exit 0 or 2, and no traceback on either stream.

Runs are reproducible (derandomize, or the fixed FUZZ_SEED) and write no .hypothesis database. The crashes fuzzing found are
kept as plain tests at the end of the file.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import sys
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from runner.cli import main as cli_main
from runner.recipe import Loaded, RecipeError, load_recipe
from runner.recipe.problems import Problem, dotted, relative
from runner.recipe.schema import recipe_schema, schema_children

DEFAULT_EXAMPLES = 200
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", str(DEFAULT_EXAMPLES)))
SEED = os.environ.get("FUZZ_SEED")

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=SEED is None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz(test):  # noqa: ANN001, ANN201 - a decorator
    test = FUZZ(test)
    return seed(int(SEED))(test) if SEED is not None else test


# --- valid recipes to start from ----------------------------------------------------------------------------------------

BASES: list[dict[str, Any]] = [
    {  # the classifier of tests/test_recipe_errors.py: every section, a local data file
        "name": "demo", "seed": 1,
        "model": {"init": {"architecture": "distilbert"}, "task": "sequence-classification"},
        "data": {"source": {"path": "reviews.csv"}, "max_length": 64},
        "train": {"method": "lora", "lora": {"r": 8, "target_modules": ["q_lin", "v_lin"]}, "learning_rate": 0.001},
        "export": {"format": "onnx"},
        "quantize": {"method": "onnx-dynamic-int8"},
        "serve": {"probes": [{"text": "great", "expect_label": "positive"}]},
    },
    {  # a hub causal LM: mixed sources, qlora with distributed, fp16 CUDA decoder, int4 weights, prompt probes, hardware
        "name": "lm-1.0", "description": "fuzz base",
        "requires": {"accelerator": "cuda", "min_gpu_memory_gb": 8, "min_compute_capability": "8.0"},
        "model": {"hub": "org/tiny-llama", "revision": "a" * 40, "task": "causal-lm", "trust_remote_code": False},
        "data": {
            "sources": [
                {"rows": {"instruction": ["hi", "yo"], "output": ["a", "b"]}, "weight": 2},
                {"hub": "org/ds", "revision": "b" * 40, "split": "train[:10%]"},
            ],
            "template": "Q: {instruction}\nA: {output}", "response_template": "A: {output}", "mask_prompt": True,
        },
        "train": {
            "method": "qlora", "lora": {"target_modules": "all-linear"}, "quantization": {"bits": 4},
            "eval_strategy": "steps", "eval_steps": 5, "distributed": {"nproc_per_node": 2, "fsdp_config": {"x": 1}},
        },
        "export": {"format": "onnx", "precision": "fp16", "execution_provider": "cuda", "rtol": 0.02},
        "quantize": {"method": "onnx-weight-only", "bits": 4, "algorithm": "k_quant", "block_size": 64},
        "serve": {"probes": [{"prompt": "hi", "expect_nonempty": True, "expect_pattern": "^.*$"}], "concurrency": 2},
    },
    {  # a small built llama, inline rows, full fine-tune, safetensors export, bitsandbytes quantize, no serve
        "name": "m", "env": "cuda13",
        "model": {"init": {"architecture": "llama", "hidden_size": 32, "num_heads": 4}, "task": "causal-lm"},
        "data": {"source": {"rows": {"text": ["a b", "c d"]}}, "template": "{text}", "columns": {"body": "text"}},
        "train": {"method": "full", "epochs": 1, "precision": "bf16"},
        "export": {"format": "safetensors"},
        "quantize": {"method": "bnb-4bit"},
    },
]


def _schema_words() -> tuple[list[str], list[Any]]:
    """Every field name and every enum/const value in the recipe schema (so mutations reach deep validation)."""
    names: set[str] = set()
    enums: list[Any] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            names.update(node.get("properties", {}))
            enums.extend(node.get("enum", []))
            if "const" in node:
                enums.append(node["const"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(recipe_schema())
    names.discard("extends")  # a random `extends` would read files outside the example; tested on its own below
    return sorted(names), enums


FIELD_NAMES, ENUMS = _schema_words()
NEAR_MISSES = [str(e).upper() for e in ENUMS if isinstance(e, str)] + [f"{n}s" for n in FIELD_NAMES[:20]]

keys_text = st.text(st.characters(codec="utf-8"), max_size=12)
field_keys = st.sampled_from(FIELD_NAMES) | keys_text
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.sampled_from([0, -1, 2**31, 2**63, 10**40, -(10**40), 10**300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(ENUMS + NEAR_MISSES + ["", " ", "reviews.csv", "../reviews.csv", "/", "a" * 300, "org/model"]),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(field_keys, inner, max_size=3), max_leaves=8
)
# (b): any hashable YAML key, not only strings
any_keys = field_keys | st.integers(-3, 3) | st.none() | st.booleans() | st.floats(allow_nan=False)


# --- checking one case --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def std_streams() -> Iterator[tuple[io.TextIOWrapper, io.TextIOWrapper]]:
    """Capture stdout/stderr as a real process has them: UTF-8, strict on stdout, backslashreplace on stderr."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace", write_through=True)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        yield out, err
    finally:
        sys.stdout, sys.stderr = saved


def shown_names(folder: Path) -> dict[str, Path]:
    """Every way a problem may name a file in the example's folder (as given, resolved, relative to the cwd)."""
    names: dict[str, Path] = {}
    for path in folder.iterdir():
        for name in (str(path), str(path.resolve()), relative(path), relative(path.resolve())):
            names[name] = path
    return names


# What PyYAML counts as a line break (and so as a new line in its marks): \r\n, \r, \n, NEL, LS, PS.
LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def check_problem(problem: Problem, files: dict[str, Path], overrides: tuple[str, ...]) -> None:
    assert isinstance(problem.message, str) and problem.message.strip(), problem
    pos = problem.pos
    text = str(problem)
    if pos.override is not None:
        assert pos.override in overrides, problem
        assert text.startswith(f"override '{pos.override}': "), text
        # a malformed override is the one problem of an override that names no field
        assert problem.loc or "an override looks like" in problem.message, text
    else:
        assert pos.file in files, f"{text!r} names a file the recipe does not come from ({sorted(files)})"
        lines = len(LINE_BREAK.findall(files[pos.file].read_bytes().decode("utf-8", "replace"))) + 1
        assert 1 <= pos.line <= lines and pos.col >= 1, f"{text!r}: line {pos.line} not in 1..{lines}"
        assert text.startswith(f"{pos.file}:{pos.line}:{pos.col}: "), text
    assert text.endswith(f": {dotted(problem.loc) or '(recipe)'}: {problem.message}"), text


def check_case(path: Path, overrides: tuple[str, ...] = ()) -> tuple[Loaded | None, list[Problem]]:
    """Load `path` (RecipeError or a recipe, nothing else), check every problem, then run `recipe validate` on it."""
    files = shown_names(path.parent)
    try:
        loaded, found = load_recipe(path, overrides), []
    except RecipeError as exc:
        loaded, found = None, exc.problems
        assert found, "a RecipeError lists at least one problem"
        assert str(exc) == "\n".join(str(p) for p in found)
    for problem in found:
        check_problem(problem, files, overrides)
        note("problem: " + ("YAML" if problem.message.startswith("YAML:") else "field" if problem.loc else "recipe/file"))
    note("loaded" if loaded else "RecipeError")  # --hypothesis-show-statistics shows how deep the cases reach
    with std_streams() as (out, err):
        code = cli_main(["validate", str(path), *overrides])
    printed = out.buffer.getvalue().decode() + err.buffer.getvalue().decode()  # type: ignore[attr-defined]
    assert code == (0 if loaded else 2), printed
    assert "Traceback" not in printed, printed
    if loaded is None and all("=" in o for o in overrides):  # (without "=" the CLI stops at a usage error first)
        # Rich drops some control characters (CR, BEL, ...) and expands tabs: compare positions without them, and the count
        assert all(squash(str(problem.pos)) in squash(printed) for problem in found), printed
        assert f"{len(found)} problem" in printed, printed
    return loaded, found


def squash(text: str) -> str:
    return "".join(ch for ch in text if not ch.isspace() and unicodedata.category(ch) != "Cc")


def note(what: str) -> None:
    if currently_in_test_context():  # check_case also serves the plain tests at the end
        event(what)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fresh_dir(root: Path, name: str) -> Path:
    """An empty folder per property (one example at a time: leftovers of the last example are removed)."""
    folder = root / name
    folder.mkdir(exist_ok=True)
    for path in folder.iterdir():
        path.unlink()
    (folder / "reviews.csv").write_text("text,label\ngood,positive\nbad,negative\n")
    return folder


# What the !!python fragments below would create, were they ever run (absolute: they would run in any working directory)
MARKER = Path(tempfile.gettempdir()) / f"recipe-fuzz-ran-{os.getpid()}"


def assert_nothing_ran() -> None:
    assert not MARKER.exists(), "a YAML tag executed code"


# --- (a) right structure, wrong values ----------------------------------------------------------------------------------


def walk(value: Any, loc: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    yield loc, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk(item, (*loc, index))


def known_fields(loc: tuple) -> list[str]:
    nodes = [recipe_schema()]
    for part in loc:
        nodes = [child for node in nodes for child in schema_children(node, part)]
    return sorted({name for node in nodes for name in schema_children(node, None, names=True)} - {"extends"})


def get(doc: Any, loc: tuple) -> Any:
    for part in loc:
        doc = doc[part]
    return doc


def mutate(draw: Any, doc: dict[str, Any]) -> tuple[str, tuple]:
    """One mutation of `doc` in place: set a field (present or not) to a wrong value, delete one, or add an extra key."""
    kind = draw(st.sampled_from(["set", "set", "set", "delete", "extra"]))
    mappings = [loc for loc, value in walk(doc) if isinstance(value, dict)]
    if kind == "delete":
        present = [loc for loc, _ in walk(doc) if loc and isinstance(get(doc, loc[:-1]), dict)]
        loc = draw(st.sampled_from(present))
        del get(doc, loc[:-1])[loc[-1]]
        return kind, loc
    parent = draw(st.sampled_from(mappings))
    names = sorted({*get(doc, parent), *known_fields(parent)}, key=str)
    if kind == "extra" or not names:  # (a free-form mapping such as data.columns has no field names)
        key = draw(keys_text.filter(lambda k: k not in names and k != "extends"))
    else:
        key = draw(st.sampled_from(names))
    value = draw(values)
    get(doc, parent)[key] = value
    return kind, (*parent, key)


def key_positions(text: str, shown: str) -> dict[tuple, tuple[str, int, int]]:
    """Where each key (and list item) of a YAML text was written, found with PyYAML's composer."""
    found: dict[tuple, tuple[str, int, int]] = {}

    def visit(node: yaml.Node, loc: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                found[(*loc, key.value)] = (shown, key.start_mark.line + 1, key.start_mark.column + 1)
                visit(value, (*loc, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                found[(*loc, index)] = (shown, item.start_mark.line + 1, item.start_mark.column + 1)
                visit(item, (*loc, index))

    visit(yaml.compose(text, Loader=yaml.SafeLoader), ())
    return found


DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when there: the cases only need to be valid YAML


def dump(draw: Any, doc: Any) -> str:
    flow = draw(st.sampled_from([False, None, True]))
    return yaml.dump(doc, Dumper=DUMPER, allow_unicode=draw(st.booleans()), sort_keys=False, default_flow_style=flow,
                     width=10**6)


def split(draw: Any, doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Spread a document over a base and a child that extends it: each section goes to one, the other, or both."""
    base: dict[str, Any] = {}
    child: dict[str, Any] = {"extends": "base.yaml"}
    for key, value in doc.items():
        where = draw(st.sampled_from(["base", "child", "both"] if isinstance(value, dict) and value else ["base", "child"]))
        if where == "both":
            base[key], child[key] = {}, {}
            for inner, item in value.items():
                (base if draw(st.booleans()) else child)[key][inner] = item
        else:
            (base if where == "base" else child)[key] = value
    return base, child


@fuzz
@given(data=st.data())
def test_wrong_values_in_right_structure(root: Path, data: st.DataObject) -> None:
    folder = fresh_dir(root, "a")
    doc = copy.deepcopy(data.draw(st.sampled_from(BASES)))
    mutations = [mutate(data.draw, doc) for _ in range(data.draw(st.integers(1, 3)))]
    path = folder / "r.yaml"
    if data.draw(st.booleans()) and isinstance(doc, dict):
        base, child = split(data.draw, doc)
        texts = {folder / "base.yaml": dump(data.draw, base), path: dump(data.draw, child)}
    else:
        texts = {path: dump(data.draw, doc)}
    for file, text in texts.items():
        file.write_text(text, encoding="utf-8")
    loaded, found = check_case(path)
    if loaded is None:
        check_attribution(found, [loc for _, loc in mutations], texts)


# What the recipe-wide rules (runner/recipe/rules.py, the first scope) say: they read several sections and report at the
# field they are about, so a mutation in one section (export) may surface in another (quantize.method).
CROSS_SECTION = ("an ONNX quantize needs", "ONNX Runtime cannot quantize a fused graph", "a `serve` section needs",
                 "model is probed with", "a causal-lm recipe needs `data.template`", "ONNX export of a LoRA model needs",
                 "a classifier is exported in fp32", "builds a decoder for the CUDA provider",
                 "quantizes activations, which ruins", "onnx-weight-only is built by the causal-LM exporter")


def check_attribution(found: list[Problem], touched: list[tuple], texts: dict[Path, str]) -> None:
    """Each problem is in a section a mutation touched (or recipe-wide), and one at exactly a mutated field that the
    file writes points at that key's line and column, in the file that wrote it (the child's keys win, as its values do).
    """
    positions: dict[tuple, tuple[str, int, int]] = {}
    for problem in found:
        if problem.pos.override is None and problem.loc and not any(part in problem.message for part in CROSS_SECTION):
            # a mutation only breaks its own section (a union re-dispatches inside it); across sections: a recipe rule
            assert any(problem.loc[0] == loc[0] for loc in touched), (str(problem), touched)
        if problem.loc in touched:
            if not positions:  # composed only when needed: pure-Python PyYAML is the slow part of a case
                for file, text in texts.items():  # the base first
                    positions.update(key_positions(text, relative(file.resolve() if file.name == "base.yaml" else file)))
                positions.pop(("extends",), None)
            if problem.loc in positions:
                file, line, col = positions[problem.loc]
                assert (problem.pos.file, problem.pos.line, problem.pos.col) == (file, line, col), (str(problem), texts)


# --- (b) random keys and nesting ----------------------------------------------------------------------------------------

section_names = st.sampled_from(["name", "model", "data", "train", "export", "quantize", "serve", "requires", "seed", "env"])


def _nested(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=4) | st.dictionaries(any_keys, inner, max_size=5)


random_docs = st.recursive(scalars, _nested, max_leaves=25)


@fuzz
@given(data=st.data())
def test_random_keys_and_nesting(root: Path, data: st.DataObject) -> None:
    folder = fresh_dir(root, "b")
    doc = data.draw(st.one_of(random_docs, st.dictionaries(section_names | any_keys, random_docs, max_size=8)))
    path = folder / "r.yaml"
    path.write_text(dump(data.draw, doc), encoding="utf-8")
    check_case(path)


# --- (c) random YAML text -----------------------------------------------------------------------------------------------

GOOD_TEXT = yaml.safe_dump(BASES[0], sort_keys=False)

FRAGMENTS = [
    "\t", "\t\t- x", "  ", "\n", "[", "]", "{", "}", "[[", "]]", "{a: [1, {b: ", "- ", "? ", ": ", ":", ",", "'", '"',
    "'unterminated", '"\\x', '"\\ud800"', '"\\uDFFF\\ud800"', '"\\0"', '"\\e\\a\\L\\P"', "#", "# comment", "|", ">", "|-\n  a",
    "&a", "&a ", "*a", "*missing", "&x [*x]", "&m {k: *m}", "<<: *a", "<<: [*a, *a]", "<<: 3", "&a {seed: 1}",
    "&b [&c x, *c, *c]", "!!str", "!!int x", "!!float", "!!null", "!!bool yes", "!!binary aGVsbG8=", "!!binary 3",
    "!!set {a, b}", "!!omap [a: 1]", "!!pairs [a: 1]", "!!timestamp 2001-12-14", "!!map [1]", "!!seq {a: 1}",
    "!custom x", "!<tag:yaml.org,2002:python/object:os.system> x", "%YAML 1.1\n---\n", "%TAG ! tag:evil.com,2000:\n---\n",
    "---\n", "...\n", "--- |\n", "\ufeff", "\u2028", "\u2029", "\x85", "\x00", "\x07", "\x1b[31m", "\u202e", "\u200b",
    "é", "𝓷𝓪𝓶𝓮", "😀", "名前", "ǅ", "\ud7ff", "\ufffd", "０", "²",
    "1" * 5000, "9" * 20, "-" + "9" * 30, "1e400", "-1e400", ".inf", "-.inf", ".nan", "0x1F", "0o17", "0b101", "1_000",
    "+12", "012", "1:20", "2001-12-14", "2001-12-14t21:59:43.10-05:00", "~", "null", "Null", "NULL", "yes", "No", "on",
    "off", "y", "n", "seed: 1\nseed: 2", "name: a\nname: b", "model:\n  task: a\n  task: b", "? [a, b]\n: 1", "? {a: 1}\n: 2",
    "? |\n  block\n: 3", "extends: reviews.csv", "extends: r.yaml", "extends: ''", "extends: [a]", "extends: ../nope.yaml",
    f"!!python/object/apply:os.system ['touch {MARKER}']",
    f"!!python/object/apply:subprocess.call [[touch, '{MARKER}']]",
    f"!!python/object/apply:os.mkdir ['{MARKER}']",
    f"!!python/object/new:builtins.open ['{MARKER}', w]",
    "!!python/name:os.system", "!!python/module:os", "!!python/tuple [1, 2]", "!!python/none ''",
    "[" * 60 + "]" * 60, "{a: " * 40 + "1" + "}" * 40,
]

fragments = st.sampled_from(FRAGMENTS) | st.text(max_size=8)
separators = st.sampled_from(["", " ", "\n", "\n  ", "\n    ", ": ", "\n- "])


@st.composite
def yaml_texts(draw: Any) -> str:
    how = draw(st.sampled_from(["splice", "splice", "splice", "fragments", "text"]))
    if how == "text":
        return draw(st.text(max_size=300))
    if how == "fragments":
        return "".join(draw(separators) + draw(fragments) for _ in range(draw(st.integers(1, 12))))
    lines = GOOD_TEXT.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):  # insert a fragment at some line and column of the valid recipe
        index = draw(st.integers(0, len(lines) - 1))
        col = draw(st.integers(0, len(lines[index])))
        lines[index] = lines[index][:col] + draw(fragments) + draw(separators) + lines[index][col:]
    return "".join(lines)


@fuzz
@given(text=yaml_texts(), raw=st.none() | st.binary(max_size=8), at=st.integers(0, 10**4))
def test_random_yaml_text(root: Path, text: str, raw: bytes | None, at: int) -> None:
    folder = fresh_dir(root, "c")
    encoded = text.encode("utf-8", "surrogatepass")  # a "\ud800" fragment must not be a write error
    if raw is not None:  # bytes that need not be UTF-8
        at %= len(encoded) + 1
        encoded = encoded[:at] + raw + encoded[at:]
    path = folder / "r.yaml"
    path.write_bytes(encoded)
    check_case(path)
    assert_nothing_ran()


@fuzz
@given(text=yaml_texts())
def test_random_yaml_text_in_a_base_file(root: Path, text: str) -> None:
    """The same texts as the base of an `extends` child: problems name the base file at its line."""
    folder = fresh_dir(root, "e")
    (folder / "base.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
    (folder / "r.yaml").write_text("extends: base.yaml\nname: child\n")
    check_case(folder / "r.yaml")
    assert_nothing_ran()


# --- (d) overrides ------------------------------------------------------------------------------------------------------

ALL_PATHS = sorted({dotted(loc) for base in BASES for loc, _ in walk(base) if loc}, key=str)
override_paths = st.sampled_from(ALL_PATHS) | st.builds(
    lambda parts: ".".join(parts), st.lists(st.sampled_from(FIELD_NAMES) | keys_text | st.sampled_from(["0", "1", "99"]),
                                            min_size=1, max_size=4)
)
override_values = st.sampled_from(FRAGMENTS) | st.text(max_size=20) | values.map(
    lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()
)


@fuzz
@given(
    base=st.sampled_from(BASES),
    overrides=st.lists(st.builds(lambda p, v: f"{p}={v}", override_paths, override_values) | st.text(max_size=30),
                       max_size=4),
)
def test_random_overrides(root: Path, base: dict[str, Any], overrides: list[str]) -> None:
    folder = fresh_dir(root, "d")
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    overrides = [o for o in overrides if not o.startswith("-")]  # the CLI takes those for options
    check_case(path, tuple(overrides))
    assert_nothing_ran()


# --- the crashes fuzzing found (each was a traceback before; see runner/recipe/load.py) ---------------------------------


def load_problems(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> list[str]:
    (tmp_path / "reviews.csv").write_text("text,label\ngood,positive\nbad,negative\n")
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, overrides)
    check_case(path, overrides)
    return [str(p).replace(str(path), "r.yaml") for p in caught.value.problems]


LAUGHS = "".join(f"{a}: &{a} [{', '.join([f'*{b}'] * 10)}]\n" for a, b in zip("bcdefgh", "abcdefg", strict=True))
FOUND = [
    # the YAML reader refuses control characters in the loader's constructor, outside the try: ReaderError
    ("name: a\x01b\n", "r.yaml:1:8: (recipe): YAML: unacceptable character #x0001: special characters are not allowed"),
    ("seed: 1\nname: \x00\n", "r.yaml:2:7: (recipe): YAML: unacceptable character #x0000"),
    # a list or mapping as a key: TypeError unhashable type
    ("? [a, b]\n: 1\nname: x\n", "r.yaml:1:3: (recipe): a key must be a plain name, not a list or mapping"),
    ("model:\n  ? {a: 1}\n  : 2\n", "r.yaml:2:5: model: a key must be a plain name"),
    # an alias inside the value it names: RecursionError walking the node tree
    ("name: &a [*a]\n", "r.yaml:1:7: (recipe): YAML: an alias refers to the value that contains it (a cycle)"),
    ("model: &m {x: *m}\n", "r.yaml:1:8: (recipe): YAML: an alias refers to the value that contains it"),
    # billion laughs: 22 s and growing tenfold per line
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + LAUGHS, "r.yaml:1:1: (recipe): YAML: aliases expand this recipe to"),
    # nesting deeper than Python's recursion limit: RecursionError in PyYAML's composer
    ("a: " + "[" * 600 + "]" * 600 + "\n", "r.yaml:1:1: (recipe): YAML: lists or mappings nested too deeply"),
    # an int longer than sys.get_int_max_str_digits(), and explicit tags the value does not fit: ValueError/KeyError from
    # PyYAML's scalar constructors
    ("name: x\nseed: " + "9" * 5000 + "\n", "r.yaml:2:7: (recipe): YAML: cannot read '9999999999999999999999999999999999999999...' as int (ValueError: Exceeds the limit"),
    ("!!bool yesname: demo\n", "r.yaml:1:1: (recipe): YAML: cannot read 'yesname' as bool (KeyError: 'yesname')"),
    ("name: x\nseed: !!int x\n", "r.yaml:2:7: (recipe): YAML: cannot read 'x' as int (ValueError"),
    ("name: x\nseed: !!float x\n", "r.yaml:2:7: (recipe): YAML: cannot read 'x' as float (ValueError"),
    ("name: x\nseed: !!timestamp soon\n", "r.yaml:2:7: (recipe): YAML: cannot read 'soon' as timestamp"),
    ("name: x\nseed: !!float\n", "r.yaml:2:7: (recipe): YAML: cannot read '' as float (IndexError"),
    # names the OS refuses, in `extends` and in local paths: ValueError (NUL) and OSError (ENAMETOOLONG)
    ('extends: "a\\0b"\n', "r.yaml:1:1: extends: base recipe not found"),
    ("extends: " + "a" * 5000 + "\n", "r.yaml:1:1: extends: base recipe not found"),
    ('name: x\ndata:\n  source: {path: "x\\0y"}\n', "r.yaml:3:12: data.source.path: no such file or folder"),
    ("name: x\ndata:\n  source: {path: " + "b" * 5000 + "}\n", "r.yaml:3:12: data.source.path: no such file or folder"),
    # a key spelled like a union tag where there is no union was dropped as a tag: () and IndexError
    ("name: x\nfile-source: null\n", "r.yaml:2:1: file-source: unknown field 'file-source'"),
    ("name: x\nmethod: x\nx: 1\n", "r.yaml:3:1: x: unknown field 'x'"),
    ("name: x\nmodel: {method: hub-source, hub-source: 1}\n", "r.yaml:2:29: model.hub-source: unknown field 'hub-source'"),
]


@pytest.mark.parametrize("text,expected", FOUND, ids=range(len(FOUND)))
def test_found_by_fuzzing(tmp_path: Path, text: str, expected: str) -> None:
    started = time.perf_counter()
    found = load_problems(tmp_path, text)
    assert any(p.startswith(expected) for p in found), found
    assert time.perf_counter() - started < 10


@pytest.mark.parametrize("override,expected", [
    ("train.²=1", "override 'train.²=1': train.²: unknown field '²' in train"),  # '²'.isdigit(), but int('²') raises
    ('data.source.path="\\0"', "override 'data.source.path=\"\\0\"': data.source.path: no such file or folder"),
    ("data.source.path=" + "c" * 5000, "override 'data.source.path=ccc"),
    ("seed=" + "9" * 5000, "override 'seed=999"),
    # a list containing itself: RecursionError in the local-path walk
    ("data=!!float", "override 'data=!!float': data: the value is not valid YAML: cannot read '' as float (IndexError"),
    ("description=&x [*x]", "override 'description=&x [*x]': description: the value is not valid YAML: an alias refers"),
    ("seed=\x07", "override 'seed=\x07': seed: the value is not valid YAML: unacceptable character #x0007"),
])
def test_overrides_found_by_fuzzing(tmp_path: Path, override: str, expected: str) -> None:
    text = yaml.safe_dump(BASES[0], sort_keys=False)
    found = load_problems(tmp_path, text, (override,))
    assert any(p.startswith(expected) for p in found), found


def test_a_recipe_name_longer_than_the_os_allows_is_a_problem_not_a_traceback(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with std_streams() as (_, err):
        assert cli_main(["validate", "r" * 5000]) == 2
    assert "no such recipe file or recipe name" in err.buffer.getvalue().decode()  # type: ignore[attr-defined]


def test_an_impossible_expect_pattern_is_a_problem(tmp_path: Path) -> None:
    """re.compile raises OverflowError, not re.error, for a repeat count past 2**32 (models.py Probe)."""
    doc = copy.deepcopy(BASES[1])
    for pattern in ("a{4294967296}", "(" * 2000 + ")" * 2000):
        doc["serve"]["probes"][0]["expect_pattern"] = pattern
        found = load_problems(tmp_path, yaml.safe_dump(doc, sort_keys=False, width=10**6))
        assert any("serve.probes.0.expect_pattern: `expect_pattern` is not a valid regular expression" in p for p in found), found


def test_the_cli_prints_a_key_as_written(tmp_path: Path) -> None:
    """Rich replaces `:name:` emoji codes unless told not to (runner/cli.py consoles)."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASES[0], ":thumbs_up:": 1}, sort_keys=False))
    with std_streams() as (_, err):
        assert cli_main(["validate", str(path)]) == 2
    assert "unknown field ':thumbs_up:'" in err.buffer.getvalue().decode()  # type: ignore[attr-defined]


def test_the_bases_are_valid(tmp_path: Path) -> None:
    (tmp_path / "reviews.csv").write_text("text,label\ngood,positive\nbad,negative\n")
    for base in BASES:
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
        loaded, found = check_case(tmp_path / "r.yaml")
        assert loaded is not None, found


def test_the_fuzzing_runs_enough_examples() -> None:
    properties = [value for name, value in globals().items() if name.startswith("test_") and hasattr(value, "hypothesis")]
    assert len(properties) * DEFAULT_EXAMPLES >= 200  # the normal test run: 5 x 200
    for test in properties:  # each property runs FUZZ_EXAMPLES cases (5,000 each in `nox -s fuzz`)
        assert test._hypothesis_internal_use_settings.max_examples == EXAMPLES, test.__name__
