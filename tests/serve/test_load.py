"""Load on the live server (serve/engine.py under the app), bounded: 64 concurrent streaming chat requests of
mixed prompt and reply lengths on 8 slots, a few clients hanging up mid-stream, /health polled throughout.

The model is the tiny preset with larger random weights (init std 0.3): its greedy replies differ from prompt
to prompt (the default init's tiny logits settle on one token), so "equal to its solo answer" means something.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="needs httpx (the openai client's transport)")

REQUESTS = 64
# These clients leave after their first content chunk (under load the server joins queued pieces into fewer
# chunks, so a short reply may come as one chunk carrying its finish: that client has read the whole reply).
HANGUPS = {3, 13, 23, 33, 43, 53}


@pytest.fixture(scope="module")
def chaotic(start):
    from tnlora.data.templates import get_template
    from tnlora.infer.loading import InferenceModel
    from tnlora.model import TransnormerForCausalLM, config_from_preset
    from tnlora.model.tokenizer import ByteTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TransnormerForCausalLM(config_from_preset("tiny", init_std=0.3)).eval()
    loaded = InferenceModel(model, ByteTokenizer(), get_template("chatml"), None, torch.device("cpu"), "tiny")
    server = start(loaded, max_batch=8)
    yield server
    server.stop()


def workload() -> list[dict]:
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz ,.?!ABCDEFG0123456789"
    return [
        {
            "messages": [{"role": "user", "content": "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 120)))}],
            "max_tokens": rng.randrange(4, 48),
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for _ in range(REQUESTS)
    ]


async def stream_one(client, body: dict, hang_up: bool, usage: list[int] | None = None) -> tuple[str, str | None]:
    """(text, finish_reason) of a streamed reply; a client that hangs up returns what it read and None."""
    text, finish = [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if not chunk["choices"]:
                if usage is not None:
                    usage.append(chunk["usage"]["completion_tokens"])
                continue
            choice = chunk["choices"][0]
            if choice["delta"].get("content"):
                text.append(choice["delta"]["content"])
                if hang_up and not choice["finish_reason"]:
                    return "".join(text), None
            finish = choice["finish_reason"] or finish
    return "".join(text), finish


def test_64_concurrent_streams_equal_their_solo_answers_and_leak_nothing(chaotic) -> None:
    bodies = workload()

    async def scenario():
        limits = httpx.Limits(max_connections=REQUESTS + 8)
        async with httpx.AsyncClient(base_url=chaotic.url, timeout=60, limits=limits) as client:
            solo = [await stream_one(client, body, False) for body in bodies]
            health: list[float] = []
            done = asyncio.Event()

            async def poll():
                while not done.is_set():
                    started = time.monotonic()
                    response = await client.get("/health", timeout=5)
                    assert response.status_code == 200 and response.json()["status"] == "ok"
                    health.append(time.monotonic() - started)
                    await asyncio.sleep(0.05)

            poller = asyncio.create_task(poll())
            started = time.monotonic()
            usage: list[int] = []
            together = await asyncio.gather(
                *(stream_one(client, b, i in HANGUPS, usage) for i, b in enumerate(bodies))
            )
            wall = time.monotonic() - started
            done.set()
            await poller
            return solo, together, health, wall, sum(usage)

    errors_before = chaotic.engine.stats()["errors"]
    solo, together, health, wall, tokens = asyncio.run(asyncio.wait_for(scenario(), 300))
    assert len({text for text, _ in solo}) > REQUESTS // 2  # replies really differ from prompt to prompt
    for i, ((want, want_finish), (got, finish)) in enumerate(zip(solo, together)):
        if i in HANGUPS and finish is None:
            assert want.startswith(got), i
        else:
            assert (got, finish) == (want, want_finish), i
    stats = chaotic.wait_idle()
    assert stats["slots"] == {"total": 8, "active": 0, "free": 8} and stats["waiting"] == 0
    assert stats["errors"] == errors_before
    assert len(health) >= 3  # /health answered all along (each within its 5 s timeout)
    print(f"\n{REQUESTS} streams on 8 slots: {wall:.2f} s, {tokens} tokens in the completed replies "
          f"({tokens / wall:.0f} tokens/s), /health polled {len(health)} times, slowest {max(health) * 1e3:.0f} ms")
