"""Several prompts read in one forward: packed end to end into one row, each from its own state and at its own
positions.

A server that admits several requests at once would otherwise read their prompts one forward each, and a
forward of a few dozen tokens costs about what one of thousands does (the weights are read either way). Packed,
the prompts share every projection; the lightning attention keeps them apart at the example boundaries
(``cu_seqlens``: no state or decay crosses them) and starts each from its own state (zero, or a conversation's
stored one); LRPE gives each token the position it has in its own prompt (per-token positions), so a prompt's
arithmetic is the one it would get alone but for the matrix products' summation order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tnlora.model.modeling import TransnormerForCausalLM
from tnlora.ops.fla import tag_host_copy
from tnlora.ops.lightning import lightning_attention


@dataclass
class Prefilled:
    """What a packed prefill leaves: the logits of each prompt's last token [N, vocab] and each layer's state
    after each prompt [N, H, K, V] (fp32, fp64 for fp64 weights)."""

    logits: Tensor
    states: list[Tensor]


def can_pack(model: TransnormerForCausalLM) -> bool:
    """Whether ``model`` can read packed prompts: per-token positions exist for fp32 LRPE angles only (the
    official bf16 rounding of positions depends on how a prompt is split)."""
    return model.config.lrpe_angle_dtype == "float32"


@torch.no_grad()
def packed_prefill(
    model: TransnormerForCausalLM,
    prompts: Sequence[Sequence[int]],
    starts: Sequence[int] | None = None,
    states: Sequence[Sequence[Tensor] | None] | None = None,
) -> Prefilled:
    """Read ``prompts`` (token ids, each non-empty) in one forward.

    Args:
        model: the causal LM (its layers are called as its own forward calls them).
        prompts: N prompts (the new tokens of each request).
        starts: the position of each prompt's first token (the tokens its state already covers; default 0).
        states: per prompt, None (start from zero) or its layers' states [H, K, V] before it.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("packed_prefill needs at least one prompt, and no empty one")
    count = len(prompts)
    starts = list(starts) if starts is not None else [0] * count
    states = list(states) if states is not None else [None] * count
    if len(starts) != count or len(states) != count:
        raise ValueError("starts and states need one entry per prompt")
    core = model.model
    device = core.embed_tokens.weight.device
    lengths = torch.tensor([len(p) for p in prompts])
    cu_host = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    # Built on the host and copied once: nothing below reads the device back (fla plans from the tagged copy).
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long)[None].to(device, non_blocking=True)
    positions = torch.cat([torch.arange(s, s + len(p)) for s, p in zip(starts, prompts)])[None]
    positions = positions.to(device, non_blocking=True)
    if device.type == "cuda":
        # A plain tensor even under inference_mode (a server's): the tag is checked against its version.
        with torch.inference_mode(False):
            cu_seqlens = cu_host.to(device, non_blocking=True)
        tag_host_copy(cu_seqlens, cu_host)
    else:
        cu_seqlens = cu_host
    last = (cu_host[1:] - 1).to(device=device, dtype=torch.long, non_blocking=True)

    finals: list[Tensor] = []
    initial = (lambda i: _initial_states(states, i)) if any(s is not None for s in states) else None
    hidden = packed_layers(model, ids, cu_seqlens, positions, initial=initial,
                           take_states=lambda i, final: finals.append(final))  # fmt: skip
    logits = model.lm_head(core.final_norm(hidden[0, last]))
    return Prefilled(logits, finals)


def packed_layers(
    model: TransnormerForCausalLM,
    ids: Tensor,
    cu_seqlens: Tensor,
    positions: Tensor | int,
    mask: Tensor | None = None,
    initial: Callable[[int], Tensor] | None = None,
    take_states: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """The hidden states [B, L, dim] after the embedding and every decoder layer for ``ids`` [B, L], whose
    tokens the attention runs laid end to end as the examples of ``cu_seqlens`` (of the B·L tokens).

    ``positions``: LRPE positions (per token [B, L], or the offset of every row's first column); ``mask``: the
    projection's value mask; ``initial(layer)``: the states [N, H, K, V] before the examples (default zeros);
    ``take_states(layer, final)``: given each layer's states after each example [N, H, K, V] as soon as the
    layer has run (so that a caller keeping only some holds one layer's at a time).
    """
    core = model.model
    batch, length = ids.shape
    hidden = core.embed_tokens(ids)
    if model.config.embed_scale != 1.0:
        hidden = hidden * model.config.embed_scale
    for i, layer in enumerate(core.layers):
        mixer = layer.token_mixer
        q, k, v, u = mixer.project(layer.token_norm(hidden), mask, positions)
        o, final = lightning_attention(
            *(x.reshape(1, batch * length, *x.shape[2:]) for x in (q, k, v)), mixer.log_decay,
            cu_seqlens=cu_seqlens, initial_state=initial(i) if initial is not None else None,
            output_final_state=True, impl=mixer.attention_impl(length, packed=True), chunk_size=mixer.chunk_size,
        )  # fmt: skip
        if take_states is not None:
            take_states(i, final)
        hidden = hidden + mixer.output(o.reshape(batch, length, *o.shape[2:]), u)
        hidden = hidden + layer.channel_mixer(layer.channel_norm(hidden))
    return hidden


def _initial_states(states: Sequence[Sequence[Tensor] | None], layer: int) -> Tensor:
    """Layer ``layer``'s states before each prompt, [N, H, K, V]: the given ones, zeros for the rest."""
    given = next(s for s in states if s is not None)[layer]
    zeros = torch.zeros_like(given)
    return torch.stack([s[layer].to(given.device, given.dtype) if s is not None else zeros for s in states])


__all__ = ["Prefilled", "can_pack", "packed_layers", "packed_prefill"]
