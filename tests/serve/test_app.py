"""serve/app.py: the gate (API key, body limit), OpenAI-style error bodies naming the field, /health, and
disconnects that free the slot; nothing a bad request does leaks a slot or a session or shows a traceback."""

from __future__ import annotations

import json
import socket
import time

import pytest
from serve_helpers import MODEL_NAME

requests = pytest.importorskip("requests", reason="needs requests (the test extra)")

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def guarded(loaded, start):
    """A server with an API key and small limits."""
    server = start(loaded, api_key=KEY, max_prompt_tokens=300, max_tokens_limit=64, max_body_bytes=4096)
    yield server
    server.stop()


def post(server, path, body, key=KEY, **kwargs):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if body is None or not isinstance(body, dict | list) else json.dumps(body)
    return requests.post(server.url + path, data=data, headers={"Content-Type": "application/json", **headers},
                         timeout=30, **kwargs)  # fmt: skip


def user(text="Hi"):
    return [{"role": "user", "content": text}]


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in response.text
    assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["message"].startswith(param), body
    return body["error"]


def test_health_and_page_are_open_the_api_needs_the_key(guarded) -> None:
    health = requests.get(guarded.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == MODEL_NAME and health["slots"]["total"] == 4
    assert requests.get(guarded.url + "/chat", timeout=10).status_code == 200
    for key in (None, "wrong", KEY + "x", KEY[:-1]):
        error = assert_error(post(guarded, "/v1/chat/completions", {"messages": user(), "max_tokens": 1}, key=key),
                             401, code="invalid_api_key")  # fmt: skip
        assert error["type"] == "authentication_error"
    assert requests.get(guarded.url + "/v1/models", timeout=10).status_code == 401
    assert post(guarded, "/", {"prompt": "Hi"}, key=None).status_code == 401
    basic = requests.get(guarded.url + "/v1/models", headers={"Authorization": f"Basic {KEY}"}, timeout=10)
    assert basic.status_code == 401
    ok = post(guarded, "/v1/chat/completions", {"messages": user(), "max_tokens": 1})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 1


CHAT_ERRORS = [
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": user(), "max_tokens": 0}, "max_tokens"),
    ({"messages": user(), "max_tokens": -3}, "max_tokens"),
    ({"messages": user(), "max_tokens": "5"}, "max_tokens"),
    ({"messages": user(), "max_tokens": 65}, "max_tokens"),
    ({"messages": user(), "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": user(), "temperature": -0.1}, "temperature"),
    ({"messages": user(), "temperature": "hot"}, "temperature"),
    ({"messages": user(), "top_p": 1.5}, "top_p"),
    ({"messages": user(), "n": 2}, "n"),
    ({"messages": user(), "stream": "yes"}, "stream"),
    ({"messages": user(), "stop": 5}, "stop"),
    ({"messages": user(), "seed": 2**70}, "seed"),
    ({"messages": user(), "logprobs": True}, "logprobs"),
    ({"messages": user(), "tools": [{"type": "function"}]}, "tools"),
    ({"messages": user(), "session_id": ""}, "session_id"),
    ({"messages": [*user(), {"role": "assistant", "content": "Hello"}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": "Hello"}, *user()]}, "messages"),
    ({"messages": [*user(), {"role": "assistant", "content": "A"}, {"role": "system", "content": "S"}, *user()]},
     "messages[2].role"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "param"), CHAT_ERRORS)
def test_bad_chat_requests_get_400_naming_the_field(guarded, body, param) -> None:
    assert_error(post(guarded, "/v1/chat/completions", {**body, "session_id": "bad"} if "session_id" not in body
                      else body), 400, param)  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": [70_000]}, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {"prompt": "Hi", "echo": True}, "echo"),
        ("/", {}, "prompt"),
        ("/", {"prompt": 3}, "prompt"),
        ("/", {"prompt": "Hi", "history": [["only the question"]]}, "history[0]"),
        ("/", {"prompt": "Hi", "max_length": 0}, "max_length"),
        ("/", {"prompt": "Hi", "max_length": 10}, "max_length"),
        ("/", {"prompt": "Hi", "temperature": -1}, "temperature"),
    ],
)
def test_bad_completion_and_tutorial_requests_get_400_naming_the_field(guarded, path, body, param) -> None:
    assert_error(post(guarded, path, body), 400, param)


def test_malformed_bodies_and_long_prompts(guarded) -> None:
    error = assert_error(post(guarded, "/v1/chat/completions", '{"messages": [', ), 400)
    assert error["message"].startswith("malformed JSON")
    assert_error(post(guarded, "/v1/chat/completions", "[1, 2]"), 400)
    assert_error(post(guarded, "/v1/chat/completions", b"\xff\xfe"), 400)
    long = assert_error(post(guarded, "/v1/chat/completions", {"messages": user("x" * 400)}), 400, "messages",
                        code="context_length_exceeded")  # fmt: skip
    assert "300" in long["message"]
    assert_error(post(guarded, "/v1/completions", {"prompt": "x" * 400}), 400, "prompt")


def test_unknown_model_route_and_method(guarded) -> None:
    assert_error(post(guarded, "/v1/chat/completions", {"model": "gpt-4", "messages": user()}), 404, "model",
                 code="model_not_found")  # fmt: skip
    assert_error(requests.get(guarded.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}, timeout=10),
                 404)  # fmt: skip
    assert_error(requests.get(guarded.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                              timeout=10), 405)  # fmt: skip


def test_bodies_over_the_limit_are_refused_before_parsing(guarded) -> None:
    garbage = b"{" * 5000  # malformed JSON: a 413 (not a 400) shows it was never parsed
    assert_error(post(guarded, "/v1/chat/completions", garbage), 413, code="request_too_large")
    # Without a Content-Length (chunked): counted as it arrives.
    chunked = post(guarded, "/v1/chat/completions", (garbage[i : i + 500] for i in range(0, 5000, 500)))
    assert_error(chunked, 413, code="request_too_large")
    assert_error(post(guarded, "/v1/chat/completions", b"{" * 4000), 400)  # under the limit: parsed


def test_internal_errors_show_no_traceback(guarded, monkeypatch) -> None:
    import tnlora.serve.openai as routes

    def broken(*args, **kwargs):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(routes, "prompt_ids", broken)
    response = post(guarded, "/v1/chat/completions", {"messages": user()})
    error = assert_error(response, 500)
    assert error["type"] == "server_error" and "secret" not in response.text


def test_bad_requests_leak_no_slot_or_session(guarded) -> None:
    """Runs after the bad requests above (same module server): nothing is left behind."""
    stats = guarded.wait_idle()
    assert stats["slots"]["free"] == 4 and stats["waiting"] == 0
    assert stats["sessions"]["on_device"] + stats["sessions"]["on_host"] == 0
    ok = post(guarded, "/v1/chat/completions", {"messages": user(), "max_tokens": 3, "session_id": "good"})
    assert ok.status_code == 200 and guarded.wait_idle()["sessions"]["on_device"] == 1


def _wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_client_that_disconnects_frees_its_slot(live) -> None:
    endless = {"messages": user(), "max_tokens": 8000, "ignore_eos": True, "temperature": 0}
    # Streaming: read a few events, then hang up.
    with requests.post(live.url + "/v1/chat/completions", json={**endless, "stream": True}, stream=True,
                       timeout=30) as response:  # fmt: skip
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert live.engine.stats()["slots"]["active"] == 1
    _wait_for(lambda: live.engine.stats()["slots"]["active"] == 0)
    # A whole (non-streamed) response: the client leaves while it is generated.
    host, port = live.url.removeprefix("http://").split(":")
    body = json.dumps(endless).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)  # fmt: skip
        _wait_for(lambda: live.engine.stats()["slots"]["active"] == 1)
    _wait_for(lambda: live.engine.stats()["slots"]["active"] == 0)
    assert live.engine.stats()["tokens_generated"] < 2 * 8000


