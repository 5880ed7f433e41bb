"""Interactive multi-turn chat with streamed replies (works on a terminal and on a pipe).

Ctrl-C while a reply streams stops that reply (the generating thread sees a stop flag at its next step and is
joined, never left running) and returns to the prompt; Ctrl-C at the prompt, or again while a reply is being
stopped, ends the chat (the command exits with status 130).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, TextIO

import torch
from transformers import StoppingCriteriaList, TextIteratorStreamer

from tnlora.infer.generate import (
    GenerationOptions,
    StopOnStrings,
    cut_at_stop,
    generation_inputs,
    partial_stop_suffix,
    prompt_ids,
    stop_settings,
)
from tnlora.model.generation import HostStoppingCriteria
from tnlora.model.tokenizer import pad_token_id

HELP = "commands: /reset clears the conversation, /exit (or end of input) quits; Ctrl-C stops a reply"


class ReplyStopped(Exception):
    """Ctrl-C stopped a streamed reply; ``text`` is what had been shown of it."""

    def __init__(self, text: str):
        super().__init__("reply stopped")
        self.text = text


class StopOnFlag(HostStoppingCriteria):
    """Ends generate() at its next step once ``flag`` is set (from another thread). A host-side criterion, so
    that the overlapped and device loops of :mod:`tnlora.model.generation` keep running with it."""

    def __init__(self, flag: threading.Event):
        super().__init__(prompt_length=0)
        self.flag = flag

    def done_on_host(self, generated: Sequence[Sequence[int]]) -> list[bool]:
        return [self.flag.is_set()] * len(generated)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        # As a plain criterion (transformers' loop) it needs no tokens on the host.
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


def _join(worker: threading.Thread) -> bool:
    """Wait for ``worker`` to end even through Ctrl-C; True when Ctrl-C was pressed meanwhile."""
    interrupted = False
    while worker.is_alive():
        try:
            worker.join()
        except KeyboardInterrupt:
            interrupted = True
    return interrupted


class StopStringFilter:
    """Holds back streamed text that might be the start of a stop string, so ``<|im_end|>`` never shows."""

    def __init__(self, stop_strings: list[str]):
        self.stop_strings = stop_strings
        self.buffer = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Feed a piece of text; return what is safe to print now."""
        if self.stopped:
            return ""
        self.buffer += piece
        cut = cut_at_stop(self.buffer, self.stop_strings)
        if len(cut) < len(self.buffer):
            self.stopped = True
            self.buffer = ""
            return cut
        keep = partial_stop_suffix(self.buffer, self.stop_strings, min_length=1)
        safe, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return safe

    def flush(self) -> str:
        """What is left once generation ended (a trailing partial marker is dropped, as generate does)."""
        rest, self.buffer = ("" if self.stopped else self.buffer), ""
        return rest[: len(rest) - partial_stop_suffix(rest, self.stop_strings)]


def stream_reply(loaded, messages: list[dict[str, Any]], options: GenerationOptions, out: TextIO) -> str:
    """Generate the assistant's reply to ``messages``, writing it to ``out`` as it is produced; return it.

    Ctrl-C (KeyboardInterrupt) during the reply stops generation and raises ``ReplyStopped``; a second one
    while it stops propagates as KeyboardInterrupt. Either way the generating thread has ended on return.
    """
    options.check()
    tokenizer, model = loaded.tokenizer, loaded.model
    eos_ids, stop_strings = stop_settings(tokenizer, loaded.template)
    ids, mask = generation_inputs(
        tokenizer, [prompt_ids(tokenizer, loaded.template, messages, loaded.system)], loaded.device
    )
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    stop = threading.Event()
    criteria = StoppingCriteriaList(
        [StopOnFlag(stop), *([StopOnStrings(tokenizer, stop_strings, ids.shape[1])] if stop_strings else [])]
    )
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with torch.inference_mode():
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    eos_token_id=eos_ids,
                    pad_token_id=pad_token_id(tokenizer),
                    stopping_criteria=criteria,
                    streamer=streamer,
                    **options.to_kwargs(),
                )
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)
            streamer.end()  # unblock the reader

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    shown = StopStringFilter(stop_strings)
    pieces: list[str] = []
    try:
        for piece in streamer:
            safe = shown.push(piece)
            if safe:
                pieces.append(safe)
                out.write(safe)
                out.flush()
    except KeyboardInterrupt:
        stop.set()
        if _join(worker):
            raise
        raise ReplyStopped("".join(pieces)) from None
    except BaseException:  # e.g. a closed pipe: the thread must not outlive the reply either
        stop.set()
        _join(worker)
        raise
    worker.join()
    rest = shown.flush()
    pieces.append(rest)
    out.write(rest)
    if failure:
        raise failure[0]
    return "".join(pieces).strip()


def chat_loop(loaded, options: GenerationOptions, stdin: TextIO, stdout: TextIO) -> None:
    """Read user turns from ``stdin`` until ``/exit`` or end of input; stream each reply to ``stdout``."""
    interactive = stdin.isatty() and stdout.isatty()
    if interactive:
        stdout.write(f"tnlora chat — {loaded.base}" + (f" + {loaded.adapter}" if loaded.adapter else "") + "\n")
        stdout.write(HELP + "\n")
    history: list[dict[str, Any]] = []
    if options.seed is not None:  # once per session: a reseed per reply would repeat the same draws
        torch.manual_seed(options.seed)
    while True:
        if interactive:
            stdout.write("\nuser: ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # EOF
            if interactive:
                stdout.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            stdout.write("(conversation cleared)\n")
            stdout.flush()
            continue
        if text.startswith("/") and text[1:].isalpha():
            stdout.write(f"(unknown command {text}; {HELP})\n")
            continue
        history.append({"role": "user", "content": text})
        stdout.write("assistant: ")
        stdout.flush()
        try:
            reply = stream_reply(loaded, history, options, stdout)
        except ReplyStopped:
            history.pop()  # the turn is dropped: a cut-off answer would mislead the next ones
            stdout.write("\n(reply stopped; this turn is not kept. Ctrl-C at the prompt quits)\n")
            stdout.flush()
            continue
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": reply})
