"""A LoRA training step through the real Trainer on CUDA makes the host wait for the GPU at most once per
micro-batch, and never in tnlora's own code (skipped without CUDA; fla's case without fla-core). With the
attention as tnlora's Triton scans (the default on Hopper cards) the step makes no sync at all.

A host sync drains the GPU's queue; the kernels after it start only once the host has launched them again.
With fla the one sync left is inside fla-core: ``prepare_chunk_indices`` copies its chunk plan from pageable memory.
tnlora has it made on a side stream (``ops.fla.plan_chunks_aside``), so it waits for that stream alone; PyTorch's
sync debug mode still counts it (tests/ops/test_lightning_gpu.py checks that it leaves the training stream's
queue alone).
Run with ``-s`` to see every synchronising line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from tnlora.bench.train import SyncAudit, synthetic_examples
from tnlora.config import RunConfig, resolve_defaults
from tnlora.model import TransnormerForCausalLM, config_from_preset
from tnlora.model.tokenizer import ByteTokenizer
from tnlora.train.run import bundle_from_examples, prepare_for_training
from tnlora.train.trainer import build_trainer

pytestmark = pytest.mark.gpu
SRC = str(Path(__file__).resolve().parents[2] / "src" / "tnlora")


@pytest.mark.parametrize("attention", ["fla", "triton"])
def test_training_steps_sync_at_most_once_per_micro_batch(tmp_path: Path, attention: str) -> None:
    if attention == "fla":
        pytest.importorskip("fla.ops.simple_gla", reason="needs fla-core (pip install 'tnlora[gpu]')")
    warmup, steps, accumulation = 2, 3, 2
    cfg = RunConfig(
        model_name_or_path="tiny", output_dir=str(tmp_path), overwrite_output_dir=True, finetuning_type="lora",
        lora_rank=8, cutoff_len=2048, packing=True, per_device_train_batch_size=2,
        gradient_accumulation_steps=accumulation, max_steps=warmup + steps, bf16=True, torch_compile=False,
        attention_impl=attention, logging_steps=10**6, save_steps=10**6, report_to="none", seed=0,
    )  # fmt: skip
    cfg = resolve_defaults(cfg, cuda=True, cuda_bf16=True)
    # 1B head geometry (H = 16, K = 128 / 256): the shapes fla's autotune cache already holds.
    config = config_from_preset(
        "tiny", vocab_size=1000, decoder_embed_dim=2048, hidden_dim=2048, decoder_attention_heads=16,
        glu_dim=1024, lightning_impl=attention,
    )  # fmt: skip
    torch.manual_seed(0)
    model = TransnormerForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    model = prepare_for_training(model, cfg)
    lengths = [(40 + 7 * (i % 9), 30 + 11 * (i % 13)) for i in range(400)]
    data = bundle_from_examples(cfg, synthetic_examples(lengths, config.vocab_size), [], pad_token_id=0)
    audit = SyncAudit(warmup)
    build_trainer(cfg, model, ByteTokenizer(), data, callbacks=[audit]).train()
    print(audit.report())
    assert audit.steps == steps
    ours = [site for site in [*audit.sites, *audit.callers] if site.startswith(SRC)]
    assert not ours, f"tnlora code makes the host wait for the GPU: {ours}"
    allowed = steps * accumulation if attention == "fla" else 0  # fla's chunk plan: one copy a micro-batch
    assert sum(audit.sites.values()) <= allowed, audit.report()
