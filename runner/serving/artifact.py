"""The served model over an exported artifact folder, plus the offline helpers.

- Classifiers: an ONNX Runtime session over the dynamo-exported graph.
  A classifier's answer for a text never depends on the other texts served with it. A graph with static quantization
  parameters (fp32, static int8 QDQ) computes every row on its own, so texts may share a run: padded to a longer
  neighbour's length (attention masks) its scores stay the same (measured: identical to the bit on the fp32 and static
  int8 exports). A graph that computes activation scales at run time (dynamic int8: DynamicQuantizeLinear takes one
  scale over the whole input tensor, batch and padding included) gives a text other scores beside other texts (measured:
  label flips, score drift up to 0.63 under 16 concurrent requests); such a graph runs each text alone, unpadded, which
  is exactly the text sent alone (`ArtifactInfo.batch_invariant`, `Classifier.predict`).
- Causal LMs: onnxruntime-genai (the builder's decoder with its KV cache), on the CUDA provider when this environment
  has onnxruntime-gpu and a GPU, else on the CPU. Text is tokenized and detokenized with the Hugging Face tokenizer
  (`tokenizers`, the same tokenizer.json the model was trained with), never with onnxruntime-genai's own: token ids in
  and out are what training and the torch reference use.

The server and the offline helpers both go through `load_model`, so tokenization and session settings cannot drift
between what is served and what the smoke test and the export gate compare it with.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from runner.names import CAUSAL_LM, CLASSIFIER

# Ops that only appear in a quantized graph (dynamic int8, QOperator, QDQ and 4-bit weight-only layouts).
QUANT_OPS = frozenset(
    {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QLinearConv", "ConvInteger",
     "QuantizeLinear", "DequantizeLinear", "QAttention", "MatMulNBits", "DynamicQuantizeLSTM"}
)
# Ops that compute a quantization scale from the activations of the run itself (one scale per tensor, over every row
# and every pad position): a graph with any of them answers a text differently depending on what shares its run.
DYNAMIC_SCALE_OPS = frozenset({"DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM"})


class InputError(ValueError):
    """A request the model cannot take (longer than its context); the server answers 422 with this message."""


@dataclass(frozen=True)
class ArtifactInfo:
    name: str
    task: str  # "sequence-classification" or "causal-lm", as in the recipe's model.task
    sha256: str
    quantized: bool
    quantization_ops: list[str]
    labels: list[str] | None
    max_positions: int
    provider: str = "cpu"  # the execution provider inference runs on
    # False for graphs with DYNAMIC_SCALE_OPS: a row's result depends on the other rows (and padding) of its run
    batch_invariant: bool = True


def session_options(threads: int = 0) -> ort.SessionOptions:
    """The one place session settings live: served and offline outputs must come from identical sessions."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # ORT's warnings about unused initializers are noise in a server log
    # Idle ORT worker threads spin by default, burning the cores that the event loop, the tokenizer and concurrent
    # requests need (on a shared 2-core machine: about 1.6x more texts per CPU-second with spinning off).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def scan_artifact(artifact_dir: Path) -> tuple[str, list[str]]:
    """sha256 over model.onnx then its external-data files (sorted), and the quantization ops found in the graph.

    With no external data the hash equals `sha256sum model.onnx`, so anyone can check it by hand."""
    import onnx  # only the graph structure is read; the weights in external files are hashed, not loaded

    model_path = artifact_dir / "model.onnx"
    proto = onnx.load(str(model_path), load_external_data=False)
    external = sorted(
        {entry.value for tensor in proto.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
         for entry in tensor.external_data if entry.key == "location"}
    )
    ops = sorted({node.op_type for node in proto.graph.node} & QUANT_OPS)
    del proto
    digest = hashlib.sha256()
    for path in [model_path, *(artifact_dir / name for name in external)]:
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest(), ops


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _labels(artifact_dir: Path, config: dict[str, Any]) -> list[str] | None:
    id2label = _read_json(artifact_dir / "labels.json").get("id2label") or config.get("id2label")
    if not id2label:
        return None
    return [id2label[key] for key in sorted(id2label, key=int)]


