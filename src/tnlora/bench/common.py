"""What both benchmarks share: the environment line, a random-weight model on the device, the memory cap and
the profiler output."""

from __future__ import annotations

import platform
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from tnlora.errors import ConfigError

# Dense bf16 peak of an H100 SXM (datasheet), the MFU denominator; an H200 has the same peak.
H100_BF16_FLOPS = 989e12


def environment_line() -> str:
    """Card, versions and commit, printed before a benchmark's table."""
    import transformers

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    versions = [f"torch {torch.__version__}"]
    for name, label in (("triton", "triton"), ("transformers", "transformers"), ("peft", "peft"), ("fla", "fla-core")):
        try:
            module = transformers if name == "transformers" else __import__(name)
            versions.append(f"{label} {getattr(module, '__version__', '?')}")
        except ImportError:
            versions.append(f"{label} -")
    return f"card {card} | {' | '.join(versions)} | commit {source_commit() or '?'}"


def source_commit() -> str:
    """The commit of the source tree this module runs from ("" where not known). A copy of the tree made for another
    machine names its commit in a COMMIT file at its root (its git metadata, where copied at all, may be older than
    the tree)."""
    named = Path(__file__).resolve().parents[3] / "COMMIT"
    try:
        return named.read_text().strip() if named.is_file() else subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        return ""


def random_model(preset: str, attention_impl: str, device: str, quantization=None) -> torch.nn.Module:
    """A preset with random weights built directly on ``device``, in bf16 on CUDA (no fp32 CPU copy of a
    7B), fp32 on the CPU; no cache (training); eval mode is the caller's. With ``quantization`` (a
    ``tnlora.model.quantization.Quantization``) the model is built on the meta device and each linear weight is
    drawn on ``device`` just before it is quantized: a 7B never holds its 14 GB of bf16 weights there."""
    from tnlora.model import TransnormerForCausalLM, config_from_preset
    from tnlora.model.quantization import quantize_linears

    config = config_from_preset(preset, lightning_impl=attention_impl)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if quantization is not None:
        dtype = quantization.compute_dtype
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            torch.set_default_dtype(dtype)
            with torch.device("meta" if quantization is not None else device):
                model = TransnormerForCausalLM(config)
        finally:
            torch.set_default_dtype(previous)
        if quantization is not None:
            # the weights are drawn on the device: its generator too, seeded for a repeatable model
            if torch.device(device).type == "cuda":
                torch.cuda.manual_seed(0)
            quantize_linears(model, quantization, device, init_std=config.init_std)
    if quantization is None:
        model.to(dtype)  # also selects the kernels for the device
    model.config.use_cache = False
    return model


def cap_gpu_memory(gib: float) -> str:
    """Let this process allocate at most ``gib`` GiB of the current GPU (a smaller card's memory, on this one);
    returns the note for the config line."""
    if not torch.cuda.is_available():
        raise ConfigError("--gpu_memory_gib needs a CUDA GPU")
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if not 0 < gib * 2**30 <= total:
        raise ConfigError(f"--gpu_memory_gib: {gib:g} is not within this card's {total / 2**30:.1f} GiB")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total)
    return f" gpu_memory={gib:g}GiB of {total / 2**30:.1f}"


def cuda_seconds(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, timed with CUDA events around each call."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """The median seconds of ``repeats`` timed calls of ``fn`` (:func:`cuda_seconds`) after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(cuda_seconds(fn, repeats))


def profile_region(lead_steps: int = 0) -> torch.profiler.profile:
    """A profiler over the CPU and, when there is one, the GPU. With ``lead_steps`` it runs that many steps
    (``prof.step()`` after each) without keeping them, then records one, so that the profiler's own set-up on each
    thread (paid by that thread's first operation under it) falls outside the recorded step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    if not lead_steps:
        return torch.profiler.profile(activities=activities)
    schedule = torch.profiler.schedule(wait=0, warmup=lead_steps, active=1)
    return torch.profiler.profile(activities=activities, schedule=schedule)


def print_profile(prof: torch.profiler.profile, trace: str = "") -> None:
    """The top kernels (device time when there is a GPU) of a finished profile; the timeline to ``trace``."""
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
    if trace:
        prof.export_chrome_trace(trace)
        print(f"timeline: {trace} (chrome://tracing, or benchmarks/trace_gaps.py)")
