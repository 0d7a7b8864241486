"""Checks that need the model's config but no model: run by `recipe validate` (and so before any step), from local
files only, so a recipe that cannot work fails in a second instead of after the data or train step.

Where the config comes from, without importing transformers:
- `model.init`: the architecture the init builds;
- `model.path`: the folder's config.json;
- `model.hub`: the Hugging Face cache's snapshot for the pinned revision, else the copy bundled in runner/model_configs/.
  A hub model found in neither gets a warning, not an error (offline, the check is made again when the run starts).

- `model.package`: the config.json of the folder inside the installed package (runner.recipe.packages);
- `model.gguf_file`: the GGUF file's header (runner.recipe.gguf_header), which the model step converts later;
- `model.recipe`: none here; the loader loads the referenced recipe, which runs these checks on its own model.

Checks: a local model folder (path or package) exists and holds weights the recipe may load (safetensors, or pickles with
`allow_pickle`); every local data file is a file whose columns (CSV/TSV header, JSON-lines keys, parquet schema) include
the ones the recipe reads (data_columns.py); the architecture fits the task (a causal-lm recipe needs a decoder), and a
causal-LM ONNX export names an architecture that onnxruntime-genai's model builder supports, with attention heads its
decoder can run. And every hub
revision is a commit sha (`pin_revisions`: a branch or tag name is resolved from the HF cache's refs/, else refused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner import genai, hub
from runner.chat import load_chat_template
from runner.names import CAUSAL_LM, CLASSIFIER
from runner.recipe import data_columns, eval_checks, gguf_header
from runner.recipe.document import Recipe
from runner.recipe.packages import PackageMissing, install_name, split, weight_files
from runner.recipe.sections import HubSource, model_location

INIT_ARCHITECTURES = {
    ("llama", CAUSAL_LM): "LlamaForCausalLM",
    ("llama", CLASSIFIER): "LlamaForSequenceClassification",
    ("distilbert", CLASSIFIER): "DistilBertForSequenceClassification",
    ("distilbert", CAUSAL_LM): "DistilBertForMaskedLM",  # no causal head exists: the task check below says so
}
# Heads that generate text left to right; anything else (a bare encoder, a masked LM) cannot be a causal-lm recipe.
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


@dataclass
class Findings:
    errors: list[tuple[tuple[str | int, ...], str]] = field(default_factory=list)  # (field location, message)
    warnings: list[str] = field(default_factory=list)


def model_config(recipe: Recipe, fetch: bool = False) -> tuple[dict[str, Any] | None, str]:
    """The model's config.json as a dict (None when no local copy exists), and where it came from."""
    model = recipe.model
    if model.init is not None:
        architecture = INIT_ARCHITECTURES[(model.init.architecture, model.task)]
        return {"architectures": [architecture], "model_type": model.init.architecture}, "model.init"
    if model.gguf_file is not None:  # no config.json until the model step converts it: the GGUF header has the facts
        path = Path(model_location(model) or "") / model.gguf_file
        try:
            return gguf_header.config(path), str(path)
        except gguf_header.GGUFError:
            return None, str(path)
    if model.path is not None or model.package is not None:
        path = Path(model_location(model) or "") / "config.json"
        return (json.loads(path.read_text()), str(path)) if path.is_file() else (None, str(path))
    assert model.hub is not None
    return hub.hub_config(model.hub, model.revision, fetch)


def check(recipe: Recipe, fetch: bool = False) -> Findings:
    """The local checks; with `fetch`, a hub model's config.json missing locally is downloaded first (recipe run)."""
    found = Findings()
    if recipe.data is not None:
        found.errors += data_columns.check(recipe)
    found.errors += eval_checks.check(recipe)  # the evaluate section's files and the lm-eval package
    if recipe.model is None:  # the model section has errors of its own (the loader reports them)
        return found
    if recipe.data is not None:
        pin_revisions(recipe, found)
    if recipe.model.recipe is not None:  # the referenced recipe's model was checked when the loader loaded it
        return found
    source_field = ("model", next(name for name in ("hub", "path", "package", "init") if getattr(recipe.model, name) is not None))
    folder_problem, readable = model_folder(recipe)
    if folder_problem:
        found.errors.append((source_field, folder_problem))
        if not readable:  # no folder, so no config.json to check either
            return found
    chat_template_present(recipe, found)
    config, source = model_config(recipe, fetch)
    if config is None:
        if recipe.model.path is not None or recipe.model.package is not None:
            found.errors.append((source_field, f"the model folder has no config.json ({source})"))
        else:
            found.warnings.append(f"cannot check the model's architecture offline: {source}; "
                                  + ("the train step will load it" if fetch else "it is checked again when the run starts"))
        return found
    architecture = (config.get("architectures") or [None])[0]
    if recipe.model.task == CAUSAL_LM and not str(architecture or "").endswith(CAUSAL_SUFFIXES):
        found.errors.append((("model", "task"), f"task causal-lm needs a model with a causal language-model head, but "
                             f"{source} says {architecture or config.get('model_type')} (an encoder or masked LM); "
                             "use task: sequence-classification or a decoder model"))
    export = recipe.export
    if recipe.model.task == CAUSAL_LM and export is not None and export.format == "onnx":
        problem = genai.unsupported_architecture(architecture) or genai.unsupported_shape(config)
        if problem:
            found.errors.append((("export", "format"), f"{problem} (from {source}); use `format: safetensors` to "
                                 "export the merged model instead"))
    return found


