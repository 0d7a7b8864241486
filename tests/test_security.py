"""Security specifications: each test fails if its protection breaks.

1. YAML tags that would construct objects (and the other non-plain tags) are refused, and nothing they name runs.
2. Model-shipped code runs only when the recipe says `trust_remote_code: true`, passed to from_pretrained as a real bool.
3. Pickle weights are refused unless `allow_pickle: true` (before anything is unpickled); a train step leaves no pickles.
4. The server binds 127.0.0.1 unless told otherwise, and an API key, when set, guards every route but /health.
5. A token in the environment never lands in runs/, the cache or a lock file, also when a step crashes.
6. Recipe paths cannot make a step write outside its run folder and its cache work folder.

Fast by design: the executor runs the test-only stages of tests/fake_stages.py; models are the tiny conftest fixtures.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import json
import os
import pickle
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.cli import main
from runner.recipe import RecipeError, load_recipe
from tests import fake_stages
from tests.conftest import save_as_pickle

REPO = Path(__file__).resolve().parent.parent

RECIPE = """\
name: sec
model:
  init: {architecture: distilbert}
  task: sequence-classification
data:
  source: {path: reviews.csv}
train:
  method: lora
  lora: {r: 4, target_modules: [q_lin, v_lin]}
export: {format: onnx}
quantize: {method: onnx-dynamic-int8}
serve:
  probes:
    - {text: great, expect_label: positive}
