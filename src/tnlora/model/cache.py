"""The recurrent-state cache (spec §5): one fp32 state [B, H, K, V] per layer and the number of tokens seen.

The state has a constant size whatever the context length. LRPE positions come from ``get_seq_length()``
(prefill at 0…n−1, decode at n, n+1, …), never from module state, which avoids the official offset bug.
Beam search reorders the states through transformers' ``Cache.reorder_cache`` hook.
"""

from __future__ import annotations

from torch import Tensor
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin


class RecurrentStateLayer(LinearAttentionCacheLayerMixin):
    """One layer's linear-attention state, kept in ``recurrent_states[0]`` (transformers' layout)."""

    # States are replaced, not updated in place, so the cache has no static addresses; this also keeps
    # generate() from turning the 2-D attention mask into a 4-D one meant for compiled attention.
    is_compileable = False
    # No earlier state is kept, so a crop cannot take tokens back (transformers' mixin says True from 5.25 on,
    # for layers that record their past: assisted generation would then try to roll this one back).
    is_croppable = False

    def lazy_initialization(
        self, conv_states: Tensor | None = None, recurrent_states: Tensor | None = None, state_idx: int = 0
    ) -> None:
        if recurrent_states is not None:
            self.dtype, self.device = recurrent_states.dtype, recurrent_states.device
            self.is_recurrent_states_initialized[state_idx] = True

    def update_conv_state(self, conv_states: Tensor, state_idx: int = 0, **kwargs: object) -> Tensor:
        raise NotImplementedError("TransNormerLLM layers have no convolution state")

    def update_recurrent_state(
        self, recurrent_states: Tensor, state_idx: int = 0, **kwargs: object
    ) -> Tensor:
        """Store the state after the latest tokens (replaces the previous one)."""
        if not self.is_recurrent_states_initialized[state_idx]:
            self.lazy_initialization(recurrent_states=recurrent_states, state_idx=state_idx)
        self.recurrent_states[state_idx] = recurrent_states
        self.has_previous_state[state_idx] = True
        return recurrent_states

    def reset(self) -> None:
        # Drop the state instead of zeroing it in place: the tensor may still be referenced elsewhere.
        self.recurrent_states[0] = None
        self.is_recurrent_states_initialized[0] = self.has_previous_state[0] = False

    @property
    def state(self) -> Tensor | None:
        return self.recurrent_states[0] if self.has_previous_state[0] else None

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_recurrent_states_initialized[0]:
            self.recurrent_states[0] = self.recurrent_states[0].repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_recurrent_states_initialized[0]:
            self.recurrent_states[0] = self.recurrent_states[0][indices]


class TransnormerCache(Cache):
    """Recurrent-state cache for :class:`TransnormerForCausalLM` (one state per layer + tokens seen)."""

    def __init__(self, config: PreTrainedConfig | None = None, num_layers: int | None = None) -> None:
        if num_layers is None:
            if config is None:
                raise ValueError("TransnormerCache needs a config or num_layers")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[RecurrentStateLayer() for _ in range(num_layers)])
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens already folded into the states (the position of the next token)."""
        return self.seen_tokens

    def get_state(self, layer_idx: int) -> Tensor | None:
        """The state of layer ``layer_idx`` [B, H, K, V], or None before the first forward."""
        return self.layers[layer_idx].state

    def update_state(self, state: Tensor, layer_idx: int) -> None:
        """Replace the state of layer ``layer_idx`` (called once per layer and forward)."""
        self.layers[layer_idx].update_recurrent_state(state)

    def advance(self, num_tokens: int) -> None:
        """Count ``num_tokens`` more tokens as seen; the model calls this after all layers ran."""
        self.seen_tokens += num_tokens

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    @property
    def batch_size(self) -> int:
        states = [layer.state for layer in self.layers if layer.state is not None]
        return states[0].shape[0] if states else -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        # No attention mask over past tokens exists; report the logical length for generic callers.
        return self.seen_tokens + query_length, 0

    def __repr__(self) -> str:
        return f"TransnormerCache(layers={len(self.layers)}, seen_tokens={self.seen_tokens})"


__all__ = ["RecurrentStateLayer", "TransnormerCache"]
