"""The Triton kernel of :mod:`tnlora.ops.cross_entropy` (see there for what it computes).

This module imports triton at import; ``tnlora.ops.cross_entropy`` imports it on first use only.
"""

import triton
import triton.language as tl


@triton.jit
def cross_entropy_grad_kernel(
    logits_ptr,
    grad_ptr,
    targets_ptr,
    loss_ptr,
    stride_logits,
    stride_grad,
    V: tl.constexpr,
    FP64: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row: its log-sum-exp over V logits by an online max and sum (first pass), then softmax − onehot
    written to ``grad`` (second pass; ``grad`` may be the logits themselves: each value is read before it is
    overwritten) and the row's loss lse − logit[target]. V is a constant (one compiled kernel per vocabulary)."""
    acc_dtype = tl.float64 if FP64 else tl.float32
    row = tl.program_id(0).to(tl.int64)
    logits = logits_ptr + row * stride_logits
    target = tl.load(targets_ptr + row)
    # Read before the second pass can overwrite it (grad in place of the logits).
    picked = tl.load(logits + target).to(acc_dtype)
    peak = tl.full((BLOCK_V,), float("-inf"), dtype=acc_dtype)
    total = tl.zeros((BLOCK_V,), dtype=acc_dtype)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits + cols, mask=cols < V, other=float("-inf")).to(acc_dtype)
        peak_new = tl.maximum(peak, x)
        # A lane that has seen only padding (−inf) shifts by 0 instead: no −inf − −inf, and exp(−inf) adds 0.
        shift = tl.where(peak_new == float("-inf"), 0.0, peak_new)
        total = total * tl.exp(peak - shift) + tl.exp(x - shift)
        peak = peak_new
    top = tl.max(peak, axis=0)
    lse = top + tl.log(tl.sum(total * tl.exp(peak - top), axis=0))
    grad = grad_ptr + row * stride_grad
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits + cols, mask=cols < V, other=0.0).to(acc_dtype)
        p = tl.exp(x - lse)
        p = tl.where(cols == target, p - 1.0, p)
        tl.store(grad + cols, p.to(grad_ptr.dtype.element_ty), mask=cols < V)
    tl.store(loss_ptr + row, lse - picked)
