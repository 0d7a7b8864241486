"""OpenAI-style text generation: POST /v1/completions, POST /v1/chat/completions, GET /v1/models.

The request and response shapes follow the OpenAI API that vLLM, TGI, llama.cpp's server and Ollama expose, so existing
clients work unchanged: `usage` and `finish_reason` ("stop" at eos or a stop string, "length" at max_tokens), server-sent
events ending with `data: [DONE]` when `stream` is true, and errors as `{"error": {"message", "type", "param", "code"}}`
with status 400 for what this server does not do (`n` > 1, `logprobs`, `logit_bias`, penalties, `tools`: every OpenAI
request field is either implemented, harmless, or refused by name; see UNSUPPORTED).

Streaming and non-streaming answers come from one function (`completion_events`), so a streamed text is the
non-streamed text cut into pieces. Chat messages are rendered by runner.chat, the renderer the data step trains with
(the tokenizer's own chat template, sandboxed jinja, as transformers renders it), and encoded without adding special
tokens again: the template already wrote the BOS. So the served prompt ids are the ids training saw.
"""

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from runner import chat
from runner.chat import load_chat_template as load_chat_template  # the server's entry point to it
from runner.serving.artifact import Generator, InputError


class OpenAIError(Exception):
    """An error the server answers in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# Every field of OpenAI's completions and chat completions requests is declared here, and no other is accepted: a field
# that would change the answer and is not implemented is refused with a 400 naming it (a client that sent `logit_bias`
# must not get the unbiased text as if it had been applied), and an unknown field is refused like OpenAI refuses one
# ("Unrecognized request argument"), so a misspelt option is never silently dropped.
STRICT_FIELDS = ConfigDict(extra="forbid")

# Not implemented: each field, with the values that mean "off" (accepted, since they ask for nothing).
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (1,),  # one choice per request: send separate requests
    "best_of": (1,),
    "logprobs": (False,),  # completions: an int (0 already returns the sampled tokens' logprobs); chat: a bool
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "echo": (False,),
    "suffix": ("",),
    "response_format": ({"type": "text"},),  # json_object / json_schema would need constrained decoding
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (),  # only meaningful with tools
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "reasoning_effort": (),
    "verbosity": (),
    "store": (False,),  # nothing is stored: a client that asks for it must not think it was
    "service_tier": ("auto", "default"),
}


class _Sampling(BaseModel):
    model_config = STRICT_FIELDS
    model: str | None = Field(None, description="Accepted and not checked: this server serves one model.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (default 16).")
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings at which generation stops.")
    seed: int | None = Field(None, ge=0, description="Seed for sampling; equal seeds give equal samples.")
    stream: bool = False
    # Accepted because they cannot change the answer: identifiers for the caller's own bookkeeping, and the streaming
    # usage option (the last streamed chunk always carries `usage`).
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    stream_options: dict[str, bool] | None = None
    # Refused unless off (UNSUPPORTED): declared so that the 400 names the field and says why.
    n: Any = None
    best_of: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    echo: Any = None
    suffix: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    store: Any = None
    service_tier: Any = None


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1)


class ChatMessage(BaseModel):
    model_config = STRICT_FIELDS  # `name`, `tool_calls`, content parts: not rendered, so refused
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="The chat name of max_tokens.")


def refuse_unsupported(request: _Sampling) -> None:
    """A 400 naming the first field that asks for something this server does not do."""
    for field, off in UNSUPPORTED.items():
        value = getattr(request, field)
        if value is None or any(value == o and isinstance(value, bool) == isinstance(o, bool) for o in off):
            continue  # off (0.0 counts as 0; but `logprobs: 0` asks for the sampled tokens' logprobs, unlike false)
        if field == "n":
            raise OpenAIError(400, "n > 1 is not supported by this server: send separate requests", "n", "unsupported")
        raise OpenAIError(400, f"`{field}` is not supported by this server (it would change the answer, so it is "
                          "refused rather than ignored)", field, "unsupported")


def max_tokens_of(request: _Sampling) -> int | None:
    """max_tokens, or chat's max_completion_tokens (the same limit under its newer name)."""
    newer = getattr(request, "max_completion_tokens", None)
    if newer is not None and request.max_tokens is not None and newer != request.max_tokens:
        raise OpenAIError(400, "max_tokens and max_completion_tokens disagree: send one", "max_completion_tokens")
    return newer if newer is not None else request.max_tokens


def stop_strings(request: _Sampling) -> list[str]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise OpenAIError(400, "`stop` takes at most 4 non-empty strings", "stop")
    return stops


# --- chat template ------------------------------------------------------------------------------------------------------


def render_chat(template: str, messages: list[dict[str, str]], special: dict[str, str | None]) -> str:
    """The prompt for `messages` through runner.chat, the renderer the data step trained with (generation prompt on)."""
    try:
        return chat.render(template, messages, special, add_generation_prompt=True)
    except chat.ChatTemplateError as exc:
        raise OpenAIError(400, str(exc), "messages") from None


