"""serve/page.py: the chat page in a real headless Chromium (Debian's package, driven by playwright): a message
typed, the reply streamed in, the system prompt and the sampling controls sent and used by the server, multi-turn
through a session, the stop button freeing the slot, and the API key field."""

from __future__ import annotations

import json
import os
import time

import pytest
from serve_helpers import MODEL_NAME, SYSTEM

from tnlora.infer.generate import prompt_ids

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("no browser: Debian's chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (the test extra)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()


def endless_reply(route) -> None:
    """A route that sends the page's request on asking for a reply that does not end by itself (eos ignored,
    8,000 tokens): what the page never asks for, to see it while it streams."""
    body = {**route.request.post_data_json, "ignore_eos": True, "max_tokens": 8000}
    route.continue_(post_data=json.dumps(body))


def open_chat(page, server) -> list[dict]:
    """Open /chat; return the list that collects the JSON bodies the page posts to the API."""
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.goto(server.url + "/chat")
    page.wait_for_function(f"document.getElementById('model').textContent.includes('{MODEL_NAME}')")
    return sent


def send(page, text: str) -> dict:
    """Type a message, press Enter, wait for the reply to finish; its text and meta line."""
    count = page.locator(".msg.assistant").count()
    page.fill("#input", text)
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant").nth(count)
    reply.wait_for()
    page.wait_for_function(f"document.querySelectorAll('.msg.assistant')[{count}].dataset.finish !== undefined")
    return {
        "text": reply.locator(".text").inner_text(),
        "meta": reply.locator(".meta").inner_text(),
        "finish": reply.get_attribute("data-finish"),
    }


def rendered(live, messages, system) -> int:
    return len(prompt_ids(live.ctx.tokenizer, live.ctx.template, messages, system))


def test_chat_page_streams_replies_and_uses_the_system_prompt_and_controls(page, live) -> None:
    sent = open_chat(page, live)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    first = send(page, "Hello there")
    assert first["finish"] in ("stop", "length") and first["text"]
    body = sent[-1]
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 40
    assert body["messages"] == [{"role": "user", "content": "Hello there"}]  # the model's own system prompt
    user = [{"role": "user", "content": "Hello there"}]
    assert f"prompt {rendered(live, user, SYSTEM)} tokens" in first["meta"]

    # Multi-turn: the page sends the conversation and its session id; only the new turn is prefilled.
    second = send(page, "And then?")
    assert [m["role"] for m in sent[-1]["messages"]] == ["user", "assistant", "user"]
    assert sent[-1]["messages"][1]["content"] == first["text"]
    assert "continued from this chat's state" in second["meta"]

    # A new chat with another system prompt: sent, and used (the rendered prompt's length changes with it).
    page.click("#new_chat")
    assert page.locator(".msg").count() == 0
    page.fill("#system", "You are a pirate who answers in rhymes.")
    pirate = send(page, "Hello there")
    assert sent[-1]["messages"][0] == {"role": "system", "content": "You are a pirate who answers in rhymes."}
    want = rendered(live, user, "You are a pirate who answers in rhymes.")
    assert want != rendered(live, user, SYSTEM) and f"prompt {want} tokens" in pirate["meta"]

    # The controls change generation: max tokens cuts the reply, temperature and top p are sent as set. The
    # random model may sample its end-of-sequence token within 3 tokens at temperature 1.2, so the request goes
    # out with ignore_eos added: only max tokens can end it.
    page.fill("#max_tokens", "3")
    page.fill("#temperature", "1.2")
    page.fill("#top_p", "0.5")
    page.route("**/v1/chat/completions", lambda route: route.continue_(
        post_data=json.dumps({**route.request.post_data_json, "ignore_eos": True})))
    short = send(page, "Tell me more")
    page.unroute("**/v1/chat/completions")
    assert short["finish"] == "length" and "reply 3 tokens" in short["meta"]
    assert sent[-1]["temperature"] == 1.2 and sent[-1]["top_p"] == 0.5 and sent[-1]["max_tokens"] == 3


def test_the_reply_streams_in_and_the_stop_button_ends_it_and_frees_the_slot(page, live) -> None:
    open_chat(page, live)
    page.route("**/v1/chat/completions", endless_reply)
    page.fill("#input", "Talk forever")
    page.press("#input", "Enter")
    # Text shows while the server is still generating: the reply streams in.
    page.wait_for_function("document.querySelector('.msg.assistant .text').textContent.length > 5")
    stats = live.engine.stats()
    assert stats["slots"]["active"] == 1, stats
    shown = len(page.inner_text(".msg.assistant .text"))
    page.wait_for_function(f"document.querySelector('.msg.assistant .text').textContent.length > {shown}")
    page.click("#stop")
    page.wait_for_function("document.querySelector('.msg.assistant').dataset.finish === 'stopped'")
    deadline = time.monotonic() + 10
    while live.engine.stats()["slots"]["active"]:
        assert time.monotonic() < deadline, f"the slot was not freed: {live.engine.stats()}"
        time.sleep(0.02)
    assert page.is_enabled("#send") and not page.is_enabled("#stop")


def test_the_pane_follows_the_reply_until_the_reader_scrolls_up(page, live) -> None:
    """While a long reply streams in, the messages pane keeps its end in view; scrolled up, it stays where the
    reader put it; the page itself never scrolls (the composer and its Stop button stay put)."""
    page.set_viewport_size({"width": 900, "height": 360})
    open_chat(page, live)
    page.route("**/v1/chat/completions", endless_reply)
    page.fill("#input", "Talk forever")
    page.press("#input", "Enter")
    pane = "document.getElementById('messages')"
    page.wait_for_function(f"{pane}.scrollHeight > {pane}.clientHeight + 100")
    at_end = f"{pane}.scrollHeight - {pane}.scrollTop - {pane}.clientHeight < 40"
    assert page.evaluate(at_end) and page.evaluate(f"{pane}.scrollTop") > 0
    stop_box = page.locator("#stop").bounding_box()
    page.evaluate(f"{pane}.scrollTop = 0")
    shown = len(page.inner_text(".msg.assistant .text"))
    page.wait_for_function(f"document.querySelector('.msg.assistant .text').textContent.length > {shown}")
    assert page.evaluate(f"{pane}.scrollTop") == 0 and not page.evaluate(at_end)
    assert page.evaluate("window.scrollY") == 0 and page.locator("#stop").bounding_box() == stop_box
    # The reply may have run out its 8,000 tokens by now (how much text they make depends on the tokenizer):
    # stopped if it still runs (a disabled button takes no click), then let the page finish it.
    page.evaluate("document.getElementById('stop').click()")
    page.wait_for_function("document.querySelector('.msg.assistant').dataset.finish !== undefined")


def test_the_api_key_field(page, loaded, start) -> None:
    server = start(loaded, api_key="page-key")
    try:
        open_chat(page, server)
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "2")
        refused = send(page, "Hi")
        assert refused["finish"] == "error" and "API key" in refused["meta"]
        page.fill("#api_key", "page-key")
        accepted = send(page, "Hi")
        assert accepted["finish"] == "length" and "reply 2 tokens" in accepted["meta"]
    finally:
        server.stop()
