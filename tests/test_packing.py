"""data.packing: a packed batch must train exactly what the same examples train alone or padded.

The check that matters is cross-contamination: in one packed row, an example's tokens must not attend to the examples
before it. The runner relies on transformers turning position ids that restart at 0 into a block-diagonal causal mask
(masking_utils.find_packed_sequence_indices), which it does only when no attention_mask is passed and there is no KV
cache. So each example's loss inside the packed row is compared with its loss run alone, and the same comparison is shown
to fail when attention does cross (position ids not restarted, an all-ones attention_mask, a KV cache).

Tolerance: 1e-5 relative. The packed and the lone forward compute the same sums in fp32 with other matrix shapes, so
they differ by accumulation order only: measured 3e-7 (tiny model) and 2e-7 (SmolLM2-135M, 30 layers), a few times
fp32's epsilon of 1.2e-7. A leak moves the losses by 1.7e-2 to 6.6e-2 (tiny model, initialized with std 0.2 so that its
attention is not uniform) and 3.9e-2 (SmolLM2) relative: over 1000x the tolerance.

Both layouts of runner/stages/train/packing.py are checked: rows as wide as the longest example (sdpa, eager) and one row
(flash_attention_2's layout, whose mask transformers builds from the same position ids).

Also here: the rule that packing is causal-LM only, the doctor's packed memory estimate (checked against what autograd
saves), and the hardware refusals of train.liger and flash_attention_2 on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner.recipe.document import Recipe
from runner.recipe.sections import Lora, LoraTrain, Model
from runner.stages import StageError
from tests.conftest import REPO, autograd_saved_bytes, sentiment_rows

TOLERANCE = 1e-5  # relative; see the module docstring
LEAK = 1e-3  # a difference this large means attention crossed an example boundary (measured leaks: 7e-3 and more)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models (tests/conftest.py)


def tiny_llama(attn: str):  # noqa: ANN201 - a LlamaForCausalLM with random weights, in eval mode
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation=attn, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


# Rows of width 12 (the longest): [12], [9 + filling], [7, 5], [4 + filling]: examples share a row, rows get filled.
LENGTHS = (7, 12, 5, 4, 9)
FIRST_IN_ROW = (0, 1, 3, 4)  # nothing before them in their row


def examples(vocab: int, lengths: tuple[int, ...] = LENGTHS) -> list[dict[str, list[int]]]:
    """Token rows of different lengths; the first two labels are masked, as a prompt would be."""
    import torch

    generator = torch.Generator().manual_seed(1)
    rows = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100, -100, *ids[2:]]})
    return rows


def _mean_loss(logits, labels):  # noqa: ANN001, ANN202 - the causal-LM loss: position i predicts label i+1
    import torch

    return torch.nn.functional.cross_entropy(logits[:-1].double(), labels[1:], ignore_index=-100, reduction="none")


def alone(model, rows: list[dict[str, list[int]]]) -> list[float]:  # noqa: ANN001
    import torch

    losses = []
    for row in rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0]
        token = _mean_loss(logits, torch.tensor(row["labels"]))
        losses.append(float(token[torch.tensor(row["labels"][1:]) != -100].mean()))
    return losses


def packed(model, examples: list[dict[str, list[int]]], leak: str | None = None, one_row: bool = False,  # noqa: ANN001
           ) -> list[float]:
    """Each example's loss inside the rows the train stage's collator builds; `leak` breaks the isolation on purpose."""
    import torch

    from runner.stages.train.packing import PackingCollator, rows_of

    batch = PackingCollator(pad_token_id=0, one_row=one_row)(examples)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: it would switch packing off
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if leak == "positions not restarted":
        inputs["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    elif leak == "attention_mask passed":
        inputs["attention_mask"] = torch.ones_like(batch["input_ids"])
    elif leak == "kv cache on":
        inputs["use_cache"] = True
    with torch.no_grad():
        logits = model(**inputs).logits
    layout = [list(range(len(examples)))] if one_row else rows_of([len(e["input_ids"]) for e in examples])
    losses: dict[int, float] = {}
    for r, row in enumerate(layout):
        token = _mean_loss(logits[r], batch["labels"][r])
        start = 0
        for index in row:  # the examples in the row's order, then (maybe) the filling segment
            n = len(examples[index]["input_ids"])
            # logits at start..start+n-2 predict this example's labels 1..n-1; its first label is the -100 boundary
            own = token[start:start + n - 1]
            losses[index] = float(own[torch.tensor(examples[index]["labels"][1:]) != -100].mean())
            start += n
    return [losses[i] for i in range(len(examples))]


def relative_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


# --- cross-contamination -------------------------------------------------------------------------------------------------


def test_rows_are_as_wide_as_the_longest_example() -> None:
    from runner.stages.train.packing import PackingCollator, rows_of

    assert rows_of(list(LENGTHS)) == [[1], [4], [0, 2], [3]]
    batch = PackingCollator(pad_token_id=0)(examples(100))
    assert batch["input_ids"].shape == (4, 12)
    assert batch["position_ids"][2].tolist() == [*range(7), *range(5)]
    assert batch["position_ids"][1].tolist() == [*range(9), *range(3)]  # the filling numbers itself from 0
    assert batch["labels"][1, 9:].tolist() == [-100] * 3 and batch["labels"][:, 0].tolist() == [-100] * 4
    assert batch["labels"][2, 7] == -100  # the second example's first token is not predicted from the first
    one = PackingCollator(pad_token_id=0, one_row=True)(examples(100))
    assert one["input_ids"].shape == (1, sum(LENGTHS))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("one_row", [False, True], ids=["rows", "one row"])
def test_packed_examples_get_the_loss_they_get_alone(attn: str, one_row: bool) -> None:
    model = tiny_llama(attn)
    rows = examples(100)
    assert relative_gap(packed(model, rows, one_row=one_row), alone(model, rows)) < TOLERANCE


@pytest.mark.parametrize("leak", ["positions not restarted", "attention_mask passed", "kv cache on"])
def test_the_check_fails_when_attention_crosses_examples(leak: str) -> None:
    """The comparison above can fail: each of these lets later examples attend to earlier ones."""
    model = tiny_llama("sdpa")
    rows = examples(100)
    reference = alone(model, rows)
    leaked = packed(model, rows, leak)
    assert relative_gap(leaked, reference) > LEAK
    # Examples with nothing before them in their row do not change: the gap is attention across examples, not noise.
    assert relative_gap([leaked[i] for i in FIRST_IN_ROW], [reference[i] for i in FIRST_IN_ROW]) < TOLERANCE


def test_packing_on_real_smollm2_weights(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    rows = examples(model.config.vocab_size, (9, 20, 6, 11))
    reference = alone(model, rows)
    assert relative_gap(packed(model, rows), reference) < TOLERANCE
    assert relative_gap(packed(model, rows, one_row=True), reference) < TOLERANCE
    assert relative_gap(packed(model, rows, "positions not restarted"), reference) > LEAK


# --- the train stage -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def causal_data(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prompt-masked rows of uneven length, in the data step's layout."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    texts, names = sentiment_rows(64)
    texts = [f"### Instruction:\n{' '.join([t] * (6 if i % 3 == 2 else 1))}\n### Response:\n{n}{tokenizer.eos_token}"
             for i, (t, n) in enumerate(zip(texts, names, strict=True))]  # 28 or 73 tokens: two short ones share a row
    encoded = tokenizer(texts, truncation=True, max_length=96, return_token_type_ids=False)
    labels = [[-100] * 4 + list(ids[4:]) for ids in encoded["input_ids"]]
    folder = tmp_path_factory.mktemp("packing-data")
    Dataset.from_dict({**encoded, "labels": labels}).train_test_split(test_size=0.25, seed=0).save_to_disk(
        str(folder / "dataset"))
    return folder


def _config(model_dir: Path, packing: bool, **train: Any) -> dict[str, Any]:
    settings = {"method": "lora", "lora": Lora(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), "max_steps": 3,
                "batch_size": 8, "learning_rate": 1e-2, "eval_strategy": "no", "logging_steps": 1, "save_steps": 1000}
    return {"model": Model(path=str(model_dir), task="causal-lm").model_dump(mode="json"),
            "train": LoraTrain(**{**settings, **train}).model_dump(mode="json"), "seed": 42,
            **({"packing": True} if packing else {})}


def test_train_stage_packs_train_batches_and_pads_eval_batches(tiny_llama_dir: Path, causal_data: Path,
                                                              tmp_path: Path) -> None:
    """Through the stage's own model and Trainer (a peft-wrapped model): the packed batch's loss is the padded batch's."""
    import torch

    from runner.stages import pretrained, train
    from runner.stages.train import build as train_model
    from runner.stages.train import trainer as train_trainer
    from runner.stages.train.job import Job

    job = Job.parse(_config(tiny_llama_dir, True), {"data": causal_data}, tmp_path)
    tokenizer = pretrained.load_tokenizer(job.model_json, job.inputs)
    model = train_model.build_model(job, None, tokenizer)
    trainer = train_trainer.make_trainer(job, model, tokenizer, train.read_splits(causal_data))
    assert model.config.use_cache is False  # a KV cache would switch the block-diagonal mask off (see above)

    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape[0] < 8  # the 8 examples share rows
    rows = []
    for ids, labels, positions in zip(batch["input_ids"], batch["labels"], batch["position_ids"], strict=True):
        starts = (positions == 0).nonzero().flatten().tolist()
        assert (labels[starts] == -100).all()  # nothing is predicted across a boundary
        for a, b in zip(starts, [*starts[1:], len(ids)], strict=True):
            if (labels[a:b] != -100).any():  # an example (the filling has no labels)
                rows.append({"input_ids": ids[a:b].tolist(), "attention_mask": [1] * (b - a),
                             "labels": labels[a:b].tolist()})
    assert len(rows) == 8
    padded = train_trainer.padded_collator(tokenizer, classifier=False)(rows)
    model.eval()
    with torch.no_grad():
        packed_loss = trainer.compute_loss(model, {k: v.to(trainer.args.device) for k, v in batch.items()})
        padded_loss = trainer.compute_loss(model, padded)
    assert float(packed_loss) == pytest.approx(float(padded_loss), rel=TOLERANCE)

    evaluation = next(iter(trainer.get_eval_dataloader()))
    assert "attention_mask" in evaluation and evaluation["input_ids"].shape[0] == 8  # padded rows, one per example