# --- generation ---------------------------------------------------------------------------------------------------------


def resolve_max_tokens(model: Generator, prompt_tokens: int, requested: int | None, server_cap: int) -> int:
    wanted = requested if requested is not None else min(16, server_cap)
    if wanted > server_cap:
        raise OpenAIError(400, f"max_tokens {wanted} exceeds this server's limit of {server_cap}", "max_tokens")
    if prompt_tokens + wanted > model.info.max_positions:
        raise OpenAIError(
            400, f"this model's context is {model.info.max_positions} tokens; the prompt has {prompt_tokens} and "
            f"max_tokens asks for {wanted}", "max_tokens", "context_length_exceeded",
        )
    return wanted


def completion_events(model: Generator, prompt_ids: list[int], max_tokens: int, request: _Sampling,
                      stops: list[str], cancel: Any = None) -> Iterator[tuple[str, str | None, int]]:
    """(text delta, finish_reason or None, tokens so far) as tokens arrive; the last event has the finish_reason.

    Text is decoded from all tokens so far, so a character split over tokens is emitted whole; when stop strings are
    given, the last len(longest stop) - 1 characters are held back until it is clear they do not start one."""
    tokens: list[int] = []
    sent = ""
    hold = max((len(s) for s in stops), default=1) - 1
    for token in model.stream_ids(prompt_ids, max_tokens, request.temperature, request.top_p, request.seed, cancel):
        tokens.append(token)
        text = model.decode(tokens)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            yield text[len(sent):cut], "stop", len(tokens)
            return
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its next byte
            continue
        ready = len(text) - hold
        if ready > len(sent):
            yield text[len(sent):ready], None, len(tokens)
            sent = text[:ready]
    text = model.decode(tokens)
    finish = "length" if len(tokens) >= max_tokens else "stop"
    yield text[len(sent):], finish, len(tokens)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def model_id(model: Generator) -> str:
    return f"{model.info.name}-{model.info.sha256[:12]}"


def models_list(model: Generator) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": model_id(model), "object": "model", "created": 0, "owned_by": "recipe-runner"}]}


def prompt_ids_for(model: Generator, request: CompletionRequest | ChatRequest, template: str | None) -> list[int]:
    if isinstance(request, CompletionRequest):
        return model.encode(request.prompt)
    if template is None:
        raise OpenAIError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
    text = render_chat(template, [m.model_dump() for m in request.messages], model.special_tokens)
    return model.encode(text, add_special_tokens=False)  # the template already wrote BOS where the model wants one


def answer(model: Generator, request: CompletionRequest | ChatRequest, prompt_ids: list[int], max_tokens: int,
           stops: list[str], cancel: Any = None) -> dict[str, Any]:
    """The whole, non-streamed response body."""
    text, finish, count = "", "length", 0
    for delta, reason, produced in completion_events(model, prompt_ids, max_tokens, request, stops, cancel):
        text, finish, count = text + delta, reason or finish, produced
    created = int(time.time())
    if isinstance(request, ChatRequest):
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                                  "logprobs": None}
        kind, prefix = "chat.completion", "chatcmpl"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        kind, prefix = "text_completion", "cmpl"
    return {"id": new_id(prefix), "object": kind, "created": created, "model": model_id(model), "choices": [choice],
            "usage": usage(len(prompt_ids), count)}


def stream(model: Generator, request: CompletionRequest | ChatRequest, prompt_ids: list[int], max_tokens: int,
           stops: list[str], cancel: Any = None) -> Iterator[str]:
    """Server-sent events: one chunk per text delta, a final chunk with finish_reason and usage, then [DONE]."""
    chat = isinstance(request, ChatRequest)
    ident, created, name = new_id("chatcmpl" if chat else "cmpl"), int(time.time()), model_id(model)
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str, finish: str | None, first: bool = False, extra: dict | None = None) -> str:
        if chat:
            body: dict[str, Any] = {"role": "assistant", "content": delta} if first else {"content": delta}
            choice = {"index": 0, "delta": body if (delta or first) else {}, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
        payload = {"id": ident, "object": kind, "created": created, "model": name, "choices": [choice], **(extra or {})}
        return f"data: {json.dumps(payload)}\n\n"

    if chat:
        yield chunk("", None, first=True)
    try:
        for delta, finish, count in completion_events(model, prompt_ids, max_tokens, request, stops, cancel):
            if finish is None:
                yield chunk(delta, None)
            else:
                if delta:
                    yield chunk(delta, None)
                yield chunk("", finish, extra={"usage": usage(len(prompt_ids), count)})
    except InputError as exc:
        yield f"data: {json.dumps(OpenAIError(400, str(exc)).body())}\n\n"
    yield "data: [DONE]\n\n"
