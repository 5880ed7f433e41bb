"""One chunk of the training loss: PyTorch's cross-entropy composition against the fused kernel (loss_kernel).

For a chunk of ROWS labelled tokens (the chunked loss's default 1,024) over TNL's 64,000-token vocabulary, bf16:
the loss-and-gradient part alone (``cross_entropy_grad_reference`` against ``cross_entropy_grad_``: µs and the
GB/s of the kernel's minimum traffic, the logits read twice and the gradient written once), then the whole
chunk as ``_LinearCrossEntropySum`` runs it (logits GEMM, that part, gradient GEMM) at the 1B and 7B widths.
Median of REPLAYS timed with CUDA events after a warm-up; both paths' results are checked against each other.

    python3 benchmarks/cross_entropy.py [--rows 1024]      # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tnlora.bench.common import cuda_seconds
from tnlora.bench.decode import copy_bandwidth
from tnlora.ops.cross_entropy import cross_entropy_grad_, cross_entropy_grad_reference

VOCAB = 64000
WIDTHS = {"1B": 2048, "7B": 4096}
REPLAYS = 20


def timed(fn: Callable[[], object]) -> float:
    """Median µs of ``fn`` over REPLAYS runs (after two untimed ones)."""
    for _ in range(2):
        fn()
    return statistics.median(cuda_seconds(fn, REPLAYS)) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1024, help="labelled tokens in the chunk")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    targets = torch.randint(0, VOCAB, (args.rows,), device="cuda", generator=gen)
    print(f"copy bandwidth {copy_bandwidth() / 1e9:,.0f} GB/s; chunk of {args.rows} rows x {VOCAB:,} logits, bf16")

    logits = 4 * torch.randn(args.rows, VOCAB, device="cuda", generator=gen).bfloat16()
    want_loss, want_grad = cross_entropy_grad_reference(logits, targets)
    want_grad = want_grad.bfloat16()
    buffer = logits.clone()
    got_loss = cross_entropy_grad_(buffer, targets)
    loss_err = ((got_loss - want_loss).abs() / want_loss.abs()).max().item()
    grad_err = ((buffer.float() - want_grad.float()).abs() - 2**-7 * want_grad.float().abs()).max().item()
    assert loss_err < 1e-5 and grad_err <= 0, (loss_err, grad_err)
    composition = timed(lambda: cross_entropy_grad_reference(logits, targets)[1].bfloat16())
    kernel = timed(lambda: cross_entropy_grad_(buffer, targets))  # the gradient is overwritten each time
    traffic = 3 * args.rows * VOCAB * logits.element_size()
    print("| part | PyTorch composition µs | kernel µs | kernel GB/s (3 passes) |\n|---|---|---|---|")
    print(f"| loss and logit gradient | {composition:,.0f} | {kernel:,.0f} | {traffic / kernel / 1e3:,.0f} |")

    print("\n| model | whole chunk, composition µs | whole chunk, kernel µs | saved a chunk |\n|---|---|---|---|")
    for model, width in WIDTHS.items():
        rows = torch.randn(args.rows, width, device="cuda", generator=gen).bfloat16()
        weight = (torch.randn(VOCAB, width, device="cuda", generator=gen) / width**0.5).bfloat16()

        def chunk(fused: bool, rows=rows, weight=weight) -> torch.Tensor:
            logits = F.linear(rows, weight)
            if fused:
                cross_entropy_grad_(logits, targets)
                grad = logits
            else:
                grad = cross_entropy_grad_reference(logits, targets)[1].bfloat16()
            return grad @ weight

        slow, fast = timed(lambda: chunk(False)), timed(lambda: chunk(True))
        print(f"| {model} | {slow:,.0f} | {fast:,.0f} | {100 * (slow - fast) / slow:.0f} % |")


if __name__ == "__main__":
    main()
