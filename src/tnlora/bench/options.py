"""The options of the two benchmarks, parsed without importing torch (``tnlora bench train --help`` is quick)."""

from __future__ import annotations

import argparse
from typing import Any

from tnlora.choices import KERNEL_CHOICES


def train_args(argv: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The bench's own options, and the run-config keys given beside them (``--key value`` as to train)."""
    from tnlora.config import parse_overrides

    parser = argparse.ArgumentParser(
        prog="tnlora bench train",
        allow_abbrev=False,  # a run-config key (--lora_dropout) must not be taken for a bench option it begins
        description="LoRA training steps on random weights. Any run-config key may follow (--key value, as "
        "to `tnlora train`); keys left open resolve as `tnlora train` resolves them on this machine.",
    )
    parser.add_argument("--model", default="1B", help="preset: tiny, 385M, 1B, 7B")
    parser.add_argument("--lengths", default=None,
                        help="lengths file (prompt/learned tokens per record; default: huanhuan.json's profile)")
    parser.add_argument("--seq_len", type=int, default=0,
                        help="one sequence of this many tokens per row instead of data-shaped examples")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--norm_kernel", default="auto", choices=KERNEL_CHOICES,
                        help="the model's norm implementation (config norm_kernel)")
    parser.add_argument("--loss_kernel", default="auto", choices=KERNEL_CHOICES,
                        help="the chunked loss's cross-entropy (config loss_kernel)")
    parser.add_argument("--act_kernel", default="auto", choices=KERNEL_CHOICES,
                        help="the token mixer's activation with grad (config act_kernel)")
    parser.add_argument("--trim_last_layer", action=argparse.BooleanOptionalAction, default=True,
                        help="the last layer computes the labelled positions alone after its attention (config "
                             "trim_last_layer, the default; --no-trim_last_layer: every position)")
    parser.add_argument("--lora_compiled_op", action=argparse.BooleanOptionalAction, default=True,
                        help="compiled layers call the fused LoRA layers' custom operators (default) or, with "
                             "--no-lora_compiled_op, peft's composition (lora_kernel fused)")
    parser.add_argument("--lora_pair", action=argparse.BooleanOptionalAction, default=True,
                        help="the GLU's l1 and l2 (fused LoRA layers of one input) as one operation (default) or, "
                             "with --no-lora_pair, each as its own")
    parser.add_argument("--lora_grad_kernel", default="auto", choices=KERNEL_CHOICES,
                        help="the fused LoRA layers' backward products of dy: two GEMMs (torch), one read of dy "
                             "(triton, CUDA) or auto (the default: the one read where dy holds "
                             "tnlora.ops.lora.LORA_GRAD_MIN_ELEMENTS = 2^28 elements, tokens × output width)")
    parser.add_argument("--lora_dropout_kernel", default="auto", choices=KERNEL_CHOICES,
                        help="the fused LoRA layers' dropout (with lora_dropout > 0): PyTorch's (torch, and auto, the "
                             "default) or a byte mask applied inside Triton kernels (triton)")
    parser.add_argument("--gpu_memory_gib", type=float, default=0.0,
                        help="allocate at most this much GPU memory (the defaults size for it too): a smaller "
                             "card on this one, e.g. 79.6 for an 80 GB card")
    parser.add_argument("--name", default="", help="row label")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of one timed step")
    parser.add_argument("--trace", default="", help="profile, and write the timeline (Chrome trace JSON) here")
    parser.add_argument("--sync_audit", action="store_true",
                        help="list the operations that make the host wait for the GPU in the timed steps")
    args, rest = parser.parse_known_args(argv)
    return args, parse_overrides(rest)


def decode_args(argv: list[str]) -> argparse.Namespace:
    """The options of ``tnlora bench decode``."""
    parser = argparse.ArgumentParser(prog="tnlora bench decode", description="greedy generate() on a preset with random weights, at several batch sizes")
    parser.add_argument("--model", default="7B", help="preset: tiny, 385M, 1B, 7B")
    parser.add_argument("--batch", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="decode steps as replayed CUDA graphs (default: on with a GPU)")
    parser.add_argument("--decode_kernel", default="auto", choices=KERNEL_CHOICES,
                        help="the static step's recurrence (config decode_kernel)")
    parser.add_argument("--lightning_impl", default="auto", choices=["auto", "fla", "chunked", "triton"],
                        help="the prefill's lightning attention (config lightning_impl)")
    parser.add_argument("--gemv", action=argparse.BooleanOptionalAction, default=None,
                        help="graph steps of the triton kernel as fused projections (tnlora.ops.gemv) up to "
                             "--gemv_max_batch rows (default: on where it applies, as in chat / generate); --no-gemv: "
                             "the layer forwards")
    parser.add_argument("--gemv_max_batch", type=int, default=None,
                        help="the largest batch whose steps run as fused projections (default: the decode graphs' "
                             "GEMV_MAX_BATCH)")
    parser.add_argument("--rows_min_batch", type=int, default=None,
                        help="the smallest batch of several rows whose steps run as fused projections (default: "
                             "the decode graphs' ROWS_MIN_BATCH)")
    parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                        help="the GEMV step's kernels as programmatic dependent launches (sm_90 and later; "
                             "--no-pdl: plain launches)")
    parser.add_argument("--branches", action=argparse.BooleanOptionalAction, default=True,
                        help="the GLU's two projections side by side in the graph of the layer forwards "
                             "(--no-branches: one after the other)")
    parser.add_argument("--defer_steps", type=int, default=None,
                        help="the greedy device loop writes the recurrent states back every that many steps "
                             "(default: the decode graphs' DEFER_STEPS; 0: every step)")
    parser.add_argument("--defer_min_batch", type=int, default=None,
                        help="the smallest batch whose states are written back every --defer_steps steps (default: "
                             "the decode graphs' DEFER_MIN_BATCH)")
    parser.add_argument("--prefill_graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="short prompts' prefills as CUDA graphs with --graphs (tnlora.infer.prefill_graph; "
                             "--no-prefill_graphs: eager prefills)")
    parser.add_argument("--adapter", default="none", choices=["none", "unmerged", "merged"],
                        help="a random LoRA adapter on every linear layer, kept as peft layers or merged into the "
                             "weights (tnlora chat's default)")
    parser.add_argument("--lora_rank", type=int, default=8, help="the adapter's rank")
    parser.add_argument("--gpu_memory_gib", type=float, default=0.0, help="allocate at most this much GPU memory")
    parser.add_argument("--profile", action="store_true", help="print the top kernels of the timed call")
    parser.add_argument("--trace", default="", help="profile, and write the timeline (Chrome trace JSON) here")
    parser.add_argument("--host_profile", type=int, default=0, metavar="N",
                        help="print the N Python functions taking most host time (cumulative and own, cProfile) "
                             "in a 1-token call and in the whole call (run after the timed calls)")
    return parser.parse_args(argv)
