"""Load a model for serving and run the server: what ``tnlora serve`` does."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tnlora.errors import TnloraError
from tnlora.infer.decode_graph import defer_steps_error, defer_steps_for, fused_batch
from tnlora.infer.generate import stop_settings
from tnlora.ops.gemv import ROWS_MAX
from tnlora.serve.app import ServeConfig, ServeContext, create_app
from tnlora.serve.engine import Engine
from tnlora.serve.sessions import SessionStore

SWITCH_INTERVAL_S = 0.001


@dataclass
class EngineOptions:
    """The engine's sizes (``tnlora serve`` options)."""

    max_batch: int = 16
    max_sessions: int = 64  # conversations whose states stay on the model's device
    host_sessions: int = 256  # and then in (pinned) host memory, before the least recent is dropped
    defer_steps: int = 0  # recurrent states written back every that many decode steps (0: every step)
    fused_projections: bool = False  # the decode step as fused projections of the slots' rows (Engine)


def build_context(loaded: Any, config: ServeConfig, options: EngineOptions) -> ServeContext:
    """A started engine around ``loaded`` (:func:`tnlora.infer.loading.load_for_inference`'s result) and the
    context the app's routes read."""
    # The scheduler thread shares the interpreter lock with the server's event loop. With many streams the
    # loop is busy, and a thread waiting for the lock gets it after the switch interval (5 ms by default,
    # about one 7B decode step): a shorter interval lets the scheduler launch the next step on time.
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
    eos_ids, _ = stop_settings(loaded.tokenizer, loaded.template)
    sessions = SessionStore(loaded.device, options.max_sessions, options.host_sessions)
    engine = Engine(loaded.model, loaded.tokenizer, eos_ids=eos_ids, max_batch=options.max_batch, sessions=sessions,
                    defer_steps=options.defer_steps, fused_projections=options.fused_projections)
    engine.start()
    return ServeContext(engine, loaded.tokenizer, loaded.template, loaded.system, config)


def default_model_name(model: str | None, adapter: str | None) -> str:
    """The adapter's directory name, else the base model's (a preset name or a directory's name)."""
    for source in (adapter, model):
        if source:
            path = Path(source).resolve() if Path(source).exists() else Path(source)
            return path.name or str(source)
    return "tnlora"


def options_from_args(args: Any) -> tuple[ServeConfig, EngineOptions]:
    """The server's settings from ``tnlora serve``'s arguments, checked; the key from ``$TNLORA_API_KEY`` when
    ``--api_key`` is not given."""
    for name in ("port", "max_batch", "max_prompt_tokens", "max_tokens", "max_tokens_limit"):
        if getattr(args, name) < 1:
            raise TnloraError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    for name in ("max_sessions", "host_sessions"):
        if getattr(args, name) < 0:
            raise TnloraError(f"--{name}: must be >= 0, got {getattr(args, name)}")
    # Unset: as greedy generate() defers (7B at 32 slots: +6 %, RESULTS.md "Serving").
    defer_steps = defer_steps_for(args.max_batch) if args.defer_steps is None else args.defer_steps
    if defer_steps_error(defer_steps):
        raise TnloraError(f"--defer_steps: {defer_steps_error(defer_steps)}")
    if args.fused_projections and args.max_batch > ROWS_MAX:
        raise TnloraError(f"--fused_projections: at most {ROWS_MAX} slots (--max_batch), got {args.max_batch}")
    # Unset: as greedy generate() steps (1, 4 to 32 slots; 7B +0.6 to +11.5 % at 16 and 32, RESULTS.md "Serving").
    fused = fused_batch(args.max_batch) if args.fused_projections is None else args.fused_projections
    if not 0 <= args.temperature <= 2:
        raise TnloraError(f"--temperature: must be in [0, 2], got {args.temperature}")
    if not 0 <= args.top_p <= 1:
        raise TnloraError(f"--top_p: must be in [0, 1], got {args.top_p}")
    config = ServeConfig(
        model_name=args.served_model_name or default_model_name(args.model, args.adapter),
        api_key=args.api_key or os.environ.get("TNLORA_API_KEY") or None,
        max_prompt_tokens=args.max_prompt_tokens,
        default_max_tokens=min(args.max_tokens, args.max_tokens_limit),
        max_tokens_limit=args.max_tokens_limit,
        default_temperature=args.temperature,
        default_top_p=args.top_p,
    )
    options = EngineOptions(max_batch=args.max_batch, max_sessions=args.max_sessions, host_sessions=args.host_sessions,
                            defer_steps=defer_steps, fused_projections=fused)
    return config, options


def run_server(loaded: Any, config: ServeConfig, options: EngineOptions, host: str, port: int) -> None:
    """Serve until interrupted (uvicorn handles SIGINT / SIGTERM), then stop the engine."""
    import uvicorn

    ctx = build_context(loaded, config, options)
    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"warning: serving on {host} without an API key (set --api_key or TNLORA_API_KEY)", file=sys.stderr)
    print(f"tnlora serve: {config.model_name} on http://{host}:{port} (chat page: /chat, max_batch "
          f"{options.max_batch}, device {loaded.device})", file=sys.stderr)  # fmt: skip
    try:
        uvicorn.run(create_app(ctx), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        ctx.engine.shutdown()
