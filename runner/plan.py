"""Planning: a validated recipe becomes ordered steps, each with its dependencies and its cache key.

Only this module knows the order of the pipeline and what each step's key is made of. A key is the sha256 of the step's
*key material*: the stage kind and implementation version, the normalized config the stage sees (fields marked neutral
left out, local paths replaced by the sha256 of their content), the keys of upstream steps, the versions of the
packages that shape the result (by the distribution that provides each module: onnxruntime or onnxruntime-gpu), and the
platform facts that change its bytes (`platform_material`: the CPU family for the int8 preset, the GPUs a train uses).
Model and dataset ids with their revisions and the seed are part of the config; the loader has already turned every
revision into a commit sha (runner.recipe.local_checks.pin_revisions), so a moved branch cannot keep a stale key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner import stages
from runner.hardware import platform_facts
from runner.keys import canonical, package_version
from runner.names import X_LOCAL_PATH, X_NEUTRAL, X_PACKAGE_FOLDER, is_onnx_method
from runner.recipe import Loaded, Recipe, packages
from runner.recipe.objectives import Preference
from runner.recipe.schema import field_has
from runner.recipe.sections import Model
from runner.store.local import Cache, HashMemo

ORDER = ("model", "data", "train", "export", "quantize", "evaluate", "serve")


@dataclass
class Step:
    kind: str  # the step's name in the plan: its stage, or `RECIPE.stage` for a step of a recipe `model.recipe` names
    config: dict[str, Any]  # exactly what the stage function receives
    depends: list[str]
    key: str = ""
    material: dict[str, Any] = field(default_factory=dict)
    # the name a dependency's output folder is handed to the stage under, where it is not the dependency's own name
    # (the steps of a referenced recipe see their siblings unprefixed: `train` reads `data`, not `tiny_chat_lora.data`)
    renamed: dict[str, str] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        """The stage that runs the step, which is also where the cache keeps its entries."""
        return self.kind.rpartition(".")[2]

    def input_name(self, dep: str) -> str:
        return self.renamed.get(dep, dep)


# Model fields added after the cache keys were first promised: left out of a step's config while at their default, so
# the keys of recipes that do not set them stay what they were (tests/test_golden_keys.py)
LATER_MODEL_FIELDS = {"gguf_file": None, "dtype": None, "recipe": None}


def model_json(model: Model) -> dict[str, Any]:
    """The model section as a step's config holds it (and its key is made from)."""
    return {k: v for k, v in model.model_dump(mode="json").items()
            if not (k in LATER_MODEL_FIELDS and v == LATER_MODEL_FIELDS[k])}


