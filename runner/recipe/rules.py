"""Cross-field rules of the recipe language: checks that read more than one field.

They are plain functions over the recipe *as written* (the merged document after extends and overrides), not Pydantic
model validators: a model validator runs only once every field of its model is valid and can only point at the whole
model, so its errors came one fix at a time at `FILE:1:1: (recipe)`. Here each rule yields `(loc, message)` for the field
it is about, and runs in the same pass as field validation: a rule reads a field through `Section`, which gives the
written value, the model's default when it is left out, and skips the rule (`Skip`) when a field it needs has its own
error. Field validation is strict (no "3" for 3), so a value that validated is the value a rule compares.

`Recipe` runs the same rules on itself (document.py), so a recipe built in Python obeys them too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pydantic import BaseModel

from runner.names import CAUSAL_LM, CLASSIFIER, is_onnx_method
from runner.recipe import objectives as o
from runner.recipe import sections as m

Loc = tuple[str | int, ...]
Found = Iterator[tuple[Loc, str]]


class Skip(Exception):
    """A field the rule needs is missing or has its own error: the rule has nothing to say."""


class Section:
    """One mapping of the recipe, read by a rule: `s["field"]` is the written value, else the default of `cls`."""

    def __init__(self, value: Any, loc: Loc, cls: type[BaseModel] | None, bad: set[Loc]):
        self.value, self.loc, self.cls, self.bad = value, loc, cls, bad

    def present(self) -> bool:
        return isinstance(self.value, dict)

    def given(self, name: str) -> bool:
        """Whether the field is written (not left out, not null), valid or not."""
        return self.present() and self.value.get(name) is not None

    def at(self, *parts: str | int) -> Loc:
        return (*self.loc, *parts)

    def __getitem__(self, name: str) -> Any:
        if not self.present() or _is_bad(self.at(name), self.bad):
            raise Skip
        if self.value.get(name) is not None:
            return self.value[name]
        info = self.cls.model_fields.get(name) if self.cls else None
        if info is None or info.is_required():
            raise Skip
        return info.get_default(call_default_factory=True)

    def section(self, name: str, cls: type[BaseModel] | None) -> Section:
        """A sub-mapping; absent (not present()) when left out or null. Raises Skip when it has an error of its own."""
        if self.present() and _is_bad(self.at(name), self.bad, below=False):
            raise Skip
        return Section(self.value.get(name) if self.present() else None, self.at(name), cls, self.bad)

    def items(self, name: str, cls: type[BaseModel] | None) -> list[Section]:
        value = self.value.get(name) if self.present() else None
        if not isinstance(value, list):
            return []
        return [Section(item, self.at(name, i), cls, self.bad) for i, item in enumerate(value)]


def _is_bad(loc: Loc, bad: set[Loc], below: bool = True) -> bool:
    """An error at `loc`, at a mapping above it, or (with `below`) anywhere inside its value."""
    return any(loc[: len(err)] == err or (below and err[: len(loc)] == loc) for err in bad)


# --- the rules, one small function each (a Skip ends only the rule that raised it) ------------------------------------


SOURCES = ("hub", "path", "package", "init", "recipe")  # where a base model comes from: exactly one


def model_source(model: Section) -> Found:
    given = [name for name in model.value if name in SOURCES and model.given(name)]  # as written
    if len(given) != 1:
        loc = model.at(given[1]) if given else model.loc
        yield loc, f"give exactly one of {', '.join(SOURCES)} (got {', '.join(given) or 'none'})"
    if model.given("hub") and not model.given("revision"):
        yield model.at("hub"), "a hub model needs a pinned `revision` (a full commit sha)"
    if model.given("gguf_file") and not (model.given("package") or model.given("path")):
        yield model.at("gguf_file"), "`gguf_file` names a file inside the `package` or `path` folder; give one of them"
    if model.given("revision") and not model.given("hub"):
        yield model.at("revision"), "`revision` only applies to a `hub` model" + (
            " (a package model is pinned by the package version the env installs)" if model.given("package") else "")


def init_heads(init: Section) -> Found:
    if init["hidden_size"] % init["num_heads"]:
        yield init.at("num_heads"), f"num_heads ({init['num_heads']}) must divide hidden_size ({init['hidden_size']})"


def inline_columns(source: Section) -> Found:
    rows = source["rows"]
    if not isinstance(rows, dict):
        return
    lengths = {len(values) for values in rows.values() if isinstance(values, list)}
    if not rows or 0 in lengths:
        yield source.at("rows"), "inline rows need at least one column with at least one value"
    elif len(lengths) > 1:
        yield source.at("rows"), f"all columns need the same number of values (got {sorted(lengths)})"


def data_sources(data: Section) -> Found:
    if data.given("source") == data.given("sources"):
        yield (data.at("sources") if data.given("source") else data.loc), "give exactly one of `source` or `sources`"


def data_prompt_mask(data: Section) -> Found:
    if data["mask_prompt"] and not data["response_template"]:
        yield data.at("mask_prompt"), "`mask_prompt` needs `response_template` (the part of the template that is the answer)"


def data_response_template(data: Section) -> Found:
    response, template = data["response_template"], data["template"]
    if response and template and response not in template:
        yield data.at("response_template"), "`response_template` must be part of `template`"


def data_messages(data: Section) -> Found:
    """A chat recipe's conversations are rendered by their template, not by `template`; its loss is already on the
    assistant turns only, so `mask_prompt`/`response_template` have nothing to act on."""
    if data["messages_column"] is None:
        return  # `chat_template` alone: rule chat_template_use
    for name in ("template", "response_template"):
        if data[name] is not None:
            yield data.at(name), f"give either `{name}` or `messages_column` (conversations are rendered by the chat template)"
    if data["mask_prompt"]:
        yield data.at("mask_prompt"), ("`messages_column` already learns only the assistant turns; `mask_prompt` is for "
                                       "`template` rows: leave it out")
    if data["chat_template"] is not None:
        from runner.chat import template_problem  # jinja2 only: a syntax error is found before any step runs

        problem = template_problem(data["chat_template"])
        if problem:
            yield data.at("chat_template"), problem


def chat_template_use(recipe: Section) -> Found:
    """`chat_template` renders conversations: a `messages_column` (sft) or preference rows written as messages."""
    data = recipe.section("data", m.Data)
    if data.present() and data["messages_column"] is None and data["chat_template"] is not None:
        if _train(recipe)["objective"] == "sft":
            yield data.at("chat_template"), "`chat_template` renders `messages_column` conversations: set `messages_column`"


def chat_recipe(recipe: Section) -> Found:
    model, data = recipe.section("model", m.Model), recipe.section("data", m.Data)
    if not data.present() or data["messages_column"] is None:
        return
    if model["task"] != CAUSAL_LM:
        yield data.at("messages_column"), (f"`messages_column` trains a causal-lm chat model; a {model['task']} model "
                                           "reads `text_column`")
    elif model.given("init") and data["chat_template"] is None:
        yield data.at("messages_column"), ("a tokenizer built from `model.init` has no chat template: set "
                                           "`data.chat_template` (recipes/tiny_chat_lora.yaml has a ChatML one)")


def lora_targets(lora: Section) -> Found:
    if lora["target_modules"] == []:
        yield lora.at("target_modules"), "`target_modules` must name at least one module (or be `all-linear`)"


def train_eval_steps(train: Section) -> Found:
    if train["eval_strategy"] == "steps" and train["eval_steps"] is None:
        yield train.at("eval_strategy"), "`eval_strategy: steps` needs `eval_steps`"


def train_min_batch(train: Section) -> Found:
    if train["min_batch_size"] > train["batch_size"]:
        yield train.at("min_batch_size"), "`min_batch_size` must not exceed `batch_size`"


def train_l2sp(train: Section) -> Found:
    if train["l2sp"] is None:  # unset (or its own error: Skip)
        return
    if train["method"] != "full":
        yield train.at("l2sp"), (f"`l2sp` applies to `method: full` (it pulls every trained weight toward its "
                                 f"pretrained value); {train['method']} keeps the pretrained weights frozen and "
                                 "trains adapters: remove `l2sp`")
    elif train.section("distributed", m.Distributed)["fsdp"]:
        yield train.at("l2sp"), ("`l2sp` does not work with `distributed.fsdp`: FSDP shards the weights, and the "
                                 "penalty reads whole ones; use DDP (leave `fsdp` unset) or drop `l2sp`")


def probe_kind(probe: Section) -> Found:
    if [probe.given("text"), probe.given("prompt"), probe.given("messages")].count(True) != 1:
        yield probe.loc, "a probe has exactly one of `text` (classifier) or `prompt` (generator) or `messages` (chat)"
        return
    if probe.given("text"):
        for name in ("expect_nonempty", "expect_pattern", "expect_contains"):
            if probe[name]:
                yield probe.at(name), "`expect_nonempty`/`expect_pattern`/`expect_contains` apply to `prompt` probes"
    elif probe.given("expect_label"):
        yield probe.at("expect_label"), "`expect_label` applies to `text` probes"


def onnx_quantize_needs_export(recipe: Section) -> Found:
    quantize, export = recipe.section("quantize", None), recipe.section("export", m.Export)
    if quantize.present() and is_onnx_method(str(quantize["method"])):
        if not export.present() or export["format"] != "onnx":
            yield quantize.at("method"), "an ONNX quantize needs an `export` section with `format: onnx`"
        elif (export["optimization_level"] or 0) >= 2:
            yield export.at("optimization_level"), ("ONNX Runtime cannot quantize a fused graph: use "
                                                    "`export.optimization_level` 0 or 1 with an ONNX quantize")


def serve_needs_onnx(recipe: Section) -> Found:
    serve, export = recipe.section("serve", m.Serve), recipe.section("export", m.Export)
    if serve.present() and (not export.present() or export["format"] != "onnx"):
        yield serve.loc, "a `serve` section needs an `export` section with `format: onnx` (the server runs ONNX)"


def probes_fit_task(recipe: Section) -> Found:
    task = recipe.section("model", m.Model)["task"]
    classify = task == CLASSIFIER
    kinds, others = (["text"], ["prompt", "messages"]) if classify else (["prompt", "messages"], ["text"])
    for probe in recipe.section("serve", m.Serve).items("probes", m.Probe):
        for other in others:
            if probe.given(other) and not any(probe.given(kind) for kind in kinds):
                yield probe.at(other), f"a {task} model is probed with {' or '.join(f'`{k}`' for k in kinds)} probes"


def causal_lm_template(recipe: Section) -> Found:
    model, data = recipe.section("model", m.Model), recipe.section("data", m.Data)
    if _train(recipe)["objective"] != "sft":
        return  # preference rows are read by their columns (prompt/chosen/rejected ...), not through a template
    if model["task"] == CAUSAL_LM and data.present() and data["template"] is None and data["messages_column"] is None:
        yield data.at("template"), ("a causal-lm recipe needs `data.template` to turn rows into text, or "
                                    "`data.messages_column` for chat conversations")


def packing_causal_lm(recipe: Section) -> Found:
    model, data = recipe.section("model", m.Model), recipe.section("data", m.Data)
    if data.present() and data["packing"] and model["task"] != CAUSAL_LM:
        yield data.at("packing"), ("`data.packing` is for causal-lm training (examples concatenated into one row); a "
                                   f"{model['task']} model reads one example per row: leave packing off")


def lora_export_merges(recipe: Section) -> Found:
    export, train = recipe.section("export", m.Export), recipe.section("train", None)
    if export.present() and export["format"] == "onnx" and not export["merge_adapter"] and train["method"] != "full":
        yield export.at("merge_adapter"), "ONNX export of a LoRA model needs `merge_adapter: true`"


def export_precision(recipe: Section) -> Found:
    export = recipe.section("export", m.Export)
    if not export.present() or export["format"] != "onnx":
        return
    precision = export["precision"]
    if recipe.section("model", m.Model)["task"] == CLASSIFIER and precision != "fp32":
        yield export.at("precision"), "a classifier is exported in fp32 (`export.precision: fp32`); quantize it afterwards"
    elif precision in ("fp16", "bf16") and export["execution_provider"] != "cuda":
        yield export.at("precision"), (f"`export.precision: {precision}` builds a decoder for the CUDA provider: set "
                                       "`export.execution_provider: cuda`, or use fp32 on cpu")


def quantize_fits_task(recipe: Section) -> Found:
    quantize = recipe.section("quantize", None)
    if not quantize.present():
        return
    method, task = quantize["method"], recipe.section("model", m.Model)["task"]
    if task == CAUSAL_LM and method in ("onnx-dynamic-int8", "onnx-static-int8"):
        yield quantize.at("method"), (f"{method} quantizes activations, which ruins a causal LM (a real 135M model's eval "
                                      "loss went 0.87 -> 1.93 dynamic, 4.19 static): use `method: onnx-weight-only` "
                                      "(int8 or int4 weights, float activations)")
    if task == CLASSIFIER and method == "onnx-weight-only":
        yield quantize.at("method"), ("onnx-weight-only is built by the causal-LM exporter; a classifier takes "
                                      "onnx-dynamic-int8 or onnx-static-int8")



# --- evaluate (its sets, the forgetting budget, which artifacts) --------------------------------------------------------


def eval_set_answers(spec: Section) -> Found:
    if spec.given("prompt_column") != spec.given("answer_column"):
        given, missing = ("prompt_column", "answer_column") if spec.given("prompt_column") else ("answer_column",
                                                                                              "prompt_column")
        yield spec.at(given), f"`{given}` needs `{missing}` (greedy answers are scored against reference answers)"


def eval_sets_fit_task(recipe: Section) -> Found:
    classify = recipe.section("model", m.Model)["task"] == CLASSIFIER
    for spec in recipe.section("evaluate", m.Evaluate).items("sets", m.EvalSet):
        try:
            if classify:
                for name in ("prompt_column", "answer_column"):
                    if spec.given(name):
                        yield spec.at(name), f"`{name}` applies to causal-lm recipes (a classifier is scored by labels)"
                if spec.present() and "label_column" in spec.value and spec.value["label_column"] is None:  # null
                    why = "for the linear probe" if spec["role"] == "general" else "to score its answers"
                    yield spec.at("label_column"), f"a classifier's eval set needs `label_column` {why}"
        except Skip:
            continue


def eval_set_names(evaluate: Section) -> Found:
    seen = {"test"} if evaluate["test_split"] else set()
    for spec in evaluate.items("sets", m.EvalSet):
        try:
            name = spec["name"]
        except Skip:
            continue
        if name in seen:
            what = "the test split's name (test_split: true)" if name == "test" else "taken by another set"
            yield spec.at("name"), f"set name {name!r} is {what}; give each set a name of its own"
        seen.add(name)


def eval_forgetting(evaluate: Section) -> Found:
    if evaluate["max_forgetting"] is None:
        return
    roles = []
    for spec in evaluate.items("sets", m.EvalSet):
        try:
            roles.append(spec["role"])
        except Skip:
            return
    if "general" not in roles:
        yield evaluate.at("max_forgetting"), ("`max_forgetting` needs at least one set with `role: general` (the text "
                                              "the base model knew, scored on the base and the tuned model)")
    missing = [kind for kind in ("base", "train") if kind not in evaluate["artifacts"]]
    if missing:
        yield evaluate.at("artifacts"), (f"`max_forgetting` compares the base with the trained model: "
                                         f"`artifacts` must include {' and '.join(missing)}")


def eval_artifacts_exist(recipe: Section) -> Found:
    """A written `artifacts` list must name steps the recipe has; the default (all four) scores those that exist."""
    evaluate = recipe.section("evaluate", m.Evaluate)
    if not evaluate.given("artifacts"):
        return
    for kind in ("export", "quantize"):
        if kind in evaluate["artifacts"] and not recipe.section(kind, None).present():
            yield evaluate.at("artifacts"), f"`artifacts` names {kind}, but the recipe has no `{kind}` section"


def eval_lm_eval_task(recipe: Section) -> Found:
    evaluate = recipe.section("evaluate", m.Evaluate)
    if evaluate.given("lm_eval") and recipe.section("model", m.Model)["task"] != CAUSAL_LM:
        yield evaluate.at("lm_eval"), "`lm_eval` runs lm-evaluation-harness tasks on a causal-lm model"


# --- preference objectives (train.objective, train.preference, train.grpo) -----------------------------------------------

# the columns each objective reads (after data.columns renames); grpo also reads its rewards' columns
OBJECTIVE_COLUMNS = {"dpo": ("prompt", "chosen", "rejected"), "orpo": ("prompt", "chosen", "rejected"),
                     "simpo": ("prompt", "chosen", "rejected"), "kto": ("prompt", "completion", "label"),
                     "grpo": ("prompt",)}


def train_objective(train: Section) -> Found:
    objective = train["objective"]
    if train.given("preference") and objective not in o.PREFERENCE_OBJECTIVES:
        yield train.at("preference"), (f"`preference` sets dpo/orpo/kto/simpo; `objective: {objective}` does not read "
                                       "it: remove it or change the objective")
    if train.given("grpo") and objective != "grpo":
        yield train.at("grpo"), f"`grpo` sets `objective: grpo`; this recipe's objective is {objective}"
    if objective == "grpo" and not train.given("grpo"):
        yield train.at("objective"), "`objective: grpo` needs a `grpo` block with at least one reward"
    if objective == "sft":
        return
    if train.given("distributed"):
        yield train.at("distributed"), (f"`objective: {objective}` runs in one process here; torchrun/FSDP launching of "
                                        "TRL's trainers is not supported yet: remove `distributed`")
    if train.given("l2sp"):
        yield train.at("l2sp"), f"`l2sp` is an sft regularizer; `objective: {objective}` is anchored by its reference"
    if objective == "grpo" and train.given("grpo"):
        generations = train.section("grpo", o.Grpo)["num_generations"]
        if train["batch_size"] % generations:
            yield train.at("batch_size"), (f"GRPO's completions per step (`batch_size` {train['batch_size']}) must be a "
                                           f"multiple of `grpo.num_generations` ({generations})")


def grpo_reward(reward: Section) -> Found:
    kinds = [name for name in ("name", "function") if reward.given(name)]
    if len(kinds) != 1:
        yield reward.loc, "a reward has exactly one of `name` (built in) or `function` (`module:function`)"
        return
    name = reward["name"]
    needs = {"exact_match": "column", "numeric_match": "column", "regex": "pattern", "length_penalty": "max_chars"}
    if name in needs and not reward.given(needs[name]):
        yield reward.at("name"), f"the `{name}` reward needs `{needs[name]}`"
    for option in ("column", "pattern", "max_chars"):
        if reward.given(option) and needs.get(name) != option:
            yield reward.at(option), f"`{option}` does not apply to this reward"


def grpo_code(grpo: Section) -> Found:
    if grpo["allow_code"]:
        return
    for reward in grpo.items("rewards", o.Reward):
        if reward.given("function"):
            yield reward.at("function"), ("a `function` reward runs Python code named by the recipe: set "
                                          "`grpo.allow_code: true` if you trust it (a recipe is data unless it says so)")


def objective_data(recipe: Section) -> Found:
    """Preference rows are read by their columns: the sft-only ways of building text do not apply."""
    objective = _train(recipe)["objective"]
    if objective == "sft":
        return
    if recipe.section("model", m.Model)["task"] != CAUSAL_LM:
        yield _train(recipe).at("objective"), f"`objective: {objective}` tunes a causal-lm model"
    data = recipe.section("data", m.Data)
    for name in ("template", "response_template", "messages_column"):
        if data.given(name):
            yield data.at(name), (f"`objective: {objective}` reads the columns {', '.join(OBJECTIVE_COLUMNS[objective])} "
                                  f"(text, or messages rendered with the chat template), not `{name}`")
    for name in ("mask_prompt", "packing"):
        if data[name]:
            yield data.at(name), f"`{name}` is for sft; `objective: {objective}` learns only the completion already"


def objective_inline_rows(recipe: Section) -> Found:
    """Inline rows of a preference recipe: the columns it reads are there, and chosen differs from rejected."""
    train = _train(recipe)
    objective = train["objective"]
    if objective == "sft":
        return
    data = recipe.section("data", m.Data)
    renames = data["columns"]
    limit = train.section("preference", o.Preference)["max_identical_share"] if train.given("preference") else 0.01
    for source in _sources(recipe):
        rows = source["rows"]
        if not isinstance(rows, dict):
            continue
        named = {renames.get(name, name): values for name, values in rows.items()}
        missing = [c for c in OBJECTIVE_COLUMNS[objective] if c not in named]
        if missing:
            yield source.at("rows"), (f"`objective: {objective}` reads the column(s) {', '.join(missing)}, which these "
                                      f"rows lack (they have {', '.join(named) or 'none'}); rename with data.columns")
        elif "chosen" in named:
            same = sum(a == b for a, b in zip(named["chosen"], named["rejected"], strict=False))
            if same and same / max(len(named["chosen"]), 1) > limit:
                column = next(name for name in rows if renames.get(name, name) == "chosen")
                yield source.at("rows", column), (
                    f"{same} of {len(named['chosen'])} rows have chosen equal to rejected (they teach nothing); more "
                    f"than preference.max_identical_share ({limit}): fix the pairs")


Rule = Callable[[Section], Found]
TRAIN_CLASSES: dict[Any, type[BaseModel]] = {"full": m.FullTrain, "lora": m.LoraTrain, "qlora": m.QloraTrain}


def _train(root: Section) -> Section:
    value = root.value.get("train") if root.present() else None
    method = value.get("method") if isinstance(value, dict) else None
    return root.section("train", TRAIN_CLASSES.get(method, m.TrainCommon) if isinstance(method, str) else m.TrainCommon)


def _sources(root: Section) -> list[Section]:
    data = root.section("data", m.Data)
    listed = data.items("sources", None) + ([data.section("source", None)] if data.given("source") else [])
    return [source for source in listed if source.given("rows")]


def _lora(root: Section) -> list[Section]:
    train = _train(root)
    return [train.section("lora", m.Lora)] if train.given("lora") else []


# Each group of rules with the sections it reads (found lazily: finding one may Skip without stopping the others).
SCOPES: list[tuple[list[Rule], Callable[[Section], list[Section]]]] = [
    ([onnx_quantize_needs_export, serve_needs_onnx, probes_fit_task, causal_lm_template, packing_causal_lm, lora_export_merges,
      export_precision, quantize_fits_task, chat_recipe, chat_template_use, objective_data, objective_inline_rows],
     lambda root: [root]),
    ([model_source], lambda root: [root.section("model", m.Model)]),
    ([init_heads], lambda root: [root.section("model", m.Model).section("init", m.ModelInit)]),
    ([data_sources, data_prompt_mask, data_response_template, data_messages], lambda root: [root.section("data", m.Data)]),
    ([inline_columns], _sources),
    ([train_eval_steps, train_min_batch, train_l2sp, train_objective], lambda root: [_train(root)]),
    ([grpo_code], lambda root: [_train(root).section("grpo", o.Grpo)]),
    ([grpo_reward], lambda root: _train(root).section("grpo", o.Grpo).items("rewards", o.Reward)),
    ([lora_targets], _lora),
    ([probe_kind], lambda root: root.section("serve", m.Serve).items("probes", m.Probe)),
    ([eval_sets_fit_task, eval_artifacts_exist, eval_lm_eval_task], lambda root: [root]),
    ([eval_set_names, eval_forgetting], lambda root: [root.section("evaluate", m.Evaluate)]),
    ([eval_set_answers], lambda root: root.section("evaluate", m.Evaluate).items("sets", m.EvalSet)),
]


def check(document: dict[str, Any], bad: Iterable[Loc] = ()) -> list[tuple[Loc, str]]:
    """Every cross-field problem of `document`; `bad` are the locations of its field errors (rules needing them skip)."""
    found: list[tuple[Loc, str]] = []
    root = Section(document, (), None, set(bad))  # rules read sections (each with its model), never a top-level field
    for rules, sections in SCOPES:
        try:
            targets = sections(root)
        except Skip:  # the section has an error of its own
            continue
        for section in targets:
            if not section.present():
                continue
            for rule in rules:
                try:
                    for problem in rule(section):  # one at a time: a Skip keeps what the rule found before it
                        found.append(problem)
                except Skip:
                    pass
    return found
