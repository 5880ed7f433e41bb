"""The ``tnlora`` command: one small function per verb, argument parsing only.

Every ``TnloraError`` becomes ``error: <message>`` on one line of stderr and exit status 2; Ctrl-C exits with
status 130. Heavy imports (torch, transformers, peft) happen inside the verbs, so ``tnlora --help``, every
verb's ``--help`` and ``--version`` never load them.

Like LLaMA-Factory's ``chat`` and ``export``, ``chat``, ``generate``, ``eval`` and ``merge`` (alias ``export``)
take a run YAML as their first argument (``tnlora chat CONFIG.yaml``); every verb also takes LLaMA-Factory's
``key=value`` overrides beside ``--key value``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from tnlora import __version__
from tnlora.choices import LIGHTNING_IMPLS
from tnlora.errors import TnloraError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# Verbs that take a run YAML as their first argument (export is LLaMA-Factory's name for merge).
YAML_VERBS = ("chat", "generate", "eval", "merge", "export")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like the rest of tnlora's refusals."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USER_ERROR)


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# ---------------------------------------------------------------------------------------------------------------
# Shared option groups


def _add_config_arg(p: argparse.ArgumentParser, keys: str) -> None:
    p.add_argument(
        "config", nargs="?", metavar="CONFIG.yaml",
        help=f"a run YAML (LLaMA-Factory's keys: {keys}, or this verb's option names); options given after it win",
    )  # fmt: skip


def _add_model_args(p: argparse.ArgumentParser, adapter_required: bool = False, merge: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", help="base checkpoint dir, Hub id or preset (default: the base model the adapter's run recorded)"
    )
    g.add_argument("--adapter", required=adapter_required, help="a tnlora training output dir (LoRA adapter)")
    g.add_argument("--template", help="chat template (default: the one the adapter was trained with)")
    g.add_argument("--system", help="system prompt (default: the one the adapter was trained with)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    g.add_argument(
        "--attention_impl", choices=LIGHTNING_IMPLS, default=None,
        help="the prompt's lightning attention (default auto: on a GPU one Triton launch a layer)",
    )
    g.add_argument(
        "--merge_adapter", type=_bool, nargs="?", const=True, default=None if merge else False,
        help="fold the adapter into the base weights for decoding, as `tnlora merge` exports them (default "
        + ("true, false on a quantized base" if merge else "false")
        + "; unmerged, each adapted layer runs its LoRA matmuls at every step)",
    )  # fmt: skip
    g.add_argument(
        "--quantization_bit", type=_quantization_bit, default=None,
        help="4 or 8: the base's linear layers quantized by bitsandbytes, the adapter unmerged (a CUDA GPU and "
        "pip install 'tnlora[qlora]'); none: unquantized (default: what the adapter's run trained on)",
    )  # fmt: skip
    g.add_argument("--quantization_type", choices=("nf4", "fp4"), default=None,
                   help="4-bit data type (default: the adapter run's, else nf4)")  # fmt: skip
    g.add_argument("--double_quantization", type=_bool, nargs="?", const=True, default=None,
                   help="4-bit: quantize the quantization constants too (default: the adapter run's, else true)")


def _quantization_bit(text: str) -> int:
    """``--quantization_bit``: 4, 8, or none (0)."""
    lowered = text.strip().lower()
    if lowered in ("none", "null", "false", "0"):
        return 0
    if lowered in ("4", "8"):
        return int(lowered)
    raise argparse.ArgumentTypeError(f"expected 4, 8 or none, got {text!r}")


def _add_generation_args(p: argparse.ArgumentParser, do_sample: bool, repetition_penalty: float = 1.03) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max_new_tokens", type=int, default=512)
    g.add_argument(
        "--do_sample", type=_bool, nargs="?", const=True, default=do_sample, help="true: sample; false: greedy"
    )
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top_p", type=float, default=0.9)
    g.add_argument("--top_k", type=int, default=50)
    g.add_argument("--repetition_penalty", type=float, default=repetition_penalty)
    g.add_argument("--seed", type=int, default=None, help="fix the sampling seed")


def _load(args: argparse.Namespace):
    from tnlora.infer.loading import load_for_inference

    return load_for_inference(
        args.model,
        args.adapter,
        template=args.template,
        system=args.system,
        dtype=args.dtype,
        device=args.device,
        attention_impl=args.attention_impl,
        merge_adapter=args.merge_adapter,
        quantization_bit=args.quantization_bit,
        quantization_type=args.quantization_type,
        double_quantization=args.double_quantization,
    )


def _generation_options(args: argparse.Namespace):
    from tnlora.infer.generate import GenerationOptions

    return GenerationOptions(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


# ---------------------------------------------------------------------------------------------------------------
# Verbs


def train_help() -> str:
    """``tnlora train --help``: every key with its help, default and choices; the LLaMA-Factory keys accepted
    under other names; the ones refused."""
    from tnlora.config import ALIASES, FIELDS, UNSUPPORTED_KEYS

    def shown(value) -> str:
        if value is None:
            return "null"
        if isinstance(value, bool):
            return str(value).lower()
        return str(value)

    lines = [
        "usage: tnlora train [CONFIG.yaml] [--key value | --key=value | key=value ...] [--nproc_per_node N]",
        "",
        "Fine-tune as the YAML and the overrides say (LLaMA-Factory's keys). Several GPUs: --nproc_per_node N "
        "(runs torchrun --standalone --nproc_per_node N -m tnlora train ...), or launch tnlora with torchrun / "
        "accelerate launch yourself. keys (default; choices):",
    ]
    for name, f in FIELDS.items():
        meta = f.metadata
        extra = "required" if meta.get("required") else f"default {shown(f.default)}"
        if "default" in meta.get("help", "") and not meta.get("required"):
            extra = ""  # the help line says what the default is

        if "choices" in meta:
            extra += ("; " if extra else "") + "one of " + ", ".join(shown(c) for c in meta["choices"])
        lines.append(f"  {name:30s} {meta.get('help', '')}" + (f" ({extra})" if extra else ""))
    lines += ["", "also accepted (LLaMA-Factory's names): " + ", ".join(
        f"{key} (→ {target})" for key, (target, _) in ALIASES.items())]  # fmt: skip
    lines += ["refused when set (features tnlora does not have): " + ", ".join(sorted(UNSUPPORTED_KEYS))]
    return "\n".join(lines)


def cmd_train(argv: list[str]) -> int:
    """``tnlora train [CONFIG.yaml] [--key value | --key=value | key=value …]``."""
    # Parsed by hand: argparse would take the value of an unknown --key for the positional CONFIG.
    if argv and argv[0] in ("-h", "--help"):
        print(train_help())
        return 0
    argv, nproc = _take_nproc(argv)
    config_path = argv[0] if argv and not argv[0].startswith("-") and "=" not in argv[0] else None
    overrides = argv[1:] if config_path is not None else argv
    from tnlora.config import load_run_config

    cfg = load_run_config(config_path, overrides)
    if nproc is not None:
        from tnlora.train.run import preflight

        preflight(cfg, processes=nproc)  # what each process would refuse is refused once, before any starts
        return launch_processes(nproc, argv)
    from tnlora.train import distributed
    from tnlora.train.run import train

    result = train(cfg)
    if distributed.is_main():
        if result.samples:
            print_samples(result.samples)
        print(f"chat with it: tnlora chat --adapter {result.output_dir}", file=sys.stderr)
    distributed.finish()
    return 0


NPROC_OPTION = "--nproc_per_node"


def _take_nproc(argv: list[str]) -> tuple[list[str], int | None]:
    """``argv`` without ``--nproc_per_node N`` (torchrun's option), and N."""
    rest, nproc, i = [], None, 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name == NPROC_OPTION:
            if not eq:
                if i + 1 >= len(argv):
                    raise _train_error(f"{NPROC_OPTION}: a number of processes is required")
                value, i = argv[i + 1], i + 1
            if not value.isdigit() or int(value) < 1:
                raise _train_error(f"{NPROC_OPTION}: expected a number of processes (one per GPU), got {value!r}")
            nproc = int(value)
        else:
            rest.append(argv[i])
        i += 1
    return rest, nproc


def _train_error(message: str):
    from tnlora.errors import ConfigError

    return ConfigError(message)


def launch_processes(nproc: int, argv: list[str]) -> int:
    """``tnlora train ... --nproc_per_node N``: the same command in N processes under torchrun's launcher (one
    host, a free port), run from this process. The config was checked here first, so a typo fails before any
    process starts. When a process fails, the launcher stops the others; the failed processes' own one-line errors
    (above) are followed by one line saying how each process ended, instead of the launcher's traceback, and the
    first exit status of an error is returned."""
    import logging
    import os

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        raise _train_error(f"{NPROC_OPTION}: this process is already one of {os.environ['WORLD_SIZE']} started "
                           "by a launcher; leave the option to the launcher")  # fmt: skip
    # The launcher logs a failed process in a line of its own; the line below names it instead.
    launcher_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    level = launcher_log.level
    launcher_log.setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "tnlora", "train", *argv]))
    except ChildFailedError as failed:
        failures = sorted(failed.failures.items())
        ended = ", ".join(
            f"process {rank} exited with status {f.exitcode}" if f.exitcode > 0
            else f"process {rank} was ended by {f.signal_name()}" for rank, f in failures
        )  # fmt: skip
        print(f"error: tnlora train in {nproc} processes: {ended}", file=sys.stderr)
        return next((f.exitcode for _, f in failures if f.exitcode > 0), 1)
    except SignalException as stopped:  # Ctrl-C or a kill: the launcher has stopped the processes
        return 128 + int(stopped.sigval)
    finally:
        launcher_log.setLevel(level)
    return 0


