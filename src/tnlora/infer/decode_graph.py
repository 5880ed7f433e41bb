"""CUDA-graph decoding: the one-token forward captured once per batch size and replayed at every decode step.

The inference side installs it on a model (:func:`install_graph_decoding`, done by ``load_for_inference`` on a
GPU); the model's forward then offers every one-token step to it (``TransnormerForCausalLM.step_decoder``).

An eager decode step of :class:`~tnlora.model.modeling.TransnormerForCausalLM` launches a dozen small kernels
per layer; at small batch their launches, not the weight reads, set the step time. A :class:`DecodeStepRunner` owns static buffers for one batch size

* inputs: token ids [B, 1], the pad flags of the new token [B, 1] and the position (LRPE offset) as a device
  tensor, so that no Python int is baked into the graph: 0-dim (every row at the cache's position, what
  ``generate()`` needs) or [B] with ``per_row_positions`` (rows at positions of their own: a serving batch
  whose requests joined at different steps);
* one recurrent state [B, H, K, V] per layer (fp32; fp64 for fp64 models), updated IN PLACE;
* the logits [B, 1, vocab],

and a ``torch.cuda.CUDAGraph`` of embedding → layers → final norm → LM head on them. Before a replay the new
ids, position and mask are copied in, and a cache state that is not the static buffer (after the prefill, or
after beam search reordered the cache) is copied into it; after the replay the cache's layers point at the
static buffers (the next step copies nothing) and the cache advances by one token.

The step performs the eager step's operations (``NormLinearAttention.forward`` with the recurrent lightning
attention for T = 1), only writing the new state into the old one, so its results equal the eager ones bitwise.
``capture=False`` runners run the same step on the same buffers without a graph, on any device: the tests use
them to check the buffer logic on the CPU.

``TransnormerConfig.decode_kernel`` picks the recurrence (resolved by :mod:`tnlora.ops.select`): "torch"
(:func:`tnlora.ops.recurrent.torch_step`, the in-place ops above, bitwise the eager step), "triton" (one fused
kernel per layer that reads and writes each state once and zeroes padded v itself,
:mod:`tnlora.ops.recurrent_triton`, and the norms fused with the residual adds and the output gate,
:mod:`tnlora.ops.norm`; equal up to rounding) or "auto" (the default: triton on CUDA when it imports). A runner
keeps the choice it was built with; a changed choice rebuilds the runners at the next ``generate()`` call (it
is part of the fingerprint). With the triton kernel, a step of one row or of ``ROWS_MIN_BATCH`` to
``GEMV_MAX_BATCH`` rows whose projections are all plain Linears runs as a chain of fused projections instead of
the layer forwards (:meth:`DecodeStepRunner._forward_gemv`, :mod:`tnlora.ops.gemv`: one-row GEMVs at batch 1,
each weight tile read once for all rows above; ``install_graph_decoding(gemv=False)`` keeps the layer
forwards), on sm_90 and later cards as programmatic dependent launches.

At other batches the captured layer forwards run the GLU's two projections side by side (l2 on a stream of its
own; ``branches``).

For greedy ``generate()`` calls (:func:`tnlora.model.generation.greedy_rule`) a runner also offers
:class:`GreedyDeviceSteps` (:meth:`DecodeGraphs.greedy_steps`): the step, the token choice and the finished
flags in one graph whose token feeds the next replay, so the host's work per token is one launch and one copy.
From ``DEFER_MIN_BATCH`` rows its Triton steps write each state back every ``DEFER_STEPS`` steps only
(:meth:`DecodeStepRunner.enable_deferral`; the loop's ``close`` makes the states whole when it ends).

:class:`DecodeGraphs` (the installed object) returns None whenever the eager path must run (training mode,
grad enabled, not CUDA, several tokens, labels, hidden states asked for, ...). peft LoRA layers are captured
as they are (the adapter's extra matmuls are part of the graph); the graphs are rebuilt when a parameter moves,
the module tree changes or an adapter is switched, enabled, disabled, merged or unmerged, checked whenever a
new cache (a new ``generate()`` call) comes.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache
from transformers.utils import logging

from tnlora.infer.prefill_graph import MAX_RUNNERS as PREFILL_RUNNERS
from tnlora.infer.prefill_graph import PrefillRunner, bucket_for
from tnlora.model.cache import TransnormerCache
from tnlora.model.generation import GreedyRule, row_flags
from tnlora.model.modeling import GLU, NormLinearAttention, TransnormerForCausalLM
from tnlora.ops.gemv import ROWS_MAX, embed_rows, gemv, pdl_supported
from tnlora.ops.norm import add_rms_norm, gated_rms_norm
from tnlora.ops.recurrent import torch_step
from tnlora.ops.recurrent_triton import DeferredTerms, triton_step
from tnlora.ops.select import kernel_impl
from tnlora.ops.token_choice import choose_greedy

logger = logging.get_logger(__name__)
T = TypeVar("T")

# Graphs kept per model (one per batch size); the oldest goes first. Each holds B·L states and a memory pool.
MAX_RUNNERS = 4
# The BLAS library the graphs are captured with (PyTorch's preferred_blas_library, set for the capture only):
# at batch 32, cuBLASLt's kernels for the skinny projections move their weights faster than cuBLAS's split-K
# ones (benchmarks/RESULTS.md).
GRAPH_BLAS = "cublaslt"
# The batches whose Triton steps run as fused projections by default (install_graph_decoding's
# ``gemv_max_batch`` and ``rows_min_batch``): batch 1, and ROWS_MIN_BATCH to GEMV_MAX_BATCH rows; the others run
# the layer forwards on cuBLASLt. On an H100, with every norm reading the sums of squares the kernel before wrote
# and the launches searched in the step, the rows step beat the layer forwards at batch 16 (1B +11 %, 7B +1 %)
# and 32 (1B +10 %, 7B +4 %, the step at 85 % of the card's copy rate), tied at 4 and 8, lost at 2 (1B −7 %)
# and at 64 (1–2 %, its launches' stages cut to fit; benchmarks/RESULTS.md, "Fused projections of several rows").
GEMV_MAX_BATCH = 32
ROWS_MIN_BATCH = 4
# The device greedy loop's steps write each recurrent state back every DEFER_STEPS steps only (the Triton
# step; 0: every step): the steps between read the state and the k, v held beside it, so a step moves one read of
# the states and a quarter of a write instead of a read and a write (at 7B batch 32, 1.9 GB of fp32 state) ...
DEFER_STEPS = 4
# ... from this batch size: on an H200 the deferred step took 7B batch 32 from 5,584–5,593 to 5,897–5,910 tokens/s
# and batch 16 from 3,149 to 3,190, left batch 8 as it was and lost at batch 1 (7B 292 → 288, 1B 1,519–1,529 →
# 1,409–1,451), where the state is a small part of a step's bytes (benchmarks/RESULTS.md, "Deferred state writes").
DEFER_MIN_BATCH = 16
# Eager runs before capture, on a side stream (PyTorch's CUDA-graph recipe: lazy inits, cuBLAS workspaces).
WARMUP_STEPS = 2
# peft layer attributes that change what a captured LoRA forward computes without touching any parameter.
_ADAPTER_SWITCHES = ("active_adapters", "disable_adapters", "merged_adapters", "scaling", "use_dora")


class DecodeStepRunner:
    """Static buffers, and with ``capture`` a CUDA graph, of the one-token forward for one batch size."""

    def __init__(
        self,
        model: TransnormerForCausalLM,
        batch_size: int,
        device: torch.device,
        capture: bool,
        blas: str | None = GRAPH_BLAS,
        per_row_positions: bool = False,
        gemv: bool = False,
        pdl: bool = False,
        branches: bool = False,
    ) -> None:
        self.capture = capture
        self.blas = blas
        self.kernel = decode_kernel(model, device)
        # Asked for (install_graph_decoding's default up to GEMV_MAX_BATCH rows), the Triton step runs the
        # projections as fused GEMVs where every one is a plain Linear.
        self.gemv = gemv and self.kernel == "triton" and batch_size <= ROWS_MAX and gemv_applies(model)
        # The GEMV step's Triton kernels as programmatic dependent launches (each reads its first weights
        # while the kernel before finishes), where the card and Triton have them.
        self.pdl = pdl and self.gemv and capture and pdl_supported(device)
        # The GLU's two projections side by side in the graph (``branches``, captured CUDA steps of the layer
        # forwards): l2 on a stream of its own while l1 runs. On an H200 at batch 32: +1.0 % (7B) and +1.2 % (1B)
        # tokens/s, the pair moving its weights at ~3.3 TB/s against 3.2 one after the other (RESULTS.md).
        self.branch = torch.cuda.Stream(device) if branches and capture and not self.gemv else None
        # Deferred state writes (enable_deferral; the device greedy loop's steps): the terms held beside each
        # layer's state and the position at which the states were whole.
        self.terms: list[DeferredTerms] = []
        self.base: Tensor | None = None
        self._deferring = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        self.greedy: dict[int, GreedyDeviceSteps] = {}  # by the number of eos ids
        self.owner: weakref.ref[TransnormerCache] | None = None
        # Plain tensors even under an outer inference_mode: later no_grad calls write into them in place.
        with torch.inference_mode(False):
            self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            self.pad = torch.zeros(batch_size, 1, dtype=torch.bool, device=device)
            self.position = torch.zeros((batch_size,) if per_row_positions else (), dtype=torch.long, device=device)
            self.states: list[Tensor] = []
            self.decays: list[Tensor] = []
            for layer in model.model.layers:
                mixer = layer.token_mixer
                shape, dtype = state_layout(mixer, batch_size)
                self.states.append(torch.zeros(shape, dtype=dtype, device=device))
                # λ [H] as attention._recurrent computes it at every step; here once.
                self.decays.append(torch.exp(mixer.log_decay.to(device=device, dtype=dtype)))

    @property
    def batch_size(self) -> int:
        return self.ids.shape[0]

    # -----------------------------------------------------------------------------------------------------
    # The step on the static buffers (what the graph records)

    def _forward(self, model: TransnormerForCausalLM) -> Tensor:
        """Logits [B, 1, vocab] of the token in ``self.ids``; advances ``self.states`` in place."""
        if self.gemv:
            return self._forward_gemv(model)
        return self._end(model, self._layers(model, self._begin(model)))

    def _embed(self, model: TransnormerForCausalLM, emit_squares: bool = False) -> tuple[Tensor, Tensor | None]:
        """The scaled embedding [B, 1, dim] of the token in ``self.ids``, and with ``emit_squares`` the partial
        sums of squares of its rows where the kernel made it (else None): in the GEMV step one kernel, which
        lets the first GEMV launch (and read its weights) while it runs."""
        embed = model.model.embed_tokens
        scale = model.config.embed_scale
        if self.gemv and type(embed) is nn.Embedding and embed.weight.dtype != torch.float64:
            if emit_squares:
                return embed_rows(self.ids, embed.weight, scale, trigger=self.pdl, emit_squares=True)
            return embed_rows(self.ids, embed.weight, scale, trigger=self.pdl), None
        hidden = embed(self.ids)
        return (hidden * scale if scale != 1.0 else hidden), None

    def _begin(self, model: TransnormerForCausalLM) -> tuple[Tensor, Tensor | None]:
        """The embedding: (hidden, its norm for the first layer when the norms are fused, else None)."""
        hidden, _ = self._embed(model)
        if self.kernel != "triton":
            return hidden, None
        return add_rms_norm(hidden, None, model.model.layers[0].token_norm.eps)

    def _layers(
        self, model: TransnormerForCausalLM, carry: tuple[Tensor, Tensor | None]
    ) -> tuple[Tensor, Tensor | None]:
        """Every layer on ``carry``. With the Triton kernels each residual add comes with the norm after it, one
        kernel (:func:`~tnlora.ops.norm.add_rms_norm`), as does the token mixer's gated output norm; the norm of
        the next layer's input then travels in the carry."""
        core = model.model
        hidden, normed = carry
        for i in range(len(core.layers)):
            layer = core.layers[i]
            if normed is None:
                hidden = hidden + self._token_mix(layer.token_mixer, layer.token_norm(hidden), i)
                hidden = hidden + self._channel_mix(layer.channel_mixer, layer.channel_norm(hidden))
                continue
            delta = self._token_mix(layer.token_mixer, normed, i)
            hidden, normed = add_rms_norm(hidden, delta, layer.channel_norm.eps)
            after = core.layers[i + 1].token_norm if i + 1 < len(core.layers) else core.final_norm
            hidden, normed = add_rms_norm(hidden, self._channel_mix(layer.channel_mixer, normed), after.eps)
        return hidden, normed

    def _channel_mix(self, glu: GLU, x: Tensor) -> Tensor:
        """``glu(x)``; with ``self.branch`` l2 runs on that stream beside l1 (the same kernels, so the same
        results bitwise). The branch waits for the step's stream before l2 and the stream for the branch after
        it, so every tensor the branch touches is made and freed in the step's order (in a graph: a fork and a
        join)."""
        if self.branch is None:
            return glu(x)
        main = torch.cuda.current_stream(x.device)
        self.branch.wait_stream(main)
        with torch.cuda.stream(self.branch):
            b = glu.l2(x)
        a = glu.l1(x)
        main.wait_stream(self.branch)
        return glu.l3(a * b)

    def _end(self, model: TransnormerForCausalLM, carry: tuple[Tensor, Tensor | None]) -> Tensor:
        hidden, normed = carry
        return model.lm_head(model.model.final_norm(hidden) if normed is None else normed)

    def _token_mix(self, mixer: NormLinearAttention, x: Tensor, i: int) -> Tensor:
        """NormLinearAttention.forward for one token, with the recurrence written into layer ``i``'s state."""
        return mixer.out_proj(self._gated_attention(mixer, *mixer.heads(x), i))

    def _gated_attention(self, mixer: NormLinearAttention, q: Tensor, k: Tensor, v: Tensor, u: Tensor, i: int) -> Tensor:
        """u ⊙ norm(o) [B, 1, hidden], the out projection's input, of the projected q, k, v, u; the recurrence
        written into layer ``i``'s state."""
        o, _ = self._attend(mixer, q, k, v, i)
        o = o.reshape(o.shape[0], 1, -1)
        if self.kernel == "triton":
            return gated_rms_norm(o, u, mixer.norm.eps)
        return mixer.norm(o, gate=u)

    def _attend(
        self, mixer: NormLinearAttention, q: Tensor, k: Tensor, v: Tensor, i: int, emit_squares: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """o [B, H, V] of the projected q, k, v (activation, LRPE, the recurrence written into layer ``i``'s
        state; while ``deferring``, written back every ``defer_steps`` steps, :meth:`enable_deferral`), and with
        ``emit_squares`` (the Triton kernel only) the partial sums of squares of o's rows, else None."""
        state, decay = self.states[i], self.decays[i]
        # The Triton step applies SiLU (TNL's activation) and the LRPE layer's rotation itself (about twenty
        # small kernels fewer in that layer).
        fuse = self.kernel == "triton" and mixer.act is F.silu
        if not fuse:
            q, k = mixer.act(q), mixer.act(k)
            if mixer.lrpe is not None:
                q, k = mixer.lrpe(q, self.position), mixer.lrpe(k, self.position)
        # Both steps always apply the pad flags (a graph has no branches): with no pad, v is unchanged, as the
        # eager path's skipped masking leaves it. The kernel reads v straight from the projection's slice.
        if self.kernel == "triton":
            lrpe = mixer.lrpe if fuse else None
            result = triton_step(
                q[:, 0], k[:, 0], v[:, 0], state, decay, self.pad[:, 0], silu_qk=fuse, pdl=self.pdl,
                lrpe_theta=lrpe.theta if lrpe is not None else None, position=self.position,
                lrpe_angle_dtype=lrpe.angle_dtype if lrpe is not None else "float32",
                deferred=self.terms[i] if self._deferring else None, emit_squares=emit_squares,
            )  # fmt: skip
            return result if emit_squares else (result, None)
        return torch_step(q[:, 0], k[:, 0], v[:, 0], state, decay, self.pad[:, 0]), None

    def _forward_gemv(self, model: TransnormerForCausalLM) -> Tensor:
        """``_forward`` as a chain of fused projections (:func:`tnlora.ops.gemv.gemv`, one row or a few): each
        norm folded into the projection after it (the output gate's too), the GLU's two projections and
        product one kernel, each residual add in the projection before it. Four projections and the recurrence
        a layer besides the LRPE layer's rotation, each (with ``pdl``) launched to overlap the one before. The
        batch-1 default of :func:`install_graph_decoding`: on an H200 the 7B step took 3.56 ms against 4.48 for
        the layer forwards on cuBLASLt, the 1B step 0.88 against 1.18 (benchmarks/RESULTS.md, "The GEMV
        step"). Results equal the layer forwards' up to the folded norms' rounding."""
        core = model.model
        pdl = self.pdl
        batch = self.batch_size
        # One row as a vector (the one-row kernel), several as [B, width] (u stays a slice of qkvu's rows).
        rows = (-1,) if batch == 1 else (batch, -1)
        # Several rows: the embedding and each residual projection also write the sums of squares of their
        # output rows, which the normed projection after it reads instead of summing x² beside its dot (what
        # made the normed forms of several rows slow). None: the projection sums them itself (one row; an
        # embedding other than the kernel's).
        hidden, squares = self._embed(model, emit_squares=batch > 1)
        hidden = hidden.reshape(rows)

        def residual_projection(x: Tensor, weight: Tensor, **options: Any) -> tuple[Tensor, Tensor | None]:
            if batch == 1:
                return gemv(x, weight, pdl=pdl, **options), None
            return gemv(x, weight, pdl=pdl, emit_squares=True, **options)

        for i, layer in enumerate(core.layers):
            mixer, glu = layer.token_mixer, layer.channel_mixer
            qkvu = gemv(hidden, mixer.qkvu_proj.weight, norm_eps=layer.token_norm.eps, norm_squares=squares, pdl=pdl)
            q, k, v, u = mixer.split_heads(qkvu.view(batch, 1, -1))
            # Several rows: the recurrence also writes the sums of squares of o's rows, which out_proj's norm reads.
            o, o_squares = self._attend(mixer, q, k, v, i, emit_squares=batch > 1)
            hidden, squares = residual_projection(o.reshape(rows), mixer.out_proj.weight, norm_eps=mixer.norm.eps,
                                                  gate=u.reshape(rows), residual=hidden, norm_squares=o_squares)
            product = gemv(hidden, glu.l1.weight, weight2=glu.l2.weight, norm_eps=layer.channel_norm.eps,
                           norm_squares=squares, pdl=pdl)
            hidden, squares = residual_projection(product, glu.l3.weight, residual=hidden)
        logits = gemv(hidden, model.lm_head.weight, norm_eps=core.final_norm.eps, norm_squares=squares, pdl=pdl)
        return logits.view(batch, 1, -1)

    def enable_deferral(self, steps: int) -> bool:
        """Let steps run under :meth:`deferring` write each state back every ``steps`` steps only (the Triton step;
        :class:`~tnlora.ops.recurrent_triton.DeferredTerms`): each step then reads the state and the terms held
        beside it, and :meth:`write_back` makes the states whole. Returns whether the runner has it."""
        if self.kernel != "triton" or steps < 2:
            return False
        if not self.terms or self.terms[0].steps != steps:
            with torch.inference_mode(False):
                self.base = torch.zeros_like(self.position)
                self.terms = [DeferredTerms.allocate(state, state.shape[3], self.base, steps) for state in self.states]
        return True

    @contextlib.contextmanager
    def deferring(self, on: bool) -> Iterator[None]:
        """The steps run (or recorded) inside write the states back every few steps (``on``, after
        :meth:`enable_deferral`)."""
        self._deferring = on and bool(self.terms)
        try:
            yield
        finally:
            self._deferring = False

    def row_states(self, row: int) -> list[Tensor]:
        """Every layer's state of ``row`` [H, K, V] as of the last step: the static buffers' views, or with
        deferred writes each made whole in a new tensor (the row's held steps read from its position and base
        on the device)."""
        if not self.terms:
            return [state[row] for state in self.states]
        held = (self.position[row] - self.base[row]) % self.terms[0].steps
        return [t.whole(s, d, held, row) for t, s, d in zip(self.terms, self.states, self.decays, strict=True)]

    def write_back(self, held: int) -> None:
        """Make every state whole after ``held`` steps with deferred writes since the base position."""
        for terms, state, decay in zip(self.terms, self.states, self.decays, strict=True):
            terms.apply(state, decay, held)

    # -----------------------------------------------------------------------------------------------------
    # Capture and replay

    def _capture(self, model: TransnormerForCausalLM) -> None:
        """Record ``_forward`` as one graph. Capture scribbles on the buffers; step refills them."""
        self.graph, self.logits = self.record(functools.partial(self._forward, model))

    def record(self, step: Callable[[], Tensor]) -> tuple[torch.CUDAGraph, Tensor]:
        """``step`` (a function of these buffers) recorded as one graph (:func:`record_graph`)."""
        return record_graph(step, self.ids.device, self.blas)

    def fits(self, input_ids: Tensor, cache: TransnormerCache) -> bool:
        """Whether this runner can take the step (same device, every cache state of the static shape)."""
        if input_ids.device != self.ids.device:
            return False
        for i, static in enumerate(self.states):
            state = cache.get_state(i)
            if state is not None and state is not static and state.shape != static.shape:
                return False
        return True

    def step(
        self, model: TransnormerForCausalLM, input_ids: Tensor, attention_mask: Tensor | None, cache: TransnormerCache
    ) -> Tensor:
        """Logits [B, 1, vocab] of ``input_ids`` [B, 1]; ``cache`` ends up on the static states, one token on."""
        if self.capture and self.graph is None:
            self._capture(model)
        pad = None if attention_mask is None else attention_mask[:, -1:]
        self.begin(cache, input_ids, pad)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits.clone()  # a copy: the static logits are overwritten by the next replay
        else:
            logits = self._forward(model)
        cache.advance(1)
        return logits

    def begin(self, cache: TransnormerCache, input_ids: Tensor, mask: Tensor | None) -> None:
        """Fill the buffers for a step of ``cache`` on ``input_ids`` [B, 1] (``mask`` [B, 1]: the new tokens'
        attention mask, None for all real); ``cache`` is made the owner of the static states and its layers
        point at them (the steps advance them in place)."""
        self._adopt(cache)
        self.ids.copy_(input_ids)
        self.position.fill_(cache.get_seq_length())
        if mask is None:
            self.pad.fill_(False)
        else:
            torch.logical_not(mask.to(torch.bool), out=self.pad)
        self._load_states([cache.get_state(i) for i in range(len(self.states))])
        for i, static in enumerate(self.states):
            cache.update_state(static, i)

    def run(self, model: TransnormerForCausalLM) -> Tensor:
        """Logits [B, 1, vocab] of the step on the buffers as they are (ids, pad, position, states), the states
        advanced in place: the slot-based use of a serving engine, which keeps each row's state and position
        in the buffers itself (``states[layer][row]``). With ``capture`` the first call records the graph,
        which runs the step on the buffers a few times first: make it before they hold anything that matters.
        With a graph the logits are the static buffer, overwritten by the next run."""
        if self.capture and self.graph is None:
            self._capture(model)
        if self.graph is None:
            return self._forward(model)
        self.graph.replay()
        return self.logits

    def _load_states(self, states: list[Tensor | None]) -> None:
        """Bring the static states to the cache's (no copy where they are its)."""
        for state, static in zip(states, self.states, strict=True):
            if state is None:
                static.zero_()  # attention._recurrent starts from zeros
            elif state is not static:
                static.copy_(state)

    def _adopt(self, cache: TransnormerCache) -> None:
        """Make ``cache`` the owner of the static states; a previous owner still alive keeps private copies."""
        owner = self.owner() if self.owner is not None else None
        if owner is not cache:
            if owner is not None:
                self.release(owner)
            self.owner = weakref.ref(cache)

    def release(self, cache: TransnormerCache | None = None) -> None:
        """Give ``cache`` (default: the current owner) copies of any static state it still points at."""
        if cache is None:
            cache = self.owner() if self.owner is not None else None
        if cache is None:
            return
        for i, static in enumerate(self.states):
            if i < len(cache.layers) and cache.get_state(i) is static:
                cache.update_state(static.clone(), i)
        self.owner = None


class GreedyDeviceSteps:
    """Greedy decoding steps of one runner run on the device (:meth:`DecodeGraphs.greedy_steps`, the protocol
    of :class:`tnlora.model.generation.GreedySteps`): each step the runner's forward, then what
    ``overlapped_sample`` does with its logits under a :class:`~tnlora.model.generation.GreedyRule` (the
    minimum-length eos ban, the argmax, eos padding and the finished flags; :mod:`tnlora.ops.token_choice`, two
    Triton kernels with the Triton step), and the chosen tokens written as the next step's ids, the position
    and length one on; with ``capture`` all of it one graph replay. Each step's flags and tokens go to the
    host by one asynchronous copy into pinned memory, read a step behind. The rule's numbers live in buffers,
    so one graph serves every call with the same number of eos ids."""

    def __init__(self, runner: DecodeStepRunner, eos_count: int, defer_steps: int = 0) -> None:
        self.runner = runner
        # The states written back every defer_steps steps (DecodeStepRunner.enable_deferral), made whole by close.
        self.defer_steps = defer_steps if runner.enable_deferral(defer_steps) else 0
        self.held = 0  # steps launched since the states were last whole
        device = runner.ids.device
        batch = runner.batch_size
        with torch.inference_mode(False):
            self.eos = torch.zeros(eos_count, dtype=torch.long, device=device)
            self.pad_id = torch.zeros((), dtype=torch.long, device=device)
            self.ban_below = torch.zeros((), dtype=torch.long, device=device)
            self.length = torch.zeros((), dtype=torch.long, device=device)  # the sequence's, before the step
            self.out = torch.zeros(2, batch, dtype=torch.long, device=device)  # flags and tokens of the step
        self.unfinished = self.out[0]  # updated in place by each step
        self.cuda = device.type == "cuda"
        # Two slots: a step's copy is read before the step after next overwrites its slot.
        self.slots = [torch.empty(2, batch, dtype=torch.long, pin_memory=self.cuda) for _ in range(2)]
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(2)]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.model: weakref.ref[TransnormerForCausalLM] | None = None  # for the steps without a graph
        # Weak: a cache kept alive here would make the next call's runner give it copies of every state.
        self.cache: weakref.ref[TransnormerCache] | None = None
        self.sent = 0
        self.read = 0

    def _step(self, model: TransnormerForCausalLM) -> Tensor:
        """One step on the buffers (what the graph records); returns ``out``."""
        runner = self.runner
        with runner.deferring(self.defer_steps > 0):
            logits = runner._forward(model)[:, -1]
        # The choice's Triton kernels go with the step's (config decode_kernel), its PyTorch ops otherwise.
        choose_greedy(logits, self.eos, self.ban_below, self.length, self.pad_id, self.out, runner.ids,
                      runner.position, kernel=runner.kernel, pdl=runner.pdl)
        return self.out

    def start(
        self,
        model: TransnormerForCausalLM,
        cache: TransnormerCache,
        rule: GreedyRule,
        tokens: Tensor,
        unfinished: Tensor,
        length: int,
    ) -> GreedyDeviceSteps:
        """Set up the steps after ``tokens`` [B] (the last chosen, the sequences ``length`` long with them,
        rows still going in ``unfinished``), ``cache`` on the runner's states; returns them. The first start
        captures the graph (any owner of the states is given copies first: capture scribbles on them)."""
        runner = self.runner
        if runner.capture and self.graph is None:
            runner.release()
            self.graph, _ = runner.record(functools.partial(self._step, model))
        runner.begin(cache, tokens[:, None], None)
        if self.defer_steps:
            runner.base.copy_(runner.position)  # the states are whole at this position
        self.held = 0
        self.eos.copy_(torch.tensor(rule.eos, dtype=torch.long))
        self.pad_id.fill_(rule.pad)
        self.ban_below.fill_(rule.ban_below)
        self.length.fill_(length)
        self.unfinished.copy_(unfinished)
        self.model = None if runner.capture else weakref.ref(model)
        self.cache = weakref.ref(cache)
        self.sent = self.read = 0
        return self

    def step(self) -> None:
        """Launch the next step and queue its flags and tokens to the host."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step(self.model())
        self.cache().advance(1)  # the caller holds the cache while it steps
        if self.defer_steps:
            self.held = (self.held + 1) % self.defer_steps
        slot = self.sent % 2
        self.slots[slot].copy_(self.out, non_blocking=self.cuda)
        if self.cuda:
            self.events[slot].record()
        self.sent += 1

    def close(self) -> None:
        """After the last step: the states whole again (the terms of the steps since the last write-back added,
        queued behind the steps), for the cache the caller keeps."""
        if self.defer_steps and self.held:
            with torch.inference_mode(False), torch.no_grad():
                self.runner.write_back(self.held)
        self.held = 0

    def finish(self, rows: list[int]) -> None:
        """Rows finished for the steps launched after this (padded, as eos leaves them)."""
        ended = set(rows)
        flags = row_flags([row in ended for row in range(self.runner.batch_size)], self.unfinished.device)
        self.unfinished.mul_(~flags)

    def receive(self) -> tuple[list[int], list[int]]:
        """The row flags and tokens of the oldest step not yet read (waiting for that step only)."""
        slot = self.read % 2
        if self.cuda:
            self.events[slot].synchronize()
        self.read += 1
        rows = self.slots[slot].tolist()
        return rows[0], rows[1]


def gemv_applies(model: TransnormerForCausalLM) -> bool:
    """Whether the step's projections can run as fused GEMVs: every one a plain bias-free ``nn.Linear`` of the
    embedding's dtype with contiguous rows (an unmerged peft adapter or a quantized layer keeps the layer
    forwards)."""
    core = model.model
    linears = [model.lm_head]
    for layer in core.layers:
        mixer, glu = layer.token_mixer, layer.channel_mixer
        linears += [mixer.qkvu_proj, mixer.out_proj, glu.l1, glu.l2, glu.l3]
    dtype = core.embed_tokens.weight.dtype
    return all(
        type(m) is nn.Linear and m.bias is None and m.weight.dtype == dtype and m.weight.stride(1) == 1
        for m in linears
    )


def state_layout(mixer: NormLinearAttention, batch_size: int) -> tuple[tuple[int, int, int, int], torch.dtype]:
    """Shape [B, H, K, V] and dtype of one layer's recurrent state: K doubles with LRPE (its cos and sin halves);
    attention._recurrent's compute dtype, fp64 for fp64 weights, else fp32."""
    dtype = torch.float64 if mixer.qkvu_proj.weight.dtype == torch.float64 else torch.float32
    key_dim = 2 * mixer.head_dim if mixer.lrpe is not None else mixer.head_dim
    return (batch_size, mixer.num_heads, key_dim, mixer.head_dim), dtype


