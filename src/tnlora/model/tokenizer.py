"""Tokenizers: Baichuan's SentencePiece model as a fast tokenizer, and the byte tokenizer of the tiny preset.

The official checkpoints ship ``tokenizer.model`` (SentencePiece BPE, 64,000 pieces, byte fallback) plus a
``tokenizer_config.json`` naming the remote class ``BaiChuanTokenizer``. We register a native fast class under
that name, so ``AutoTokenizer.from_pretrained(<official dir>)`` works without ``trust_remote_code`` and gives
exactly SentencePiece's ids (see ``build_sentencepiece_backend`` for how each SentencePiece rule is mapped).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.tokenization_python import PythonBackend
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from tnlora.errors import ConfigError

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_SPACE = "▁"  # SentencePiece's escaped whitespace (U+2581)
# User-defined symbols that the NFKC map would rewrite (e.g. "，" → ","): they are hidden behind Unicode
# noncharacters (U+FDD0..U+FDEF, never assigned; text that contains them anyway loses SentencePiece parity)
# while the map runs, because SentencePiece never normalises a user-defined symbol. (Private-use characters
# will not do: the Baichuan vocabulary has pieces for some of them.)
_PLACEHOLDERS = [chr(c) for c in range(0xFDD0, 0xFDF0)]

# The "chatml" template of tnlora.data.templates as Jinja (tnlora.model must not import tnlora.data; a test
# checks that this string equals get_template("chatml").to_jinja()).
DEFAULT_CHAT_TEMPLATE = (
    '{%- set ns = namespace(system="You are a helpful assistant.", start=0, after_answer=false) -%}'
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.system = messages[0]['content'] -%}{%- set ns.start = 1 -%}{%- endif -%}"
    '{%- if ns.system -%}{{ "<|im_start|>system\\n" + ns.system + "<|im_end|>\\n" }}{%- endif -%}'
    "{%- for message in messages[ns.start:] -%}"
    "{%- if message['role'] == 'user' -%}"
    '{%- if ns.after_answer -%}{{ "\\n" }}{%- endif -%}'
    '{{ "<|im_start|>user\\n" + message[\'content\'] + "<|im_end|>\\n" }}{%- set ns.after_answer = false -%}'
    "{%- elif message['role'] == 'assistant' -%}"
    '{{ "<|im_start|>assistant\\n" + message[\'content\'] + "<|im_end|>" }}{{ eos_token }}'
    "{%- set ns.after_answer = true -%}"
    "{%- else -%}{{ raise_exception('unsupported role: ' + message['role']) }}{%- endif -%}"
    "{%- endfor -%}"
    '{%- if add_generation_prompt -%}{{ "<|im_start|>assistant\\n" }}{%- endif -%}'
)


def _read_model_proto(model_file: str | os.PathLike[str]) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def build_sentencepiece_backend(model_file: str | os.PathLike[str]) -> Tokenizer:
    """Build a ``tokenizers.Tokenizer`` that reproduces a SentencePiece BPE model's ids exactly.

    Mapping of SentencePiece's rules (all read from the model proto):
    - normalisation: the precompiled NFKC charsmap, except on user-defined symbols (SentencePiece matches them
      on the raw text before normalising), hence the placeholder round trip;
    - dummy prefix: one "▁" before every text chunk (SentencePiece adds it even when the text starts with a
      space; the official slow tokenizer encodes each chunk between special tokens separately, so each gets one);
    - user-defined symbols (digits, "\\n", "，", "<SEP>", …) are atomic: split out before BPE;
    - BPE merges follow piece scores; a word that is itself a piece maps to it directly (``ignore_merges``),
      which is how a multi-character user-defined symbol like "```" keeps its id;
    - unknown characters fall back to byte pieces <0xNN>.
    """
    proto = _read_model_proto(model_file)
    if proto.trainer_spec.model_type != 2:  # 1 unigram, 2 BPE
        raise ConfigError(f"{model_file}: only SentencePiece BPE models are supported")
    pieces = [p.piece for p in proto.pieces]
    types = [p.type for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    normal = {p for p, t in zip(pieces, types) if t == _NORMAL}

    # SentencePiece merges the adjacent pair whose concatenation is the highest-scoring piece.
    ranked = []
    for i, (piece, kind) in enumerate(zip(pieces, types)):
        if kind != _NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, vocab[left], left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]

    unk = pieces[proto.trainer_spec.unk_id]
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            unk_token=unk,
            byte_fallback=proto.trainer_spec.byte_fallback,
            fuse_unk=True,
            ignore_merges=True,
        )
    )

    spec = proto.normalizer_spec
    user_defined = [p for p, t in zip(pieces, types) if t == _USER_DEFINED]
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:
        charsmap = normalizers.Precompiled(spec.precompiled_charsmap)
        rewritten = [u for u in user_defined if charsmap.normalize_str(u) != u]
        free = [c for c in _PLACEHOLDERS if c not in vocab and charsmap.normalize_str(c) == c]
        if len(free) < len(rewritten):
            raise ConfigError(f"{model_file}: too many user-defined symbols that NFKC would rewrite")
        hidden = dict(zip(rewritten, free))
        steps += [normalizers.Replace(u, h) for u, h in hidden.items()]
        steps.append(charsmap)
        steps += [normalizers.Replace(h, u) for u, h in hidden.items()]
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(_SPACE))
    backend.normalizer = normalizers.Sequence(steps)

    splitters: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never", split=True)
    ]
    if user_defined:
        # Longest first: the regex alternation takes the first alternative that matches.
        pattern = "|".join(re.escape(u) for u in sorted(user_defined, key=len, reverse=True))
        splitters.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(splitters)

    steps_out: list[decoders.Decoder] = [
        decoders.Replace(_SPACE, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
    ]
    if spec.add_dummy_prefix:
        steps_out.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps_out)

    specials = [pieces[i] for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)]
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1")
    return backend


class BaiChuanTokenizer(TokenizersBackend):
    """Fast tokenizer for TransNormerLLM / Baichuan-7B's ``tokenizer.model`` (ids equal SentencePiece's).

    Matches the official configuration: no BOS/EOS added, eos ``</s>`` = 2, and pad = ``<unk>`` = 0 (the
    official fine-tune script pads with id 0 and relies on the attention mask; eos is never used as pad).
    Loads from ``tokenizer.json`` when present (what ``save_pretrained`` writes), else builds the backend
    from ``tokenizer.model``. Carries the "chatml" chat template unless the directory provides another.
    """

    vocab_files_names: ClassVar[dict[str, str]] = {
        "vocab_file": "tokenizer.model",
        "tokenizer_file": "tokenizer.json",
    }
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]
    padding_side = "right"

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs: Any) -> dict[str, Any]:
        """Turn the resolved files into a backend: tokenizer.json verbatim, else built from tokenizer.model."""
        tokenizer_file = kwargs.pop("tokenizer_file", None)
        vocab_file = kwargs.get("vocab_file")
        if kwargs.get("tokenizer_object") is None:
            if tokenizer_file and os.path.isfile(tokenizer_file):
                kwargs["tokenizer_object"] = Tokenizer.from_file(tokenizer_file)
            elif vocab_file and os.path.isfile(vocab_file):
                kwargs["tokenizer_object"] = build_sentencepiece_backend(vocab_file)
        return kwargs

    def __init__(
        self,
        vocab_file: str | None = None,
        tokenizer_object: Tokenizer | None = None,
        unk_token: str | AddedToken = "<unk>",
        bos_token: str | AddedToken = "<s>",
        eos_token: str | AddedToken = "</s>",
        pad_token: str | AddedToken | None = "<unk>",
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        chat_template: str | dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        if tokenizer_object is None:
            if vocab_file is None or not os.path.isfile(vocab_file):
                raise ConfigError("BaiChuanTokenizer needs tokenizer.json or tokenizer.model (SentencePiece)")
            tokenizer_object = build_sentencepiece_backend(vocab_file)
        # The official config's auto_map points at remote code that our saved directories do not contain;
        # without it a saved directory also loads with plain transformers (TokenizersBackend + tokenizer.json).
        kwargs.pop("auto_map", None)
        kwargs.pop("sp_model_kwargs", None)
        super().__init__(
            tokenizer_object=tokenizer_object,
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token if pad_token is not None else unk_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            chat_template=chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE,
            **kwargs,
        )

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        # Encoding gives every chunk between added tokens its own dummy prefix, so decoding strips it per chunk
        # too; one backend call over the whole list would leave a stray space after each added token.
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        added = self.added_tokens_decoder
        if not any(i in added for i in token_ids):
            return super()._decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces, **kwargs)
        parts: list[str] = []
        run: list[int] = []
        for token_id in [*token_ids, None]:
            if token_id is not None and token_id not in added:
                run.append(token_id)
                continue
            if run:
                parts.append(super()._decode(run, False, clean_up_tokenization_spaces, **kwargs))
                run = []
            if token_id is not None and not (skip_special_tokens and added[token_id].special):
                parts.append(added[token_id].content)
        return "".join(parts)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Copy tokenizer.model beside tokenizer.json when we have it (tools that read only SentencePiece)."""
        if not self.vocab_file or not os.path.isfile(self.vocab_file):
            return ()
        return super().save_vocabulary(save_directory, filename_prefix)


