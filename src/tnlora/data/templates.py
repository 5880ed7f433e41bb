"""Chat templates as data: one ``Template`` of strings renders training examples and inference prompts.

A conversation is laid out as (masked parts in brackets, learned parts bare)::

    [system_prefix system system_suffix]
    [user_prefix user user_suffix assistant_prefix] answer end_marker eos
    [turn_separator user_prefix user user_suffix assistant_prefix] answer end_marker eos ...

``render_prompt`` stops after the last ``assistant_prefix``; generation then continues with the answer and
stops at ``end_marker`` or eos. The same object is saved as ``template.json`` beside the adapter, so training
and chat cannot disagree, and ``to_jinja`` gives the equivalent tokenizer ``chat_template``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tnlora.errors import ConfigError
from tnlora.io import atomic_write_json

TEMPLATE_FILE = "template.json"


@dataclass(frozen=True)
class Template:
    """The strings that frame each turn; see the module docstring for the layout."""

    name: str
    system_prefix: str = ""
    system_suffix: str = ""
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""
    end_marker: str = ""  # closes every answer (learned), before eos
    turn_separator: str = ""  # after an answer's eos, before the next user turn (masked)
    add_eos: bool = True  # eos after end_marker (learned)
    default_system: str = ""  # used when a conversation brings no system text
    stop_words: tuple[str, ...] = ()  # further strings that end generation
    special_tokens: tuple[str, ...] = ()  # markers that add_template_tokens can make single tokens

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        out["stop_words"] = list(self.stop_words)
        out["special_tokens"] = list(self.special_tokens)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "template") -> Template:
        """Inverse of ``to_dict``; unknown keys or wrong types are a ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a template must be a JSON object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"{source}: unknown template key(s) {', '.join(unknown)}")
        if "name" not in data:
            raise ConfigError(f"{source}: template key 'name' is missing")
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key == "add_eos":
                if not isinstance(value, bool):
                    raise ConfigError(f"{source}: template key 'add_eos' must be true or false")
            elif key in ("stop_words", "special_tokens"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{source}: template key '{key}' must be a list of strings")
                value = tuple(value)
            elif not isinstance(value, str):
                raise ConfigError(f"{source}: template key '{key}' must be a string")
            values[key] = value
        return cls(**values)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``template.json`` (into ``path`` if it is a directory) atomically; return the file path."""
        target = Path(path)
        if target.is_dir() or not target.suffix:
            target = target / TEMPLATE_FILE
        atomic_write_json(target, self.to_dict())
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Template:
        """Read a template saved by ``save`` (a ``template.json`` file or a directory holding one)."""
        target = Path(path)
        if target.is_dir():
            target = target / TEMPLATE_FILE
        try:
            data = json.loads(target.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"{target}: no such template file") from exc
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{target}: not a valid template JSON file ({exc})") from exc
        return cls.from_dict(data, source=str(target))

    def system_text(self, system: str | None) -> str:
        """The system text a conversation gets: its own, else the template default ("" means none)."""
        return self.default_system if system is None else system

    def render_prompt(
        self, messages: Sequence[Any], system: str | None = None, eos_token: str = "</s>"
    ) -> str:
        """Inference prompt for ``messages`` (alternating user/assistant, ending with user).

        Messages are ``readers.Message`` objects or ``{"role", "content"}`` dicts; a leading system message is
        used as the system text when ``system`` is None. Earlier answers end with end_marker and
        ``eos_token`` (as text; our tokenizers parse it back to the eos id).
        """
        roles_contents = [_role_content(m) for m in messages]
        if roles_contents and roles_contents[0][0] == "system":
            if system is None:
                system = roles_contents[0][1]
            roles_contents = roles_contents[1:]
        if not roles_contents or roles_contents[-1][0] != "user":
            raise ConfigError("render_prompt: the messages must end with a user message")
        parts: list[str] = []
        text = self.system_text(system)
        if text:
            parts.append(self.system_prefix + text + self.system_suffix)
        after_answer = False
        for role, content in roles_contents:
            if role == "user":
                if after_answer:
                    parts.append(self.turn_separator)
                parts.append(self.user_prefix + content + self.user_suffix)
                after_answer = False
            elif role == "assistant":
                parts.append(self.assistant_prefix + content + self.end_marker + (eos_token if self.add_eos else ""))
                after_answer = True
            else:
                raise ConfigError(f"render_prompt: unsupported role '{role}'")
        parts.append(self.assistant_prefix)
        return "".join(parts)

    @property
    def stop_strings(self) -> list[str]:
        """Strings that end generation (for ``generate(stop_strings=...)``); eos is a token, not listed."""
        out = [self.end_marker] if self.end_marker else []
        return out + [w for w in self.stop_words if w not in out]

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """eos plus every stop string that is a single token of ``tokenizer`` (e.g. an added <|im_end|>)."""
        ids = [tokenizer.eos_token_id]
        for word in self.stop_strings:
            token_id = tokenizer.convert_tokens_to_ids(word)
            if (
                isinstance(token_id, int)
                and token_id != tokenizer.unk_token_id
                and word in tokenizer.get_added_vocab()
                and token_id not in ids
            ):
                ids.append(token_id)
        return ids

    def to_jinja(self) -> str:
        """The tokenizer chat_template equivalent to ``render_prompt`` (and to the training layout).

        With ``add_generation_prompt=True`` on messages ending with a user turn it renders exactly
        ``render_prompt``; answers in the history end with end_marker and the tokenizer's eos_token.
        """
        q = _jinja_literal
        eos = "{{ eos_token }}" if self.add_eos else ""
        return (
            f"{{%- set ns = namespace(system={q(self.default_system)}, start=0, after_answer=false) -%}}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set ns.system = messages[0]['content'] -%}{%- set ns.start = 1 -%}{%- endif -%}"
            f"{{%- if ns.system -%}}{{{{ {q(self.system_prefix)} + ns.system + {q(self.system_suffix)} }}}}"
            "{%- endif -%}"
            "{%- for message in messages[ns.start:] -%}"
            "{%- if message['role'] == 'user' -%}"
            f"{{%- if ns.after_answer -%}}{{{{ {q(self.turn_separator)} }}}}{{%- endif -%}}"
            f"{{{{ {q(self.user_prefix)} + message['content'] + {q(self.user_suffix)} }}}}"
            "{%- set ns.after_answer = false -%}"
            "{%- elif message['role'] == 'assistant' -%}"
            f"{{{{ {q(self.assistant_prefix)} + message['content'] + {q(self.end_marker)} }}}}{eos}"
            "{%- set ns.after_answer = true -%}"
            "{%- else -%}{{ raise_exception('unsupported role: ' + message['role']) }}{%- endif -%}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ {q(self.assistant_prefix)} }}}}{{%- endif -%}}"
        )

    def replace(self, **changes: Any) -> Template:
        """A copy with some fields changed (e.g. ``default_system``)."""
        return dataclasses.replace(self, **changes)


TEMPLATES: dict[str, Template] = {
    # The seed tutorial's ChatML; the markers are plain text in the Baichuan vocab unless
    # add_template_tokens() turns them into tokens.
    "chatml": Template(
        name="chatml",
        system_prefix="<|im_start|>system\n",
        system_suffix="<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        end_marker="<|im_end|>",
        turn_separator="\n",
        default_system="You are a helpful assistant.",
        special_tokens=("<|im_start|>", "<|im_end|>"),
    ),
    # The official TransNormerLLM fine-tune script (fine-tune/train.py): plain text, answer + </s>.
    "transnormer": Template(
        name="transnormer",
        system_suffix="\n",
        user_prefix="Human:\n",
        user_suffix="\n",
        assistant_prefix="Assistant:\n",
        turn_separator="\n",
        stop_words=("\nHuman:\n",),
    ),
    # Stanford Alpaca's prompt, as LLaMA-Factory's "alpaca" template.
    "alpaca": Template(
        name="alpaca",
        system_suffix="\n\n",
        user_prefix="### Instruction:\n",
        user_suffix="\n\n",
        assistant_prefix="### Response:\n",
        turn_separator="\n\n",
        default_system=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
        ),
        stop_words=("### Instruction:",),
    ),
    # No framing at all: prompt text, then the answer and eos (completion-style data).
    "raw": Template(name="raw"),
}


def get_template(name: str, **overrides: Any) -> Template:
    """A built-in template by name (chatml, transnormer, alpaca, raw), or a template.json path.

    ``overrides`` change fields, e.g. ``get_template("chatml", default_system="现在你要扮演甄嬛")``.
    """
    if name in TEMPLATES:
        template = TEMPLATES[name]
    elif name.endswith(".json") or os.path.isdir(name):
        template = Template.load(name)
    else:
        raise ConfigError(f"unknown template '{name}' (choose from {', '.join(TEMPLATES)}, or a template.json)")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Template)})
    if unknown:
        raise ConfigError(f"unknown template field(s) {', '.join(unknown)}")
    return template.replace(**overrides) if overrides else template


def add_template_tokens(tokenizer: Any, template: Template) -> list[int]:
    """Make the template's markers (e.g. <|im_start|>, <|im_end|>) single special tokens; return their ids.

    The caller must resize the model's embeddings to ``len(tokenizer)`` and save the new rows with the
    adapter. Calling it again is harmless (existing tokens keep their ids).
    """
    from tokenizers import AddedToken

    if not template.special_tokens:
        return []
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in template.special_tokens], special_tokens=True
    )
    return [tokenizer.convert_tokens_to_ids(t) for t in template.special_tokens]


def _role_content(message: Any) -> tuple[str, str]:
    if isinstance(message, dict):
        return str(message.get("role")), str(message.get("content"))
    return message.role, message.content


def _jinja_literal(text: str) -> str:
    # Jinja string literals take Python-style backslash escapes, which is what json.dumps writes.
    return json.dumps(text, ensure_ascii=False)
