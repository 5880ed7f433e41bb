"""`tnlora train` end to end, as a user runs it: a recipe YAML, a checkpoint directory, a data file, timed.

Usage: python benchmarks/e2e_train.py --recipe examples/huanhuan_7b_lora_fast.yaml --model_files DIR --data FILE
       [--work /tmp/e2e] [--shrink] [--keep_checkpoint] [--profile_host N] [--timeline]
       [-- extra tnlora train arguments]

No weights can be downloaded, so the checkpoint is written first: the official config.json of ``--model_files``
(with its tokenizer.model, tokenizer_config.json, special_tokens_map.json, generation_config.json) and random
weights in its layout (safetensors, bf16), built on the GPU when there is one. ``--shrink`` makes it 2 layers of
width 64 (the real vocabulary and tokenizer) for a CPU smoke run. ``--data`` (e.g. huanhuan.json) is
registered as the dataset named in the recipe. Then ``tnlora train RECIPE --model_name_or_path CKPT
--dataset_dir DATA --output_dir OUT --report_to none [extra]`` runs in this process (``--gpu_memory_gib``
caps its GPU memory, standing in for a smaller card); the last line gives the wall time of the whole command
(loading, tokenising, compiling, evaluation, saving included) and its peak GPU memory. ``--profile_host N``
runs the command under cProfile and prints its N functions of most cumulative time, then N by own time: where
the host's time goes. cProfile slows pure-Python code several times over, so its seconds rank suspects and the
run without it gives the figure (matplotlib's first font scan: 10.7 s under it, while saving and plotting
together took ~6.5 s without it). ``--timeline`` prefixes every line the command prints (its messages, the
progress bar's updates) with the seconds since it started: where the wall time goes, at no cost to the run.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shutil
import sys
import time
from pathlib import Path
from typing import TextIO

import torch

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class Stamped:
    """A text stream that writes each line (ended by a newline or a carriage return, as progress bars draw) to
    ``stream`` behind the seconds since ``t0``."""

    def __init__(self, stream: TextIO, t0: float):
        self.stream, self.t0, self.at_start = stream, t0, True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self.at_start:
                self.stream.write(f"[{time.perf_counter() - self.t0:7.1f} s] ")
            self.stream.write(piece)
            self.at_start = piece.endswith(("\n", "\r"))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):  # fileno, encoding, ...: the stream's own
        return getattr(self.stream, name)


def write_checkpoint(model_files: Path, out: Path, shrink: bool) -> Path:
    """A random-weight checkpoint directory in the official layout, from ``model_files``' config and tokenizer."""
    from tnlora.model import TransnormerConfig, TransnormerForCausalLM

    config = TransnormerConfig.from_pretrained(str(model_files))
    if shrink:
        config.decoder_layers, config.decoder_embed_dim, config.hidden_dim = 2, 64, 64
        config.decoder_attention_heads, config.glu_dim = 2, 128
        config.linear_use_lrpe_list = [1, 0]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = TransnormerForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (model_files / name).is_file():
            shutil.copy(model_files / name, out / name)
    del model
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--model_files", required=True, help="dir with the official config.json and tokenizer files")
    parser.add_argument("--data", required=True, help="the recipe's dataset file (e.g. huanhuan.json)")
    parser.add_argument("--work", default="/tmp/e2e")
    parser.add_argument("--shrink", action="store_true", help="2 layers of width 64 (a CPU smoke run)")
    parser.add_argument("--gpu_memory_gib", type=float, default=0.0,
                        help="cap this process's GPU memory for the run (as tnlora bench train --gpu_memory_gib)")
    parser.add_argument("--keep_checkpoint", action="store_true", help="reuse the checkpoint of an earlier run in --work")
    parser.add_argument("--profile_host", type=int, default=0, metavar="N",
                        help="run under cProfile; print the N functions of most cumulative and most own time")
    parser.add_argument("--timeline", action="store_true",
                        help="prefix each line the command prints with the seconds since it started")
    opts, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    import yaml

    dataset = yaml.safe_load(Path(opts.recipe).read_text())["dataset"]
    work = Path(opts.work)
    ckpt = work / "ckpt"
    for path in (work / "data", work / "out") if opts.keep_checkpoint and ckpt.is_dir() else (work,):
        shutil.rmtree(path, ignore_errors=True)
    data = work / "data"
    data.mkdir(parents=True)
    shutil.copy(opts.data, data / Path(opts.data).name)
    (data / "dataset_info.json").write_text(json.dumps({dataset: {"file_name": Path(opts.data).name}}))
    if not (opts.keep_checkpoint and ckpt.is_dir()):
        t0 = time.perf_counter()
        write_checkpoint(Path(opts.model_files), ckpt, opts.shrink)
        print(f"checkpoint written in {time.perf_counter() - t0:.1f} s: {ckpt}", flush=True)
    command = ["train", opts.recipe, "--model_name_or_path", str(ckpt), "--dataset_dir", str(data),
               "--output_dir", str(work / "out"), "--report_to", "none", *extra]
    print("$ tnlora " + " ".join(command), flush=True)
    cap = ""
    if opts.gpu_memory_gib:
        from tnlora.bench.common import cap_gpu_memory

        cap = cap_gpu_memory(opts.gpu_memory_gib)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    from tnlora.cli import main as tnlora_main

    profiler = cProfile.Profile() if opts.profile_host else None
    t0 = time.perf_counter()
    streams = sys.stdout, sys.stderr
    if opts.timeline:
        sys.stdout, sys.stderr = Stamped(sys.stdout, t0), Stamped(sys.stderr, t0)
    if profiler is not None:
        profiler.enable()
    try:
        code = tnlora_main(command)  # in this process, so the memory cap and the peak apply to it
    finally:
        sys.stdout, sys.stderr = streams
    if profiler is not None:
        profiler.disable()
        stats = pstats.Stats(profiler).strip_dirs()
        stats.sort_stats("cumulative").print_stats(opts.profile_host)
        stats.sort_stats("tottime").print_stats(opts.profile_host)
    peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if torch.cuda.is_available() else ""
    print(f"tnlora train: exit {code}, {time.perf_counter() - t0:.1f} s wall (the whole command){peak}{cap}",
          flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