def detect_task(artifact_dir: Path) -> str:
    """The model's task from config.json's architecture (cheap: the server registers its routes before loading);
    when the name says nothing, from the rank of the graph's `logits` output (2: classifier, 3: causal LM)."""
    if (Path(artifact_dir) / "genai_config.json").is_file():  # the causal-LM builder's output
        return CAUSAL_LM
    for arch in _read_json(Path(artifact_dir) / "config.json").get("architectures") or []:
        if arch.endswith("ForSequenceClassification"):
            return CLASSIFIER
        if arch.endswith("ForCausalLM"):
            return CAUSAL_LM
    import onnx

    graph = onnx.load(str(Path(artifact_dir) / "model.onnx"), load_external_data=False).graph
    logits = next(o for o in graph.output if o.name == "logits")
    return CLASSIFIER if len(logits.type.tensor_type.shape.dim) == 2 else CAUSAL_LM


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def length_groups(lengths: list[int], slack: float = 0.25) -> list[list[int]]:
    """Indices grouped by similar length, so that padding adds at most `slack` to each group's real tokens.

    One padded run over texts of 8 and 30 words costs more than the texts alone: attention and the feed-forward layers
    work on every pad position. Sorted, similar-length groups keep most of batching's gain without paying for padding."""
    groups: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if current and (len(current) + 1) * lengths[i] > (1 + slack) * (tokens + lengths[i]):
            groups.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += lengths[i]
    return [*groups, current] if current else groups


class Classifier:
    def __init__(self, session: ort.InferenceSession, tokenizer: Tokenizer, info: ArtifactInfo, pad_id: int,
                 invariant: bool = True) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.info = info
        self.input_names = {i.name for i in session.get_inputs()}
        self.pad_id = pad_id
        # Texts share runs only where that cannot change their answers (or where the server was told to trade that).
        self.shares_runs = info.batch_invariant or not invariant

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        """Label and per-label probabilities for each text: one ORT run per group of similar-length texts, or per text
        when the graph is not batch-invariant."""
        encodings = self.tokenizer.encode_batch(texts)
        lengths = [len(e.ids) for e in encodings]
        groups = length_groups(lengths) if self.shares_runs else [[i] for i in range(len(texts))]
        probs: np.ndarray | None = None
        for group in groups:
            width = max(len(encodings[i].ids) for i in group)
            ids = np.full((len(group), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(group), width), dtype=np.int64)
            for row, i in enumerate(group):  # right padding, as transformers' tokenizers do
                ids[row, : len(encodings[i].ids)] = encodings[i].ids
                mask[row, : len(encodings[i].ids)] = 1
            feeds = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self.input_names:
                feeds["token_type_ids"] = np.zeros_like(ids)
            (logits,) = self.session.run(["logits"], feeds)
            if probs is None:
                probs = np.empty((len(texts), logits.shape[1]))
            probs[group] = _softmax(logits.astype(np.float64))
        assert probs is not None  # texts is never empty: the request model and the batcher guarantee it
        labels = self.info.labels or [str(i) for i in range(probs.shape[1])]
        return [
            {"label": labels[int(row.argmax())], "scores": {label: float(p) for label, p in zip(labels, row, strict=True)}}
            for row in probs
        ]

    def warmup(self) -> None:
        self.predict(["warm up"])


def lm_provider() -> str:
    """`cuda` when this environment's ONNX Runtime has the CUDA provider and a GPU answers, else `cpu`."""
    import onnxruntime_genai as og

    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() and og.is_cuda_available() else "cpu"


class Generator:
    """Decoding through onnxruntime-genai, one og.Generator per request, with token ids from the HF tokenizer.

    One request decodes at a time (a lock): onnxruntime-genai does not batch separate requests here, so serializing
    them keeps every answer equal to the same request sent alone, which the smoke test checks."""

    def __init__(self, artifact_dir: Path, tokenizer: Tokenizer, info: ArtifactInfo, eos_ids: set[int],
                 special_tokens: dict[str, str | None] | None = None) -> None:
        import onnxruntime_genai as og

        self._og = og
        config = og.Config(str(artifact_dir))
        config.clear_providers()
        if info.provider == "cuda":
            config.append_provider("cuda")
        self.model = og.Model(config)
        self.tokenizer = tokenizer
        self.info = info
        self.eos_ids = eos_ids
        self.special_tokens = special_tokens or {}  # bos_token / eos_token texts, for chat templates
        self._lock = threading.Lock()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.info.max_positions:
            raise InputError(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_new_tokens}) exceeds the model's "
                             f"context of {self.info.max_positions} tokens")
        if prompt_tokens == 0:
            raise InputError("the prompt encodes to no tokens")

    def stream_ids(self, prompt_ids: list[int], max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                   seed: int | None = None, stop: threading.Event | None = None) -> Iterator[int]:
        """Yield new token ids one at a time; ends at eos (not yielded), after max_new_tokens, or when `stop` is set."""
        self.check_length(len(prompt_ids), max_new_tokens)
        og = self._og
        params = og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": len(prompt_ids) + max_new_tokens, "do_sample": temperature > 0,
                                   "batch_size": 1}
        if temperature > 0:
            options.update(temperature=temperature, top_p=top_p, top_k=0)
            if seed is not None:
                options["random_seed"] = seed
        params.set_search_options(**options)
        with self._lock:
            generator = og.Generator(self.model, params)
            generator.append_tokens(np.array(prompt_ids, dtype=np.int32))
            produced = 0
            while produced < max_new_tokens and not generator.is_done():
                if stop is not None and stop.is_set():  # the request timed out or the client left
                    return
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
                if token in self.eos_ids:
                    return
                produced += 1
                yield token

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int = 16, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None, stop: threading.Event | None = None) -> dict[str, Any]:
        tokens = list(self.stream_ids(prompt_ids, max_new_tokens, temperature, top_p, seed, stop))
        cancelled = stop is not None and stop.is_set()
        finish = "cancelled" if cancelled else ("length" if len(tokens) >= max_new_tokens else "stop")
        return {"tokens": tokens, "prompt_tokens": len(prompt_ids), "finish_reason": finish}

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def generate(self, prompt: str, max_new_tokens: int = 16, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: threading.Event | None = None) -> dict[str, Any]:
        """Greedy (temperature 0) or sampled continuation of `prompt`; `finish_reason` is stop (eos), length or
        cancelled."""
        result = self.generate_ids(self.encode(prompt), max_new_tokens, temperature, top_p, seed, stop)
        return {"text": self.decode(result["tokens"]), **result}

    def warmup(self) -> None:
        self.generate("warm up", max_new_tokens=2)


