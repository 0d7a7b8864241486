"""Cache keys hold every input that changes a step's result, beyond the recipe's own fields: the CPU family behind the
int8 preset, the onnxruntime distribution (CPU or GPU build), the GPUs a train uses, and hub revisions as commits.

Each test changes one such input and checks that the key changes (and that `why_stale` says so readably). Planning only:
no stage runs, nothing is downloaded.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from runner.hardware import platform_facts
from runner.plan import Step, build_plan, why_stale
from runner.recipe import RecipeError, load_recipe

REPO = Path(__file__).resolve().parent.parent
CORE = REPO / "tests/recipes/core.yaml"  # a classifier: data, train, export, onnx-dynamic-int8 quantize, serve
SHA_A, SHA_B = "a" * 40, "0123456789abcdef0123456789abcdef01234567"

LM = """\
name: lm
model:
  init: {architecture: llama, hidden_size: 32, num_heads: 2}
  task: causal-lm
data:
  source: {rows: {q: [hi, yo, hey, sup], a: [a, b, c, d]}}
  template: "Q: {q} A: {a}"
train: {method: full, epochs: 1}
export: {format: onnx}
quantize: {method: onnx-weight-only}
"""


def plan(path: Path, *overrides: str) -> dict[str, Step]:
    return {step.kind: step for step in build_plan(load_recipe(path, list(overrides)))}


def stale(now: Step, before: Step) -> list[str]:
    return why_stale(now, {"key": before.key, "material": before.material})


def isa(monkeypatch: pytest.MonkeyPatch, family: str) -> None:
    monkeypatch.setattr(platform_facts, "cpu_isa", lambda: (family, "test"))


# --- 1. the CPU family picks the int8 preset ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["onnx-dynamic-int8", "onnx-static-int8"])
def test_an_activation_int8_quantize_is_keyed_by_the_cpu_family(monkeypatch, method):
    isa(monkeypatch, "avx2")
    before = plan(CORE, f"quantize.method={method}")
    isa(monkeypatch, "avx512_vnni")
    after = plan(CORE, f"quantize.method={method}")
    assert after["quantize"].key != before["quantize"].key
    assert stale(after["quantize"], before["quantize"]) == ["platform.cpu_isa: avx2 -> avx512_vnni"]
    assert after["quantize"].material["platform"] == {"cpu_isa": "avx512_vnni"}
    # only the quantize step reads the preset; everything before it keeps its key ...
    assert all(after[kind].key == before[kind].key for kind in ("data", "train", "export"))
    assert stale(after["serve"], before["serve"]) == ["upstream step 'quantize' changed"]  # ... the server gets the new one


def test_quantize_methods_that_never_read_the_preset_keep_their_key(monkeypatch, tmp_path):
    (tmp_path / "lm.yaml").write_text(LM)
    for path, overrides in ((tmp_path / "lm.yaml", ()), (CORE, ("quantize.method=bnb-8bit",))):
        isa(monkeypatch, "avx2")
        before = plan(path, *overrides)["quantize"]
        isa(monkeypatch, "arm64")
        after = plan(path, *overrides)["quantize"]
        assert after.key == before.key and "platform" not in after.material, after.config["quantize"]["method"]


# --- 2. the onnxruntime distribution -----------------------------------------------------------------------------------


def installed(monkeypatch: pytest.MonkeyPatch, versions: dict[str, str]) -> None:
    """importlib.metadata as an env with these distributions (and the real versions of everything else)."""
    real = metadata.version
    replaced = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnxruntime-genai-cuda"}

    def version(name: str) -> str:
        if name in versions:
            return versions[name]
        if name in replaced:
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)


CPU_ENV = {"onnxruntime": "1.32.0", "onnxruntime-genai": "0.18.0"}


def gpu_env(ort: str) -> dict[str, str]:
    return {"onnxruntime-gpu": ort, "onnxruntime-genai-cuda": "0.18.0"}


def test_the_onnxruntime_version_of_a_cuda_env_is_in_the_key(monkeypatch):
    installed(monkeypatch, CPU_ENV)
    cpu = plan(CORE)
    installed(monkeypatch, gpu_env("1.31.1"))
    gpu = plan(CORE)
    installed(monkeypatch, gpu_env("1.32.0"))
    newer = plan(CORE)
    assert cpu["export"].material["packages"]["onnxruntime"] == "1.32.0"  # a CPU env's material is what it always was
    assert gpu["export"].material["packages"]["onnxruntime"] == "onnxruntime-gpu 1.31.1"
    assert gpu["export"].material["packages"]["onnxruntime-genai"] == "onnxruntime-genai-cuda 0.18.0"
    for kind in ("export", "quantize", "serve"):
        # "absent" for both GPU builds before: a new onnxruntime-gpu reused the old one's export
        assert len({cpu[kind].key, gpu[kind].key, newer[kind].key}) == 3, kind
    assert stale(newer["export"], gpu["export"]) == ["packages.onnxruntime: onnxruntime-gpu 1.31.1 -> onnxruntime-gpu 1.32.0"]
    assert newer["train"].key == gpu["train"].key  # train does not use onnxruntime


def test_both_onnxruntime_builds_installed_are_named_both(monkeypatch):
    installed(monkeypatch, {"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"})
    packages = plan(CORE)["export"].material["packages"]
    assert packages["onnxruntime"] == "onnxruntime 1.32.0 + onnxruntime-gpu 1.31.1"
    assert packages["onnxruntime-genai"] == "absent"


# --- 3. the GPUs a train uses ------------------------------------------------------------------------------------------


def visible_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    fake = tuple({"index": str(i), "name": "NVIDIA H200", "compute_capability": "9.0"} for i in range(count))
    monkeypatch.setattr(platform_facts, "gpus", lambda: fake)


def test_the_train_key_holds_the_gpu_count(monkeypatch):
    keys = {}
    for count in (0, 1, 2):
        visible_gpus(monkeypatch, count)
        keys[count] = plan(CORE)
    assert len({keys[n]["train"].key for n in keys}) == 3  # CPU, one GPU, DataParallel over two
    assert stale(keys[2]["train"], keys[0]["train"]) == ["platform.gpus: 0 -> 2"]
    assert keys[2]["data"].key == keys[0]["data"].key
    assert stale(keys[2]["export"], keys[0]["export"]) == ["upstream step 'train' changed"]


def test_under_torchrun_the_train_uses_one_gpu_per_process(monkeypatch):
    visible_gpus(monkeypatch, 8)
    steps = plan(CORE, "train.distributed.nproc_per_node=2")
    assert steps["train"].material["platform"] == {"gpus": 2}
    visible_gpus(monkeypatch, 4)
    assert plan(CORE, "train.distributed.nproc_per_node=2")["train"].key == steps["train"].key


def test_the_effective_batch_counts_dataparallel_gpus(tmp_path):
    from transformers import TrainingArguments

    from runner.stages.train import effective_batch_size

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=2,
                             use_cpu=True, report_to=[])
    assert effective_batch_size(args) == 16
    # What TrainingArguments' device setup leaves on a machine with two visible GPUs and no torchrun (world_size 1):
    # Trainer then wraps the model in DataParallel and feeds it batches of 8 x 2.
    args._n_gpu = 2
    assert (args.world_size, args.train_batch_size) == (1, 16)
    assert effective_batch_size(args) == 32


# --- 4. hub revisions are commits --------------------------------------------------------------------------------------

HUB = """\
name: hubby
model:
  hub: org/tiny
  revision: {model_rev}
  task: sequence-classification
