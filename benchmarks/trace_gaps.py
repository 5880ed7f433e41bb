"""Where the GPU waits: idle gaps of a ``tnlora bench train --trace`` timeline and the host work behind them.

Usage: python benchmarks/trace_gaps.py TRACE.json [--min_us 20] [--top 15]

Prints the device's busy and idle time over the traced step, the device time by kind of kernel (GEMMs, fla's
attention kernels, Inductor's fused Triton kernels, ...) and the kernels that take most of it, the longest idle
gaps with the host operators that launched the kernel ending each gap (the host was late there) and the
operators and runtime calls the launching thread was in during the longest of them, and every synchronising
runtime call.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
from collections import Counter
from pathlib import Path

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
# Kinds of kernel by name, first match wins (cuBLAS's Hopper GEMMs are "nvjet_*").
KINDS = (
    ("GEMM", re.compile(r"nvjet|gemm|cutlass|xmma|splitKreduce", re.I)),
    ("fla attention", re.compile(r"chunk_|fused_recurrent|simple_gla|fla", re.I)),
    ("Inductor fused", re.compile(r"^triton_")),
    ("other Triton", re.compile(r"_kernel$|^_")),
    ("copy / memset", re.compile(r"memcpy|memset|copy", re.I)),
    ("reduction", re.compile(r"reduce|softmax|argmax|norm", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized", re.I)),
)
GAP_DETAIL = 4  # the longest gaps whose host-side operators are listed
SYNC_CALLS = ("Synchronize", "cudaMemcpy", "cudaStreamWaitEvent", "cudaMalloc", "cudaFree")


def load(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def enclosing(ops: list[dict], starts: list[float], tid: object, t: float, depth: int = 4) -> str:
    """The innermost ``depth`` host operators of thread ``tid`` running at time ``t``."""
    i = bisect.bisect_right(starts, t)
    names = [e["name"] for e in ops[max(0, i - 4000) : i] if e["tid"] == tid and e["ts"] + e["dur"] >= t]
    return " > ".join(n[:40] for n in names[-depth:]) or "(no host operator)"


def kind(name: str) -> str:
    """The kind of a device event by its name (KINDS), "other" when none matches."""
    return next((label for label, pattern in KINDS if pattern.search(name)), "other")


def kernel_table(device: list[dict], busy: float, top: int, where=None) -> None:
    """Device time by kind of kernel, then the ``top`` kernels by total time (count, mean), each with the host
    operators that launched most of its time (``where(event)``: their names, innermost last)."""
    by_kind: Counter[str] = Counter()
    by_name: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for e in device:
        by_kind[kind(e["name"])] += e["dur"]
        by_name[e["name"]] += e["dur"]
        count[e["name"]] += 1
    total = sum(by_kind.values())
    print(f"\ndevice time by kind ({total / 1e3:.1f} ms of kernels, copies and sets; {busy / 1e3:.1f} ms busy):")
    for label, dur in by_kind.most_common():
        print(f"  {dur / 1e3:8.2f} ms  {100 * dur / total:5.1f}%  {label}")
    print(f"\ntop {top} kernels by total time:")
    for name, dur in by_name.most_common(top):
        print(f"  {dur / 1e3:8.2f} ms  {count[name]:6d} x {dur / count[name]:8.1f} us  {name[:90]}")
        if where is None:
            continue
        sources: Counter[str] = Counter()
        for e in device:
            if e["name"] == name:
                sources[where(e)] += e["dur"]
        for source, t in sources.most_common(2):
            print(f"  {'':8}    {t / 1e3:8.2f} ms from {source}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--min_us", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    events = load(args.trace)
    device = sorted((e for e in events if e.get("cat") in DEVICE_CATS), key=lambda e: e["ts"])
    ops = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation")), key=lambda e: e["ts"])
    starts = [e["ts"] for e in ops]
    runtime = sorted((e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")), key=lambda e: e["ts"])
    runtime_starts = [e["ts"] for e in runtime]
    launches = {e["args"].get("correlation"): e for e in runtime if "args" in e}
    if not device:
        print("no device events in the trace")
        return
    span0, span1 = device[0]["ts"], max(e["ts"] + e["dur"] for e in device)
    busy, gaps, end = 0.0, [], device[0]["ts"]
    for e in device:
        if e["ts"] > end:
            gaps.append((e["ts"] - end, end, e))
        busy += max(0.0, e["ts"] + e["dur"] - max(end, e["ts"]))
        end = max(end, e["ts"] + e["dur"])
    span = span1 - span0
    idle = [g for g in gaps if g[0] >= args.min_us]
    print(
        f"device span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms ({100 * busy / span:.0f}%), "
        f"{len(idle)} gaps >= {args.min_us:.0f} us totalling {sum(g[0] for g in idle) / 1e3:.1f} ms, "
        f"all gaps {sum(g[0] for g in gaps) / 1e3:.1f} ms"
    )
    def launched_from(kernel: dict, depth: int = 4) -> str:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        return enclosing(ops, starts, launch["tid"], launch["ts"], depth) if launch else "(launch not traced)"

    kernel_table(device, busy, args.top, lambda kernel: launched_from(kernel, 3))
    blame: Counter[str] = Counter()
    for dur, _, kernel in idle:
        blame[launched_from(kernel, 2)] += dur
    print("\nidle time by the host operators that ended the gaps (top):")
    for where, dur in blame.most_common(args.top):
        print(f"  {dur / 1e3:8.2f} ms  {where}")
    longest = sorted(idle, key=lambda g: -g[0])
    print(f"\nlongest gaps (>= {args.min_us:.0f} us):")
    for dur, t, kernel in longest[: args.top]:
        print(f"  {dur:8.0f} us at +{(t - span0) / 1e3:7.2f} ms before {kernel['name'][:40]}  <- {launched_from(kernel)}")
    print(f"\nwhat the launching thread ran during the {GAP_DETAIL} longest gaps (host operators >= 100 us, "
          "runtime calls >= 50 us):")
    for dur, t, kernel in longest[:GAP_DETAIL]:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None:
            continue
        print(f"  gap of {dur:.0f} us at +{(t - span0) / 1e3:.2f} ms:")
        # Host operators and runtime / driver calls alike: a launch call that itself takes milliseconds (a
        # kernel's module loaded on first use, say) shows here under the operator that made it.
        for listed, at, least in ((ops, starts, 100), (runtime, runtime_starts, 50)):
            during = [
                e for e in listed[bisect.bisect_left(at, t - 50e3) : bisect.bisect_right(at, t + dur)]
                if e["tid"] == launch["tid"] and e["dur"] >= least and e["ts"] < t + dur and e["ts"] + e["dur"] > t
            ]
            for e in during[:12]:
                print(f"    {e['dur']:8.0f} us  +{(e['ts'] - span0) / 1e3:7.2f} ms  {e['name'][:80]}")
    syncs = [
        e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and any(s in e["name"] for s in SYNC_CALLS)
    ]
    print("\nsynchronising / allocating runtime calls:")
    totals: Counter[str] = Counter()
    for e in syncs:
        totals[f"{e['name']} in {enclosing(ops, starts, e['tid'], e['ts'], 2)}"] += e["dur"]
    for where, dur in totals.most_common(args.top):
        print(f"  {dur / 1e3:8.2f} ms  {where}")


if __name__ == "__main__":
    main()
