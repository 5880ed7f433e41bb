"""The FastAPI application: the gate (API key, body size), OpenAI-style errors, /health, and the routes.

The routes (``openai.py``, ``tutorial.py``, ``page.py``) turn requests into engine calls through
:class:`EngineStream`, which hands the engine's events from its scheduler thread to the request's asyncio loop.
A client that goes away cancels its engine request: streamed responses watch for the disconnect beside the
stream (:class:`EventStreamResponse`), whole responses beside the wait (:func:`collect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse

from tnlora.serve.engine import Engine, EngineError, Event, SamplingParams
from tnlora.serve.protocol import Unsupported, error_body

logger = logging.getLogger("tnlora.serve")

# Paths served without the API key (GET only): the health check and the chat page (which asks for the key).
OPEN_PATHS = frozenset({"/health", "/chat", "/"})
MiB = 1 << 20


@dataclass
class ServeConfig:
    """The server's settings (the ``tnlora serve`` options)."""

    model_name: str
    api_key: str | None = None
    max_prompt_tokens: int = 16384
    default_max_tokens: int = 512  # a chat request that names no limit (text completions: OpenAI's 16)
    max_tokens_limit: int = 8192
    default_temperature: float = 0.7  # tnlora chat's defaults
    default_top_p: float = 0.9
    max_body_bytes: int = 4 * MiB


@dataclass
class ServeContext:
    """What the routes need: the engine, and how to turn messages into prompt ids."""

    engine: Engine
    tokenizer: Any
    template: Any
    system: str | None
    config: ServeConfig
    created: int = 0


class ApiError(Exception):
    """A refused request: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error") -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def context(request: Request) -> ServeContext:
    return request.app.state.serve


# ---------------------------------------------------------------------------------------------------------------
# From the engine's thread to the request's loop


class LoopRelay:
    """Hands events from the scheduler thread to one asyncio loop in batches.

    A decode step produces an event for every active request at once; waking the loop once for all of them
    (instead of one ``call_soon_threadsafe`` each) keeps the loop's share of the host small, and the host's
    time is what the scheduler thread needs to keep the device busy."""

    _relays: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopRelay]] = weakref.WeakKeyDictionary()
    _relays_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # a strong one would keep the loop (the registry's key) alive
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Event], Event]] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> LoopRelay:
        with cls._relays_lock:
            relay = cls._relays.get(loop)
            if relay is None:
                relay = cls._relays[loop] = cls(loop)
            return relay

    def put(self, queue: asyncio.Queue[Event], event: Event) -> None:
        """Queue ``event`` for ``queue`` (any thread); raises when the loop is closed."""
        with self._lock:
            wake = not self._pending
            self._pending.append((queue, event))
        if wake:
            try:
                loop = self._loop()
                if loop is None:
                    raise RuntimeError("the event loop is gone")
                loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:
                with self._lock:
                    self._pending.clear()  # the next put tries (and fails) again: its request is cancelled
                raise

    def _deliver(self) -> None:  # the loop's thread
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


class EngineStream:
    """One engine request whose events arrive in an ``asyncio.Queue`` of the calling loop."""

    def __init__(
        self,
        engine: Engine,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        session_id: str | None = None,
        stop_strings: Sequence[str] = (),
    ) -> None:
        self._relay = LoopRelay.of(asyncio.get_running_loop())
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        try:
            self.request = engine.submit(
                prompt_ids, params, self._sink, session_id=session_id, stop_strings=stop_strings
            )
        except EngineError as exc:
            raise ApiError(503, str(exc), code="server_busy", type_="server_error") from None

    def _sink(self, event: Event) -> None:  # the scheduler thread
        self._relay.put(self._queue, event)

    async def events(self) -> AsyncIterator[Event]:
        """The request's events up to its last one; leaving early (or being cancelled) cancels it. Events that
        queued up while the consumer was busy come as one (their texts joined): under load the server writes
        fewer, longer chunks instead of falling behind."""
        try:
            while True:
                event = await self._queue.get()
                while event.finish_reason is None and not self._queue.empty():
                    following = self._queue.get_nowait()
                    event = dataclasses.replace(following, text=event.text + following.text)
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.request.cancel()

    def cancel(self) -> None:
        self.request.cancel()


@dataclass
class Reply:
    text: str
    finish_reason: str
    usage: Any
    error: str | None


async def collect(stream: EngineStream, request: Request) -> Reply | None:
    """The whole reply, or None when the client disconnected first (the engine request is then cancelled)."""

    async def gather() -> Reply:
        parts: list[str] = []
        async for event in stream.events():
            parts.append(event.text)
            if event.finish_reason is not None:
                return Reply("".join(parts), event.finish_reason, event.usage, event.error)
        raise RuntimeError("the engine ended a request without a finish event")

    reply = asyncio.ensure_future(gather())
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({reply, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not reply.done():
            reply.cancel()
            stream.cancel()
    return reply.result() if reply.done() and not reply.cancelled() else None


async def _disconnected(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop (cancelling the generator, hence the engine request) as soon as the client
    disconnects, whether or not anything is being sent at that moment."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], status_code: int = 200) -> None:
        super().__init__(content, status_code, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                with contextlib.suppress(OSError):  # the client went away while we wrote
                    await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await _disconnected(receive)
            group.cancel_scope.cancel()


def sse(payload: Any) -> str:
    """One server-sent event carrying ``payload`` (a JSON string or an object to dump)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------------------------
