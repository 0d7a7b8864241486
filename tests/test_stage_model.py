"""Model loading and the model step, as recipes rely on them: one `from_pretrained` path for hub ids, local folders and
models built from `model.init`, safetensors only unless pickles are allowed, remote code only when asked for."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import load_from_disk
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerFast

from runner.recipe.sections import Data, FileSource, InlineSource, Model, ModelInit
from runner.stages import StageError, pretrained
from runner.stages import data as data_stage
from runner.stages import model as model_stage
from runner.stages.data import rows as data_rows
from tests.conftest import save_as_pickle

REPO = Path(__file__).resolve().parent.parent
REVIEWS = REPO / "recipes" / "data" / "reviews.csv"
INSTRUCTIONS = REPO / "recipes" / "data" / "instructions.jsonl"
ALPACA = "### Instruction:\n{instruction}\n### Response:\n{output}"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "max_position_embeddings": 128}


def step_config(model: Model, data: Data, seed: int = 42) -> dict[str, Any]:
    return {"model": model.model_dump(mode="json"), "data": data.model_dump(mode="json"), "seed": seed}


def build(tmp_path: Path, model: Model, data: Data, name: str = "built", seed: int = 42) -> tuple[Path, dict[str, Any]]:
    out = tmp_path / name
    out.mkdir()
    return out, model_stage.run(step_config(model, data, seed), {}, out)


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# --- where from_pretrained looks -----------------------------------------------------------------------------------------


def test_hub_source_passes_id_revision_and_guards() -> None:
    model = Model(hub="meta-llama/Llama-2-7b-hf", revision="01c7f73d771dfac7d292323805ebc428287df4f9", task="causal-lm")
    assert pretrained.pretrained_source(model.model_dump(mode="json"), {}) == (
        "meta-llama/Llama-2-7b-hf",
        {"revision": "01c7f73d771dfac7d292323805ebc428287df4f9", "trust_remote_code": False, "use_safetensors": True},
    )
    trusting = model.model_copy(update={"trust_remote_code": True, "allow_pickle": True})
    _, kwargs = pretrained.pretrained_source(trusting.model_dump(mode="json"), {})
    assert kwargs["trust_remote_code"] is True and kwargs["use_safetensors"] is False


def test_path_and_init_sources_are_absolute_folders(tiny_classifier_dir: Path, tmp_path: Path) -> None:
    by_path = Model(path=str(tiny_classifier_dir), task="sequence-classification")
    assert pretrained.pretrained_source(by_path.model_dump(mode="json"), {})[0] == str(tiny_classifier_dir.resolve())
    by_init = Model(init=ModelInit(architecture="llama"), task="causal-lm")
    assert pretrained.pretrained_source(by_init, {"model": tmp_path})[0] == str(tmp_path / "model")
    missing = Model(path=str(tmp_path / "nowhere"), task="causal-lm")
    with pytest.raises(StageError, match="is not a folder"):
        pretrained.pretrained_source(missing, {})


# --- loading -------------------------------------------------------------------------------------------------------------


def test_load_model_and_tokenizer_from_a_local_folder(tiny_classifier_dir: Path) -> None:
    cfg = Model(path=str(tiny_classifier_dir), task="sequence-classification").model_dump(mode="json")
    tokenizer = pretrained.load_tokenizer(cfg, {})
    model = pretrained.load_model(cfg, {})
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert tokenizer.padding_side == "right"
    logits = model(**tokenizer(["the film was great"], return_tensors="pt", return_token_type_ids=False)).logits
    assert logits.shape == (1, 2)


def test_load_model_passes_keyword_arguments_through(tiny_classifier_dir: Path) -> None:
    cfg = Model(path=str(tiny_classifier_dir), task="sequence-classification").model_dump(mode="json")
    model = pretrained.load_model(cfg, {}, num_labels=3, ignore_mismatched_sizes=True)
    assert model.config.num_labels == 3 and model.classifier.out_features == 3


def test_tokenizer_without_pad_token_pads_with_eos(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # As Llama-2: the tokenizer ships an eos but no pad token.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    shutil.copy(tiny_llama_dir / "config.json", tmp_path)
    loaded = pretrained.load_tokenizer(Model(path=str(tmp_path), task="causal-lm"), {})
    assert loaded.pad_token == loaded.eos_token == "</s>" and loaded.padding_side == "right"


def test_pickle_weights_are_refused_unless_allowed(tiny_classifier_dir: Path, tmp_path: Path) -> None:
    original = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir)
    save_as_pickle(original, tmp_path)
    assert (tmp_path / "pytorch_model.bin").exists() and not (tmp_path / "model.safetensors").exists()

    refused = Model(path=str(tmp_path), task="sequence-classification")
    with pytest.raises(StageError, match="allow_pickle: true"):
        pretrained.load_model(refused, {})
    allowed = pretrained.load_model(refused.model_copy(update={"allow_pickle": True}), {})
    for (name, a), (_, b) in zip(original.state_dict().items(), allowed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_trust_remote_code_reaches_from_pretrained_as_false_by_default(
    tiny_classifier_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Explicitly False, not None: transformers treats None as "ask on stdin", which would hang a step.
    seen: list[dict[str, Any]] = []
    for cls in (AutoModelForSequenceClassification, AutoTokenizer):
        real = cls.from_pretrained

        def spy(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            seen.append(kwargs)
            return _real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    cfg = Model(path=str(tiny_classifier_dir), task="sequence-classification")
    pretrained.load_tokenizer(cfg, {})
    pretrained.load_model(cfg, {})
    assert [kwargs["trust_remote_code"] for kwargs in seen] == [False, False]
    assert seen[1]["use_safetensors"] is True


# --- the model step ------------------------------------------------------------------------------------------------------


def test_model_step_builds_a_deterministic_classifier_that_loads_back(tmp_path: Path) -> None:
    model = Model(init=ModelInit(architecture="distilbert", vocab_size=300, **TINY), task="sequence-classification")
    data = Data(source=FileSource(path=str(REVIEWS)))
    first, metrics = build(tmp_path, model, data, "first")
    again, _ = build(tmp_path, model, data, "again")

    assert file_hashes(first) == file_hashes(again)  # tokenizer and safetensors weights, byte for byte
    assert (first / "model" / "model.safetensors").exists() and not (first / ".scratch").exists()
    loaded = pretrained.load_model(model, {"model": first})
    tokenizer = pretrained.load_tokenizer(model, {"model": first})
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert loaded.config.id2label == {0: "negative", 1: "positive"}  # sorted labels of the data
    assert metrics == {"parameters": loaded.num_parameters(), "vocab_size": len(tokenizer)}
    assert len(tokenizer) == loaded.config.vocab_size <= 300
    encoded = tokenizer(["A Wonderful film", "a wonderful film"], return_token_type_ids=False)
    assert encoded["input_ids"][0] == encoded["input_ids"][1]  # uncased, like distilbert-base-uncased
    assert encoded["input_ids"][0][0] == tokenizer.cls_token_id and encoded["input_ids"][0][-1] == tokenizer.sep_token_id
    assert loaded(**tokenizer(["a wonderful film"], return_tensors="pt", return_token_type_ids=False)).logits.shape == (1, 2)


def test_model_step_tokenizer_never_learns_from_test_rows(tmp_path: Path) -> None:
    """The init tokenizer is trained on the data step's train split only: words that occur only in test rows are not in
    its vocabulary, while words of train rows are."""
    texts = [f"plain film number {i}" for i in range(40)]
    labels = ["pos", "neg"] * 20
    data = Data(source=InlineSource(rows={"text": texts, "label": labels}), test_size=0.25)
    splits = data_rows.split_rows(  # the data step's split of these rows, to know which rows land in test
        data_rows.encode_labels(data_rows.load_rows(data.model_dump(mode="json"), 42, "sequence-classification"),
                                  ["neg", "pos"]), data, 42, stratify=True)
    test_ids = {int(t.rsplit(" ", 1)[1]) for t in splits["test"]["text"]}
    train_ids = set(range(40)) - test_ids
    # each row gets its own repeated marker word, so a tokenizer fitted to it keeps the marker whole
    marked = [f"{t} " + " ".join([f"zq{chr(97 + i % 26)}{chr(97 + i // 26)}xv"] * 30) for i, t in enumerate(texts)]
    data = Data(source=InlineSource(rows={"text": marked, "label": labels}), test_size=0.25)
    model = Model(init=ModelInit(architecture="distilbert", vocab_size=2000, **TINY), task="sequence-classification")
    out, _ = build(tmp_path, model, data)
    vocab = pretrained.load_tokenizer(model, {"model": out}).get_vocab()
    marker = lambda i: f"\u0120zq{chr(97 + i % 26)}{chr(97 + i // 26)}xv"  # noqa: E731 - byte-level BPE: Ġ = a space
    assert all(marker(i) in vocab for i in train_ids)
    assert not any(marker(i) in vocab for i in test_ids), "a test row's word reached the tokenizer"


def test_model_step_takes_label_order_from_the_recipe(tmp_path: Path) -> None:
    model = Model(init=ModelInit(architecture="distilbert", vocab_size=100, **TINY), task="sequence-classification")
    rows = {"text": ["good film", "bad film", "so so film"] * 4, "label": ["pos", "neg", "mid"] * 4}
    out, _ = build(tmp_path, model, Data(source=InlineSource(rows=rows), labels=["neg", "mid", "pos"], test_size=0.25))
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "mid", "2": "pos"}


def test_model_step_builds_a_causal_lm_the_data_step_uses(tmp_path: Path) -> None:
    model = Model(init=ModelInit(architecture="llama", vocab_size=400, **TINY), task="causal-lm")
    data = Data(source=FileSource(path=str(INSTRUCTIONS)), template=ALPACA, max_length=64)
    built, metrics = build(tmp_path, model, data)

    tokenizer = pretrained.load_tokenizer(model, {"model": built})
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    lm = pretrained.load_model(model, {"model": built})
    assert (lm.config.bos_token_id, lm.config.eos_token_id, lm.config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert metrics["parameters"] == sum(p.numel() for p in lm.parameters())

    out = tmp_path / "data"
    out.mkdir()
    data_stage.run(step_config(model, data), {"model": built}, out)
    row = load_from_disk(str(out / "dataset"))["train"][0]
    assert row["text"].endswith("</s>") and row["input_ids"][-1] == tokenizer.eos_token_id
    loss = lm(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
    assert torch.isfinite(loss)


def test_data_step_refuses_a_max_length_beyond_the_model(tmp_path: Path) -> None:
    model = Model(init=ModelInit(architecture="distilbert", vocab_size=100, **TINY), task="sequence-classification")
    rows = {"text": ["good film", "bad film"] * 4, "label": ["pos", "neg"] * 4}
    built, _ = build(tmp_path, model, Data(source=InlineSource(rows=rows), test_size=0.25))
    data = Data(source=InlineSource(rows=rows), max_length=256)  # TINY has 128 positions
    out = tmp_path / "data"
    out.mkdir()
    with pytest.raises(StageError, match=r"data.max_length 256 is more than the model accepts \(128 tokens\)"):
        data_stage.run(step_config(model, data), {"model": built}, out)


def test_model_step_refuses_a_distilbert_causal_lm(tmp_path: Path) -> None:
    model = Model(init=ModelInit(architecture="distilbert"), task="causal-lm")
    with pytest.raises(StageError, match="use `architecture: llama`"):
        build(tmp_path, model, Data(source=FileSource(path=str(INSTRUCTIONS)), template=ALPACA))