class ByteTokenizer(PythonBackend):
    """UTF-8 byte tokenizer of the "tiny" preset: 0 ``<unk>`` (also pad), 1 ``<s>``, 2 ``</s>``, 3..258 bytes.

    Needs no files; added tokens (e.g. ChatML markers) get ids from 259 on. No BOS/EOS is added.
    """

    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]
    padding_side = "right"
    _OFFSET = 3

    def __init__(
        self,
        unk_token: str | AddedToken = "<unk>",
        bos_token: str | AddedToken = "<s>",
        eos_token: str | AddedToken = "</s>",
        pad_token: str | AddedToken | None = "<unk>",
        clean_up_tokenization_spaces: bool = False,
        chat_template: str | dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        self._added_tokens_decoder = {
            0: AddedToken(str(unk_token), special=True, normalized=False),
            1: AddedToken(str(bos_token), special=True, normalized=False),
            2: AddedToken(str(eos_token), special=True, normalized=False),
        }
        kwargs.pop("add_bos_token", None)
        kwargs.pop("add_eos_token", None)
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token if pad_token is not None else unk_token,
            chat_template=chat_template if chat_template is not None else DEFAULT_CHAT_TEMPLATE,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            special_tokens_pattern="none",
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return self._OFFSET + 256

    def get_vocab(self) -> dict[str, int]:
        vocab = {self._convert_id_to_token(i): i for i in range(self._OFFSET, self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        # One token per byte, spelled as the latin-1 character of that byte value.
        return [chr(b) for b in text.encode("utf-8")]

    def _convert_token_to_id(self, token: str) -> int:
        if len(token) == 1 and ord(token) < 256:
            return ord(token) + self._OFFSET
        return 0

    def _convert_id_to_token(self, index: int) -> str:
        if self._OFFSET <= index < self.vocab_size:
            return chr(index - self._OFFSET)
        return str(self._added_tokens_decoder.get(index, "<unk>"))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytearray()
        for token in tokens:
            if token in self._added_tokens_encoder:
                data += token.encode("utf-8")
            elif len(token) == 1 and ord(token) < 256:
                data.append(ord(token))
        return data.decode("utf-8", errors="replace")

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return token_ids_0 + (token_ids_1 or [])

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        return ()


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """A preset name ("tiny", any letter case) gives the ByteTokenizer; a directory or Hugging Face Hub id
    (``tnlora.model.hub``) goes through AutoTokenizer.

    The result always has pad_token_id 0 (never eos) and adds no BOS.
    """
    from tnlora.model.configuration import canonical_preset
    from tnlora.model.hub import model_dir

    preset = canonical_preset(str(name_or_path))
    if preset == "tiny":
        return ByteTokenizer()
    if preset is not None:
        raise ConfigError(
            f"tokenizer: preset '{preset}' has no tokenizer files; pass the checkpoint directory "
            "(it holds tokenizer.model)"
        )
    name = model_dir(str(name_or_path), "tokenizer", key="tokenizer")
    try:
        # trust_remote_code=False: the official config.json names remote code (auto_map) and no model_type, so
        # AutoConfig would otherwise ask on the terminal before giving up; our class is found either way.
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tokenizer: cannot load {name}: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = PAD_TOKEN_ID
    return tokenizer


# The pad id of every tnlora tokenizer: 0 (<unk>) as in the official configs, never eos (a padded eos would
# teach the model to stop at every pad).
PAD_TOKEN_ID = 0


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or :data:`PAD_TOKEN_ID` for a tokenizer that has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else PAD_TOKEN_ID


def register_tokenizer_classes() -> None:
    """Register BaiChuanTokenizer (and ByteTokenizer) with AutoTokenizer under the transnormer config.

    Registration puts both class names into AutoTokenizer's table of known tokenizer classes, which is where a
    ``tokenizer_class`` name from tokenizer_config.json is looked up; a known local class wins over the
    remote code named by ``auto_map``. BaiChuanTokenizer is registered last so it is the config's default.
    """
    from tnlora.model.configuration import TransnormerConfig

    AutoTokenizer.register(TransnormerConfig, tokenizer_class=ByteTokenizer, exist_ok=True)
    AutoTokenizer.register(TransnormerConfig, tokenizer_class=BaiChuanTokenizer, exist_ok=True)
