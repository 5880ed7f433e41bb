"""The GEMV decode step's launches chosen inside the step: per projection, the launch that makes the whole
captured step fastest (batch 1: ``TUNED``; ``--batch`` above 1: the rows kernel's ``ROWS_TUNED``).

``benchmarks/gemv.py --sweep`` times each projection's kernel alone; inside the step, with programmatic
dependent launches overlapping each kernel with the one before, the fastest launch alone need not be the
fastest there (1B: the sweep's launches ran the step in 0.96 ms, the one-rule launches in 0.88; RESULTS.md,
"The GEMV step"). This takes a random-weight model, captures its batch-1 GEMV step as ``tnlora chat`` does
(``DecodeStepRunner``: CUDA graph, dependent launches where supported) and, one projection at a time, tries
each of CANDIDATES for its shape with the others fixed, keeping the fastest (one pass of coordinate descent
from ``tnlora.ops.gemv.TUNED``; at several rows ROW_CANDIDATES from ``ROWS_TUNED`` or the default launch).
Each try recaptures the step and times REPLAYS replays, median of ROUNDS. First, for every model, the step
with the launches as they are, their dependents launched after the loop and early (``GemvConfig.early``).
Prints every try and the table's entries; nothing in the tree changes.

    python3 benchmarks/gemv_step.py --models 1B,7B --descend 1B     # on a GPU
    python3 benchmarks/gemv_step.py --models 1B,7B --batch 32
    python3 benchmarks/gemv_step.py --models 7B --descend 7B --batch 32 --splits 2,3,4   # split launches too
    python3 benchmarks/gemv_step.py --models 7B --descend 7B --batch 32 --splits 2,4 --split_only
    python3 benchmarks/gemv_step.py --models 1B,7B --descend none --batch 32 --tma   # the launches of now by TMA
    python3 benchmarks/gemv_step.py --models 1B,7B --descend none --batch 32 --prefetch 1,2   # weights asked into L2
    python3 benchmarks/gemv_step.py --descend 1B,7B --batch 16 --prefetch 0,1,2 --prefetch_only --compile_workers 0
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import multiprocessing
import statistics
import sys
from collections.abc import Callable, Iterator

import torch

from tnlora.bench.common import cuda_seconds, environment_line, random_model
from tnlora.infer.decode_graph import DecodeStepRunner
from tnlora.ops import gemv as gemv_ops
from tnlora.ops.gemv import GemvConfig, gemv_config
from tnlora.ops.recurrent_triton import square_parts

# (rows a program, columns a step, warps, stages, row sum, early): the region where the sweep's winners lie,
# 2,048 columns a step (a 1B program's whole weight row read before its wait), and the dependents launched
# early or after the loop.
CANDIDATES = [GemvConfig(bn, bk, 4, stages, False, early) for bn in (2, 4, 8) for bk in (1024, 2048)
              for stages in (1, 3) for early in (False, True)]
# Several rows (the tensor cores' dot needs 16 weight rows a program at least): 16 to 128 weight rows a
# program (128 programs for a 2,048-row weight at 16; x's tile is read by every program, as large as the
# weight's at 32), 128 or 256 columns a step, 2 or 4 pipeline stages; from 64 weight rows also the products
# taken as W xᵀ (``swap``: the weight's rows on the MMA's wide side); at 128 weight rows also 8 warps (the two
# accumulators of a GLU program hold 2 × 128 × 32 fp32 values).
ROW_CANDIDATES = [GemvConfig(bn, bk, warps, stages, False, True, swap) for bn in (16, 32, 64, 128)
                  for bk in (128, 256) for warps in (4, 8) for stages in (2, 4) for swap in (False, True)
                  if (bn >= 64 or not swap) and (bn == 128 or warps == 4)]
REPLAYS = 50


def split_candidates(splits: list[int]) -> list[GemvConfig]:
    """ROW_CANDIDATES of 64 and 128 weight rows a program and 4 stages with K split into each of ``splits``
    parts (``GemvConfig.split``): wide tiles (x read by fewer programs) in as many programs as narrow ones."""
    return [config._replace(split=split) for split in splits for config in ROW_CANDIDATES
            if config.block_n >= 64 and config.stages == 4]
ROUNDS = 5


def search_candidates(
    batch: int, splits: list[int] = (), split_only: bool = False, tma: bool = False, prefetch: list[int] = ()
) -> list[GemvConfig]:
    """The launches a search tries: CANDIDATES at one row; at several ROW_CANDIDATES (none with ``split_only``)
    and the split launches of ``splits``, each also with its tiles through tensor descriptors with ``tma`` and
    with its next column steps asked into L2 by each count of ``prefetch``."""
    if batch == 1:
        return CANDIDATES
    candidates = ([] if split_only else ROW_CANDIDATES) + split_candidates(list(splits))
    if tma:
        candidates += [config._replace(tma=True) for config in candidates]
    candidates += [config._replace(prefetch=steps) for steps in prefetch for config in candidates if not config.tma]
    return candidates


def prefetch_variants(launch: GemvConfig, prefetch: list[int]) -> list[GemvConfig]:
    """``launch`` asking for each count of ``prefetch`` column steps in L2 (``--prefetch_only``'s tries)."""
    return [launch._replace(prefetch=steps) for steps in prefetch]


def searched_shapes(shapes: dict[str, tuple[int, int, bool]], projections: list[str] | None) -> dict:
    """``shapes`` (:func:`step_shapes`) whose names start with one of ``projections`` (all without)."""
    return {name: key for name, key in shapes.items() if not projections or name.split()[0] in projections}


def step_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int, bool]]:
    """(N, K, GLU) of each projection kernel of the GEMV step, by name."""
    layer = model.model.layers[0]
    mixer, glu = layer.token_mixer, layer.channel_mixer
    return {
        "qkvu": (*mixer.qkvu_proj.weight.shape, False),
        "out_proj": (*mixer.out_proj.weight.shape, False),
        "l1 / l2 (GLU)": (*glu.l1.weight.shape, True),
        "l3": (*glu.l3.weight.shape, False),
        "lm_head": (*model.lm_head.weight.shape, False),
    }