"""


def write_recipe(folder: Path, text: str = RECIPE, name: str = "r.yaml") -> Path:
    (folder / "reviews.csv").write_text("text,label\ngood,positive\nbad,negative\n")
    path = folder / name
    path.write_text(text)
    return path


def problems_of(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, overrides)
    return [str(p) for p in caught.value.problems]


# --- 1. YAML tags -------------------------------------------------------------------------------------------------------


def payloads(marker: Path) -> list[str]:
    """Tags that would run code or build Python objects under an unsafe loader; the first three would create `marker`."""
    return [
        f"!!python/object/apply:os.mkdir ['{marker}']",
        f"!!python/object/apply:subprocess.check_call [[mkdir, '{marker}']]",
        f"!<tag:yaml.org,2002:python/object/apply:os.mkdir> ['{marker}']",
        "!!python/name:os.system",
        "!!python/module:os",
        "!!python/object:argparse.Namespace {x: 1}",
        "!!python/object/new:builtins.bytearray [3]",
        "!!python/tuple [a, b]",
    ]


def test_the_payloads_are_live(tmp_path: Path) -> None:
    """Under yaml.unsafe_load the first payload does run: the tests below would notice a loader that ran it."""
    marker = tmp_path / "ran"
    yaml.unsafe_load(payloads(marker)[0])
    assert marker.is_dir()


@pytest.mark.parametrize("index", range(8))
@pytest.mark.parametrize("where", ["name", "nested", "list item", "key", "base file", "override"])
def test_object_constructing_tags_are_refused_and_nothing_runs(tmp_path: Path, where: str, index: int) -> None:
    marker = tmp_path / "ran"
    tag = payloads(marker)[index]
    overrides: tuple[str, ...] = ()
    if where == "name":
        path = write_recipe(tmp_path, RECIPE.replace("name: sec", f"name: {tag}"))
    elif where == "nested":
        path = write_recipe(tmp_path, RECIPE.replace("{r: 4, target_modules: [q_lin, v_lin]}", f"\n    r: {tag}\n    target_modules: [q_lin]"))
    elif where == "list item":
        path = write_recipe(tmp_path, RECIPE.replace("{r: 4, target_modules: [q_lin, v_lin]}", f"\n    target_modules:\n      - q_lin\n      - {tag}"))
    elif where == "key":
        path = write_recipe(tmp_path, RECIPE + f"? {tag}\n: 1\n")
    elif where == "base file":
        write_recipe(tmp_path, RECIPE.replace("name: sec", f"name: sec\nseed: {tag}"), "base.yaml")
        path = write_recipe(tmp_path, "extends: base.yaml\nname: child\n")
    else:
        path = write_recipe(tmp_path)
        overrides = (f"seed={tag}",)
    found = problems_of(path, overrides)
    refused = [p for p in found if "python/" in p and "could not determine a constructor" in p]
    if where == "key" and tag.endswith(("]", "}")):  # a tagged list or mapping as a key: refused before construction
        refused += [p for p in found if "a key must be a plain name, not a list or mapping" in p]
    assert refused, found
    assert main(["validate", str(path), *overrides]) == 2
    assert not marker.exists(), "a YAML tag ran code"


@pytest.mark.parametrize("tag", ["!!binary aGVsbG8=", "!!set {a, b}", "!!omap [a: 1]", "!!pairs [a: 1]"])
def test_other_non_plain_tags_are_refused_inside_fields(tmp_path: Path, tag: str) -> None:
    # `name: !!binary aGVsbG8=` used to load as name "hello": pydantic turns bytes into a str without a word
    path = write_recipe(tmp_path, RECIPE.replace("name: sec", f"name: {tag}"))
    found = problems_of(path)
    assert any(f"{path}:1:7: (recipe): YAML: the tag 'tag:yaml.org,2002:" in p and "is not allowed in a recipe" in p
               for p in found), found
    assert any("is not allowed in a recipe" in p for p in problems_of(write_recipe(tmp_path), (f"name={tag}",)))


@functools.cache
def runner_sources() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted((REPO / "runner").rglob("*.py"))]


def test_no_code_path_uses_an_unsafe_yaml_loader() -> None:
    """Every YAML read in runner/ goes through SafeLoader (or the recipe loader built on it)."""
    never = {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "Loader", "FullLoader", "UnsafeLoader",
             "CLoader", "CFullLoader", "CUnsafeLoader"}
    safe = {"SafeLoader", "CSafeLoader", "_RecipeLoader"}
    unsafe = []
    for path, tree in runner_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "yaml":
                if node.attr in never:
                    unsafe.append(f"{path.relative_to(REPO)}:{node.lineno}: yaml.{node.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("load", "load_all"):
                loader = next((k.value for k in node.keywords if k.arg == "Loader"), node.args[1] if len(node.args) > 1 else None)
                name = loader.attr if isinstance(loader, ast.Attribute) else getattr(loader, "id", None)
                if isinstance(node.func.value, ast.Name) and node.func.value.id == "yaml" and name not in safe:
                    unsafe.append(f"{path.relative_to(REPO)}:{node.lineno}: yaml.{node.func.attr} with Loader={name}")
    assert unsafe == [], unsafe
    from runner.recipe import load as recipe_load

    assert issubclass(recipe_load._RecipeLoader, yaml.SafeLoader)
    for table in (recipe_load._RecipeLoader.yaml_constructors, recipe_load._RecipeLoader.yaml_multi_constructors):
        assert not [tag for tag in table if tag and "python/" in tag]


# --- 2. remote code -----------------------------------------------------------------------------------------------------


def loaded_model_config(tmp_path: Path, extra: str = "") -> dict[str, Any]:
    """The `model` config a step receives for RECIPE (+ extra lines under `model:`), via the real loader and planner."""
    from runner.plan import step_configs

    text = RECIPE.replace("  task: sequence-classification", "  task: sequence-classification" + extra)
    loaded = load_recipe(write_recipe(tmp_path, text))
    return step_configs(loaded.recipe)[0].config["model"]


def test_trust_remote_code_is_false_unless_the_recipe_says_true(tmp_path: Path) -> None:
    from runner.stages.pretrained import pretrained_source

    for extra, expected in [("", False), ("\n  trust_remote_code: false", False), ("\n  trust_remote_code: true", True)]:
        config = loaded_model_config(tmp_path, extra)
        assert config["trust_remote_code"] is expected
        _, kwargs = pretrained_source(config, {"model": tmp_path})
        assert kwargs["trust_remote_code"] is expected  # a real bool: None would make transformers ask on stdin
    for bad in ("null", "maybe", "[true]"):
        with pytest.raises(RecipeError, match="model.trust_remote_code: Input should be a valid boolean"):
            loaded_model_config(tmp_path, f"\n  trust_remote_code: {bad}")


@pytest.mark.parametrize("source", ["hub", "path", "init"])
def test_every_model_source_passes_an_explicit_trust_remote_code(tmp_path: Path, source: str) -> None:
    from runner.recipe.sections import Model, ModelInit
    from runner.stages.pretrained import pretrained_source

    where: dict[str, Any] = {
        "hub": {"hub": "org/m", "revision": "main"}, "path": {"path": str(tmp_path)}, "init": {"init": ModelInit(architecture="llama")},
    }[source]
    for trust in (False, True):
        model = Model(task="causal-lm", trust_remote_code=trust, **where)
        _, kwargs = pretrained_source(model.model_dump(mode="json"), {"model": tmp_path})
        assert kwargs["trust_remote_code"] is trust and kwargs["use_safetensors"] is True


def test_load_model_and_tokenizer_hand_the_guards_to_from_pretrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kwargs a caller passes cannot switch the guards off: the recipe's values win."""
    import transformers

    from runner.recipe.sections import Model
    from runner.stages import pretrained

    seen: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return types.SimpleNamespace(pad_token="[PAD]", eos_token=None, padding_side="left")

    for cls in (transformers.AutoModelForSequenceClassification, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", spy)
    cfg = Model(path=str(tmp_path), task="sequence-classification")
    pretrained.load_tokenizer(cfg, {})
    pretrained.load_model(cfg, {}, trust_remote_code=True, use_safetensors=False)
    assert seen[0]["trust_remote_code"] is False and "use_safetensors" not in seen[0]
    assert seen[1]["trust_remote_code"] is False and seen[1]["use_safetensors"] is True


# from_pretrained calls in runner/ that load the runner's own outputs (written by an earlier step with safetensors), or a
# model the code itself just built; every other call must say trust_remote_code explicitly.
OWN_OUTPUTS = {
    ("runner/hardware/hwcheck.py", "check_qlora"),
    ("runner/stages/merge.py", "merge_adapter_into_base"),
    ("runner/stages/export.py", "validate_onnx"),
    ("runner/stages/export.py", "greedy_match"),
    ("runner/stages/export.py", "save_merged"),
    ("runner/stages/quantize.py", "quantize_onnx"),
}


def from_pretrained_calls_without_trust_remote_code() -> set[tuple[str, str]]:
    missing = set()
    for path, tree in runner_sources():
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
                    if not any(k.arg in ("trust_remote_code", None) for k in node.keywords):
                        missing.add((str(path.relative_to(REPO)), function.name))
    return missing


def test_from_pretrained_on_a_recipe_model_always_says_trust_remote_code() -> None:
    missing = from_pretrained_calls_without_trust_remote_code() - OWN_OUTPUTS
    assert not missing, f"from_pretrained without an explicit trust_remote_code: {sorted(missing)}"


def test_the_doctor_never_asks_to_run_remote_code() -> None:
    """`recipe doctor` reads a hub model's config: with trust_remote_code unset, transformers 4.57 asks on stdin for a
    config with auto_map, and runs the code on 'y'."""
    assert ("runner/hardware/shapes.py", "_hub_config") not in from_pretrained_calls_without_trust_remote_code()


# --- 3. pickles ---------------------------------------------------------------------------------------------------------


class _RunsOnUnpickle:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.marker),)


