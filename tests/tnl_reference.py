"""Small float64 references written straight from the spec (shared/design/transnormer.md §4), independent of
the library code: the O(n²) masked attention and a whole-model forward from a state dict."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def example_starts(seq_ids: Tensor) -> Tensor:
    """Start position of each token's example, [B, T], by a plain Python scan."""
    starts = torch.zeros_like(seq_ids)
    for b in range(seq_ids.shape[0]):
        begin = 0
        for t in range(seq_ids.shape[1]):
            if t > 0 and seq_ids[b, t] != seq_ids[b, t - 1]:
                begin = t
            starts[b, t] = begin
    return starts


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    seq_ids: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> Tensor:
    """O = [(QKᵀ) ⊙ M] V with M_ts = λ^{t−s} for s ≤ t in the same example (float64, [B,T,H,*] layout).

    ``initial_state`` [B,H,K,V] is the state before position 0; it reaches the row's first example only.
    """
    q, k, v = q.double(), k.double(), v.double()
    g = log_decay.double()
    B, T = q.shape[:2]
    t = torch.arange(T)
    dist = (t[:, None] - t[None, :]).double()
    mask = torch.where(dist >= 0, torch.exp(g[:, None, None] * dist.clamp(min=0)), 0.0)  # [H,T,T]
    mask = mask.expand(B, -1, -1, -1)
    starts = torch.zeros(B, T, dtype=torch.long) if seq_ids is None else example_starts(seq_ids)
    mask = mask * (t[None, None, None, :] >= starts[:, None, :, None])
    out = torch.einsum("bhts,bthk,bshk,bshv->bthv", mask, q, k, v)
    if initial_state is not None:
        weight = torch.exp(g[None, None, :] * (t + 1).double()[None, :, None]) * (starts == 0)[..., None]
        out = out + torch.einsum("bthk,bhkv->bthv", q, initial_state.double()) * weight[..., None]
    return out


def reference_slopes(heads: int) -> list[float]:
    """ALiBi slopes as spec §4.4 states them."""
    if math.log2(heads).is_integer():
        return [2.0 ** (-8.0 * (j + 1) / heads) for j in range(heads)]
    lower = 2 ** math.floor(math.log2(heads))
    return reference_slopes(lower) + reference_slopes(2 * lower)[0::2][: heads - lower]


def reference_log_decay(heads: int, layer: int, layers: int) -> Tensor:
    """−s_j·(1 − l/(L−1) + 1e-5) with fp32 slopes and fp32 product (spec: slopes are fp32)."""
    factor = 1 - layer / (layers - 1) + 1e-5
    return -(torch.tensor(reference_slopes(heads), dtype=torch.float32) * factor)


def _srms(x: Tensor) -> Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def reference_logits(
    state: dict[str, Tensor],
    config: object,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    seq_ids: Tensor | None = None,
) -> Tensor:
    """Whole-model float64 forward from an official-layout state dict (SiLU activation, fp-exact angles)."""
    w = {name: value.double() for name, value in state.items()}
    d, heads, layers = config.decoder_embed_dim, config.decoder_attention_heads, config.decoder_layers
    hd = config.hidden_dim // heads
    B, T = input_ids.shape
    scale = 1.0 if config.no_scale_embedding else math.sqrt(d)
    x = w["model.embed_tokens.weight"][input_ids] * scale
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        z = _srms(x)
        q, k, v, u = (z @ w[prefix + "token_mixer.qkvu_proj.weight"].T).chunk(4, dim=-1)
        q = torch.nn.functional.silu(q).reshape(B, T, heads, hd)
        k = torch.nn.functional.silu(k).reshape(B, T, heads, hd)
        v = v.reshape(B, T, heads, hd)
        theta = w.get(prefix + "token_mixer.lrpe.theta")
        if theta is not None:
            angles = theta[:, 0, :][None] * torch.arange(T).double()[:, None, None]  # [T,H,hd]
            q = torch.cat([q * angles.cos(), q * angles.sin()], dim=-1)
            k = torch.cat([k * angles.cos(), k * angles.sin()], dim=-1)
        if attention_mask is not None:
            v = v * attention_mask.double()[:, :, None, None]
        o = reference_attention(q, k, v, reference_log_decay(heads, layer, layers), seq_ids)
        o = _srms(o.reshape(B, T, -1)) * u
        x = x + o @ w[prefix + "token_mixer.out_proj.weight"].T
        z = _srms(x)
        glu = (z @ w[prefix + "channel_mixer.l1.weight"].T) * (z @ w[prefix + "channel_mixer.l2.weight"].T)
        x = x + glu @ w[prefix + "channel_mixer.l3.weight"].T
    return _srms(x) @ w["model.embed_tokens.weight"].T
