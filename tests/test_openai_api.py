"""The OpenAI-style endpoints through a real uvicorn process (the smoke-serve stage's ServerProcess), on the tiny Llama
built by onnxruntime-genai's builder: answers, streaming, errors, and token ids equal to HF/torch's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

# A ChatML template like SmolLM2's (the tiny tokenizer has none of its own).
TEMPLATE = (
    "{% for message in messages %}{{ '<s>' if loop.first else '' }}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def server(llama_artifact: Path, tmp_path_factory: pytest.TempPathFactory):
    from runner.serving.settings import ServerSettings
    from runner.stages.serve import ServerProcess

    artifact = shutil.copytree(llama_artifact, tmp_path_factory.mktemp("chat") / "onnx")
    (artifact / "chat_template.jinja").write_text(TEMPLATE)
    process = ServerProcess(artifact, ServerSettings(), tmp_path_factory.mktemp("log") / "server.log")
    process.wait_ready(60)
    yield process, artifact
    assert process.stop() is not None


def sse_events(response) -> list[dict | str]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def torch_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=model.config.pad_token_id)
    tokens = out[0, len(ids):].tolist()
    eos = model.config.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_completion_token_ids_equal_hf_and_torch(server, tiny_llama_dir):
    from transformers import AutoTokenizer

    process, _ = server
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prompt = "the film was"
    with process.client() as client:
        generated = client.post("/generate", json={"prompt": prompt, "max_new_tokens": 8}).json()
        completion = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
    ids = tokenizer(prompt)["input_ids"]
    expected = torch_greedy(tiny_llama_dir, ids, 8)
    assert generated["prompt_tokens"] == len(ids) and generated["tokens"] == expected
    assert completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert completion["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected),
                                   "total_tokens": len(ids) + len(expected)}
    assert completion["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_uses_the_chat_template_once_without_a_second_bos(server, tiny_llama_dir):
    from transformers import AutoTokenizer

    process, artifact = server
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = TEMPLATE
    messages = [{"role": "user", "content": "was the film good"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids.count(tokenizer.bos_token_id) == 1
    with process.client() as client:
        body = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0}).json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["prompt_tokens"] == len(ids)
    expected = torch_greedy(tiny_llama_dir, list(ids), 6)
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("route,payload", [
    ("/v1/completions", {"prompt": "the plot was"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "the plot was"}]}),
])
def test_streamed_text_equals_non_streamed_text(server, route, payload):
    process, _ = server
    request = {**payload, "max_tokens": 12, "temperature": 0}
    with process.client() as client:
        whole = client.post(route, json=request).json()
        with client.stream("POST", route, json={**request, "stream": True}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict)]
    if route == "/v1/chat/completions":
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        expected = whole["choices"][0]["message"]["content"]
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
        expected = whole["choices"][0]["text"]
    assert text == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_stop_string_ends_the_answer_before_it(server):
    process, _ = server
    with process.client() as client:
        free = client.post("/v1/completions", json={"prompt": "the film was", "max_tokens": 12, "temperature": 0}).json()
        text = free["choices"][0]["text"]
        if len(text.strip()) < 2:
            pytest.skip(f"the tiny model's greedy answer {text!r} is too short to cut")
        stop = text.strip()[1:3]
        cut = client.post("/v1/completions",
                          json={"prompt": "the film was", "max_tokens": 12, "temperature": 0, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == text[: text.find(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_models_and_openai_shaped_errors(server):
    process, _ = server
    with process.client() as client:
        models = client.get("/v1/models").json()
        assert models["object"] == "list" and len(models["data"]) == 1
        for body, param in [
            ({"prompt": "hi", "n": 2}, "n"),
            ({"prompt": "hi", "logprobs": 1}, "logprobs"),
            ({"prompt": "hi", "tools": [{"type": "function"}]}, "tools"),
            ({"prompt": "hi", "max_tokens": 10_000}, "max_tokens"),
            ({"prompt": "word " * 120, "max_tokens": 16}, "max_tokens"),
            ({"prompt": ""}, "prompt"),
        ]:
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
        assert client.get("/ready").status_code == 200  # nothing above hurt the server


# Each OpenAI request field this server does not implement, set to a value that would change the answer.
ASKS_FOR_MORE = [
    ("/v1/completions", {"logit_bias": {"50": 100}}), ("/v1/completions", {"frequency_penalty": 1.5}),
    ("/v1/completions", {"presence_penalty": -0.5}), ("/v1/completions", {"best_of": 3}),
    ("/v1/completions", {"echo": True}), ("/v1/completions", {"suffix": " the end"}),
    ("/v1/completions", {"logprobs": 0}), ("/v1/completions", {"n": 2}),
    ("/v1/chat/completions", {"logprobs": True}), ("/v1/chat/completions", {"top_logprobs": 2}),
    ("/v1/chat/completions", {"logit_bias": {"50": -100}}),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("/v1/chat/completions", {"tool_choice": "required"}), ("/v1/chat/completions", {"parallel_tool_calls": False}),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}), ("/v1/chat/completions", {"function_call": "auto"}),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}), ("/v1/chat/completions", {"audio": {"voice": "x"}}),
    ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}),
    ("/v1/chat/completions", {"reasoning_effort": "low"}), ("/v1/chat/completions", {"verbosity": "low"}),
    ("/v1/chat/completions", {"web_search_options": {}}), ("/v1/chat/completions", {"store": True}),
    ("/v1/chat/completions", {"service_tier": "priority"}),
]


@pytest.mark.parametrize("route,field", ASKS_FOR_MORE, ids=[f"{r.split('/')[-1]}-{next(iter(f))}" for r, f in ASKS_FOR_MORE])
def test_every_openai_field_the_server_does_not_implement_is_refused_by_name(server, route, field):
    process, _ = server
    base = {"prompt": "the film was"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    with process.client() as client:
        response = client.post(route, json={**base, "max_tokens": 4, **field})
    name = next(iter(field))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == name and f"{name}" in error["message"] and error["code"] == "unsupported"


def test_fields_that_ask_for_nothing_more_are_answered_as_without_them(server):
    """The defaults of the refused fields, the caller's own identifiers and max_completion_tokens change nothing."""
    process, _ = server
    plain = {"prompt": "the film was", "max_tokens": 6, "temperature": 0}
    off = {"logit_bias": {}, "frequency_penalty": 0.0, "presence_penalty": 0, "best_of": 1, "echo": False,
           "suffix": None, "n": 1, "logprobs": None, "user": "u-1", "stream_options": {"include_usage": True},
           "service_tier": "auto", "store": False, "metadata": {"run": "a"}}
    chat = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    with process.client() as client:
        expected = client.post("/v1/completions", json=plain).json()["choices"][0]["text"]
        answered = client.post("/v1/completions", json={**plain, **off})
        assert answered.status_code == 200, answered.text
        assert answered.json()["choices"][0]["text"] == expected
        by_old_name = client.post("/v1/chat/completions", json={**chat, "max_tokens": 5}).json()
        by_new_name = client.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 5,
                                                                   "response_format": {"type": "text"},
                                                                   "tool_choice": "none", "logprobs": False}).json()
        assert by_new_name["choices"][0]["message"] == by_old_name["choices"][0]["message"]
        assert by_new_name["usage"]["completion_tokens"] <= 5
        disagree = client.post("/v1/chat/completions", json={**chat, "max_tokens": 5, "max_completion_tokens": 6})
        assert disagree.status_code == 400 and disagree.json()["error"]["param"] == "max_completion_tokens"