def record_graph(step: Callable[[], Tensor], device: torch.device, blas: str | None) -> tuple[torch.CUDAGraph, Tensor]:
    """``step`` (a function of static buffers on ``device``) warmed up on a side stream, then recorded as one
    graph with ``blas`` the preferred BLAS library; returns the graph and what ``step`` returned in it."""
    with torch.cuda.device(device), torch.inference_mode(False), torch.no_grad(), blas_library(blas):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
    return graph, out


@contextlib.contextmanager
def blas_library(name: str | None) -> Iterator[None]:
    """PyTorch's preferred BLAS library set to ``name`` inside (None: unchanged), restored after."""
    if name is None:
        yield
        return
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


class DecodeGraphs:
    """The runners of one model, by batch size, and the model fingerprint they were built against."""

    def __init__(
        self,
        capture: bool,
        blas: str | None = GRAPH_BLAS,
        gemv: bool = True,
        pdl: bool = True,
        prefill: bool | None = None,
        gemv_max_batch: int = GEMV_MAX_BATCH,
        branches: bool = True,
        defer_steps: int = DEFER_STEPS,
        defer_min_batch: int = DEFER_MIN_BATCH,
        rows_min_batch: int = ROWS_MIN_BATCH,
    ) -> None:
        if not 1 <= gemv_max_batch <= ROWS_MAX:
            raise ValueError(f"gemv_max_batch must be 1 to {ROWS_MAX}, got {gemv_max_batch}")
        if not 2 <= rows_min_batch <= ROWS_MAX:
            raise ValueError(f"rows_min_batch must be 2 to {ROWS_MAX}, got {rows_min_batch}")
        self.rows_min_batch = rows_min_batch
        if defer_steps_error(defer_steps):
            raise ValueError(f"defer_steps {defer_steps_error(defer_steps)}")
        self.defer_steps = defer_steps
        self.defer_min_batch = defer_min_batch
        self.capture = capture
        self.blas = blas
        self.gemv = gemv
        self.gemv_max_batch = gemv_max_batch
        self.pdl = pdl
        self.branches = branches
        # Short prefills as graphs (infer.prefill_graph); by default with capture only (on the CPU the static
        # prefill would only change the summation order of the eager one).
        self.prefill_graphs = capture if prefill is None else prefill
        self.runners: dict[int, DecodeStepRunner] = {}
        self.prefills: dict[tuple[int, int], PrefillRunner] = {}
        self.fingerprint: Hashable | None = None
        self.last_cache: weakref.ref[TransnormerCache] | None = None
        self.failed = False

    def clear(self) -> None:
        """Drop every runner (their owners keep copies of their states)."""
        for runner in self.runners.values():
            runner.release()
        self.runners.clear()
        self.prefills.clear()  # their caches hold copies of the states

    def __call__(
        self,
        model: TransnormerForCausalLM,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        cache: object,
        *,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        packed: bool = False,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | Tensor = 0,
    ) -> Tensor | None:
        """Logits [B, 1, vocab] of a one-token cached step through the static runner, or None when the eager
        forward must run (and has not been touched: the cache is unchanged then)."""
        if (
            input_ids is None
            or input_ids.dim() != 2
            or input_ids.shape[1] != 1
            or inputs_embeds is not None
            or labels is not None
            or packed
            or not isinstance(cache, TransnormerCache)
            or not isinstance(logits_to_keep, int)
            or (output_hidden_states if output_hidden_states is not None else model.config.output_hidden_states)
            or model.training
            or torch.is_grad_enabled()
            or self.failed
            or (self.capture and not input_ids.is_cuda)
        ):
            return None
        if attention_mask is not None and (
            attention_mask.dim() != 2 or attention_mask.shape[0] != input_ids.shape[0]
        ):
            return None  # the eager path raises its error for a malformed mask
        runner = self.runner(model, input_ids, cache)
        if runner is None:
            return None
        return self._capturing(runner.graph is None, lambda: runner.step(model, input_ids, attention_mask, cache))

    def _capturing(self, captures: bool, run: Callable[[], T], prefill: bool = False) -> T | None:
        """``run()``, which captures a graph first when ``captures``. A failed capture (e.g. an op that cannot
        be captured) must not break generation: graphs (with ``prefill``: prefill graphs only) are off for this
        model from then on (logged) and None says run eagerly; the cache is untouched (capture comes before any
        copy into or out of it)."""
        if not (self.capture and captures):
            return run()
        try:
            return run()
        except RuntimeError as exc:
            if prefill:
                logger.warning(f"CUDA-graph prefills disabled for this model (capture failed: {exc}); prefilling eagerly")
                self.prefill_graphs = False
                self.prefills.clear()
            else:
                logger.warning(f"CUDA-graph decoding disabled for this model (capture failed: {exc}); decoding eagerly")
                self.failed = True
                self.clear()
            return None

    def greedy_steps(
        self,
        model: TransnormerForCausalLM,
        cache: object,
        rule: GreedyRule,
        tokens: Tensor,
        unfinished: Tensor,
        length: int,
    ) -> GreedyDeviceSteps | None:
        """Greedy steps on the device after ``tokens`` [B] (``overlapped_sample``'s device loop; see
        :class:`GreedyDeviceSteps`), or None where the eager steps must run."""
        if (
            not isinstance(cache, TransnormerCache)
            or model.training
            or torch.is_grad_enabled()
            or self.failed
            or (self.capture and not tokens.is_cuda)
        ):
            return None
        runner = self.runner(model, tokens[:, None], cache)
        if runner is None:
            return None
        steps = runner.greedy.get(len(rule.eos))
        if steps is None:
            defer = defer_steps_for(runner.batch_size, self.defer_steps, self.defer_min_batch)
            steps = runner.greedy[len(rule.eos)] = GreedyDeviceSteps(runner, len(rule.eos), defer)
        return self._capturing(steps.graph is None, lambda: steps.start(model, cache, rule, tokens, unfinished, length))

    def prefill(
        self,
        model: TransnormerForCausalLM,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        cache: object,
        *,
        use_cache: bool | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        packed: bool = False,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | Tensor = 0,
    ) -> tuple[Tensor, TransnormerCache] | None:
        """Logits [B, 1, vocab] of the prompt's last token and the filled cache, through a prefill graph
        (:mod:`tnlora.infer.prefill_graph`), or None when the eager forward must run (nothing touched then)."""
        if (
            not self.prefill_graphs
            or input_ids is None
            or input_ids.dim() != 2
            or input_ids.shape[1] < 2
            or inputs_embeds is not None
            or labels is not None
            or packed
            or not (isinstance(logits_to_keep, int) and logits_to_keep == 1)
            or (output_hidden_states if output_hidden_states is not None else model.config.output_hidden_states)
            or model.training
            or torch.is_grad_enabled()
            or self.failed
            or (self.capture and not input_ids.is_cuda)
            or (attention_mask is not None and attention_mask.shape != input_ids.shape)
            or (isinstance(cache, Cache) and cache.get_seq_length() > 0)
            or (isinstance(cache, TransnormerCache) and cache.get_state(0) is not None)
        ):
            return None
        batch, length = input_ids.shape
        # Decided before a cache is made and the model fingerprinted: where eager runs, its forward makes its
        # own cache, and that cache's first step would fingerprint the model again.
        bucket = bucket_for(batch, length, sum(p.numel() for p in model.parameters()))
        mixers = [layer.token_mixer for layer in model.model.layers]
        if bucket is None or (self.capture and any(m.attention_impl(bucket) != "triton" for m in mixers)):
            return None
        fresh = model.model._resolve_cache(cache, use_cache)
        if fresh is None or not self._current(model, fresh):
            return None
        runner = self.prefills.pop((batch, bucket), None)
        if runner is None or not runner.fits(input_ids):
            if len(self.prefills) >= PREFILL_RUNNERS:
                self.prefills.pop(next(iter(self.prefills)))
            runner = PrefillRunner(model, batch, bucket, input_ids.device, self.capture)
        self.prefills[(batch, bucket)] = runner  # last: the most recently used
        logits = self._capturing(
            runner.graph is None, lambda: runner.run(model, input_ids, attention_mask, fresh), prefill=True
        )
        return None if logits is None else (logits, fresh)

    def _current(self, model: TransnormerForCausalLM, cache: TransnormerCache) -> bool:
        """Whether graphs may run for ``cache``: a new cache means a new generate() call, which re-checks what
        the graphs depend on (once per call) and drops them all if it changed."""
        last = self.last_cache() if self.last_cache is not None else None
        if last is not cache:
            fingerprint = model_fingerprint(model)
            if fingerprint != self.fingerprint:
                self.clear()
                self.fingerprint = fingerprint
            self.last_cache = weakref.ref(cache)
        return self.fingerprint is not None

    def fused(self, batch: int) -> bool:
        """Whether a step of ``batch`` rows runs as fused projections (with the Triton kernel, where they apply):
        one row, or ``rows_min_batch`` to ``gemv_max_batch`` rows."""
        return fused_batch(batch, self.rows_min_batch, self.gemv_max_batch)

    def runner(self, model: TransnormerForCausalLM, input_ids: Tensor, cache: TransnormerCache) -> DecodeStepRunner | None:
        """The runner for this step, built (and later captured) on first use; None when eager must run."""
        if not self._current(model, cache):
            return None
        batch = input_ids.shape[0]
        runner = self.runners.get(batch)
        if runner is None:
            if len(self.runners) >= MAX_RUNNERS:
                self.runners.pop(next(iter(self.runners))).release()
            runner = DecodeStepRunner(model, batch, input_ids.device, self.capture, self.blas,
                                      gemv=self.gemv and self.fused(batch), pdl=self.pdl, branches=self.branches)
            self.runners[batch] = runner
        return runner if runner.fits(input_ids, cache) else None


