"""TransnormerConfig (spec §2) and the size presets.

The config accepts every field of the official ``config.json`` files unchanged (``auto_map``, ``torch_dtype``,
``model_max_length`` and ``architectures`` included); unknown keys are kept as plain attributes, as transformers
does for every config. Fields after ``bias`` are tnlora additions with defaults that reproduce the fp32 math.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, ClassVar

from transformers import PreTrainedConfig

from tnlora.choices import KERNEL_CHOICES, LIGHTNING_IMPLS
from tnlora.errors import ConfigError

LRPE_ANGLE_DTYPES = ("float32", "model")


class TransnormerConfig(PreTrainedConfig):
    """Configuration of TransNormerLLM (TNL1): field names and defaults of the official remote code."""

    model_type = "transnormer"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    # transformers' generic code (DynamicCache, DeepSpeed auto values, ...) reads the standard names.
    attribute_map: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "decoder_layers",
        "hidden_size": "decoder_embed_dim",
        "num_attention_heads": "decoder_attention_heads",
    }

    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    vocab_size: int = 64000
    use_cache: bool = True
    init_std: float = 0.02
    decoder_embed_dim: int = 1024
    decoder_layers: int = 24
    decoder_attention_heads: int = 8
    no_scale_embedding: bool = False
    add_bos_token: bool = False
    norm_type: str = "simplermsnorm"
    linear_use_lrpe_list: list[int] = field(default_factory=list)
    hidden_dim: int = 1024
    linear_act_fun: str = "silu"
    glu_dim: int = 2816
    bias: bool = False
    tie_word_embeddings: bool = True
    # tnlora additions.
    # "float32": LRPE angles θ·p in fp32 or wider (the fp32 math); "model": the official rounding of p and θ·p in the
    # model dtype (bf16 checkpoints were run this way by the official code, spec §10).
    lrpe_angle_dtype: str = "float32"
    # The implementations of the operations (tnlora.ops.select resolves "auto" for the model's device when the
    # model is built or moved). Lightning attention: one of tnlora.choices.LIGHTNING_IMPLS; "auto" as
    # tnlora.ops.select resolves it (on CUDA the Triton scans or fla, else chunked; recurrent for one-token steps).
    lightning_impl: str = "auto"
    # Chunk length of the pure-PyTorch chunked attention.
    lightning_chunk_size: int = 64
    # Tokens per chunk of the loss: fp32 logits of at most this many tokens exist at a time.
    loss_chunk_size: int = 1024
    # The recurrence of static (CUDA-graph) decode steps and their fused norms: "torch" (in-place PyTorch ops,
    # bitwise the eager step), "triton" (one fused kernel per layer that reads and writes each fp32 state once;
    # equal up to rounding) or "auto": triton on CUDA when it imports.
    decode_kernel: str = "auto"
    # SimpleRMSNorm on CUDA outside torch.compile: "triton" (one fused kernel; with grad a forward and a
    # backward kernel saving x and 1/rms instead of an fp32 copy of x; equal up to rounding), "torch" or
    # "auto": triton on CUDA when it imports. Compiled layers keep the PyTorch form, which Inductor fuses.
    norm_kernel: str = "auto"
    # The chunked training loss's per-chunk cross-entropy and logit gradient: "torch" (PyTorch ops over an fp32
    # copy of the chunk's logits), "triton" (one kernel per chunk that writes the gradient over the logits; equal
    # up to the order of the sums; CUDA or Triton's interpreter) or "auto": triton on CUDA when it imports
    # (compiled code keeps PyTorch's ops, which the compiler sees).
    loss_kernel: str = "auto"
    # The token mixer's activation of its projection (q, k through SiLU, v's pad mask, u) with grad: "torch"
    # (PyTorch's ops; autograd concatenates the four gradients) or "triton" (PyTorch's forward and a backward
    # kernel that writes each part's gradient in place; equal up to rounding). "auto" (the default): triton on
    # CUDA when it imports (benchmarks/RESULTS.md: faster in 1B's and 7B's default training steps).
    act_kernel: str = "auto"
    # With labels and the chunked loss, the last decoder layer computes what follows its attention (the output's
    # gated norm and projection, the GLU, the final norm) at the labelled positions only: the loss reads no
    # others. The same loss and gradients up to rounding. On by default: with its row counts padded
    # (modeling.TRIM_ROW_STEP) it made the huanhuan-shaped training step 2.4 % (1B) and 1.6 % (7B) faster on an H100
    # (benchmarks/RESULTS.md; unpadded it had lost 0.6 %). Where more than modeling.TRIM_MAX_LABELLED_SHARE of a
    # batch is labelled, every position either way.
    trim_last_layer: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        if self.decoder_layers < 1 or self.decoder_attention_heads < 1:
            raise ConfigError("decoder_layers and decoder_attention_heads must be at least 1")
        if self.hidden_dim % self.decoder_attention_heads:
            raise ConfigError(
                f"hidden_dim ({self.hidden_dim}) must be a multiple of decoder_attention_heads "
                f"({self.decoder_attention_heads})"
            )
        if self.linear_use_lrpe_list and len(self.linear_use_lrpe_list) != self.decoder_layers:
            raise ConfigError(
                f"linear_use_lrpe_list has {len(self.linear_use_lrpe_list)} entries, expected one per layer "
                f"({self.decoder_layers})"
            )
        if self.norm_type != "simplermsnorm":
            # Other norms would carry weights that no released checkpoint has.
            raise ConfigError(f"norm_type {self.norm_type!r} is not supported (only 'simplermsnorm')")
        if self.lrpe_angle_dtype not in LRPE_ANGLE_DTYPES:
            raise ConfigError(
                f"lrpe_angle_dtype must be one of {LRPE_ANGLE_DTYPES}, got {self.lrpe_angle_dtype!r}"
            )
        if self.lightning_impl not in LIGHTNING_IMPLS:
            raise ConfigError(f"lightning_impl must be one of {LIGHTNING_IMPLS}, got {self.lightning_impl!r}")
        for name, what in (
            ("decode_kernel", "the recurrence of static decode steps"),
            ("norm_kernel", "the norms on CUDA"),
            ("loss_kernel", "the chunked loss's cross-entropy"),
            ("act_kernel", "the token mixer's activation"),
        ):
            if getattr(self, name) not in KERNEL_CHOICES:
                raise ConfigError(f"{name} must be one of {KERNEL_CHOICES} ({what}), got {getattr(self, name)!r}")
        if self.lightning_chunk_size < 1 or self.loss_chunk_size < 1:
            raise ConfigError("lightning_chunk_size and loss_chunk_size must be positive")

    @property
    def head_dim(self) -> int:
        """Value head dim hd = D / h (q/k are 2·hd wide in LRPE layers)."""
        return self.hidden_dim // self.decoder_attention_heads

    @property
    def channel_dim(self) -> int:
        """GLU width G; the official code reads glu_dim -1 as the embedding dim."""
        return self.decoder_embed_dim if self.glu_dim == -1 else self.glu_dim

    @property
    def embed_scale(self) -> float:
        """Embedding multiplier: 1 with no_scale_embedding, else sqrt(d) (spec §4.1)."""
        return 1.0 if self.no_scale_embedding else self.decoder_embed_dim**0.5

    def uses_lrpe(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` applies LRPE (an empty list means no layer does)."""
        return bool(self.linear_use_lrpe_list) and bool(self.linear_use_lrpe_list[layer_idx])


