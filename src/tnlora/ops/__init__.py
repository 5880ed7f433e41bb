"""Kernels apart from the model, one function signature per operation (as fla lays them out).

* :mod:`~tnlora.ops.lightning`: ``lightning_attention``, dispatching to the implementations below;
  :mod:`~tnlora.ops.chunked` (pure PyTorch, any device), :mod:`~tnlora.ops.recurrent` (per token, and the
  in-place one-token step of static decoding), :mod:`~tnlora.ops.fla` (fla-core's Triton kernels on CUDA).
* :mod:`~tnlora.ops.packing`: ``PackedRows``, the example boundaries of packed rows, passed as one object.
* :mod:`~tnlora.ops.norm`: SimpleRMSNorm as Triton kernels (forward, backward, fused residual add / gate);
  :mod:`~tnlora.ops.recurrent_triton`: the one-token recurrent step as one Triton kernel (with the token
  mixer's SiLU and LRPE on q and k).
* :mod:`~tnlora.ops.lora`: a LoRA-adapted linear layer as one operation; :mod:`~tnlora.ops.fp8`: its frozen
  GEMMs in fp8 (``fp8: true``), :mod:`~tnlora.ops.fp8_triton` the per-token quantization as a Triton kernel.
* :mod:`~tnlora.ops.select`: the one place that decides which implementation runs on which device.

Nothing here imports triton or fla at import time; both load on first use.
"""

from tnlora.ops.lightning import lightning_attention
from tnlora.ops.packing import PackedRows

__all__ = ["PackedRows", "lightning_attention"]
