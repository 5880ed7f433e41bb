"""Where the Triton kernel tests run: a CUDA device, or Triton's CPU interpreter on CPU tensors.

On a CPU-only machine: ``TRITON_INTERPRET=1 PYTHONPATH=<dir holding triton> pytest -q tests/ops/<file>`` (shapes
are kept small in those tests: the interpreter runs every program in Python).
"""

from __future__ import annotations

import os

import pytest
import torch

from tnlora.ops.select import triton_available

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter runs kernels on CPU tensors; compiled kernels need CUDA ones.
DEVICE = "cpu" if INTERPRET else "cuda"
needs_kernel = pytest.mark.skipif(
    not (triton_available() and (INTERPRET or torch.cuda.is_available())),
    reason="needs triton and CUDA, or Triton's CPU interpreter: "
    "TRITON_INTERPRET=1 PYTHONPATH=<dir holding triton> pytest tests/ops/...",
)
