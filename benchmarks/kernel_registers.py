"""Registers, shared memory and occupancy of the quadratic form's kernels, compiled ahead of time for a target
card, no GPU needed (a script, not a test).

    PYTHONPATH=src python benchmarks/kernel_registers.py --launches 32:4:3:128,32:4:3:64 --key-dims 128,256

Each launch (``quadratic_triton.BlockLaunch``: block:warps:stages:columns) is compiled with Triton for the target
(default sm_90, Hopper) in bf16; ``cuobjdump --dump-resource-usage`` (Triton's own, from its NVIDIA backend) reads
the registers a thread and any local memory (spills) off the binary. Occupancy follows from the card's limits:
65,536 registers, 228 KiB of shared memory (1 KiB of it reserved a block) and 64 warps a streaming
multiprocessor, registers allocated per warp in units of 256. Kernels that wait on memory need several blocks
resident to hide it: the rows a launch's occupancy allows are what this prints next to its timings.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tnlora.ops.lightning_triton import tile_width
from tnlora.ops.quadratic_triton import (
    BlockLaunch,
    dkv_splits,
    output_columns,
    quadratic_dkv_kernel,
    quadratic_rows_kernel,
)

REGISTERS_PER_SM = 65_536
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024
WARPS_PER_SM = 64


def _compile(kernel, signature: dict[str, str], constants: dict[str, object], launch: BlockLaunch, target):
    source = ASTSource(fn=kernel, signature={**signature, **dict.fromkeys(constants, "constexpr")}, constexprs=constants)
    return triton.compile(source, target=target, options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})


def rows_kernel(launch: BlockLaunch, width: int, columns_width: int, target):
    """The forward / dq kernel for a, b of ``width`` and c of ``columns_width`` (bf16)."""
    pointers = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "decay_ptr": "*fp32", "starts_ptr": "*i32",
                "out_ptr": "*bf16"}  # fmt: skip
    scalars = ["length", "heads", "stride_at", "stride_ah", "stride_bt", "stride_bh", "stride_ct", "stride_ch"]
    constants = {"AB": width, "C": columns_width, "PRECISION": "tf32", "WHILE_LOOP": False, "BT": launch.block,
                 "BAB": tile_width(width), "BC": output_columns(launch, columns_width)}  # fmt: skip
    return _compile(quadratic_rows_kernel, {**pointers, **dict.fromkeys(scalars, "i32")}, constants, launch, target)


def dkv_kernel(launch: BlockLaunch, key_dim: int, value_dim: int, target):
    """The dk / dv kernel (bf16)."""
    pointers = {**dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "do_ptr"], "*bf16"), "decay_ptr": "*fp32",
                "starts_ptr": "*i32", "ends_ptr": "*i32", "dk_ptr": "*bf16", "dv_ptr": "*bf16"}  # fmt: skip
    scalars = ["length", "heads", "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh"]
    key_tile, value_tile = tile_width(key_dim), tile_width(value_dim)
    splits = dkv_splits(key_tile, value_tile, launch.columns)
    constants = {"K": key_dim, "V": value_dim, "PRECISION": "tf32", "WHILE_LOOP": False, "BT": launch.block,
                 "BKF": key_tile, "BVF": value_tile, "BKC": key_tile // splits, "BVC": value_tile // splits}  # fmt: skip
    return _compile(quadratic_dkv_kernel, {**pointers, **dict.fromkeys(scalars, "i32")}, constants, launch, target)


def resource_usage(compiled) -> tuple[int, int]:
    """(registers a thread, local memory bytes a thread) of a compiled kernel, read by cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    fields = dict(item.split(":") for item in next(line for line in text.splitlines() if "REG:" in line).split())
    return int(fields["REG"]), int(fields["LOCAL"])


def blocks_per_sm(registers: int, shared: int, warps: int) -> int:
    """Resident blocks a streaming multiprocessor holds for a kernel of these registers a thread, shared bytes a
    block and warps a block."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = (REGISTERS_PER_SM // per_warp) // warps
    by_shared = SHARED_PER_SM // (shared + SHARED_RESERVED_PER_BLOCK)
    return min(by_registers, by_shared, WARPS_PER_SM // warps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", default="32:4:3:128,32:4:3:64,32:8:3:128,32:8:3:64,16:8:3:128,64:4:3:64")
    parser.add_argument("--key-dims", default="128,256", help="q/k widths (256: LRPE's layer)")
    parser.add_argument("--value-dim", type=int, default=128)
    parser.add_argument("--arch", type=int, default=90, help="compute capability as one number (90: Hopper)")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    print(f"# triton {triton.__version__}, sm_{args.arch}, bf16, V {args.value_dim}")
    print(f"{'kernel':<8} {'K':>4} {'launch':<11} {'regs':>5} {'local':>6} {'shared':>7} {'blocks/SM':>10} {'warps/SM':>9}")
    for key_dim in (int(x) for x in args.key_dims.split(",")):
        for text in args.launches.split(","):
            launch = BlockLaunch(*(int(x) for x in text.split(":")))
            kernels = {
                "forward": rows_kernel(launch, key_dim, args.value_dim, target),
                "dq": rows_kernel(launch, args.value_dim, key_dim, target),
                "dk/dv": dkv_kernel(launch, key_dim, args.value_dim, target),
            }
            for name, compiled in kernels.items():
                registers, local = resource_usage(compiled)
                shared = compiled.metadata.shared
                blocks = blocks_per_sm(registers, shared, launch.num_warps)
                print(f"{name:<8} {key_dim:>4} {text:<11} {registers:>5} {local:>6} {shared:>7} {blocks:>10} "
                      f"{blocks * launch.num_warps:>9}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
