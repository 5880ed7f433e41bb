"""CUDA graphs of short prefills: a prompt's forward captured once per batch size and length bucket, then replayed.

A prefill of a few dozen tokens is launch-bound: at batch 1 the host takes ~14 ms (7B) and ~8 ms (1B) to launch
what the GPU runs in 5.5 and 1.6 ms (benchmarks/RESULTS.md, "Prefill"). A :class:`PrefillRunner` holds static
buffers for B rows of a bucket of L tokens (the prompt length rounded up to one of :data:`BUCKETS`) and a graph
of embedding → layers → final norm → LM head at each row's last prompt token.

A prompt of T tokens fills the first T columns; the columns after it are padding that no prompt token reads:
every per-token operation keeps tokens apart, and the attention runs each row's first T tokens as one example
and the padding as another (``cu_seqlens`` built on the device from T, which a device tensor holds), so each
layer's state leaves after the T-th token, and the logits are taken at T − 1. LRPE positions are the columns'
(0 … T − 1 for the prompt, as in the eager forward). The arithmetic is the eager prefill's but for the matrix
products' row count (B·L rather than B·T), with which cuBLAS may pick other kernels: equal up to rounding.

:class:`~tnlora.infer.decode_graph.DecodeGraphs` offers it for forwards that start a fresh cache, without
gradients, in eval mode, from ids, asking for the last token's logits only (``generate()``'s prefill), where the
forward-only attention takes device-side boundaries (the Triton kernel; fla plans its chunks on the host), and
only while the prompt is short enough for its launches to matter (:func:`bucket_for`, :data:`MAX_WORK`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tnlora.infer.prefill import packed_layers
from tnlora.model.cache import TransnormerCache
from tnlora.model.modeling import TransnormerForCausalLM

# Prompt lengths a graph is captured for (a prompt takes the first that holds it): powers of two while a few
# padded tokens cost nothing (launch-bound), then steps of 128 so that padding adds at most a third.
BUCKETS = (16, 32, 64, 128, 256, 384, 512)
# Tokens × parameters (≈ half the prefill's FLOPs) above which its matrix products, not its launches, set its
# time: eager there. Measured on the H200: 1B, 32 × 64 tokens (2,048 · 1.0e9 ≈ 2.1e12) ran 9.8 ms as a graph
# against 16.3 eager; 7B, 32 × 64 (1.4e13) 52.2 against 48.0 (the GPU's 44 ms either way; captured GEMMs were
# slower); 7B, 1 × 64 (4.4e11) 8.8 against 21.8.
MAX_WORK = 4e12
# Prefill graphs kept per model (by batch size and bucket); the least recently used goes first.
MAX_RUNNERS = 8


def bucket_for(batch: int, length: int, parameters: int) -> int | None:
    """The bucket a prompt of ``length`` tokens in ``batch`` rows runs in on a model of ``parameters``, or None
    (eager)."""
    bucket = next((b for b in BUCKETS if b >= length), None)
    return bucket if bucket is not None and batch * bucket * parameters <= MAX_WORK else None


class PrefillRunner:
    """Static buffers, and with ``capture`` a CUDA graph, of the prefill of B rows of up to ``bucket`` tokens."""

    def __init__(self, model: TransnormerForCausalLM, batch: int, bucket: int, device: torch.device, capture: bool) -> None:
        from tnlora.infer.decode_graph import state_layout

        self.capture = capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        layouts = [state_layout(layer.token_mixer, batch) for layer in model.model.layers]
        # Plain tensors even under an outer inference_mode: later no_grad calls write into them in place.
        with torch.inference_mode(False):
            self.ids = torch.zeros(batch, bucket, dtype=torch.long, device=device)
            self.mask = torch.ones(batch, bucket, dtype=torch.bool, device=device)
            self.length = torch.tensor(bucket, dtype=torch.long, device=device)
            # Every layer's state in one buffer (one copy hands them all to a cache); K differs with LRPE.
            sizes = [torch.Size(shape).numel() for shape, _ in layouts]
            self.flat = torch.zeros(sum(sizes), dtype=layouts[0][1], device=device)
            self.states = [part.view(shape) for part, (shape, _) in zip(self.flat.split(sizes), layouts)]

    def fits(self, input_ids: Tensor) -> bool:
        return input_ids.device == self.ids.device and input_ids.shape[0] == self.ids.shape[0]

    def _forward(self, model: TransnormerForCausalLM) -> Tensor:
        """Logits [B, 1, vocab] at each row's token ``length − 1``; every layer's state written to ``states``."""
        batch, bucket = self.ids.shape
        # Row r's prompt is example 2r (tokens rL … rL + T − 1), its padding example 2r + 1.
        starts = torch.arange(batch, device=self.ids.device) * bucket
        cu_seqlens = torch.stack([starts, starts + self.length], dim=1).reshape(-1)
        cu_seqlens = torch.cat([cu_seqlens, cu_seqlens.new_full((1,), batch * bucket)]).to(torch.int32)
        hidden = packed_layers(model, self.ids, cu_seqlens, 0, mask=self.mask,
                               take_states=lambda i, final: self.states[i].copy_(final[0::2]))  # fmt: skip
        last = hidden.gather(1, (self.length - 1).view(1, 1, 1).expand(batch, 1, hidden.shape[-1]))
        return model.lm_head(model.model.final_norm(last))

    def run(
        self, model: TransnormerForCausalLM, input_ids: Tensor, attention_mask: Tensor | None, cache: TransnormerCache
    ) -> Tensor:
        """Logits [B, 1, vocab] of the last token of ``input_ids`` [B, T]; ``cache`` (fresh) gets the states."""
        if self.capture and self.graph is None:
            from tnlora.infer.decode_graph import record_graph

            self.graph, self.logits = record_graph(lambda: self._forward(model), self.ids.device, blas=None)
        length = input_ids.shape[1]
        self.ids[:, :length].copy_(input_ids)
        if attention_mask is None:
            self.mask[:, :length].fill_(True)
        else:
            self.mask[:, :length].copy_(attention_mask)
        self.length.fill_(length)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits.clone()  # the static buffers are overwritten by the next replay
        else:
            logits = self._forward(model)
        flat = self.flat.clone()
        for i, (state, static) in enumerate(zip(flat.split([s.numel() for s in self.states]), self.states)):
            cache.update_state(state.view(static.shape), i)
        cache.advance(length)
        return logits


__all__ = ["BUCKETS", "MAX_RUNNERS", "MAX_WORK", "PrefillRunner", "bucket_for"]
