"""The HTTP side: FastAPI routes for the OpenAI endpoints, their errors, and server-sent events.

A request is validated and turned into a ``Generation`` on the event loop (``prompts``), queued for
the model's worker (``jobs``), and answered from the job's events: collected into one JSON object, or
streamed as ``data: {chunk}`` events ending in ``data: [DONE]``. A client that goes away cancels its
job: Starlette cancels a streaming response when the client disconnects (the stream's ``finally``
cancels the job), and a plain request watches for the disconnect while it waits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import UserError
from .jobs import Job, QueueFull, ShuttingDown, Worker
from .prompts import ServedModel
from .schema import APIError, ChatCompletionRequest, CompletionRequest, Reply, error_body, usage

log = logging.getLogger("moe_local.serve")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(served: ServedModel, worker: Worker, backend: str) -> FastAPI:
    app = FastAPI(title="moe-local", version=__version__, docs_url=None, redoc_url=None)
    created = int(time.time())

    def card(name: str) -> dict:
        parent = {} if name == served.name else {"parent": served.name}
        return {"id": name, "object": "model", "created": created, "owned_by": "moe-local", **parent}

    @app.get("/health")
    async def health():
        names = {"model": served.name, "adapters": list(served.adapters), "backend": backend}
        return {"status": "ok", **names, "queue": worker.status()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(name) for name in served.names()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        served.adapter_for(name)  # 404 for an unknown name
        return card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await answer(request, worker, Reply(True, body.model), lambda: served.chat(body), body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await answer(request, worker, Reply(False, body.model), lambda: served.completion(body), body)

    add_error_handlers(app)
    return app


async def answer(request: Request, worker: Worker, reply: Reply, make_generation, body):
    """Queue the request's generation and answer it, whole or streamed."""
    try:
        generation = make_generation()
    except APIError:
        raise
    except Exception as e:  # a bug or an odd input the checks missed: one line, the server goes on
        raise unexpected(e) from None
    job = Job(generation, asyncio.get_running_loop())
    try:
        worker.submit(job)
    except QueueFull as e:
        retry = str(worker.retry_after())
        raise APIError(503, f"{e}; retry later", code="queue_full", headers={"Retry-After": retry}) from None
    except ShuttingDown as e:
        raise APIError(503, str(e), code="shutting_down") from None
    prompt_tokens = len(generation.ids)
    if body.stream:
        events = streamed(job, worker, reply, prompt_tokens, body.include_usage())
        # The background task runs once the response ends, the client gone included: the job never outlives it.
        done = BackgroundTask(worker.cancel, job)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS, background=done)
    return JSONResponse(await whole(request, job, worker, reply, prompt_tokens))


async def whole(request: Request, job: Job, worker: Worker, reply: Reply, prompt_tokens: int) -> dict:
    watcher = asyncio.create_task(cancel_on_disconnect(request, worker, job))
    pieces = []
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                pieces.append(value)
            elif kind == "done":
                counts = usage(prompt_tokens, value.generation_tokens)
                return reply.whole("".join(pieces), value.finish_reason, counts)
            else:
                raise failure(kind, value)
    finally:
        watcher.cancel()
        worker.cancel(job)


async def cancel_on_disconnect(request: Request, worker: Worker, job: Job) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)
    worker.cancel(job)


async def streamed(job: Job, worker: Worker, reply: Reply, prompt_tokens: int, include_usage: bool):
    """Server-sent events; leaving early (the client gone: Starlette cancels the response) cancels the job."""
    try:
        if reply.chat:
            yield sse(reply.chunk("", first=True))
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield sse(reply.chunk(value))
                continue
            if kind == "done":
                yield sse(reply.chunk(None, value.finish_reason))
                if include_usage:
                    yield sse(reply.usage_chunk(usage(prompt_tokens, value.generation_tokens)))
            else:  # headers are sent: the error goes in the stream, which OpenAI's clients raise
                yield sse(failure(kind, value).body())
            break
        yield "data: [DONE]\n\n"
    finally:
        worker.cancel(job)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def failure(kind: str, value) -> APIError:
    """The APIError for a job that did not finish: stopped by the server, refused input, or a failure."""
    if kind == "cancelled" or isinstance(value, ShuttingDown):
        return APIError(503, "the server is shutting down", code="shutting_down")
    if isinstance(value, UserError):
        return APIError(400, str(value))
    return unexpected(value)


def unexpected(e: Exception) -> APIError:
    first = str(e).splitlines()[0] if str(e) else ""
    log.warning("unexpected error: %s: %s", type(e).__name__, first)
    return APIError(500, f"unexpected error: {type(e).__name__}: {first}")


def add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's ``{"error": {...}}``: 400 for bodies that fail validation, FastAPI's own
    status for unknown routes and methods, the APIError's status for the rest."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        path = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":  # loc holds the offset of the fault, not a field
            path, detail = [], first.get("ctx", {}).get("error", first["msg"])
            message = f"the request body is not valid JSON ({detail})"
        elif not path:  # the body itself: not an object, or missing
            message = f"the request body must be a JSON object ({first['msg']})"
        else:
            message = f"{'.'.join(path)}: {first['msg']}"
        return JSONResponse(error_body(message, "invalid_request_error", path[0] if path else None), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code, headers=e.headers)
