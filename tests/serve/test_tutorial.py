"""serve/tutorial.py: the tutorial series' ``POST /`` with its own curl and requests examples, and ``history``,
``max_length``, ``top_p`` and ``temperature`` taking effect (checked against the same request through the
OpenAI route, which shares the engine)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from serve_helpers import MODEL_NAME, SYSTEM

from tnlora.infer.generate import prompt_ids

requests = pytest.importorskip("requests", reason="needs requests (the test extra)")

TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")


def get_completion(url: str, prompt: str) -> str:
    """The tutorial's client, as written there (headers, json.dumps body, ['response'])."""
    headers = {"Content-Type": "application/json"}
    data = {"prompt": prompt}
    response = requests.post(url=url, headers=headers, data=json.dumps(data))
    return response.json()["response"]


def chat(live, messages, **kwargs) -> dict:
    body = {"model": MODEL_NAME, "messages": messages, **kwargs}
    response = requests.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_the_tutorial_curl_example_works_unchanged(live) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(
        ["curl", "-s", "-X", "POST", live.url, "-H", "Content-Type: application/json", "-d", '{"prompt": "你好"}'],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    answer = json.loads(out.stdout)
    assert set(answer) == {"response", "history", "status", "time"}
    assert answer["status"] == 200 and TIME.match(answer["time"])
    assert isinstance(answer["response"], str) and answer["history"] == [["你好", answer["response"]]]


def test_the_tutorial_requests_example_works_unchanged(live) -> None:
    reply = get_completion(live.url, "你好")
    assert isinstance(reply, str)


def test_history_max_length_top_p_and_temperature_take_effect(live) -> None:
    history = [["What is the capital of France?", "Paris."], ["And of Italy?", "Rome."]]
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
                {"role": "assistant", "content": "Rome."}, {"role": "user", "content": "And of Spain?"}]  # fmt: skip
    length = len(prompt_ids(live.ctx.tokenizer, live.ctx.template, messages, SYSTEM))
    before = live.engine.stats()["prompt_tokens_prefilled"]
    body = {"prompt": "And of Spain?", "history": history, "temperature": 0, "max_length": length + 3}
    answer = requests.post(live.url, json=body, timeout=60).json()
    # The whole conversation was read, and the reply was cut at max_length (3 tokens) like max_tokens 3.
    assert live.engine.stats()["prompt_tokens_prefilled"] - before == length
    assert answer["response"] == chat(live, messages, temperature=0, max_tokens=3)["choices"][0]["message"]["content"]
    assert answer["history"] == [*history, ["And of Spain?", answer["response"]]]
    # Sampling: the given temperature and top_p, and the series' defaults (0.95, 0.7) when they are left out.
    sampled = {"prompt": "And of Spain?", "history": history, "seed": 9, "max_length": length + 30}
    hot = requests.post(live.url, json={**sampled, "temperature": 1.3, "top_p": 1.0}, timeout=60).json()
    want = chat(live, messages, temperature=1.3, top_p=1.0, seed=9, max_tokens=30)["choices"][0]["message"]["content"]
    assert hot["response"] == want
    defaults = requests.post(live.url, json=sampled, timeout=60).json()
    want = chat(live, messages, temperature=0.95, top_p=0.7, seed=9, max_tokens=30)["choices"][0]["message"]["content"]
    assert defaults["response"] == want
    assert hot["response"] != defaults["response"]


def test_history_as_role_messages_comes_back_as_role_messages(live) -> None:
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    answer = requests.post(live.url, json={"prompt": "Who are you?", "history": history, "temperature": 0,
                                           "max_length": 400}, timeout=60).json()  # fmt: skip
    assert answer["history"] == [*history, {"role": "user", "content": "Who are you?"},
                                 {"role": "assistant", "content": answer["response"]}]  # fmt: skip