def is_pickle(path: Path) -> bool:
    """A pickle (protocol 2+ starts with PROTO), a torch.save zip (holds data.pkl), or a file named like one."""
    head = path.read_bytes()[:2]
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(".pkl") for name in archive.namelist())
    return path.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def test_pickle_weights_are_refused_unless_allowed(tiny_classifier_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from runner.stages import StageError
    from runner.stages.pretrained import load_model

    folder = tmp_path / "pickled"
    save_as_pickle(AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir), folder)
    assert (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists()
    assert is_pickle(folder / "pytorch_model.bin")
    # through a recipe, as a step gets it: model.path, no allow_pickle
    config = loaded_model_config(tmp_path, "").copy()
    config.update(init=None, path=str(folder))
    with pytest.raises(StageError, match=r"model\.allow_pickle: true"):
        load_model(config, {})
    model = load_model({**config, "allow_pickle": True}, {})
    assert model.config.num_labels == 2


def test_a_refused_pickle_is_never_unpickled(tiny_classifier_dir: Path, tmp_path: Path) -> None:
    from runner.recipe.sections import Model
    from runner.stages import StageError
    from runner.stages.pretrained import load_model

    folder, marker = tmp_path / "evil", tmp_path / "ran"
    folder.mkdir()
    shutil.copy(tiny_classifier_dir / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsOnUnpickle(marker)))
    with pytest.raises(StageError, match="allow_pickle"):
        load_model(Model(path=str(folder), task="sequence-classification"), {})
    assert not marker.exists(), "the pickle was loaded"


