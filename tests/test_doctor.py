"""The hardware doctor as specifications: verdicts follow from the estimate, remedies end in something that fits,
requirements and methods are checked, bad input is exit code 2. Models are only built on the meta device (no weights),
except the tiny CPU models that pin the activation formula to what autograd really saves."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import yaml

from runner.hardware.doctor import doctor
from runner.hardware.estimate import CPU_BASELINE_BYTES, GLIBC_RETENTION, estimate
from runner.hardware.probe import GIB, Machine, load_profile, probe, profile_names
from runner.hardware.verdict import TIGHT, Finding, Verdict, check
from runner.recipe import find_recipe, load_recipe
from runner.recipe.document import Recipe
from runner.stages.shared import init_config

from .conftest import REPO, autograd_saved_bytes

PROFILES = ["t4-16gb", "a10g-24gb", "rtx3090-24gb", "l4-24gb", "a100-40gb", "a100-80gb", "h100-80gb"]
# What a T4 (compute capability 7.5, no native bf16) runs: fp16 compute, and a recipe that admits 7.5.
FP16 = ["train.precision=fp16", "train.quantization.compute_dtype=float16", "requires.min_compute_capability=\"7.5\""]


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # recipe names resolve under ./recipes


def recipe(name: str, *overrides: str) -> Recipe:
    return load_recipe(find_recipe(name, REPO / "recipes"), list(overrides)).recipe


@pytest.fixture(scope="module")
def full_7b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama2_lora as a full fine-tune. Overrides cannot delete the lora/quantization sections, so write the variant."""
    raw = yaml.safe_load((REPO / "recipes" / "llama2_lora.yaml").read_text())
    raw["train"].pop("lora")
    raw["train"].pop("quantization")
    raw["train"]["method"] = "full"
    raw["name"] = "llama2_full"
    path = tmp_path_factory.mktemp("recipes") / "llama2_full.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def memory(verdict: Verdict) -> Finding:
    return next(f for f in verdict.findings if f.check == "memory")


# --- profiles and the probe ---------------------------------------------------------------------------------------------


def test_every_profile_is_shipped_and_valid() -> None:
    assert set(PROFILES) <= set(profile_names())
    for name in PROFILES:
        machine = load_profile(name)
        assert machine.gpus and machine.trains_on_gpu and machine.ram_gib >= 16
    assert not load_profile("t4-16gb").gpus[0].bf16  # Turing: no native bfloat16
    assert load_profile("a100-40gb").gpus[0].compute_capability == "8.0"


def test_probe_describes_this_machine() -> None:
    facts = probe()
    machine = Machine.model_validate(facts)
    assert machine.cpu_cores and machine.ram_gib > 0 and machine.disk_free_gib is not None
    assert "CPUExecutionProvider" in machine.onnxruntime_providers


# --- verdicts follow from the estimates ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama2_lora", "distilbert_imdb"])
def test_memory_verdict_on_every_profile_follows_from_the_estimate(name: str) -> None:
    for profile in PROFILES:
        machine = load_profile(profile)
        verdict = check(recipe(name), machine)
        capacity = machine.gpus[0].memory_gib * GIB
        expected = "fail" if verdict.estimate.total_bytes > capacity else ("warn" if verdict.estimate.total_bytes >
                                                                           TIGHT * capacity else "ok")
        assert memory(verdict).status == expected, profile
        assert verdict.fits == all(f.status != "fail" for f in verdict.findings)
        assert verdict.device == "cuda"


def test_7b_qlora_4bit_fits_a_16gb_t4() -> None:
    t4 = load_profile("t4-16gb")
    verdict = check(recipe("llama2_lora", *FP16), t4)
    assert memory(verdict).status == "ok" and verdict.fits
    assert 5 * GIB < verdict.estimate.total_bytes < 14 * GIB
    assert doctor(["llama2_lora"], profile="t4-16gb", overrides=FP16) == 0
    assert doctor(["llama2_lora", *FP16], profile="t4-16gb") == 0  # as the CLI passes them: mixed with the names


