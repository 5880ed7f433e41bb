"""tnlora.train.callbacks and tnlora.train.plot, driven with hand-made TrainerState objects."""

from __future__ import annotations

import io

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
