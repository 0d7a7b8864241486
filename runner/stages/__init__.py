"""The stages of the pipeline: model, data, train, export, quantize, evaluate, serve. A stage with one job is one module
(`model.py`, `export.py`, `quantize.py`); a stage with parts is a folder (`data/`, `train/`, `evaluate/`, `serve/`)
whose `__init__.py` holds its `run()` and whose other modules are its parts, named by job.

Every stage has one entry point:

    def run(config: dict, inputs: dict[str, Path], out: Path) -> dict

- `config` is the step's configuration exactly as it went into the step's cache key: `{"model": ..., "<stage>": ...,
  "seed": ...}` in JSON form (local paths already absolute). A stage re-reads its section with the Pydantic model from
  runner.recipe.sections. It never reads another stage's section.
- `inputs` maps each upstream step's kind to that step's committed output folder (read-only); a stage whose StageSpec
  has `memo` also gets a cache-owned folder at `inputs["memo"]` for sub-results it memoizes across keys.
- `out` is an empty folder the stage fills (for resumable stages it may hold the previous attempt's checkpoints).
- The return value is a small JSON-able dict of metrics; it lands in the manifest, run.json and the report.

A stage never touches the store (runner/store/) or the planner (runner/plan.py): tests/test_structure.py fails on such
an import, and on any import of a stage from the store. It never chooses paths outside `out`, and logs through
`logging.getLogger(__name__)` (the executor sends that to the step's log file). A problem the user can fix raises
`StageError` (a runner.errors.RunnerError) with a clear message; each `run()` docstring lists under `Raises:` when it does.

Where things live:
- shared by several stages: `pretrained.py` (every base model and tokenizer is loaded there), `data/rows.py` (the
  recipe's rows before tokenization: data, model and evaluate read them alike), `merge.py` (the trained model as one
  full-precision model: export, quantize and evaluate load it there), `compare.py` (two models run on the same samples:
  the export, quantize and evaluate gates), `shared.py` (labels.json, the bitsandbytes config, the head names LoRA
  trains fully, perplexity, macro-F1, the model.init config);
- one stage's parts, in its folder: `train/` (job, build, trainer, guard, checkpoints, results, the launchers -
  torchrun.py and worker.py - and regularize, packing; the Ray launcher and the preference objectives go here too),
  `data/chat.py`, `evaluate/` (sets, artifacts, scores, linear_probe, lm_eval), `serve/gates.py`. A part never imports
  its stage's `__init__` (tests/test_structure.py fails on any cycle).
- beside the stages: the store (local cache; the remote store goes to runner/store/remote.py) and the planner, which
  call the stages, never the other way round.

Output folders, by stage (what downstream stages rely on):
- model (only for `model.init` or `model.gguf_file`): `model/` - a saved model and tokenizer (save_pretrained).
- data: `dataset/` (DatasetDict with `train` and `test`; columns `text`, `input_ids`, `attention_mask`, `labels`),
  `labels.json` (`{"id2label": {...}, "label2id": {...}}`, classification only), `chat_template.jinja` (chat recipes
  with `messages_column`: the template the rows were rendered with; train saves it with the tokenizer) and `stats.json`.
- train: `model/` (full fine-tune) or `adapter/` (LoRA/QLoRA, peft save_pretrained), each with the tokenizer saved beside
  it; `metrics.json`, `trainer_state.json`, `loss.png`, `tensorboard/`.
- export: `onnx/` (classifier: model.onnx, config.json, tokenizer, labels.json; causal LM: the onnxruntime-genai builder's
  model.onnx + model.onnx.data, genai_config.json, tokenizer) and, for causal LMs and `format: safetensors`, `merged/`
  (the merged checkpoint in safetensors), and `export_report.json`.
- quantize: `onnx/` (same layout as export) or `model/` (bitsandbytes), and `quantize_report.json`.
- evaluate: `evaluate_report.json` (every set's scores per artifact, the forgetting table and verdict) and
  `confusion_<set>.png` (classifiers).
- serve: `serve_report.json`.

Each output is either an *artifact* (the same recipe and seed give the same bytes: weights, tokenizer, ONNX graphs,
dataset arrow files, labels.json, gate reports without timings) or a *run record* (timings, logs, ports, plots,
TensorBoard events): StageSpec.records lists the record patterns. `recipe verify` compares artifacts only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runner.errors import RunnerError


class StageError(RunnerError):
    """A stage failed for a reason the user can act on; the message says what and what to do."""


@dataclass(frozen=True)
class StageSpec:
    kind: str
    module: str  # imported only when the step runs, so `recipe validate` and `recipe plan` stay fast
    version: int  # bump when a change to the stage's code changes its results: every cached entry of it goes stale
    packages: tuple[str, ...]  # distributions whose versions shape the result (they go into the cache key)
    resumable: bool = False  # keep the previous attempt's output folder (checkpoints) instead of starting empty
    # Run records among the outputs: fnmatch patterns on the output's relative path (`*` also crosses `/`). They are
    # kept, hashed into the manifest and listed in the lock, but never compared across machines by `recipe verify`.
    records: tuple[str, ...] = ()
    # Gets a cache-owned folder at inputs["memo"] for sub-results memoized by content across keys (evaluate: one score
    # per (set, artifact)); the stage writes each memo file atomically (runner.atomic.write_memo).
    memo: bool = False
    # Gets `placement=` (a Placement): a stage that runs parts of itself on other machines (train on Ray) learns where
    # its inputs come from and what the recipe requires of the hardware.
    placed: bool = False


# On the machine that calls it (runner/fetch.py): (placement, input name, the driver's folder of it) -> the
# input's folder there, from the driver's folder when seen, that machine's cache or the remote; (placement, None, None)
# -> a work folder there for the step itself.
Localize = Callable[["Placement", "str | None", "Path | None"], Path]


@dataclass(frozen=True)
class Placement:
    """What the executor tells a placed stage beyond its config. None of it changes a result, so none is in a key.

    A stage never imports the store: the executor hands it `localize`, which a process on another machine calls to get
    an input there (from that machine's cache, or pulled from the remote by key and verified) and a work folder."""

    accelerator: str = "any"  # the recipe's requires.accelerator
    key: str = ""  # the step's own key
    remote: str | None = None  # the remote's URL as printable (no credentials: each machine has its own)
    sources: dict[str, tuple[str, str]] = field(default_factory=dict)  # input name -> (kind, key) of its entry
    localize: Localize | None = field(default=None, compare=False)

    def to_json(self) -> dict:
        return {"accelerator": self.accelerator, "key": self.key, "remote": self.remote,
                "sources": {name: list(source) for name, source in self.sources.items()}}

    @classmethod
    def from_json(cls, data: dict, localize: Localize | None = None) -> Placement:
        return cls(data.get("accelerator", "any"), data.get("key", ""), data.get("remote"),
                   {name: (kind, key) for name, (kind, key) in data.get("sources", {}).items()}, localize)


_TORCH = ("torch", "transformers", "tokenizers", "safetensors")

STAGES: dict[str, StageSpec] = {
    "model": StageSpec("model", "runner.stages.model", 2, _TORCH),  # 2: tokenizer from the train split only
    # datasets writes a random cache fingerprint into state.json (its transforms are not hashable); the arrow files and
    # dataset_info.json hold the data
    "data": StageSpec(
        "data", "runner.stages.data", 1, ("datasets", "transformers", "tokenizers"), records=("dataset/*/state.json",)
    ),
    # metrics.json and trainer_state.json hold runtimes and samples/s beside the losses; loss.png draws the metrics
    # table; peft's README.md model card names the base model's folder
    "train": StageSpec(
        "train", "runner.stages.train", 3,  # 3: classifier loss divided by gradient accumulation (accepts_loss_kwargs)
        (*_TORCH, "peft", "accelerate", "bitsandbytes"), True,
        records=("metrics.json", "trainer_state.json", "loss.png", "tensorboard/*", "*/README.md"), placed=True,
    ),
    "export": StageSpec(
        "export", "runner.stages.export", 3, (*_TORCH, "peft", "onnx", "onnxscript", "onnxruntime", "onnxruntime-genai")
    ),
    "quantize": StageSpec(
        "quantize", "runner.stages.quantize", 3,  # 3: dynamic int8 scored one text at a time
        (*_TORCH, "peft", "onnx", "onnxruntime", "onnxruntime-genai", "bitsandbytes"),
    ),
    "evaluate": StageSpec(
        "evaluate", "runner.stages.evaluate", 2,  # 2: the probe is cross-validated (probe_folds)
        (*_TORCH, "peft", "datasets", "onnxruntime", "onnxruntime-genai", "scikit-learn"),
        # evaluate_report.json lists which scores the memo supplied: that depends on what this machine's cache ran
        # before (the same key scores everything fresh elsewhere), so the report is a run record, not an artifact
        records=("*.png", "evaluate_report.json"), memo=True,
    ),
    "serve": StageSpec(
        "serve", "runner.stages.serve", 4,  # 4: latency samples and latency.png
        ("onnxruntime", "onnxruntime-genai", "fastapi", "uvicorn", "tokenizers"),
        records=("*",),  # the report holds latencies, a port and a pid; server.log is a log
    ),
}


def record_patterns(kind: str) -> tuple[str, ...]:
    """The run-record patterns of a stage, for the store (which knows no stages); () for a kind this version lacks."""
    spec = STAGES.get(kind)  # looked up per call: tests swap in test-only stages
    return spec.records if spec is not None else ()
