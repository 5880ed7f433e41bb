"""tnlora.data.templates: one template object for training, prompts, Jinja and template.json."""

from __future__ import annotations

import copy

import pytest

from fixture_files import SAMPLE_VOCAB_SIZE
from tnlora.data.readers import Message
from tnlora.data.templates import TEMPLATES, Template, add_template_tokens, get_template
from tnlora.errors import ConfigError
from tnlora.model.tokenizer import DEFAULT_CHAT_TEMPLATE

CONVERSATIONS = {
    "single": ([Message("user", "你是谁？")], None),
    "system": ([Message("user", "Hello\nthere")], "现在你要扮演皇帝身边的女人--甄嬛"),
    "no-system": ([Message("user", "hi")], ""),
    "multi": ([Message("user", "q1"), Message("assistant", "a1"), Message("user", "q2"), Message("assistant", "a2"),
               Message("user", "q3")], "S"),
}  # fmt: skip


def as_dicts(messages: list[Message], system: str | None) -> list[dict[str, str]]:
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": m.role, "content": m.content} for m in messages]


def test_tokenizer_default_chat_template_is_the_chatml_template():
    assert get_template("chatml").to_jinja() == DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
def test_apply_chat_template_equals_render_prompt(any_tok, name, case):
    template = get_template(name)
    messages, system = CONVERSATIONS[case]
    expected = template.render_prompt(messages, system)
    rendered = any_tok.apply_chat_template(
        as_dicts(messages, system), chat_template=template.to_jinja(), tokenize=False, add_generation_prompt=True
    )
    assert rendered == expected
    assert expected.endswith(template.assistant_prefix)
    if system is None and template.default_system:
        assert template.default_system in expected


def test_chatml_prompt_is_the_seed_layout():
    prompt = get_template("chatml").render_prompt([{"role": "user", "content": "Q"}], system="S")
    assert prompt == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    multi = get_template("chatml").render_prompt(CONVERSATIONS["multi"][0], "S")
    assert "<|im_start|>assistant\na1<|im_end|></s>\n<|im_start|>user\nq2" in multi


def test_transnormer_prompt_is_the_official_format():
    prompt = get_template("transnormer").render_prompt([Message("user", "娘娘。")])
    assert prompt == "Human:\n娘娘。\nAssistant:\n"
    assert get_template("transnormer").render_prompt([Message("user", "x")], "Instr") == "Instr\nHuman:\nx\nAssistant:\n"


def test_save_and_load_round_trip(tmp_path):
    template = get_template("chatml", default_system="现在你要扮演甄嬛")
    path = template.save(tmp_path)
    assert path == tmp_path / "template.json"
    assert Template.load(tmp_path) == template == Template.load(path)
    assert get_template(str(path)) == template
    other = get_template("transnormer").save(tmp_path / "custom.json")
    assert Template.load(other) == get_template("transnormer")


def test_bad_templates_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown template 'vicuna'"):
        get_template("vicuna")
    with pytest.raises(ConfigError, match="unknown template key"):
        Template.from_dict({"name": "x", "user_prefx": "U"})
    with pytest.raises(ConfigError, match="'user_prefix' must be a string"):
        Template.from_dict({"name": "x", "user_prefix": 3})
    (tmp_path / "template.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid template JSON"):
        Template.load(tmp_path)
    with pytest.raises(ConfigError, match="no such template file"):
        Template.load(tmp_path / "nothing.json")


def test_stop_strings_and_stop_token_ids(sp_tok, byte_tok):
    chatml, transnormer = get_template("chatml"), get_template("transnormer")
    assert chatml.stop_strings == ["<|im_end|>"]
    assert chatml.stop_token_ids(sp_tok) == [2]  # the marker is plain text in a SentencePiece vocabulary
    assert transnormer.stop_token_ids(sp_tok) == [2] and "\nHuman:\n" in transnormer.stop_strings
    ids = add_template_tokens(byte_tok, chatml)
    assert ids == [259, 260]
    assert chatml.stop_token_ids(byte_tok) == [2, 260]


def test_add_template_tokens_makes_markers_single_special_tokens(sp_tok):
    tok = copy.deepcopy(sp_tok)
    n = SAMPLE_VOCAB_SIZE
    ids = add_template_tokens(tok, get_template("chatml"))
    assert ids == [n, n + 1] and len(tok) == n + 2
    assert add_template_tokens(tok, get_template("chatml")) == ids  # idempotent
    text = get_template("chatml").render_prompt([Message("user", "hi")], "S")
    encoded = tok(text, add_special_tokens=False)["input_ids"]
    assert encoded.count(n) == 3 and encoded.count(n + 1) == 2
    assert add_template_tokens(tok, get_template("transnormer")) == []
    assert len(sp_tok) == n  # the session's fixture is untouched
