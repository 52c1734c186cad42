"""The OpenAI API's shapes: request bodies (pydantic, strict types), responses, stream chunks and errors.

Requests are validated strictly, as OpenAI's server does: ``"max_tokens": "5"`` or ``true`` is a type
error, not a number (an integer is a valid float). Fields the server cannot honour are refused
(``n`` other than 1, ``logprobs``); fields it has no use for (penalties, ``user``, tools metadata)
are accepted and ignored, so that ordinary clients work unchanged.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """A request the server answers with an OpenAI error body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.type = "invalid_request_error" if status < 500 else "server_error"

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# -- requests ------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """What chat and completion requests share."""

    model: str
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, ge=0)  # OpenAI's defaults
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)  # what every backend's generator takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return tuple(stops)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)  # the newer name of max_tokens
    logprobs: Literal[False] | None = None


class CompletionRequest(_Sampling):
    prompt: str
    logprobs: None = None
    echo: Literal[False] = False


# -- responses -----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Reply:
    """The id, time and model name every object of one response carries, and the objects themselves."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def whole(self, text: str, finish_reason: str, counts: dict) -> dict:
        """The non-streamed answer."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
            return self._object("chat.completion", [{**choice, "finish_reason": finish_reason}], usage=counts)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._object("text_completion", [choice], usage=counts)

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        """One streamed piece (``text`` None: the closing chunk that carries the finish reason)."""
        if self.chat:
            delta = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._object("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._object("text_completion", [choice])

    def usage_chunk(self, counts: dict) -> dict:
        """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [], usage=counts)
