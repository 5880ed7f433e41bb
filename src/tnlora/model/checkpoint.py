"""Make an official TransNormerLLM checkpoint directory loadable through transformers' Auto classes.

The published config.json files name remote code (``auto_map``) but carry no ``model_type``. transformers 5
decides between native and remote code by ``model_type`` alone, before any registered class is consulted,
so ``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoTokenizer`` on such a directory ask to trust remote code
(or raise). ``TransnormerForCausalLM.from_pretrained`` and ``tnlora.model.load_model`` never need this.
Adding ``"model_type": "transnormer"`` (what the official config class declares anyway) settles it: the Auto
classes then pick tnlora's registered classes without a prompt, and the official remote code still loads the
directory unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from tnlora.errors import TnloraError
from tnlora.io import atomic_write_json
from tnlora.model.configuration import TransnormerConfig


def add_model_type(directory: str | Path) -> bool:
    """Add ``model_type: "transnormer"`` to ``directory/config.json``; False when it was already there.

    The file is rewritten atomically with every other field kept. A config.json of another model type, or
    one that is not a TransNormerLLM config, is refused.
    """
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TnloraError(f"{path}: no such file (expected a checkpoint directory)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TnloraError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(config, dict):
        raise TnloraError(f"{path}: expected a JSON object")
    model_type = config.get("model_type")
    if model_type == TransnormerConfig.model_type:
        return False
    if model_type is not None:
        raise TnloraError(f"{path}: model_type is {model_type!r}, not a TransNormerLLM checkpoint")
    if "decoder_embed_dim" not in config or "decoder_layers" not in config:
        raise TnloraError(f"{path}: no decoder_embed_dim/decoder_layers fields, not a TransNormerLLM config")
    atomic_write_json(path, {"model_type": TransnormerConfig.model_type, **config})
    return True