def step_configs(recipe: Recipe, source: Recipe | None = None) -> list[Step]:
    """The steps a recipe needs, in order, with derived dependencies and the config each stage sees. `source`: the
    recipe `model.recipe` names, whose trained model the model step makes this recipe's base (its steps are not here:
    build_plan adds them)."""
    model = model_json(recipe.model)
    init = recipe.model.init is not None
    # the model step builds `init`, converts a GGUF checkpoint once, or makes another recipe's trained model one
    # folder (source_model); later steps load its output
    base = ["model"] if init or recipe.model.gguf_file is not None or source is not None else []
    steps: list[Step] = []

    def add(kind: str, section: Any, depends: list[str], extra: dict[str, Any] | None = None) -> None:
        config = {"model": model, kind: section.model_dump(mode="json"), "seed": recipe.seed, **(extra or {})}
        steps.append(Step(kind, config, depends))

    # train.objective other than sft: the data step reads preference rows (and the model step trains its tokenizer on
    # them), evaluate scores preference accuracy or rewards. Passed only then, so SFT recipes keep their keys.
    rows = data_rows_of(recipe.train)
    if init:
        # The built model's tokenizer is trained on the recipe's data, so the model step reads the data section too.
        # (of the objective only which rows it reads: its tokenizer learns the texts before prompts are cut)
        which = {"objective": rows["objective"]} if rows else {}
        steps.append(Step("model", {"model": model, "data": recipe.data.model_dump(mode="json"), "seed": recipe.seed,
                                    **which}, []))
    elif source is not None:
        steps.append(source_model(model, source))
    elif base:  # a GGUF conversion: neither the data nor the seed changes it, so every recipe of that file shares it
        steps.append(Step("model", {"model": model}, []))
    add("data", recipe.data, base, rows)
    # data.packing changes how train batches its examples (the data step's output is the same): passed only when on,
    # so the keys of recipes without it stay what they were
    add("train", recipe.train, ["data", *base], {"packing": True} if recipe.data.packing else None)
    steps[-1].config["train"] = train_section(recipe.train)
    if recipe.export is not None:
        add("export", recipe.export, ["train", "data", *base])
    if recipe.quantize is not None:
        if is_onnx_method(recipe.quantize.method):
            add("quantize", recipe.quantize, ["export", "data"])
        else:  # bitsandbytes quantizes the trained (merged) model, not the ONNX export
            add("quantize", recipe.quantize, ["train", "data", *base])
    if recipe.evaluate is not None:
        # scores what exists of base, trained, exported and quantized models; after them, before serve (a run that
        # forgot too much stops before anything is served)
        present = {"base": True, "train": True, "export": recipe.export is not None, "quantize": recipe.quantize is not None}
        scored = [kind for kind in recipe.evaluate.artifacts if present[kind]]
        objective = {"objective": train_section(recipe.train)} if recipe.train.objective != "sft" else {}
        add("evaluate", recipe.evaluate, ["data", *[k for k in scored if k != "base"], *base],
            {"scored_models": scored, **objective})
    if recipe.serve is not None:
        onnx_quantized = recipe.quantize is not None and is_onnx_method(recipe.quantize.method)
        # data: the served classifier's accuracy is measured on the test split through the running server
        add("serve", recipe.serve, ["quantize" if onnx_quantized else "export", "data"])
    return steps


def step_names(loaded: Loaded) -> list[str]:
    """The names of the steps build_plan makes, without their keys (nothing is hashed): `recipe validate` lists them."""
    source = loaded.source
    own = [step.kind for step in step_configs(loaded.recipe, source.recipe if source is not None else None)]
    if source is None:
        return own
    theirs = step_names(source)
    return [f"{source.recipe.name}.{kind}" for kind in theirs[: theirs.index("train") + 1]] + own


def source_model(model: dict[str, Any], source: Recipe) -> Step:
    """The model step of a recipe that starts from `source`'s trained model: it merges that train step's adapter into
    its base (a full fine-tune is taken as it is) and saves one model, which this recipe's steps load as their base.
    Its inputs are the source's train step and what loading the source's base needs (its data step, for a classifier's
    labels; its model step, for a base that step built). The key is made of those steps' keys (not of the file's path
    or text): editing the source recipe in a way that changes its train step re-runs this one and all after it."""
    prefix = source.name
    built = source.model.init or source.model.gguf_file or source.model.recipe  # its base is its model step's output
    names = ["train", "data", *(["model"] if built else [])]
    config = {"model": model, "source": {"model": model_json(source.model)}}
    return Step("model", config, [f"{prefix}.{name}" for name in names], renamed={f"{prefix}.{n}": n for n in names})


OBJECTIVE_FIELDS = ("objective", "preference", "grpo")


def train_section(train: Any) -> dict[str, Any]:
    """The train config a step sees. With `objective: sft` the objective fields are left out: they did not exist
    before preference tuning, and an SFT recipe's train key must stay what it was."""
    dumped: dict[str, Any] = train.model_dump(mode="json")
    if train.objective == "sft":
        for name in OBJECTIVE_FIELDS:
            dumped.pop(name)
    return dumped


def data_rows_of(train: Any) -> dict[str, Any]:
    """What the data (and model) step must know of a preference objective: which rows to read, and the prompt budget
    it cuts prompts to. Empty for sft."""
    if train.objective == "sft":
        return {}
    rows: dict[str, Any] = {"objective": train.objective}
    if train.objective != "grpo":
        rows["max_prompt_length"] = (train.preference or Preference()).max_prompt_length
        rows["max_identical_share"] = (train.preference or Preference()).max_identical_share
    return rows


