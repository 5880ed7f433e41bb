"""OpenAI's routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``.

Chat messages are rendered with the adapter's template exactly as training rendered them
(:func:`tnlora.infer.generate.prompt_ids`); a leading system (or developer) message replaces the adapter's
system prompt. Text completions tokenize the prompt as it is (no template, no BOS). The answer's text never
contains a stop string (the template's markers or the request's ``stop``); ``finish_reason`` is "stop" for an
eos or a stop string and "length" for the token limit; ``usage`` counts the rendered prompt's tokens, the
generated tokens, and in ``prompt_tokens_details.cached_tokens`` the prompt tokens continued from a session.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tnlora.infer.generate import prompt_ids, stop_settings
from tnlora.serve.app import ApiError, EngineStream, EventStreamResponse, ServeContext, collect, context, sse
from tnlora.serve.engine import SamplingParams, Usage
from tnlora.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    UsageInfo,
    error_body,
    new_id,
    now,
)

router = APIRouter()
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for text completions


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    ctx = context(request)
    return ModelList(data=[ModelCard(id=ctx.config.model_name, created=ctx.created)])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = context(request)
    body.check_supported()
    check_model(ctx, body.model)
    ids = chat_prompt_ids(ctx, body.messages)
    params = sampling_params(ctx, body, body.requested_max_tokens(), ctx.config.default_max_tokens)
    _, template_stops = stop_settings(ctx.tokenizer, ctx.template)
    stream = EngineStream(ctx.engine, ids, params, session_id=session_id(request, body.session_id),
                          stop_strings=template_stops)  # fmt: skip
    reply_id, created = new_id("chatcmpl"), now()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(_chat_events(stream, reply_id, created, ctx.config.model_name, include_usage))
    reply = await collect(stream, request)
    if reply is None:
        return Response(status_code=499)  # the client has gone; nobody reads this
    if reply.error is not None:
        raise ApiError(500, reply.error, type_="server_error")
    return Response(
        ChatCompletion(
            id=reply_id,
            created=created,
            model=ctx.config.model_name,
            choices=[ChatChoice(message=AssistantMessage(content=reply.text), finish_reason=reply.finish_reason)],
            usage=usage_info(reply.usage),
        ).model_dump_json(),
        media_type="application/json",
    )


async def _chat_events(
    stream: EngineStream, reply_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    exclude = None if include_usage else {"usage"}

    def chunk(delta: Delta, finish_reason: str | None = None) -> str:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish_reason)
        return sse(ChatCompletionChunk(id=reply_id, created=created, model=model, choices=[choice])
                   .model_dump_json(exclude=exclude))  # fmt: skip

    yield chunk(Delta(role="assistant", content=""))
    async for event in stream.events():
        if event.error is not None:
            yield sse(error_body(event.error, "server_error"))
            break
        if event.text:
            yield chunk(Delta(content=event.text))
        if event.finish_reason is not None:
            yield chunk(Delta(), event.finish_reason)
            if include_usage:
                last = ChatCompletionChunk(id=reply_id, created=created, model=model, choices=[],
                                           usage=usage_info(event.usage))  # fmt: skip
                yield sse(last.model_dump_json())
    yield "data: [DONE]\n\n"


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    ctx = context(request)
    body.check_supported()
    check_model(ctx, body.model)
    ids = completion_prompt_ids(ctx, body.prompt)
    params = sampling_params(ctx, body, body.requested_max_tokens(), COMPLETIONS_DEFAULT_MAX_TOKENS)
    stream = EngineStream(ctx.engine, ids, params, session_id=session_id(request, body.session_id))
    reply_id, created = new_id("cmpl"), now()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(
            _completion_events(stream, reply_id, created, ctx.config.model_name, include_usage)
        )
    reply = await collect(stream, request)
    if reply is None:
        return Response(status_code=499)
    if reply.error is not None:
        raise ApiError(500, reply.error, type_="server_error")
    return Response(
        Completion(
            id=reply_id,
            created=created,
            model=ctx.config.model_name,
            choices=[CompletionChoice(text=reply.text, finish_reason=reply.finish_reason)],
            usage=usage_info(reply.usage),
        ).model_dump_json(),
        media_type="application/json",
    )


async def _completion_events(
    stream: EngineStream, reply_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[str]:
    exclude = None if include_usage else {"usage"}

    def chunk(text: str, finish_reason: str | None = None, usage: Usage | None = None) -> str:
        choices = [] if usage is not None else [CompletionChoice(text=text, finish_reason=finish_reason)]
        body = Completion(id=reply_id, created=created, model=model, choices=choices,
                          usage=usage_info(usage) if usage is not None else None)  # fmt: skip
        return sse(body.model_dump_json(exclude=exclude if usage is None else None))

    async for event in stream.events():
        if event.error is not None:
            yield sse(error_body(event.error, "server_error"))
            break
        if event.text or event.finish_reason is not None:
            yield chunk(event.text, event.finish_reason)
        if event.finish_reason is not None and include_usage:
            yield chunk("", usage=event.usage)
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------------------------
# Shared by the routes (the tutorial's too)


def check_model(ctx: ServeContext, name: str | None) -> None:
    """An unknown model name is a 404, as OpenAI answers it; no name means the served model."""
    if name is not None and name != ctx.config.model_name:
        raise ApiError(404, f"model: '{name}' does not exist here (this server serves '{ctx.config.model_name}')",
                       param="model", code="model_not_found")  # fmt: skip


def chat_turns(messages: list[ChatMessage]) -> tuple[str | None, list[dict[str, str]]]:
    """(system text or None, user/assistant turns) of OpenAI messages: a system message is taken only first,
    consecutive messages of one role are joined, and the turns must run user, assistant, …, user."""
    system = None
    rest = list(enumerate(messages))
    if rest and rest[0][1].role in ("system", "developer"):
        system = rest[0][1].text()
        rest = rest[1:]
    turns: list[dict[str, str]] = []
    for i, message in rest:
        if message.role in ("system", "developer"):
            raise ApiError(400, f"messages[{i}].role: a system message is only supported as the first message",
                           param=f"messages[{i}].role")  # fmt: skip
        if message.role == "user" and message.content is None:
            raise ApiError(400, f"messages[{i}].content: a user message needs content",
                           param=f"messages[{i}].content")  # fmt: skip
        if turns and turns[-1]["role"] == message.role:
            turns[-1]["content"] += "\n" + message.text()
        else:
            turns.append({"role": message.role, "content": message.text()})
    if not turns or turns[0]["role"] != "user":
        raise ApiError(400, "messages: the conversation must start with a user message (after an optional "
                       "system message)", param="messages")  # fmt: skip
    if turns[-1]["role"] != "user":
        raise ApiError(400, "messages: the last message must be the user's", param="messages")
    return system, turns


def chat_prompt_ids(ctx: ServeContext, messages: list[ChatMessage], param: str = "messages") -> list[int]:
    """Prompt ids of a chat, rendered as training rendered it; refused over --max_prompt_tokens."""
    system, turns = chat_turns(messages)
    ids = prompt_ids(ctx.tokenizer, ctx.template, turns, system if system is not None else ctx.system)
    check_prompt_length(ctx, ids, param)
    return ids


def completion_prompt_ids(ctx: ServeContext, prompt: str | list[str] | list[int]) -> list[int]:
    if isinstance(prompt, list) and isinstance(prompt[0], int):
        ids = [int(i) for i in prompt]
        vocab = ctx.engine.model.get_input_embeddings().num_embeddings
        if any(not 0 <= i < vocab for i in ids):
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
    else:
        text = prompt if isinstance(prompt, str) else prompt[0]
        ids = list(ctx.tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise ApiError(400, "prompt: must not be empty", param="prompt")
    check_prompt_length(ctx, ids, "prompt")
    return ids


def check_prompt_length(ctx: ServeContext, ids: list[int], param: str) -> None:
    limit = ctx.config.max_prompt_tokens
    if len(ids) > limit:
        raise ApiError(400, f"{param}: the prompt is {len(ids)} tokens, over this server's limit of {limit} "
                       "(--max_prompt_tokens)", param=param, code="context_length_exceeded")  # fmt: skip


def sampling_params(ctx: ServeContext, body: Any, max_tokens: int | None, default_max_tokens: int) -> SamplingParams:
    """The engine's parameters of a request, with the server's defaults for what it leaves out."""
    limit = ctx.config.max_tokens_limit
    if max_tokens is not None and max_tokens > limit:
        name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) is not None else "max_tokens"
        raise ApiError(400, f"{name}: {max_tokens} is over this server's limit of {limit}", param=name)
    temperature = body.temperature if body.temperature is not None else ctx.config.default_temperature
    top_p = body.top_p if body.top_p is not None else ctx.config.default_top_p
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else min(default_max_tokens, limit),
        temperature=temperature,
        top_p=top_p,
        seed=body.seed,
        stop=body.stop_strings(),
        ignore_eos=body.ignore_eos,
    )


def session_id(request: Request, from_body: str | None) -> str | None:
    """The request's session: the body's ``session_id``, else the ``X-Session-Id`` header."""
    if from_body is not None:
        return from_body
    header = request.headers.get("x-session-id")
    if header is not None and not 0 < len(header) <= 256:
        raise ApiError(400, "X-Session-Id: must be 1 to 256 characters", param="X-Session-Id")
    return header


def usage_info(usage: Usage | None) -> UsageInfo:
    usage = usage or Usage(0, 0, 0)
    return UsageInfo(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )
