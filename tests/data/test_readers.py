"""tnlora.data.readers: every accepted format, the LLaMA-Factory registry, and one test per malformed input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tnlora.data.readers import Conversation, Message, load_conversations, read_conversations
from tnlora.errors import DataError, TnloraError


def write(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return path


def jsonl(records: list[object]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def turns(conv: Conversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conv.messages]


# ----------------------------------------------------------------------------------------------------------------
# Formats


def test_bundled_registry_loads_datasets_by_name(data_dir):
    convs = load_conversations("quickstart_alpaca, quickstart_chat", dataset_dir=data_dir)
    assert len(convs) == 50 + 10
    assert convs[0].source.endswith("quickstart_alpaca.json, record 1")
    assert turns(convs[0]) == [("user", "What is the capital of France?"),
                               ("assistant", "The capital of France is Paris.")]  # fmt: skip
    assert turns(convs[50])[:2] == [("user", "Hi!"), ("assistant", "Hello! How can I help you today?")]
    assert convs[50].system == "You are Tini, a tiny and friendly assistant."
    assert len(load_conversations(["quickstart_chat"], dataset_dir=data_dir)) == 10


def test_shared_registry_loads_datasets_by_name(shared_data_dir):
    # LLaMA-Factory's own dataset_info.json (104 entries, most of them hub-only) and two of its demo sets.
    convs = load_conversations("alpaca_en_demo, identity", dataset_dir=shared_data_dir)
    assert len(convs) == 999 + 91
    assert convs[0].source.endswith("alpaca_en_demo.json, record 1")
    assert turns(convs[999])[0] == ("user", "hi")
    assert "{{name}}" in convs[999].messages[1].content
    assert len(load_conversations(["identity"], dataset_dir=shared_data_dir)) == 91


def test_alpaca_joins_instruction_and_input_and_keeps_system_and_history(tmp_path):
    path = write(tmp_path / "a.json", [
        {"instruction": "Translate", "input": "你好", "output": "Hello", "system": "Be brief.",
         "history": [["q1", "a1"], ["q2", "a2"]]},
        {"instruction": "Only instruction", "input": "", "output": "ok"},
    ])  # fmt: skip
    first, second = load_conversations(str(path))
    assert first.system == "Be brief."
    assert turns(first) == [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"),
                            ("user", "Translate\n你好"), ("assistant", "Hello")]  # fmt: skip
    assert second.system is None and turns(second) == [("user", "Only instruction"), ("assistant", "ok")]


def test_sharegpt_openai_and_jsonl_are_detected(tmp_path):
    sharegpt = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "u1"},
                                  {"from": "gpt", "value": "a1"}, {"from": "human", "value": "u2"},
                                  {"from": "gpt", "value": "a2"}]}  # fmt: skip
    openai = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                           {"role": "assistant", "content": [{"type": "text", "text": "a1"}]}]}  # fmt: skip
    a = load_conversations(str(write(tmp_path / "s.json", [sharegpt])))[0]
    assert a.system == "S" and turns(a) == [("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2")]
    b = load_conversations(str(write(tmp_path / "o.jsonl", jsonl([openai, openai]))))
    assert len(b) == 2 and b[1].system == "S" and turns(b[1]) == [("user", "u1"), ("assistant", "a1")]
    assert b[1].source.endswith("o.jsonl, record 2")


def test_datasets_directories_and_folders_of_files(tmp_path):
    import datasets

    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "dict"))
    write(tmp_path / "folder" / "part1.jsonl", jsonl(rows[:1]))
    write(tmp_path / "folder" / "part2.json", rows[1:])
    assert [turns(c)[1][1] for c in load_conversations(str(tmp_path / "single"))] == ["a0", "a1", "a2"]
    assert len(load_conversations(str(tmp_path / "dict"))) == 2
    assert len(load_conversations(str(tmp_path / "folder"))) == 3


def test_registry_columns_tags_split_and_num_samples(tmp_path):
    write(tmp_path / "sub" / "chat.jsonl", jsonl([
        {"dialog": [{"speaker": "me", "text": "hi"}, {"speaker": "bot", "text": "hello"}], "persona": "P"},
    ] * 3))  # fmt: skip
    write(tmp_path / "qa.json", [{"q": "Q", "a": "A", "sys": "S"}])
    write(tmp_path / "dataset_info.json", {
        "chat": {"file_name": "sub/chat.jsonl", "formatting": "sharegpt", "num_samples": 2,
                 "columns": {"messages": "dialog", "system": "persona"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}},
        "qa": {"file_name": "qa.json", "columns": {"prompt": "q", "response": "a", "system": "sys"}},
    })  # fmt: skip
    convs = load_conversations("chat,qa", dataset_dir=str(tmp_path))
    assert len(convs) == 3
    assert convs[0].system == "P" and turns(convs[0]) == [("user", "hi"), ("assistant", "hello")]
    assert convs[2].system == "S" and turns(convs[2]) == [("user", "Q"), ("assistant", "A")]


def test_plain_paths_still_work_beside_a_registry(tmp_path, data_dir):
    convs = load_conversations(str(data_dir / "quickstart_alpaca.json"), dataset_dir=str(data_dir))
    assert len(convs) == 50


# ----------------------------------------------------------------------------------------------------------------
# Malformed input: one clear line naming file, record and field


def error_of(tmp_path: Path, content: object, name: str = "bad.json", **kwargs) -> str:
    path = write(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        load_conversations(str(path), **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert isinstance(info.value, TnloraError)
    return message


GOOD = {"instruction": "q", "input": "", "output": "a"}


def test_invalid_json_array_reports_line_and_column(tmp_path):
    message = error_of(tmp_path, '[\n  {"instruction": "q", "output": "a"},\n  {"instruction": "q" "output": 1}\n]')
    assert "invalid JSON at line 3, column" in message


def test_invalid_json_line_reports_record_and_line(tmp_path):
    message = error_of(tmp_path, jsonl([GOOD]) + "\n" + '{"instruction": "q", "output": }\n', name="bad.jsonl")
    assert "record 2" in message and "invalid JSON on line 3, column" in message


def test_missing_field(tmp_path):
    message = error_of(tmp_path, [GOOD, {"instruction": "q", "input": ""}])
    assert message.endswith("bad.json, record 2, field 'output': missing field")


def test_wrong_type(tmp_path):
    message = error_of(tmp_path, [{"instruction": "q", "output": 42}])
    assert "record 1, field 'output': expected a string, got a number" in message


def test_empty_response(tmp_path):
    message = error_of(tmp_path, [GOOD, GOOD, {"instruction": "q", "output": "  "}])
    assert "record 3, field 'output': empty response" in message


def test_unknown_role(tmp_path):
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]}
    message = error_of(tmp_path, [record])
    assert "record 1, field 'conversations[1].from': unknown role 'bot'" in message


def test_tool_roles_are_refused_by_name(tmp_path):
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{}"}]}
    assert "role 'function_call' (tool use) is not supported" in error_of(tmp_path, [record])


def test_conversation_without_assistant_turn(tmp_path):
    record = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}
    message = error_of(tmp_path, [record])
    assert "record 1, field 'messages': a conversation with no assistant turn" in message


def test_turns_must_alternate_and_end_with_an_answer(tmp_path):
    two_users = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                              {"role": "assistant", "content": "c"}]}  # fmt: skip
    assert "turn 2 is user" in error_of(tmp_path, [two_users])
    trailing = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "user", "content": "c"}]}  # fmt: skip
    assert "ends with a user turn" in error_of(tmp_path, [trailing])


def test_file_that_is_not_utf8(tmp_path):
    message = error_of(tmp_path, '[{"instruction": "q", "output": "ok"},\n {"instruction": "é"}]'.encode("latin-1"))
    assert "not UTF-8 text (byte 0xe9 on line 2)" in message


def test_empty_dataset(tmp_path):
    assert "the dataset is empty" in error_of(tmp_path, [])
    assert "the dataset is empty" in error_of(tmp_path, "\n\n", name="empty.jsonl")


def test_record_that_is_not_an_object(tmp_path):
    assert "record 2: expected a JSON object, got a list" in error_of(tmp_path, [GOOD, ["q", "a"]])


def test_registry_unknown_name_and_hub_only_entries(tmp_path, data_dir):
    with pytest.raises(DataError, match=r"dataset_info.json: unknown dataset 'nope': not a file and not registered"):
        load_conversations("quickstart_alpaca,nope", dataset_dir=str(data_dir))
    hub = tmp_path / "hub"  # an entry as LLaMA-Factory's registry writes it
    write(hub / "dataset_info.json", {"belle_2m": {"hf_hub_url": "BelleGroup/train_2M_CN",
                                                   "ms_hub_url": "AI-ModelScope/train_2M_CN"}})  # fmt: skip
    with pytest.raises(DataError, match=r"field .belle_2m.: dataset .belle_2m. is hub-only .*needs a local file: download it"):
        load_conversations("belle_2m", dataset_dir=str(hub))
    with pytest.raises(DataError, match="preference \\(ranking\\) dataset"):
        write(tmp_path / "p.json", [GOOD])
        write(tmp_path / "dataset_info.json", {"p": {"file_name": "p.json", "ranking": True}})
        load_conversations("p", dataset_dir=str(tmp_path))


def test_registry_file_missing_and_registry_invalid(tmp_path):
    write(tmp_path / "dataset_info.json", {"x": {"file_name": "missing.json"}})
    with pytest.raises(DataError, match=r"missing\.json: file of dataset 'x' not found"):
        load_conversations("x", dataset_dir=str(tmp_path))
    write(tmp_path / "dataset_info.json", '{"x": {"file_name": "a.json",}}')
    with pytest.raises(DataError, match=r"dataset_info\.json: invalid JSON at line 1"):
        load_conversations("x", dataset_dir=str(tmp_path))


def test_unknown_path_without_registry(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load_conversations(str(tmp_path / "nothing.json"))


def test_skip_invalid_counts_and_keeps_the_first_reason(tmp_path):
    bad = [GOOD, {"instruction": "q"}, GOOD, {"instruction": "q", "output": ""}]
    path = write(tmp_path / "mixed.json", bad)
    convs, report = read_conversations(str(path), skip_invalid=True)
    assert len(convs) == 2 and report.skipped == 2 and report.records == 4
    assert "record 2, field 'output': missing field" in report.first_error
    assert "skipped 2 invalid record(s)" in report.summary()
    with pytest.raises(DataError, match="no usable records"):
        load_conversations(str(write(tmp_path / "allbad.json", bad[1:2])), skip_invalid=True)


def test_message_dataclasses_are_plain_values():
    conv = Conversation([Message("user", "q"), Message("assistant", "a")], None, "x")
    assert conv.messages[1] == Message("assistant", "a")