def fused_batch(batch: int, rows_min_batch: int = ROWS_MIN_BATCH, gemv_max_batch: int = GEMV_MAX_BATCH) -> bool:
    """Whether a step of ``batch`` rows runs as fused projections by default: one row, or ``rows_min_batch`` to
    ``gemv_max_batch`` rows (``GEMV_MAX_BATCH``; ``tnlora serve`` takes its slot count through it)."""
    return batch == 1 or rows_min_batch <= batch <= gemv_max_batch


def defer_steps_for(batch: int, steps: int = DEFER_STEPS, min_batch: int = DEFER_MIN_BATCH) -> int:
    """The steps between state write-backs for ``batch`` rows: ``steps`` from ``min_batch`` rows, else 0 (every
    step: below it the held steps' work costs more than the writes save; ``DEFER_MIN_BATCH``)."""
    return steps if batch >= min_batch else 0


def defer_steps_error(steps: int) -> str | None:
    """What is wrong with ``steps`` as a ``defer_steps`` (None: nothing): 0 writes every step, 1 would be the same
    and is refused, and fewer than 0 has no meaning."""
    return None if steps == 0 or steps >= 2 else f"must be 0 (every step) or at least 2, got {steps}"


def decode_kernel(model: nn.Module, device: torch.device | str) -> str:
    """``config.decode_kernel`` of ``model`` for a step on ``device`` ("torch" or "triton"), checked (it may have
    been set after the config was built)."""
    return kernel_impl(getattr(model.config, "decode_kernel", "auto"), device, "decode_kernel")


