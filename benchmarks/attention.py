"""Forward + backward time of each lightning-attention implementation (a script, not a test).

    python benchmarks/attention.py                       # CUDA if present: T = 512 … 32768, bf16
    python benchmarks/attention.py --device cpu --dtype float32 --lengths 512,1024 --repeats 3

Shapes are 1B-like: H = 16 heads, V = 128, and K = 128 (layers 1…L−1) or K = 256 (layer 0, LRPE doubles q/k).
One row per (K, T, impl): milliseconds for forward + backward (median of --repeats after --warmup runs) and,
on CUDA, the peak memory of that step; ``--back-to-back N`` times N calls between two syncs, as a training step
makes them. The per-token recurrent loop is timed only up to --recurrent-max.

    python benchmarks/attention.py --impls fla,triton --heads 32 --examples huanhuan --lengths 16384

``--examples huanhuan`` cuts the T tokens into examples of huanhuan.json's lengths (one row with its
``PackedRows``, as packed training rows reach the kernels); ``--examples N`` into examples of N tokens.
``--forward`` times the forward alone (no gradients). ``--segment-tokens 0,2048`` times impl triton once for each
value of ``lightning_triton.SEGMENT_TOKENS`` (packed examples: a forward program walks the examples that start in
one block of that many tokens; 0: one example a program); ``--backward-segment-tokens 0,512`` the same for
``BACKWARD_SEGMENT_TOKENS`` (a backward program walks those examples one after another, each in chunks of its own);
``--quadratic-mean-tokens 0,320`` the same for ``quadratic_triton.QUADRATIC_MAX_MEAN_TOKENS`` (packed examples
at most that long on average take the quadratic form in blocks; 0: the scans); ``--quadratic-launch 32:4:2`` runs
all three of its launches with that block, warps and pipeline stages, ``32:4:2:64`` also with 64 output columns a
program (``quadratic_triton.BlockLaunch``), ``32:4:3:64/32:4:3:64/16:4:3:64`` the forward, dq and dk / dv each
with its own; several such entries, comma-separated, are timed one after another in one process (rows labelled
L0, L1, ... as the header lines list them).
"""

from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import time

import torch

from tnlora.bench.common import source_commit
from tnlora.model.modeling import layer_log_decay
from tnlora.ops.fla import fla_available
from tnlora.ops.lightning import lightning_attention
from tnlora.ops.packing import PackedRows

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def header(device: torch.device, dtype: torch.dtype) -> str:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    versions = [f"torch {torch.__version__}"]
    for name in ("triton", "fla", "transformers"):
        try:
            versions.append(f"{name} {importlib.import_module(name).__version__}")
        except Exception:  # a missing optional package is reported, not fatal
            versions.append(f"{name} -")
    return f"# {card} | {' | '.join(versions)} | commit {source_commit() or 'unknown'} | {dtype} | V=128"


def example_bounds(spec: str, length: int, device: torch.device) -> torch.Tensor | None:
    """cu_seqlens of ``length`` tokens cut into examples (``spec``: "huanhuan", a token count, or "" for none)."""
    if not spec:
        return None
    if spec == "huanhuan":
        from tnlora.bench.train import read_lengths

        sizes = [prompt + learned for prompt, learned in read_lengths(None)]
    else:
        sizes = [int(spec)]
    bounds, at, i = [0], 0, 0
    while at < length:
        at = min(length, at + sizes[i % len(sizes)])
        bounds.append(at)
        i += 1
    return torch.tensor(bounds, dtype=torch.long, device=device)