def test_the_relay_hands_events_over_in_order_and_refuses_a_closed_loop() -> None:
    """Events put from another thread reach their queues in order, in one wake-up of the loop; once the loop is
    closed every put raises (the engine then cancels that request), none is silently dropped."""
    import asyncio
    import threading

    pytest.importorskip("fastapi", reason="needs the serve extra")
    from tnlora.serve.app import LoopRelay
    from tnlora.serve.engine import Event

    loop = asyncio.new_event_loop()
    try:
        queues: list[asyncio.Queue] = [asyncio.Queue(), asyncio.Queue()]
        relay = LoopRelay.of(loop)
        assert LoopRelay.of(loop) is relay
        producer = threading.Thread(target=lambda: [relay.put(queues[i % 2], Event(text=str(i))) for i in range(50)])
        producer.start()
        producer.join()
        assert all(q.empty() for q in queues)  # nothing is delivered off the loop's thread
        loop.run_until_complete(asyncio.sleep(0))
        got = [[q.get_nowait().text for _ in range(q.qsize())] for q in queues]
        assert got == [[str(i) for i in range(0, 50, 2)], [str(i) for i in range(1, 50, 2)]]
    finally:
        loop.close()
    for _ in range(2):
        with pytest.raises(RuntimeError):
            relay.put(queues[0], Event(text="late"))
