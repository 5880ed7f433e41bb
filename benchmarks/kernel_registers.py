"""Registers, shared memory and occupancy of the quadratic form's kernels, of the LoRA backward's one-read
kernel and of the decode step's rows kernel, compiled ahead of time for a target card, no GPU needed (a script,
not a test).

    PYTHONPATH=src python benchmarks/kernel_registers.py --launches 32:4:3:128,32:4:3:64 --key-dims 128,256
    PYTHONPATH=src python benchmarks/kernel_registers.py --dy-launches 64:256:4:3,32:256:4:3 --dy-cols 8192,2048
    PYTHONPATH=src python benchmarks/kernel_registers.py --launches "" --decode-rows 7B,1B --decode-tma

``--decode-rows``: each projection of the batch-32 decode step (:mod:`tnlora.infer.decode_graph`) at the model's
shapes, with its launch of ``gemv.ROWS_TUNED`` and the options the step calls it with (norm, gate, GLU, residual,
sums of squares read and written, K split), and with ``--decode-tma`` the same launch with the weight tiles
(and x where it can) read by the copy engine; besides the resources, the asynchronous copy instructions in the
PTX (``cp.async``, issued by every thread; ``cp.async.bulk.tensor``, the copy engine's), which show that the
loop's loads are pipelined in either form.

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
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tnlora.model.configuration import config_from_preset
from tnlora.ops.gemv import ROWS_TUNED, gemv_config, k_parts, row_block
from tnlora.ops.gemv_triton import rows_kernel as decode_rows_kernel
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
from tnlora.ops.recurrent_triton import square_parts

REGISTERS_PER_SM = 65_536
SHARED_PER_SM = 228 * 1024
SHARED_RESERVED_PER_BLOCK = 1024
WARPS_PER_SM = 64


def _compile(kernel, pointers: dict[str, str], scalars: dict[str, int], constants: dict[str, object],
             num_warps: int, num_stages: int, target, descriptors: dict[str, str] | None = None,
             floats: tuple[str, ...] = (), options: dict[str, object] | None = None):
    """``kernel`` compiled for ``target`` with these pointer types, integer arguments (their values decide the
    divisibility marks, as at a launch), tensor descriptors (their types), fp32 arguments and constants."""
    signature = {**pointers, **(descriptors or {}), **dict.fromkeys(scalars, "i32"), **dict.fromkeys(floats, "fp32"),
                 **dict.fromkeys(constants, "constexpr")}  # fmt: skip
    signature = {name: signature[name] for name in kernel.arg_names if name in signature}
    aligned = [*pointers, *(name for name, value in scalars.items() if value % 16 == 0)]
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=target,
                          options={"num_warps": num_warps, "num_stages": num_stages, **(options or {})})


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


def decode_projections(preset: str, rows: int) -> list[tuple[str, int, int, dict[str, bool], int]]:
    """The batch-``rows`` decode step's projections of ``preset`` as :mod:`tnlora.infer.decode_graph` calls them:
    (name, N, K, the kernel's options, partial sums of squares its norm reads). qkvu's come from the previous
    layer's l3 (a sum a tile of it), out_proj's from the recurrence, the GLU's from out_proj's tiles."""
    config = config_from_preset(preset)
    d, hidden, inner, heads = config.decoder_embed_dim, config.hidden_dim, config.glu_dim, config.decoder_attention_heads

    def tiles(n: int, k: int, glu: bool = False) -> int:
        return -(-n // ROWS_TUNED[n, k, glu].block_n)

    off = dict.fromkeys(["NORM", "GATE", "GLU", "RESIDUAL", "SQUARES_IN", "SQUARES_OUT"], False)
    normed = {**off, "NORM": True, "SQUARES_IN": True}
    return [
        ("qkvu", 4 * hidden, d, normed, tiles(d, inner)),
        ("out_proj", d, hidden, {**normed, "GATE": True, "RESIDUAL": True, "SQUARES_OUT": True},
         square_parts(heads, hidden // heads)),
        ("l1/l2", inner, d, {**normed, "GLU": True}, tiles(d, d)),
        ("l3", d, inner, {**off, "RESIDUAL": True, "SQUARES_OUT": True}, 1),
        ("lm_head", config.vocab_size, d, normed, tiles(d, inner)),
    ]


def decode_rows(n: int, k: int, flags: dict[str, bool], parts: int, rows: int, tma: bool, target):
    """The rows kernel (bf16) for y [rows, n] = x Wᵀ with W [n, k], launched as :func:`tnlora.ops.gemv.gemv`
    launches it at ``rows`` rows on an sm_90 card (:func:`~tnlora.ops.gemv.gemv_config`'s launch, as a dependent
    launch); with ``tma`` the weight tiles by the copy engine (x too: its rows of k bf16 values lie on 16 bytes)
    and no L2 prefetch (the launcher drops it for TMA). Returns (the compiled kernel, the launch)."""
    launch = gemv_config(n, k, glu=flags["GLU"], rows=rows)
    block_m = row_block(rows)
    k_part, splits = k_parts(k, launch.block_k, launch.split)  # the step's norms read their squares: split, swap as given
    sums = "*fp32"  # the sums of squares and the split parts of bf16 rows (gemv.squares_dtype)
    pointers = {"residual_ptr": "*bf16", "y_ptr": "*bf16", "squares_in_ptr": sums if flags["SQUARES_IN"] else "*bf16",
                "squares_out_ptr": sums if flags["SQUARES_OUT"] else "*bf16",
                "part_ptr": sums if splits > 1 else "*bf16", "count_ptr": "*i32" if splits > 1 else "*bf16"}  # fmt: skip
    inputs = {"x_ptr": f"tensordesc<bf16[{block_m}, {launch.block_k}]>", "gate_ptr": f"tensordesc<bf16[{block_m}, {launch.block_k}]>"}
    weights = {"w_ptr": f"tensordesc<bf16[{launch.block_n}, {launch.block_k}]>",
               "w2_ptr": f"tensordesc<bf16[{launch.block_n}, {launch.block_k}]>"}  # fmt: skip
    if tma:
        descriptors = {**inputs, **weights}
    else:
        descriptors = {}
        pointers.update(dict.fromkeys([*inputs, *weights], "*bf16"))
    scalars = {"M": rows, "N": n, "stride_x": k, "stride_gate": k, "stride_residual": n, "stride_w": k, "stride_w2": k,
               "P_IN": parts}  # fmt: skip
    # Triton's launcher makes an integer argument equal to 1 a constant; so does this compile.
    constants: dict[str, object] = {name: 1 for name, value in scalars.items() if value == 1}
    scalars = {name: value for name, value in scalars.items() if value != 1}
    constants.update(K=k, **flags, EVEN_K=k % k_part == 0, DOT=True, PRECISION="ieee", PDL=True, EARLY=launch.early,
                     SWAP=launch.swap, SPLIT=splits, K_PART=k_part, BLOCK_M=block_m, BLOCK_N=launch.block_n,
                     BLOCK_K=launch.block_k, BLOCK_P=max(2, 1 << (parts - 1).bit_length()), TMA=tma, TMA_X=tma,
                     PREFETCH=0 if tma else launch.prefetch)  # fmt: skip
    compiled = _compile(decode_rows_kernel, pointers, scalars, constants, launch.warps, launch.stages, target,
                        descriptors=descriptors, floats=("eps",), options={"launch_pdl": True})  # fmt: skip
    return compiled, launch


def async_copies(compiled) -> tuple[int, int]:
    """(``cp.async`` copies, ``cp.async.bulk.tensor`` copies) in a compiled kernel's PTX."""
    ptx = compiled.asm["ptx"]
    return len(re.findall(r"cp\.async\.c[ag]\.", ptx)), len(re.findall(r"cp\.async\.bulk\.tensor", ptx))


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
    parser.add_argument("--decode-rows", default="", help="presets whose batch-32 decode projections to compile, e.g. 7B,1B")
    parser.add_argument("--decode-batch", type=int, default=32, help="rows of the decode step")
    parser.add_argument("--decode-tma", action="store_true", help="each decode launch also with its tiles by TMA")
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
    presets = [p for p in args.decode_rows.split(",") if p]
    if presets:
        print(f"\n# the rows kernel at {args.decode_batch} rows (ROWS_TUNED's launches: weight rows, columns a step, "
              "warps, stages); copies: cp.async / cp.async.bulk.tensor in the PTX")
        print(f"{'model':<6} {'projection':<9} {'launch':<14} {'form':<8} {'regs':>5} {'local':>6} {'shared':>7} "
              f"{'blocks/SM':>10} {'copies':>8}")  # fmt: skip
    for preset in presets:
        for name, n, k, flags, parts in decode_projections(preset, args.decode_batch):
            for tma in (False, True) if args.decode_tma else (False,):
                compiled, launch = decode_rows(n, k, flags, parts, args.decode_batch, tma, target)
                registers, local = resource_usage(compiled)
                shared = compiled.metadata.shared
                blocks = blocks_per_sm(registers, shared, launch.warps)
                text = f"{launch.block_n}:{launch.block_k}:{launch.warps}:{launch.stages}"
                copies = "/".join(str(c) for c in async_copies(compiled))
                print(f"{preset:<6} {name:<9} {text:<14} {'TMA' if tma else 'pointers':<8} {registers:>5} {local:>6} "
                      f"{shared:>7} {blocks:>10} {copies:>8}", flush=True)  # fmt: skip


def _report(name: str, width: int, launch: str, compiled, warps: int) -> None:
    """One table line: registers, spills, shared memory and the blocks and warps an SM holds."""
    registers, local = resource_usage(compiled)
    shared = compiled.metadata.shared
    blocks = blocks_per_sm(registers, shared, warps)
    print(f"{name:<8} {width:>4} {launch:<11} {registers:>5} {local:>6} {shared:>7} {blocks:>10} {blocks * warps:>9}",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