def compile_share(preset: str, batch: int, launches: list[tuple[str, GemvConfig]]) -> list[tuple[str, GemvConfig]]:
    """In a worker process: each (projection name, launch) of ``launches`` called once as the step calls it
    (same dtypes, flags, strides and dependent launches), so that its compiled kernel lands in Triton's cache
    on disk and the descent later loads it instead of compiling. Returns the launches that do not fit the card
    (more shared memory than it has)."""
    from triton.runtime.errors import OutOfResources

    from tnlora.model import config_from_preset

    config = config_from_preset(preset)
    dim, width, vocab = config.decoder_embed_dim, config.glu_dim, config.vocab_size
    rows = (-1,) if batch == 1 else (batch, -1)

    def zeros(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device="cuda")

    hidden = zeros(batch, dim).reshape(rows)
    o = zeros(batch, dim).reshape(rows)
    qkvu = zeros(batch, 4 * dim)
    product = zeros(batch, width).reshape(rows)
    # Several rows: the embedding and the residual projections write their rows' sums of squares, which the
    # normed projection after each reads; the kernel is compiled per block of those partial sums (one a block
    # of the embedding's kernel for the first layer's qkvu, one a program of the projection before: any
    # candidate's count).
    squares = [None] if batch == 1 else [zeros(-(-dim // n), batch, dtype=torch.float32) for n in
                                         sorted({gemv_ops.EMBED_BLOCK} | {c.block_n for c in ROW_CANDIDATES})]
    residual = {} if batch == 1 else {"emit_squares": True}
    # out_proj's norm of o reads the recurrence's partial sums at several rows: one a head and V block.
    o_parts = square_parts(config.decoder_attention_heads, config.head_dim)
    o_squares = {} if batch == 1 else {"norm_squares": zeros(o_parts, batch, dtype=torch.float32)}

    def normed(weight: torch.Tensor, c: GemvConfig, **options: object) -> None:
        for parts in squares:
            gemv_ops.gemv(hidden, weight, norm_eps=1e-6, norm_squares=parts, config=c, pdl=True, **options)

    calls = {
        "qkvu": lambda c: normed(zeros(4 * dim, dim), c),
        "out_proj": lambda c: gemv_ops.gemv(o, zeros(dim, dim), norm_eps=1e-6, gate=qkvu[:, 3 * dim:].reshape(rows),
                                            residual=hidden, config=c, pdl=True, **residual, **o_squares),
        "l1 / l2 (GLU)": lambda c: normed(zeros(width, dim), c, weight2=zeros(width, dim)),
        "l3": lambda c: gemv_ops.gemv(product, zeros(dim, width), residual=hidden, config=c, pdl=True, **residual),
        "lm_head": lambda c: normed(zeros(vocab, dim), c),
    }
    unfit = []
    for name, launch in launches:
        try:
            calls[name](launch)
        except OutOfResources:
            unfit.append((name, launch))
    torch.cuda.synchronize()
    return unfit


def precompile(
    preset: str, batch: int, shapes: dict[str, tuple[int, int, bool]], workers: int, candidates: list[GemvConfig]
) -> set[tuple[tuple[int, int, bool], GemvConfig]]:
    """Every candidate launch of every projection compiled by ``workers`` processes at once (Triton compiles on
    the CPU, one kernel at a time per process): the descent's tries then only load them. Returns the (shape,
    launch) pairs that do not fit the card."""
    launches = [(name, launch) for name, key in shapes.items()
                for launch in dict.fromkeys([gemv_config(*key, rows=batch), *candidates])]
    context = multiprocessing.get_context("spawn")  # CUDA in the workers
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        unfit = [pair for share in pool.map(compile_share, [preset] * workers, [batch] * workers,
                                            [launches[i::workers] for i in range(workers)]) for pair in share]
    print(f"{preset} batch {batch}: {len(launches)} launches compiled by {workers} processes; too large for the "
          f"card: {', '.join(f'{name} {tuple(launch)}' for name, launch in unfit) or 'none'}", flush=True)
    return {(shapes[name], launch) for name, launch in unfit}


def step_ms(model: torch.nn.Module, pdl: bool, batch: int = 1, replays: int = REPLAYS) -> float:
    """ms of one captured GEMV step of ``batch`` rows (median of ROUNDS × ``replays`` replays), with the launches
    ``gemv_config`` returns now."""
    runner = DecodeStepRunner(model, batch, torch.device("cuda"), capture=True, gemv=True, pdl=pdl)
    if not runner.gemv:
        raise SystemExit(f"gemv_step.py: this model's batch-{batch} step does not take the GEMV path")
    return replayed_ms(runner, model, replays)


def layer_forwards_ms(model: torch.nn.Module, batch: int, replays: int = REPLAYS) -> float:
    """ms of one captured step of ``batch`` rows with the layer forwards on cuBLASLt (what the batches that do
    not run fused projections run: the GLU's projections side by side), timed as :func:`step_ms` times the GEMV
    step."""
    runner = DecodeStepRunner(model, batch, torch.device("cuda"), capture=True, branches=True)
    return replayed_ms(runner, model, replays)


def replayed_ms(runner: DecodeStepRunner, model: torch.nn.Module, replays: int) -> float:
    """ms of one replay of ``runner``'s step, captured by its first run (median of ROUNDS × ``replays``)."""
    runner.run(model)  # captures

    def replay() -> None:
        for _ in range(replays):
            runner.run(model)

    return statistics.median(cuda_seconds(replay, ROUNDS)) / replays * 1e3


def launch_table(batch: int) -> dict[tuple[int, int, bool], GemvConfig]:
    """The table of launches ``gemv`` reads at ``batch`` rows (edited in place while a step is measured)."""
    return gemv_ops.TUNED if batch == 1 else gemv_ops.ROWS_TUNED


@contextlib.contextmanager
def table_kept(batch: int) -> Iterator[dict[tuple[int, int, bool], GemvConfig]]:
    """The launch table of ``batch`` rows (:func:`launch_table`), to edit inside; as it was afterwards."""
    table = launch_table(batch)
    saved = dict(table)
    try:
        yield table
    finally:
        table.clear()
        table.update(saved)


@contextlib.contextmanager
def prefetch_at_every_batch() -> Iterator[None]:
    """Inside, ``gemv_config`` keeps a launch's prefetch count at any number of rows (``ROWS_TUNED``'s counts apply
    from ``PREFETCH_MIN_ROWS`` rows only), so that a search below that measures the counts it tries."""
    saved = gemv_ops.PREFETCH_MIN_ROWS
    gemv_ops.PREFETCH_MIN_ROWS = 2
    try:
        yield
    finally:
        gemv_ops.PREFETCH_MIN_ROWS = saved


def coordinate_descent(
    shapes: dict[str, tuple[int, int, bool]],
    measure: Callable[[], float],
    log: Callable[[str], None] = print,
    batch: int = 1,
    unfit: set[tuple[tuple[int, int, bool], GemvConfig]] = frozenset(),
    candidates: list[GemvConfig] | Callable[[GemvConfig], list[GemvConfig]] | None = None,
) -> tuple[float, float, dict[tuple[int, int, bool], GemvConfig]]:
    """One pass over ``shapes``: for each, every candidate launch (set in the table of ``batch`` rows while
    ``measure()`` runs) with the others fixed, keeping the fastest; ``unfit`` (shape, launch) pairs are left
    out; ``candidates``: the launches tried (default CANDIDATES at one row, else ROW_CANDIDATES), or a function of
    a projection's launch of now giving them. Returns the first and last measure and the launches chosen; the
    table is as it was afterwards."""
    if candidates is None:
        candidates = CANDIDATES if batch == 1 else ROW_CANDIDATES
    chosen = {key: gemv_config(*key, rows=batch) for key in shapes.values()}
    with table_kept(batch) as table:
        table.update(chosen)
        start = measure()
        for name, key in shapes.items():
            tries = {}
            tried = candidates(chosen[key]) if callable(candidates) else candidates
            for config in dict.fromkeys([chosen[key], *tried]):
                if (key, config) in unfit:
                    continue
                table[key] = config
                tries[config] = measure()
            best = min(tries, key=tries.get)
            table[key] = chosen[key] = best
            cells = ", ".join(f"{tuple(c)} {t:.3f}" for c, t in sorted(tries.items(), key=lambda item: item[1]))
            log(f"| {name} {key[:2]} | best {tuple(best)} {tries[best]:.3f} | {cells} |")
        end = measure()
    return start, end, chosen


def launches_of_now(
    shapes: dict[str, tuple[int, int, bool]], measure: Callable[[], float], batch: int, changes: dict[str, dict]
) -> dict[str, float]:
    """The step with every projection's launch as ``gemv_config`` gives it, changed by each of ``changes``
    (label: the GemvConfig fields set, e.g. ``{"early": True}``): ms a step by label. The table is as it was
    afterwards."""
    now = {key: gemv_config(*key, rows=batch) for key in shapes.values()}
    times = {}
    with table_kept(batch) as table:
        for label, change in changes.items():
            table.update({key: launch._replace(**change) for key, launch in now.items()})
            times[label] = measure()
    return times


def tune(
    preset: str, pdl: bool, descend: bool, batch: int = 1, workers: int = 0, replays: int = REPLAYS,
    splits: list[int] = (), split_only: bool = False, projections: list[str] | None = None, tma: bool = False,
    prefetch: list[int] = (), prefetch_only: bool = False,
) -> None:
    """For ``preset`` at ``batch`` rows: the step with the launches of now, early and late; with ``descend``
    one pass over the step's projections, printing the tries (ms a step) and the entries (``workers``
    processes compile the candidates first; ``splits``: the split launches of :func:`split_candidates` tried
    too, at several rows; ``split_only``: those and the launch of now only; ``projections``: the first words
    of the names of :func:`step_shapes` searched, default all; ``tma``, ``prefetch``: every launch tried also
    with ``GemvConfig.tma`` / each ``GemvConfig.prefetch`` of ``prefetch``; ``prefetch_only``: each projection's
    launch of now tried only with each of those)."""
    with prefetch_at_every_batch() if prefetch else contextlib.nullcontext():
        model = random_model(preset, "auto", "cuda").eval()
        shapes = searched_shapes(step_shapes(model), projections)
        if prefetch_only:  # each projection's own launch with each count: nothing to compile ahead
            candidates, unfit = functools.partial(prefetch_variants, prefetch=prefetch), set()
        else:
            candidates = search_candidates(batch, splits, split_only, tma, prefetch)
            unfit = precompile(preset, batch, shapes, workers, candidates) if descend and workers else set()
        measure = functools.partial(step_ms, model, pdl, batch, replays)
        name = f"{preset} batch {batch}"
        with torch.inference_mode():
            if batch > 1:  # what the rows kernel's step has to beat
                print(f"| {preset} batch {batch} | layer forwards on cuBLASLt: "
                      f"{layer_forwards_ms(model, batch, replays):.3f} ms |", flush=True)
            changes = {"late": {"early": False}, "early": {"early": True}} | ({"tma": {"tma": True}} if tma else {})
            if prefetch:  # without, each count, without again (the spread between the two)
                changes |= {"prefetch 0": {"prefetch": 0}} | {f"prefetch {n}": {"prefetch": n} for n in prefetch}
                changes |= {"prefetch 0 again": {"prefetch": 0}}
            times = launches_of_now(shapes, measure, batch, changes)
            print(f"| {name} | launches of now: dependents after the loop {times['late']:.3f} ms, "
                  f"early {times['early']:.3f} ms |", flush=True)
            if tma:  # every launch of now with its weight tiles through tensor descriptors
                print(f"| {name} | launches of now with tma: {times['tma']:.3f} ms |", flush=True)
            if prefetch:  # every launch of now asking for its next column steps in L2 before its wait, and without
                cells = ", ".join(f"{n} steps {times[f'prefetch {n}']:.3f} ms" for n in prefetch)
                print(f"| {name} | launches of now without prefetch {times['prefetch 0']:.3f} ms; with {cells}; "
                      f"without again {times['prefetch 0 again']:.3f} ms |", flush=True)
            if not descend:
                return
            start, end, chosen = coordinate_descent(shapes, measure, lambda line: print(f"| {name} {line}", flush=True),
                                                    batch, unfit, candidates)
        print(f"{name}: {start:.3f} → {end:.3f} ms a step; {'TUNED' if batch == 1 else 'ROWS_TUNED'} entries:")
        for label, key in shapes.items():
            print(f"    {key}: GemvConfig{tuple(chosen[key])},  # {preset} {label}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1B,7B")
    parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                        help="dependent launches, as the step's default (where the card has them)")
    parser.add_argument("--descend", default="1B,7B",
                        help="the presets whose launches are searched (the others: early against late only)")
    parser.add_argument("--batch", type=int, default=1, help="rows of the step (above 1: the rows kernel's launches)")
    parser.add_argument("--compile_workers", type=int, default=8,
                        help="processes that compile the candidate launches before the search (0: none)")
    parser.add_argument("--replays", type=int, default=REPLAYS, help="replays a measure, median of 5")
    parser.add_argument("--splits", default="", help="at several rows, also the launches with K split into these "
                        "parts, e.g. 2,3,4 (split_candidates)")
    parser.add_argument("--split_only", action="store_true",
                        help="with --splits: try only the split launches against the launch of now (a shorter search)")
    parser.add_argument("--projections", default="", help="the projections searched, e.g. l3,lm_head (first "
                        "words of the names: qkvu, out_proj, l1, l3, lm_head; default all)")
    parser.add_argument("--tma", action="store_true", help="at several rows, every launch tried also with its "
                        "weight tiles through tensor descriptors (GemvConfig.tma)")
    parser.add_argument("--prefetch", default="", help="at several rows, every launch tried also with its next "
                        "column steps asked into L2 before its wait, these many (GemvConfig.prefetch), e.g. 0,1,2; "
                        "the launches keep their counts at any batch meanwhile (PREFETCH_MIN_ROWS set aside)")
    parser.add_argument("--prefetch_only", action="store_true",
                        help="with --prefetch: try only each projection's launch of now with those counts")
    args = parser.parse_args()
    projections = [name for name in args.projections.split(",") if name]
    known = {"qkvu", "out_proj", "l1", "l3", "lm_head"}
    if unknown := sorted(set(projections) - known):
        parser.error(f"--projections: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    splits = [int(part) for part in args.splits.split(",") if part]
    prefetch = [int(part) for part in args.prefetch.split(",") if part]
    if args.prefetch_only and not prefetch:
        parser.error("--prefetch_only needs --prefetch")
    if args.split_only and not splits:
        parser.error("--split_only needs --splits")
    if not torch.cuda.is_available():
        print("gemv_step.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(environment_line(), flush=True)
    for preset in args.models.split(","):
        tune(preset, args.pdl, preset in args.descend.split(","), args.batch, args.compile_workers,
             args.replays, splits, args.split_only, projections, args.tma,
             prefetch, args.prefetch_only)
        torch.cuda.empty_cache()  # the model and its graphs are gone: the next preset gets the memory
    return 0


if __name__ == "__main__":
    sys.exit(main())