def test_packed_training_learns_what_padded_training_learns(tiny_llama_dir: Path, causal_data: Path,
                                                            tmp_path: Path) -> None:
    """Same examples per step, same token-mean loss: the two runs take the same steps, up to fp32 rounding."""
    from runner.stages import train

    results = {}
    for packing in (False, True):
        out = tmp_path / f"packing-{packing}"
        out.mkdir()
        results[packing] = train.run(_config(tiny_llama_dir, packing), {"data": causal_data}, out)
    assert results[True]["eval_loss_before"] == results[False]["eval_loss_before"]  # eval is padded in both
    assert results[True]["eval_loss"] < results[True]["eval_loss_before"]
    # three Adam steps amplify rounding a little: 1e-4 is still far below what one step changes (~1e-1 here)
    assert results[True]["eval_loss"] == pytest.approx(results[False]["eval_loss"], rel=1e-4)
    history = json.loads((tmp_path / "packing-True" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]


# --- recipe rule, doctor, hardware ------------------------------------------------------------------------------------------


def _recipe(task: str = "causal-lm", **data: Any) -> dict[str, Any]:
    init = {"architecture": "llama", "hidden_size": 96, "num_layers": 2, "num_heads": 4, "intermediate_size": 256,
            "vocab_size": 500}
    return {"name": "tiny", "model": {"task": task, "init": init},
            "data": {"source": {"rows": {"text": ["x"], "label": ["a"]}}, "max_length": 48, **data},
            "train": {"method": "full", "batch_size": 4}}


def test_packing_is_refused_for_classifiers() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="data.packing` is for causal-lm"):
        Recipe.model_validate(_recipe("sequence-classification", packing=True))
    Recipe.model_validate(_recipe(template="{text}", packing=True))