def test_bf16_recipe_on_a_t4_is_refused_with_the_fp16_fix() -> None:
    verdict = check(recipe("llama2_lora"), load_profile("t4-16gb"))
    precision = next(f for f in verdict.findings if f.check == "precision")
    assert memory(verdict).status == "ok"  # it is the bfloat16, not the memory
    assert precision.status == "fail" and precision.fix == ["train.precision=fp16"]
    assert not verdict.fits
    assert doctor(["llama2_lora"], profile="t4-16gb") == 1


@pytest.mark.parametrize("profile", ["a10g-24gb", "rtx3090-24gb", "l4-24gb", "a100-40gb", "a100-80gb", "h100-80gb"])
def test_both_recipes_fit_ampere_and_newer(profile: str) -> None:
    assert doctor(["llama2_lora", "distilbert_imdb"], profile=profile) == 0


@pytest.mark.parametrize("profile", ["a10g-24gb", "rtx3090-24gb", "l4-24gb"])
def test_7b_full_fine_tune_on_24gb_is_refused_with_remedies_ending_in_a_fit(full_7b: Path, profile: str) -> None:
    machine = load_profile(profile)
    verdict = check(load_recipe(full_7b).recipe, machine)
    capacity = machine.gpus[0].memory_gib
    assert memory(verdict).status == "fail" and verdict.estimate.total_gib > 100  # 16 bytes per parameter alone
    rows = verdict.remedies
    assert [r.title for r in rows][-1].startswith("QLoRA over a 4-bit")
    assert rows[-1].fits_cumulative
    for row in rows:  # every mark follows from the number beside it
        assert row.fits_cumulative == (row.cumulative_gib <= capacity)
        assert row.fits_alone == (row.alone_gib is not None and row.alone_gib <= capacity)
    firsts = [r for r in rows if r.first_fit]
    assert len(firsts) == 1 and firsts[0] is next(r for r in rows if r.fits_cumulative)
    assert [r.cumulative_gib for r in rows] == sorted((r.cumulative_gib for r in rows), reverse=True)


def test_the_first_fit_overrides_really_fit(full_7b: Path) -> None:
    """The remedy note is a command line: applied through the recipe loader, the recipe fits."""
    a10g = load_profile("a10g-24gb")
    note = check(load_recipe(full_7b).recipe, a10g).remedy_note
    assert note.startswith("first fit (cumulative): ")
    overrides = note.split(": ", 1)[1].split()
    fixed = check(load_recipe(full_7b, overrides).recipe, a10g)
    assert fixed.fits and fixed.estimate.method == "qlora"


def test_doctor_exit_code_and_report_for_a_refused_recipe(full_7b: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor([str(full_7b)], profile="rtx3090-24gb") == 1
    report = capsys.readouterr().out
    assert "does not fit" in report and "first that fits" in report and "gradient_accumulation" in report


# --- the estimate -------------------------------------------------------------------------------------------------------


def test_parameters_are_counted_exactly_from_the_config() -> None:
    llama = estimate(recipe("llama2_lora"), "cuda")
    assert llama.config_source.startswith("bundled runner/model_configs/")  # no hub here (HF_HUB_OFFLINE)
    assert llama.params_total == 6_738_415_616  # Llama-2-7B
    assert llama.params_trainable == 32 * 2 * 8 * (4096 + 4096)  # r * (in + out) on q_proj and v_proj, 32 layers
    all_linear = estimate(recipe("llama2_lora", "train.lora.target_modules=all-linear"), "cuda")
    per_layer = 4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096)  # q k v o, gate up, down
    assert all_linear.params_trainable == 32 * 8 * per_layer  # lm_head is not a LoRA target
    bert = estimate(recipe("distilbert_imdb"), "cuda")
    assert bert.params_total == bert.params_trainable == 66_955_010  # distilbert-base + 2-label head


def test_lora_modules_to_save_are_trained_in_full_and_kept_twice() -> None:
    e = estimate(recipe("tiny_llama_lora"), "cpu")  # lora.modules_to_save: [embed_tokens, lm_head]
    h, i, vocab, layers, r = 128, 256, 1000, 2, 16
    adapters = layers * r * (4 * (h + h) + 2 * (h + i) + (i + h))  # every linear of the blocks; lm_head is saved instead
    assert e.params_trainable == adapters + 2 * vocab * h
    assert e.parts["weights"] == 4 * (e.params_total + 2 * vocab * h + adapters)


