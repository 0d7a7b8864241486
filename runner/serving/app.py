"""The FastAPI app over one ONNX artifact: liveness apart from readiness, /predict or /generate and /v1 (OpenAI), /info, /metrics.

The model loads and warms up in a background task started by the lifespan, so /health answers (and uvicorn listens)
while a large model is still loading; /ready, /info and the inference routes answer 503 until the warm-up inference
succeeded. Only the route of the artifact's task is registered, so /docs shows exactly what this server can do.
(No `from __future__ import annotations`: FastAPI must see the request classes built in `create_app` as real types.)
"""

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool

from runner.names import CLASSIFIER
from runner.serving import openai
from runner.serving.artifact import Classifier, Generator, InputError, detect_task, load_model
from runner.serving.batching import Batcher
from runner.serving.guard import Guard
from runner.serving.metrics import Metrics
from runner.serving.schemas import GenerateRequest, GenerateResponse, PredictRequest, PredictResponse, request_models
from runner.serving.settings import ServerSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _State:
    model: Classifier | Generator | None = None  # set only after the warm-up inference succeeded
    batcher: Batcher | None = None
    error: str | None = None


def create_app(artifact_dir: Path, settings: ServerSettings | None = None) -> FastAPI:
    artifact_dir, settings = Path(artifact_dir), settings or ServerSettings()
    task = detect_task(artifact_dir)
    state, metrics = _State(), Metrics()
    PredictBody, GenerateBody = request_models(settings)  # limits from the settings, shown in /openapi.json

    async def load() -> None:
        try:
            model = await asyncio.to_thread(load_model, artifact_dir, settings.threads, settings.invariant)
            await asyncio.to_thread(model.warmup)
        except Exception as exc:  # noqa: BLE001 - /ready reports it; the process stays up so the reason can be read
            log.exception("loading %s failed", artifact_dir)
            state.error = f"{type(exc).__name__}: {exc}"
            return
        # Merging requests into shared runs only where that cannot change anyone's answer (model.py's docstring); a
        # graph that is not batch-invariant serves each request in its own thread, its texts one run each.
        if isinstance(model, Classifier) and settings.batching and model.shares_runs:
            state.batcher = Batcher(model.predict, settings.max_batch, settings.max_wait_ms, metrics.batch_size.observe)
            state.batcher.start()
        state.model = model
        log.info("ready: %s (%s, sha256 %s)", model.info.name, model.info.task, model.info.sha256[:12])

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(load())
        try:
            yield
        finally:
            loader.cancel()
            await asyncio.gather(loader, return_exceptions=True)
            if state.batcher is not None:
                await state.batcher.stop()

    app = FastAPI(
        title="recipe runner model server", version="1", lifespan=lifespan, max_body_size=settings.max_body_bytes,
        description=f"ONNX Runtime server for the {task} artifact in `{artifact_dir.name}`.",
    )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the bad input, and input JSON cannot always encode (a lone surrogate, NaN):
        # that turned a 422 into a 500. The location and the reason are what a client needs.
        detail = [{"type": e.get("type"), "loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        if request.url.path.startswith("/v1/"):  # OpenAI clients expect 400 and an `error` object
            first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
            param = ".".join(str(p) for p in first["loc"][1:]) or None
            if first.get("type") == "extra_forbidden":  # as OpenAI words it: the field is named, nothing is ignored
                message = f"Unrecognized request argument supplied: {param}"
                return JSONResponse(openai.OpenAIError(400, message, param).body(), status_code=400)
            return JSONResponse(openai.OpenAIError(400, f"{param}: {first['msg']}", param).body(), status_code=400)
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(openai.OpenAIError)
    async def openai_error(_: Request, exc: openai.OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    def ready_model() -> Classifier | Generator:
        if state.model is None:
            raise HTTPException(503, detail=state.error or "model is loading")
        return state.model

    async def within(work: Awaitable[T], on_timeout: Callable[[], None] | None = None) -> T:
        try:
            return await asyncio.wait_for(work, settings.timeout_s)
        except TimeoutError:
            if on_timeout is not None:
                on_timeout()
            raise HTTPException(504, detail=f"inference took longer than {settings.timeout_s} s") from None

    @app.get("/health", summary="Liveness: the process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: 200 once a warm-up inference succeeded, 503 before")
    async def ready() -> Any:
        if state.model is None:
            body = {"status": "failed" if state.error else "loading", "error": state.error}
            return JSONResponse(body, status_code=503)
        return {"status": "ready"}

    @app.get("/info", summary="The served model and the server's limits")
    async def info() -> dict[str, Any]:
        model = ready_model()
        limits = settings.model_dump(exclude={"api_key"})
        batching = state.batcher is not None
        return {**model.info.__dict__, "auth": settings.api_key is not None, "limits": limits,
                "batching": "across requests" if batching else "per request" if settings.batching else "off"}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, headers={"Content-Type": content_type})

    if task == CLASSIFIER:

        @app.post("/predict", summary="Classify a batch of texts", response_model=PredictResponse)
        async def predict(body: PredictBody) -> Any:  # type: ignore[valid-type]
            texts = cast(PredictRequest, body).texts
            model = cast(Classifier, ready_model())
            if state.batcher is not None:
                work = state.batcher.submit(texts)
            else:
                metrics.batch_size.observe(len(texts))
                work = asyncio.to_thread(model.predict, texts)
            return {"predictions": await within(work)}

    else:

        @app.post("/generate", summary="Continue a prompt (the runner's own shape; /v1/completions is OpenAI's)",
                  response_model=GenerateResponse)
        async def generate(body: GenerateBody) -> Any:  # type: ignore[valid-type]
            request = cast(GenerateRequest, body)
            model = cast(Generator, ready_model())
            stop = threading.Event()  # set on timeout: the decoding loop stops at its next step
            call = asyncio.to_thread(
                model.generate, request.prompt, request.max_new_tokens, request.temperature, request.top_p,
                request.seed, stop,
            )
            try:
                result = await within(call, on_timeout=stop.set)
            except InputError as exc:
                raise HTTPException(422, detail=str(exc)) from None
            metrics.generated_tokens.inc(len(result["tokens"]))
            return result

        chat_template = openai.load_chat_template(artifact_dir)

        async def openai_answer(request: openai.CompletionRequest | openai.ChatRequest) -> Any:
            model = cast(Generator, ready_model())
            openai.refuse_unsupported(request)
            stops = openai.stop_strings(request)
            prompt_ids = await asyncio.to_thread(openai.prompt_ids_for, model, request, chat_template)
            max_tokens = openai.resolve_max_tokens(model, len(prompt_ids), openai.max_tokens_of(request),
                                                     settings.max_new_tokens)
            cancel = threading.Event()
            if request.stream:
                events = openai.stream(model, request, prompt_ids, max_tokens, stops, cancel)

                async def body() -> AsyncIterator[str]:
                    try:
                        async for event in iterate_in_threadpool(events):
                            yield event
                    finally:  # the client went away or the stream ended: stop decoding
                        cancel.set()

                return StreamingResponse(body(), media_type="text/event-stream")
            call = asyncio.to_thread(openai.answer, model, request, prompt_ids, max_tokens, stops, cancel)
            try:
                result = await within(call, on_timeout=cancel.set)
            except InputError as exc:
                raise openai.OpenAIError(400, str(exc)) from None
            metrics.generated_tokens.inc(result["usage"]["completion_tokens"])
            return result

        @app.post("/v1/completions", summary="OpenAI-style text completion (streaming with `stream: true`)")
        async def completions(body: openai.CompletionRequest) -> Any:
            return await openai_answer(body)

        @app.post("/v1/chat/completions", summary="OpenAI-style chat completion with the tokenizer's chat template")
        async def chat_completions(body: openai.ChatRequest) -> Any:
            return await openai_answer(body)

        @app.get("/v1/models", summary="OpenAI-style list of the one served model")
        async def models() -> Any:
            return openai.models_list(cast(Generator, ready_model()))

    app.add_middleware(
        Guard, metrics=metrics, routes=frozenset(r.path for r in app.routes),  # type: ignore[attr-defined]
        max_concurrency=settings.max_concurrency, api_key=settings.api_key,
    )
    return app