def print_samples(samples: list[dict]) -> None:
    """The greedy replies to ``sample_prompts`` at the end of training (also in samples.jsonl), so a run ends with
    something to read."""
    for row in samples:
        print(f"user: {row['prompt']}\nassistant: {row['reply']}\n", flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive multi-turn chat with streamed replies."""
    from tnlora.infer.chat import chat_loop

    options = _generation_options(args)
    options.check()
    chat_loop(_load(args), options, stdin=sys.stdin, stdout=sys.stdout)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Batched generation for a file of prompts → JSONL."""
    from tnlora.infer.generate import check_generate_output, generate_file, partial_path, read_prompts

    prompts = read_prompts(args.prompts)  # a bad file or output is refused before the model loads
    check_generate_output(args.output, args.overwrite)
    options = _generation_options(args)
    options.check()
    try:
        n = generate_file(
            _load(args), prompts, args.output, options, batch_size=args.batch_size, overwrite=args.overwrite
        )
    except KeyboardInterrupt:
        partial = partial_path(args.output)
        if partial.exists():
            print(f"\nthe replies finished so far are in {partial}; the same command continues from them",
                  file=sys.stderr)  # fmt: skip
        raise
    print(f"wrote {n} replies to {args.output}", file=sys.stderr)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge an adapter into its base model and save a full checkpoint."""
    from tnlora.infer.merge import merge_adapter

    if args.export_legacy_format:
        raise TnloraError("--export_legacy_format: tnlora writes safetensors only (the legacy .bin format is not "
                          "available)")  # fmt: skip
    out = merge_adapter(
        args.model,
        args.adapter,
        args.output,
        dtype=args.dtype,
        overwrite=args.overwrite,
        max_shard_size_gb=args.export_size,
        device=args.export_device,
        template=args.template,
    )
    print(f"merged model written to {out}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Per-token loss and perplexity on a dataset, masked as in training; with ``--predict`` also a generated
    reply for every example, scored (BLEU-4, ROUGE, exact match) and written with the metrics to a folder."""
    from tnlora.config import DEFAULT_DATASET_DIR, REGISTRY_FILE
    from tnlora.infer.evaluate import check_eval_output, evaluate, write_eval_result

    if args.dataset_dir is None and (Path(DEFAULT_DATASET_DIR) / REGISTRY_FILE).is_file():
        args.dataset_dir = DEFAULT_DATASET_DIR  # LLaMA-Factory's default dataset_dir, as for training
    plan = None
    if args.predict:
        plan = _check_predict_args(args)
    elif args.output:
        check_eval_output(args.output, args.overwrite)
    loaded = _load(args)
    result = evaluate(
        loaded,
        args.dataset,
        dataset_dir=args.dataset_dir,
        cutoff_len=args.cutoff_len,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        train_on_prompt=args.train_on_prompt,
        mask_history=args.mask_history,
    )
    print(result.summary(), flush=True)
    if plan is not None:
        _predict(args, loaded, result, plan)
    elif args.output:
        write_eval_result(result, args.output, dataset=args.dataset, model=args.model, adapter=args.adapter)
        print(f"metrics written to {args.output}", file=sys.stderr)
    return 0


def _check_predict_args(args: argparse.Namespace):
    """``--predict``'s refusals, before the model loads: the output folder, the sampling options, the metric
    libraries."""
    from tnlora.infer.evaluate import plan_predict_output
    from tnlora.infer.metrics import check_metric_libraries

    if not args.output:
        raise TnloraError("--predict: needs --output DIR, the folder for predictions.jsonl and metrics.json")
    _generation_options(args).check()
    check_metric_libraries()
    inputs = {"the adapter": args.adapter, "the base model": args.model if args.model and Path(args.model).is_dir()
              else None, "the dataset folder": args.dataset_dir,
              "the dataset": args.dataset if Path(args.dataset).exists() else None}  # fmt: skip
    return plan_predict_output(args.output, args.overwrite, inputs)


def _predict(args: argparse.Namespace, loaded, loss, plan) -> None:
    import dataclasses

    from tnlora.infer.evaluate import METRICS_FILE, PREDICTIONS_FILE, predict, write_predict_outputs

    options = _generation_options(args)
    predicted = predict(
        loaded, args.dataset, options=options, dataset_dir=args.dataset_dir, batch_size=args.batch_size,
        max_samples=args.max_samples, log=lambda line: print(line, file=sys.stderr, flush=True),
    )  # fmt: skip
    print(predicted.summary())
    out = write_predict_outputs(
        plan, predicted, loss, dataset=args.dataset, dataset_dir=args.dataset_dir, model=str(loaded.base),
        adapter=str(loaded.adapter) if loaded.adapter else None, generation=dataclasses.asdict(options),
    )  # fmt: skip
    print(f"predictions written to {out / PREDICTIONS_FILE}, metrics to {out / METRICS_FILE}", file=sys.stderr)


def cmd_data_inspect(args: argparse.Namespace) -> int:
    """Show how a dataset is read, rendered, tokenized and masked."""
    from tnlora.data.inspect import inspect_dataset

    color = args.color if args.color is not None else sys.stdout.isatty()
    if args.model is None:
        print("note: no --model given: tokens are counted with the byte tokenizer of the tiny preset; pass "
              "--model DIR for the model's own tokenizer", file=sys.stderr)  # fmt: skip
    if args.val_size and args.eval_dataset:
        raise TnloraError("--eval_dataset: set either eval_dataset or val_size, not both")
    split = None
    if args.val_size:
        from tnlora.train.run import split_validation

        split = lambda records: split_validation(records, args.val_size, args.seed)  # noqa: E731
    report = inspect_dataset(
        args.dataset,
        args.dataset_dir,
        args.model or "tiny",
        args.template,
        args.cutoff_len,
        example=args.example,
        color=color,
        skip_invalid=args.skip_invalid,
        split=split,
        split_label=f"validation split (val_size {args.val_size:g}, seed {args.seed})",
        eval_dataset=args.eval_dataset,
    )
    print(report)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """``tnlora prepare DIR``: let transformers' Auto classes load an official checkpoint dir natively."""
    from tnlora.model.checkpoint import add_model_type

    changed = add_model_type(args.directory)
    print(f"{args.directory}/config.json: " + ("added model_type 'transnormer'" if changed else "already prepared"))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible server (the ``serve`` extra: FastAPI and uvicorn)."""
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn")):
        raise TnloraError("tnlora serve needs the serve extra: pip install 'tnlora[serve]'")
    from tnlora.serve.server import options_from_args, run_server

    config, options = options_from_args(args)  # refused before the model loads
    run_server(_load(args), config, options, args.host, args.port)
    return 0


def cmd_bench(argv: list[str]) -> int:
    """``tnlora bench …``: the benchmark lives in ``tnlora.bench`` (optional)."""
    try:
        import tnlora.bench as bench
    except ModuleNotFoundError as exc:
        if exc.name not in ("tnlora.bench",):
            raise
        raise TnloraError("the 'bench' verb is not available in this install (tnlora.bench is missing)") from None
    return int(bench.main(argv) or 0)


# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The parser of every verb except ``train`` and ``bench`` (which take free-form arguments)."""
    parser = _Parser(prog="tnlora", description="LoRA fine-tuning, chat and export for TransNormerLLM.")
    parser.add_argument("--version", action="version", version=f"tnlora {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.add_parser("train", help="fine-tune: tnlora train CONFIG.yaml [--key value | key=value …]", add_help=False)
    sub.add_parser("bench", help="benchmark (tnlora bench --help)", add_help=False)
    model_keys = "model_name_or_path, adapter_name_or_path, template, default_system, infer_dtype"

    p = sub.add_parser("chat", help="interactive chat (/reset, /exit; Ctrl-C stops a reply)")
    _add_config_arg(p, model_keys + ", max_new_tokens, temperature, top_p, …")
    _add_model_args(p, merge=True)
    _add_generation_args(p, do_sample=True)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="batched generation: prompts file → JSONL (a rerun continues)")
    _add_config_arg(p, model_keys + ", prompts, output, batch_size, max_new_tokens, …")
    _add_model_args(p, merge=True)
    p.add_argument("--prompts", required=True, help="a .txt file (one prompt a line) or .jsonl (prompt/messages)")
    p.add_argument(
        "--output", required=True,
        help="the JSONL file to write (replies finished so far wait in OUTPUT.partial; rerun to continue)",
    )  # fmt: skip
    p.add_argument("--batch_size", type=int, default=8)
    _add_overwrite_arg(p, "replace an earlier generate output")
    _add_generation_args(p, do_sample=False)
    p.set_defaults(func=cmd_generate)

    for verb, help_text in (
        ("merge", "merge an adapter into the base model (full checkpoint)"),
        ("export", "the same as merge, with LLaMA-Factory's export keys"),
    ):
        p = sub.add_parser(verb, help=help_text)
        _add_config_arg(p, "model_name_or_path, adapter_name_or_path, export_dir, export_size, export_device")
        p.add_argument("--model", help="base checkpoint dir, Hub id or preset (default: the adapter's base model)")
        p.add_argument("--adapter", required=True)
        p.add_argument("--output", required=True, help="the directory to write (export_dir)")
        p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
        p.add_argument("--template", help="chat template to export (default: the one the adapter was trained with)")
        p.add_argument("--export_size", type=int, default=None, help="at most this many GB per weights file")
        p.add_argument("--export_device", default="cpu", choices=("cpu", "auto"), help="auto: merge on the GPU")
        p.add_argument("--export_legacy_format", type=_bool, nargs="?", const=True, default=False,
                       help="must be false: tnlora writes safetensors")  # fmt: skip
        _add_overwrite_arg(p, "replace an earlier merge output (only its own files)")
        p.set_defaults(func=cmd_merge)

    p = sub.add_parser("eval", help="loss and perplexity on a dataset; --predict: generated replies, BLEU / ROUGE")
    _add_config_arg(p, model_keys + ", eval_dataset, dataset_dir, cutoff_len, per_device_eval_batch_size, "
                    "do_predict, predict_with_generate, output_dir, …")  # fmt: skip
    _add_model_args(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--dataset_dir", help="folder holding dataset_info.json (default: ./data when it holds one)")
    p.add_argument("--cutoff_len", type=int, default=None, help="default: the adapter's cutoff_len, else 1024")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_samples", type=int, default=None)
    p.add_argument("--train_on_prompt", type=_bool, nargs="?", const=True, default=None)
    p.add_argument("--mask_history", type=_bool, nargs="?", const=True, default=None)
    p.add_argument(
        "--predict", type=_bool, nargs="?", const=True, default=False,
        help="also generate a reply for every example and score it against the dataset's (BLEU-4, ROUGE-1/2/L as "
        "LLaMA-Factory computes them, exact match; needs pip install 'tnlora[eval]')",
    )  # fmt: skip
    p.add_argument(
        "--output",
        help="also write the metrics to this JSON file; with --predict: the folder for predictions.jsonl and "
        "metrics.json",
    )
    _add_overwrite_arg(p, "replace an earlier eval output")
    _add_generation_args(p, do_sample=False, repetition_penalty=1.0)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="OpenAI-compatible server with a chat page (needs tnlora[serve])")
    _add_model_args(p, merge=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api_key", help="require Authorization: Bearer KEY (default: $TNLORA_API_KEY, else none)")
    g.add_argument("--served_model_name", help="the model name clients send (default: the adapter's dir name)")
    g.add_argument("--max_batch", type=int, default=16, help="requests decoded together (slots)")
    g.add_argument("--max_prompt_tokens", type=int, default=16384, help="longer prompts are refused")
    g.add_argument("--max_tokens", type=int, default=512, help="reply limit of a chat request that sets none")
    g.add_argument("--max_tokens_limit", type=int, default=8192, help="the largest max_tokens a request may ask")
    g.add_argument("--temperature", type=float, default=0.7, help="for requests that set none (0: greedy)")
    g.add_argument("--top_p", type=float, default=0.9, help="for requests that set none")
    g.add_argument("--max_sessions", type=int, default=64, help="conversation states kept on the device")
    g.add_argument("--host_sessions", type=int, default=256, help="further ones kept in host memory")
    g.add_argument("--defer_steps", type=int, default=None,
                   help="write the recurrent states back every N decode steps (the Triton step on a GPU; 0: every "
                        "step; default: 4 from 16 slots, else 0)")
    g.add_argument("--fused_projections", action=argparse.BooleanOptionalAction, default=None,
                   help="decode steps as fused projections of the slots' rows (the Triton step on a GPU, plain "
                        "Linears, up to 64 slots; default: with 1 or 4 to 32 slots, as generate() steps)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("prepare", help="add model_type to an official checkpoint's config.json (Auto* loading)")
    p.add_argument("directory")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_verb", metavar="ACTION", parser_class=_Parser, required=True)
    q = data_sub.add_parser(
        "inspect", help="show rendering, tokens and masks of a record, and audit the data (duplicates, leaks, …)"
    )
    q.add_argument("dataset")
    q.add_argument("--dataset_dir")
    q.add_argument("--template", default="chatml", help="chat template (default chatml, as for training)")
    q.add_argument("--cutoff_len", type=int, default=1024)
    q.add_argument(
        "--model", default=None,
        help="whose tokenizer counts the tokens (checkpoint dir or Hub id; default: the tiny preset's byte tokenizer)",
    )  # fmt: skip
    q.add_argument("--example", type=int, default=0, help="which example to render (0-based)")
    q.add_argument("--color", type=_bool, nargs="?", const=True, default=None, help="dim masked text")
    q.add_argument("--skip_invalid", type=_bool, nargs="?", const=True, default=False)
    q.add_argument(
        "--val_size", type=float, default=0.0,
        help="audit the run's validation split too: a fraction < 1 or a record count, as in the run YAML",
    )  # fmt: skip
    q.add_argument("--seed", type=int, default=42, help="the run's seed, which picks the validation split")
    q.add_argument("--eval_dataset", help="audit this eval dataset against the training data")
    q.set_defaults(func=cmd_data_inspect)
    return parser


def _add_overwrite_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", type=_bool, nargs="?", const=True, default=False, help=what)


def _verb_options(parser: argparse.ArgumentParser, verb: str) -> dict[str, bool]:
    """The verb's option names, each with whether it must take a value (argparse keeps its actions in
    ``_actions``; there is no public accessor)."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options: dict[str, bool] = {}
    for action in subparsers.choices[verb]._actions:
        for flag in action.option_strings:
            if flag.startswith("--"):
                options[flag[2:]] = action.nargs is None
    return options


def expand_verb_argv(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``VERB CONFIG.yaml key=value …`` → ``VERB --option value …`` (YAML first, so given options win)."""
    from tnlora.config import key_value_argv, verb_config_argv

    verb, rest = argv[0], argv[1:]
    options = _verb_options(parser, verb)
    if rest and not rest[0].startswith("-") and "=" not in rest[0]:
        config = Path(rest[0])
        if not config.is_file():
            raise TnloraError(f"{config}: config file not found")
        from_yaml, notes = verb_config_argv(verb, config, options)
        for note in notes:
            print(note, file=sys.stderr)
        rest = from_yaml + rest[1:]
    return [verb, *key_value_argv(rest, options)]


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "train":
        return cmd_train(argv[1:])
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    parser = build_parser()
    if argv and argv[0] in YAML_VERBS and not {"-h", "--help"} & set(argv):
        argv = expand_verb_argv(parser, argv)
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is not None:
        parser.error(f"unexpected argument '{args.config}' (a run YAML goes right after the verb)")
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_USER_ERROR
    return func(args)


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a line is logged (a redirected or captured stream)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging() -> None:
    """Show tnlora's own log lines (the data pipeline's summaries: records read and skipped, examples encoded,
    truncated and dropped) on stderr, one plain line each, at INFO; the libraries keep their own levels."""
    log = logging.getLogger("tnlora")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        return _dispatch(argv)
    except TnloraError as exc:
        message = " ".join(str(exc).split("\n"))
        sys.stderr.write(f"error: {message}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        # RunInterrupted carries where the run stopped and how to resume it
        sys.stderr.write(f"\n{exc}\n" if str(exc) else "\ninterrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except SystemExit as exc:  # argparse --help / usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USER_ERROR)


if __name__ == "__main__":
    raise SystemExit(main())