def test_a_train_step_leaves_no_pickle_in_its_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainer writes pickles (training_args.bin beside the model; optimizer.pt, rng_state.pth, scheduler.pt and
    training_args.bin in checkpoints): the committed output holds none of them. Trainer's saving is stood in for here
    with the files it writes (a real tiny training run costs more than this whole file)."""
    import torch

    from runner.stages import train
    from runner.stages.train import results as train_results
    from runner.stages.train.checkpoints import CHECKPOINTS

    def trainer_like(job: Any) -> dict[str, Any]:
        checkpoint = job.out / CHECKPOINTS / "checkpoint-1"
        checkpoint.mkdir(parents=True)
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
            torch.save({"state": torch.zeros(2)}, checkpoint / name)
        (checkpoint / "trainer_state.json").write_text("{}")

        class FakeTrainer:
            args = types.SimpleNamespace(should_save=True)
            state = types.SimpleNamespace(log_history=[{"step": 1, "loss": 1.0}],
                                          save_to_json=lambda path: Path(path).write_text("{}"))

            def save_model(self, target: str) -> None:
                Path(target).mkdir(parents=True)
                (Path(target) / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
                torch.save({"args": "TrainingArguments"}, Path(target) / "training_args.bin")  # as Trainer.save_model

        metrics = {"steps": 1, "eval_loss_before": 1.0, "eval_loss": 0.5}
        train_results.save_outputs(FakeTrainer(), job, None, metrics, 0.0)  # type: ignore[arg-type]
        return metrics

    monkeypatch.setattr(train, "train_here", trainer_like)
    monkeypatch.setattr(train, "check_hardware", lambda *_: None)
    out = tmp_path / "out"
    out.mkdir()
    config = {"model": {"path": str(tmp_path), "task": "sequence-classification"},
              "train": {"method": "full", "max_steps": 1}, "seed": 1}
    train.run(config, {"data": tmp_path}, out)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert (out / "model" / "model.safetensors") in files
    assert [p for p in files if is_pickle(p)] == []


# --- 4. the server ------------------------------------------------------------------------------------------------------


def test_the_server_binds_loopback_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.serving import server

    assert inspect.signature(server.serve).parameters["host"].default == "127.0.0.1"
    assert server._parser().parse_args(["--artifact", "x"]).host == "127.0.0.1"  # python -m runner.serving
    from runner.cli import _parser

    assert _parser().parse_args(["serve", "x"]).host == "127.0.0.1"  # recipe serve
    # and what uvicorn really gets, through `python -m runner.serving`'s main
    bound: list[str] = []
    monkeypatch.setattr(server, "create_app", lambda *a, **k: "app")
    monkeypatch.setattr(server.uvicorn, "run", lambda app, host, **k: bound.append(host))
    server.main(["--artifact", str(tmp_path)])
    server.serve(tmp_path)
    assert bound == ["127.0.0.1", "127.0.0.1"]


def test_recipe_serve_binds_loopback_and_refuses_an_empty_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import runner.serving

    onnx = tmp_path / "export" / "onnx"
    onnx.mkdir(parents=True)
    (onnx / "model.onnx").write_bytes(b"")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"steps": [{"kind": "export", "outputs": str(onnx.parent)}]}))
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(runner.serving, "serve", lambda *args: calls.append(args))
    assert main(["serve", str(run)]) == 0
    assert calls[0][1] == "127.0.0.1" and calls[0][3].api_key is None
    monkeypatch.setenv("EMPTY_KEY", "")
    assert main(["serve", str(run), "--api-key-env", "EMPTY_KEY"]) == 2  # never unprotected by mistake
    assert len(calls) == 1 and "unset or empty" in capsys.readouterr().err


def fake_run_folder(tmp_path: Path) -> Path:
    onnx = tmp_path / "export" / "onnx"
    onnx.mkdir(parents=True)
    (onnx / "model.onnx").write_bytes(b"")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"steps": [{"kind": "export", "outputs": str(onnx.parent)}]}))
    return run


PUBLIC = ["0.0.0.0", "192.168.1.5", "::", "fe80::1", "example.com", "127.0.0.1.example.com"]
LOOPBACK = ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST", "localhost.", "::ffff:127.0.0.1"]


def test_recipe_serve_refuses_a_public_host_without_a_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys) -> None:
    import runner.serving

    run = fake_run_folder(tmp_path)
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(runner.serving, "serve", lambda *args: calls.append(args))
    monkeypatch.setenv("SERVE_KEY", "k3y-value")
    for host in PUBLIC:
        calls.clear()
        assert main(["serve", str(run), "--host", host]) == 2, host
        err = capsys.readouterr().err
        assert calls == [] and f"--host {host}" in err and "--allow-public-without-key" in err, err
        assert "Traceback" not in err
        assert main(["serve", str(run), "--host", host, "--allow-public-without-key"]) == 0  # on purpose: served
        assert main(["serve", str(run), "--host", host, "--api-key-env", "SERVE_KEY"]) == 0  # protected: served
        assert [(c[1], c[3].api_key) for c in calls] == [(host, None), (host, "k3y-value")]
    for host in LOOPBACK:  # this machine only: no key needed
        calls.clear()
        assert main(["serve", str(run), "--host", host]) == 0 and calls[0][1] == host, host


def test_python_m_runner_serving_refuses_a_public_host_without_a_key(tmp_path: Path, monkeypatch) -> None:
    from runner.serving import server

    monkeypatch.setattr(server, "serve", lambda *a, **k: None)
    with pytest.raises(SystemExit, match="--allow-public-without-key"):
        server.main(["--artifact", str(tmp_path), "--host", "0.0.0.0"])
    server.main(["--artifact", str(tmp_path), "--host", "0.0.0.0", "--allow-public-without-key"])


def test_the_smoke_stage_server_is_loopback_with_a_key_off_the_command_line(tmp_path: Path, monkeypatch) -> None:
    from runner.serving.settings import ServerSettings
    from runner.stages import serve as serve_stage

    started: list[tuple[list[str], dict[str, str]]] = []
    real_popen = serve_stage.subprocess.Popen

    def popen(cmd: list[str], env: dict[str, str], **kwargs: Any) -> Any:
        if "runner.serving" not in cmd:  # the log's redacting sink starts for real
            return real_popen(cmd, env=env, **kwargs)
        started.append((cmd, env))
        return object()

    monkeypatch.setattr(serve_stage.subprocess, "Popen", popen)
    process = serve_stage.ServerProcess(tmp_path, ServerSettings(), tmp_path / "server.log")
    process._log.close()
    (cmd, env), = started
    assert "--host" not in cmd or cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert process.base_url.startswith("http://127.0.0.1:")
    assert process.api_key and env[serve_stage.KEY_ENV] == process.api_key  # the smoke server always has a key ...
    assert not any(process.api_key in part for part in cmd)  # ... that `ps` cannot show


def test_the_api_key_guards_every_route_but_health(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from runner.serving import ServerSettings, create_app

    # An artifact folder whose model never loads: the guard answers before any route, so no ONNX export is needed.
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["DistilBertForSequenceClassification"]}))
    settings = ServerSettings(api_key="s3cret-key")
    assert "s3cret-key" not in repr(settings) and "s3cret-key" not in str(settings)
    with TestClient(create_app(tmp_path, settings)) as client:
        good = {"Authorization": "Bearer s3cret-key"}
        assert client.get("/health").status_code == 200
        for method, route in [("GET", "/ready"), ("GET", "/info"), ("GET", "/metrics"), ("GET", "/docs"),
                              ("GET", "/openapi.json"), ("POST", "/predict"), ("GET", "/nowhere")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                            {"Authorization": "Bearer s3cret-key "}, {"X-API-Key": "s3cret-key"}):
                response = client.request(method, route, headers=headers, json={"texts": ["a"]})
                assert response.status_code == 401, (route, headers)
                assert response.headers["www-authenticate"] == "Bearer"
            assert client.request(method, route, headers=good, json={"texts": ["a"]}).status_code != 401, route
        for route in ("/metrics", "/docs", "/openapi.json"):
            assert client.get(route, headers=good).status_code == 200
    with TestClient(create_app(tmp_path, ServerSettings())) as open_client:  # no key set: nothing asks for one
        assert open_client.get("/metrics").status_code == 200


# --- 5. tokens ----------------------------------------------------------------------------------------------------------

SECRET = "hf_SECRETtoken0987654321abcdef"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tests/recipes/core.yaml with its data, the fake stages installed in this process, a token in the environment."""
    shutil.copy(REPO / "tests/recipes/core.yaml", tmp_path / "core.yaml")
    shutil.copy(REPO / "tests/recipes/reviews.csv", tmp_path / "reviews.csv")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECIPE_CACHE", str(tmp_path / ".recipe-cache"))
    monkeypatch.setattr("runner.stages.STAGES", dict(__import__("runner.stages").stages.STAGES))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    fake_stages.install()
    return tmp_path


