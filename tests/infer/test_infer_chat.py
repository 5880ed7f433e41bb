"""tnlora chat: streamed multi-turn replies, /reset, /exit and end of input, through a real pipe."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tnlora.infer.chat import StopStringFilter, chat_loop, stream_reply
from tnlora.infer.decode_graph import install_graph_decoding
from tnlora.infer.generate import GenerationOptions, generate_replies
from tnlora.infer.loading import load_for_inference

GREEDY = ["--do_sample", "false", "--max_new_tokens", "12"]


def _chat_process(adapter_dir, stdin: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tnlora.cli", "chat", "--adapter", str(adapter_dir), *GREEDY],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # see conftest.one_torch_thread
    )
    proc.stdin.write(stdin)
    proc.stdin.close()  # end of input after the lines
    proc.stdin = None  # so communicate() only reads
    return proc


def test_chat_through_a_pipe_answers_and_exits_on_exit_and_on_eof(adapter_dir):
    # Both sessions run at once: each pays the interpreter and model start-up.
    with_exit = _chat_process(adapter_dir, "Who are you?\n/reset\nWho are you?\n/exit\nnever read\n")
    with_eof = _chat_process(adapter_dir, "Hello\n\nWhat is your name?\n")
    out, err = with_exit.communicate(timeout=240)
    assert with_exit.returncode == 0, err
    replies = [line for line in out.splitlines() if line.startswith("assistant: ")]
    assert len(replies) == 2 and "(conversation cleared)" in out
    assert replies[0] == replies[1]  # /reset: the same question in a fresh conversation, greedy → same answer
    assert "Traceback" not in err
    out, err = with_eof.communicate(timeout=240)
    assert with_eof.returncode == 0, err
    assert len([line for line in out.splitlines() if line.startswith("assistant: ")]) == 2


def test_streamed_chat_equals_batch_generation_and_keeps_history(adapter_dir, system_prompt):
    loaded = load_for_inference(None, adapter_dir)
    assert loaded.template.default_system == system_prompt  # the run's system prompt travels in template.json
    options = GenerationOptions(max_new_tokens=12, do_sample=False, repetition_penalty=1.0)
    out = io.StringIO()
    chat_loop(loaded, options, stdin=io.StringIO("Hi there\nAnd then?\n"), stdout=out)
    first, second = [line[len("assistant: ") :] for line in out.getvalue().splitlines()]
    expected_first = generate_replies(
        loaded.model, loaded.tokenizer, loaded.template, [[{"role": "user", "content": "Hi there"}]], options
    )[0]
    assert first.strip() == expected_first
    history = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": expected_first},
        {"role": "user", "content": "And then?"},
    ]
    expected_second = generate_replies(loaded.model, loaded.tokenizer, loaded.template, [history], options)[0]
    assert second.strip() == expected_second


def test_stop_string_filter_never_shows_a_marker():
    shown = StopStringFilter(["<|im_end|>"])
    pieces = ["Hel", "lo <|im", "_e", "nd|> trailing"]
    text = "".join(shown.push(p) for p in pieces) + shown.flush()
    assert text == "Hello "
    partial = StopStringFilter(["<|im_end|>"])
    assert partial.push("a <|im") == "a " and partial.flush() == ""  # out of tokens mid-marker: dropped
    lone = StopStringFilter(["<|im_end|>"])
    assert lone.push("1 <") == "1 " and lone.flush() == "<"  # one character is text, not a marker


class _CtrlCWhileStreaming(io.StringIO):
    """A stdout whose ``at``-th streamed write raises KeyboardInterrupt, as Ctrl-C does in the main thread."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.streamed = at, 0

    def write(self, text: str) -> int:
        if self.getvalue().endswith("assistant: ") or self.streamed:
            self.streamed += 1
            if self.streamed == self.at:
                raise KeyboardInterrupt
        return super().write(text)


def test_greedy_reply_runs_on_device_steps_and_equals_the_eager_reply():
    # On a GPU load_for_inference installs CUDA-graph decoding; here the same runners without graphs. Chat's
    # criteria (the Ctrl-C flag, the template's stop strings) are host-side, so greedy replies take the
    # device loop (the token choice inside the step).
    loaded = load_for_inference("tiny", None)
    options = GenerationOptions(max_new_tokens=20, do_sample=False, repetition_penalty=1.0)
    messages = [{"role": "user", "content": "Tell me more"}]
    eager = stream_reply(loaded, messages, options, io.StringIO())
    graphs = install_graph_decoding(loaded.model, capture=False)
    assert stream_reply(loaded, messages, options, io.StringIO()) == eager
    (steps,) = graphs.runners[1].greedy.values()
    assert steps.sent > 0


@pytest.mark.parametrize("static", [False, True])
def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt(static: bool):
    loaded = load_for_inference("tiny", None)  # random weights: replies run to max_new_tokens
    if static:
        install_graph_decoding(loaded.model, capture=False)  # the device loop stops at the flag too
    options = GenerationOptions(max_new_tokens=400, do_sample=False, repetition_penalty=1.0)
    threads = threading.active_count()
    out = _CtrlCWhileStreaming(at=3)
    chat_loop(loaded, options, stdin=io.StringIO("Stop me\nAnd then?\n"), stdout=out)
    text = out.getvalue()
    assert "(reply stopped; this turn is not kept. Ctrl-C at the prompt quits)" in text
    assert threading.active_count() == threads  # the generating thread was stopped and joined
    # The stopped turn is not in the history: the next reply is that of a fresh conversation.
    second = text.rsplit("assistant: ", 1)[1].strip()
    short = GenerationOptions(max_new_tokens=400, do_sample=False, repetition_penalty=1.0)
    fresh = stream_reply(loaded, [{"role": "user", "content": "And then?"}], short, io.StringIO())
    assert second == fresh.strip()


def _read_into(stream, buffer: bytearray) -> None:
    while chunk := os.read(stream.fileno(), 4096):
        buffer.extend(chunk)


def _wait_for(condition, proc: subprocess.Popen, out: bytearray, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"exit {proc.poll()}; stdout {bytes(out[-300:])!r}; stderr {proc.stderr.read()!r}")
        time.sleep(0.05)


def test_sigint_stops_a_streamed_reply_and_at_the_prompt_exits_130():
    proc = subprocess.Popen(
        [sys.executable, "-m", "tnlora.cli", "chat", "--model", "tiny", "--do_sample", "false",
         "--max_new_tokens", "100000"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        # A shell without job control starts background jobs with SIGINT ignored, and children inherit that;
        # the chat's Ctrl-C handling is what is tested, so it starts as in a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    out = bytearray()
    threading.Thread(target=_read_into, args=(proc.stdout, out), daemon=True).start()
    try:
        for question in (b"Hi\n", b"Hello\n"):
            n = out.count(b"assistant: ")  # before asking: the reply may start at once
            proc.stdin.write(question)
            proc.stdin.flush()
            _wait_for(lambda n=n: out.count(b"assistant: ") > n and len(out.rsplit(b"assistant: ", 1)[1]) > 10,
                      proc, out)  # fmt: skip
            proc.send_signal(signal.SIGINT)  # while the reply streams
            _wait_for(lambda n=n: out.count(b"(reply stopped") > n, proc, out)
        proc.send_signal(signal.SIGINT)  # at the prompt
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    err = proc.stderr.read().decode()
    assert code == 130, err
    assert err.endswith("\ninterrupted\n") and "Traceback" not in err and "terminate called" not in err
