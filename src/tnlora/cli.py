"""The ``tnlora`` command: one small function per verb, argument parsing only.

Every ``TnloraError`` becomes ``error: <message>`` on one line of stderr and exit status 2. Heavy imports
(torch, transformers, peft) happen inside the verbs so ``tnlora --help`` and config refusals are quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from tnlora.errors import TnloraError

EXIT_USER_ERROR = 2


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


def _add_model_args(p: argparse.ArgumentParser, adapter_required: bool = False, merge: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="base checkpoint dir or preset (default: the adapter's base model)")
    g.add_argument("--adapter", required=adapter_required, help="a tnlora training output dir (LoRA adapter)")
    g.add_argument("--template", help="chat template (default: the one the adapter was trained with)")
    g.add_argument("--system", help="system prompt (default: the one the adapter was trained with)")
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    g.add_argument("--attention_impl", choices=("auto", "chunked", "recurrent", "fla"), default=None)
    g.add_argument(
        "--merge_adapter", type=_bool, nargs="?", const=True, default=merge,
        help=f"fold the adapter into the base weights for decoding, as `tnlora merge` exports them (default "
        f"{str(merge).lower()}; unmerged, each adapted layer runs its LoRA matmuls at every step)",
    )  # fmt: skip


def _add_generation_args(p: argparse.ArgumentParser, do_sample: bool) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max_new_tokens", type=int, default=512)
    g.add_argument(
        "--do_sample", type=_bool, nargs="?", const=True, default=do_sample, help="true: sample; false: greedy"
    )
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top_p", type=float, default=0.9)
    g.add_argument("--top_k", type=int, default=50)
    g.add_argument("--repetition_penalty", type=float, default=1.03)
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


def cmd_train(argv: list[str]) -> int:
    """``tnlora train [CONFIG.yaml] [--key value | --key=value …]``."""
    # Parsed by hand: argparse would take the value of an unknown --key for the positional CONFIG.
    if argv and argv[0] in ("-h", "--help"):
        from tnlora.config import FIELDS

        print("usage: tnlora train [CONFIG.yaml] [--key value | --key=value ...]\n\nkeys:")
        for name, f in FIELDS.items():
            print(f"  {name:30s} {f.metadata.get('help', '')}")
        return 0
    config_path = argv[0] if argv and not argv[0].startswith("-") else None
    overrides = argv[1:] if config_path is not None else argv
    from tnlora.config import load_run_config

    cfg = load_run_config(config_path, overrides)
    from tnlora.train.run import train

    result = train(cfg)
    if cfg.sample_prompts:
        print_samples(result, cfg.sample_prompts, cfg.sample_max_new_tokens)
    print(f"chat with it: tnlora chat --adapter {result.output_dir}", file=sys.stderr)
    return 0


def print_samples(result, prompts: list[str], max_new_tokens: int) -> None:
    """Greedy replies of the just-trained model, so a run ends with something to read."""
    from tnlora.infer.generate import GenerationOptions, generate_replies

    options = GenerationOptions(max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.0)
    result.model.eval()
    replies = generate_replies(
        result.model, result.tokenizer, result.template, [[{"role": "user", "content": p}] for p in prompts], options
    )
    for prompt, reply in zip(prompts, replies):
        print(f"user: {prompt}\nassistant: {reply}\n", flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive multi-turn chat with streamed replies."""
    from tnlora.infer.chat import chat_loop

    options = _generation_options(args)
    options.check()
    chat_loop(_load(args), options, stdin=sys.stdin, stdout=sys.stdout)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Batched generation for a file of prompts → JSONL."""
    from tnlora.infer.generate import generate_file, read_prompts

    prompts = read_prompts(args.prompts)  # a bad file is refused before the model loads
    options = _generation_options(args)
    options.check()
    n = generate_file(_load(args), prompts, args.output, options, batch_size=args.batch_size)
    print(f"wrote {n} replies to {args.output}", file=sys.stderr)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge an adapter into its base model and save a full checkpoint."""
    from tnlora.infer.merge import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.output, dtype=args.dtype)
    print(f"merged model written to {out}", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Per-token loss and perplexity on a dataset, masked as in training."""
    from tnlora.infer.evaluate import evaluate

    result = evaluate(
        _load(args),
        args.dataset,
        dataset_dir=args.dataset_dir,
        cutoff_len=args.cutoff_len,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        train_on_prompt=args.train_on_prompt,
        mask_history=args.mask_history,
    )
    print(result.summary())
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    """Show how a dataset is read, rendered, tokenized and masked."""
    from tnlora.data.inspect import inspect_dataset

    color = args.color if args.color is not None else sys.stdout.isatty()
    report = inspect_dataset(
        args.dataset,
        args.dataset_dir,
        args.model,
        args.template,
        args.cutoff_len,
        example=args.example,
        color=color,
        skip_invalid=args.skip_invalid,
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
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.add_parser("train", help="fine-tune: tnlora train CONFIG.yaml [--key value …]", add_help=False)
    sub.add_parser("bench", help="benchmark (tnlora bench --help)", add_help=False)

    p = sub.add_parser("chat", help="interactive chat (/reset, /exit)")
    _add_model_args(p, merge=True)
    _add_generation_args(p, do_sample=True)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="batched generation: prompts file → JSONL")
    _add_model_args(p, merge=True)
    p.add_argument("--prompts", required=True, help="a .txt file (one prompt a line) or .jsonl (prompt/messages)")
    p.add_argument("--output", required=True, help="the JSONL file to write")
    p.add_argument("--batch_size", type=int, default=8)
    _add_generation_args(p, do_sample=False)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="merge an adapter into the base model (full checkpoint)")
    p.add_argument("--model", help="base checkpoint dir or preset (default: the adapter's base model)")
    p.add_argument("--adapter", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("eval", help="loss and perplexity on a dataset")
    _add_model_args(p)
    p.add_argument("--dataset", required=True)
    p.add_argument("--dataset_dir")
    p.add_argument("--cutoff_len", type=int, default=None, help="default: the adapter's cutoff_len, else 1024")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_samples", type=int, default=None)
    p.add_argument("--train_on_prompt", type=_bool, nargs="?", const=True, default=None)
    p.add_argument("--mask_history", type=_bool, nargs="?", const=True, default=None)
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
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("prepare", help="add model_type to an official checkpoint's config.json (Auto* loading)")
    p.add_argument("directory")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("data", help="dataset tools")
    data_sub = p.add_subparsers(dest="data_verb", metavar="ACTION", parser_class=_Parser, required=True)
    q = data_sub.add_parser("inspect", help="show rendering, tokens and masks of a few records")
    q.add_argument("dataset")
    q.add_argument("--dataset_dir")
    q.add_argument("--template", required=True)
    q.add_argument("--cutoff_len", type=int, default=1024)
    q.add_argument("--model", default="tiny", help="whose tokenizer to use (checkpoint dir or preset)")
    q.add_argument("--example", type=int, default=0, help="which example to render (0-based)")
    q.add_argument("--color", type=_bool, nargs="?", const=True, default=None, help="dim masked text")
    q.add_argument("--skip_invalid", type=_bool, nargs="?", const=True, default=False)
    q.set_defaults(func=cmd_data_inspect)
    return parser


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "train":
        return cmd_train(argv[1:])
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_USER_ERROR
    return func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(argv)
    except TnloraError as exc:
        message = " ".join(str(exc).split("\n"))
        sys.stderr.write(f"error: {message}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except BrokenPipeError:
        return 0
    except SystemExit as exc:  # argparse --help / usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USER_ERROR)


if __name__ == "__main__":
    raise SystemExit(main())
