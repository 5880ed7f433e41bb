"""Run fla's kernels once for one q/k width so Triton autotunes them (results land in TRITON_CACHE_DIR).

fla autotunes dozens of configs per kernel on first use (minutes per width); running one process per width
in parallel before the tests and benchmarks lets them read the tuned configs from the cache instead.
Usage: python benchmarks/fla_warmup.py 128 [heads] [v_width]   (K=256 for layer 0 with LRPE; heads 8 for 385M, 16
for 1B, 32 for 7B; v_width 128 for them all; the tiny preset: K 32 and 64, 2 heads, v_width 32)
"""

from __future__ import annotations

import sys
import time

import torch

from tnlora.model.modeling import layer_log_decay
from tnlora.ops.lightning import lightning_attention

if __name__ == "__main__":
    width = int(sys.argv[1])
    heads = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    v_width = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    t0 = time.perf_counter()
    log_decay = layer_log_decay(heads, 0, 16, torch.device("cuda"))
    for seq_ids in (None, torch.arange(4096, device="cuda")[None] // 1000):
        q, k = (torch.randn(1, 4096, heads, width, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qk")
        v = torch.randn(1, 4096, heads, v_width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        o, _ = lightning_attention(q, k, v, log_decay, seq_ids=seq_ids, impl="fla")
        o.float().pow(2).mean().backward()
    torch.cuda.synchronize()
    print(f"fla warm-up K={width} H={heads} V={v_width}: {time.perf_counter() - t0:.0f} s", flush=True)
