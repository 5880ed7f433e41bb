"""serve/openai.py through real clients against a live server on 127.0.0.1: the official `openai` package (sync,
streaming, async streaming), LangChain's ChatOpenAI (invoke, stream); usage exact, finish reasons truthful,
stop strings honoured, and sessions that prefill only the new tokens of a conversation."""

from __future__ import annotations

import asyncio

import pytest
from serve_helpers import MODEL_NAME, SYSTEM

from tnlora.infer.generate import prompt_ids

openai = pytest.importorskip("openai", reason="needs the openai client (the test extra)")


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, content, **kwargs):
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL_NAME, messages=messages, **kwargs)


def rendered_length(live, messages, system=SYSTEM) -> int:
    return len(prompt_ids(live.ctx.tokenizer, live.ctx.template, messages, system))


def test_models_lists_the_served_model(client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]


def test_greedy_chat_usage_is_exact_and_finish_reason_truthful(live, client) -> None:
    reply = chat(client, "What is the capital of France?", max_tokens=12)
    choice = reply.choices[0]
    assert reply.model == MODEL_NAME and choice.message.role == "assistant"
    assert reply.usage.prompt_tokens == rendered_length(live, [{"role": "user", "content": "What is the capital of France?"}])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    if choice.finish_reason == "length":
        assert reply.usage.completion_tokens == 12
    else:
        assert choice.finish_reason == "stop" and reply.usage.completion_tokens <= 12
    short = chat(client, "What is the capital of France?", max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert choice.message.content.startswith(short.choices[0].message.content)
    assert "<|im_end|>" not in choice.message.content


def test_a_system_message_replaces_the_adapter_system_prompt(live, client) -> None:
    messages = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}]
    reply = chat(client, messages, max_tokens=2)
    assert reply.usage.prompt_tokens == rendered_length(live, messages[1:], system="You are a pirate.")
    assert reply.usage.prompt_tokens != rendered_length(live, messages[1:])


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}])
def test_streaming_equals_the_whole_reply(client, sampling) -> None:
    whole = chat(client, "Give the opposite of the word. hot", max_tokens=24, **sampling)
    chunks = list(chat(client, "Give the opposite of the word. hot", max_tokens=24, stream=True,
                       stream_options={"include_usage": True}, **sampling))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_async_streams_run_together_and_each_equals_its_own_reply(live, client) -> None:
    questions = ["Who are you?", "Name a color.", "What is 2+2?", "Say hello."]
    sampled = {"temperature": 1.0, "max_tokens": 24}
    wanted = [chat(client, q, seed=i, **sampled).choices[0].message.content for i, q in enumerate(questions)]
    assert len(set(wanted)) == len(wanted)

    async def stream(aclient, seed, question):
        response = await aclient.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": question}], seed=seed, stream=True, **sampled
        )
        return "".join([c.choices[0].delta.content or "" async for c in response if c.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*(stream(aclient, i, q) for i, q in enumerate(questions)))

    assert asyncio.run(main()) == wanted


def test_stop_strings_end_the_reply_and_are_not_returned(client) -> None:
    whole = chat(client, "Tell me a story.", temperature=1.0, seed=4, max_tokens=40).choices[0].message.content
    stop = whole[8:11]
    assert len(stop) == 3
    reply = chat(client, "Tell me a story.", temperature=1.0, seed=4, max_tokens=40, stop=[stop, "never"])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == whole[: whole.index(stop)]
    single = chat(client, "Tell me a story.", temperature=1.0, seed=4, max_tokens=40, stop=stop)
    assert single.choices[0].message.content == reply.choices[0].message.content


def test_seed_makes_sampling_reproducible_and_temperature_changes_it(client) -> None:
    a = chat(client, "Write a word.", temperature=1.2, top_p=1.0, seed=11, max_tokens=20).choices[0].message.content
    b = chat(client, "Write a word.", temperature=1.2, top_p=1.0, seed=11, max_tokens=20).choices[0].message.content
    greedy = chat(client, "Write a word.", max_tokens=20).choices[0].message.content
    assert a == b and a != greedy


def test_content_parts_and_max_completion_tokens(client) -> None:
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    as_parts = chat(client, [{"role": "user", "content": parts}], max_completion_tokens=3)
    as_text = chat(client, "What is the capital\nof France?", max_tokens=3)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.completion_tokens == 3 and as_parts.choices[0].finish_reason == "length"


def test_text_completions_use_the_raw_prompt(live, client) -> None:
    reply = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=5,
                                      temperature=0)  # fmt: skip
    want = len(live.ctx.tokenizer.encode("The capital of France is", add_special_tokens=False))
    assert reply.usage.prompt_tokens == want and reply.usage.completion_tokens <= 5
    streamed = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=5,
                                         temperature=0, stream=True)  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == reply.choices[0].text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    default = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", temperature=0, extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for text completions