def swap_stage(monkeypatch: pytest.MonkeyPatch, kind: str, run: Any) -> None:
    """Put `run` in as the stage `kind` (through the STAGES table, as fake_stages does)."""
    from runner import stages

    module = types.ModuleType(f"security_stage_{kind}")
    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    spec = stages.STAGES[kind]
    stages.STAGES[kind] = stages.StageSpec(kind, module.__name__, spec.version, spec.packages, spec.resumable)


def files_holding(secret: str, *roots: Path) -> list[Path]:
    return [p for root in roots for p in ([root] if root.is_file() else root.rglob("*"))
            if p.is_file() and secret.encode() in p.read_bytes()]


def test_a_token_never_lands_in_runs_cache_or_lock_also_when_a_step_crashes(project: Path, monkeypatch) -> None:
    """Extends test_cache_and_plan's run-succeeds case: a crash (traceback in the step log), then a good run and a lock."""

    def crashes(config: dict, inputs: dict, out: Path) -> dict:
        from huggingface_hub import get_token

        token = get_token()  # the stage holds the token, as a hub download does ...
        assert token == SECRET
        (out / "partial.txt").write_text("half done\n")
        raise ConnectionError("could not reach the hub for " + config["model"]["task"])  # ... and crashes

    real_train = sys.modules[__import__("runner.stages").stages.STAGES["train"].module].run
    swap_stage(monkeypatch, "train", crashes)
    assert main(["run", "core.yaml"]) == 1
    log = (project / "runs/core/latest/logs/train.log").read_text()
    assert "Traceback" in log and "ConnectionError" in log
    swap_stage(monkeypatch, "train", real_train)
    assert main(["run", "core.yaml"]) == 0
    assert main(["lock", "core.yaml"]) == 0
    assert files_holding(SECRET, project / "runs", project / ".recipe-cache", project / "core.lock") == []