def model_fingerprint(model: nn.Module) -> Hashable | None:
    """What a captured graph depends on beyond tensor values: the module tree, every parameter and buffer's
    address, shape, dtype and device, peft's adapter switches and the decode kernel. None when the model
    spans several devices."""
    items: list[Hashable] = [("decode_kernel", getattr(model.config, "decode_kernel", "auto"))]
    devices = set()
    # One walk over the modules, each one's own tensors read where it is visited (parameters() and buffers()
    # would walk the tree twice more): it runs at every generate() call.
    for name, module in model.named_modules():
        items.append((name, type(module)))
        if type(module).__module__.startswith("peft."):
            items.append(tuple(repr(getattr(module, attr, None)) for attr in _ADAPTER_SWITCHES))
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None:
                devices.add(tensor.device)
                items.append((tensor.data_ptr(), tensor.shape, tensor.dtype))
    return (*items, *devices) if len(devices) == 1 else None


def _base_model(model: nn.Module) -> TransnormerForCausalLM:
    """The TransnormerForCausalLM under a peft wrapper (the module whose forward offers the steps)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(base, TransnormerForCausalLM):
        raise TypeError(f"graph decoding needs a TransnormerForCausalLM, got {type(base).__name__}")
    return base


def install_graph_decoding(
    model: nn.Module,
    capture: bool = True,
    blas: str | None = GRAPH_BLAS,
    gemv: bool = True,
    pdl: bool = True,
    prefill: bool | None = None,
    gemv_max_batch: int = GEMV_MAX_BATCH,
    branches: bool = True,
    defer_steps: int = DEFER_STEPS,
    defer_min_batch: int = DEFER_MIN_BATCH,
    rows_min_batch: int = ROWS_MIN_BATCH,
) -> DecodeGraphs:
    """Let ``model`` (or the model under its peft wrapper) take one-token cached steps through static runners,
    replacing any installed before. ``capture=False`` runs the static step without CUDA graphs, on any device
    (what the CPU tests check the buffer logic with); ``blas``: the BLAS library of the capture (None:
    PyTorch's current one); ``gemv``: steps of the Triton kernel at batch 1 and at ``rows_min_batch`` to
    ``gemv_max_batch`` rows as fused projections (``DecodeStepRunner._forward_gemv``; False: the layer forwards
    at every batch size); ``pdl``: that step's kernels as programmatic dependent launches on cards that have
    them (sm_90 and later); ``prefill``: short prefills as graphs too (:mod:`tnlora.infer.prefill_graph`;
    default: with ``capture``); ``branches``: the GLU's two projections side by side in the captured layer forwards
    (``DecodeStepRunner._channel_mix``); ``defer_steps``: the device greedy loop's Triton steps write the
    recurrent states back every that many steps only (0: every step; ``GreedyDeviceSteps``), at batches from
    ``defer_min_batch``."""
    base = _base_model(model)
    remove_graph_decoding(base)
    graphs = DecodeGraphs(capture=capture, blas=blas, gemv=gemv, pdl=pdl, prefill=prefill,
                          gemv_max_batch=gemv_max_batch, branches=branches, defer_steps=defer_steps,
                          defer_min_batch=defer_min_batch, rows_min_batch=rows_min_batch)
    base.step_decoder = graphs
    return graphs


@contextlib.contextmanager
def graph_decoding(model: nn.Module, capture: bool = True, **options: Any) -> Iterator[DecodeGraphs | None]:
    """Runners of :func:`install_graph_decoding` (``options``) on ``model`` for the duration, removed after (their
    graphs and buffers freed, the model's forward as before): for a caller that generates now and then beside
    other work, as training's sample replies do. Yields None and changes nothing where runners are installed
    already, or, with ``capture``, unless every parameter is a plain one on a single CUDA device (sharded or
    quantized parameters, e.g. FSDP's or bitsandbytes', keep the eager steps)."""
    base = _base_model(model)
    params = list(base.parameters())
    plain = all(type(p) is nn.Parameter for p in params) and len({p.device for p in params}) == 1
    if installed_graphs(base) is not None or (capture and not (plain and params[0].is_cuda)):
        yield None
        return
    graphs = install_graph_decoding(base, capture=capture, **options)
    try:
        yield graphs
    finally:
        remove_graph_decoding(base)


def remove_graph_decoding(model: nn.Module) -> None:
    """Back to eager decoding; any cache still on a runner's states gets private copies."""
    base = _base_model(model)
    if isinstance(base.step_decoder, DecodeGraphs):
        base.step_decoder.clear()
    base.step_decoder = None


def installed_graphs(model: nn.Module) -> DecodeGraphs | None:
    """The runners installed on ``model`` (None when it decodes eagerly)."""
    decoder = _base_model(model).step_decoder
    return decoder if isinstance(decoder, DecodeGraphs) else None


__all__ = [
    "DecodeGraphs",
    "DecodeStepRunner",
    "GreedyDeviceSteps",
    "blas_library",
    "decode_kernel",
    "defer_steps_error",
    "defer_steps_for",
    "fused_batch",
    "gemv_applies",
    "graph_decoding",
    "install_graph_decoding",
    "installed_graphs",
    "model_fingerprint",
    "record_graph",
    "remove_graph_decoding",
]
