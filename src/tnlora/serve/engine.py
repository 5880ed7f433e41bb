"""The serving engine: one scheduler thread owns the model and decodes every active request together.

A request's whole decoding state is one fixed-size state per layer and its position, so the decode batch is a
fixed set of ``max_batch`` slots (:class:`~tnlora.infer.decode_graph.DecodeStepRunner` buffers with a
position per row): a request joins by copying its prefilled state into a free slot and leaves by marking the
slot padded, at any step, without touching the others. Every step runs all slots (free ones padded: their
state only decays and their logits are ignored), so a row's decode arithmetic never depends on what the other
slots hold; prompts read together differ from prompts read alone only in the matrix products' summation order
(:mod:`tnlora.infer.prefill`). On a GPU the step is one
CUDA-graph replay (the fused decode kernels included); elsewhere the same step runs eagerly on the same buffers.

The loop: take new requests; prefill the waiting ones that free slots can take, together in one packed forward
(:mod:`tnlora.infer.prefill`; each from a stored session state when its prompt continues one:
:mod:`tnlora.serve.sessions`); sample their first token; launch
one decode step for all slots, sampling each active row on the device (greedy, or temperature / top-p with the
request's own generator); then, while it runs, turn the previous step's tokens into text
(:mod:`tnlora.serve.text`) and hand it to the requests' sinks. A request
ends on an eos id, a stop string, its token limit or cancellation (a client that went away); its slot is free
for the next step. Sinks are called on the scheduler thread and must not block (the server's hand the
event to an asyncio loop with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tnlora.infer.decode_graph import (
    DecodeStepRunner,
    defer_steps_error,
    installed_graphs,
    remove_graph_decoding,
)
from tnlora.infer.prefill import Prefilled, can_pack, packed_prefill
from tnlora.model.cache import TransnormerCache
from tnlora.serve.sessions import Checkpoint, SessionStore
from tnlora.serve.text import ReplyText

logger = logging.getLogger("tnlora.serve")

# Prompt tokens prefilled per scheduler iteration before the decode step runs (at least one request's worth):
# a burst of long prompts then delays the running replies by a bounded amount.
PREFILL_TOKENS_PER_STEP = 8192
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class EngineError(RuntimeError):
    """The engine cannot take the request (shut down, queue full)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature`` 0 is greedy."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (never part of the returned text)
    ignore_eos: bool = False  # neither eos ids nor the template's stop markers end the reply

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 <= self.top_p <= 1:
            raise ValueError("top_p must be in [0, 1]")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError("seed out of range")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens continued from a stored session, not prefilled

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Event:
    """What a request's sink receives: text, and at the end a finish reason ("stop", "length", "error")."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None


@dataclass(eq=False)
class Request:
    """A submitted request; ``cancel()`` is its only method for other threads."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    session_id: str | None
    stop_strings: list[str]
    engine: Engine
    submitted: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # Scheduler state.
    generated: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    slot: int | None = None
    text: ReplyText | None = None
    generator: torch.Generator | None = None
    prompt_states: list[Tensor] | None = None  # the states after the prompt (for the session)
    done: bool = False

    def cancel(self) -> None:
        """Stop generating (the client went away); the slot is freed at the scheduler's next step."""
        if not self.done:
            self.cancelled = True
            self.engine._wake(cancelled=True)


@dataclass
class _Step:
    """A launched decode step: the request of each slot when it ran, its tokens [B] (a pinned host buffer on a
    GPU, filled once ``copied`` has happened)."""

    rows: list[Request | None]
    tokens: Tensor
    copied: torch.cuda.Event | None = None


