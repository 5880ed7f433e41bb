"""tnlora.train.callbacks and tnlora.train.plot, driven with hand-made TrainerState objects."""

from __future__ import annotations

import io

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from tnlora.train.callbacks import ProgressCallback, format_duration
from tnlora.train.plot import loss_series, plot_loss


def test_format_duration():
    assert format_duration(65) == "1:05"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(float("nan")) == "?"


def test_progress_line_has_loss_tokens_per_second_and_eta(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state, control = TrainerState(), TrainerControl()
    state.max_steps, state.global_step, state.num_input_tokens_seen = 10, 0, 0
    stream = io.StringIO()
    cb = ProgressCallback(stream=stream, tty=False)
    cb.on_train_begin(args, state, control)
    cb._t0 -= 2.0  # pretend 2 s have passed
    state.global_step, state.epoch, state.num_input_tokens_seen = 4, 0.4, 1000
    cb.on_log(args, state, control, logs={"loss": 2.5, "learning_rate": 1e-4})
    line = stream.getvalue().strip()
    assert line.startswith("step 4/10 | epoch 0.40 | loss 2.5000 | lr 1.00e-04")
    assert 400 <= cb.tokens_per_second <= 500  # 1000 tokens in a little over 2 s
    assert "ETA 0:03" in line  # 6 steps left at 0.5 s each
    cb.on_log(args, state, control, logs={"eval_loss": 0.0})
    assert stream.getvalue().splitlines()[-1] == "eval at step 4: loss 0.0000 | ppl 1.00"


def test_progress_on_a_terminal_redraws_one_line(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state, control = TrainerState(), TrainerControl()
    state.max_steps = 3
    stream = io.StringIO()
    cb = ProgressCallback(stream=stream, tty=True)
    cb.on_train_begin(args, state, control)
    for step in (1, 2):
        state.global_step = step
        cb.on_step_end(args, state, control)
    assert stream.getvalue().count("\r\033[K") == 2 and "\n" not in stream.getvalue()


def test_plot_writes_a_png_with_train_and_eval(tmp_path):
    history = [{"loss": 3.0 - 0.1 * i, "step": i} for i in range(1, 8)] + [{"eval_loss": 2.5, "step": 5}]
    train, evals = loss_series(history)
    assert train[0] == (1, 2.9) and evals == [(5, 2.5)]
    out = plot_loss(history, tmp_path / "sub" / "loss.png", title="t")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["loss.png"]  # no temp file left
    assert plot_loss([{"epoch": 1}], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# Sample replies


def _sampler(tmp_path, prompts=("Who are you?", "Say hi."), board=None, capture=True):
    from tnlora.data.templates import get_template
    from tnlora.model.tokenizer import load_tokenizer
    from tnlora.train.callbacks import SampleRepliesCallback, read_sample_prompts

    return SampleRepliesCallback(read_sample_prompts(list(prompts)), load_tokenizer("tiny"), get_template("chatml"),
                                 str(tmp_path), max_new_tokens=6, board=board, capture=capture)  # fmt: skip


def test_sampling_leaves_the_random_state_and_the_train_mode_as_they_were(tmp_path):
    import torch
    from train_helpers import lora_model

    from tnlora.infer.generate import GenerationOptions, generate_replies

    model = lora_model(dropout=0.5)  # in train mode: its dropout would draw from the random state
    sampler = _sampler(tmp_path)
    before = torch.get_rng_state()
    replies = sampler.replies(model)
    assert torch.equal(torch.get_rng_state(), before)
    assert model.training
    options = GenerationOptions(max_new_tokens=6, do_sample=False, repetition_penalty=1.0)
    expected = generate_replies(model.eval(), sampler.tokenizer, sampler.template,
                                [[{"role": "user", "content": p}] for p in ("Who are you?", "Say hi.")], options)  # fmt: skip
    assert replies == expected


def test_samples_are_appended_per_step_and_a_resumed_run_drops_the_steps_it_redoes(tmp_path):
    import json

    from train_helpers import lora_model

    model = lora_model().eval()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    state, control = TrainerState(), TrainerControl()
    sampler = _sampler(tmp_path)
    for step in (2, 4):
        state.global_step = step
        sampler.on_evaluate(args, state, control, model=model)
    sampler.on_train_end(args, state, control, model=model)  # step 4 was sampled already
    path = tmp_path / "samples.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(2, "Who are you?"), (2, "Say hi."), (4, "Who are you?"),
                                                       (4, "Say hi.")]  # fmt: skip
    assert sampler.last == rows[2:]
    state.global_step = 2  # resumed from checkpoint-2
    _sampler(tmp_path).on_train_begin(args, state, control)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 2]


def test_samples_go_to_tensorboards_text_tab(tmp_path):
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from train_helpers import lora_model

    board = SimpleNamespace(logging_dir=str(tmp_path / "runs"))
    sampler = _sampler(tmp_path, prompts=("Who are you?",), board=board)
    state = TrainerState()
    state.global_step = 3
    sampler.sample(lora_model().eval(), state)
    sampler.on_train_end(TrainingArguments(output_dir=str(tmp_path), report_to=[]), state, TrainerControl())
    events = EventAccumulator(board.logging_dir, size_guidance={"tensors": 0})
    events.Reload()
    (text,) = events.Tensors("samples/1/text_summary")
    reply = sampler.last[0]["reply"]
    assert text.step == 3
    assert text.tensor_proto.string_val[0].decode() == f"**Who are you?**\n\n> {reply or '(empty)'}"


def test_sample_prompts_come_from_a_list_one_prompt_or_a_file(tmp_path):
    import pytest

    from tnlora.errors import DataError
    from tnlora.train.callbacks import read_sample_prompts

    assert [p["messages"] for p in read_sample_prompts(["a", "b"])] == [[{"role": "user", "content": "a"}],
                                                                      [{"role": "user", "content": "b"}]]  # fmt: skip
    assert [p["messages"][0]["content"] for p in read_sample_prompts("Who are you?")] == ["Who are you?"]
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert [p["messages"][0]["content"] for p in read_sample_prompts(str(tmp_path / "p.txt"))] == ["first", "second"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi", "system": "Be brief."}\n')
    (prompt,) = read_sample_prompts(str(tmp_path / "p.jsonl"))
    assert prompt["system"] == "Be brief." and prompt["messages"] == [{"role": "user", "content": "hi"}]
    with pytest.raises(DataError, match="prompts file not found"):
        read_sample_prompts(str(tmp_path / "missing.txt"))


def _recording_removals(monkeypatch) -> list[list[object]]:
    """The runners installed for each sampling call, as they were when it removed them (each a list of
    ``DecodeStepRunner``): records that the static steps ran, and that they went afterwards."""
    from tnlora.infer import decode_graph

    removed: list[list[object]] = []
    remove = decode_graph.remove_graph_decoding

    def recording(model):
        graphs = decode_graph.installed_graphs(model)
        if graphs is not None:  # (installing removes whatever was there first: nothing, here)
            removed.append(list(graphs.runners.values()))
        remove(model)

    monkeypatch.setattr(decode_graph, "remove_graph_decoding", recording)
    return removed


def test_sample_replies_through_the_static_steps_equal_the_eager_ones(tmp_path, monkeypatch):
    from train_helpers import lora_model

    model = lora_model(dropout=0.5)
    removed = _recording_removals(monkeypatch)
    eager = _sampler(tmp_path).replies(model)  # graphs asked for on a CPU model: no runners, the eager steps
    assert removed == []
    assert _sampler(tmp_path, capture=False).replies(model) == eager
    assert len(removed) == 1 and len(removed[0]) == 1  # one runner (both prompts in one batch) took the steps
    assert model.get_base_model().step_decoder is None and model.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_sample_replies_replay_captured_steps_and_free_them(tmp_path, monkeypatch):
    """On a GPU the replies' steps are captured graphs, for the call only: fp32 gives the eager replies; a bf16
    base with fp32 adapters under the training autocast captures too (no autocast cache in the graph)."""
    from train_helpers import lora_model

    from tnlora.infer.generate import GenerationOptions, generate_replies

    options = GenerationOptions(max_new_tokens=6, do_sample=False, repetition_penalty=1.0)
    conversations = [[{"role": "user", "content": p}] for p in ("Who are you?", "Say hi.")]
    model = lora_model(device="cuda")
    expected = generate_replies(model.eval(), _sampler(tmp_path).tokenizer, _sampler(tmp_path).template,
                                conversations, options)  # fmt: skip
    model.train()
    removed = _recording_removals(monkeypatch)
    assert _sampler(tmp_path).replies(model) == expected
    (runner,) = removed[0]
    assert runner.capture and _captured(runner)
    assert model.get_base_model().step_decoder is None

    mixed = lora_model(device="cuda", dtype=torch.bfloat16)
    sampler = _sampler(tmp_path)
    sampler.autocast_dtype = torch.bfloat16
    replies = sampler.replies(mixed)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    (runner,) = removed[1]
    assert _captured(runner) and mixed.get_base_model().step_decoder is None


def _captured(runner) -> bool:
    """Whether ``runner`` replayed a captured graph: its own step's or the greedy device loop's."""
    return runner.graph is not None or any(steps.graph is not None for steps in runner.greedy.values())