def test_doctor_estimates_packing_at_its_worst_case_and_per_token_as_autograd_saves() -> None:
    """Packed rows are no wider than the longest example, so at worst (every example max_length long) they hold as many
    tokens as padding and the estimate is the padded one. Per token it matches what autograd saves for a real packed
    batch (rows sharing examples, a filling segment, the block-diagonal mask), as test_doctor checks padded batches."""
    import torch
    from transformers import AutoModelForCausalLM

    from runner.hardware.estimate import estimate
    from runner.stages.shared import init_config
    from runner.stages.train.packing import PackingCollator

    recipe = Recipe.model_validate(_recipe(template="{text}", packing=True))
    estimated = estimate(recipe, "cpu")
    padded = estimate(Recipe.model_validate(_recipe(template="{text}")), "cpu")
    assert estimated.parts == padded.parts and estimated.packed_row_len == 48
    flash = recipe.model_copy(update={"model": recipe.model.model_copy(update={"attn_implementation": "flash_attention_2"})})
    assert estimate(flash, "cuda").packed_row_len == 4 * 48  # one row

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(init_config(recipe.model.init, recipe.model.init.vocab_size)).train()
    rows = [{"input_ids": torch.randint(1, 500, (n,)).tolist()} for n in (48, 30, 18, 40)]
    batch = PackingCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (3, 48)  # 48 | 40 + filling | 30 + 18
    measured = autograd_saved_bytes(model, {**batch, "use_cache": False})
    share = batch["input_ids"].numel() / (4 * 48)  # of the worst case's tokens
    saved_loss = 4 * 4 * 48 * 500  # the fp32 log_softmax is the saved part of "loss"
    assert measured == pytest.approx(share * (estimated.parts["activations"] + saved_loss), rel=0.03)