data:
  sources:
    - {{rows: {{text: [good, bad], label: [positive, negative]}}}}
    - {{hub: org/reviews, revision: {data_rev}, split: train}}
train: {{method: full, epochs: 1}}
"""


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return root


def recipe_file(tmp_path: Path, model_rev: str = SHA_A, data_rev: str = SHA_A, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(HUB.format(model_rev=model_rev, data_rev=data_rev))
    return path


def write_ref(hub_cache: Path, folder: str, name: str, commit: str) -> None:
    ref = hub_cache / folder / "refs" / name
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)


def test_a_branch_or_tag_revision_is_refused_at_its_line(tmp_path, hub_cache):
    path = recipe_file(tmp_path, model_rev="main", data_rev="v1.0")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    problems = {problem.loc: problem for problem in caught.value.problems}
    assert set(problems) == {("model", "revision"), ("data", "sources", 1, "revision")}
    model, data = problems[("model", "revision")], problems[("data", "sources", 1, "revision")]
    assert (model.pos.line, model.pos.col) == (4, 3)
    assert data.pos.line == 9
    assert "revision 'main' is not a full 40-character commit sha" in model.message
    assert "pin the commit" in model.message and "https://huggingface.co/org/tiny/commits/main" in model.message
    assert "`hf download org/tiny config.json --revision main`" in model.message
    assert "https://huggingface.co/datasets/org/reviews/commits/v1.0" in data.message
    assert str(model).endswith(":4:3: model.revision: " + model.message)


def test_a_short_sha_or_a_path_out_of_refs_is_refused(tmp_path, hub_cache):
    write_ref(hub_cache, "models--org--tiny", "main", SHA_B)
    (hub_cache / "secret").write_text(SHA_B)  # what `../../secret` would read
    for revision in ("0123abc", "../../secret", SHA_A.upper()):
        with pytest.raises(RecipeError, match="pin the commit"):
            load_recipe(recipe_file(tmp_path, model_rev=repr(revision)))


def test_a_branch_in_the_local_hf_cache_resolves_to_its_commit_and_keys_by_it(tmp_path, hub_cache):
    write_ref(hub_cache, "models--org--tiny", "main", SHA_A)
    write_ref(hub_cache, "datasets--org--reviews", "v1.0", SHA_A)
    path = recipe_file(tmp_path, model_rev="main", data_rev="v1.0")
    loaded = load_recipe(path)
    assert loaded.recipe.model.revision == SHA_A and loaded.recipe.data.all_sources()[1].revision == SHA_A
    assert f"model.revision: 'main' -> {SHA_A}" in "\n".join(loaded.warnings)
    assert f"data.sources.1.revision: 'v1.0' -> {SHA_A}" in "\n".join(loaded.warnings)
    # the same commit written out keys the same: the key holds the commit, not the name it was reached by
    assert plan(path)["train"].key == plan(recipe_file(tmp_path, SHA_A, SHA_A, "pinned.yaml"))["train"].key

    before = plan(path)
    write_ref(hub_cache, "models--org--tiny", "main", SHA_B)  # the branch moved (a newer download recorded it)
    after = plan(path)
    assert after["data"].key != before["data"].key and after["train"].key != before["train"].key
    assert stale(after["data"], before["data"]) == [f"model.revision: {SHA_A} -> {SHA_B}"]
    write_ref(hub_cache, "datasets--org--reviews", "v1.0", SHA_B)
    assert stale(plan(path)["data"], after["data"]) == [f"data.sources.1.revision: {SHA_A} -> {SHA_B}"]


def test_pinned_shas_in_the_shipped_recipes(hub_cache):
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        text = path.read_text()
        if "hub:" in text:
            load_recipe(path)  # raises on a branch or tag name