def chat_template_present(recipe: Recipe, found: Findings) -> None:
    """A `messages_column` recipe without `data.chat_template` renders with the tokenizer's own template: one must be in
    the model folder (chat_template.jinja or tokenizer_config.json), else the data step would stop on it. A hub model
    not in the HF cache is checked by the data step. (`model.init` recipes need the field: rules.chat_recipe.)"""
    model, data = recipe.model, recipe.data
    if data is None or data.messages_column is None or data.chat_template is not None or model.init is not None:
        return
    if model.hub is not None:
        config = hub.hub_cache_config(model.hub, model.revision)
        folder = config.parent if config is not None else None
    else:
        folder = Path(model_location(model) or "")
    if folder is not None and folder.is_dir() and (folder / "tokenizer_config.json").is_file() \
            and load_chat_template(folder) is None:
        found.errors.append((("data", "messages_column"), f"the model's tokenizer ({folder}) has no chat template: "
                             "set `data.chat_template` (a Jinja template, e.g. ChatML as in recipes/tiny_chat_lora.yaml)"))


def model_folder(recipe: Recipe) -> tuple[str | None, bool]:
    """What is wrong with a local model folder (`path`, or inside an installed `package`), or None; and whether there
    is a folder to read config.json from."""
    model = recipe.model
    if model.path is None and model.package is None:
        return None, True
    try:
        folder = Path(model_location(model) or "")
    except PackageMissing as exc:
        return str(exc), False
    if not folder.is_dir():
        return f"{folder} is a file; give the folder that save_pretrained wrote", False
    if model.gguf_file is not None:
        gguf = folder / model.gguf_file
        if not gguf.is_file():
            return f"model.gguf_file: no file {model.gguf_file} in {folder}", False
        try:
            gguf_header.config(gguf)
        except gguf_header.GGUFError as exc:
            return f"model.gguf_file: {exc}", False
        return None, True
    safetensors, pickles = weight_files(folder)
    if safetensors or (pickles and model.allow_pickle):
        return None, True
    what = f"the model folder {folder}"
    if model.package is not None:
        what += f" (package {install_name(split(model.package)[0])})"
    if pickles:
        names = ", ".join(p.name for p in pickles)
        return (f"{what} has only pickle weights ({names}), and a pickle can run code when it is loaded: convert it to "
                "safetensors (e.g. `AutoModel.from_pretrained(folder).save_pretrained(folder)`, which writes "
                "model.safetensors), or set `model.allow_pickle: true` if you trust its authors"), True
    return f"{what} has no weights (model.safetensors, or pytorch_model.bin with `allow_pickle: true`)", True


# --- revisions as commits -------------------------------------------------------------------------------------------



def pin_revisions(recipe: Recipe, found: Findings) -> None:
    """Every hub revision becomes a full commit sha, because the cache keys hold the revision as written: a branch or tag
    name ("main", "v1.0") would keep its key after the branch moved. A name is resolved from the local HF cache's
    refs/NAME (what a download of that name recorded; no network), with a warning that names the commit; else refused."""
    wanted: list[tuple[tuple[str | int, ...], Any, str]] = []
    if recipe.model.hub is not None:
        wanted.append((("model", "revision"), recipe.model, "model"))
    data = recipe.data
    sources: list[tuple[tuple[str | int, ...], Any]] = (
        [(("data", "source"), data.source)] if data.sources is None
        else [(("data", "sources", i), s) for i, s in enumerate(data.sources)]
    )
    if recipe.evaluate is not None:  # eval sets read hub datasets the same way
        sources += [(("evaluate", "sets", i, "source"), spec.source) for i, spec in enumerate(recipe.evaluate.sets)]
    for at, source in sources:
        if isinstance(source, HubSource):
            wanted.append(((*at, "revision"), source, "dataset"))
    for loc, holder, kind in wanted:
        name, repo = holder.revision, holder.hub
        if hub.COMMIT_SHA.match(name or ""):
            continue
        commit = hub.cached_ref(kind, repo, name)
        where = ".".join(str(part) for part in loc)
        if commit is not None:
            holder.revision = commit  # the key, the lock and the stages all see the commit from here on
            found.warnings.append(f"{where}: '{name}' -> {commit} (the local HF cache's refs/{name}); pin that commit "
                                  "in the recipe so another machine gets the same files")
            continue
        page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo}/commits/{name}"
        fetch = (f"hf download {repo} config.json --revision {name}" if kind == "model"
                 else f"hf download {repo} --repo-type dataset --revision {name}")
        found.errors.append((loc, f"revision '{name}' is not a full 40-character commit sha: a branch or tag moves while "
                             f"the step's cache key would not; pin the commit: e.g. the sha shown on the hub's commit page "
                             f"({page}), or run `{fetch}` once, which records the commit in the local HF cache where "
                             "planning reads it"))
