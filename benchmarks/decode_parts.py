"""CUDA-graph decoding split into several graphs or captured with another BLAS library, and the prefill's
fused norms (GPU).

Usage: python benchmarks/decode_parts.py [--model 7B] [--parts 1,2,4,8] [--blas cublaslt,cublas] [--batches 32,1]
       [--repeats 3]

For each number of graphs per decode step and BLAS library of the capture
(``decode_graph.graphs_of(model, parts=n, blas=b)``) and batch size, the
median of ``--repeats`` timed ``generate()`` calls of ``tnlora bench --decode`` (greedy, prompt 64, 128 new
tokens, prefill included); then the prefill alone (one no-grad forward of the batch's prompts with a cache)
with the norms as one Triton kernel each (decode_kernel auto) and as PyTorch ops (decode_kernel torch).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tnlora.bench import build_model, decode_bench, environment_line, parse_args
from tnlora.model import TransnormerCache
from tnlora.model.decode_graph import graphs_of


def prefill_ms(model: torch.nn.Module, batch: int, prompt_len: int, kernel: str, repeats: int = 5) -> float:
    """Median milliseconds of one prefill forward (no grad, with a cache) of ``batch`` random prompts."""
    model.config.decode_kernel = kernel
    prompt = torch.randint(3, model.config.vocab_size, (batch, prompt_len), device="cuda")
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(prompt, past_key_values=TransnormerCache(model.config), use_cache=True)
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
    model.config.decode_kernel = "auto"
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="7B")
    parser.add_argument("--parts", default="1,2,4,8")
    parser.add_argument("--blas", default="cublaslt", help="comma-separated: cublaslt, cublas")
    parser.add_argument("--batches", default="32,1")
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    print(environment_line(), flush=True)
    args = parse_args(["--decode", "--model", opts.model])
    args._decode_model = model = build_model(opts.model, args.attn, "cuda").eval()
    model.config.use_cache = True
    rows = []
    for batch in [int(b) for b in opts.batches.split(",")]:
        for parts, blas in [(int(p), b) for p in opts.parts.split(",") for b in opts.blas.split(",")]:
            graphs_of(model, parts=parts, blas=blas)  # a new set of runners: the first call captures
            runs = [decode_bench(args, batch) for _ in range(opts.repeats)]
            tps = statistics.median(r[0] for r in runs)
            ms = statistics.median(r[1] for r in runs)
            rows.append(f"| {opts.model} | {batch} | {parts} | {blas} | {tps:,.0f} | {ms:.2f} |")
            print(rows[-1], f"(all runs: {', '.join(f'{r[0]:,.0f}' for r in runs)})", flush=True)
    prefill = []
    for batch in [int(b) for b in opts.batches.split(",")]:
        fused, plain = (prefill_ms(model, batch, args.prompt_len, k) for k in ("auto", "torch"))
        prefill.append(f"| {opts.model} | {batch} x {args.prompt_len} | {fused:.1f} | {plain:.1f} |")
    print("| model | batch | graphs per step | BLAS | tokens/s | ms/step |\n|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("| model | prefill tokens | fused norms ms | PyTorch norms ms |\n|---|---|---|---|")
    print("\n".join(prefill))


if __name__ == "__main__":
    main()