def build_plan(loaded: Loaded, memo: HashMemo | None = None) -> list[Step]:
    memo = memo or HashMemo(None)
    source = loaded.source
    imported = referenced_steps(source, memo) if source is not None else []
    steps = step_configs(loaded.recipe, source.recipe if source is not None else None)
    keys: dict[str, str] = {step.kind: step.key for step in imported}
    for step in steps:
        spec = stages.STAGES[step.stage]
        step.material = {
            "stage": step.stage,
            "version": spec.version,
            # a source recipe's model (source_model) is keyed by the steps it comes from, through their keys upstream
            "config": normalize({k: v for k, v in step.config.items() if k != "source"}, (), memo),
            "upstream": {step.input_name(dep): keys[dep] for dep in step.depends},
            "packages": {name: package_version(name) for name in step_packages(step, spec.packages)},
        }
        facts = platform_material(step)
        if facts:  # only where the platform changes the result, so the other steps' keys stay what they were
            step.material["platform"] = facts
        step.key = key_of(step.material)
        keys[step.kind] = step.key
        if step.kind == "evaluate":
            # Each (set, artifact) score is memoized under the artifact's key (runner.stages.evaluate), so the stage
            # learns the keys; they are already in the material as `upstream` (base: the model section's own key).
            _artifact_keys(step, keys, step.config.pop("scored_models"))
    memo.save()
    return [*imported, *steps]


def referenced_steps(source: Loaded, memo: HashMemo) -> list[Step]:
    """The steps of the recipe `model.recipe` names, up to and including its train step, as that recipe plans them
    (the same keys: its entries in the cache are shared, whichever recipe ran them first), named `RECIPE.kind`."""
    planned = build_plan(source, memo)
    wanted = {"train"}  # the train step and every step it depends on, however deep
    for step in reversed(planned):
        if step.kind in wanted:
            wanted.update(step.depends)
    prefix = f"{source.recipe.name}."
    steps = []
    for step in planned:
        if step.kind in wanted:
            renamed = {prefix + dep: step.input_name(dep) for dep in step.depends}
            steps.append(Step(prefix + step.kind, step.config, list(renamed), step.key, step.material, renamed))
    return steps


def _artifact_keys(step: Step, keys: dict[str, str], scored: list[str]) -> None:
    base_key = keys.get("model") or key_of({"model": step.material["config"]["model"]})
    step.config["artifact_keys"] = {kind: base_key if kind == "base" else keys[kind] for kind in scored}


def adopt(steps: list[Step], kind: str, key: str, material: dict[str, Any]) -> list[str]:
    """Take another machine's entry for step `kind` (from a lock: the same recipe, a key that differs by platform facts
    alone, such as the GPUs a train used): the step gets that entry's key and material, and every later step is keyed
    on it, since its upstream key is part of its material. Returns the steps whose keys changed.

    This is how a CPU machine uses what a GPU trained (`recipe run --locked --pull`): each key still says exactly what
    its entry was made from."""
    keys: dict[str, str] = {}
    changed = []
    for step in steps:
        if step.kind == kind:
            step.key, step.material = key, dict(material)
            changed.append(step.kind)
        else:
            upstream = {step.input_name(dep): keys[dep] for dep in step.depends}
            if upstream != step.material.get("upstream"):
                step.material = {**step.material, "upstream": upstream}
                step.key = key_of(step.material)
                changed.append(step.kind)
                if step.kind == "evaluate":
                    _artifact_keys(step, keys, list(step.config["artifact_keys"]))
        keys[step.kind] = step.key
    return changed


def step_packages(step: Step, packages: tuple[str, ...]) -> tuple[str, ...]:
    """The stage's packages, plus TRL for a train step with a preference objective (SFT never imports it)
    and gguf for a model step converting `model.gguf_file`."""
    objective = step.config["train"].get("objective", "sft") if step.kind == "train" else "sft"
    if step.kind == "model" and step.config["model"].get("gguf_file"):
        return (*packages, "gguf")  # it reads the GGUF file the model step converts
    if step.kind == "model" and "source" in step.config:
        return (*packages, "peft")  # it merges the source recipe's adapter
    return (*packages, "trl") if objective != "sft" else packages


def key_of(material: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(material).encode()).hexdigest()[:24]


