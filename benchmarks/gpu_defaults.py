"""GPU check of the picked defaults (no training): the checkpointing decision for 1B / 7B micro-batches on this
card (with the checkpoint regions and layers kept it picks), and which recurrence CUDA-graph decoding resolves
``decode_kernel: auto`` to."""

from __future__ import annotations

import tempfile

import torch

from tnlora.config import load_run_config
from tnlora.ops.select import kernel_impl
from tnlora.train.memory import memory_without_checkpointing, model_config
from tnlora.train.run import preflight, resolve_for_this_machine

total = torch.cuda.get_device_properties(0).total_memory
print(f"{torch.cuda.get_device_name(0)}: {total / 2**30:.1f} GiB; decode_kernel auto -> "
      f"{kernel_impl('auto', 'cuda', 'decode_kernel')}")
CASES = [
    ("1B", []),
    ("7B", []),
    ("7B", ["--cutoff_len", "16384", "--per_device_train_batch_size", "4"]),
    ("7B", ["--cutoff_len", "131072", "--packing", "false"]),
]
for model, extra in CASES:
    with tempfile.TemporaryDirectory() as out:
        cfg = load_run_config(None, ["--model_name_or_path", model, "--dataset", "d", "--output_dir", out, *extra])
        cfg = resolve_for_this_machine(preflight(cfg)[0])  # the run length unknown, as tnlora bench train
        need = memory_without_checkpointing(model_config(model), cfg) / 2**30
        print(f"| {model} | {cfg.per_device_train_batch_size} x {cfg.cutoff_len} | estimate {need:.1f} GiB | "
              f"gradient_checkpointing {cfg.gradient_checkpointing} (regions {cfg.checkpoint_regions}, "
              f"{cfg.uncheckpointed_layers} kept) | compile {cfg.torch_compile} |")
