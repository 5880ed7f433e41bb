"""Merged export: base + LoRA adapter → one full checkpoint (safetensors, official key names), atomically.

The output directory is checked before anything loads (``tnlora.outputs``): an existing non-empty one is
replaced only with ``overwrite`` and only when it is an earlier merge holding nothing else; the base model, the
adapter and the current folder are never valid outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tnlora.config import RUN_CONFIG_NAME
from tnlora.data.templates import TEMPLATE_FILE
from tnlora.errors import TnloraError
from tnlora.infer.loading import base_model_of, inference_quantization, load_for_inference, resolve_dtype
from tnlora.io import atomic_dir
from tnlora.model.quantization import check_quantization_available
from tnlora.outputs import claim_dir, plan_dir

EXPORT_DEVICES = ("cpu", "auto")


def merge_adapter(
    model: str | None,
    adapter: str | Path,
    output: str | Path,
    dtype: str = "auto",
    *,
    overwrite: bool = False,
    max_shard_size_gb: int | None = None,
    device: str = "cpu",
    template: str | None = None,
) -> Path:
    """Fold the adapter into the base weights and save model, tokenizer, template and chat template.

    The merge happens in fp32 (adding a low-rank product to bf16 weights would round it away), then the
    result is cast to ``dtype`` ("auto": the base checkpoint's dtype, fp32 for presets). An adapter trained on a
    quantized base (QLoRA: its run's tnlora_run.yaml records quantization_bit) is merged onto that base as it
    trained on it: loaded fresh from the checkpoint, quantized on the GPU as training did, and dequantized to the
    bf16 weights the quantized layers compute with; never into the 4-bit weights themselves. ``device`` "auto" merges
    on the GPU when there is one (LLaMA-Factory's ``export_device``); ``max_shard_size_gb`` splits the weights
    into files of at most that many GB (``export_size``). ``template`` overrides the adapter's saved template
    (the exported chat template).
    """
    output = Path(output)
    if device not in EXPORT_DEVICES:
        raise TnloraError(f"--export_device: must be one of {', '.join(EXPORT_DEVICES)}; got {device!r}")
    if max_shard_size_gb is not None and max_shard_size_gb < 1:
        raise TnloraError(f"--export_size: must be >= 1 (GB per weights file), got {max_shard_size_gb}")
    base, run_dir, run_cfg = base_model_of(model, adapter)
    plan_dir(
        output,
        "merge",
        key="--output",
        overwrite=overwrite,
        overwrite_flag="--overwrite to replace it",
        inputs={"the adapter": adapter, "the adapter's run": run_dir, "the base model": _local(base)},
    )
    quantization = inference_quantization(run_cfg)
    if quantization is not None:
        # The adapter learned on the quantized weights: it is merged onto them, dequantized (never into 4-bit
        # weights, which would round it away).
        check_quantization_available(
            "--adapter",
            f"this adapter was trained on a {quantization.describe()} base ({run_dir / RUN_CONFIG_NAME}), and "
            "tnlora merge quantizes the base as training did to merge onto its dequantized weights",
        )
        print(f"merging onto the base as the adapter trained on it: {quantization.describe()}, dequantized",
              file=sys.stderr)  # fmt: skip
    loaded = load_for_inference(
        model,
        adapter,
        template=template,
        dtype="float32",
        device="auto" if device == "auto" else "cpu",
        dequantize=quantization is not None,
    )
    target = _target_dtype(loaded.base, dtype)
    merged = loaded.model.merge_and_unload()
    merged.to(device="cpu", dtype=target)
    merged.config.use_cache = True
    tokenizer = loaded.tokenizer
    chat_template = _chat_template(loaded.template)
    if chat_template:
        tokenizer.chat_template = chat_template
    shards = {} if max_shard_size_gb is None else {"max_shard_size": f"{max_shard_size_gb}GB"}
    with atomic_dir(output) as tmp:
        merged.save_pretrained(str(tmp), **shards)
        tokenizer.save_pretrained(str(tmp))
        loaded.template.save(tmp / TEMPLATE_FILE)
        claim_dir(tmp, "merge")
    return output


def _local(base: str) -> str | None:
    return base if Path(base).is_dir() else None


def _target_dtype(base: str, dtype: str) -> torch.dtype:
    """``dtype``, or for "auto" the dtype the base checkpoint's config.json records (fp32 for presets)."""
    from tnlora.model.configuration import canonical_preset
    from tnlora.model.hub import model_dir

    if dtype != "auto":
        return resolve_dtype(dtype, torch.device("cpu"))
    if canonical_preset(base) is not None:
        return torch.float32
    config_file = Path(model_dir(base, "config", key="--model")) / "config.json"
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
