"""Merged export: base + LoRA adapter → one full checkpoint (safetensors, official key names), atomically."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tnlora.errors import TnloraError
from tnlora.infer.loading import TEMPLATE_FILE, load_for_inference, resolve_dtype
from tnlora.io import atomic_dir


def merge_adapter(model: str | None, adapter: str | Path, output: str | Path, dtype: str = "auto") -> Path:
    """Fold the adapter into the base weights and save model, tokenizer, template and chat template.

    The merge happens in fp32 (adding a low-rank product to bf16 weights would round it away), then the
    result is cast to ``dtype`` ("auto": the base checkpoint's dtype, fp32 for presets).
    """
    output = Path(output)
    if adapter and Path(output).resolve() == Path(adapter).resolve():
        raise TnloraError("--output: must differ from --adapter")
    loaded = load_for_inference(model, adapter, dtype="float32", device="cpu")
    target = _target_dtype(loaded.base, dtype)
    merged = loaded.model.merge_and_unload()
    merged.to(target)
    merged.config.use_cache = True
    tokenizer = loaded.tokenizer
    chat_template = _chat_template(loaded.template)
    if chat_template:
        tokenizer.chat_template = chat_template
    with atomic_dir(output) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        loaded.template.save(tmp / TEMPLATE_FILE)
    return output


def _target_dtype(base: str, dtype: str) -> torch.dtype:
    """``dtype``, or for "auto" the dtype the base checkpoint's config.json records (fp32 for presets)."""
    if dtype != "auto":
        return resolve_dtype(dtype, torch.device("cpu"))
    config_file = Path(base) / "config.json"
    if config_file.is_file():
        # Read from disk: the model in memory was loaded in fp32 for the merge and says so.
        config = json.loads(config_file.read_text(encoding="utf-8"))
        recorded = config.get("dtype") or config.get("torch_dtype")
        if isinstance(recorded, str) and isinstance(getattr(torch, recorded, None), torch.dtype):
            return getattr(torch, recorded)
    return torch.float32


def _chat_template(template) -> str | None:
    """A Jinja chat template equivalent to ``template`` (for tokenizer.apply_chat_template users)."""
    to_jinja = getattr(template, "to_jinja", None)
    if to_jinja is None:
        print("note: this template has no Jinja form; the merged tokenizer gets no chat_template", file=sys.stderr)
        return None
    return to_jinja()