def test_quantized_weights_are_half_a_byte_plus_block_constants() -> None:
    base = recipe("llama2_lora")
    quantized = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    rest = 6_738_415_616 - quantized  # embeddings, lm_head, norms: fp32 after prepare_model_for_kbit_training
    adapters = 4 * 4_194_304
    double = estimate(base, "cuda").parts["weights"]
    assert double == int(quantized * (0.5 + 1 / 64 + 4 / 16384) + 4 * rest + adapters)
    single = estimate(recipe("llama2_lora", "train.quantization.double_quant=false"), "cuda").parts["weights"]
    assert single == int(quantized * (0.5 + 4 / 64) + 4 * rest + adapters)
    eight = estimate(recipe("llama2_lora", "train.quantization.bits=8"), "cuda").parts["weights"]
    assert single < eight < 4 * 6_738_415_616 / 2


def test_estimate_shrinks_with_checkpointing_smaller_batches_and_4bit() -> None:
    def peak(*overrides: str) -> int:
        return estimate(recipe("llama2_lora", *overrides), "cuda").total_bytes

    with_gc, without_gc = peak(), peak("train.gradient_checkpointing=false")
    assert without_gc > with_gc
    assert estimate(recipe("llama2_lora", "train.gradient_checkpointing=false"), "cuda").parts["activations"] > \
        3 * estimate(recipe("llama2_lora"), "cuda").parts["activations"]
    assert peak("train.batch_size=2", "train.gradient_accumulation=8") < with_gc
    assert peak() < peak("train.quantization.bits=8")


def test_activations_scale_with_batch_and_sequence() -> None:
    small = estimate(recipe("distilbert_imdb"), "cuda").parts["activations"]
    assert estimate(recipe("distilbert_imdb", "train.batch_size=16"), "cuda").parts["activations"] == pytest.approx(
        2 * small, rel=0.01)
    assert estimate(recipe("distilbert_imdb", "data.max_length=512"), "cuda").parts["activations"] > 2 * small


