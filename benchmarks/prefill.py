"""Where a prefill's time goes: the host's time to launch it against the GPU's time to run it.

For each model, batch and prompt length: the whole 1-token ``generate()`` (what ``tnlora bench decode`` counts
before its first step), the prefill forward alone (``model(ids, use_cache=True, logits_to_keep=1)``, as
``generate()`` calls it; with ``--graphs on`` through the prefill graphs chat and generate install), and the prefill's host and
device time taken apart: a ~100 ms GPU sleep is queued first, so that the host launches the whole forward while
the GPU is still busy (host ms: the time the call takes to return; device ms: CUDA events around the forward,
which then run back to back). A prefill whose host ms exceeds its device ms is launch-bound. Also the same split
for the attention alone (every layer's call at the model's shapes). Medians of ``--repeats`` runs.

Usage: python benchmarks/prefill.py [--models 1B,7B] [--batches 1,32] [--lengths 64,512] [--impls fla]
       [--profile N]  (cProfile of three prefills: N functions by own and by cumulative host time)
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time

import torch

from tnlora.bench.common import environment_line, random_model
from tnlora.infer.decode_graph import install_graph_decoding
from tnlora.ops.lightning import lightning_attention

SLEEP_CYCLES = 200_000_000  # ~100 ms at the H200's ~1.98 GHz: longer than any host time measured here


def split_times(run, repeats: int) -> tuple[float, float, float]:
    """(wall ms, host ms, device ms) medians of ``run()``: wall synchronised; host and device with the GPU held
    busy first, so that the launches are not waited for."""
    walls, hosts, devices = [], [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        t0 = time.perf_counter()
        run()
        hosts.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        devices.append(start.elapsed_time(end))
    return statistics.median(walls), statistics.median(hosts), statistics.median(devices)


def measure(preset: str, impl: str, batch: int, length: int, repeats: int, profile: int, graphs: bool) -> list[str]:
    model = random_model(preset, impl, "cuda").eval()
    if graphs:
        # What chat / generate install on a GPU: CUDA-graph decode steps and prefill graphs of short prompts.
        install_graph_decoding(model)
    config = model.config
    ids = torch.randint(100, config.vocab_size, (batch, length), device="cuda")
    mask = torch.ones_like(ids)
    rows = []

    @torch.no_grad()
    def prefill():
        model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)  # as generate() calls it

    @torch.no_grad()
    def one_token():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False)

    heads, head_dim = config.decoder_attention_heads, config.head_dim
    q, k, v = (
        torch.randn(batch, length, heads, head_dim, device="cuda", dtype=torch.bfloat16) * 0.1 for _ in "qkv"
    )
    decays = [layer.token_mixer.log_decay for layer in model.model.layers]

    @torch.no_grad()
    def attention():
        for decay in decays:
            lightning_attention(
                q, k, v, decay, output_final_state=True, impl=model.model.layers[0].token_mixer.impl
            )

    for _ in range(3):  # first use: compiles, autotune lookups, cuBLAS handles
        prefill()
        one_token()
        attention()
    torch.cuda.synchronize()
    label = f"| {preset} | {batch} | {length} | {impl}{', graphs' if graphs else ''} |"
    wall, _, _ = split_times(one_token, repeats)
    rows.append(f"{label} generate(), 1 new token | {wall:.2f} | – | – |")
    for name, run in (("prefill forward", prefill), ("attention alone, every layer", attention)):
        wall, host, device = split_times(run, repeats)
        rows.append(f"{label} {name} | {wall:.2f} | {host:.2f} | {device:.2f} |")
    for row in rows:
        print(row, flush=True)
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(3):
            prefill()
        torch.cuda.synchronize()
        profiler.disable()
        print(f"{label} three prefill forwards under cProfile")
        for order in ("tottime", "cumulative"):
            pstats.Stats(profiler, stream=sys.stdout).sort_stats(order).print_stats(profile)
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1B,7B")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--lengths", default="64")
    parser.add_argument("--impls", default="fla", help="lightning_impl values, comma-separated")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", type=int, default=0)
    parser.add_argument("--graphs", default="off", help="off, on or both: graph decoding installed (prefill graphs)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("prefill.py needs a CUDA GPU", file=sys.stderr)
        return 2
    print(environment_line())
    print("| model | batch | prompt | attention | measured | wall ms | host ms | device ms |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.models.split(","):
        for impl in args.impls.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                for length in (int(n) for n in args.lengths.split(",")):
                    for graphs in {"off": (False,), "on": (True,), "both": (False, True)}[args.graphs]:
                        measure(preset, impl, batch, length, args.repeats, args.profile, graphs)
                    torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
