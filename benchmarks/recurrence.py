"""The decode step's recurrence alone: ``triton_step`` at a model's decode shape for each launch (state rows a
tile, V columns a program, warps), as the step runs it (q and k the projection's raw slices through the kernel's
SiLU, the sums of squares of o written, dependent launches).

Each launch is timed in a CUDA graph of every layer's call for ``--defer`` consecutive positions (each layer its
own fp32 state, as in the model, so that no state stays in L2 between its calls): with deferred state writes
(``DeferredTerms``, what the greedy device loop runs from batch 16) the state is read every step and written
every ``--defer``-th, so a call moves on average (1 + 1 / defer) states; without (batch 1: the plain kernel),
a read and a write. Each row: µs a call, the state bytes ÷ time, and that against the card's copy rate.

    python3 benchmarks/recurrence.py [--shapes 7B:32,1B:32,7B:1,1B:1] [--launches 128:32:4,128:64:8]   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics

import torch

from tnlora.bench.common import cuda_seconds, environment_line
from tnlora.bench.decode import copy_bandwidth
from tnlora.model import config_from_preset
from tnlora.ops.recurrent_triton import DeferredTerms, StepLaunch, triton_step

# The launch of the tree first, then tiles of 4 to 64 fp32 values a thread around it.
LAUNCHES = [StepLaunch()] + [
    StepLaunch(bk, bv, warps)
    for bk, bv, warps in [
        (128, 32, 2), (128, 32, 8), (128, 16, 2), (128, 16, 4), (128, 64, 4), (128, 64, 8), (128, 64, 2),
        (128, 128, 8), (64, 32, 2), (64, 32, 4), (64, 64, 4), (64, 128, 4), (32, 32, 1), (32, 64, 2), (32, 128, 2),
    ]
]  # fmt: skip
REPEATS = 20


def layer_inputs(preset: str, batch: int, defer: int, device: str = "cuda") -> list[dict]:
    """Per layer (no LRPE: every layer of the step but the first): the qkvu projection's output [B, 4 · H · D]
    bf16 (q, k, v its slices), the fp32 state, λ, o and, with ``defer``, the held terms."""
    config = config_from_preset(preset)
    heads, dim = config.decoder_attention_heads, config.head_dim
    gen = torch.Generator(device=device).manual_seed(0)
    layers = []
    for _ in range(config.decoder_layers):
        qkvu = torch.randn(batch, 4 * heads * dim, device=device, dtype=torch.bfloat16, generator=gen)
        state = torch.randn(batch, heads, dim, dim, device=device, generator=gen) * 0.01
        parts = qkvu.view(batch, 4, heads, dim)
        layer = {
            "q": parts[:, 0], "k": parts[:, 1], "v": parts[:, 2], "state": state,
            "decay": torch.rand(heads, device=device, generator=gen) * 0.1 + 0.9,
            "out": torch.empty(batch, heads, dim, device=device, dtype=torch.bfloat16),
            "deferred": None,
        }  # fmt: skip
        if defer > 1:
            base = torch.zeros(batch, dtype=torch.int64, device=device)
            layer["deferred"] = DeferredTerms.allocate(state, dim, base, defer)
        layers.append(layer)
    return layers


def time_launch(layers: list[dict], launch: StepLaunch, defer: int) -> float:
    """Seconds a call: a graph of every layer's call at ``max(defer, 1)`` consecutive positions, median of
    REPEATS replays."""
    batch = layers[0]["state"].shape[0]
    positions = [torch.full((batch,), p, dtype=torch.int64, device="cuda") for p in range(max(defer, 1))]

    def step() -> None:
        for position in positions:
            for layer in layers:
                triton_step(
                    layer["q"], layer["k"], layer["v"], layer["state"], layer["decay"], out=layer["out"],
                    silu_qk=True, pdl=True, position=position if layer["deferred"] else None,
                    deferred=layer["deferred"], emit_squares=True, launch=launch,
                )  # fmt: skip

    step()  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    seconds = statistics.median(cuda_seconds(graph.replay, REPEATS))
    return seconds / (len(positions) * len(layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="7B:32,1B:32,7B:1,1B:1", help="model:batch pairs")
    parser.add_argument("--defer", type=int, default=4, help="deferred state writes from batch 16 (0: never)")
    parser.add_argument("--launches", default="", help="block_k:block_v:warps, comma-separated (default: a sweep)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "error: benchmarks/recurrence.py measures CUDA kernels; this machine has none\n")
    launches = LAUNCHES
    if args.launches:
        try:
            launches = [StepLaunch(*map(int, item.split(":"))) for item in args.launches.split(",")]
        except (TypeError, ValueError):
            parser.error(f"--launches: block_k:block_v:warps, comma-separated, got {args.launches!r}")
    print(environment_line())
    copy = copy_bandwidth()
    print(f"copy bandwidth: {copy / 1e9:,.0f} GB/s (device-to-device copies of 1 GiB, read + write)")
    print("| shape | launch (block_k, block_v, warps) | µs a call | state GB/s | of copy bandwidth |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        preset, batch = shape.split(":")
        defer = args.defer if int(batch) >= 16 and args.defer > 1 else 0
        layers = layer_inputs(preset, int(batch), defer)
        state = layers[0]["state"]
        moved = state.numel() * state.element_size() * ((1 + 1 / defer) if defer else 2)
        for launch in launches:
            try:
                seconds = time_launch(layers, launch, defer)
            except Exception as exc:  # a launch the card cannot run (registers, shared memory): say so, go on
                print(f"| {shape} | {tuple(launch)} | failed: {type(exc).__name__} | | |")
                continue
            rate = moved / seconds
            print(f"| {shape}{' deferred' if defer else ''} | {tuple(launch)} | {seconds * 1e6:.1f} | "
                  f"{rate / 1e9:,.0f} | {rate / copy:.0%} |")
        del layers
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