# The gate: before anything reads the request


class Gate:
    """ASGI middleware: the API key (constant-time compare), then the body size limit, checked on the declared
    Content-Length and on the bytes actually received, before the request reaches the app (which then reads
    the body from memory)."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        if self.api_key is not None and not self._open(scope) and not self._authorized(headers):
            await _send_error(send, 401, "invalid or missing API key (send Authorization: Bearer <key>)",
                              code="invalid_api_key", type_="authentication_error")  # fmt: skip
            return
        declared = headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await _send_error(send, 400, "malformed Content-Length header")
                return
            if size > self.max_body_bytes:
                await self._too_large(send)
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                await self._too_large(send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect

        await self.app(scope, replay, send)

    @staticmethod
    def _open(scope: Any) -> bool:
        return scope["method"] in ("GET", "HEAD") and scope["path"] in OPEN_PATHS

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        scheme, _, token = headers.get("authorization", b"").partition(b" ")
        assert self.api_key is not None
        return hmac.compare_digest(token.strip(), self.api_key) and scheme.lower() == b"bearer"

    async def _too_large(self, send: Any) -> None:
        await _send_error(send, 413, f"request body over the limit of {self.max_body_bytes} bytes",
                          code="request_too_large")  # fmt: skip


async def _send_error(send: Any, status: int, message: str, code: str | None = None,
                      type_: str = "invalid_request_error") -> None:  # fmt: skip
    body = json.dumps(error_body(message, type_, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "tuple"}


def _param(loc: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "role")`` → ``messages[0].role`` (pydantic's union-member tags dropped)."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in str(part) or "-" in str(part):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    # The most specific error: pydantic reports one per member of a union (str | list[...]), the deepest is the
    # one that names what is wrong (messages[0].content[0].type rather than "not a string").
    first = max(errors, key=lambda e: len(_param(e.get("loc", ())) or ""))
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return f"malformed JSON body{': ' + str(detail) if detail else ''}", None
    param = _param(first.get("loc", ()))
    if param is None:
        return "the request body must be a JSON object", None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{param}: {message}", param


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    async def unsupported(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Unsupported)
        return JSONResponse(error_body(exc.message, param=exc.param), status_code=400)

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(message, code=code), status_code=exc.status_code, headers=exc.headers)

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body("internal server error", "server_error"), status_code=500)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(Unsupported, unsupported)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal)


# ---------------------------------------------------------------------------------------------------------------
# The app


def create_app(ctx: ServeContext) -> FastAPI:
    """The server's FastAPI app around a started engine (the caller starts and shuts down the engine)."""
    from tnlora.serve import openai, page, tutorial
    from tnlora.serve.protocol import now

    ctx.created = ctx.created or now()
    app = FastAPI(title="tnlora serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = ctx
    install_error_handlers(app)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        engine = context(request).engine
        return {"status": "ok" if engine.running else "stopped", "model": ctx.config.model_name, **engine.stats()}

    app.include_router(openai.router)
    app.include_router(tutorial.router)
    app.include_router(page.router)
    app.add_middleware(Gate, api_key=ctx.config.api_key, max_body_bytes=ctx.config.max_body_bytes)
    return app


__all__ = ["ApiError", "EngineStream", "Gate", "ServeConfig", "ServeContext", "collect", "create_app"]
