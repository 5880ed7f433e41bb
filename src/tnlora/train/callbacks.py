"""Trainer callbacks: a progress bar with loss, tokens/s and ETA; the output dir's record; sample replies while
training."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


def format_duration(seconds: float) -> str:
    """``3725`` → ``"1:02:05"``; ``65`` → ``"1:05"``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressCallback(TrainerCallback):
    """One status line: step/total, epoch, last loss, learning rate, tokens/s (real tokens) and ETA.

    Tokens are ``state.num_input_tokens_seen``, the non-padding tokens (padding is not work) that
    ``run.trainer_class()`` adds up from the collator's host-side count. On a terminal the line is redrawn in
    place; otherwise (logs, CI, pipes) a full line is printed at each logging step. With several processes only
    the main one prints (its tokens/s are its own share).
    """

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self._t0 = 0.0
        self._tokens0 = 0
        self._step0 = 0
        self._loss: float | None = None
        self._lr: float | None = None
        self.tokens_per_second: float = 0.0
        self._printed_step = -1

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        # Measured from here so a resumed run's speed excludes the steps it skipped.
        self._t0 = time.perf_counter()
        self._tokens0 = state.num_input_tokens_seen or 0
        self._step0 = state.global_step

    def status(self, state: TrainerState) -> str:
        """The current status line (no newline)."""
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        done = state.global_step - self._step0
        tokens = (state.num_input_tokens_seen or 0) - self._tokens0
        self.tokens_per_second = tokens / elapsed
        total = state.max_steps or 0
        eta = (total - state.global_step) * elapsed / done if done > 0 and total else float("nan")
        parts = [f"step {state.global_step}/{total}"]
        if state.epoch is not None:
            parts.append(f"epoch {state.epoch:.2f}")
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4f}")
        if self._lr is not None:
            parts.append(f"lr {self._lr:.2e}")
        parts.append(f"{self.tokens_per_second:,.0f} tok/s")
        parts.append(f"elapsed {format_duration(elapsed)}")
        parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if self.tty and state.is_world_process_zero:
            self.stream.write("\r\033[K" + self.status(state))
            self.stream.flush()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw: Any):
        if not state.is_world_process_zero:
            return
        logs = logs or {}
        if "loss" in logs:
            self._loss = float(logs["loss"])
            self._lr = float(logs["learning_rate"]) if "learning_rate" in logs else self._lr
            if not self.tty:
                self._println(self.status(state))
                self._printed_step = state.global_step
        if "eval_loss" in logs:
            ppl = math.exp(min(float(logs["eval_loss"]), 50.0))
            self._println(f"eval at step {state.global_step}: loss {logs['eval_loss']:.4f} | ppl {ppl:.2f}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if not state.is_world_process_zero:
            return
        if self.tty or self._printed_step != state.global_step:
            self._println(self.status(state))

    def _println(self, line: str) -> None:
        prefix = "\r\033[K" if self.tty else ""
        self.stream.write(prefix + line + "\n")
        self.stream.flush()


class OutputRecordCallback(TrainerCallback):
    """Keeps the run's output dir self-describing as checkpoints are written: the marker lists every entry the
    run wrote (``tnlora.outputs``), and each checkpoint's adapter model card names the base model. (The main
    process writes them.)"""

    def __init__(self, output_dir: str, base_model: str, exclude: list[str] | None = None):
        self.output_dir = output_dir
        self.base_model = base_model
        self.exclude = list(exclude or [])

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        from pathlib import Path

        from tnlora.outputs import claim_dir

        if not state.is_world_process_zero:
            return
        checkpoint = Path(self.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            name_base_model_in_card(checkpoint, self.base_model)
        claim_dir(self.output_dir, "train", exclude=self.exclude)


BASE_MODEL_LINE = "Base model:"


def name_base_model_in_card(directory, base_model: str) -> bool:
    """Make the adapter's model card (the README.md peft writes) name its base model; False without a card.

    peft names the base only from the model's ``name_or_path``, which is empty for a preset (a name that is no
    path would make peft look it up on the Hub while saving) and a cache folder for a Hub id. The card's
    ``base_model`` metadata gets the Hub id or the directory; a preset, which is on no Hub, is named in the text.
    """
    from pathlib import Path

    from huggingface_hub import ModelCard

    from tnlora.model.configuration import canonical_preset

    card_file = Path(directory) / "README.md"
    if not card_file.is_file():
        return False
    card = ModelCard.load(card_file)
    preset = canonical_preset(base_model)
    if preset is None:
        card.data["base_model"] = base_model
        line = f"{BASE_MODEL_LINE} `{base_model}`"
    else:
        card.data.pop("base_model", None)
        line = f"{BASE_MODEL_LINE} tnlora preset `{preset}` (random weights: `tnlora.model.load_model('{preset}')`)"
    lines = [t for t in card.text.splitlines() if not t.startswith(BASE_MODEL_LINE)]
    card.text = "\n".join([*lines, "", line, ""])
    from tnlora.io import atomic_path

    with atomic_path(card_file) as tmp:  # in a checkpoint already in place: the old card or the new one
        card.save(tmp)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Sample replies while training

SAMPLES_FILE = "samples.jsonl"


def read_sample_prompts(value: str | list[str] | None) -> list[dict[str, Any]]:
    """``sample_prompts`` as prompts (``{"messages", "system", "record"}``, as ``infer.generate.read_prompts``
    returns them): a list of prompts, one prompt, or a .txt / .jsonl file of prompts (``config.sample_prompts_file``).
    """
    from tnlora.config import sample_prompts_file
    from tnlora.infer.generate import read_prompts

    if not value:
        return []
    path = sample_prompts_file(value)
    if path is not None:
        return read_prompts(path)
    texts = [value] if isinstance(value, str) else value
    return [{"messages": [{"role": "user", "content": t}], "system": None, "record": t} for t in texts]


class SampleRepliesCallback(TrainerCallback):
    """Greedy replies to a few prompts at each evaluation and at the end of training, so the run shows what the
    model answers as it learns: appended to ``samples.jsonl`` in the output dir (``{"step", "prompt", "reply"}``
    lines) and, given a TensorBoard log folder, to TensorBoard's text tab (one tag per prompt, ``samples/N``).

    Sampling leaves training as it was: the CPU and CUDA random states are restored afterwards (dropout and the
    data order draw from them), the model goes back to the train/eval mode it was in, compiled layers run
    eagerly (no graphs compiled for generation), and a bf16 run generates under the same autocast it trains in.
    Only the main process samples. ``last`` holds the latest replies (``{"step", "prompt", "reply"}``).
    """

    def __init__(
        self,
        prompts: list[dict[str, Any]],
        tokenizer,
        template,
        output_dir: str,
        max_new_tokens: int,
        *,
        autocast_dtype=None,
        board=None,
        capture: bool = True,
    ):
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.template = template
        self.path = Path(output_dir) / SAMPLES_FILE
        self.max_new_tokens = max_new_tokens
        self.autocast_dtype = autocast_dtype
        self.board = board  # transformers' TensorBoardCallback: its logging_dir is where the text goes
        # The steps as CUDA graphs on a GPU (False: the same static steps without graphs, on any device, as the
        # CPU tests run them; decode_graph.graph_decoding).
        self.capture = capture
        self.last: list[dict[str, Any]] = []
        self._step = -1
        self._writer = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        # A resumed run redoes the steps after its checkpoint: their earlier samples go.
        if state.is_world_process_zero and self.path.is_file():
            rows = [r for r in _read_jsonl(self.path) if r.get("step", 0) <= state.global_step]
            _write_jsonl(self.path, rows)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.sample(kw.get("model"), state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if self._step != state.global_step:
            self.sample(kw.get("model"), state)
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def sample(self, model, state: TrainerState) -> None:
        """Answer the prompts with ``model`` now and record the replies under ``state.global_step``."""
        if model is None or not state.is_world_process_zero:
            return
        replies = self.replies(model)
        step = state.global_step
        self.last = [
            {"step": step, "prompt": p["messages"][-1]["content"], "reply": r} for p, r in zip(self.prompts, replies)
        ]
        self._step = step
        earlier = _read_jsonl(self.path) if self.path.is_file() else []
        _write_jsonl(self.path, [*earlier, *self.last])
        self._write_board(step)

    def replies(self, model) -> list[str]:
        """Greedy replies of ``model`` to the prompts, leaving its mode and the random states as they were."""
        import torch

        from tnlora.infer.generate import GenerationOptions, generate_replies

        options = GenerationOptions(max_new_tokens=self.max_new_tokens, do_sample=False, repetition_penalty=1.0)
        device = next(model.parameters()).device
        cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        # Without autocast's cache of cast weights: the decode step is captured as a CUDA graph under it, and a
        # graph must not hold a cached cast that the context frees on exit (PyTorch's CUDA-graph notes).
        autocast = torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None,
                                  cache_enabled=False)  # fmt: skip
        replies = [""] * len(self.prompts)
        groups: dict[str | None, list[int]] = {}
        for i, p in enumerate(self.prompts):
            groups.setdefault(p["system"], []).append(i)
        was_training = model.training
        with (
            torch.random.fork_rng(devices=cuda_devices),
            torch.compiler.set_stance("force_eager"),
            autocast,
            self._decode_steps(model),
        ):
            model.eval()
            try:
                for system, idx in groups.items():
                    answers = generate_replies(
                        model, self.tokenizer, self.template, [self.prompts[i]["messages"] for i in idx], options,
                        system=system,
                    )  # fmt: skip
                    for i, answer in zip(idx, answers):
                        replies[i] = answer
            finally:
                model.train(was_training)
        return replies

    def _decode_steps(self, model):
        """The replies' one-token steps as the CUDA graphs `tnlora generate` replays, for this call only
        (``capture``; where the model allows, else eager): each step at a few ms where the eager step's Python
        takes tens of ms at 7B. The prompts' forwards stay eager (no prefill graphs to capture for one use)."""
        from tnlora.infer.decode_graph import graph_decoding

        return graph_decoding(model, capture=self.capture, prefill=False)

    def _write_board(self, step: int) -> None:
        log_dir = getattr(self.board, "logging_dir", None)
        if log_dir is None:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # A writer of its own in the run's log folder: TensorBoard shows its events in the same run.
            self._writer = SummaryWriter(log_dir=log_dir)
        for n, row in enumerate(self.last, start=1):
            # TensorBoard renders text as Markdown: the prompt in bold, the reply as a quote.
            reply = "\n".join(f"> {line}" for line in (row["reply"] or "(empty)").splitlines())
            self._writer.add_text(f"samples/{n}", f"**{row['prompt']}**\n\n{reply}", global_step=step)
        self._writer.flush()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    import json

    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # not a row of ours (the file is rewritten whole, so a line is never cut off)
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    import json

    from tnlora.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