def load_model(artifact_dir: Path, threads: int = 0, invariant: bool = True) -> Classifier | Generator:
    """Load an artifact folder: a classifier (model.onnx, config.json, tokenizer.json, labels.json) or a causal LM (the
    builder's model.onnx + genai_config.json, tokenizer.json). `invariant=False` lets a classifier whose graph is not
    batch-invariant share runs anyway (more throughput; each answer then depends on its neighbours)."""
    artifact_dir = Path(artifact_dir)
    config = _read_json(artifact_dir / "config.json")
    tok_config = _read_json(artifact_dir / "tokenizer_config.json")
    sha256, quant_ops = scan_artifact(artifact_dir)
    task = detect_task(artifact_dir)
    tokenizer = Tokenizer.from_file(str(artifact_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    model_max = int(tok_config.get("model_max_length", 1 << 30))
    if task == CAUSAL_LM:
        genai = _read_json(artifact_dir / "genai_config.json")["model"]
        provider = lm_provider()
        info = ArtifactInfo(
            name=genai.get("type", artifact_dir.name), task=task, sha256=sha256, quantized=bool(quant_ops),
            quantization_ops=quant_ops, labels=None, max_positions=min(int(genai["context_length"]), model_max),
            provider=provider,
        )
        eos = genai.get("eos_token_id")
        eos_ids = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
        special = {name: _token_text(tok_config.get(name)) for name in ("bos_token", "eos_token")}
        return Generator(artifact_dir, tokenizer, info, eos_ids, special)
    session = ort.InferenceSession(
        str(artifact_dir / "model.onnx"), session_options(threads), providers=["CPUExecutionProvider"]
    )
    max_positions = min(config.get("max_position_embeddings") or 2048, model_max)
    info = ArtifactInfo(
        name=(config.get("architectures") or [config.get("model_type", artifact_dir.name)])[0], task=task,
        sha256=sha256, quantized=bool(quant_ops), quantization_ops=quant_ops, labels=_labels(artifact_dir, config),
        max_positions=max_positions, batch_invariant=not DYNAMIC_SCALE_OPS & set(quant_ops),
    )
    pad_token = _token_text(tok_config.get("pad_token"))
    pad_id = tokenizer.token_to_id(pad_token) if pad_token else None
    pad_id = pad_id if pad_id is not None else config.get("pad_token_id") or 0
    tokenizer.enable_truncation(max_length=max_positions)  # like transformers' truncation=True: the model can't take more
    return Classifier(session, tokenizer, info, pad_id, invariant)


def predict_offline(artifact_dir: Path, texts: list[str], threads: int = 0) -> list[dict[str, Any]]:
    """What /predict answers for `texts`, computed in-process (same tokenization and session settings)."""
    model = load_model(artifact_dir, threads)
    if not isinstance(model, Classifier):
        raise TypeError(f"{artifact_dir} holds a {model.info.task} model, not a classifier")
    return model.predict(texts)


def generate_offline(artifact_dir: Path, prompt: str, max_new_tokens: int = 16, *, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = None, threads: int = 0) -> dict[str, Any]:
    """What /generate answers for `prompt`, computed in-process (same tokenization and session settings)."""
    model = load_model(artifact_dir, threads)
    if not isinstance(model, Generator):
        raise TypeError(f"{artifact_dir} holds a {model.info.task} model, not a causal LM")
    return model.generate(prompt, max_new_tokens, temperature, top_p, seed)
