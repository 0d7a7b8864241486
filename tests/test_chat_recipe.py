"""recipes/tiny_chat_lora.yaml end to end, offline, through the real `recipe` CLI and every real stage: a tiny Llama
trained on the shipped real conversations with a ChatML template, exported, int8-quantized and served, probed through
/v1/chat/completions; and the served model builds, for a conversation of the test split, exactly the token ids the
data step trained on.

Reduced overrides (64 chats cut at 128 tokens, 40 steps of 8) keep it inside the suite's budget; the full recipe's
figures come from `nox -s recipe -- tiny_chat_lora` and go into the README.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runner import chat
from runner.cli import main
from runner.serving import openai
from runner.serving.artifact import Generator, load_model

REPO = Path(__file__).resolve().parent.parent
QUICK = ["data.select=64", "data.max_length=128", "train.max_steps=40", "train.batch_size=8",
         "serve.latency_requests=10"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chat-e2e")
    shutil.copytree(REPO / "recipes", root / "recipes", ignore=shutil.ignore_patterns("*.lock"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert main(["run", "tiny_chat_lora", *QUICK]) == 0
    run = json.loads((root / "runs" / "tiny_chat_lora" / "latest" / "run.json").read_text())
    return {step["kind"]: Path(step["outputs"]) for step in run["steps"]}


def test_tiny_chat_lora_learns_and_serves_chat_completions(run):
    train = json.loads((run["train"] / "metrics.json").read_text())
    assert train["eval_loss"] < train["eval_loss_before"]
    serve = json.loads((run["serve"] / "serve_report.json").read_text())
    assert serve["passed"] and len(serve["probes"]) == 2
    assert all(probe["passed"] and probe["matches_offline"] and probe["answer"].strip() for probe in serve["probes"])
    # the template travelled with the tokenizer from the data step to the served artifact
    template = (run["data"] / "chat_template.jinja").read_text()
    assert chat.load_chat_template(run["quantize"] / "onnx") == template


def test_the_served_prompt_ids_are_the_trained_ids(run):
    from datasets import load_from_disk

    artifact = run["quantize"] / "onnx"
    model = load_model(artifact)
    assert isinstance(model, Generator)
    template = chat.load_chat_template(artifact)
    assert template is not None
    conversations = [json.loads(line)["messages"] for line in (REPO / "recipes/data/conversations.jsonl").open()]
    by_text = {chat.render(template, c, model.special_tokens): c for c in conversations}
    test = load_from_disk(str(run["data"] / "dataset"))["test"]
    checked = 0
    for text, ids, labels in zip(test["text"], test["input_ids"], test["labels"], strict=True):
        messages = by_text[text]  # the row is this shipped conversation, rendered
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for turn in replies[:2]:  # the served prompt for each of its first replies: the history up to it
            request = openai.ChatRequest(messages=messages[:turn])
            served = openai.prompt_ids_for(model, request, template)
            if len(served) >= len(ids):
                break  # the trained row was cut at max_length before this reply
            assert ids[: len(served)] == served, (turn, text[:200])
            assert labels[len(served)] != -100 and all(label == -100 for label in labels[len(served) - 3: len(served)])
            checked += 1
    assert checked >= 3
