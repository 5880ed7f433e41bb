"""`tnlora serve` under load: N concurrent streaming clients of the `openai` package against a live server.

For each N (``--clients``, default 1,8,32,64) every client sends ``--requests`` streamed text completions one
after the other (a random ``--prompt_tokens``-token prompt, ``--max_tokens`` new tokens, greedy, ``ignore_eos``:
the shape of ``tnlora bench decode``, prompt 64 and 128 new tokens by default) and the script prints one row:
aggregate tokens/s (completion tokens of all requests ÷ first send to last end), time to first token (send →
first chunk with text) p50 / p99, and inter-token latency (gap between a reply's consecutive text chunks: one
token each unless the server sent several at once) p50 / p99; and from the server's /health counters over the
timed load, where its time went: decode steps, tokens generated a step (how full the batch ran), the rounds
that read prompts, and the scheduler's seconds in those rounds and with nothing to do. The clients run in
``--client_procs`` processes (default one per 16 clients) so that the clients' own parsing does not set the
figures.

Then the sessions run (``--turns``, default 50; 0 skips it): one chat of that many turns, each a
``--turn_tokens`` user message and a ``--reply_tokens`` reply, with and without a session id; it prints the
time to first token at turns 1, 10, 25 and the last, and the prompt / continued tokens of the last turn.

Without ``--url`` the script starts the server itself on 127.0.0.1 (a subprocess; one per N when
``--max_batch clients``, the default: max_batch = N), a preset with random weights built directly on the
device (bf16 on CUDA) and the Baichuan tokenizer from ../shared when present (else the byte tokenizer), or
a checkpoint directory / adapter as `tnlora serve` loads it.

    python benchmarks/serve_bench.py --model 7B --device cuda            # the GPU run
    python benchmarks/serve_bench.py --model tiny --device cpu --clients 2 --requests 2 --turns 3   # smoke
    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --api_key KEY   # a server already running
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The Baichuan tokenizer from shared/ beside the repository (or inside it, as a device copy lays it out).
SHARED_TOKENIZER = next(
    (d for d in (ROOT.parent / "shared" / "tokenizers" / "baichuan-7b", ROOT / "shared" / "tokenizers" / "baichuan-7b")
     if (d / "tokenizer.model").is_file()),
    ROOT.parent / "shared" / "tokenizers" / "baichuan-7b",
)  # fmt: skip
MODEL_NAME = "bench"
WORDS = ("time", "river", "light", "stone", "answer", "garden", "city", "music", "number", "window", "story",
         "question", "market", "winter", "paper", "bridge")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--api_key", default=os.environ.get("TNLORA_API_KEY"))
    p.add_argument("--model", default="tiny", help="preset (random weights) or checkpoint dir")
    p.add_argument("--adapter")
    p.add_argument("--device", default="cuda", help="the server's device")
    p.add_argument("--tokenizer", help=f"for presets (default: {SHARED_TOKENIZER} when present, else bytes)")
    p.add_argument("--clients", default="1,8,32,64")
    p.add_argument("--requests", type=int, default=4, help="streamed requests per client, one after the other")
    p.add_argument("--prompt_tokens", type=int, default=64)
    p.add_argument("--max_tokens", type=int, default=128)
    p.add_argument("--max_batch", default="clients", help="the server's slots: a number, or 'clients' (= N)")
    p.add_argument("--defer_steps", type=int, default=None,
                   help="the server's --defer_steps (recurrent states written back every N steps; 0: every step; "
                        "default: tnlora serve's, 4 from 16 slots)")
    p.add_argument("--fused_projections", action=argparse.BooleanOptionalAction, default=None,
                   help="the server's --fused_projections (decode steps as fused projections of the slots' rows; "
                        "default: tnlora serve's, with 1 or 4 to 32 slots)")
    p.add_argument("--client_procs", type=int, default=0, help="client processes (default: one per 16 clients)")
    p.add_argument("--turns", type=int, default=50, help="turns of the sessions run (0: skip it)")
    p.add_argument("--turn_tokens", type=int, default=32, help="about this many tokens per user message")
    p.add_argument("--reply_tokens", type=int, default=16)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # internal: be the server
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# The server (a subprocess of the benchmark)


def serve(args: argparse.Namespace) -> None:
    """Run the server in this process until killed."""
    import torch
    import uvicorn

    from tnlora.data.templates import get_template
    from tnlora.infer.decode_graph import defer_steps_for, fused_batch
    from tnlora.infer.loading import InferenceModel, load_for_inference
    from tnlora.model.configuration import PRESETS
    from tnlora.model.tokenizer import ByteTokenizer, load_tokenizer
    from tnlora.serve.app import ServeConfig, create_app
    from tnlora.serve.server import EngineOptions, build_context

    if args.model in PRESETS and args.adapter is None:
        from tnlora.bench.common import random_model as build_model

        model = build_model(args.model, "auto", args.device).eval()
        model.config.use_cache = True
        tokenizer_dir = args.tokenizer or (str(SHARED_TOKENIZER) if SHARED_TOKENIZER.is_dir() else None)
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir and args.model != "tiny" else ByteTokenizer()
        loaded = InferenceModel(model, tokenizer, get_template("chatml"), None, torch.device(args.device), args.model)
    else:
        loaded = load_for_inference(args.model, args.adapter, device=args.device, merge_adapter=True)
    max_batch = int(args.max_batch)
    defer_steps = defer_steps_for(max_batch) if args.defer_steps is None else args.defer_steps
    fused = fused_batch(max_batch) if args.fused_projections is None else args.fused_projections
    options = EngineOptions(max_batch=max_batch, max_sessions=8, host_sessions=8, defer_steps=defer_steps,
                            fused_projections=fused)
    config = ServeConfig(model_name=MODEL_NAME, max_tokens_limit=1 << 20, max_prompt_tokens=1 << 20)
    ctx = build_context(loaded, config, options)
    print(f"serving {args.model} on {args.device}, max_batch {max_batch}, defer_steps {defer_steps}, fused "
          f"projections {fused}", file=sys.stderr, flush=True)
    uvicorn.run(create_app(ctx), host="127.0.0.1", port=args.port, log_level="warning")


class Server:
    """A server subprocess on a free port of 127.0.0.1 (or an existing ``--url``)."""

    def __init__(self, args: argparse.Namespace, max_batch: int | None) -> None:
        self.process = None
        if args.url:
            self.url = args.url.rstrip("/")
            return
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, __file__, "--serve", "--model", args.model, "--device", args.device,
                   "--port", str(port), "--max_batch", str(max_batch)]  # fmt: skip
        if args.defer_steps is not None:
            command += ["--defer_steps", str(args.defer_steps)]
        if args.fused_projections is not None:
            command.append("--fused_projections" if args.fused_projections else "--no-fused_projections")
        for name in ("adapter", "tokenizer"):
            if getattr(args, name):
                command += [f"--{name}", getattr(args, name)]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.process = subprocess.Popen(command, env=env)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if json.load(response)["status"] == "ok":
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit("the server did not start")
            time.sleep(0.5)

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as response:
            return json.load(response)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


# ---------------------------------------------------------------------------------------------------------------
# Clients


async def _one_stream(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    sent = time.perf_counter()
    chunks: list[float] = []
    tokens = 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            chunks.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"sent": sent, "chunks": chunks, "end": time.perf_counter(), "tokens": tokens}


def _client_process(job: dict) -> list[dict]:
    """One process's clients: each sends its requests one after the other, all starting at ``job['start']``."""
    import openai

    async def main() -> list[dict]:
        rng = random.Random(job["seed"])
        async with openai.AsyncOpenAI(base_url=job["url"] + "/v1", api_key=job["api_key"] or "none",
                                      max_retries=0, timeout=600) as client:  # fmt: skip

            async def one_client() -> list[dict]:
                out = []
                for _ in range(job["requests"]):
                    prompt = [rng.randrange(3, job["vocab"]) for _ in range(job["prompt_tokens"])]
                    out.append(await _one_stream(client, job["model"], prompt, job["max_tokens"]))
                return out

            await asyncio.sleep(max(0.0, job["start"] - time.time()))
            results = await asyncio.gather(*(one_client() for _ in range(job["clients"])))
        return [r for rs in results for r in rs]

    records = asyncio.run(main())
    # perf_counter has no common origin across processes: report times against this process's wall clock.
    offset = time.time() - time.perf_counter()
    for r in records:
        r["sent"] += offset
        r["end"] += offset
        r["chunks"] = [c + offset for c in r["chunks"]]
    return records


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def load_row(args: argparse.Namespace, server: Server, clients: int, vocab: int) -> dict:
    procs = args.client_procs or max(1, math.ceil(clients / 16))
    procs = min(procs, clients)
    share = [clients // procs + (i < clients % procs) for i in range(procs)]
    base = {"url": server.url, "api_key": args.api_key, "model": MODEL_NAME, "requests": args.requests,
            "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "vocab": vocab}  # fmt: skip
    # A warm-up request (first-use costs of the server's code paths), then the timed load.
    _client_process({**base, "clients": 1, "requests": 1, "start": 0, "seed": -1})
    start = time.time() + 2 + procs  # the client processes start up first
    jobs = [{**base, "clients": n, "start": start, "seed": i} for i, n in enumerate(share)]
    before: dict = {}
    # The counters as the clients start (not before their processes start up: the engine idles meanwhile).
    snapshot = threading.Timer(max(0.0, start - time.time() - 0.01), lambda: before.update(server.health()))
    snapshot.start()
    with mp.get_context("spawn").Pool(procs) as pool:
        records = [r for rs in pool.map(_client_process, jobs) for r in rs]
    snapshot.join()
    tokens = sum(r["tokens"] for r in records)
    wall = max(r["end"] for r in records) - min(r["sent"] for r in records)
    ttft = [(r["chunks"][0] - r["sent"]) * 1e3 for r in records if r["chunks"]]
    itl = [(b - a) * 1e3 for r in records for a, b in zip(r["chunks"], r["chunks"][1:])]
    # The engine's counters over the timed load: decode steps, generated tokens per step (how full the batch
    # ran) and the rounds that read prompts (each stops the decode batch for one forward).
    after = server.health()
    steps = after["decode_steps"] - before["decode_steps"]
    generated = after["tokens_generated"] - before["tokens_generated"]
    return {"clients": clients, "requests": len(records), "tokens": tokens, "wall": wall, "rate": tokens / wall,
            "ttft50": percentile(ttft, 50), "ttft99": percentile(ttft, 99), "itl50": percentile(itl, 50),
            "itl99": percentile(itl, 99), "steps": steps, "per_step": generated / max(1, steps),
            "rounds": after.get("prefill_rounds", 0) - before.get("prefill_rounds", 0),
            "prefill_s": after.get("prefill_seconds", 0) - before.get("prefill_seconds", 0),
            "idle_s": after.get("idle_seconds", 0) - before.get("idle_seconds", 0)}  # fmt: skip


def sessions_run(args: argparse.Namespace, server: Server) -> list[dict]:
    """TTFT per turn of one long chat, with and without a session id."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=args.api_key or "none", max_retries=0, timeout=600)
    client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "warm-up"}], max_tokens=2)
    out = []
    for with_session in (True, False):
        rng = random.Random(0)
        messages: list[dict] = []
        turns = []
        session = f"bench-{time.time_ns()}" if with_session else None
        for _ in range(args.turns):
            words = " ".join(rng.choice(WORDS) for _ in range(max(1, args.turn_tokens)))
            messages.append({"role": "user", "content": words})
            sent = time.perf_counter()
            first, text, usage = None, [], None
            stream = client.chat.completions.create(
                model=MODEL_NAME, messages=messages, max_tokens=args.reply_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "session_id": session},
            )  # fmt: skip
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            messages.append({"role": "assistant", "content": "".join(text)})
            cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
            turns.append({"ttft": ((first or time.perf_counter()) - sent) * 1e3, "prompt": usage.prompt_tokens,
                          "cached": cached or 0})  # fmt: skip
        out.append({"session": with_session, "turns": turns})
    return out


# ---------------------------------------------------------------------------------------------------------------


def environment(server: Server) -> str:
    try:
        from tnlora.bench.common import environment_line

        line = environment_line()
    except Exception as exc:  # a client machine without the model's dependencies
        line = f"environment unknown ({type(exc).__name__})"
    return line + f" | server {server.url}" + (" (external)" if server.process is None else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(args)
        return 0
    clients = [int(c) for c in args.clients.split(",") if c]
    fixed = None if args.max_batch == "clients" else int(args.max_batch)
    print(f"serve_bench: model {args.model} ({args.device}), prompt {args.prompt_tokens} tokens, "
          f"{args.max_tokens} new tokens (greedy, ignore_eos), {args.requests} requests per client", flush=True)  # fmt: skip
    header = ("| clients | max_batch | requests | tokens | wall s | tokens/s | TTFT p50 ms | TTFT p99 ms | "
              "ITL p50 ms | ITL p99 ms | decode steps | tokens a step | prefill rounds | prefill s | idle s |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    printed_env = False
    server: Server | None = None
    current = None
    try:
        for n in clients:
            batch = fixed if fixed is not None else n
            if server is None or (not args.url and batch != current):
                if server is not None:
                    server.close()
                server = Server(args, batch)
                current = batch
            if not printed_env:
                print(environment(server), flush=True)
                print(header, flush=True)
                printed_env = True
            health = server.health()
            r = load_row(args, server, n, health["vocab"])
            print(f"| {n} | {health['slots']['total']} | {r['requests']} | {r['tokens']} | {r['wall']:.2f} | "
                  f"{r['rate']:,.0f} | {r['ttft50']:.1f} | {r['ttft99']:.1f} | {r['itl50']:.2f} | "
                  f"{r['itl99']:.2f} | {r['steps']} | {r['per_step']:.1f} | {r['rounds']} | {r['prefill_s']:.3f} | "
                  f"{r['idle_s']:.3f} |", flush=True)  # fmt: skip
        if args.turns > 0:
            if server is None:
                server = Server(args, fixed or 1)
            runs = sessions_run(args, server)
            print(f"\nsessions: one chat of {args.turns} turns ({args.turn_tokens}-word messages, "
                  f"{args.reply_tokens}-token replies), time to first token in ms", flush=True)  # fmt: skip
            marks = sorted({1, min(10, args.turns), min(25, args.turns), args.turns})
            print("| session | " + " | ".join(f"turn {t}" for t in marks) + f" | turn {args.turns} ÷ turn 1 | "
                  f"prompt tokens at turn {args.turns} | continued |")  # fmt: skip
            print("|---" * (len(marks) + 4) + "|")
            for run in runs:
                turns = run["turns"]
                last = turns[-1]
                cells = " | ".join(f"{turns[t - 1]['ttft']:.1f}" for t in marks)
                print(f"| {'with' if run['session'] else 'without'} | {cells} | "
                      f"{turns[-1]['ttft'] / turns[0]['ttft']:.2f} | {last['prompt']} | {last['cached']} |",
                      flush=True)  # fmt: skip
    finally:
        if server is not None:
            server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
