"""Merged export: base + LoRA adapter → one full checkpoint (safetensors, official key names), atomically."""

from __future__ import annotations

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
    merged = loaded.model.merge_and_unload()
    target = _target_dtype(merged, dtype)
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


def _target_dtype(model, dtype: str) -> torch.dtype:
    if dtype != "auto":
        return resolve_dtype(dtype, torch.device("cpu"))
    recorded = getattr(model.config, "dtype", None)
    if isinstance(recorded, torch.dtype):
        return recorded
    if isinstance(recorded, str) and hasattr(torch, recorded):
        return getattr(torch, recorded)
    return torch.float32


def _chat_template(template) -> str | None:
    """A Jinja chat template equivalent to ``template`` (for tokenizer.apply_chat_template users)."""
    to_jinja = getattr(template, "to_jinja", None)
    if to_jinja is None:
        print("note: this template has no Jinja form; the merged tokenizer gets no chat_template", file=sys.stderr)
        return None
    return to_jinja()