def test_a_token_quoted_by_a_failing_library_is_redacted(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    def leaks(config: dict, inputs: dict, out: Path) -> dict:
        logging.getLogger("urllib3").warning("retrying with Authorization: Bearer %s", os.environ["HF_TOKEN"])
        raise PermissionError(f"401 Unauthorized for token {os.environ['HF_TOKEN']}")

    swap_stage(monkeypatch, "data", leaks)
    assert main(["run", "core.yaml"]) == 1
    assert files_holding(SECRET, project / "runs", project / ".recipe-cache") == []
    log = (project / "runs/core/latest/logs/data.log").read_text()
    assert "Bearer ***" in log and "401 Unauthorized for token ***" in log  # the records are there, the token is not
    run = json.loads((project / "runs/core/latest/run.json").read_text())
    assert "401 Unauthorized for token ***" in next(s["error"] for s in run["steps"] if s["kind"] == "data")


def test_a_token_printed_by_a_stage_or_its_child_never_reaches_the_step_log(project: Path, monkeypatch) -> None:
    """Not log records: raw output. print(), a native write to fd 2, a progress bar, a child process's stdout/stderr."""
    monkeypatch.setenv("FAKE_STAGE_PRINT", "data")
    # The real CLI in a process of its own: under pytest, sys.stdout is pytest's capture, not fd 1.
    done = subprocess.run([sys.executable, "-m", "tests.fake_stages", "run", "core.yaml"], cwd=project, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert SECRET not in done.stdout + done.stderr
    log = (project / "runs/core/latest/logs/data.log").read_text()
    for line in ("python print: token=***", "native write: ***", "progress 2/2 ***", "child stdout ***",
                 "child stderr ***", "stage done"):
        assert line in log, (line, log)  # the output is there, in full ...
    assert SECRET not in log and fake_stages.PATTERN_TOKEN not in log  # ... without the token
    assert files_holding(SECRET, project / "runs", project / ".recipe-cache") == []
    assert files_holding(fake_stages.PATTERN_TOKEN, project / "runs", project / ".recipe-cache") == []


def test_a_redacted_file_catches_a_token_split_across_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the smoke server's log goes through: a child writing a token in two pieces, 0.2 s apart."""
    from runner.redact import RedactedFile

    monkeypatch.setenv("HF_TOKEN", SECRET)
    sink = RedactedFile(tmp_path / "server.log")
    child = ("import os, sys, time; t = os.environ['HF_TOKEN']; os.write(1, b'key ' + t[:9].encode()); "
             "time.sleep(0.2); os.write(1, t[9:].encode() + b' end\\n'); os.write(2, b'no newline ' + t.encode())")
    subprocess.run([sys.executable, "-c", child], stdout=sink.fd, stderr=sink.fd, check=True)
    assert sink.close()
    assert (tmp_path / "server.log").read_text() == "key *** end\nno newline ***"


# --- 6. paths -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "..", ".", "a/b", "/etc", "a/../../b", ".hidden", "-rf", "a\\b", "a b", "",
                                  "a\nb", "a\x00", "x／y", "x∕y", "~", "$HOME"])
