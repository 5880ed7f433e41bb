"""Which implementation of each operation runs on which device: decided here and nowhere else.

The model's config names a choice per operation (``lightning_impl``, ``norm_kernel``, ``decode_kernel``,
``loss_kernel``, ``act_kernel``), each "auto" by default;
:func:`kernels_for` turns the choices into implementations for one device. The model applies them when it is
built and whenever it moves to another device (``TransnormerPreTrainedModel.select_kernels``), never inside a
forward; the static decode step (``infer.decode_graph``) resolves ``decode_kernel`` with :func:`kernel_impl` when
its runner is built.

"auto" means: on CUDA, the Triton kernels when triton imports: the lightning attention as per-example scans
(:mod:`tnlora.ops.lightning_triton`: the forward in one launch a layer for prefill and evaluation; in training
with the backward's launches on Hopper cards, where they were measured and tested, for calls that fill the card
(:data:`SCAN_MIN_LANES`), and fla-core's chunk kernels for the others and on other cards when fla imports), the
norms, the loss, the activation and the decode step; everywhere else, the PyTorch implementations. One-token
attention calls (decoding without a static step) use the recurrent form.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tnlora.choices import KERNEL_CHOICES, LIGHTNING_IMPLS
from tnlora.errors import ConfigError
from tnlora.ops.fla import fla_available


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (its kernels also need a CUDA device or Triton's CPU interpreter). Probed once: the
    eager fp8 layer asks on every quantization."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# Compute capabilities (major) whose cards the Triton scans were measured and GPU-tested on for training (H100;
# Hopper's 227 KB of shared memory a block): elsewhere "auto" trains with fla as before until they are.
SCAN_TRAINING_CAPABILITIES = frozenset({9})


def scans_train_on(device: torch.device | str) -> bool:
    """Whether ``device`` is a CUDA card of a kind the Triton scans train on by default."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] in SCAN_TRAINING_CAPABILITIES


def attention_impl(choice: str, device: torch.device | str) -> str:
    """The multi-token lightning attention with gradients for ``choice`` on ``device``: auto → on a Hopper card the
    Triton scans when triton imports (less device time than fla-core's chunk kernels on every packed micro-batch
    measured, half the memory: benchmarks/RESULTS.md, "Attention kernel"; calls of few lanes take
    :func:`few_lanes_attention_impl`); on other CUDA cards fla when it imports; else chunked."""
    if choice not in LIGHTNING_IMPLS:
        raise ConfigError(f"lightning_impl must be one of {LIGHTNING_IMPLS}, got {choice!r}")
    if choice != "auto":
        return choice
    if torch.device(device).type != "cuda":
        return "chunked"
    if triton_available() and scans_train_on(device):
        return "triton"
    return "fla" if fla_available() else "chunked"


# The scans walk each example's chunks in order, one program per (example, head, block), so one long example at few
# heads leaves most of the card idle: on an H100 one 131,072-token row took them 14.7 ms forward + backward at 16
# heads (fla 10.7) and 13.8 at 8 (fla 6.5), against 16.0 (fla 20.4) at 32 heads (benchmarks/RESULTS.md, "tnlora's
# scans against fla's chunk kernels"). A call's lanes are its heads × tokens ÷ its longest example (how many
# whole-length walks it holds); "auto" trains a call of fewer than SCAN_MIN_LANES with fla.
SCAN_MIN_LANES = 32


def scan_lanes(heads: int, tokens: int, longest: int) -> int:
    """The lanes of an attention call over ``tokens`` tokens whose longest example has ``longest``."""
    return heads * tokens // max(longest, 1)


def few_lanes_attention_impl(choice: str, device: torch.device | str) -> str:
    """The trainable attention of calls with fewer than :data:`SCAN_MIN_LANES` lanes: fla where "auto" picked the
    scans and fla-core imports; otherwise what :func:`attention_impl` picks (a named choice is kept)."""
    impl = attention_impl(choice, device)
    return "fla" if choice == "auto" and impl == "triton" and fla_available() else impl


def forward_attention_impl(choice: str, device: torch.device | str) -> str:
    """The multi-token lightning attention of forwards without gradients (prefill, evaluation): auto → the Triton
    forward on CUDA when triton imports (one launch a layer), else what :func:`attention_impl` picks."""
    if choice == "auto" and torch.device(device).type == "cuda" and triton_available():
        return "triton"
    return attention_impl(choice, device)


def step_attention_impl(choice: str) -> str:
    """The lightning attention of one-token calls: recurrent unless a specific implementation was chosen."""
    return "recurrent" if choice == "auto" else choice


def kernel_impl(choice: str, device: torch.device | str, field: str) -> str:
    """"torch" or "triton" for the config ``field`` (norm_kernel, decode_kernel, loss_kernel, act_kernel) set to
    ``choice`` on ``device``: auto → triton on CUDA when it imports (the device is checked first: a CPU model never
    imports triton)."""
    if choice not in KERNEL_CHOICES:
        raise ConfigError(f"{field} must be one of {KERNEL_CHOICES}, got {choice!r}")
    if choice == "auto":
        return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise ConfigError(
            f"{field} 'triton' needs the triton package (installed with PyTorch's CUDA wheels); use {field} 'torch'"
        )
    return choice


@dataclass(frozen=True)
class Kernels:
    """The implementations a model runs on one device."""

    attention: str  # multi-token lightning attention with gradients: chunked | recurrent | fla | triton
    attention_few_lanes: str  # the same for calls of fewer than SCAN_MIN_LANES lanes (one long example, few heads)
    attention_forward: str  # the same without gradients (prefill, evaluation): also triton
    attention_step: str  # one-token lightning attention calls
    norm: str  # SimpleRMSNorm: torch | triton (forward and backward kernels; no-grad forwards too)
    loss: str  # the chunked loss's cross-entropy and logit gradient: torch | triton
    act: str  # the token mixer's activation with grad (ops.qkvu_act): torch | triton


def kernels_for(config: object, device: torch.device | str) -> Kernels:
    """The implementations for a model with ``config`` (a TransnormerConfig) on ``device``."""
    impl = getattr(config, "lightning_impl", "auto")
    # A model on the meta device (being loaded) is planned as on the CPU; loading re-selects on its device.
    device = torch.device("cpu") if torch.device(device).type == "meta" else torch.device(device)
    return Kernels(
        attention=attention_impl(impl, device),
        attention_few_lanes=few_lanes_attention_impl(impl, device),
        attention_forward=forward_attention_impl(impl, device),
        attention_step=step_attention_impl(impl),
        norm=kernel_impl(getattr(config, "norm_kernel", "auto"), device, "norm_kernel"),
        loss=kernel_impl(getattr(config, "loss_kernel", "auto"), device, "loss_kernel"),
        act=kernel_impl(getattr(config, "act_kernel", "auto"), device, "act_kernel"),
    )


__all__ = [
    "SCAN_MIN_LANES",
    "Kernels",
    "attention_impl",
    "few_lanes_attention_impl",
    "forward_attention_impl",
    "kernel_impl",
    "kernels_for",
    "scan_lanes",
    "scans_train_on",
    "step_attention_impl",
    "triton_available",
]
