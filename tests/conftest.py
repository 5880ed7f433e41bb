"""Fixtures shared by every test package.

``sp_model_file``: a small SentencePiece BPE model in Baichuan-7B's conventions (unk 0, bos 1, eos 2, byte
fallback, NFKC, dummy prefix, user-defined symbols), trained once per session from tests/fixtures/tokenizer
(see ``fixture_files.build_sample_sentencepiece``); ``SAMPLE_VOCAB_SIZE`` pieces.

``official_dir``: a tiny checkpoint directory in the layout of the official OpenNLPLab releases, for any test
that loads "an official checkpoint":

* ``config.json``: the official 1B file with the sizes shrunk (d = D = 64, 2 layers, 2 heads, glu 128,
  LRPE in layer 0); every other field is kept, ``auto_map``, ``torch_dtype: bfloat16`` and the 64000-token
  vocabulary included (the sample tokenizer's ids all fit), and, like the official file, no ``model_type``.
* ``pytorch_model.bin``: bf16 weights written with ``torch.save``, holding BOTH ``model.embed_tokens.weight``
  and ``lm_head.weight`` (one shared storage, as in the hub files); random, seed 0, std 0.02.
* ``tokenizer.model``: the session's sample SentencePiece model (``sp_model_file``);
  ``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json``: the official 1B files
  (committed under tests/fixtures/models).

The directory is read-only by convention: copy it (``shutil.copytree``) before changing anything.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fixture_files import OFFICIAL_CONFIGS, build_sample_sentencepiece

OFFICIAL_DIR_SIZES = {
    "decoder_embed_dim": 64,
    "hidden_dim": 64,
    "decoder_layers": 2,
    "decoder_attention_heads": 2,
    "glu_dim": 128,
    "linear_use_lrpe_list": [1, 0],
}


@pytest.fixture(scope="session")
def sp_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample SentencePiece model (see the module docstring). Read-only by convention."""
    return build_sample_sentencepiece(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture(scope="session")
def official_dir(tmp_path_factory: pytest.TempPathFactory, sp_model_file: Path) -> Path:
    """A tiny checkpoint directory in the official layout (see the module docstring)."""
    from tnlora.model import TransnormerConfig, TransnormerForCausalLM

    out = tmp_path_factory.mktemp("official")
    official_1b = OFFICIAL_CONFIGS / "1B"
    config = json.loads((official_1b / "config.json").read_text())
    config.update(OFFICIAL_DIR_SIZES)
    (out / "config.json").write_text(json.dumps(config, indent=4))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TransnormerForCausalLM(TransnormerConfig(**config))
    state = model.to(torch.bfloat16).state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    torch.save(state, out / "pytorch_model.bin")

    shutil.copy(sp_model_file, out / "tokenizer.model")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(official_1b / name, out / name)
    return out


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: the tiny model gains nothing from two, and two threads per process on a
    shared 2-core machine (other test processes) slow each step down by up to 10×."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def one_thread():
    """The ``one_torch_thread`` context manager, for fixtures wider than a test."""
    return one_torch_thread


def write_tiny_checkpoint(directory: Path, official_layout: bool = True) -> Path:
    """The tiny preset as a checkpoint directory (safetensors + the byte tokenizer's files), needing nothing
    beside the repository. With ``official_layout`` its config.json is shaped like the official releases': no
    ``model_type``, an ``auto_map`` naming remote code, and the named .py file present (never run)."""
    from tnlora.model import load_model
    from tnlora.model.tokenizer import ByteTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    load_model("tiny").save_pretrained(str(directory))
    ByteTokenizer().save_pretrained(str(directory))
    if official_layout:
        config = json.loads((directory / "config.json").read_text())
        config.pop("model_type", None)
        config["auto_map"] = {
            "AutoConfig": "configuration_transnormer.TransnormerConfig",
            "AutoModelForCausalLM": "modeling_transnormer.TransnormerForCausalLM",
        }
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        (directory / "modeling_transnormer.py").write_text("raise RuntimeError('remote code must never run')\n")
    return directory


@pytest.fixture(scope="session")
def tiny_official_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset saved in the official layout (``write_tiny_checkpoint``); read-only by convention."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-official") / "TransNormerLLM-tiny")


HUB_REPO = "OpenNLPLab/TransNormerLLM-7B"


@pytest.fixture
def hub_cache(tmp_path: Path, tiny_official_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache holding ``HUB_REPO`` (the tiny preset in the official layout), laid out as
    huggingface_hub lays one out (models--owner--name/snapshots/<commit>/…, refs/main); returns the snapshot.

    HF_HUB_CACHE and HF_HUB_OFFLINE point at it, for subprocesses; huggingface_hub reads them into its
    ``constants`` at import, so those are set for this process too.
    """
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / ("models--" + HUB_REPO.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tiny_official_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot
