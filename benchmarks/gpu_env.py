"""First call on a GPU machine: versions, missing packages, measured ceilings, and a standalone fla check.

Run: python benchmarks/gpu_env.py. Prints a short table last.
"""

from __future__ import annotations

import importlib
import math

import torch


def versions() -> None:
    print(f"torch {torch.__version__}  cuda {torch.version.cuda}  device {torch.cuda.get_device_name()}")
    for name in ["triton", "transformers", "peft", "accelerate", "datasets", "safetensors", "sentencepiece",
                 "tokenizers", "yaml", "matplotlib", "tensorboard", "fla", "einops", "liger_kernel", "numpy"]:
        try:
            mod = importlib.import_module(name)
            print(f"  {name:14s} {getattr(mod, '__version__', '?')}")
        except Exception as exc:  # noqa: BLE001 - report whatever fails to import
            print(f"  {name:14s} MISSING ({type(exc).__name__}: {exc})")


def ceilings() -> tuple[float, float]:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops = 2 * 8192**3 * 20 / (start.elapsed_time(end) / 1e3) / 1e12
    x = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    gbs = 2 * x.numel() * 2 * 10 / (start.elapsed_time(end) / 1e3) / 1e9
    return tflops, gbs


def naive(q, k, v, g_gamma, seq_lens):
    """float64 O(n^2) reference, per sequence."""
    outs = []
    start = 0
    for n in seq_lens:
        qs, ks, vs = (t[:, start:start + n].double() for t in (q, k, v))
        pos = torch.arange(n, device=q.device, dtype=torch.float64)
        dist = pos[:, None] - pos[None, :]
        mask = torch.exp(g_gamma.double()[:, None, None] * dist.clamp(min=0)) * (dist >= 0)
        scores = torch.einsum("bthk,bshk->bhts", qs, ks) * mask
        outs.append(torch.einsum("bhts,bshv->bthv", scores, vs))
        start += n
    return torch.cat(outs, dim=1)


def fla_check() -> list[tuple[str, float]]:
    from fla.ops.simple_gla import chunk_simple_gla

    rows = []
    torch.manual_seed(0)
    for kdim, seq_lens in [(128, [1000]), (256, [1000]), (128, [300, 77, 623]), (256, [300, 77, 623])]:
        H, V, T = 16, 128, sum(seq_lens)
        slopes = torch.tensor([2 ** (-8 * (j + 1) / H) for j in range(H)], device="cuda")
        g_gamma = -slopes
        q = (torch.randn(1, T, H, kdim, device="cuda") * 0.3).to(torch.bfloat16).requires_grad_()
        k = (torch.randn(1, T, H, kdim, device="cuda") * 0.3).to(torch.bfloat16).requires_grad_()
        v = torch.randn(1, T, H, V, device="cuda").to(torch.bfloat16).requires_grad_()
        do = torch.randn(1, T, H, V, device="cuda").to(torch.bfloat16)
        cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], device="cuda") if len(seq_lens) > 1 else None
        o, _ = chunk_simple_gla(q, k, v, g_gamma=g_gamma, scale=1.0, cu_seqlens=cu)
        o.backward(do)
        grads = [t.grad.double() for t in (q, k, v)]
        qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref = naive(qr, kr, vr, g_gamma, seq_lens)
        ref.backward(do.double())
        def rel(a, b):
            return ((a - b).norm() / b.norm()).item()
        tag = f"K={kdim} seqs={seq_lens}"
        rows.append((f"{tag} o", rel(o.double(), ref)))
        for name, got, want in zip("qkv", grads, (qr.grad, kr.grad, vr.grad)):
            rows.append((f"{tag} d{name}", rel(got, want)))
    return rows


if __name__ == "__main__":
    versions()
    tflops, gbs = ceilings()
    rows = fla_check()
    print("\n| check | value |\n|---|---|")
    print(f"| bf16 8192^3 matmul | {tflops:.0f} TFLOP/s |")
    print(f"| device copy (read+write) | {gbs:.0f} GB/s |")
    for name, err in rows:
        flag = "OK" if err < 1e-2 and math.isfinite(err) else "FAIL"
        print(f"| fla vs fp64 {name} | {err:.2e} {flag} |")
