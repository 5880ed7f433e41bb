"""Sync-free chunk planning for fla-core's packed-row state kernels, as a backend in fla's own registry.

fla-core 0.6.0 sizes the chunk-state buffer of ``chunk_fwd_h`` / ``chunk_bwd_dh`` with
``split_offsets[-1].item()`` whenever ``cu_seqlens`` is given. That device→host read drains the stream
three times per layer per micro-batch (forward, recomputed forward, backward): 48 idle gaps in a 1B step.
tnlora already holds a host copy of every ``cu_seqlens`` it passes to fla (``attention._flatten_rows``),
so the number of chunks is known without asking the device.

This module registers a backend for fla's ``common`` operations (fla's ``fla.backends.register``, the
extension point its TileLang and Ascend backends use). It accepts only calls whose ``cu_seqlens`` tnlora
registered with :func:`remember_host_copy`; every other call, and every fla version it was not checked
against, goes to fla's own implementation. It launches fla's own kernels with fla's own arguments; only
the buffer's size comes from the host. The results are bitwise those of fla's path
(tests/model/test_attention_gpu.py).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

# fla versions whose chunk_fwd_h / chunk_bwd_dh kernel arguments this backend was checked against.
TESTED_FLA_VERSIONS = frozenset({"0.6.0"})

# id(device cu_seqlens) → (weak reference to it, its host copy). Keyed by identity (a tensor's == is
# elementwise, so WeakKeyDictionary cannot hold tensors); an entry is dropped with the micro-batch's tensor.
_host_copies: dict[int, tuple[weakref.ref, Tensor]] = {}


def num_splits(host_cu_seqlens: Tensor, split_size: int) -> int:
    """Chunks of ``split_size`` tokens over all examples: Σ ⌈len_i / split_size⌉ (fla's ``NS``)."""
    lengths = host_cu_seqlens[1:] - host_cu_seqlens[:-1]
    return int(((lengths + split_size - 1) // split_size).sum())


def remember_host_copy(cu_seqlens: Tensor, host_cu_seqlens: Tensor) -> None:
    """Let the backend size fla's buffers for ``cu_seqlens`` from ``host_cu_seqlens`` (same values, on CPU)."""
    key = id(cu_seqlens)

    def forget(ref: weakref.ref) -> None:
        if _host_copies.get(key, (None,))[0] is ref:
            del _host_copies[key]

    _host_copies[key] = (weakref.ref(cu_seqlens, forget), host_cu_seqlens)


def host_copy(cu_seqlens: Tensor | None) -> Tensor | None:
    """The registered host copy of ``cu_seqlens``, or None."""
    if cu_seqlens is None:
        return None
    ref, host = _host_copies.get(id(cu_seqlens), (None, None))
    return host if ref is not None and ref() is cu_seqlens else None


_installed = False


def install() -> bool:
    """Register the backend with fla (once per process); False when fla lacks the registry or kernels, or is
    a version this backend was not checked against: fla's own path then runs, syncs and all."""
    global _installed
    if _installed:
        return True
    try:
        import fla
        import triton
        from fla.backends import BaseBackend, register
        from fla.ops.common.chunk_h import chunk_bwd_kernel_dh, chunk_fwd_kernel_h
        from fla.ops.utils import prepare_chunk_offsets
    except ImportError:
        return False
    if getattr(fla, "__version__", None) not in TESTED_FLA_VERSIONS:
        return False

    def plan(k: Tensor, v: Tensor, cu_seqlens: Tensor, chunk_size: int, split_size: int | None):
        B, T, H, K, V = *k.shape, v.shape[-1]
        split = chunk_size if split_size is None else split_size
        # A device tensor derived from cu_seqlens on the device (fla caches it per cu_seqlens): no sync.
        offsets = prepare_chunk_offsets(cu_seqlens, split)
        return (
            B,
            T,
            H,
            K,
            V,
            split,
            cu_seqlens.shape[0] - 1,
            num_splits(host_copy(cu_seqlens), split),
            offsets,
        )

    def accepts(*args, cu_seqlens: Tensor | None = None, **kwargs) -> tuple[bool, str | None]:
        if host_copy(cu_seqlens) is None:
            return False, "no host copy of cu_seqlens registered by tnlora"
        return True, None

    class TnloraHostPlannedBackend(BaseBackend):
        """fla's varlen state kernels, sized from tnlora's host copy of ``cu_seqlens``."""

        backend_type = "tnlora_host_planned"
        package_name = None
        env_var = None
        priority = 1

        chunk_fwd_h_verifier = staticmethod(accepts)
        chunk_bwd_dh_verifier = staticmethod(accepts)

        @staticmethod
        def chunk_fwd_h(
            k: Tensor,
            v: Tensor,
            g: Tensor | None = None,
            g_gamma: Tensor | None = None,
            gk: Tensor | None = None,
            gv: Tensor | None = None,
            h0: Tensor | None = None,
            output_final_state: bool = False,
            state_v_first: bool = False,
            cu_seqlens: Tensor | None = None,
            chunk_size: int = 64,
            split_size: int | None = None,
            states_in_fp32: bool = False,
        ) -> tuple[Tensor, Tensor | None]:
            B, T, H, K, V, split, N, NS, offsets = plan(k, v, cu_seqlens, chunk_size, split_size)
            shape = (V, K) if state_v_first else (K, V)
            h = k.new_empty(B, NS, H, *shape, dtype=torch.float if states_in_fp32 else k.dtype)
            ht = k.new_empty(N, H, *shape, dtype=torch.float) if output_final_state else None
            chunk_fwd_kernel_h[lambda meta: (triton.cdiv(K, meta["BK"]) * triton.cdiv(V, meta["BV"]) * N * H,)](
                k=k, v=v, h=h, g=g, g_gamma=g_gamma, gk=gk, gv=gv, h0=h0, ht=ht,
                cu_seqlens=cu_seqlens, split_offsets=offsets, T=T, H=H, K=K, V=V, BT=chunk_size, BS=split,
                USE_G=g is not None, USE_G_GAMMA=g_gamma is not None, USE_GK=gk is not None,
                USE_GV=gv is not None, STATE_V_FIRST=state_v_first,
            )  # fmt: skip
            return h, ht

        @staticmethod
        def chunk_bwd_dh(
            q: Tensor,
            k: Tensor,
            v: Tensor,
            do: Tensor,
            h0: Tensor | None,
            dht: Tensor | None,
            scale: float,
            g: Tensor | None = None,
            g_gamma: Tensor | None = None,
            gk: Tensor | None = None,
            gv: Tensor | None = None,
            state_v_first: bool = False,
            cu_seqlens: Tensor | None = None,
            chunk_size: int = 64,
            split_size: int | None = None,
            states_in_fp32: bool = False,
        ) -> tuple[Tensor, Tensor | None]:
            B, T, H, K, V, split, N, NS, offsets = plan(k, v, cu_seqlens, chunk_size, split_size)
            HQ = q.shape[2]
            shape = (V, K) if state_v_first else (K, V)
            dh = k.new_empty(B, NS, HQ, *shape, dtype=torch.float if states_in_fp32 else k.dtype)
            dh0 = torch.empty_like(h0, dtype=torch.float) if h0 is not None else None
            chunk_bwd_kernel_dh[lambda meta: (triton.cdiv(K, meta["BK"]) * triton.cdiv(V, meta["BV"]) * N * H,)](
                q=q, g=g, g_gamma=g_gamma, gk=gk, gv=gv, do=do, dh=dh, dht=dht, dh0=dh0,
                cu_seqlens=cu_seqlens, split_offsets=offsets, scale=scale, T=T, HQ=HQ, H=H, K=K, V=V,
                BT=chunk_size, BS=split, NG=HQ // H, USE_G=g is not None, USE_G_GAMMA=g_gamma is not None,
                USE_GK=gk is not None, USE_GV=gv is not None, STATE_V_FIRST=state_v_first,
            )  # fmt: skip
            return dh, dh0

    register("common")(TnloraHostPlannedBackend)
    _installed = True
    return True
