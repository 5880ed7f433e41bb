"""Run under torchrun with two processes (gloo, CPU): the tiny model wrapped as tnlora's FSDP2 runs wrap it (each
``TransnormerDecoderLayer`` a unit, then the root, as accelerate's transformer-based wrap policy does with
``train.distributed.FSDP_LAYER``), trained three SGD steps with one of two rows per process, against the
same steps in one process on both rows. Rank 0 saves, per fine-tuning method, the gathered state dict
(``<method>-fsdp.pt``), the one-process state dict (``<method>-plain.pt``), the initial one
(``<method>-init.pt``) and the trained names.

    torchrun --nproc_per_node 2 tests/train/fsdp2_check.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tnlora.config import RunConfig
from tnlora.model import TransnormerForCausalLM, config_from_preset
from tnlora.model.loading import set_attention_impl
from tnlora.train.distributed import FSDP_LAYER
from tnlora.train.lora import apply_finetuning

STEPS = 3


def build(method: str) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TransnormerForCausalLM(config_from_preset("tiny"))
    set_attention_impl(model, "chunked")
    model.config.use_cache = False
    cfg = RunConfig(model_name_or_path="tiny", dataset="d", output_dir="o", finetuning_type=method, lora_rank=4,
                    lora_alpha=8.0, freeze_trainable_layers=1)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = apply_finetuning(model, cfg)
    with torch.no_grad():  # B starts at zero: give it values, so lora_A's gradients are not all zero
        gen = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.train()


def rows() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 250, (2, 24), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # the rows learn different numbers of tokens
    labels[1, :15] = -100
    return ids, labels


def tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != -100).sum())  # the model shifts; what the Trainer counts


def train(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, total: int, scale: float) -> None:
    # SGD: each update is the gradient times the rate, so the comparison sees the gradients themselves (AdamW
    # divides by √v, which turns rounding noise in near-zero gradients into whole-step differences).
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=labels, num_items_in_batch=total).loss * scale
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def main() -> int:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        print("fully_shard unavailable", flush=True)
        return 0
    rank, world = dist.get_rank(), dist.get_world_size()
    ids, labels = rows()
    for method in ("lora", "full", "freeze"):
        model = build(method)
        # by identity: the tied LM head is a state-dict name of the trained embedding too
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        trained = [n for n, t in model.state_dict(keep_vars=True).items() if id(t) in trainable]
        for module in model.modules():
            if type(module).__name__ == FSDP_LAYER:
                fully_shard(module)
        fully_shard(model)
        # As the Trainer does: the count of both ranks' tokens, the loss times the world size (the gradients
        # are averaged over the ranks).
        train(model, ids[rank : rank + 1], labels[rank : rank + 1], tokens(labels), float(world))
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            plain = build(method)
            train(plain, ids, labels, tokens(labels), 1.0)
            torch.save({k: v.detach().clone() for k, v in state.items()}, out / f"{method}-fsdp.pt")
            torch.save({k: v.detach().clone() for k, v in plain.state_dict().items()}, out / f"{method}-plain.pt")
            torch.save(build(method).state_dict(), out / f"{method}-init.pt")
            (out / f"{method}-trained.json").write_text(json.dumps(trained))
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Every result is written and both ranks are past the last barrier: leave without the interpreter's
    # teardown, where gloo's worker threads left by FSDP2's collectives now and then abort the process
    # ("terminate called without an active exception", SIGABRT) after the work is done.
    os._exit(code)