def test_model_init_recipes_are_estimated_from_their_init_fields(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    raw["model"] = {"task": "sequence-classification", "init": {
        "architecture": "distilbert", "hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 256,
        "vocab_size": 4000, "max_position_embeddings": 128}}
    raw["data"]["source"]["path"] = str(REPO / "recipes" / "data" / "reviews.csv")
    for extra in raw.get("evaluate", {}).get("sets", []):  # the copy lives elsewhere: its paths are made absolute
        extra["source"]["path"] = str(REPO / "recipes" / extra["source"]["path"])
    (tmp_path / "init.yaml").write_text(yaml.safe_dump(raw))
    e = estimate(load_recipe(tmp_path / "init.yaml", []).recipe)
    assert e.config_source == "built from model.init" and e.device == "cpu"
    assert 100_000 < e.params_total < 2_000_000
    assert e.peak_bytes == max(e.phases.values()) + CPU_BASELINE_BYTES + e.parts["allocator"]


def test_cpu_estimate_counts_what_glibc_keeps_unless_the_mmap_threshold_is_fixed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    cpu = estimate(recipe("tiny_llama_lora"), "cpu")
    if platform.libc_ver()[0] == "glibc":
        assert cpu.parts["allocator"] == int(GLIBC_RETENTION * (cpu.parts["activations"] + cpu.parts["loss"]))
    assert estimate(recipe("tiny_llama_lora"), "cuda").parts["allocator"] == 0  # torch's caching allocator reuses
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert estimate(recipe("tiny_llama_lora"), "cpu").parts["allocator"] == 0



@pytest.mark.parametrize("architecture,task,lora", [
    ("llama", "causal-lm", None),
    ("distilbert", "sequence-classification", None),
    ("llama", "causal-lm", {"r": 8, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}),
    ("llama", "causal-lm", {"r": 4, "dropout": 0.0, "target_modules": "all-linear",
                            "modules_to_save": ["embed_tokens", "lm_head"]}),
])
def test_activation_formula_matches_what_autograd_saves(architecture: str, task: str, lora: dict | None) -> None:
    """The per-token formula against torch.autograd.graph.saved_tensors_hooks on a tiny fp32 CPU model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    data = {"source": {"rows": {"text": ["x"]}}, "max_length": 48, **({"template": "{text}"} if task == "causal-lm" else {})}
    train = {"method": "lora", "lora": lora} if lora else {"method": "full"}
    r = Recipe.model_validate({"name": "tiny", "model": {"task": task, "init": {
        "architecture": architecture, "hidden_size": 96, "num_layers": 2, "num_heads": 4, "intermediate_size": 256,
        "vocab_size": 500}}, "data": data, "train": {**train, "batch_size": 4}})
    config = init_config(r.model.init, r.model.init.vocab_size)
    config.pad_token_id = 0
    torch.manual_seed(0)
    model = (AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification).from_config(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_dropout=lora["dropout"],
                                                 target_modules=lora["target_modules"],
                                                 modules_to_save=lora.get("modules_to_save")))
    model.train()
    ids = torch.randint(1, 500, (4, 48))
    mask = torch.ones(4, 48, dtype=torch.long)
    mask[2:, -8:] = 0
    labels = ids if task == "causal-lm" else torch.tensor([0, 1, 0, 1])
    measured = autograd_saved_bytes(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    e = estimate(r, "cpu")
    saved_loss = 4 * 4 * 48 * 500 if task == "causal-lm" else 0  # the fp32 log_softmax is the saved part of "loss"
    assert e.parts["activations"] + saved_loss == pytest.approx(measured, rel=0.03)


@pytest.mark.parametrize("lora", [None, {"r": 8, "dropout": 0.1, "target_modules": ["query", "value"]}])
def test_bert_activation_formula_matches_what_autograd_saves(tmp_path: Path, lora: dict | None) -> None:
    """BERT-family encoders (the quickstart's MiniLM): the per-token formula against saved_tensors_hooks on a tiny fp32
    BERT classifier in train mode (dropout 0.1 on attention and hidden states, as BERT configs ship)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=500, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64, pad_token_id=0)
    config.save_pretrained(tmp_path)
    train = {"method": "lora", "lora": lora} if lora else {"method": "full"}
    r = Recipe.model_validate({"name": "tiny-bert", "model": {"task": "sequence-classification", "path": str(tmp_path)},
                               "data": {"source": {"rows": {"text": ["x"]}}, "max_length": 48},
                               "train": {**train, "batch_size": 4}})
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora["r"], lora_dropout=lora["dropout"], task_type="SEQ_CLS",
                                                 target_modules=lora["target_modules"]))
    model.train()
    ids = torch.randint(1, 500, (4, 48))
    mask = torch.ones(4, 48, dtype=torch.long)
    mask[2:, -8:] = 0
    measured = autograd_saved_bytes(model, {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1])})
    e = estimate(r, "cpu")
    assert e.model_type == "bert"
    assert e.parts["activations"] == pytest.approx(measured, rel=0.03)


# --- requirements and methods -------------------------------------------------------------------------------------------


def test_min_compute_capability_is_checked() -> None:
    needs_ampere = recipe("llama2_lora", *FP16, 'requires.min_compute_capability="8.0"')
    on_t4 = check(needs_ampere, load_profile("t4-16gb"))
    finding = next(f for f in on_t4.findings if f.check == "min_compute_capability")
    assert finding.status == "fail" and not on_t4.fits
    assert check(needs_ampere, load_profile("a100-40gb")).fits


def test_min_gpu_memory_allows_for_what_the_card_reports() -> None:
    """A "16 GB" T4 reports 14.75 GiB: it meets 16 but not 24."""
    t4 = load_profile("t4-16gb")
    assert check(recipe("llama2_lora", *FP16), t4).fits
    big = check(recipe("llama2_lora", *FP16, "requires.min_gpu_memory_gb=24"), t4)
    assert next(f for f in big.findings if f.check == "min_gpu_memory_gb").status == "fail"