def test_langchain_invoke_and_stream(live, client) -> None:
    langchain_openai = pytest.importorskip("langchain_openai", reason="needs langchain-openai (the test extra)")
    from langchain_core.messages import HumanMessage, SystemMessage

    llm = langchain_openai.ChatOpenAI(base_url=live.url + "/v1", api_key="unused", model=MODEL_NAME,
                                      temperature=1.0, seed=5, max_tokens=24, max_retries=0)  # fmt: skip
    want = chat(client, "Who are you?", temperature=1.0, seed=5, max_tokens=24).choices[0].message.content
    assert want and llm.invoke("Who are you?").content == want
    assert "".join(chunk.content for chunk in llm.stream("Who are you?")) == want
    messages = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}]
    pirate = chat(client, messages, temperature=1.0, seed=5, max_tokens=24).choices[0].message.content
    assert llm.invoke([SystemMessage("You are a pirate."), HumanMessage("Hi")]).content == pirate


def test_sessions_prefill_only_new_tokens_and_answers_equal_full_prefills(live, client) -> None:
    """Ten turns of one conversation, greedy: with a session each turn prefills only what is new, without one
    the whole conversation; the answers are the same."""
    with_session: list[dict] = []
    without: list[dict] = []
    previous = None
    for turn in range(10):
        question = {"role": "user", "content": f"Question {turn}: what is {turn} + {turn}?"}
        with_session.append(question)
        without.append(question)
        before = live.engine.stats()["prompt_tokens_prefilled"]
        a = chat(client, with_session, max_tokens=12, extra_headers={"X-Session-Id": "ten-turns"})
        prefilled = live.engine.stats()["prompt_tokens_prefilled"] - before
        b = chat(client, without, max_tokens=12)
        assert a.choices[0].message.content == b.choices[0].message.content, turn
        assert a.usage.prompt_tokens == b.usage.prompt_tokens and b.usage.prompt_tokens_details.cached_tokens == 0
        cached = a.usage.prompt_tokens_details.cached_tokens
        if previous is None:
            assert cached == 0
        else:
            # Everything fed before (the last prompt and reply), or, when the reply comes back in other tokens
            # than those generated (here: an eos the template writes after its end marker), the last prompt.
            last_prompt, last_reply = previous.usage.prompt_tokens, previous.usage.completion_tokens
            assert cached in (last_prompt + last_reply, last_prompt), turn
        assert prefilled == a.usage.prompt_tokens - cached
        previous = a
        with_session.append({"role": "assistant", "content": a.choices[0].message.content})
        without.append({"role": "assistant", "content": b.choices[0].message.content})
    # The body field works as the header does, and a changed history falls back to a full prefill.
    edited = [*with_session[:-3], {"role": "user", "content": "Something else?"}]
    c = chat(client, edited, max_tokens=4, extra_body={"session_id": "ten-turns"})
    assert c.usage.prompt_tokens_details.cached_tokens == 0
