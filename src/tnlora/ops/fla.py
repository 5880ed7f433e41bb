"""fla-core's Triton kernels for lightning attention (CUDA), and sync-free chunk planning for them.

:func:`fla_attention` runs ``chunk_simple_gla`` with ``g_gamma = log λ`` and ``scale = 1`` (TNL does not
scale q·k). Packed rows are laid end to end as one row with ``cu_seqlens`` (fla's varlen convention, one
state per example); each row's initial state goes to its first example and its final state comes from its
last. fla-core is an optional extra (``tnlora[gpu]``), imported on first use.

fla-core 0.6.0 sizes the chunk-state buffer of ``chunk_fwd_h`` / ``chunk_bwd_dh`` with
``split_offsets[-1].item()`` whenever ``cu_seqlens`` is given: a device→host read that drains the stream three
times per layer per micro-batch (forward, recomputed forward, backward). :class:`~tnlora.ops.packing.PackedRows`
already holds a host copy of its ``cu_seqlens``, so the number of chunks is known without asking the device.
:func:`install` registers a backend for fla's ``common`` operations in fla's own registry (the extension point
its TileLang and Ascend backends use). It accepts only calls whose ``cu_seqlens`` carries a host copy
(:func:`tag_host_copy`); every other call, and every fla version it was not checked against, goes to fla's own
implementation. It launches fla's own kernels with fla's own arguments; only the buffer's size comes from the
host. The results are bitwise those of fla's path (tests/ops/test_lightning_gpu.py).

One wait is left in fla's forward: ``prepare_chunk_indices`` builds its chunk plan on the host and copies it to
the device from pageable memory, which PyTorch follows with a synchronisation of the current stream, once per
``cu_seqlens`` (fla caches the plan by argument identity). On the training stream that drains every kernel the
host has queued ahead. :func:`plan_chunks_aside` makes the same call with the same arguments on a side stream
first: the copy then waits for nothing but itself, and fla's forward finds the plan in its cache.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor

from tnlora.ops.packing import PackedRows, end_to_end, per_row

# fla versions whose chunk_fwd_h / chunk_bwd_dh kernel arguments this backend was checked against.
TESTED_FLA_VERSIONS = frozenset({"0.6.0"})

# The attribute of a device ``cu_seqlens`` tensor that holds its host copy (set by :func:`tag_host_copy`):
# fla's dispatcher hands the backend the device tensor only, in the forward and again in the backward.
HOST_COPY_ATTR = "_tnlora_host_copy"


def num_splits(host_cu_seqlens: Tensor, split_size: int) -> int:
    """Chunks of ``split_size`` tokens over all examples: Σ ⌈len_i / split_size⌉ (fla's ``NS``)."""
    lengths = host_cu_seqlens[1:] - host_cu_seqlens[:-1]
    return int(((lengths + split_size - 1) // split_size).sum())


def tag_host_copy(cu_seqlens: Tensor, host_cu_seqlens: Tensor) -> None:
    """Attach ``host_cu_seqlens`` (the same values, on the host) to the device tensor ``cu_seqlens`` for the
    backend; the tag holds only while ``cu_seqlens`` is not changed in place."""
    setattr(cu_seqlens, HOST_COPY_ATTR, (cu_seqlens._version, host_cu_seqlens))


def host_copy(cu_seqlens: Tensor | None) -> Tensor | None:
    """The host copy tagged on ``cu_seqlens`` (None: untagged, or changed in place since)."""
    if cu_seqlens is None:
        return None
    version, host = getattr(cu_seqlens, HOST_COPY_ATTR, (None, None))
    return host if version == cu_seqlens._version else None


@functools.cache
def install() -> bool:
    """Register the backend with fla (once per process); False when fla lacks the registry or kernels, or is
    a version this backend was not checked against: fla's own path then runs, syncs and all."""
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
            return False, "no host copy of cu_seqlens tagged by tnlora"
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
    return True


# fla's chunk size for chunk_simple_gla when none is given (its forward plans chunks of this many tokens).
FLA_CHUNK_SIZE = 64


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def plan_chunks_aside(cu_seqlens: Tensor, cu_seqlens_cpu: Tensor) -> Tensor:
    """fla's chunk plan for ``cu_seqlens`` (a CUDA tensor) made on a side stream, so that its blocking copy from
    pageable memory waits for that stream alone, not for the work queued on the current one; fla's forward
    then takes it from its cache (the same call: the same objects). Returns the plan."""
    from fla.ops.utils import prepare_chunk_indices

    current = torch.cuda.current_stream(cu_seqlens.device)
    with torch.cuda.stream(_side_stream(cu_seqlens.device)):
        plan = prepare_chunk_indices(cu_seqlens, FLA_CHUNK_SIZE, cu_seqlens_cpu=cu_seqlens_cpu)
    # Made on the side stream, read by kernels on the current one: its memory is not reused before they ran.
    plan.record_stream(current)
    return plan


@functools.cache
def fla_available() -> bool:
    """Whether fla-core's simple_gla kernel imports (needs triton and a CUDA build)."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
    except Exception:  # an installed but broken fla (e.g. triton mismatch) counts as absent
        return False
    return True


@functools.cache
def _takes_cu_seqlens_cpu() -> bool:
    """fla-core added ``cu_seqlens_cpu`` in 2026; older releases lack it."""
    from fla.ops.simple_gla import chunk_simple_gla

    return "cu_seqlens_cpu" in inspect.signature(chunk_simple_gla).parameters


def fla_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    rows: PackedRows | None,
    cu_seqlens: Tensor | None,
    initial_state: Tensor | None,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """``lightning_attention`` through fla-core's ``chunk_simple_gla`` (see the module docstring)."""
    from fla.ops.simple_gla import chunk_simple_gla

    batch = q.shape[0]
    g_gamma = log_decay.to(device=q.device, dtype=torch.float32)
    cu_seqlens_cpu = None
    if rows is not None:
        rows = rows.to(q.device)
        cu_seqlens, cu_seqlens_cpu = rows.cu_seqlens, rows.cu_seqlens_cpu
        q, k, v, initial_state = end_to_end(rows, q, k, v, initial_state)
    extra = {}
    if cu_seqlens is not None:
        if cu_seqlens_cpu is None:
            # A caller that built the boundaries on the host tags them (tag_host_copy): no device read then.
            cu_seqlens_cpu = host_copy(cu_seqlens)
        if cu_seqlens_cpu is None:
            cu_seqlens_cpu = cu_seqlens.cpu()
        if install():
            # fla's state kernels then size their buffers from the host copy instead of reading the device.
            tag_host_copy(cu_seqlens, cu_seqlens_cpu)
        if _takes_cu_seqlens_cpu():
            # Lets fla plan its chunks without another device->host copy.
            extra["cu_seqlens_cpu"] = cu_seqlens_cpu
            if install() and cu_seqlens.is_cuda:
                plan_chunks_aside(cu_seqlens, cu_seqlens_cpu)
    o, final = chunk_simple_gla(
        q,
        k,
        v,
        g_gamma=g_gamma,
        scale=1.0,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        **extra,
    )
    if rows is not None:
        o, final = per_row(rows, o, final, batch)
    return o.to(v.dtype), final
