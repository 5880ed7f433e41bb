"""tnlora generate: prompt files → JSONL, batched with left padding (equal to one prompt at a time)."""

from __future__ import annotations

import json

import pytest

from tnlora.cli import main
from tnlora.errors import DataError
from tnlora.infer.generate import GenerationOptions, cut_at_stop, generate_replies, read_prompts
from tnlora.infer.loading import load_for_inference

GREEDY = ["--do_sample", "false", "--max_new_tokens", "10", "--repetition_penalty", "1.0"]


def test_text_prompts_give_one_jsonl_row_each(adapter_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n\nSay hello.\nWho are you?\n", encoding="utf-8")
    out = tmp_path / "out" / "replies.jsonl"
    code = main(["generate", "--adapter", str(adapter_dir), "--prompts", str(prompts), "--output", str(out), *GREEDY])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["What is the capital of France?", "Say hello.", "Who are you?"]
    assert all(isinstance(r["response"], str) for r in rows)
    assert "wrote 3 replies" in capsys.readouterr().err
    assert [p.name for p in out.parent.iterdir()] == ["replies.jsonl"]  # no temp file left behind


def test_jsonl_prompts_keep_their_fields_and_messages(adapter_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    records = [
        {"id": 1, "prompt": "Say goodbye."},
        {"id": 2, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "Name a color."}]},
        {"id": 3, "prompt": "Name a planet.", "system": "You are terse."},
    ]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "replies.jsonl"
    assert main(["generate", "--adapter", str(adapter_dir), "--prompts", str(prompts), "--output", str(out), *GREEDY]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert rows[1]["messages"] == records[1]["messages"] and "response" in rows[1]


def test_batched_generation_equals_one_prompt_at_a_time(adapter_dir):
    loaded = load_for_inference(None, adapter_dir)
    options = GenerationOptions(max_new_tokens=10, do_sample=False, repetition_penalty=1.0)
    convs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "What is the capital of a country that is far away from here?"}],
        [{"role": "user", "content": "Count from one to five."}],
    ]
    batched = generate_replies(loaded.model, loaded.tokenizer, loaded.template, convs, options, batch_size=3)
    single = [
        generate_replies(loaded.model, loaded.tokenizer, loaded.template, [c], options, batch_size=1)[0] for c in convs
    ]
    assert batched == single
    assert any(batched)  # something was generated


def test_bad_prompt_files_are_data_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl, record 2: not valid JSON"):
        read_prompts(bad)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(DataError, match="record 1, field 'messages': the last message must be the user's"):
        read_prompts(wrong)
    assert main(["generate", "--model", "tiny", "--prompts", str(tmp_path / "none.txt"), "--output", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.rstrip().endswith("none.txt: prompts file not found")


def test_cut_at_stop():
    assert cut_at_stop("answer<|im_end|>\nmore", ["<|im_end|>"]) == "answer"
    assert cut_at_stop("no stop", ["<|im_end|>"]) == "no stop"
    assert cut_at_stop("ran out <|im_e", ["<|im_end|>"], final=True) == "ran out "
    assert cut_at_stop("ran out <|im_e", ["<|im_end|>"]) == "ran out <|im_e"
    assert cut_at_stop("a < b <", ["<|im_end|>"], final=True) == "a < b <"


class _StopsAfter:
    """The loaded model, whose generate() is interrupted (Ctrl-C) after ``calls`` calls; counts its calls."""

    def __init__(self, model, calls: int | None):
        self.model, self.calls, self.seen = model, calls, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, *args, **kwargs):
        if self.calls is not None and self.seen >= self.calls:
            raise KeyboardInterrupt
        self.seen += 1
        return self.model.generate(*args, **kwargs)


def test_generate_keeps_finished_batches_and_a_rerun_continues(adapter_dir, tmp_path):
    import dataclasses

    from tnlora.infer.generate import generate_file, partial_path

    loaded = load_for_inference(None, adapter_dir)
    options = GenerationOptions(max_new_tokens=6, do_sample=False, repetition_penalty=1.0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Say the number {n}.\n" for n in range(7)), encoding="utf-8")
    whole = tmp_path / "whole.jsonl"
    generate_file(loaded, prompts, whole, options, batch_size=2)
    out = tmp_path / "out.jsonl"
    stopped = dataclasses.replace(loaded, model=_StopsAfter(loaded.model, calls=2))
    with pytest.raises(KeyboardInterrupt):
        generate_file(stopped, prompts, out, options, batch_size=2)
    assert not out.exists()
    kept = partial_path(out).read_text(encoding="utf-8").splitlines()
    assert len(kept) == 1 + 4  # the header and two batches of two
    counted = dataclasses.replace(loaded, model=_StopsAfter(loaded.model, calls=None))
    notes: list[str] = []
    assert generate_file(counted, prompts, out, options, batch_size=2, log=notes.append) == 7
    assert counted.model.seen == 2  # the three prompts left: batches of 2 and 1
    assert notes == [f"continuing: 4 of 7 prompts already answered in {partial_path(out)}"]
    assert out.read_text(encoding="utf-8") == whole.read_text(encoding="utf-8")
    assert not partial_path(out).exists()


def test_a_partial_file_of_other_prompts_is_not_mixed_in(adapter_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\nHello\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.partial").write_text('{"tnlora_generate": "other"}\n{"index": 0, "response": "x"}\n')
    argv = ["generate", "--adapter", str(adapter_dir), "--prompts", str(prompts), "--output", str(out), *GREEDY]
    assert main(argv) == 2
    assert "out.jsonl.partial holds replies to other prompts or settings; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert [json.loads(line)["response"] != "x" for line in out.read_text().splitlines()] == [True, True]


def test_generate_replaces_only_its_own_output(adapter_dir, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n", encoding="utf-8")
    mine = tmp_path / "notes.jsonl"
    mine.write_text('{"note": "mine"}\n')
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--adapter", str(adapter_dir), "--prompts", str(prompts), *GREEDY, "--output"]
    assert main([*argv, "."]) == 2
    assert capsys.readouterr().err == "error: --output: . is a directory; name a file for generated replies (JSONL)\n"
    assert main([*argv, str(mine)]) == 2
    assert capsys.readouterr().err == f"error: --output: {mine} exists; pass --overwrite to replace it\n"
    assert main([*argv, str(mine), "--overwrite"]) == 2
    assert "is not generated replies (JSONL) written by tnlora" in capsys.readouterr().err
    assert mine.read_text() == '{"note": "mine"}\n'
    assert main([*argv, "replies.jsonl"]) == 0
    assert main([*argv, "replies.jsonl", "--overwrite"]) == 0
