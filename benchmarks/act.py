"""The token mixer's activation alone, forward and backward: PyTorch's form compiled by Inductor (what a compiled
layer runs with ``act_kernel: torch``) against the Triton backward operator with PyTorch's forward compiled
(``act_kernel: triton``, ``qkvu_act``'s default forward) and with the forward operator (``forward="kernel"``).

The compiled layer's backward writes the qkvu projection's gradient as one concatenation of the four parts'
gradients, which Inductor emits as a masked pointwise kernel at ~1.6–1.7 TB/s (RESULTS.md, "Where the training
step's time goes"); ``tnlora.ops.qkvu_act`` writes it from 2-D tiles instead. Each row: milliseconds of the
forward and of the backward at a layer's shape, their bytes moved ÷ time, and each form's largest error in bf16,
outputs and gradient, against the same fp32 reference.

    python3 benchmarks/act.py [--shapes 1B:32768,7B:16384,7B:131072]    # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch import Tensor

from tnlora.bench.common import cuda_seconds, environment_line
from tnlora.ops.qkvu_act import qkvu_act, qkvu_act_reference

HIDDEN = {"385M": 1024, "1B": 2048, "7B": 4096}


def inputs(tokens: int, hidden: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """qkvu [tokens, 4 · hidden] (requires grad), a pad mask with the last 3 % of tokens padded, and the four
    incoming gradients [tokens, hidden]."""
    gen = torch.Generator(device=device).manual_seed(0)
    qkvu = torch.randn(tokens, 4 * hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    keep = torch.ones(tokens, dtype=torch.bool, device=device)
    keep[tokens - tokens * 3 // 100 :] = False
    grads = [torch.randn(tokens, hidden, device=device, dtype=dtype, generator=gen) for _ in range(4)]
    return qkvu, keep, grads


def step_fns(form: Callable, qkvu: Tensor, keep: Tensor, grads: list[Tensor]) -> tuple[Callable, Callable]:
    """The forward of ``form`` and one backward through a graph it built (kept for repeated backwards)."""
    outs = form(qkvu, keep)

    def backward() -> Tensor:
        return torch.autograd.grad(outs, qkvu, grads, retain_graph=True)[0]

    return (lambda: form(qkvu, keep)), backward


def moved_bytes(tokens: int, hidden: int, element: int = 2) -> tuple[float, float]:
    """The least bytes each direction must move, counted alike for every form: the forward reads q, k, v's parts
    of qkvu and writes q, k, v (u stays a view in PyTorch's form; the operator's copy of it is not counted); the
    backward reads q's and k's parts and the four incoming gradients and writes dqkvu's four parts."""
    part = tokens * hidden * element
    return 6 * part, 10 * part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", default="1B:32768,7B:16384,7B:131072", help="model:tokens, comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "error: benchmarks/act.py measures CUDA kernels; this machine has none\n")
    print(environment_line(), flush=True)
    compiled = torch.compile(qkvu_act_reference, dynamic=False)
    compiled_act = torch.compile(qkvu_act, dynamic=False)
    print(
        "| model | tokens | form | forward ms (GB/s) | backward ms (GB/s) | max |Δ| outputs / gradient vs fp32 |"
    )
    print("|---|---|---|---|---|---|")
    for spec in args.shapes.split(","):
        model, tokens = spec.split(":")
        hidden, tokens = HIDDEN[model], int(tokens)
        qkvu, keep, grads = inputs(tokens, hidden)
        # the fp32 reference every form is held to
        ref_in = qkvu.detach().float().requires_grad_()
        ref_outs = qkvu_act_reference(ref_in, keep)
        ref_grad = torch.autograd.grad(ref_outs, ref_in, [g.float() for g in grads])[0]
        fwd_bytes, bwd_bytes = moved_bytes(tokens, hidden)
        forms = (
            ("torch, compiled", compiled),
            ("torch forward compiled, triton backward", compiled_act),
            ("triton operators", lambda x, m: qkvu_act(x, m, forward="kernel")),
        )
        for name, form in forms:
            forward, backward = step_fns(form, qkvu, keep, grads)
            for _ in range(3):
                forward(), backward()
            outs, grad = form(qkvu, keep), backward()
            err_out = max((o.float() - r).abs().max().item() for o, r in zip(outs, ref_outs, strict=True))
            err_grad = (grad.float() - ref_grad).abs().max().item()
            f = statistics.median(cuda_seconds(forward, args.repeats))
            b = statistics.median(cuda_seconds(backward, args.repeats))
            print(f"| {model} | {tokens} | {name} | {f * 1e3:.3f} ({fwd_bytes / f / 1e9:,.0f}) | "
                  f"{b * 1e3:.3f} ({bwd_bytes / b / 1e9:,.0f}) | {err_out:.2e} / {err_grad:.2e} |", flush=True)  # fmt: skip
            del outs, grad, forward, backward
        del qkvu, keep, grads, ref_in, ref_outs, ref_grad
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
