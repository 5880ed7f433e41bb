"""The names of the implementation choices, in one torch-free place: the run config, the CLI, the benchmarks'
options and :mod:`tnlora.ops.select` (which resolves them for a device) all read them from here."""

from __future__ import annotations

# The lightning attention's implementations (``lightning_impl`` / ``attention_impl``): "auto" resolves per device.
LIGHTNING_IMPLS = ("auto", "chunked", "recurrent", "fla", "triton")
# Every other kernel choice (``norm_kernel``, ``loss_kernel``, ``act_kernel``, ``decode_kernel``, the LoRA layer's
# ``grad_kernel`` / ``dropout_kernel``): PyTorch's operations or the Triton kernels.
KERNEL_CHOICES = ("auto", "torch", "triton")
# The fused LoRA layer's forward (``forward_form``, :func:`tnlora.ops.lora.appends_adapter`): the adapter's output
# added in the frozen GEMM's epilogue, or appended to its reduction; "auto" picks by the projection's widths.
FORWARD_FORMS = ("auto", "epilogue", "appended")

__all__ = ["FORWARD_FORMS", "KERNEL_CHOICES", "LIGHTNING_IMPLS"]