class Engine:
    """Owns the model; ``submit`` requests from any thread, ``start`` / ``shutdown`` the scheduler."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        eos_ids: Sequence[int],
        max_batch: int = 8,
        sessions: SessionStore | None = None,
        max_waiting: int = 1024,
        capture: bool | None = None,
        defer_steps: int = 0,
        fused_projections: bool = False,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if defer_steps_error(defer_steps):
            raise ValueError(f"defer_steps {defer_steps_error(defer_steps)}")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if installed_graphs(base) is not None:
            # The engine runs its own slot runner; a prefill of one token must not go to the per-batch runners.
            remove_graph_decoding(base)
        self.model = base
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        # Embedding rows past the tokenizer's vocabulary (padding to a multiple of 64) are never sampled.
        vocab = base.get_output_embeddings().out_features
        self.vocab = min(len(tokenizer), vocab) if len(tokenizer) > 0 else vocab
        self.device = next(base.parameters()).device
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.sessions = sessions if sessions is not None else SessionStore(self.device, 0, 0)
        self.capture = self.device.type == "cuda" if capture is None else capture
        # ``fused_projections``: the step as the fused projections of the slots' rows (the Triton kernel, plain
        # Linears, up to ROWS_MAX slots; the rows kernel that greedy generate() runs at 4 to 32 rows), else the
        # layer forwards with the GLU's projections side by side.
        self.runner = DecodeStepRunner(base, max_batch, self.device, self.capture, per_row_positions=True,
                                       branches=True, gemv=fused_projections, pdl=fused_projections)
        # The Triton step writing each slot's states back every defer_steps steps only (DecodeStepRunner.
        # enable_deferral; each placed row's base is its position, a finished row's states are made whole before
        # they are stored). tnlora serve's default turns it on from 16 slots (serve.server.options_from_args).
        self.deferred = defer_steps > 0 and self.runner.enable_deferral(defer_steps)
        # Prompts admitted together are read in one packed forward (infer.prefill) where the model allows it.
        self.packed = can_pack(base)
        self.slots: list[Request | None] = [None] * max_batch
        # The step in flight: launched, its tokens not yet taken (see _iteration). On a GPU its tokens come back
        # through one of two pinned buffers (the other holds the step before) and an event.
        self._in_flight: _Step | None = None
        self._host_buffers: list[Tensor] = []
        self._copied: list[torch.cuda.Event] = []
        if self.device.type == "cuda":
            self._host_buffers = [torch.zeros(max_batch, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self._copied = [torch.cuda.Event() for _ in range(2)]
        self._waiting: deque[Request] = deque()
        self._inbox: list[Request] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._purge = False  # a request was cancelled: drop the cancelled ones from the queue
        self._ids = itertools.count(1)
        # Counters (read by other threads for /health; plain ints).
        self.requests_finished = 0
        self.tokens_generated = 0
        self.prompt_tokens_prefilled = 0
        self.steps = 0
        self.prefill_rounds = 0  # scheduler rounds that read prompts (each one forward, packed or not)
        self.prefill_seconds = 0.0  # the scheduler's time in those rounds (up to their first tokens)
        self.idle_seconds = 0.0  # the scheduler's time with nothing to do (up to its last wait)
        self._idle_since: float | None = None  # when the wait going on now began
        self.errors = 0

    # ---------------------------------------------------------------------------------------------------
    # Any thread

    def start(self) -> Engine:
        """Prepare the decode step (capture its graph on a GPU) and start the scheduler thread."""
        if self._thread is not None:
            return self
        with torch.inference_mode():
            self._reset_slots()
            self._run()  # the capture (GPU) or a warm-up; scribbles on the buffers
            self._reset_slots()
        self._thread = threading.Thread(target=self._loop, name="tnlora-scheduler", daemon=True)
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the scheduler; unfinished requests end with an error event."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        sink: Callable[[Event], None],
        *,
        session_id: str | None = None,
        stop_strings: Sequence[str] = (),
    ) -> Request:
        """Queue a request; its events go to ``sink`` (on the scheduler thread). ``stop_strings``: the
        template's markers (ignored with ``params.ignore_eos``); ``params.stop`` is added to them."""
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        stops = [] if params.ignore_eos else [s for s in stop_strings if s]
        stops += [s for s in params.stop if s and s not in stops]
        request = Request(
            id=next(self._ids),
            prompt_ids=[int(i) for i in prompt_ids],
            params=params,
            sink=sink,
            session_id=session_id,
            stop_strings=stops,
            engine=self,
        )
        with self._cond:
            if not self.running:
                raise EngineError("the engine is not running")
            if len(self._waiting) + len(self._inbox) >= self.max_waiting:
                raise EngineError(f"too many requests waiting ({self.max_waiting}); try again later")
            self._inbox.append(request)
            self._cond.notify_all()
        return request

    def stats(self) -> dict[str, Any]:
        """Slot, queue and session counts (what /health shows)."""
        active = sum(r is not None for r in self.slots)
        return {
            "slots": {"total": self.max_batch, "active": active, "free": self.max_batch - active},
            "vocab": self.vocab,
            "waiting": len(self._waiting) + len(self._inbox),
            "sessions": self.sessions.counts(),
            "requests_finished": self.requests_finished,
            "tokens_generated": self.tokens_generated,
            "prompt_tokens_prefilled": self.prompt_tokens_prefilled,
            "decode_steps": self.steps,
            "prefill_rounds": self.prefill_rounds,
            "prefill_seconds": round(self.prefill_seconds, 6),
            "idle_seconds": round(self.idle_seconds + self._idle_now(), 6),
            "errors": self.errors,
        }

    def _has_work(self) -> bool:
        return bool(self._stopping or self._inbox or self._waiting or any(self.slots) or self._in_flight)

    def _idle_now(self) -> float:
        since = self._idle_since
        return time.perf_counter() - since if since is not None else 0.0

    def _wake(self, cancelled: bool = False) -> None:
        with self._cond:
            self._purge = self._purge or cancelled
            self._cond.notify_all()

    # ---------------------------------------------------------------------------------------------------
    # The scheduler thread

    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # a new thread starts on device 0
        with torch.inference_mode():
            while True:
                with self._cond:
                    if not self._has_work():
                        self._idle_since = time.perf_counter()
                        while not self._has_work():
                            self._cond.wait()
                        since, self._idle_since = self._idle_since, None
                        self.idle_seconds += time.perf_counter() - since
                    if self._stopping:
                        break
                    self._waiting.extend(self._inbox)
                    self._inbox.clear()
                    if self._purge:
                        self._purge = False
                        for request in [r for r in self._waiting if r.cancelled]:
                            request.done = True
                        self._waiting = deque(r for r in self._waiting if not r.cancelled)
                try:
                    self._iteration()
                except Exception:
                    # A failed decode step (e.g. out of memory) ends the requests in it, not the server.
                    logger.exception("decode step failed; ending the requests in the batch")
                    self._in_flight = None
                    for slot, request in enumerate(self.slots):
                        if request is not None:
                            self._free(slot)
                            self._emit(request, self._finish(request, "error", error="internal error while decoding"))
                    self._reset_slots()
        for request in [*self.slots, *self._waiting, *self._inbox]:
            if request is not None and not request.done:
                self._emit(request, self._finish(request, "error", error="the server is shutting down"))
        self.slots = [None] * self.max_batch
        self._waiting.clear()
        self._inbox.clear()

    def _iteration(self) -> None:
        """One scheduler round: drop cancelled requests, admit waiting ones, launch one decode step for all slots,
        then take the tokens of the step before it.

        Taking a step's tokens (text, stops, the sinks) after the next step is launched keeps the GPU busy
        while the host does that work. A request that ends at step t has therefore been fed its last token by
        step t + 1 (whose token for it is dropped): its session stores the prompt and every generated token.
        Each row's arithmetic is unchanged, so outputs are too."""
        for slot, request in enumerate(self.slots):
            if request is not None and request.cancelled:
                self._free(slot)
                request.done = True
        budget, admitted = PREFILL_TOKENS_PER_STEP, []
        while self._waiting and budget > 0 and len(admitted) < self.slots.count(None):
            request = self._waiting.popleft()
            if request.cancelled:
                request.done = True
                continue
            budget -= len(request.prompt_ids)
            admitted.append(request)
        if admitted:
            start = time.perf_counter()
            self._admit(admitted)
            self.prefill_seconds += time.perf_counter() - start
        launched = self._launch_step() if any(self.slots) else None
        previous, self._in_flight = self._in_flight, launched
        if previous is not None:
            self._take_tokens(previous)

    def _admit(self, requests: list[Request]) -> None:
        """Prefill ``requests`` (together, packed into one forward, where the model allows), sample each one's
        first token and give it a slot unless it is done."""
        try:
            out = self._prefill(requests)
        except Exception:
            logger.exception("prefill of requests %s failed", [r.id for r in requests])
            self._fail_prompts(requests)
            return
        self.prefill_rounds += 1
        rows, firsts = [], []
        for i, request in enumerate(requests):
            try:
                if request.session_id is not None and self.sessions.enabled:
                    request.prompt_states = [state[i].clone() for state in out.states]
                request.text = ReplyText(self.tokenizer, request.stop_strings)
                if request.params.temperature > 0:
                    request.generator = torch.Generator(device=self.device)
                    seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
                    request.generator.manual_seed(seed)
                firsts.append(self._sample(out.logits[i, : self.vocab], request))
                rows.append(i)
            except Exception:
                logger.exception("first token of request %d failed", request.id)
                self._fail_prompts([request])
        if not rows:
            return
        placed = [requests[i] for i in rows]
        try:
            # The first tokens come to the host together: one wait for the device, not one per request.
            tokens = torch.stack(firsts).tolist()
            states = out.states
            if len(rows) < len(requests):
                index = torch.tensor(rows, device=self.device)
                states = [state.index_select(0, index) for state in states]
        except Exception:
            logger.exception("first tokens of requests %s failed", [r.id for r in placed])
            self._fail_prompts(placed)
            return
        self._place(placed, tokens, states)

    def _fail_prompts(self, requests: list[Request]) -> None:
        """End ``requests``, not yet in a slot, with an error event."""
        for request in requests:
            self._emit(request, self._finish(request, "error", error="internal error while reading the prompt"))

    def _prefill(self, requests: list[Request]) -> Prefilled:
        """Each request's prompt read from its stored session state when it continues one (else from zero):
        the logits of each one's last token [N, vocab] and every layer's states after them [N, ...]."""
        starts, stored = [], []
        for request in requests:
            checkpoint = self._stored_session(request)
            starts.append(len(checkpoint.ids) if checkpoint is not None else 0)
            stored.append([s.to(self.device, non_blocking=True) for s in checkpoint.states] if checkpoint else None)
        fresh = [request.prompt_ids[start:] for request, start in zip(requests, starts)]
        for request, start, ids in zip(requests, starts, fresh):
            request.cached_tokens = start
            self.prompt_tokens_prefilled += len(ids)
        if self.packed:
            return packed_prefill(self.model, fresh, starts, stored)
        logits, states = [], []
        layers = range(len(self.runner.states))
        for ids, start, initial in zip(fresh, starts, stored):
            cache = TransnormerCache(self.model.config)
            for i, state in enumerate(initial or ()):
                cache.update_state(state[None], i)
            cache.seen_tokens = start
            out = self.model(input_ids=torch.tensor([ids], device=self.device), cache=cache, use_cache=True,
                             logits_to_keep=1)  # fmt: skip
            logits.append(out.logits[0, -1])
            states.append([cache.get_state(i)[0] for i in layers])
        return Prefilled(torch.stack(logits), [torch.stack([s[i] for s in states]) for i in layers])

    def _stored_session(self, request: Request) -> Checkpoint | None:
        """The stored session state ``request``'s prompt continues, if any (taken from the store)."""
        if request.session_id is None or not self.sessions.enabled:
            return None
        return self.sessions.take(request.session_id, request.prompt_ids)

    def _place(self, requests: list[Request], tokens: list[int], states: list[Tensor]) -> None:
        """Give each prefilled request a free slot holding its states (each layer's [N, ...], in the order of
        ``requests``) and its first token."""
        # The slots first, so that a request counts as active from its first token on.
        slots = [slot for slot, request in enumerate(self.slots) if request is None][: len(requests)]
        for request, slot in zip(requests, slots):
            request.slot = slot
            self.slots[slot] = request
        # A few batched copies instead of one per request and layer (the host's launches add up at 32 prompts).
        runner, device = self.runner, self.device
        index = torch.tensor(slots, device=device)
        for static, state in zip(runner.states, states):
            static.index_copy_(0, index, state.to(static.dtype))
        runner.position[index] = torch.tensor([len(r.prompt_ids) for r in requests], device=device)
        if self.deferred:
            runner.base[index] = runner.position[index]  # the placed states are whole at this position
        runner.ids[index, 0] = torch.tensor(tokens, device=device)
        runner.pad[index, 0] = False
        for row, (request, token) in enumerate(zip(requests, tokens)):
            final = self._accept(request, token)
            if final is not None:
                self._store_session(request, lambda row=row: [state[row] for state in states], 0)
                self._free(request.slot)
                self._emit(request, final)

    def _launch_step(self) -> _Step:
        """Run one decode step for all slots and sample each active row (on the device); on a GPU this returns
        once the work is queued."""
        runner = self.runner
        logits = self._run()[:, 0, : self.vocab]
        tokens = logits.argmax(dim=-1)
        rows = list(self.slots)
        for slot, request in enumerate(rows):
            if request is not None and request.params.temperature > 0:
                tokens[slot] = self._sample(logits[slot], request)
        runner.ids[:, 0].copy_(tokens)
        runner.position.add_(1)
        self.steps += 1
        if not self._host_buffers:
            return _Step(rows, tokens)
        buffer, copied = self._host_buffers[self.steps % 2], self._copied[self.steps % 2]
        buffer.copy_(tokens, non_blocking=True)
        copied.record(torch.cuda.current_stream(self.device))
        return _Step(rows, buffer, copied)

    def _take_tokens(self, step: _Step) -> None:
        """Hand each request of ``step`` its token; free the slots of the requests that ended."""
        if step.copied is not None:
            step.copied.synchronize()  # releases the GIL: the server's event loop runs meanwhile
        tokens = step.tokens.tolist()
        for slot, request in enumerate(step.rows):
            if request is None or request.done or request.cancelled:
                continue  # ended at an earlier step (this token is the one fed after its end), or cancelled
            final = self._accept(request, tokens[slot])
            if final is not None:
                # The launched step fed this last token: the states after it are the states after the reply.
                self._store_session(request, lambda slot=slot: self.runner.row_states(slot), len(request.generated))
                self._free(slot)
                self._emit(request, final)

    def _run(self) -> Tensor:
        """The runner's step on its buffers (recorded, on a GPU, at the first call, with deferred writes where
        the engine has them)."""
        with self.runner.deferring(self.deferred):
            return self.runner.run(self.model)

    def _sample(self, logits: Tensor, request: Request) -> Tensor:
        """The next token (0-dim) from one row of logits: argmax at temperature 0, else a draw from the
        temperature-scaled distribution cut to its top-p mass, with the request's generator."""
        params = request.params
        if params.temperature == 0:
            return logits.argmax()
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1:
            probs, order = probs.sort(descending=True)
            # Keep the smallest head whose mass reaches top_p (at least the most probable token).
            outside = probs.cumsum(0) - probs >= params.top_p
            outside[0] = False
            probs = probs.masked_fill(outside, 0)
            return order[torch.multinomial(probs, 1, generator=request.generator)[0]]
        return torch.multinomial(probs, 1, generator=request.generator)[0]

    def _accept(self, request: Request, token: int) -> Event | None:
        """Add a sampled token to ``request`` and hand its text to the sink; when the request is done, its last
        event instead (emitted by the caller once the slot is free and the session stored)."""
        request.generated.append(token)
        self.tokens_generated += 1
        params = request.params
        text = request.text
        assert text is not None
        if token in self.eos_ids and not params.ignore_eos:
            return self._finish(request, "stop", text.finish())
        delta = text.push(token)
        if text.stopped:
            return self._finish(request, "stop", delta)
        if len(request.generated) >= params.max_tokens:
            return self._finish(request, "length", delta + text.finish())
        if delta:
            self._emit(request, Event(text=delta))
        return None

    def _finish(self, request: Request, reason: str, text: str = "", error: str | None = None) -> Event:
        """Mark ``request`` done; its last event (for the caller to emit)."""
        request.done = True
        if reason == "error":
            self.errors += 1
        else:
            self.requests_finished += 1
        usage = Usage(len(request.prompt_ids), len(request.generated), request.cached_tokens)
        return Event(text=text, finish_reason=reason, usage=usage, error=error)

    def _emit(self, request: Request, event: Event) -> None:
        try:
            request.sink(event)
        except Exception:
            # A sink whose consumer is gone (e.g. its event loop closed): the request is abandoned.
            logger.debug("sink of request %d failed; cancelling it", request.id, exc_info=True)
            request.cancelled = True

    def _store_session(self, request: Request, states: Callable[[], list[Tensor]], fed: int) -> None:
        """Keep the finished request's states (``states()``: every layer's) for its session: after the prompt and
        the first ``fed`` generated tokens; and the checkpoint taken after the prompt alone. The states are read
        only for a request with a session (with deferred writes that is a few kernels a layer)."""
        if request.session_id is None or not self.sessions.enabled or request.cancelled:
            return
        checkpoints = [Checkpoint(request.prompt_ids + request.generated[:fed], [s.clone() for s in states()])]
        if request.prompt_states is not None and fed > 0:
            checkpoints.append(Checkpoint(list(request.prompt_ids), request.prompt_states))
        request.prompt_states = None
        self.sessions.put(request.session_id, checkpoints)

    def _free(self, slot: int) -> None:
        request = self.slots[slot]
        if request is not None:
            request.prompt_states = None
        self.slots[slot] = None
        self.runner.pad[slot, 0] = True

    def _reset_slots(self) -> None:
        """Every slot free and zeroed (after the capture, or a failed step)."""
        runner = self.runner
        for state in runner.states:
            state.zero_()
        runner.ids.zero_()
        runner.position.zero_()
        if runner.base is not None:
            runner.base.zero_()
        runner.pad.fill_(True)


__all__ = ["Engine", "EngineError", "Event", "Request", "SamplingParams", "Usage"]
