"""The HTTP side of `sparseft serve`: OpenAI's chat and text completions (streamed as server-sent events or
whole), the model list, health and Prometheus metrics, with errors in OpenAI's JSON shape. Requests become
engine jobs; the engine's thread hands their text back to the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from sparseft.serve.engine import Closed, Engine, Job, QueueFull, Sampling
from sparseft.serve.schemas import (
    ChatChoice,
    ChatChunk,
    ChatCompletion,
    ChatMessage,
    ChatRequest,
    ChunkChoice,
    CompletionRequest,
    Delta,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    Sampled,
    TextChoice,
    TextCompletion,
    Usage,
)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_response(
    status: int, message: str, code: str | None = None, param: str | None = None, headers: Any = None
) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return (
            f"the request body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})",
            None,
        )
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(where) or None
    if first.get("type") == "extra_forbidden":
        return f"unknown field {param!r}: sparseft serve does not take it", param
    return f"{param or 'body'}: {first.get('msg', 'invalid')}", param


class Served:
    """What the routes need: the engine, the tokenizer, the model's name, the clock."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.name = name
        self.created = int(time.time())

    def check_model(self, body: Sampled) -> None:
        if body.model != self.name:
            raise ApiError(
                404,
                f"the model {body.model!r} does not exist; this server serves {self.name!r}",
                "model_not_found",
                "model",
            )

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(
                400,
                "this model's tokenizer has no chat template; send a prompt to /v1/completions",
                param="messages",
            )
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in body.messages
        ]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def text_prompt(self, body: CompletionRequest) -> list[int]:
        if isinstance(body.prompt, list):
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in body.prompt):
                raise ApiError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
            return list(body.prompt)
        return list(self.tokenizer(body.prompt).input_ids)

    def job(self, body: Sampled, prompt: list[int], max_tokens: int | None, param: str) -> Job:
        context = self.engine.context
        if not prompt:
            raise ApiError(400, "the prompt has no tokens", param=param)
        if len(prompt) >= context:
            raise ApiError(
                400,
                f"this server's context is {context} tokens (prompt and completion); the prompt has {len(prompt)}",
                "context_length_exceeded",
                param,
            )
        room = context - len(prompt)
        sampling = Sampling(body.temperature, body.top_p, body.top_k, body.seed)
        return Job(prompt, min(max_tokens or room, room), sampling, body.stops())