def normalize(value: Any, loc: tuple[str | int, ...], memo: HashMemo) -> Any:
    """The part of a config that can change a result: neutral fields dropped, local paths as content hashes.

    `loc` is the field's path in the recipe (a step config's top-level keys are recipe sections)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            here = (*loc, key)
            if loc and field_has(here, X_NEUTRAL):
                continue
            out[key] = normalize(item, here, memo)
        return out
    if isinstance(value, list):
        return [normalize(item, (*loc, index), memo) for index, item in enumerate(value)]
    if isinstance(value, str) and loc and field_has(loc, X_LOCAL_PATH):
        return {"sha256": memo.tree(Path(value))}
    if isinstance(value, str) and loc and field_has(loc, X_PACKAGE_FOLDER):  # a model inside an installed package
        return {**packages.provenance(value, memo.file), "sha256": memo.tree(packages.package_folder(value))}
    return value


# Quantize methods whose int8 weight type comes from the CPU preset (runner.stages.quantize.cpu_preset); the quantized
# graph, its calibration (static) and the gate's int8 kernels depend on the CPU family. Weight-only (MatMulNBits built
# by the genai builder) and bitsandbytes never read the preset.
PRESET_METHODS = ("onnx-dynamic-int8", "onnx-static-int8")


def platform_material(step: Step) -> dict[str, Any]:
    """The facts about this machine that change the step's result (empty for most steps)."""
    if step.kind == "quantize" and step.config["quantize"]["method"] in PRESET_METHODS:
        return {"cpu_isa": platform_facts.cpu_isa()[0]}
    if step.kind == "train":
        return {"gpus": train_gpus(step.config["train"])}
    return {}


def train_gpus(train: dict[str, Any]) -> int:
    """GPUs the train step will use: it trains on CUDA whenever a GPU is visible (CUDA_VISIBLE_DEVICES applied). In one
    process Trainer spreads each batch over all of them with DataParallel (the effective batch grows with the count);
    under torchrun each of the nproc_per_node processes takes one."""
    visible = len(platform_facts.gpus())
    distributed = train.get("distributed")
    return min(visible, distributed["nproc_per_node"]) if distributed else visible


# --- why is a step stale ------------------------------------------------------------------------------------------------


def why_stale(step: Step, previous: dict[str, Any] | None) -> list[str]:
    """Human-readable differences between this step's key material and the last run's."""
    if not previous:
        return ["never run for this recipe"]
    if previous.get("key") == step.key:
        return ["same key as the last run, but its output is not in the cache (failed, removed or quarantined)"]
    old, new = _flatten(previous.get("material", {})), _flatten(step.material)
    reasons = []
    for path in sorted(set(old) | set(new)):
        if old.get(path) == new.get(path):
            continue
        reasons.append(_describe(path, old.get(path, "<unset>"), new.get(path, "<unset>")))
    return reasons or ["key changed"]


def _describe(path: str, old: Any, new: Any) -> str:
    if path.endswith(".sha256") and path.startswith("config."):
        return f"{path.removeprefix('config.').removesuffix('.sha256')}: file content changed"
    if path.startswith("upstream."):
        return f"upstream step '{path.removeprefix('upstream.')}' changed"
    if path.startswith("config."):
        path = path.removeprefix("config.")
    return f"{path}: {_short(old)} -> {_short(new)}"


def _short(value: Any) -> str:
    text = canonical(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaf paths to values. Lists of mappings (data sources, probes) are entered, so a change names the one field (a
    source's revision or file) instead of the whole list; lists of plain values stay whole (`[q_proj, v_proj]`)."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if _of_mappings(value) else None
    if items is None or not value:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _of_mappings(value: Any) -> bool:
    return isinstance(value, list) and any(isinstance(item, dict) for item in value)


def plan_status(steps: list[Step], cache: Cache, recipe: str) -> list[tuple[Step, bool, list[str]]]:
    """Each step with whether it is cached and, when not, why it will run."""
    last = cache.last_run(recipe)
    rows = []
    for step in steps:
        cached = cache.entry(step.stage, step.key) is not None
        rows.append((step, cached, [] if cached else why_stale(step, last.get(step.kind))))
    return rows