def test_doctor_checks_attention_and_liger_against_the_machine() -> None:
    from runner.hardware.probe import load_profile
    from runner.hardware.verdict import check

    def finding(name: str, profile: str, **fields: Any) -> Any:
        raw = _recipe(template="{text}")
        raw["model"] |= fields.get("model", {})
        raw["train"] |= fields.get("train", {})
        raw["env"] = fields.get("env", "cpu")
        verdict = check(Recipe.model_validate(raw), load_profile(profile))
        return next(f for f in verdict.findings if f.check == name), verdict.fits

    t4, a100 = "t4-16gb", "a100-40gb"
    flash = {"model": {"attn_implementation": "flash_attention_2"}}
    on_t4, fits = finding("attention", t4, **flash)
    assert on_t4.status == "fail" and "compute capability 8.0+" in on_t4.detail and not fits
    assert on_t4.fix == ["model.attn_implementation=sdpa"]
    assert finding("attention", a100, **flash)[0].status == "warn"  # a profile cannot say whether flash-attn is there
    assert finding("attention", t4, model={"attn_implementation": "eager"})[0].status == "ok"
    assert finding("liger", a100, train={"liger": True}, env="cuda13")[0].status == "ok"
    assert finding("liger", a100, train={"liger": True})[0].status == "warn"  # the cpu env does not install it


def test_liger_and_flash_attention_are_refused_on_cpu_by_doctor_and_train(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from runner.cli import main
    from runner.stages.train import check_hardware

    if torch.cuda.is_available():
        pytest.skip("refused only without CUDA")
    code = main(["doctor", str(REPO / "recipes" / "tiny_llama_lora.yaml"), "train.liger=true",
                 "model.attn_implementation=flash_attention_2"])
    printed = " ".join(capsys.readouterr().out.split())
    assert code == 1
    assert "train.liger needs a CUDA GPU" in printed and "flash_attention_2 needs a CUDA GPU" in printed
    lora = LoraTrain(method="lora", lora=Lora(target_modules="all-linear"), liger=True)
    with pytest.raises(StageError, match="train.liger: true` needs a CUDA GPU"):
        check_hardware(lora)
    with pytest.raises(StageError, match="flash_attention_2` needs a CUDA GPU"):
        check_hardware(lora.model_copy(update={"liger": False}),
                       Model(task="causal-lm", hub="x/y", revision="0" * 40, attn_implementation="flash_attention_2"))