def test_cuda_recipe_on_a_cpu_only_probe_does_not_fit(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("runner.hardware.probe._probe_cuda", lambda problems: {"gpus": [], "torch_cuda": False,
                                                                               "driver_version": None, "cuda_version": None})
    assert doctor(["llama2_lora"]) == 1
    out = capsys.readouterr().out
    assert "this machine has no CUDA GPU" in out


def test_a_driver_older_than_the_envs_minimum_is_refused_with_both_versions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The probe reads the driver from nvidia-smi (here one answering like a 550 driver); envs/cuda13.in says 580."""
    from .conftest import fake_nvidia_smi

    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'bin', '550.54.15')}:{__import__('os').environ['PATH']}")
    assert doctor(["llama2_lora"]) == 1
    out = capsys.readouterr().out
    assert "driver 550.54.15" in out and "needs NVIDIA driver >= 580" in out and "this machine has 550.54.15" in out
    fine = load_profile("a100-40gb")  # the profiles model machines set up for envs/cuda13: driver 580.65.06
    assert next(f for f in check(recipe("llama2_lora"), fine).findings if f.check == "driver").status == "ok"
    facts = fine.model_dump() | {"driver_version": None}
    unknown = next(f for f in check(recipe("llama2_lora"), facts).findings if f.check == "driver")
    assert unknown.status == "skip" and "580" in unknown.detail


def test_gpu_that_torch_cannot_use_counts_as_no_gpu() -> None:
    facts = load_profile("a100-40gb").model_dump() | {"torch_cuda": False}
    verdict = check(recipe("llama2_lora"), facts)
    assert verdict.device == "cpu" and not verdict.fits
    assert "torch cannot use it" in next(f for f in verdict.findings if f.check == "accelerator").detail


def test_lora_targets_that_match_nothing_fail() -> None:
    verdict = check(recipe("llama2_lora", "train.lora.target_modules=[q_lin]"), load_profile("a100-80gb"))
    finding = memory(verdict)
    assert finding.status == "fail" and "q_proj" in finding.detail  # it lists the model's real linear names


# --- input and output ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["{not json", '{"name": "x"}', '{"name": "x", "ram_gib": 8, "gpus": [{"name": "g"}]}'])
def test_bad_profile_is_exit_2(tmp_path: Path, content: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "profile.json"
    path.write_text(content)
    assert doctor(["distilbert_imdb"], profile=path) == 2
    assert "not a valid hardware profile" in capsys.readouterr().err


def test_unknown_profile_and_unknown_recipe_are_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor(["distilbert_imdb"], profile="v100-32gb") == 2
    assert "t4-16gb" in capsys.readouterr().err  # the known ones are listed
    assert doctor(["no_such_recipe"], profile="t4-16gb") == 2
    assert doctor(["distilbert_imdb"], profile="t4-16gb", overrides=["train.epochs=-1"]) == 2


def test_json_output_parses(capsys: pytest.CaptureFixture[str]) -> None:
    code = doctor(["llama2_lora", "distilbert_imdb"], json_output=True, profile="t4-16gb")
    document = json.loads(capsys.readouterr().out)
    assert document["machine"]["gpus"][0]["name"] == "Tesla T4"
    verdicts = {v["recipe"]: v for v in document["verdicts"]}
    assert set(verdicts) == {"llama2_lora", "distilbert_imdb"}
    assert verdicts["distilbert_imdb"]["fits"] and not verdicts["llama2_lora"]["fits"]
    assert code == 1
    parts = verdicts["llama2_lora"]["estimate"]["parts"]
    assert {"weights", "gradients", "optimizer", "activations", "loss", "runtime"} <= set(parts)


def test_causal_lm_export_and_quantize_ram_are_estimated_and_checked_against_min_ram_gb() -> None:
    """llama2_lora's fp16 CUDA build and int4 rebuild: the phases follow runner/hardware/export_memory.py's model, and a recipe
    declaring less RAM than a phase needs fails that step's check."""
    from runner.hardware.export_memory import GIB as STEP_GIB

    a100 = load_profile("a100-80gb")
    verdict = check(recipe("llama2_lora"), a100)
    steps = {s.step: s for s in verdict.step_memory}
    params = verdict.estimate.params_total
    assert set(steps) == {"export", "quantize"}
    # the runner merges in fp32 (4 bytes a parameter); the builder holds a half-precision checkpoint and its graph
    assert steps["export"].phases["merge (runner)"] > 4 * params
    assert steps["export"].phases["build (child)"] < steps["export"].phases["merge (runner)"]
    assert steps["quantize"].phases["build (child)"] > 4 * params  # fp16 checkpoint + fp16 graph + int4 weights
    findings = {f.check: f for f in verdict.findings}
    assert findings["export_ram"].status == "ok" and "requires.min_ram_gb" in findings["export_ram"].detail
    small = check(recipe("llama2_lora", "requires.min_ram_gb=16"), a100)
    failed = {f.check for f in small.findings if f.status == "fail"}
    assert {"export_ram", "quantize_ram"} <= failed and not small.fits
    assert steps["export"].peak_bytes / STEP_GIB < 40


@pytest.mark.parametrize("model", ["{path: not-here/SmolLM2, task: causal-lm}",
                                   "{package: no_such_model_package_here/model, task: causal-lm}"])
def test_a_recipe_whose_model_is_absent_is_not_checked_and_not_a_failure(
        model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.yaml"
    path.write_text(f"""name: absent
model: {model}
data:
  source: {{rows: {{q: [hi, yo, hey, sup], a: [a, b, c, d]}}}}
  template: "Q: {{q}} A: {{a}}"
train: {{method: lora, epochs: 1, lora: {{r: 4, target_modules: [q_proj, v_proj]}}}}
""")
    assert doctor([str(path)], profile="a100-40gb") == 0
    out = capsys.readouterr().out
    assert "absent: not checked: model not present:" in out
    assert ("no such file or folder" in out) if "path" in model else ("envs/models.txt" in out)
    assert doctor([str(path), "train.epochs=-1"], profile="a100-40gb") == 2  # any other problem is still an error


def test_the_sweep_of_every_recipe_passes_on_a_cpu_machine(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """`recipe doctor` with no names on a machine without a GPU: what it can run is judged, a CUDA recipe is reported
    as not checked here (with the profile command that judges it), and the exit code is 0."""
    monkeypatch.setattr("runner.hardware.probe._probe_cuda", lambda problems: {"gpus": [], "torch_cuda": False,
                                                                               "driver_version": None, "cuda_version": None})
    assert doctor([], json_output=True) == 0
    document = json.loads(capsys.readouterr().out)
    assert {v["recipe"] for v in document["verdicts"]} >= {"quickstart", "tiny_llama_lora", "distilbert_imdb"}
    skipped = {item["recipe"]: item["reason"] for item in document["not_checked"]}
    assert "--profile a100-40gb" in skipped["llama2_lora"] and document["errors"] == []


def test_model_dtype_bfloat16_halves_the_weights_of_a_7b_lora(tmp_path: Path) -> None:
    """LoRA (not QLoRA) on Llama-2-7B: fp32 weights alone are 25 GiB; `model.dtype=bfloat16` halves them (the adapters
    stay fp32, a rounding error here), and `auto` takes the checkpoint's own dtype (float16 in its config)."""
    raw = yaml.safe_load((REPO / "recipes" / "llama2_lora.yaml").read_text())
    raw["train"].pop("quantization")
    raw["train"]["method"] = "lora"
    path = tmp_path / "llama2_plain_lora.yaml"
    path.write_text(yaml.safe_dump(raw))
    weights = {dtype: estimate(load_recipe(path, [f"model.dtype={dtype}"] if dtype else []).recipe, "cuda").parts["weights"]
               for dtype in (None, "float32", "bfloat16", "auto")}
    assert weights[None] == weights["float32"] and 24.5 < weights[None] / GIB < 25.5
    assert weights["bfloat16"] == weights["auto"] and abs(weights["bfloat16"] / weights[None] - 0.5) < 0.001