def test_a_recipe_name_cannot_leave_the_runs_folder(tmp_path: Path, name: str) -> None:
    path = write_recipe(tmp_path, RECIPE.replace("name: sec", f"name: {json.dumps(name)}"))
    found = problems_of(path)
    assert any(p.startswith(f"{path}:1:1: name: String should match pattern") for p in found), found
    assert any(p.startswith("override") and ": name: String should match pattern" in p
               for p in problems_of(write_recipe(tmp_path), (f"name={json.dumps(name)}",)))


def test_a_recipe_name_too_long_for_a_folder_is_refused(project: Path) -> None:
    """A name the file system cannot hold as a folder name is a recipe problem (exit 2), not an OSError from mkdir."""
    recipe = project / "core.yaml"
    recipe.write_text(recipe.read_text().replace("name: core", "name: " + "n" * 300))
    assert main(["run", "core.yaml"]) == 2


def snapshot(*roots: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in root.rglob("*") if p.is_file()}


def test_steps_write_only_in_their_cache_work_folder_and_the_run_folder(tmp_path: Path, monkeypatch) -> None:
    """Data read from outside the project stays untouched; every stage's `out` is under the cache's work/; nothing is
    written anywhere but the run folder (under --runs-dir) and the cache."""
    project, outside = tmp_path / "project", tmp_path / "outside"
    project.mkdir()
    outside.mkdir()
    (outside / "reviews.csv").write_text("text,label\ngood,positive\nbad,negative\n")
    recipe = project / "sec.yaml"
    recipe.write_text(RECIPE.replace("{path: reviews.csv}", "{path: ../outside/reviews.csv}"))
    monkeypatch.chdir(project)
    monkeypatch.setattr("runner.stages.STAGES", dict(__import__("runner.stages").stages.STAGES))
    fake_stages.install()
    from runner import stages

    outs: list[Path] = []
    for kind, spec in list(stages.STAGES.items()):
        fake_run = sys.modules[spec.module].run

        def recording(config: dict, inputs: dict, out: Path, _run: Any = fake_run) -> dict:
            outs.append(Path(out))
            return _run(config, inputs, out)

        swap_stage(monkeypatch, kind, recording)
    before = snapshot(tmp_path)
    runs, cache = project / "deep" / "runs", project / "cache"
    assert main(["run", "sec.yaml", "--runs-dir", str(runs), "--cache-dir", str(cache)]) == 0

    assert snapshot(outside) == {p: h for p, h in before.items() if outside in p.parents}  # read, never written
    assert len(outs) == 6 and all((cache / "work").resolve() in out.resolve().parents for out in outs), outs
    written = {p for p, h in snapshot(tmp_path).items() if before.get(p) != h}
    run_dir = (runs / "sec").resolve()
    strays = [p for p in written if run_dir not in p.resolve().parents and cache.resolve() not in p.resolve().parents]
    assert strays == [], strays
    assert (runs / "sec" / "latest" / "run.json").is_file()