def test_an_unknown_field_is_refused_by_name_not_ignored(server):
    process, _ = server
    with process.client() as client:
        misspelt = client.post("/v1/completions", json={"prompt": "hi", "max_token": 4})
        assert misspelt.status_code == 400
        assert misspelt.json()["error"]["param"] == "max_token"
        assert "Unrecognized request argument supplied: max_token" in misspelt.json()["error"]["message"]
        named = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi", "name": "bo"}]})
        assert named.status_code == 400 and named.json()["error"]["param"] == "messages.0.name"


def test_the_official_openai_client_gets_answers_and_a_named_refusal(server):
    """What a user's code does: the `openai` package against this server. Its answers equal the raw route's, streamed
    or not, and an unimplemented option raises the client's BadRequestError naming the field, not a silent answer."""
    import openai as openai_client

    process, _ = server
    client = openai_client.OpenAI(base_url=f"{process.base_url}/v1", api_key=process.api_key, max_retries=0)
    with process.client() as raw:
        expected = raw.post("/v1/completions", json={"prompt": "the film was", "max_tokens": 6, "temperature": 0}).json()
    answer = client.completions.create(model="any", prompt="the film was", max_tokens=6, temperature=0)
    assert answer.choices[0].text == expected["choices"][0]["text"] and answer.usage.completion_tokens <= 6
    streamed = client.completions.create(model="any", prompt="the film was", max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == answer.choices[0].text
    chat = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}],
                                          max_completion_tokens=5, temperature=0, user="u-1")
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    for create, kwargs, field in [
        (client.completions.create, {"prompt": "the film was", "logit_bias": {"50": 100}}, "logit_bias"),
        (client.completions.create, {"prompt": "the film was", "presence_penalty": 1.0}, "presence_penalty"),
        (client.chat.completions.create, {"messages": [{"role": "user", "content": "hi"}],
                                          "response_format": {"type": "json_object"}}, "response_format"),
    ]:
        with pytest.raises(openai_client.BadRequestError) as refused:
            create(model="any", max_tokens=4, **kwargs)
        assert refused.value.status_code == 400 and refused.value.param == field and field in refused.value.message


def test_sampling_with_a_seed_is_repeatable(server):
    process, _ = server
    request = {"prompt": "the film was", "max_tokens": 8, "temperature": 1.0, "seed": 7}
    with process.client() as client:
        first = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
        second = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
    assert first == second
