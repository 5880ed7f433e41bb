"""The names of the implementation choices, in one torch-free place: the run config, the CLI, the benchmarks'
options and :mod:`tnlora.ops.select` (which resolves them for a device) all read them from here."""

from __future__ import annotations

# The lightning attention's implementations (``lightning_impl`` / ``attention_impl``): "auto" resolves per device.
LIGHTNING_IMPLS = ("auto", "chunked", "recurrent", "fla", "triton")
# Every other kernel choice (``norm_kernel``, ``loss_kernel``, ``act_kernel``, ``decode_kernel``, the LoRA layer's
# ``grad_kernel`` / ``dropout_kernel``): PyTorch's operations or the Triton kernels.
KERNEL_CHOICES = ("auto", "torch", "triton")

__all__ = ["KERNEL_CHOICES", "LIGHTNING_IMPLS"]
