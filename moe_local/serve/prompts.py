"""What a request asks of the model: which adapter, which token ids, how to sample, where to stop.

Everything a request can get wrong is found here, before it is queued: an unknown model (404), a
conversation the chat template rejects, an empty prompt or one that leaves no room in the model's
context (400). Chat messages go through ``moe_local.chat`` exactly as ``moe-local generate`` renders
them (the chat template, or the plain ``User:``/``Assistant:`` format with its stop line when the
tokenizer has none); a completion's prompt is encoded as it is, as ``generate --ignore-chat-template``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..chat import PLAIN_STOP, has_chat_template, prompt_ids
from ..errors import UserError
from .schema import APIError, ChatCompletionRequest, CompletionRequest, Message


@dataclass(frozen=True)
class Generation:
    """One request's work for the model: the prompt's ids, the adapter (None: the base) and sampling."""

    ids: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: tuple[str, ...]


@dataclass
class ServedModel:
    """The loaded model as the server names it: ``name`` is the base, ``adapters`` the named adapters."""

    model: object  # a moe_local.loaded.LoadedModel
    name: str
    adapters: tuple[str, ...]
    default_max_tokens: int

    def names(self) -> list[str]:
        return [self.name, *self.adapters]

    def adapter_for(self, requested: str) -> str | None:
        if requested == self.name:
            return None
        if requested in self.adapters:
            return requested
        served = ", ".join(self.names())
        raise APIError(
            404, f"The model '{requested}' does not exist (served: {served})", param="model", code="model_not_found"
        )

    def chat(self, body: ChatCompletionRequest) -> Generation:
        adapter = self.adapter_for(body.model)
        ids = self._ids([_as_message(m) for m in body.messages], chat_template=True)
        stops = body.stops() + (() if has_chat_template(self.model.tokenizer) else (PLAIN_STOP,))
        return self._generation(body, adapter, ids, body.max_completion_tokens or body.max_tokens, stops)

    def completion(self, body: CompletionRequest) -> Generation:
        adapter = self.adapter_for(body.model)
        ids = self._ids(body.prompt, chat_template=False)
        return self._generation(body, adapter, ids, body.max_tokens, body.stops())

    def _ids(self, prompt, chat_template: bool) -> list[int]:
        try:
            ids = prompt_ids(self.model, prompt, chat_template)
        except UserError as e:
            raise APIError(400, str(e), param="messages") from None
        context = self.model.spec.max_position_embeddings
        param = "messages" if chat_template else "prompt"
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) >= context:
            raise APIError(
                400,
                f"the prompt is {len(ids)} tokens; the model's context is {context} tokens",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def _generation(self, body, adapter, ids: list[int], max_tokens: int | None, stops: tuple[str, ...]) -> Generation:
        return Generation(
            ids=ids,
            adapter=adapter,
            # At most what the context leaves, as moe_local.chat caps it; finish_reason then says "length".
            max_tokens=max_tokens or self.default_max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stops=stops,
        )


def _as_message(message: Message) -> dict:
    """An OpenAI message as moe_local.chat takes it: text parts joined, ``developer`` as ``system``."""
    content = message.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    role = "system" if message.role == "developer" else message.role
    return {"role": role, "content": content or ""}
