"""Registers, shared memory and occupancy of the quadratic form's kernels and of the LoRA backward's one-read
kernel, compiled ahead of time for a target card, no GPU needed (a script, not a test).

    PYTHONPATH=src python benchmarks/kernel_registers.py --launches 32:4:3:128,32:4:3:64 --key-dims 128,256
    PYTHONPATH=src python benchmarks/kernel_registers.py --dy-launches 64:256:4:3,32:256:4:3 --dy-cols 8192,2048

Each launch (``quadratic_triton.BlockLaunch``: block:warps:stages:columns; ``lora_grad.Launch``: rows:columns:
warps:stages of a tile) is compiled with Triton for the target (default sm_90, Hopper) in bf16, specialised as
Triton's launcher specialises it for the shapes given (``--heads``, ``--tokens``, ``--dy-cols``, ``--rank``):
pointers 16-byte aligned, and each integer argument marked divisible by 16 where its value is. That mark decides
the loads' vector width and whether the loops' loads are pipelined (``cp.async``), so a compile without it holds
other registers than the launched kernel. ``cuobjdump --dump-resource-usage`` (Triton's own, from its NVIDIA
backend) reads the registers a thread and any local memory (spills) off the binary. Occupancy follows from the card's limits:
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
from tnlora.ops.lora_grad import Launch, launch_grid, rank_block
from tnlora.ops.lora_grad_triton import lora_dy_products_kernel
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


def _compile(kernel, pointers: dict[str, str], scalars: dict[str, int], constants: dict[str, object],
             num_warps: int, num_stages: int, target):
    """``kernel`` compiled for ``target`` with these pointer types, integer arguments (their values decide the
    divisibility marks, as at a launch) and constants."""
    signature = {**pointers, **dict.fromkeys(scalars, "i32"), **dict.fromkeys(constants, "constexpr")}
    aligned = [*pointers, *(name for name, value in scalars.items() if value % 16 == 0)]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def rows_kernel(launch: BlockLaunch, width: int, columns_width: int, heads: int, tokens: int, target):
    """The forward / dq kernel for a, b of ``width`` and c of ``columns_width`` (bf16, [1, T, H, ·] contiguous)."""
    pointers = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "decay_ptr": "*fp32", "starts_ptr": "*i32",
                "out_ptr": "*bf16"}  # fmt: skip
    scalars = {"length": tokens, "heads": heads, "stride_at": heads * width, "stride_ah": width,
               "stride_bt": heads * width, "stride_bh": width, "stride_ct": heads * columns_width,
               "stride_ch": columns_width}  # fmt: skip
    constants = {"AB": width, "C": columns_width, "PRECISION": "tf32", "WHILE_LOOP": False, "BT": launch.block,
                 "BS": launch.walk, "BAB": tile_width(width), "BC": output_columns(launch, columns_width)}  # fmt: skip
    return _compile(quadratic_rows_kernel, pointers, scalars, constants, launch.num_warps, launch.num_stages, target)


def dkv_kernel(launch: BlockLaunch, key_dim: int, value_dim: int, heads: int, tokens: int, target):
    """The dk / dv kernel (bf16, [1, T, H, ·] contiguous)."""
    pointers = {**dict.fromkeys(["q_ptr", "k_ptr", "v_ptr", "do_ptr"], "*bf16"), "decay_ptr": "*fp32",
                "starts_ptr": "*i32", "ends_ptr": "*i32", "dk_ptr": "*bf16", "dv_ptr": "*bf16"}  # fmt: skip
    scalars = {"length": tokens, "heads": heads, "stride_qt": heads * key_dim, "stride_qh": key_dim,
               "stride_kt": heads * key_dim, "stride_kh": key_dim, "stride_vt": heads * value_dim,
               "stride_vh": value_dim}  # fmt: skip
    key_tile, value_tile = tile_width(key_dim), tile_width(value_dim)
    splits = dkv_splits(key_tile, value_tile, launch.columns)
    constants = {"K": key_dim, "V": value_dim, "PRECISION": "tf32", "WHILE_LOOP": False, "BT": launch.block,
                 "BS": launch.walk, "BKF": key_tile, "BVF": value_tile, "BKC": key_tile // splits, "BVC": value_tile // splits}  # fmt: skip
    return _compile(quadratic_dkv_kernel, pointers, scalars, constants, launch.num_warps, launch.num_stages, target)


def dy_products_kernel(launch: Launch, rows: int, cols: int, rank: int, processors: int, target):
    """:mod:`tnlora.ops.lora_grad`'s one-read kernel for dy [rows, cols] and a rank-``rank`` adapter (bf16)."""
    pointers = {"dy_ptr": "*bf16", "b_ptr": "*bf16", "hs_ptr": "*bf16", "g_part_ptr": "*fp32", "db_part_ptr": "*fp32"}
    scalars = {"stride_dy": cols, "stride_b": rank, "stride_hs": rank, "T": rows, "N": cols, "R": rank}
    rows_each = launch_grid(rows, cols, processors, launch)[2]
    constants = {"ROWS_PER_PROGRAM": rows_each, "FP64": False, "BLOCK_T": launch.block_t, "BLOCK_N": launch.block_n,
                 "BLOCK_R": rank_block(rank)}  # fmt: skip
    return _compile(lora_dy_products_kernel, pointers, scalars, constants, launch.num_warps, launch.num_stages, target)


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
    parser.add_argument("--heads", type=int, default=16, help="heads of the attention's operands (1B: 16, 7B: 32)")
    parser.add_argument("--tokens", type=int, default=32768, help="tokens of the packed micro-batch")
    parser.add_argument("--dy-launches", default="", help="the one-read kernel's tiles, rows:columns:warps:stages")
    parser.add_argument("--dy-cols", default="8192,5632,2048", help="the projections' output widths (1B)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--processors", type=int, default=132, help="streaming multiprocessors (H100 SXM: 132)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability as one number (90: Hopper)")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    print(f"# triton {triton.__version__}, sm_{args.arch}, bf16, V {args.value_dim}, {args.heads} heads, {args.tokens} tokens, "
          f"rank {args.rank}")
    print(f"{'kernel':<8} {'K/N':>4} {'launch':<11} {'regs':>5} {'local':>6} {'shared':>7} {'blocks/SM':>10} {'warps/SM':>9}")
    shape = (args.heads, args.tokens, target)
    for key_dim in (int(x) for x in args.key_dims.split(",") if x):
        for text in (t for t in args.launches.split(",") if t):
            launch = BlockLaunch(*(int(x) for x in text.split(":")))
            kernels = {
                "forward": rows_kernel(launch, key_dim, args.value_dim, *shape),
                "dq": rows_kernel(launch, args.value_dim, key_dim, *shape),
                "dk/dv": dkv_kernel(launch, key_dim, args.value_dim, *shape),
            }
            for name, compiled in kernels.items():
                _report(name, key_dim, text, compiled, launch.num_warps)
    dy_launches = [t for t in args.dy_launches.split(",") if t]
    for cols in (int(x) for x in args.dy_cols.split(",") if x and dy_launches):
        for text in dy_launches:
            block_t, block_n, warps, stages = (int(x) for x in text.split(":"))
            launch = Launch(block_t, block_n, warps, stages)
            _report("dy-prod", cols, text, dy_products_kernel(launch, args.tokens, cols, args.rank, args.processors,
                                                              target), warps)  # fmt: skip


def _report(name: str, width: int, launch: str, compiled, warps: int) -> None:
    """One table line: registers, spills, shared memory and the blocks and warps an SM holds."""
    registers, local = resource_usage(compiled)
    shared = compiled.metadata.shared
    blocks = blocks_per_sm(registers, shared, warps)
    print(f"{name:<8} {width:>4} {launch:<11} {registers:>5} {local:>6} {shared:>7} {blocks:>10} {blocks * warps:>9}",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