def test_the_real_data_step_only_reads_a_data_file_and_a_model_outside_the_project(
    tiny_classifier_dir: Path, tmp_path: Path
) -> None:
    """The real data stage on a CSV and a model folder outside the project: both stay byte-for-byte as they were (no
    `datasets` cache or lock file beside the data), and everything the step writes is inside its `out` folder."""
    from runner.stages import data as data_stage
    from tests.conftest import sentiment_rows

    outside = tmp_path / "outside"
    outside.mkdir()
    texts, labels = sentiment_rows(20)
    (outside / "reviews.csv").write_text("text,label\n" + "".join(f"{t},{n}\n" for t, n in zip(texts, labels, strict=True)))
    out = tmp_path / "work" / "data-key" / "outputs"
    out.mkdir(parents=True)
    before = snapshot(outside) | snapshot(tiny_classifier_dir)
    config = {
        "model": {"path": str(tiny_classifier_dir), "task": "sequence-classification"},
        "data": {"source": {"path": str(outside / "reviews.csv")}, "max_length": 32, "test_size": 0.25},
        "seed": 1,
    }
    data_stage.run(config, {}, out)
    assert (out / "dataset").is_dir()
    assert snapshot(outside) | snapshot(tiny_classifier_dir) == before
    assert sorted(p.name for p in outside.iterdir()) == ["reviews.csv"]
    assert {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")} == {"outside", "work"}


def test_a_long_line_without_an_end_never_lets_half_a_token_out():
    """Output with no line end is let out in pieces once it grows long; the cut never falls inside a token or a
    secret value, so neither half reaches the log unmasked."""
    from runner.redact import LineRedactor

    token, secret = b"hf_" + b"A" * 34, b"sekret-value-1234"
    for values, text in (([], token), ([secret], secret)):
        out: list[bytes] = []
        redactor = LineRedactor(out.append, values)
        redactor.write(b"x " * 10000 + text[:25 if not values else 6])
        redactor.write(text[25 if not values else 6 :] + b" end\n")
        redactor.close()
        log = b"".join(out)
        assert log.endswith(b"*** end\n") and text[-8:] not in log and text[:8] not in log