def _sizes(d: int, layers: int, heads: int, glu: int, vocab: int = 64000, **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": vocab,
        "decoder_embed_dim": d,
        "hidden_dim": d,
        "decoder_layers": layers,
        "decoder_attention_heads": heads,
        "glu_dim": glu,
        "linear_use_lrpe_list": [1] + [0] * (layers - 1),
        "linear_act_fun": "swish",
        **extra,
    }


# Spec §2 table; "tiny" is the quickstart/test model (docs/internals.md), sized for the byte tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _sizes(64, 2, 2, 128, vocab=384),
    "385M": _sizes(1024, 24, 8, 2816),
    "1B": _sizes(2048, 16, 16, 5632),
    "7B": _sizes(4096, 30, 32, 11008, no_scale_embedding=True),
}


def canonical_preset(name: str) -> str | None:
    """The preset ``name`` spells in any letter case ("TINY", "7b"), or None when it names no preset."""
    lowered = str(name).strip().lower()
    return next((p for p in PRESETS if p.lower() == lowered), None)


def config_from_preset(name: str, **overrides: Any) -> TransnormerConfig:
    """Build the config of a preset ("tiny", "385M", "1B", "7B"; any letter case), with field overrides."""
    preset = canonical_preset(name)
    if preset is None:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return TransnormerConfig(**{**PRESETS[preset], **overrides})
