"""The two hub recipes (llama2_lora, distilbert_imdb) without the hub: tiny stand-ins behind the real hub ids.

No network and no hub here, so the tests pre-populate a temporary Hugging Face cache exactly as an online run would have
left it, and run the unmodified runner against it with HF_HUB_OFFLINE=1. Nothing in runner/ is patched: the hub ids and
pinned revisions come from the recipe files.

How the libraries resolve a pinned repo offline (transformers 4.57, huggingface_hub 0.36, datasets 5.0), and so what the
cache must hold:

- Models (transformers -> huggingface_hub.hf_hub_download): `$HF_HUB_CACHE/models--ORG--NAME/snapshots/<revision>/<file>`.
  When `revision` is a full commit hash and the file is there, hf_hub_download returns it before any HTTP or offline
  check; files that are absent (added_tokens.json, ...) fail as "not cached", which transformers treats as optional.
  `refs/main` is written too (as a download leaves it) but is only read for branch names. Plain files in the snapshot
  are fine: that is how huggingface_hub stores them where symlinks are unavailable.
- Datasets: with HF_HUB_OFFLINE, `load_dataset("ORG/NAME", ...)` never reads the hub snapshot; it raises
  OfflineModeIsEnabled before hf_hub_download and falls back to the *prepared Arrow cache*
  `$HF_DATASETS_CACHE/ORG___NAME/<config>/0.0.0/<commit>/{NAME}-{split}.arrow` + `dataset_info.json`
  (CachedDatasetModuleFactory + the `cache` builder). So the stand-in data files are written where the hub snapshot
  would hold them (imdb: `plain_text/train-00000-of-00001.parquet`; alpaca: `data/train-00000-of-00001-....parquet`),
  and then prepared with datasets' own Parquet builder into the directory an online `load_dataset` writes (config
  `default` / `plain_text`, version 0.0.0, hash = the commit), exactly the two things an online run leaves behind.
  Offline, datasets picks the newest prepared directory and ignores the requested revision, and the data step does
  not notice (test_data_step_refuses_a_cached_hub_dataset_of_another_revision, an expected failure until it does).

The CLI runs in a subprocess so that the HF_* variables are read at import time, as in a user's shell.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from runner.cli import main
from runner.recipe import find_recipe, load_recipe

from .conftest import REPO, sentiment_rows, train_tokenizer

RECIPES = ("llama2_lora", "distilbert_imdb")
LLAMA_HIDDEN = 64  # stand-in sizes (heads of 32: the ONNX decoder needs a multiple of 16): distinct from the real models' (4096 / 768), so a test sees which one was loaded
DISTILBERT_DIM = 32
IMDB_LABELS = ["neg", "pos"]


def _recipe(name: str):
    return load_recipe(find_recipe(name, REPO / "recipes")).recipe


# --- the stand-in Hugging Face cache ------------------------------------------------------------------------------------


def _snapshot(hub_cache: Path, kind: str, repo_id: str, revision: str) -> Path:
    """`{kind}s--ORG--NAME/snapshots/<revision>/`, with refs/main pointing at it, as a download leaves it."""
    assert len(revision) == 40, f"{repo_id} must be pinned to a full commit hash, got {revision!r}"
    folder = hub_cache / f"{kind}s--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def _prepare_arrow_cache(datasets_cache: Path, repo_id: str, revision: str, config: str, files: dict[str, Path]) -> Path:
    """Prepare the hub snapshot's parquet files into the Arrow cache folder an online `load_dataset(repo_id)` writes.

    datasets' Parquet builder only accepts hf:// data files together with a repo_id, so it prepares the local files
    under the bare dataset name in a staging folder, and the folder is then moved to its `ORG___NAME` place."""
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.parquet.parquet import Parquet

    org, name = repo_id.split("/")
    name = camelcase_to_snakecase(name)
    staging = datasets_cache.parent / f"staging-{name}"
    builder = Parquet(
        cache_dir=str(staging), dataset_name=name, config_name=config, config_id=config, hash=revision,
        data_files={split: [str(path)] for split, path in files.items()},
    )
    builder.download_and_prepare()
    target = datasets_cache / f"{org}___{name}"
    shutil.move(str(staging / name), str(target))
    shutil.rmtree(staging)
    prepared = target / config / "0.0.0" / revision
    assert {f"{name}-{split}.arrow" for split in files} <= {p.name for p in prepared.iterdir()}
    return prepared


def _llama_standin(hub_cache: Path, repo_id: str, revision: str) -> None:
    """A 2-layer LlamaForCausalLM (as Llama-2-7b-hf's checkpoint) with a Llama tokenizer that, like Llama-2's, has no
    pad token; safetensors only."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

    snapshot = _snapshot(hub_cache, "model", repo_id, revision)
    texts, _ = sentiment_rows()
    base = train_tokenizer([*texts, "### Instruction:\n### Response:\n"], "bpe", snapshot.parent / "scratch-tokenizer")
    shutil.rmtree(snapshot.parent / "scratch-tokenizer")
    tokenizer = LlamaTokenizerFast(
        tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        add_bos_token=True, add_eos_token=False,
    )
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(snapshot)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=LLAMA_HIDDEN, intermediate_size=2 * LLAMA_HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(snapshot, safe_serialization=True)


def _distilbert_standin(hub_cache: Path, repo_id: str, revision: str) -> None:
    """A 2-layer DistilBertForMaskedLM (as distilbert-base-uncased's checkpoint: no classifier head, so the train step
    adds a fresh one) with an uncased WordPiece DistilBERT tokenizer; safetensors only."""
    import torch
    from transformers import DistilBertConfig, DistilBertForMaskedLM, DistilBertTokenizerFast

    snapshot = _snapshot(hub_cache, "model", repo_id, revision)
    texts, _ = sentiment_rows()
    base = train_tokenizer(texts, "wordpiece", snapshot.parent / "scratch-tokenizer")
    shutil.rmtree(snapshot.parent / "scratch-tokenizer")
    tokenizer = DistilBertTokenizerFast(tokenizer_object=base.backend_tokenizer, do_lower_case=True, model_max_length=512)
    tokenizer.save_pretrained(snapshot)
    config = DistilBertConfig(
        vocab_size=len(tokenizer), dim=DISTILBERT_DIM, hidden_dim=2 * DISTILBERT_DIM, n_layers=2, n_heads=2,
        max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    DistilBertForMaskedLM(config).save_pretrained(snapshot, safe_serialization=True)


def _alpaca_standin(hub_cache: Path, datasets_cache: Path, repo_id: str, revision: str) -> list[str]:
    """tatsu-lab/alpaca's columns (instruction, input, output, text) in its one parquet file; returns the instructions."""
    from datasets import Dataset

    snapshot = _snapshot(hub_cache, "dataset", repo_id, revision)
    texts, _ = sentiment_rows(40, seed=1)
    instructions = [f"Write review number {i} of a film." for i in range(len(texts))]
    rows = {"instruction": instructions, "input": [""] * len(texts), "output": texts}
    rows["text"] = [f"### Instruction:\n{i}\n\n### Response:\n{o}" for i, o in zip(instructions, texts, strict=True)]
    (snapshot / "README.md").write_text("---\nlicense: cc-by-nc-4.0\nlanguage: [en]\n---\n# Stand-in for Alpaca\n")
    parquet = snapshot / "data" / "train-00000-of-00001-a09b74b3ef9c3b56.parquet"
    parquet.parent.mkdir()
    Dataset.from_dict(rows).to_parquet(str(parquet))
    _prepare_arrow_cache(datasets_cache, repo_id, revision, "default", {"train": parquet})
    return instructions


def _imdb_standin(hub_cache: Path, datasets_cache: Path, repo_id: str, revision: str) -> list[str]:
    """stanfordnlp/imdb's layout: config plain_text, `text` and a ClassLabel `label` (neg/pos); returns the train texts."""
    from datasets import ClassLabel, Dataset, Features, Value

    snapshot = _snapshot(hub_cache, "dataset", repo_id, revision)
    (snapshot / "README.md").write_text(
        "---\nconfigs:\n- config_name: plain_text\n  data_files:\n  - split: train\n    path: plain_text/train-*\n"
        "  - split: test\n    path: plain_text/test-*\n  default: true\n---\n# Stand-in for IMDB\n"
    )
    features = Features({"text": Value("string"), "label": ClassLabel(names=IMDB_LABELS)})
    files = {}
    train_texts: list[str] = []
    for split, n, seed in (("train", 80, 2), ("test", 20, 3)):
        texts, labels = sentiment_rows(n, seed=seed)
        ids = [IMDB_LABELS.index("pos" if label == "positive" else "neg") for label in labels]
        files[split] = snapshot / "plain_text" / f"{split}-00000-of-00001.parquet"
        files[split].parent.mkdir(exist_ok=True)
        Dataset.from_dict({"text": texts, "label": ids}, features=features).to_parquet(str(files[split]))
        train_texts = train_texts or texts
    prepared = _prepare_arrow_cache(datasets_cache, repo_id, revision, "plain_text", files)
    info = json.loads((prepared / "dataset_info.json").read_text())
    assert info["features"]["label"] == {"names": IMDB_LABELS, "_type": "ClassLabel"}  # kept from the parquet metadata
    return train_texts


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A Hugging Face cache holding stand-ins for both recipes' models and datasets at their pinned revisions."""
    root = tmp_path_factory.mktemp("hf")
    hub_cache, datasets_cache = root / "hub", root / "datasets"
    llama, distilbert = _recipe("llama2_lora"), _recipe("distilbert_imdb")
    _llama_standin(hub_cache, llama.model.hub, llama.model.revision)
    _distilbert_standin(hub_cache, distilbert.model.hub, distilbert.model.revision)
    alpaca, imdb = llama.data.source, distilbert.data.source
    assert alpaca.config is None and imdb.config is None  # the default config, as the stand-ins are prepared
    instructions = _alpaca_standin(hub_cache, datasets_cache, alpaca.hub, alpaca.revision)
    imdb_texts = _imdb_standin(hub_cache, datasets_cache, imdb.hub, imdb.revision)
    env = {
        **os.environ,
        "HF_HOME": str(root / "home"),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_DATASETS_CACHE": str(datasets_cache),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # belt and braces: anything that still reached out would fail at once
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return {"root": root, "env": env, "alpaca_instructions": instructions, "imdb_texts": imdb_texts}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a copy of the two hub recipes under recipes/, so names resolve as in the repo."""
    root = tmp_path_factory.mktemp("hub-recipes")
    (root / "recipes").mkdir()
    for name in RECIPES:
        shutil.copy(REPO / "recipes" / f"{name}.yaml", root / "recipes")
    return root


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def run_cli(hub: dict, workdir: Path, *args: str, timeout: float = 600) -> dict:
    """`python -m runner.cli run ...` in `workdir` against the stand-in cache; returns the run's run.json."""
    cache, runs = hub["root"] / "recipe-cache", hub["root"] / "runs"
    command = [sys.executable, "-m", "runner.cli", "run", *args, "--cache-dir", str(cache), "--runs-dir", str(runs)]
    proc = subprocess.run(command, cwd=workdir, env=hub["env"], capture_output=True, text=True, timeout=timeout)
    latest = runs / args[0] / "latest"
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted((latest / "logs").glob("*.log"))) \
        if latest.is_dir() else ""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}{logs}"
    return json.loads((latest / "run.json").read_text())


# --- validate, plan, doctor: no network, no weights --------------------------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_hub_recipe_validates_and_plans_offline(name: str, workdir: Path, tmp_path: Path, monkeypatch, capsys, no_network):
    monkeypatch.chdir(workdir)
    assert main(["validate", name]) == 0
    assert f"{name}: data -> train -> export -> quantize -> serve" in capsys.readouterr().out
    assert main(["plan", name, "--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [row["step"] for row in plan] == ["data", "train", "export", "quantize", "serve"]
    assert not any(row["cached"] for row in plan)
    recipe = _recipe(name)  # pinned: a hub id at a full commit hash, for the model and the data
    assert len(recipe.model.revision) == 40 and len(recipe.data.source.revision) == 40


@pytest.mark.parametrize(("name", "profile"), [("llama2_lora", "a10g-24gb"), ("distilbert_imdb", "t4-16gb")])
def test_hub_recipe_passes_the_doctor_on_its_profile(name: str, profile: str, workdir: Path, monkeypatch, capsys,
                                                     no_network):
    """The doctor estimates the real model (the config from the HF cache or the bundled copy), never a stand-in."""
    from runner.hardware import shapes

    monkeypatch.chdir(workdir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shapes._hub_config.cache_clear()  # look the config up afresh, in this process's (real, default) HF cache
    assert main(["doctor", name, "--profile", profile, "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)["verdicts"][0]
    assert verdict["fits"] and verdict["device"] == "cuda"
    estimate = verdict["estimate"]
    assert estimate["params_total"] > (6e9 if name == "llama2_lora" else 6e7)  # 6.7B / 67M: the real architectures
    assert estimate["config_source"].startswith(("HF cache", "bundled runner/model_configs/"))
    # validate and the doctor look a hub config up in one order (runner.hub), so they read the same file
    from runner.recipe import local_checks

    assert local_checks.model_config(load_recipe(find_recipe(name)).recipe)[1] == estimate["config_source"]
    if name == "llama2_lora":
        assert (estimate["method"], estimate["bits"]) == ("qlora", 4)


# --- the hub-loading paths of the real stages, against the stand-ins ----------------------------------------------------


@pytest.mark.slow
def test_llama2_lora_loads_model_and_data_by_hub_id_and_trains(hub: dict, workdir: Path):
    """Data, train and export of llama2_lora through the CLI, reading meta-llama/Llama-2-7b-hf (tokenizer in data and
    train, model in train and again in export, where the adapter is merged into it) and tatsu-lab/alpaca at their pinned
    revisions from the cache. LoRA in fp32 instead of 4-bit QLoRA in bf16 (bitsandbytes 4-bit needs CUDA)."""
    from datasets import load_from_disk
    from safetensors import safe_open

    run = run_cli(
        hub, workdir, "llama2_lora", "train.method=lora", "train.quantization=null", "train.precision=fp32",
        "data.select=24", "train.max_steps=2", "train.batch_size=4", "train.gradient_accumulation=1",
        "export.precision=fp32", "export.execution_provider=cpu", "--until", "export",
    )
    steps = {s["kind"]: s for s in run["steps"]}
    assert [s["status"] for s in run["steps"]] == ["ran", "ran", "ran", "skipped", "skipped"]

    data = Path(steps["data"]["outputs"])
    stats = json.loads((data / "stats.json").read_text())
    assert sum(stats["rows"].values()) == 24 and stats["rows_without_answer_tokens"] == 0
    dataset = load_from_disk(str(data / "dataset"))
    standin = set(hub["alpaca_instructions"])
    for text in [*dataset["train"]["text"], *dataset["test"]["text"]]:
        prompt = text.removeprefix("### Instruction:\n").split("\n### Response:\n")[0]
        assert prompt in standin, text  # rows of the stand-in, through the recipe's template
        assert text.endswith("</s>")  # the stand-in tokenizer's eos
    assert any(label == -100 for label in dataset["train"][0]["labels"])  # the prompt is masked

    train = Path(steps["train"]["outputs"])
    adapter_config = json.loads((train / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "meta-llama/Llama-2-7b-hf"
    assert adapter_config["r"] == 8 and set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}
    with safe_open(str(train / "adapter" / "adapter_model.safetensors"), "pt") as weights:
        shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}  # noqa: SIM118
    lora_a = [shape for name, shape in shapes.items() if "q_proj.lora_A" in name]
    assert len(lora_a) == 2 and set(lora_a) == {(8, LLAMA_HIDDEN)}  # two layers of the stand-in, hidden size 64
    metrics = json.loads((train / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["trainable_params"] == 2 * 2 * (8 * LLAMA_HIDDEN * 2)  # layers, q/v, A+B

    # export merges the adapter into the base, loaded again by hub id, and builds the decoder with its KV cache
    export = json.loads((Path(steps["export"]["outputs"]) / "export_report.json").read_text())
    assert export["merge"]["merged"] and export["validation"]["passed"]
    genai = json.loads((Path(steps["export"]["outputs"]) / "onnx" / "genai_config.json").read_text())["model"]
    assert genai["decoder"]["hidden_size"] == LLAMA_HIDDEN and "past_key_names" in genai["decoder"]["inputs"]


@pytest.mark.slow
def test_distilbert_imdb_loads_model_and_data_by_hub_id_and_exports(hub: dict, workdir: Path):
    """Data, train and export of distilbert_imdb through the CLI, reading distilbert/distilbert-base-uncased and
    stanfordnlp/imdb (ClassLabel neg/pos) at their pinned revisions from the cache."""
    from datasets import load_from_disk

    run = run_cli(hub, workdir, "distilbert_imdb", "data.select=48", "train.max_steps=3", "--until", "export")
    steps = {s["kind"]: s for s in run["steps"]}
    assert [s["status"] for s in run["steps"]] == ["ran", "ran", "ran", "skipped", "skipped"]

    data = Path(steps["data"]["outputs"])
    labels = json.loads((data / "labels.json").read_text())
    assert labels["id2label"] == {"0": "neg", "1": "pos"}  # the ClassLabel's names, in id order
    stats = json.loads((data / "stats.json").read_text())
    assert sum(stats["rows"].values()) == 48
    dataset = load_from_disk(str(data / "dataset"))
    assert dataset["train"].features["labels"].names == IMDB_LABELS
    assert set(dataset["train"]["text"]) <= set(hub["imdb_texts"])  # stand-in train rows, not test ones

    config = json.loads((Path(steps["train"]["outputs"]) / "model" / "config.json").read_text())
    assert config["dim"] == DISTILBERT_DIM and config["architectures"] == ["DistilBertForSequenceClassification"]
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    export = json.loads((Path(steps["export"]["outputs"]) / "export_report.json").read_text())
    assert export["validation"]["passed"]


@pytest.mark.slow
def test_data_step_refuses_a_cached_hub_dataset_of_another_revision(hub: dict):
    """Offline, a pinned `data.source.revision` that is not in the cache must fail, not silently read another one.

    The cache holds tatsu-lab/alpaca at the recipe's revision only; datasets 5.0 offline would still return those rows
    for another commit (from .../tatsu-lab___alpaca/default/0.0.0/<the recipe's revision>/)."""
    code = (
        "from runner.stages.data import load_rows\n"
        "from runner.stages import StageError\n"
        "source = {'hub': 'tatsu-lab/alpaca', 'revision': '0' * 40, 'split': 'train'}\n"
        "try:\n"
        "    rows = load_rows({'source': source, 'template': '{instruction} {output}'}, 0, 'causal-lm')\n"
        "except StageError as exc:\n"
        "    print('refused:', exc)\n"
        "else:\n"
        "    print('loaded', len(rows), 'rows')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=hub["env"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    assert "refused:" in proc.stdout, proc.stdout