async def _events(engine: Engine, job: Job) -> AsyncGenerator[tuple[str, str | None, str | None]]:
    """Submit `job` and yield its events as the engine's thread sends them; a caller that stops listening
    (a client gone, a server stopping) cancels the job."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, str | None, str | None]] = asyncio.Queue()

    def hand_over(text: str, finish: str | None, error: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
            loop.call_soon_threadsafe(queue.put_nowait, (text, finish, error))

    job.on_event = hand_over
    try:
        engine.submit(job)
    except QueueFull as e:
        raise ApiError(
            503, f"the server is busy ({e}); try again shortly", "server_busy", headers={"Retry-After": "1"}
        ) from e
    except Closed as e:
        raise ApiError(503, "the server is shutting down", "shutting_down") from e
    try:
        while True:
            event = await queue.get()
            yield event
            if event[1] is not None:
                return
    finally:
        if job.finish is None:
            engine.cancel(job)


def _usage(job: Job) -> Usage:
    return Usage(
        prompt_tokens=len(job.prompt),
        completion_tokens=len(job.tokens),
        total_tokens=len(job.prompt) + len(job.tokens),
    )


def _sse(payload: Any) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


async def _whole(engine: Engine, job: Job) -> str:
    parts = []
    async for text, finish, error in _events(engine, job):
        parts.append(text)
        if finish == "error":
            raise ApiError(500, f"generation failed: {error}", "generation_error")
    return "".join(parts)


async def _streamed(
    engine: Engine,
    job: Job,
    piece: Callable[[str, str | None], str],
    usage: Callable[[], str] | None,
    opening: str = "",
) -> StreamingResponse:
    """`job`'s text as server-sent events: `opening`, a `piece(text, None)` per piece of text, `piece("",
    finish)`, the `usage()` chunk if asked for, then `[DONE]`. The first event is awaited before the response
    starts, so a refusal (a full queue) is an HTTP error rather than a broken stream; a client that goes away
    closes the events, which cancels the job."""
    events = _events(engine, job)
    first = await events.__anext__()

    async def stream() -> AsyncIterator[str]:
        try:
            if opening:
                yield opening
            text, finish, error = first
            while True:
                if text:
                    yield piece(text, None)
                if finish is not None:
                    break
                text, finish, error = await events.__anext__()
            if finish == "error":
                failed = ErrorBody(message=f"generation failed: {error}", type="server_error")
                yield _sse(ErrorResponse(error=failed))
            else:
                yield piece("", finish)
                if usage is not None:
                    yield usage()
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()

    return StreamingResponse(stream(), media_type="text/event-stream")


def create_app(engine: Engine, name: str, api_key: str | None = None) -> FastAPI:
    """The server's app for `engine` under the model name `name`; with `api_key`, every /v1 route and /metrics
    asks for `Authorization: Bearer <api_key>`. The app starts the engine and stops it on shutdown."""
    served = Served(engine, name)
    metrics = engine.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="sparseft", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e)
        return error_response(400, message, "invalid_request", param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.middleware("http")
    async def guard_and_count(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        if api_key is not None and (path.startswith("/v1/") or path == "/metrics"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                response: Response = error_response(
                    401, "a valid API key is needed: Authorization: Bearer KEY", "invalid_api_key"
                )
                metrics.requests.labels(endpoint=path, status="401").inc()
                return response
        response = await call_next(request)
        known = path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
        metrics.requests.labels(endpoint=path if known else "other", status=str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "busy": engine.busy}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=served.created)])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest) -> ChatCompletion | StreamingResponse:
        served.check_model(body)
        job = served.job(
            body, served.chat_prompt(body), body.max_completion_tokens or body.max_tokens, "messages"
        )
        ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if not body.stream:
            text = await _whole(engine, job)
            choice = ChatChoice(message=ChatMessage(content=text), finish_reason=job.finish)
            return ChatCompletion(id=ident, created=created, model=name, choices=[choice], usage=_usage(job))
        usage = body.stream_options is not None and body.stream_options.include_usage

        def chat_piece(text: str, finish: str | None) -> str:
            choice = ChunkChoice(delta=Delta(content=text or None), finish_reason=finish)
            return _sse(ChatChunk(id=ident, created=created, model=name, choices=[choice]))

        def chat_usage() -> str:
            return _sse(ChatChunk(id=ident, created=created, model=name, choices=[], usage=_usage(job)))

        opening = _sse(
            ChatChunk(
                id=ident,
                created=created,
                model=name,
                choices=[ChunkChoice(delta=Delta(role="assistant", content=""))],
            )
        )
        return await _streamed(engine, job, chat_piece, chat_usage if usage else None, opening)

    @app.post("/v1/completions", response_model=None)
    async def complete(body: CompletionRequest) -> TextCompletion | StreamingResponse:
        served.check_model(body)
        job = served.job(body, served.text_prompt(body), body.max_tokens or 16, "prompt")
        ident, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        if not body.stream:
            text = await _whole(engine, job)
            choice = TextChoice(text=text, finish_reason=job.finish)
            return TextCompletion(id=ident, created=created, model=name, choices=[choice], usage=_usage(job))
        usage = body.stream_options is not None and body.stream_options.include_usage

        def text_piece(text: str, finish: str | None) -> str:
            choice = TextChoice(text=text, finish_reason=finish)
            return _sse(TextCompletion(id=ident, created=created, model=name, choices=[choice]))

        def text_usage() -> str:
            return _sse(TextCompletion(id=ident, created=created, model=name, choices=[], usage=_usage(job)))

        return await _streamed(engine, job, text_piece, text_usage if usage else None)

    return app