def time_step(impl: str, K: int, T: int, args: argparse.Namespace) -> tuple[float, float | None]:
    """Median ms of forward + backward, and peak MiB on CUDA."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    H, V, B = args.heads, 128, args.batch
    cu_seqlens = example_bounds(args.examples, T, device)
    # The boundaries as the model passes them (host copies: the scans' backward counts its lanes from them).
    rows = PackedRows.from_cu_seqlens(cu_seqlens, T) if cu_seqlens is not None else None
    if cu_seqlens is not None:
        B = 1
    train = not args.forward
    # SiLU'd q and k, as the model's token mixer gives them (unbounded ones overflow bf16 sums over long rows).
    q, k = (torch.nn.functional.silu(torch.randn(B, T, H, K, device=device)).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, device=device, dtype=dtype)
    q, k, v = (x.requires_grad_(train) for x in (q, k, v))
    grad = torch.randn(B, T, H, V, device=device, dtype=dtype)
    log_decay = layer_log_decay(H, 0, 16, device)

    def step() -> None:
        with torch.set_grad_enabled(train):
            o, _ = lightning_attention(q, k, v, log_decay, rows=rows, impl=impl, chunk_size=args.chunk_size)
        if train:
            o.backward(grad)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        # --back-to-back calls between two syncs, as a training step makes them: the host's own time per call
        # then hides behind the device's wherever it is shorter.
        sync()
        start = time.perf_counter()
        for _ in range(args.back_to_back):
            step()
        sync()
        times.append((time.perf_counter() - start) * 1e3 / args.back_to_back)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    if args.profile and device.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.back_to_back):
                step()
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile))
    return statistics.median(times), peak


def _quadratic_launches(text: str) -> tuple:
    """The forward, dq and dk / dv ``BlockLaunch`` of one ``--quadratic-launch`` entry: one launch for all three,
    or three joined by /."""
    from tnlora.ops.quadratic_triton import BlockLaunch

    given = [BlockLaunch(*(int(x) for x in part.split(":"))) for part in text.split("/")]
    return tuple(given + [given[-1]] * (3 - len(given)))


def _set_quadratic_launches(launches: tuple) -> None:
    """The quadratic form's launch tables set to ``launches`` (forward, dq, dk / dv) at every width."""
    from tnlora.ops import quadratic_triton

    tables = (quadratic_triton.FORWARD_LAUNCHES, quadratic_triton.DQ_LAUNCHES, quadratic_triton.DKV_LAUNCHES)
    for table, launch in zip(tables, launches, strict=True):
        table.update({width: launch for width in table})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--lengths", default="512,1024,2048,4096,8192,16384,32768")
    parser.add_argument("--head-dims", default="128,256", help="q/k head dims K")
    parser.add_argument(
        "--impls", default=None, help="comma list; default: chunked, recurrent, fla if usable"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16, help="H: 16 is 1B's, 32 7B's, 8 385M's")
    parser.add_argument("--examples", default="", help="huanhuan, or a token count: examples cut from one row")
    parser.add_argument("--forward", action="store_true", help="the forward alone, without gradients")
    parser.add_argument("--back-to-back", type=int, default=1,
                        help="calls timed together between two syncs (the host's time per call hides behind the device's)")
    parser.add_argument("--profile", type=int, default=0, help="also list this many kernels by device time (CUDA)")
    parser.add_argument(
        "--triton-grad", default="",
        help="K block:V block:warps[:merged] of impl triton's backward kernels (a sweep; merged: dk and dv in one launch)"
    )
    parser.add_argument("--segment-tokens", default="",
                        help="comma list: impl triton timed at each SEGMENT_TOKENS (packed examples; 0: one a program)")
    parser.add_argument("--backward-segment-tokens", default="",
                        help="comma list: impl triton timed at each BACKWARD_SEGMENT_TOKENS (0: one example a program)")
    parser.add_argument("--quadratic-mean-tokens", default="",
                        help="comma list: impl triton timed at each QUADRATIC_MAX_MEAN_TOKENS (0: the scans)")
    parser.add_argument("--quadratic-launch", default="",
                        help="block:warps:stages[:columns] for the quadratic form's three launches, or three such "
                             "joined by / (forward / dq / dk and dv); several such entries comma-separated are "
                             "each timed (labelled L0, L1, ...); the tree's own if empty")
    parser.add_argument("--chunk-size", type=int, default=64, help="chunk of the pure-PyTorch chunked impl")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recurrent-max", type=int, default=2048, help="longest T for the per-token loop")
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.triton_grad:
        from tnlora.ops import lightning_triton

        fields = args.triton_grad.split(":")
        block_k, block_v, warps = (int(x) for x in fields[:3])
        launch = lightning_triton.GradLaunch(block_k, block_v, warps, merged=fields[3:] == ["merged"])
        # Every width and lane count the sweep's launch (the tree's own: GRAD_LAUNCHES per width, SEGMENTED_LAUNCHES
        # where the backward walks ScanChunks, FEW_LANES_LAUNCH for calls of fewer than MERGED_MIN_LANES lanes).
        lightning_triton.GRAD_LAUNCHES = {width: launch for width in lightning_triton.GRAD_LAUNCHES}
        lightning_triton.SEGMENTED_LAUNCHES = {width: launch for width in lightning_triton.SEGMENTED_LAUNCHES}
        lightning_triton.MERGED_MIN_LANES = 0
        print(f"# triton backward: K block {block_k}, V block {block_v}, {warps} warps"
              f"{', dk and dv in one launch (up to 128 wide)' if launch.merged else ''}")  # fmt: skip
    quadratic_launches = [_quadratic_launches(text) for text in args.quadratic_launch.split(",") if text]
    for number, launches in enumerate(quadratic_launches):
        for name, launch in zip(("forward", "dq", "dk / dv"), launches, strict=True):
            print(f"# quadratic launch L{number}, {name}: {launch.block}-token blocks walking {launch.walk}-token "
                  f"tiles, {launch.num_warps} warps, {launch.num_stages} stages, {launch.columns} output columns "
                  "a program")  # fmt: skip
    impls = args.impls.split(",") if args.impls else ["chunked", "recurrent"]
    if not args.impls and device.type == "cuda" and fla_available():
        impls.insert(0, "fla")
    segments = [int(x) for x in args.segment_tokens.split(",")] if args.segment_tokens else [None]
    backward = [int(x) for x in args.backward_segment_tokens.split(",")] if args.backward_segment_tokens else [None]
    quadratic = [int(x) for x in args.quadratic_mean_tokens.split(",")] if args.quadratic_mean_tokens else [None]
    numbers = list(range(len(quadratic_launches))) or [None]  # the launch each triton row runs (None: the tree's)
    scans = [(seg, back, quad, n) for seg in segments for back in backward for quad in quadratic for n in numbers]
    runs = [(impl, walk) for impl in impls for walk in (scans if impl == "triton" else [(None, None, None, None)])]
    print(header(device, DTYPES[args.dtype]))
    print(f"# H={args.heads} examples={args.examples or 'one per row'} {'forward' if args.forward else 'fwd+bwd'}")
    print(f"{'impl':<16} {'K':>4} {'T':>6} {'ms':>11} {'peak MiB':>9}")
    for head_k in (int(x) for x in args.head_dims.split(",")):
        for length in (int(x) for x in args.lengths.split(",")):
            for impl, (seg, back, quad, number) in runs:
                label = impl + (f"/s{seg}" if seg is not None else "") + (f"/b{back}" if back is not None else "")
                label += f"/q{quad}" if quad is not None else ""
                if number is not None:
                    label += f"/L{number}"
                    _set_quadratic_launches(quadratic_launches[number])
                row = f"{label:<16} {head_k:>4} {length:>6}"
                if quad is not None:
                    from tnlora.ops import quadratic_triton

                    quadratic_triton.QUADRATIC_MAX_MEAN_TOKENS = quad
                if seg is not None or back is not None:
                    from tnlora.ops import lightning_triton

                    if seg is not None:
                        lightning_triton.SEGMENT_TOKENS = seg
                    if back is not None:
                        lightning_triton.BACKWARD_SEGMENT_TOKENS = back
                if impl == "recurrent" and length > args.recurrent_max:
                    print(f"{row} {'skipped':>11}")
                    continue
                try:
                    ms, peak = time_step(impl, head_k, length, args)
                except torch.OutOfMemoryError:
                    print(f"{row} {'OOM':>11}")
                    torch.cuda.empty_cache()
                    continue
                peak_text = f"{peak:9.0f}" if peak is not None else f"{'-':>9}"
                print(f"{row} {ms:11.3f} {peak_text}", flush=True)


if __name__ == "__main__":
    main()
