"""The tutorial series' API: ``POST /`` with ``{"prompt": ...}`` → ``{"response", "history", "status", "time"}``.

The FastAPI deployment that tutorials give TransNormerLLM (and ChatGLM and the other models of the series) reads
``prompt`` and, in the series' fuller form, ``history``, ``max_length``, ``top_p`` and ``temperature``; its
``curl`` and ``requests`` examples work here unchanged. All four take effect: ``history`` holds the earlier
turns (``[[question, answer], …]`` as those tutorials return it, or ``[{"role", "content"}, …]``),
``max_length`` bounds the prompt and the reply together in tokens (the series' ``model.chat`` meaning; default
2048), ``top_p`` and ``temperature`` default to the series' 0.7 and 0.95, and ``temperature`` 0 is greedy.
The answer's ``history`` is the request's plus this turn, in the form the request used.
"""

from __future__ import annotations

import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tnlora.infer.generate import stop_settings
from tnlora.serve.app import ApiError, EngineStream, collect, context
from tnlora.serve.engine import SamplingParams
from tnlora.serve.openai import chat_prompt_ids, session_id
from tnlora.serve.protocol import ChatMessage, TutorialRequest, TutorialResponse

router = APIRouter()
DEFAULT_MAX_LENGTH = 2048
DEFAULT_TOP_P = 0.7
DEFAULT_TEMPERATURE = 0.95


@router.post("/")
async def tutorial_chat(body: TutorialRequest, request: Request) -> Response:
    ctx = context(request)
    pairs = not body.history or isinstance(body.history[0], list)
    messages = _messages(body)
    ids = chat_prompt_ids(ctx, messages, param="prompt")
    max_length = body.max_length if body.max_length is not None else DEFAULT_MAX_LENGTH
    if len(ids) >= max_length:
        raise ApiError(400, f"max_length: the prompt with its history is already {len(ids)} tokens, at least "
                       f"max_length {max_length}", param="max_length")  # fmt: skip
    params = SamplingParams(
        max_tokens=min(max_length - len(ids), ctx.config.max_tokens_limit),
        temperature=body.temperature if body.temperature is not None else DEFAULT_TEMPERATURE,
        top_p=body.top_p if body.top_p is not None else DEFAULT_TOP_P,
        seed=body.seed,
    )
    _, template_stops = stop_settings(ctx.tokenizer, ctx.template)
    stream = EngineStream(ctx.engine, ids, params, session_id=session_id(request, body.session_id),
                          stop_strings=template_stops)  # fmt: skip
    reply = await collect(stream, request)
    if reply is None:
        return Response(status_code=499)
    if reply.error is not None:
        raise ApiError(500, reply.error, type_="server_error")
    history: list[Any] = [list(turn) if pairs else turn.model_dump(exclude_none=True) for turn in body.history or []]
    if pairs:
        history.append([body.prompt, reply.text])
    else:
        history += [{"role": "user", "content": body.prompt}, {"role": "assistant", "content": reply.text}]
    answer = TutorialResponse(
        response=reply.text, history=history, time=datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    )
    return Response(answer.model_dump_json(), media_type="application/json")


def _messages(body: TutorialRequest) -> list[ChatMessage]:
    """The chat of a tutorial request: its history, then the prompt."""
    out: list[ChatMessage] = []
    for turn in body.history or []:
        if isinstance(turn, ChatMessage):
            out.append(turn)
        else:
            question, answer = turn
            out += [ChatMessage(role="user", content=question), ChatMessage(role="assistant", content=answer)]
    out.append(ChatMessage(role="user", content=body.prompt))
    return out
