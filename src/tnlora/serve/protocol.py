"""The request and response shapes of the API, as typed models (OpenAI's, and the tutorial's ``POST /``).

Requests are validated strictly (a number given as a string is refused, as OpenAI does) and unknown fields
are ignored, as OpenAI-compatible servers do, so that clients sending newer fields keep working. Fields that
OpenAI defines but this server does not implement are accepted only at their neutral value (``n`` 1,
``logprobs`` false, no penalties, no tools, ...) and refused otherwise, naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from tnlora.serve.engine import SEED_RANGE

Seed = Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]
SessionId = Annotated[str, Field(min_length=1, max_length=256)]
QuestionAnswer = Annotated[list[str], Field(min_length=2, max_length=2)]  # one earlier turn of the tutorial


class Unsupported(ValueError):
    """A known OpenAI field set to a value this server does not implement."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# ---------------------------------------------------------------------------------------------------------------
# Errors


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:  # fmt: skip
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------------------------
# Requests


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as OpenAI-compatible servers do)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields chat and text completions share."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    session_id: SessionId | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens (benchmarks)
    # Accepted at their neutral values only.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 16:
            raise ValueError("at most 16 stop strings")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        items = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in items if s)

    def check_supported(self) -> None:
        """Refuse known fields set to values this server does not implement (raises :class:`Unsupported`)."""
        if self.n != 1:
            raise Unsupported("n", "n: only n = 1 is supported (send several requests instead)")
        if self.best_of not in (None, 1):
            raise Unsupported("best_of", "best_of: only 1 is supported")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0):
                raise Unsupported(name, f"{name}: not supported (only 0)")
        if self.logprobs not in (None, False, 0):
            raise Unsupported("logprobs", "logprobs: not supported")
        if self.logit_bias:
            raise Unsupported("logit_bias", "logit_bias: not supported")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs:
            raise Unsupported("top_logprobs", "top_logprobs: not supported")
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise Unsupported(name, f"{name}: tool calling is not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise Unsupported("tool_choice", "tool_choice: tool calling is not supported")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise Unsupported("response_format", "response_format: only {\"type\": \"text\"} is supported")

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is OpenAI's newer name; it wins when both are given.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(value, list) and value and isinstance(value[0], str) and len(value) != 1:
            raise ValueError("only one prompt per request is supported")
        if not value:
            raise ValueError("must not be empty")
        return value

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise Unsupported("echo", "echo: not supported")
        if self.suffix:
            raise Unsupported("suffix", "suffix: not supported")

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class TutorialRequest(_Strict):
    """The tutorial series' ``POST /`` body: ``prompt``, optional ``history`` (``[[question, answer], …]`` or
    ``[{"role", "content"}, …]``), ``max_length`` (prompt + reply tokens), ``top_p`` and ``temperature``."""

    prompt: str = Field(min_length=1)
    history: list[QuestionAnswer] | list[ChatMessage] | None = None
    max_length: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, ge=0, le=1)
    temperature: float | None = Field(None, ge=0, le=2)
    seed: Seed | None = None
    session_id: SessionId | None = None


# ---------------------------------------------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _set_fields_only(self) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: the role once, then content; the last one is {}.
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tnlora"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TutorialResponse(BaseModel):
    response: str
    history: list[Any]
    status: int = 200
    time: str


__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "Completion",
    "CompletionRequest",
    "ModelList",
    "TutorialRequest",
    "TutorialResponse",
    "Unsupported",
    "UsageInfo",
    "error_body",
]
