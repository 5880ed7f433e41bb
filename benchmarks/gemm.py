"""The training step's frozen-weight GEMMs alone: how fast cuBLAS runs each projection's shape, plain and in the
forms the fused LoRA layer uses, and whether the card holds its clock under a long run of them.

In the traced 7B steps (RESULTS.md, "Where the training step's time goes") the frozen weights' GEMMs run at
~670–690 TFLOP/s, against ~785 for a short run of 8192³ products on the same card. This separates the
possible causes: the shape and layout (forward x Wᵀ, input gradient dy W), the β = 1 epilogue that adds the
adapter's output already in y (``addmm_``), and the clock under a sustained load (nvidia-smi sampled while a
few seconds of one shape run back to back).

    python3 benchmarks/gemm.py [--models 7B,1B] [--rows 16384,131072] [--sustain 4]    # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
from torch import Tensor

from tnlora.bench.common import cuda_seconds, environment_line

# (name, N, K) of y = x Wᵀ, W [N, K], for each layer's projections.
SHAPES = {
    "7B": [("qkvu", 16384, 4096), ("out_proj", 4096, 4096), ("l1/l2", 11008, 4096), ("l3", 4096, 11008)],
    "1B": [("qkvu", 8192, 2048), ("out_proj", 2048, 2048), ("l1/l2", 5632, 2048), ("l3", 2048, 5632)],
}


def operands(m: int, n: int, k: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    """Random x [m, k], W [n, k], dy [m, n] and the accumulators y [m, n], dx [m, k]."""
    return {
        "x": torch.randn(m, k, device=device, dtype=dtype),
        "w": torch.randn(n, k, device=device, dtype=dtype) / k**0.5,
        "dy": torch.randn(m, n, device=device, dtype=dtype),
        "y": torch.randn(m, n, device=device, dtype=dtype),
        "dx": torch.randn(m, k, device=device, dtype=dtype),
    }


def forms(t: dict[str, Tensor]) -> dict[str, tuple[Callable[[], Tensor], float]]:
    """Each form's callable and its FLOPs on the operands ``t``: forward y = x Wᵀ and input gradient dx = dy W,
    each written fresh (β = 0) and accumulated into a tensor already holding the adapter's part (β = 1, in
    place: the accumulators change with every call)."""
    x, w, dy, y, dx = t["x"], t["w"], t["dy"], t["y"], t["dx"]
    flops = 2.0 * x.shape[0] * w.shape[0] * w.shape[1]
    return {
        "fwd x Wᵀ (β=0)": (lambda: torch.mm(x, w.t()), flops),
        "fwd y += x Wᵀ (β=1)": (lambda: y.addmm_(x, w.t()), flops),
        "dgrad dy W (β=0)": (lambda: torch.mm(dy, w), flops),
        "dgrad dx += dy W (β=1)": (lambda: dx.addmm_(dy, w), flops),
    }


def clock_sampler() -> subprocess.Popen | None:
    """nvidia-smi printing the SM clock, power and throttle reasons every 100 ms, or None without it."""
    query = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    try:
        return subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
    except OSError:
        return None


def sustained(fn: Callable[[], object], flops: float, seconds: float) -> str:
    """TFLOP/s over each second of ``fn`` run back to back for ``seconds``, with the SM clock and power seen."""
    sampler = clock_sampler()
    rates, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0, done = time.perf_counter(), 0
        while time.perf_counter() - t0 < 1.0:
            fn()
            done += 1
        torch.cuda.synchronize()
        rates.append(flops * done / (time.perf_counter() - t0) / 1e12)
    samples = []
    if sampler is not None:
        sampler.terminate()
        out, _ = sampler.communicate()
        for line in out.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 4:
                samples.append(parts)
    seen = ""
    if samples:
        clocks = [float(s[0]) for s in samples]
        power = [float(s[1]) for s in samples]
        reasons = sorted({s[3] for s in samples})
        seen = (
            f"; SM clock {min(clocks):.0f}–{max(clocks):.0f} MHz (median {statistics.median(clocks):.0f}), power up "
            f"to {max(power):.0f} W, {samples[-1][2]} °C at the end, throttle reasons {', '.join(reasons)}"
        )
    return "TFLOP/s per second: " + ", ".join(f"{r:.0f}" for r in rates) + seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="7B,1B")
    parser.add_argument("--rows", default="16384,131072", help="tokens (GEMM rows), comma-separated")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sustain", type=float, default=4.0, help="seconds of the 7B l1 forward back to back")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(2, "error: benchmarks/gemm.py measures a CUDA GPU's GEMMs; this machine has none\n")
    print(environment_line(), flush=True)
    ref = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        ref @ ref
    t = statistics.median(cuda_seconds(lambda: ref @ ref, args.repeats))
    print(f"8192³ reference: {2 * 8192**3 / t / 1e12:.0f} TFLOP/s", flush=True)
    print("| model | projection | rows | form | ms | TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for name, n, k in SHAPES[model]:
            for m in (int(r) for r in args.rows.split(",")):
                for form, (fn, flops) in forms(operands(m, n, k)).items():
                    for _ in range(2):
                        fn()
                    t = statistics.median(cuda_seconds(fn, args.repeats))
                    print(f"| {model} | {name} ({n}×{k}) | {m} | {form} | {t * 1e3:.3f} | {flops / t / 1e12:.0f} |",
                          flush=True)
                torch.cuda.empty_cache()
    if args.sustain > 0:
        fn, flops = forms(operands(131072, 11008, 4096))["fwd y += x Wᵀ (β=1)"]
        print(f"sustained 7B l1 forward (β=1, 131072 rows): {sustained(fn, flops, args.sustain)}", flush=True)


if __name__ == "__main__":
    main()
