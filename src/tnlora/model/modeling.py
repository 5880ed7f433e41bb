"""Native TransNormerLLM (TNL1), checkpoint-compatible with OpenNLPLab's 385M / 1B / 7B releases.

Read top to bottom in the order of the spec (shared/design/transnormer.md §4): SRMSNorm, activations, decay
slopes, LRPE, token mixer, channel mixer, decoder layer, model, LM head + loss, loading. State-dict keys and
shapes are exactly the official ones (§3); the lightning attention and the Triton kernels live in
:mod:`tnlora.ops` (which implementation runs is chosen once per device, :meth:`~TransnormerPreTrainedModel.
select_kernels`), the recurrent-state cache in ``cache.py``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import ModelOutput, logging

from tnlora.config import CHECKPOINT_REGIONS  # gradient_checkpointing_kwargs' checkpoint_regions
from tnlora.model.cache import TransnormerCache
from tnlora.model.configuration import TransnormerConfig
from tnlora.model.generation import overlap_applies, overlapped_sample
from tnlora.model.offload import InputOffload, offloaded_checkpoint
from tnlora.ops.cross_entropy import cross_entropy_grad_, cross_entropy_grad_reference
from tnlora.ops.fla_autotune import store_shipped_results
from tnlora.ops.lightning import call_lanes, lightning_attention
from tnlora.ops.norm import add_rms_norm, gated_rms_norm, rms_norm, takes_rows
from tnlora.ops.packing import PackedRows
from tnlora.ops.qkvu_act import qkvu_act
from tnlora.ops.select import SCAN_MIN_LANES, Kernels, kernels_for

logger = logging.get_logger(__name__)

# transformers ≤ 5.23 calls the cache `past_key_values` (in generate, forward kwargs and outputs); 5.24 renamed
# it `cache`. Both are accepted on input; outputs use whichever name the installed release defines.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# ---------------------------------------------------------------------------------------------------------
# §4.3 SRMSNorm: no gain, no bias; fp32 inside, input dtype outside.


def _at_least_fp32(x: Tensor) -> Tensor:
    """Upcast half types to fp32; fp64 stays fp64 (float64 models are the exact references)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class SimpleRMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) over the last dim, computed in fp32 and cast back; ``gate`` ⊙ y with a gate.

    ``kernel`` "triton" (set by the model's ``select_kernels``) runs CUDA forwards as one Triton kernel
    (:mod:`tnlora.ops.norm`, equal up to the order of the sum) instead of ~7 PyTorch kernels: without grad
    (prefill, evaluation) the forward kernel, with grad (eager training) a differentiable form whose backward
    is one more kernel. Compiled forwards, and tensors the kernel cannot read in place, keep the PyTorch form.
    """

    def __init__(self, eps: float = 1e-6, kernel: str = "torch") -> None:
        super().__init__()
        self.eps = eps
        self.kernel = kernel

    def forward(self, x: Tensor, gate: Tensor | None = None) -> Tensor:
        if self.kernel == "triton" and self._triton_takes(x, gate):
            if torch.is_grad_enabled():
                return rms_norm(x, gate, self.eps)
            return add_rms_norm(x, None, self.eps)[1] if gate is None else gated_rms_norm(x, gate, self.eps)
        y = _at_least_fp32(x)
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y if gate is None else gate * y

    @staticmethod
    def _triton_takes(x: Tensor, gate: Tensor | None) -> bool:
        """Whether the Triton kernel can take this call: a CUDA tensor it reads without a copy, a gate of the
        same shape and dtype, outside torch.compile (Inductor fuses the PyTorch form itself)."""
        return (
            x.is_cuda
            and x.numel() > 0
            and not torch.compiler.is_compiling()
            and x.is_contiguous()
            and takes_rows(x, gate)
            and (gate is None or (gate.dtype == x.dtype and gate.shape == x.shape))
        )


# ---------------------------------------------------------------------------------------------------------
# §4.4 step 2: the activation on q and k (v and u get none). Unknown names mean identity, as officially.


def _exp_activation(x: Tensor) -> Tensor:
    with torch.no_grad():
        shift = x.amax(dim=-1, keepdim=True)
    return torch.exp(x - shift)


def _one_plus_elu(x: Tensor) -> Tensor:
    return 1 + F.elu(x)


def _two_plus_elu(x: Tensor) -> Tensor:
    return 2 + F.elu(x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "elu": F.elu,
    "sigmoid": torch.sigmoid,
    "exp": _exp_activation,
    "leak": F.leaky_relu,
    "1+elu": _one_plus_elu,
    "2+elu": _two_plus_elu,
    "sine": torch.sin,
}


def _identity(x: Tensor) -> Tensor:
    return x


# ---------------------------------------------------------------------------------------------------------
# §4.4 step 4: decay. ALiBi base slopes, scaled per layer; always fp32.


def get_slopes(num_heads: int) -> list[float]:
    """ALiBi slopes: 2^(−8(j+1)/h) for a power of two h; else those of the lower power of two followed by
    every other slope of the next one."""
    if math.log2(num_heads).is_integer():
        start = 2 ** (-8 / num_heads)
        return [start * start**j for j in range(num_heads)]
    lower = 2 ** math.floor(math.log2(num_heads))
    return get_slopes(lower) + get_slopes(2 * lower)[0::2][: num_heads - lower]


def layer_log_decay(
    num_heads: int, layer_idx: int, num_layers: int, device: torch.device | None = None
) -> Tensor:
    """log λ_{l,j} = −s_j·(1 − l/(L−1) + 1e-5), fp32 [H] (the official fp32 slope times a Python float)."""
    # A one-layer model has no (L−1); keep the full slope there instead of dividing by zero.
    factor = 1 - layer_idx / (num_layers - 1) + 1e-5 if num_layers > 1 else 1 + 1e-5
    slopes = torch.tensor(get_slopes(num_heads), dtype=torch.float32, device=device)
    return -(slopes * factor)


# ---------------------------------------------------------------------------------------------------------
# §4.4 step 3: LRPE, concatenation [x cos θp, x sin θp] (not rotary); q/k head dim doubles.


def lrpe_theta(num_heads: int, head_dim: int) -> Tensor:
    """Initial θ: 10000^(−2i/d) for i < d = h·hd, head j taking the j-th block, shape [h, 1, hd]."""
    d = num_heads * head_dim
    return (10000 ** (-2 / d * torch.arange(d, dtype=torch.float32))).reshape(num_heads, 1, head_dim)


class Lrpe(nn.Module):
    """Linearised relative positional encoding of layer 0; positions are absolute, from the cache."""

    def __init__(self, num_heads: int, head_dim: int, angle_dtype: str) -> None:
        super().__init__()
        self.theta = nn.Parameter(lrpe_theta(num_heads, head_dim))
        self.angle_dtype = angle_dtype

    def forward(self, x: Tensor, offset: int | Tensor) -> Tensor:
        """x [B, T, H, hd] at positions offset…offset+T−1 → [B, T, H, 2·hd].

        ``offset`` is a Python int, a 0-dim integer tensor (CUDA-graph decoding keeps the position on the
        device so that no int is baked into the graph) or a [B] integer tensor, one position per row (a decode
        batch whose requests joined at different times). All give bitwise the same result for one token (the
        decode step) below 2^24 positions; for several tokens with angle_dtype "model" the int path's rounding
        is the device's own (the CPU rounds the int to the model dtype before adding, CUDA adds in fp32) and
        the tensor path follows CUDA's. A [B, T] integer tensor gives every token its own position (prompts
        packed into one row, each at its own positions); angle_dtype "float32" only, where it is bitwise the
        int path's.
        """
        heads, head_dim = self.theta.shape[0], self.theta.shape[-1]
        length = x.shape[1]
        per_token = isinstance(offset, Tensor) and offset.dim() == 2
        if per_token and self.angle_dtype == "model":
            raise ValueError("per-token LRPE positions need lrpe_angle_dtype 'float32'")
        if isinstance(offset, Tensor) and offset.dim() == 1:
            offset = offset[:, None]  # [B, 1]: the index below becomes [B, T], the angles [B, T, H, hd]
        if self.angle_dtype == "model":
            # Official numerics: the index and θ·index are rounded to the model dtype (lossy in bf16).
            index = torch.arange(length, device=x.device).to(x.dtype)
            if isinstance(offset, Tensor):
                # On CUDA `bf16 + int` adds in fp32 and rounds once; a bf16 + tensor add would round the
                # position to bf16 first, so spell out the fp32 add.
                wide = _at_least_fp32(index)
                index = (wide + offset.to(wide.dtype)).to(x.dtype)
            else:
                index = index + offset
            angles = self.theta.to(x.dtype).reshape(heads, head_dim) * index[..., None, None]
            return torch.cat([x * torch.cos(angles), x * torch.sin(angles)], dim=-1)
        xf = _at_least_fp32(x)  # fp64 models keep fp64, so that float64 references can be matched exactly
        if per_token:
            index = offset.to(xf.dtype)
        elif isinstance(offset, Tensor):
            # Integer positions rounded once to the angle dtype, as arange(offset, offset + T) gives.
            index = (offset + torch.arange(length, device=x.device)).to(xf.dtype)
        else:
            index = torch.arange(offset, offset + length, device=x.device, dtype=xf.dtype)
        angles = self.theta.to(xf.dtype).reshape(heads, head_dim) * index[..., None, None]
        return torch.cat([xf * torch.cos(angles), xf * torch.sin(angles)], dim=-1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# §4.4 token mixer ("NormLinearAttention"): qkvu → act(q), act(k) → LRPE → masked v → lightning attention →
# SRMSNorm over the full D → ⊙ raw u → out_proj.


class NormLinearAttention(nn.Module):
    """The token mixer of one layer; ``log_decay`` is a non-persistent fp32 buffer. ``impl`` / ``forward_impl`` /
    ``step_impl``: the lightning attention of multi-token calls with and without gradients and of one-token calls,
    ``few_lanes_impl`` that of calls with gradients holding few lanes (set by the model's ``select_kernels``)."""

    def __init__(self, config: TransnormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_layers = config.decoder_layers
        self.num_heads = config.decoder_attention_heads
        self.head_dim = config.head_dim
        self.impl = "chunked"
        self.few_lanes_impl = "chunked"
        self.forward_impl = "chunked"
        self.step_impl = "recurrent"
        self.act_kernel = "torch"  # ops.qkvu_act with grad on CUDA where "triton" (select_kernels sets it)
        self.chunk_size = config.lightning_chunk_size
        # Registration order gives the official key order: out_proj, lrpe.theta, qkvu_proj.
        self.out_proj = nn.Linear(config.hidden_dim, config.decoder_embed_dim, bias=config.bias)
        self.act = ACTIVATIONS.get(config.linear_act_fun, _identity)
        self.norm = SimpleRMSNorm()
        self.lrpe = (
            Lrpe(self.num_heads, self.head_dim, config.lrpe_angle_dtype)
            if config.uses_lrpe(layer_idx)
            else None
        )
        self.qkvu_proj = nn.Linear(config.decoder_embed_dim, 4 * config.hidden_dim, bias=config.bias)
        self.register_buffer("log_decay", self._log_decay(), persistent=False)

    def _log_decay(self, device: torch.device | None = None) -> Tensor:
        return layer_log_decay(self.num_heads, self.layer_idx, self.num_layers, device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        super()._apply(fn, recurse)
        # `.to(bfloat16)` casts buffers too; the decay must stay fp32, so rebuild it exactly.
        if self.log_decay.dtype != torch.float32:
            self.log_decay = self._log_decay(self.log_decay.device)
        return self

    def forward(
        self,
        x: Tensor,
        v_mask: Tensor | None = None,
        rows: PackedRows | None = None,
        cache: TransnormerCache | None = None,
        position_offset: int | Tensor = 0,
    ) -> Tensor:
        q, k, v, u = self.project(x, v_mask, position_offset)
        return self.output(self.attend(q, k, v, rows, cache), u)

    def project(
        self, x: Tensor, v_mask: Tensor | None = None, position_offset: int | Tensor = 0
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, v [B, T, H, D] (activation, LRPE and the pad mask applied) and the gate u [B, T, hidden]."""
        if self.act_kernel == "triton" and self.act is F.silu and torch.is_grad_enabled() and x.is_cuda:
            # PyTorch's forward; the backward kernel writes the projection's gradient without a concatenation.
            q, k, v, u = qkvu_act(self.qkvu_proj(x), v_mask)
            shape = (*q.shape[:2], self.num_heads, self.head_dim)
            q, k, v = q.view(shape), k.view(shape), v.view(shape)
        else:
            q, k, v, u = self.heads(x)
            q, k = self.act(q), self.act(k)
            if v_mask is not None:
                # Padded tokens add nothing to any state; q and k stay unmasked (official behaviour).
                v = v.masked_fill(~v_mask[:, :, None, None], 0)
        if self.lrpe is not None:
            q, k = self.lrpe(q, position_offset), self.lrpe(k, position_offset)
        return q, k, v, u

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The fused projection split: q, k, v [B, T, H, D] as projected (no activation) and u [B, T, hidden]."""
        return self.split_heads(self.qkvu_proj(x))

    def split_heads(self, qkvu: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, v [B, T, H, D] and u [B, T, hidden] of the projection's output qkvu [B, T, 4 · hidden]."""
        batch, length, _ = qkvu.shape
        q, k, v, u = qkvu.chunk(4, dim=-1)
        shape = (batch, length, self.num_heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape), u

    # The compile boundary of a compiled layer (besides lightning_attention's own): the cache is Python state.
    @torch.compiler.disable
    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        rows: PackedRows | None = None,
        cache: TransnormerCache | None = None,
    ) -> Tensor:
        """The lightning attention o [B, T, H, V], reading and advancing this layer's state in ``cache``."""
        o, state = lightning_attention(
            q,
            k,
            v,
            self.log_decay,
            rows=rows,
            initial_state=cache.get_state(self.layer_idx) if cache is not None else None,
            output_final_state=cache is not None,
            impl=self.attention_impl(q.shape[1], rows is not None, self.lanes(q, rows)),
            chunk_size=self.chunk_size,
        )
        if cache is not None:
            cache.update_state(state, self.layer_idx)
        return o

    def attention_impl(self, length: int, packed: bool = False, lanes: int | None = None) -> str:
        """The lightning attention this call runs: the step's for one unpacked token; the forward-only one in
        eval mode without gradients (prefill, evaluation); the trainable one otherwise (in train mode always,
        so that a checkpointed layer's no-grad forward and its recompute run the same kernels), the few-lanes one
        for a call of fewer than ``SCAN_MIN_LANES`` ``lanes``."""
        if length == 1 and not packed:
            return self.step_impl
        if not (self.training or torch.is_grad_enabled()):
            return self.forward_impl
        return self.few_lanes_impl if lanes is not None and lanes < SCAN_MIN_LANES else self.impl

    def lanes(self, q: Tensor, rows: PackedRows | None) -> int | None:
        """The call's lanes (``ops.lightning.call_lanes``: heads × tokens ÷ the longest example, from the host's
        boundaries); None where the few-lanes choice is the same kernel or the call runs the forward-only one."""
        if self.few_lanes_impl == self.impl or not (self.training or torch.is_grad_enabled()):
            return None
        return call_lanes(q, rows)

    def output(self, o: Tensor, u: Tensor) -> Tensor:
        """out_proj(u ⊙ SRMSNorm(o)) [B, T, dim]."""
        batch, length = o.shape[:2]
        return self.out_proj(self.norm(o.reshape(batch, length, -1), gate=u))


# ---------------------------------------------------------------------------------------------------------
# §4.5 channel mixer: a GLU with no activation.


class GLU(nn.Module):
    """y = l3(l1(z) ⊙ l2(z))."""

    def __init__(self, dim: int, glu_dim: int, bias: bool) -> None:
        super().__init__()
        self.l1 = nn.Linear(dim, glu_dim, bias=bias)
        self.l2 = nn.Linear(dim, glu_dim, bias=bias)
        self.l3 = nn.Linear(glu_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        pair = self.inputs_pair(x)
        h1, h2 = pair if pair is not None else (self.l1(x), self.l2(x))
        return self.l3(h1 * h2)

    def inputs_pair(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """(l1(x), l2(x)) from ``l1``'s ``forward_with(l2, x)`` where it has one and computes both (an adapted layer
        that runs two projections of one input as one operation), else None."""
        forward_with = getattr(self.l1, "forward_with", None)
        return forward_with(self.l2, x) if forward_with is not None else None


# ---------------------------------------------------------------------------------------------------------
# §4.2 decoder layer: pre-norm, two residuals.


class TransnormerDecoderLayer(GradientCheckpointingLayer):
    """x ← x + TokenMixer(SRMSNorm(x)); x ← x + GLU(SRMSNorm(x))."""

    # Under activation checkpointing with the mixers as regions of their own (``checkpoint_regions: "mixers"``
    # of ``gradient_checkpointing_enable``): the checkpoint function each mixer's residual step runs through,
    # given its recompute context. None: transformers checkpoints the whole layer.
    region_checkpoint: Callable[..., Any] | None = None

    def __init__(self, config: TransnormerConfig, layer_idx: int) -> None:
        super().__init__()
        self.token_norm = SimpleRMSNorm()
        self.channel_norm = SimpleRMSNorm()
        self.token_mixer = NormLinearAttention(config, layer_idx)
        self.channel_mixer = GLU(config.decoder_embed_dim, config.channel_dim, config.bias)

    def forward(
        self,
        hidden_states: Tensor,
        v_mask: Tensor | None = None,
        rows: PackedRows | None = None,
        past_key_values: TransnormerCache | None = None,
        position_offset: int = 0,
        keep: Tensor | None = None,
    ) -> Tensor:
        """The layer's output [B, T, dim]; with ``keep`` (flat indices into the B·T positions) the output of those
        positions alone, [1, n, dim]: the attention runs on every position (each one's state feeds the later
        ones), everything after it on the kept ones (:meth:`forward_kept`)."""
        if keep is not None:
            return self.forward_kept(hidden_states, keep, v_mask, rows, past_key_values, position_offset)
        x = hidden_states
        regions = self.region_checkpoint
        if regions is not None and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            x = regions(self.mix_tokens, x, v_mask, rows, None, position_offset, region="tokens")
            return regions(self.mix_channels, x, region="channels")
        # The token mixer's steps (its forward) called from here: in a compiled layer the attention, a compile
        # boundary, then splits this one frame into two graphs. Through `self.token_mixer(...)` (or a method of
        # this layer) a boundary in the called function also ends this frame's graph: three or four graphs a
        # layer, each entered from Python.
        mixer = self.token_mixer
        q, k, v, u = mixer.project(self.token_norm(x), v_mask, position_offset)
        x = x + mixer.output(mixer.attend(q, k, v, rows, past_key_values), u)
        return self.mix_channels(x)

    def forward_kept(
        self,
        x: Tensor,
        keep: Tensor,
        v_mask: Tensor | None = None,
        rows: PackedRows | None = None,
        past_key_values: TransnormerCache | None = None,
        position_offset: int = 0,
    ) -> Tensor:
        """:meth:`forward` at the positions ``keep`` only ([1, n, dim]), run eagerly, in the forward and in a
        checkpoint's recompute alike: compiled layers' graphs are for whole rows, and a variant of its own for the
        one layer that trims would cost as much compile time as the layer's graphs."""
        with _eagerly():
            regions = self.region_checkpoint
            if regions is not None and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # The recompute calls the step again, not this method: the step takes the eager stance itself.
                x = regions(functools.partial(_eager_call, self.mix_tokens), x, v_mask, rows, None, position_offset,
                            keep, region="tokens")  # fmt: skip
                return regions(functools.partial(_eager_call, self.mix_channels), x, region="channels")
            return self.mix_channels(self.mix_tokens(x, v_mask, rows, past_key_values, position_offset, keep))

    def mix_tokens(
        self,
        x: Tensor,
        v_mask: Tensor | None = None,
        rows: PackedRows | None = None,
        past_key_values: TransnormerCache | None = None,
        position_offset: int = 0,
        keep: Tensor | None = None,
    ) -> Tensor:
        """x + TokenMixer(SRMSNorm(x)): the token step alone, for its own checkpoint (eager: under checkpointing
        the compiled parts are the mixer's steps); with ``keep``, at those positions only ([1, n, dim]), the
        output's gated norm and projection on them alone."""
        mixer = self.token_mixer
        q, k, v, u = mixer.project(self.token_norm(x), v_mask, position_offset)
        o = mixer.attend(q, k, v, rows, past_key_values)
        if keep is not None:
            x, o, u = (_kept_positions(t, keep) for t in (x, o, u))
        return x + mixer.output(o, u)

    def mix_channels(self, x: Tensor) -> Tensor:
        """x + GLU(SRMSNorm(x))."""
        return x + self.channel_mixer(self.channel_norm(x))

    @contextlib.contextmanager
    def recomputing(self, region: str = "layer") -> Iterator[None]:
        """The context of a recompute under (non-reentrant) activation checkpointing, which regenerates only the
        tensors the backward reads: of the whole layer (``region`` "layer") or of one mixer's residual step
        ("tokens", "channels"). An output projection whose output feeds nothing but a residual add, whose
        backward reads no values, is told that its output is not needed (``output_needed``, an attribute of the
        fused LoRA layer, which then leaves out its frozen GEMM and its adapter's B product; a layer without the
        attribute runs as always): the channel mixer's ``l3`` in the layer's and the channel step's recompute,
        and the token mixer's ``out_proj`` in the token step's (in the layer's, the channel mixer reads its
        output through the residual)."""
        projection = self.token_mixer.out_proj if region == "tokens" else self.channel_mixer.l3
        unread = [projection] if hasattr(projection, "output_needed") else []
        for module in unread:
            module.output_needed = False
        try:
            yield
        finally:
            # Back to the class's default (not an instance attribute of the same value): a compiled channel
            # mixer's guards then see the forward's state as they first did, and no third variant compiles.
            for module in unread:
                del module.output_needed


def _kept_positions(t: Tensor, keep: Tensor) -> Tensor:
    """t [B, T, ...] at the flat positions ``keep`` (into B·T), as one row [1, n, ...]."""
    return t.reshape(-1, *t.shape[2:]).index_select(0, keep).unsqueeze(0)


def _eagerly() -> contextlib.AbstractContextManager[Any]:
    """Compiled modules run as plain PyTorch inside (a no-op where a caller compiles the whole model: the stance
    is not set inside traced code)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def _eager_call(function: Callable[..., Any], *args: Any) -> Any:
    with _eagerly():
        return function(*args)


# ---------------------------------------------------------------------------------------------------------
# The model.


def _recompute_contexts(layer: TransnormerDecoderLayer, region: str = "layer") -> tuple[Any, Any]:
    """torch checkpoint's ``context_fn`` for ``region`` of ``layer``: nothing around the forward, its recompute
    context around the recompute."""
    return contextlib.nullcontext(), layer.recomputing(region)


def _through(function: Callable[..., Any], *args: Any) -> Any:
    """A layer's checkpoint function where its mixers are checkpointed as regions of their own: the layer runs
    as is, and checkpoints its two steps itself."""
    return function(*args)


def _region_checkpoint(
    base: Callable[..., Any], layer: TransnormerDecoderLayer, kwargs: dict[str, Any]
) -> Callable[..., Any]:
    """``layer.region_checkpoint``: ``base`` (torch's checkpoint) over one mixer step with that step's recompute
    context."""

    def run(function: Callable[..., Any], *args: Any, region: str) -> Any:
        # A context_fn of the caller's own is kept, as for the whole layer.
        contexts = {} if "context_fn" in kwargs else {"context_fn": functools.partial(_recompute_contexts, layer, region)}
        return base(function, *args, **kwargs, **contexts)

    return run


class TransnormerPreTrainedModel(PreTrainedModel):
    """Weight init (spec §10), loading rules and capabilities shared by the model classes."""

    config_class = TransnormerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TransnormerDecoderLayer"]  # noqa: RUF012 (transformers' class-attribute API)
    _keys_to_ignore_on_load_unexpected = [r"decoder\.version"]  # noqa: RUF012
    # A recurrent state cannot be rolled back: transformers then refuses assisted decoding.
    _is_stateful = True

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        """transformers' activation checkpointing of every decoder layer, with three more keys accepted in
        ``gradient_checkpointing_kwargs``: ``offload_to_cpu: True`` keeps each checkpointed layer's inputs in
        (pinned) CPU memory from the forward to the backward, freeing layers × tokens × hidden of GPU memory for
        long sequences at the cost of one copy each way per layer, beside the computation (see
        :mod:`tnlora.model.offload`). ``checkpoint_regions: "mixers"`` (non-reentrant, not offloaded)
        checkpoints each layer's token-mixer and channel-mixer steps apart: each layer then also keeps its
        middle residual (tokens × hidden more), and the token step's recompute leaves out ``out_proj``'s
        output as the layer's leaves out ``l3``'s (``recomputing``). ``uncheckpointed_layers: N`` leaves the
        last N decoder layers out of checkpointing: they keep their activations and are not recomputed.

        Reached from both Trainer entry points: ``gradient_checkpointing_enable`` (transformers ≤ 5.23) and
        ``activation_checkpointing_enable`` (5.24+, which defers to this override).
        """
        ckpt_kwargs = dict(gradient_checkpointing_kwargs or {"use_reentrant": False})
        # transformers 5.24+ has an `offload` argument of its own (save_on_cpu's copies on the compute stream):
        # it gets the same side-stream offload as the key.
        offload = ckpt_kwargs.pop("offload_to_cpu", False) or kwargs.get("offload", False)
        regions = ckpt_kwargs.pop("checkpoint_regions", "layer")
        kept = ckpt_kwargs.pop("uncheckpointed_layers", 0)
        layers = [m for m in self.modules() if isinstance(m, TransnormerDecoderLayer)]
        if not isinstance(kept, int) or not 0 <= kept <= len(layers):
            raise ValueError(f"uncheckpointed_layers must be 0 to {len(layers)} (the decoder layers), got {kept!r}")
        if regions not in CHECKPOINT_REGIONS:
            raise ValueError(f"checkpoint_regions must be one of {', '.join(CHECKPOINT_REGIONS)}, got {regions!r}")
        if regions == "mixers" and (offload or ckpt_kwargs.get("use_reentrant") is not False):
            raise ValueError("checkpoint_regions 'mixers' needs non-reentrant checkpointing without offload")
        enable = getattr(super(), "_activation_checkpointing_enable", None)
        if enable is not None:  # 5.24+: the deprecated public name would warn
            enable(ckpt_kwargs, **kwargs)
        else:
            super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs, **kwargs)
        # The function transformers installed, rebuilt per layer: a decoder layer's recompute runs in its
        # `recomputing` context (torch's `context_fn`, non-reentrant checkpointing only).
        base = functools.partial(offloaded_checkpoint, InputOffload()) if offload else checkpoint
        contexts = ckpt_kwargs.get("use_reentrant") is False and "context_fn" not in ckpt_kwargs
        for module in self.modules():
            if not hasattr(module, "gradient_checkpointing"):
                continue
            layer_kwargs = dict(ckpt_kwargs)
            if isinstance(module, TransnormerDecoderLayer):
                module.region_checkpoint = None
                if regions == "mixers":
                    module.region_checkpoint = _region_checkpoint(base, module, layer_kwargs)
                    module._gradient_checkpointing_func = _through
                    continue
                if contexts:
                    layer_kwargs["context_fn"] = functools.partial(_recompute_contexts, module)
            module._gradient_checkpointing_func = functools.partial(base, **layer_kwargs)
        # The last layers keep their activations: the backward reaches them first, when no recompute holds a
        # layer's activations yet, so each costs memory only beyond the first.
        for layer in layers[len(layers) - kept :]:
            layer.gradient_checkpointing = False

    def post_init(self) -> None:
        super().post_init()
        self.select_kernels()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``, then the kernels chosen for the device the weights landed on (a
        ``device_map`` places them without moving the model, so ``_apply`` never sees it)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
        model.select_kernels()
        return loaded

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        # `.to(device)`, `.cuda()`, `.cpu()`: the implementations follow the model to its new device.
        super()._apply(fn, recurse)
        self.select_kernels()
        return self

    def select_kernels(self, device: torch.device | str | None = None) -> Kernels:
        """Point every norm and token mixer at the implementations ``tnlora.ops.select`` chooses for this config
        on ``device`` (default: where the parameters are). Called when the model is built, loaded or moved, and
        after a change of ``config.lightning_impl`` / ``norm_kernel`` / ``loss_kernel`` / ``act_kernel``; forwards
        only read the choice."""
        if device is None:
            first = next(self.parameters(), None)
            device = first.device if first is not None else torch.device("cpu")
        kernels = kernels_for(self.config, device)
        device = torch.device(device)
        if "fla" in (kernels.attention, kernels.attention_few_lanes) and device.type == "cuda":
            # fla's tuned launches for the shipped shapes, in Triton's cache before its first launch autotunes.
            store_shipped_results(torch.cuda.current_device() if device.index is None else device.index)
        for module in self.modules():
            if isinstance(module, SimpleRMSNorm):
                module.kernel = kernels.norm
            elif isinstance(module, NormLinearAttention):
                module.impl, module.forward_impl = kernels.attention, kernels.attention_forward
                module.few_lanes_impl = kernels.attention_few_lanes
                module.step_impl = kernels.attention_step
                module.act_kernel = kernels.act
            elif isinstance(module, TransnormerForCausalLM):
                module.loss_kernel = kernels.loss
        return kernels

    def _init_weights(self, module: nn.Module) -> None:
        # transformers.initialization skips tensors already loaded from a checkpoint.
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, Lrpe):
            init.copy_(module.theta, lrpe_theta(*module.theta.shape[::2]))
        elif isinstance(module, NormLinearAttention):
            # A non-persistent buffer is rebuilt on the meta device by from_pretrained: give it real values.
            init.copy_(module.log_decay, module._log_decay())


class TransnormerModel(TransnormerPreTrainedModel):
    """Embedding → decoder layers → final SRMSNorm."""

    def __init__(self, config: TransnormerConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.decoder_embed_dim, config.pad_token_id)
        self.layers = nn.ModuleList(TransnormerDecoderLayer(config, i) for i in range(config.decoder_layers))
        self.final_norm = SimpleRMSNorm()
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Cache | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        packed_rows: PackedRows | None = None,
        seq_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        kept_positions: Tensor | None = None,
        **kwargs: object,
    ) -> BaseModelOutputWithPast | tuple:
        """Hidden states after the final norm.

        ``inputs_embeds`` are raw embedding rows (what ``get_input_embeddings()(ids)`` returns): the embedding
        scale is applied to them exactly as to looked-up ids, so both inputs give identical outputs.
        ``position_ids`` are ignored: LRPE positions come from the cache length. Packed rows: ``packed_rows``
        (a :class:`~tnlora.ops.packing.PackedRows`, what the training collator passes: built on the host, so
        nothing is read back from the GPU), or ``seq_ids`` [B, T] (example id per token), or ``cu_seqlens``
        [N+1] for one row; no state or decay crosses an example boundary. ``kept_positions``: flat indices into
        the B·T positions whose hidden states alone are wanted (the loss's): the last layer leaves out the others
        after its attention, and ``last_hidden_state`` is [1, n, dim] (not with ``output_hidden_states``).
        """
        rows = _packed_rows(packed_rows, seq_ids, cu_seqlens, input_ids if input_ids is not None else inputs_embeds)
        past_key_values = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        scale = self.config.embed_scale
        hidden = inputs_embeds * scale if scale != 1.0 else inputs_embeds
        length = hidden.shape[1]

        cache = self._resolve_cache(past_key_values, use_cache)
        offset = cache.get_seq_length() if cache is not None else 0
        v_mask = _value_mask(attention_mask, length)

        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_hidden_states and kept_positions is not None:
            raise ValueError("kept_positions leaves positions out of the last hidden states: not with output_hidden_states")
        all_hidden = [] if output_hidden_states else None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(hidden)
            keep = kept_positions if i == last else None
            # The trimming layer runs eagerly (TransnormerDecoderLayer.forward_kept), also where it is compiled.
            with _eagerly() if keep is not None else contextlib.nullcontext():
                hidden = layer(
                    hidden,
                    v_mask=v_mask,
                    rows=rows,
                    past_key_values=cache,
                    position_offset=offset,
                    keep=keep,
                )
        hidden = self.final_norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        if cache is not None:
            cache.advance(length)
        out = BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{CACHE_FIELD: cache},
        )
        return _as_requested(out, return_dict, self.config)

    def _resolve_cache(
        self, past_key_values: Cache | None, use_cache: bool | None
    ) -> TransnormerCache | None:
        """The cache this forward reads and updates, or None."""
        if isinstance(past_key_values, TransnormerCache):
            # A given state must be used even with use_cache=False: dropping it would silently restart.
            cache = past_key_values
        elif past_key_values is not None and (
            not isinstance(past_key_values, Cache) or past_key_values.get_seq_length() > 0
        ):
            raise TypeError("past_key_values must be a TransnormerCache (a recurrent state, not keys/values)")
        else:
            # generate() hands over an empty generic cache; replace it with the recurrent-state cache.
            if use_cache is None:
                use_cache = self.config.use_cache and not self.training
            cache = TransnormerCache(self.config) if use_cache else None
        if cache is not None and self.gradient_checkpointing and self.training:
            logger.warning_once(
                "Gradient checkpointing recomputes layers; the cache is not used in training."
            )
            return None
        return cache


def _as_requested(
    out: ModelOutput, return_dict: bool | None, config: TransnormerConfig
) -> ModelOutput | tuple:
    """The output object, or its tuple form when return_dict (default: the config's) is False."""
    use_dict = return_dict if return_dict is not None else config.return_dict
    return out if use_dict else out.to_tuple()


def _value_mask(attention_mask: Tensor | None, length: int) -> Tensor | None:
    """Bool keep-mask [B, T] of the current tokens from a bool/int/float 2-D mask (1 keep, 0 pad).

    generate() passes the mask of the whole sequence while feeding only new tokens: keep its last T columns.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] < length:
        raise ValueError(f"attention_mask must be 2-D [batch, >= {length}] (1 keep, 0 pad)")
    return attention_mask[:, -length:].to(torch.bool)


def _packed_rows(
    packed_rows: PackedRows | None, seq_ids: Tensor | None, cu_seqlens: Tensor | None, inputs: Tensor | None
) -> PackedRows | None:
    """The batch's example boundaries as one object for every layer (built once per forward), on the inputs'
    device."""
    given = [x is not None for x in (packed_rows, seq_ids, cu_seqlens)]
    if sum(given) > 1:
        raise ValueError("pass one of packed_rows, seq_ids or cu_seqlens")
    if seq_ids is not None:
        packed_rows = PackedRows.from_seq_ids(seq_ids)
    elif cu_seqlens is not None:
        if inputs is None or inputs.shape[0] != 1:
            raise ValueError("cu_seqlens needs one row (batch size 1); pass seq_ids for several rows")
        packed_rows = PackedRows.from_cu_seqlens(cu_seqlens, inputs.shape[1])
    if packed_rows is not None and inputs is not None:
        if tuple(packed_rows.seq_ids.shape) != tuple(inputs.shape[:2]):
            raise ValueError(
                f"packed rows of shape {tuple(packed_rows.seq_ids.shape)} for inputs of {tuple(inputs.shape[:2])}"
            )
        packed_rows = packed_rows.to(inputs.device)
    return packed_rows


# ---------------------------------------------------------------------------------------------------------
# §4.6 LM head (tied to the embedding) and the loss.


# The last layer trims (config.trim_last_layer) only where at most this share of a batch's positions is
# labelled: the trimming layer runs eagerly, which may cost a compiled layer's gain (≤ ~10 % of one layer), while
# it saves the unlabelled share of the layer's work after its attention (about 2/3 of the layer).
TRIM_MAX_LABELLED_SHARE = 0.8
# The trimmed rows are padded to a multiple of this many (positions 0, 1, ... taken again; their outputs feed
# nothing, so their gradients are zero) in batches of at least 8 times as many positions: a row count new every
# step made the BLAS library pick its kernels anew for each of the trimmed layer's GEMMs, milliseconds of host time
# each (as the loss's partial chunk did, LOSS_ROW_STEP), with the device left idle.
TRIM_ROW_STEP = 1024


def trimmed_positions(labelled: Tensor, positions: int) -> Tensor:
    """The positions the trimmed last layer computes: ``labelled`` (flat indices into ``positions``), then as many
    of the first positions as bring the count to a multiple of :data:`TRIM_ROW_STEP` where the batch holds at
    least 8 times that many positions."""
    if positions < 8 * TRIM_ROW_STEP:
        return labelled
    pad = -labelled.shape[0] % TRIM_ROW_STEP
    return torch.cat([labelled, torch.arange(pad, device=labelled.device, dtype=labelled.dtype)]) if pad else labelled


def _shifted_targets(labels: Tensor, device: torch.device) -> Tensor:
    """Flat [B·T] targets: position t predicts labels[t+1]; each row's last position gets -100."""
    return F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1).to(device)


def causal_lm_loss_from_logits(
    logits: Tensor, labels: Tensor, num_items_in_batch: Tensor | int | None = None
) -> Tensor:
    """Plain path: fp32 cross-entropy of the model-shifted labels over full logits (-100 ignored)."""
    targets = _shifted_targets(labels, logits.device)
    flat = _at_least_fp32(logits).reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(flat, targets, ignore_index=-100)
    return F.cross_entropy(flat, targets, ignore_index=-100, reduction="sum") / num_items_in_batch


def _cross_entropy_sum(lm_head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(_at_least_fp32(lm_head(hidden)), targets, reduction="sum")


# The row counts of the chunked loss's partial last chunk are multiples of this (see _LinearCrossEntropySum).
LOSS_ROW_STEP = 128


class _LinearCrossEntropySum(torch.autograd.Function):
    """Σ cross-entropy(rows @ Wᵀ, targets) with the gradients computed chunk by chunk in the forward pass.

    Each chunk's logits (in the dtype the LM head would run in: autocast's or W's) are cast to fp32; the
    chunk's loss is logsumexp − the target's logit, and its logit gradient softmax − onehot is cast back and
    multiplied out at once (rows: grad · W; W, when it trains: gradᵀ · rows, summed in fp32 or fp64). Only those
    products outlive the chunk, and the backward pass scales them: no recomputed logits, no fp32 logits
    saved, one GEMM per chunk fewer than checkpointing each chunk.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, kernel: str) -> Tensor:  # type: ignore[override]
        device = rows.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w = weight.to(dtype)
        grad_rows = torch.empty_like(rows)
        grad_weight = (
            torch.zeros_like(weight, dtype=_at_least_fp32(weight[:0]).dtype) if ctx.needs_input_grad[1] else None
        )
        total = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=rows.device)
        count = targets.shape[0]
        with torch.autocast(device, enabled=False):
            for lo in range(0, count, chunk_size):
                hi = min(lo + chunk_size, count)
                # A partial last chunk starts earlier, over the last rows of the chunk before, so that its row
                # count is a multiple of LOSS_ROW_STEP (or a whole chunk): a count new every step made the BLAS
                # library choose its kernels anew each step, milliseconds of host time with the GPU idle. The
                # rows it repeats (`skip`) add nothing: their losses and gradient rows are dropped.
                start = max(0, hi - min(chunk_size, -(-(hi - lo) // LOSS_ROW_STEP) * LOSS_ROW_STEP)) if lo else 0
                skip = lo - start
                chunk, target = rows[start:hi].to(dtype), targets[start:hi]
                if kernel == "triton":
                    grad = F.linear(chunk, w)
                    losses = cross_entropy_grad_(grad, target)  # the gradient written over the logits
                else:
                    logits = _at_least_fp32(F.linear(chunk, w))
                    losses, grad = cross_entropy_grad_reference(logits, target)
                    del logits
                    grad = grad.to(dtype)
                total += losses[skip:].sum()
                grad_rows[lo:hi] = (grad @ w)[skip:]
                if grad_weight is not None:
                    if skip:
                        grad[:skip] = 0
                    grad_weight += grad.t() @ chunk
        ctx.grads, ctx.weight_dtype = (grad_rows, grad_weight), weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_rows, grad_weight = ctx.grads
        del ctx.grads
        scale = grad_total.to(grad_rows.dtype)
        rows = grad_rows * scale if ctx.needs_input_grad[0] else None
        weight = (grad_weight * grad_total).to(ctx.weight_dtype) if grad_weight is not None else None
        return rows, weight, None, None, None


def partitioned(module: nn.Module) -> bool:
    """Whether ``module``'s weights are DeepSpeed ZeRO-3 partitions (tagged ``ds_id``): their data is gathered only
    while the module's own forward runs, so the loss calls the head instead of reading its weight. (FSDP2 gathers
    the root unit's weights, the head's among them, for the whole forward of the model.)"""
    return any(hasattr(p, "ds_id") for p in module.parameters(recurse=False))


def chunked_causal_lm_loss(
    hidden: Tensor,
    lm_head: nn.Module,
    labels: Tensor,
    num_items_in_batch: Tensor | int | None = None,
    chunk_size: int = 1024,
    num_loss_tokens: int | None = None,
    kernel: str = "torch",
) -> Tensor:
    """The same loss without full logits: fp32 logits of at most ``chunk_size`` tokens exist at a time.

    Only labelled tokens go through the LM head. Finding them reads their count back from the device (a
    host sync) unless the caller already knows it (``num_loss_tokens``: the labels ≠ -100 after the first
    position of each row, as the training collator counts them on the host); a wrong count fails a
    device-side assertion. With grad and a plain ``nn.Linear`` head (LoRA leaves it alone) each chunk's
    gradients are computed in the forward pass (:class:`_LinearCrossEntropySum`; ``kernel`` "triton": each
    chunk's loss and logit gradient by one Triton kernel, :mod:`tnlora.ops.cross_entropy`); any other head, and a head
    whose weight ZeRO-3 partitions (:func:`partitioned`), is recomputed per chunk in the backward pass
    (activation checkpointing). Either way the saved activations
    are one row of D values per labelled token.
    """
    keep, targets = labelled_positions(labels, hidden.device, num_loss_tokens)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    return labelled_rows_loss(rows, targets, lm_head, num_items_in_batch, chunk_size, kernel)


def labelled_positions(
    labels: Tensor, device: torch.device, num_loss_tokens: int | None = None
) -> tuple[Tensor, Tensor]:
    """(the flat positions into B·T whose shifted label is not -100, those labels) on ``device``. Finding them
    reads their count back from the device (a host sync) unless ``num_loss_tokens`` gives it; a wrong count
    fails a device-side assertion."""
    targets = _shifted_targets(labels, device)
    labelled = targets != -100
    if num_loss_tokens is None:
        keep = labelled.nonzero().squeeze(1)
    else:
        torch._assert_async(labelled.sum() == num_loss_tokens, "num_loss_tokens is not the number of labels")
        keep = torch.nonzero_static(labelled, size=num_loss_tokens).squeeze(1)
    return keep, targets.index_select(0, keep)


def labelled_rows_loss(
    rows: Tensor,
    targets: Tensor,
    lm_head: nn.Module,
    num_items_in_batch: Tensor | int | None = None,
    chunk_size: int = 1024,
    kernel: str = "torch",
) -> Tensor:
    """:func:`chunked_causal_lm_loss` of the labelled positions' hidden states ``rows`` [n, dim] and their
    ``targets`` [n] (as :func:`labelled_positions` gives them)."""
    if torch.is_grad_enabled() and type(lm_head) is nn.Linear and lm_head.bias is None and not partitioned(lm_head):
        if kernel == "triton" and torch.compiler.is_compiling():
            kernel = "torch"  # traced code gets PyTorch's ops, which the compiler can see
        total = _LinearCrossEntropySum.apply(rows, lm_head.weight, targets, chunk_size, kernel)
        return _loss_mean(total, targets.shape[0], num_items_in_batch)
    total = _at_least_fp32(rows[:0]).sum()  # stays attached to the graph even when nothing is labelled
    for lo in range(0, targets.shape[0], chunk_size):
        chunk = (rows[lo : lo + chunk_size], targets[lo : lo + chunk_size])
        if torch.is_grad_enabled():
            total = total + checkpoint(_cross_entropy_sum, lm_head, *chunk, use_reentrant=False)
        else:
            total = total + _cross_entropy_sum(lm_head, *chunk)
    return _loss_mean(total, targets.shape[0], num_items_in_batch)


def _loss_mean(total: Tensor, count: int, num_items_in_batch: Tensor | int | None) -> Tensor:
    """The summed loss over the labelled tokens, or over ``num_items_in_batch`` when the Trainer gives it."""
    if num_items_in_batch is None:
        return total / count
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class TransnormerForCausalLM(TransnormerPreTrainedModel, GenerationMixin):
    """TransNormerLLM with the tied LM head; generation through transformers' GenerationMixin."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012

    def __init__(self, config: TransnormerConfig) -> None:
        super().__init__(config)
        self.model = TransnormerModel(config)
        self.lm_head = nn.Linear(config.decoder_embed_dim, config.vocab_size, bias=False)
        # Fast one-token decoding, installed by the inference side (infer.decode_graph.install_graph_decoding).
        self.step_decoder: Callable[..., Tensor | None] | None = None
        self.loss_kernel = "torch"  # the chunked loss's per-chunk work (select_kernels sets it from the config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _trims_last_layer(self, output_hidden_states: bool | None) -> bool:
        """Whether a forward with labels and the chunked loss leaves the unlabelled positions out of the last
        layer (``config.trim_last_layer``; not where every layer's hidden states are returned)."""
        wanted = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        return bool(self.config.trim_last_layer) and not wanted

    def get_decoder(self) -> TransnormerModel:
        return self.model

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Cache | None = None,
        cache: Cache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        packed_rows: PackedRows | None = None,
        seq_ids: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        num_items_in_batch: Tensor | int | None = None,
        num_loss_tokens: int | None = None,
        logits_to_keep: int | Tensor = 0,
        return_dict: bool | None = None,
        return_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs: object,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits and/or the loss (labels are shifted here; -100 is ignored).

        Without labels, logits of the last ``logits_to_keep`` positions (0 = all) are returned. With labels the
        loss is computed in token chunks and no logits are returned unless asked for (``return_logits=True``,
        or ``logits_to_keep`` ≠ 0 for a subset); when all logits are asked for, the loss is the plain fp32 CE
        over them. ``num_items_in_batch`` turns the mean into sum / num_items_in_batch. ``num_loss_tokens``
        (the number of labels ≠ -100, counted on the host) spares the chunked loss a device→host read. With the
        chunked loss the last layer computes the labelled positions alone after its attention
        (``config.trim_last_layer``, where at most ``TRIM_MAX_LABELLED_SHARE`` of the positions are labelled).
        """
        if use_cache is None and labels is not None:
            use_cache = False  # scoring needs no recurrent state
        past_key_values = cache if cache is not None else past_key_values
        if self.step_decoder is not None and input_ids is not None and input_ids.shape[-1] == 1:
            # Installed by the inference side (tnlora.infer.decode_graph): one-token cached steps replayed from
            # static buffers; it returns None whenever the eager forward must run.
            logits = self.step_decoder(
                self,
                input_ids,
                attention_mask,
                past_key_values,
                inputs_embeds=inputs_embeds,
                labels=labels,
                packed=packed_rows is not None or seq_ids is not None or cu_seqlens is not None,
                output_hidden_states=output_hidden_states,
                logits_to_keep=logits_to_keep,
            )
            if logits is not None:
                out = CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: past_key_values})
                return _as_requested(out, return_dict, self.config)
        elif self.step_decoder is not None and input_ids is not None:
            # The same installer's short prefills (tnlora.infer.prefill_graph): a fresh cache filled by a graph.
            offer = getattr(self.step_decoder, "prefill", None)
            done = offer(
                self,
                input_ids,
                attention_mask,
                past_key_values,
                use_cache=use_cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                packed=packed_rows is not None or seq_ids is not None or cu_seqlens is not None,
                output_hidden_states=output_hidden_states,
                logits_to_keep=logits_to_keep,
            ) if offer is not None else None  # fmt: skip
            if done is not None:
                logits, filled = done
                out = CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: filled})
                return _as_requested(out, return_dict, self.config)
        keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
        # Labels and no full logits asked for: the chunked loss over the labelled positions. Where the last layer may
        # compute only them they are found before the layers run; otherwise after, so that a count read back from
        # the device (no num_loss_tokens) waits behind the layers' launches rather than ahead of them.
        chunked = labels is not None and not (return_logits and keep_all)
        labelled = targets = None
        trim = False
        if chunked and keep_all and self._trims_last_layer(output_hidden_states):
            inputs = input_ids if input_ids is not None else inputs_embeds
            labelled, targets = labelled_positions(labels, inputs.device, num_loss_tokens)
            # Not where too few are left out to pay for the eager last layer (nor where none is labelled).
            trim = 0 < labelled.shape[0] <= TRIM_MAX_LABELLED_SHARE * labels.numel()
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            packed_rows=packed_rows,
            seq_ids=seq_ids,
            cu_seqlens=cu_seqlens,
            output_hidden_states=output_hidden_states,
            kept_positions=trimmed_positions(labelled, labels.numel()) if trim else None,
        )
        hidden = outputs.last_hidden_state
        logits = None
        if labels is None or return_logits or not keep_all:
            kept = (
                hidden[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else hidden[:, logits_to_keep]
            )
            logits = self.lm_head(kept)
        loss = None
        if chunked:
            if labelled is None:
                labelled, targets = labelled_positions(labels, hidden.device, num_loss_tokens)
            rows = hidden.reshape(-1, hidden.shape[-1])
            rows = rows[: labelled.shape[0]] if trim else rows.index_select(0, labelled)
            kernel = self.loss_kernel if hidden.is_cuda else "torch"  # the kernel runs on CUDA tensors
            loss = labelled_rows_loss(rows, targets, self.lm_head, num_items_in_batch, self.config.loss_chunk_size, kernel)
        elif labels is not None:
            loss = causal_lm_loss_from_logits(logits, labels, num_items_in_batch)
        out = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: outputs.get(CACHE_FIELD)},
        )
        return _as_requested(out, return_dict, self.config)

    def _sample(
        self,
        input_ids: Tensor,
        logits_processor: Any,
        stopping_criteria: Any,
        generation_config: Any,
        synced_gpus: bool = False,
        streamer: Any = None,
        **model_kwargs: Any,
    ) -> Any:
        """GenerationMixin's greedy / multinomial loop; where the cache is not handed back, the overlapped order
        of :mod:`tnlora.model.generation` (the same tokens, without a host wait between steps)."""
        if overlap_applies(generation_config, synced_gpus, model_kwargs):
            return overlapped_sample(
                self, input_ids, logits_processor, stopping_criteria, generation_config, streamer, **model_kwargs
            )
        return super()._sample(
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            synced_gpus=synced_gpus,
            streamer=streamer,
            **model_kwargs,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        next_sequence_length: int | None = None,
        past_key_values: Cache | None = None,
        attention_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: object,
    ) -> dict:
        """transformers' preparation, plus: a recurrent state must see each token exactly once, so with a
        filled cache only the tokens it has not seen yet are fed (whatever the caller sliced)."""
        cache = past_key_values if past_key_values is not None else kwargs.get("cache")
        if isinstance(cache, TransnormerCache) and next_sequence_length is None:
            seen = cache.get_seq_length()
            prompt_embeds = inputs_embeds is not None and is_first_iteration
            if 0 < seen < input_ids.shape[1] and not prompt_embeds:
                next_sequence_length = input_ids.shape[1] - seen
        if past_key_values is not None:
            kwargs[CACHE_FIELD] = past_key_values
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
