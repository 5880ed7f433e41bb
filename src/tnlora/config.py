"""The run schema: one validated ``RunConfig`` from a YAML file plus ``--key value`` overrides.

Keys follow LLaMA-Factory (and Hugging Face ``TrainingArguments``) where one exists, so a LLaMA-Factory SFT
YAML needs few edits. Every refusal is a ``ConfigError`` that names the key, raised before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tnlora.errors import ConfigError

RUN_CONFIG_NAME = "tnlora_run.yaml"

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd", "adafactor")
REPORTERS = ("none", "tensorboard")
LINEAR_TARGETS_ALL = "all"


def _opt(help: str, **checks: Any) -> dict[str, Any]:
    """Field metadata: a help line plus checks (choices, ge, gt, lt, le, required)."""
    return {"help": help, **checks}


@dataclass
class RunConfig:
    """One training run. ``None`` on bf16 / packing / torch_compile / per_device_train_batch_size /
    gradient_checkpointing / lora_alpha means "pick for me" (see ``resolve_defaults``)."""

    # --- model ---
    model_name_or_path: str = field(
        default="", metadata=_opt("checkpoint directory or preset name (tiny, 385M, 1B, 7B)", required=True)
    )
    attention_impl: str = field(
        default="auto", metadata=_opt("lightning attention backend", choices=("auto", "chunked", "recurrent", "fla"))
    )
    # --- data ---
    dataset: str = field(
        default="", metadata=_opt("file, comma list, or name in dataset_dir/dataset_info.json", required=True)
    )
    dataset_dir: str | None = field(default=None, metadata=_opt("folder holding dataset_info.json"))
    template: str = field(default="chatml", metadata=_opt("chat template name"))
    system: str | None = field(default=None, metadata=_opt("default system prompt (records may override it)"))
    cutoff_len: int = field(default=1024, metadata=_opt("maximum tokens per example", ge=2))
    max_samples: int | None = field(default=None, metadata=_opt("use at most this many records", ge=1))
    val_size: float = field(default=0.0, metadata=_opt("held-out part: a fraction < 1 or a record count", ge=0))
    packing: bool | None = field(default=None, metadata=_opt("pack examples into cutoff_len rows (GPU default)"))
    train_on_prompt: bool = field(default=False, metadata=_opt("also train on the prompt tokens"))
    mask_history: bool = field(default=False, metadata=_opt("train on the last assistant turn only"))
    add_special_tokens: str | None = field(
        default=None, metadata=_opt("comma list of tokens added as single special tokens (e.g. chatml markers)")
    )
    dataset_cache_dir: str | None = field(
        default=None, metadata=_opt("where tokenised datasets are cached (default ~/.cache/tnlora/datasets)")
    )
    overwrite_cache: bool = field(default=False, metadata=_opt("tokenise again instead of reading the cache"))
    # --- fine-tuning method ---
    finetuning_type: str = field(default="lora", metadata=_opt("method", choices=("lora", "full", "freeze")))
    lora_rank: int = field(default=8, metadata=_opt("LoRA rank r", ge=1))
    lora_alpha: float | None = field(default=None, metadata=_opt("LoRA alpha (default 2 × rank)", gt=0))
    lora_dropout: float = field(default=0.0, metadata=_opt("dropout on the LoRA input", ge=0, lt=1))
    lora_target: str = field(
        default=LINEAR_TARGETS_ALL, metadata=_opt('"all" (every linear layer) or a comma list of module names')
    )
    additional_target: str | None = field(
        default=None, metadata=_opt("comma list of modules trained in full and saved with the adapter")
    )
    use_dora: bool = field(default=False, metadata=_opt("weight-decomposed LoRA"))
    use_rslora: bool = field(default=False, metadata=_opt("rank-stabilised LoRA scaling alpha/sqrt(r)"))
    freeze_trainable_layers: int = field(
        default=2, metadata=_opt("freeze: train the last n layers (negative: the first n)")
    )
    # --- optimisation ---
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata=_opt("examples (or packed rows) per micro-batch (default: 8; packed, rows of 16,384 tokens in all)", ge=1),
    )
    per_device_eval_batch_size: int = field(default=8, metadata=_opt("examples per eval step", ge=1))
    gradient_accumulation_steps: int = field(default=1, metadata=_opt("micro-batches per optimizer step", ge=1))
    learning_rate: float = field(default=5e-5, metadata=_opt("peak learning rate", gt=0))
    num_train_epochs: float = field(default=3.0, metadata=_opt("epochs (ignored when max_steps > 0)", gt=0))
    max_steps: int = field(default=-1, metadata=_opt("stop after this many optimizer steps (-1: use epochs)", ge=-1))
    lr_scheduler_type: str = field(default="linear", metadata=_opt("schedule", choices=SCHEDULERS))
    warmup_ratio: float = field(default=0.0, metadata=_opt("warm-up fraction of all steps", ge=0, lt=1))
    warmup_steps: int = field(default=0, metadata=_opt("warm-up steps (instead of warmup_ratio)", ge=0))
    weight_decay: float = field(default=0.0, metadata=_opt("AdamW weight decay", ge=0))
    adam_beta1: float = field(default=0.9, metadata=_opt("AdamW beta1", ge=0, lt=1))
    adam_beta2: float = field(default=0.999, metadata=_opt("AdamW beta2", ge=0, lt=1))
    max_grad_norm: float = field(default=1.0, metadata=_opt("gradient clipping norm (0: off)", ge=0))
    optim: str | None = field(
        default=None,
        metadata=_opt("optimizer (GPU default adamw_torch_fused, else adamw_torch)", choices=OPTIMIZERS),
    )
    bf16: bool | None = field(default=None, metadata=_opt("bf16 mixed precision (GPU default)"))
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata=_opt(
            "recompute activations to save memory (default: off, on a GPU on when a micro-batch's activations "
            "are estimated not to fit)"
        ),
    )
    use_unsloth_gc: bool = field(
        default=False,
        metadata=_opt(
            "gradient checkpointing with each layer's saved input kept in CPU memory (LLaMA-Factory's name for "
            "unsloth-style offloaded checkpointing; implies gradient_checkpointing)"
        ),
    )
    torch_compile: bool | None = field(
        default=None,
        metadata=_opt(
            "compile each decoder layer for training, attention kernels stay eager (GPU default for runs of at "
            "least 16 M training tokens)"
        ),
    )
    seed: int = field(default=42, metadata=_opt("seed for init, shuffling and dropout", ge=0))
    dataloader_num_workers: int = field(default=0, metadata=_opt("data loader processes", ge=0))
    # --- evaluation, saving, logging ---
    eval_steps: int | None = field(default=None, metadata=_opt("evaluate every n steps (default: save_steps)", ge=1))
    save_steps: int = field(default=500, metadata=_opt("save a checkpoint every n steps", ge=1))
    save_total_limit: int | None = field(default=None, metadata=_opt("keep at most n checkpoints", ge=1))
    logging_steps: int = field(default=10, metadata=_opt("log every n steps", ge=1))
    output_dir: str = field(default="", metadata=_opt("where the adapter and checkpoints go", required=True))
    overwrite_output_dir: bool = field(default=False, metadata=_opt("replace an existing output_dir"))
    resume_from_checkpoint: str | bool | None = field(
        default=None, metadata=_opt("a checkpoint dir, or true for the last one in output_dir")
    )
    report_to: str = field(default="none", metadata=_opt("none or tensorboard", choices=REPORTERS))
    plot_loss: bool = field(default=True, metadata=_opt("write loss.png at the end"))
    sample_prompts: list[str] | None = field(
        default=None, metadata=_opt("prompts answered by the trained model at the end (printed)")
    )
    sample_max_new_tokens: int = field(default=48, metadata=_opt("reply length for sample_prompts", ge=1))
    # --- accepted for LLaMA-Factory compatibility ---
    stage: str = field(default="sft", metadata=_opt("training stage (only sft)", choices=("sft",)))
    do_train: bool = field(default=True, metadata=_opt("must be true", choices=(True,)))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in field order (YAML-safe)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML, one key per line in field order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def lora_targets(self) -> list[str] | str:
        """``"all"`` or the list of module names given in ``lora_target``."""
        if self.lora_target.strip().lower() == LINEAR_TARGETS_ALL:
            return LINEAR_TARGETS_ALL
        return split_list(self.lora_target)


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(RunConfig)}
_TYPES: dict[str, Any] = typing.get_type_hints(RunConfig)


def split_list(value: str | None) -> list[str]:
    """Split a comma list, dropping blanks."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Reading


def load_run_config(
    path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None
) -> RunConfig:
    """Read ``path`` (YAML mapping), apply ``overrides`` (a dict, or ``["--key", "value", "--k=v"]``), validate."""
    values: dict[str, tuple[Any, str]] = {}
    if path is not None:
        for key, value in read_yaml_mapping(path).items():
            values[key] = (value, str(path))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        values[key] = (value, f"--{key}")
    cfg = build_config(values)
    if cfg.dataset_dir and path is not None:
        cfg.dataset_dir = _resolve_beside(cfg.dataset_dir, Path(path).parent)
    return cfg


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Load a YAML file that must hold one mapping of string keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value lines, got a {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def parse_overrides(argv: list[str]) -> dict[str, str | bool]:
    """``["--a", "1", "--b=2", "--flag"]`` → ``{"a": "1", "b": "2", "flag": True}`` (values stay strings)."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument '{arg}': overrides are written --key value or --key=value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            out[key] = value
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[key] = argv[i + 1]
            i += 1
        else:
            out[key] = True  # a bare --flag means true
        i += 1
    return out


def _resolve_beside(path: str, base: Path) -> str:
    """A relative path that does not exist from the CWD is looked up beside the config file."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or not (base / p).exists():
        return str(p)
    return str(base / p)


# ---------------------------------------------------------------------------------------------------------------
# Validation


def build_config(values: dict[str, tuple[Any, str]]) -> RunConfig:
    """Check every key and value (``{key: (value, where)}``) and build the config; the first problem is raised."""
    kwargs: dict[str, Any] = {}
    for key, (value, where) in values.items():
        if key not in FIELDS:
            raise ConfigError(_unknown_key_message(key, where))
        kwargs[key] = _check_value(key, value, where)
    cfg = RunConfig(**kwargs)
    for name, f in FIELDS.items():
        if f.metadata.get("required") and not getattr(cfg, name):
            raise ConfigError(f"{name}: required (set it in the YAML file or pass --{name} VALUE)")
    _check_combinations(cfg)
    return cfg


def _unknown_key_message(key: str, where: str) -> str:
    close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    src = "" if where.startswith("--") else f" in {where}"
    return f"unknown config key '{key}'{src}{hint}"


def _type_options(tp: Any) -> tuple[list[Any], bool]:
    """The concrete types of an annotation and whether None is allowed."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = list(typing.get_args(tp))
    else:
        args = [tp]
    optional = type(None) in args
    return [a for a in args if a is not type(None)], optional


def _check_value(key: str, value: Any, where: str) -> Any:
    """Coerce one value to the field's type and check its range / choices."""
    options, optional = _type_options(_TYPES[key])
    from_cli = where.startswith("--")
    src = f" (from {where})" if from_cli else ""
    if value is None or (from_cli and isinstance(value, str) and value.strip().lower() == "null"):
        if optional:
            return None
        raise ConfigError(f"{key}: a value is required, got null{src}")
    coerced = _coerce(key, value, options, src)
    _check_range(key, coerced, FIELDS[key].metadata, src)
    return coerced


def _describe(options: list[Any]) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    parts = [names.get(o, "a list of strings") for o in options]
    return " or ".join(parts)


def _coerce(key: str, value: Any, options: list[Any], src: str) -> Any:
    # bool before int: in Python True is an int, and a YAML "1" must not mean true.
    for tp in options:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "false", "no", "off"):
                return value.strip().lower() in ("true", "yes", "on")
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer() and float not in options and abs(value) < 2**53:
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value.strip())
                except ValueError:
                    pass
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(float(value)):
                    raise ConfigError(f"{key}: expected a finite number, got {value!r}{src}")
                return float(value)
            if isinstance(value, str):
                try:  # YAML 1.1 reads 1e-4 (no dot) as a string; accept it as a number
                    number = float(value.strip())
                except ValueError:
                    pass
                else:
                    if math.isfinite(number):
                        return number
        elif tp is str:
            if isinstance(value, str):
                return value
            if isinstance(value, list) and key in _LIST_AS_COMMA_STRING and all(isinstance(v, str) for v in value):
                return ",".join(value)
        elif typing.get_origin(tp) is list:
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
            if isinstance(value, str):
                return [value]
    raise ConfigError(f"{key}: expected {_describe(options)}, got {value!r}{src}")


# keys written as "a,b" in LLaMA-Factory that YAML users also write as lists
_LIST_AS_COMMA_STRING = {"dataset", "lora_target", "additional_target", "add_special_tokens", "report_to"}


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any], src: str) -> None:
    if "choices" in meta:
        choices = meta["choices"]
        candidate = value
        if key == "report_to":
            bad = [v for v in split_list(value) if v not in choices]
            candidate = bad[0] if bad else choices[0]
        if candidate not in choices:
            shown = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
            raise ConfigError(f"{key}: must be one of {shown}; got {candidate!r}{src}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if "ge" in meta and value < meta["ge"]:
        raise ConfigError(f"{key}: must be >= {meta['ge']}, got {value}{src}")
    if "gt" in meta and value <= meta["gt"]:
        raise ConfigError(f"{key}: must be > {meta['gt']}, got {value}{src}")
    if "lt" in meta and value >= meta["lt"]:
        raise ConfigError(f"{key}: must be < {meta['lt']}, got {value}{src}")
    if "le" in meta and value > meta["le"]:
        raise ConfigError(f"{key}: must be <= {meta['le']}, got {value}{src}")


def _check_combinations(cfg: RunConfig) -> None:
    """Rules that involve more than one key."""
    if cfg.val_size >= 1 and not float(cfg.val_size).is_integer():
        raise ConfigError(f"val_size: a fraction below 1 or a whole number of records, got {cfg.val_size}")
    if cfg.train_on_prompt and cfg.mask_history:
        raise ConfigError("mask_history: cannot be combined with train_on_prompt (choose one)")
    if cfg.max_steps == 0:
        raise ConfigError("max_steps: must be -1 (use num_train_epochs) or a positive number of steps, got 0")
    if cfg.warmup_ratio > 0 and cfg.warmup_steps > 0:
        raise ConfigError("warmup_steps: set either warmup_ratio or warmup_steps, not both")
    if cfg.freeze_trainable_layers == 0:
        raise ConfigError("freeze_trainable_layers: must not be 0 (n > 0: last n layers, n < 0: first n)")
    if not split_list(cfg.dataset):
        raise ConfigError("dataset: required (a file, a comma list, or a name in dataset_info.json)")
    if cfg.finetuning_type == "lora" and not cfg.lora_targets():
        raise ConfigError('lora_target: empty; use "all" or a comma list of module names')
    if isinstance(cfg.resume_from_checkpoint, str) and cfg.resume_from_checkpoint.strip().lower() in (
        "true",
        "false",
        "last",
    ):
        word = cfg.resume_from_checkpoint.strip().lower()
        cfg.resume_from_checkpoint = word != "false"
    if cfg.resume_from_checkpoint is False:
        cfg.resume_from_checkpoint = None


# ---------------------------------------------------------------------------------------------------------------
# Defaults that depend on the machine


# Examples per micro-batch when unpacked (LLaMA-Factory's and the Trainer's 8).
DEFAULT_BATCH_SIZE = 8
# Tokens per micro-batch of packed rows when the batch size is left to us: the fla kernel runs the rows as one
# sequence, and below ~16k tokens a step is bound by kernel launches, not the GPU (benchmarks/RESULTS.md:
# 1B 13,658 tokens/s in 2,048-token micro-batches, 41,178 in 16,384-token ones, 69,839 compiled on an H200).
PACKED_TOKENS_PER_MICRO_BATCH = 16_384
# On a GPU where the memory estimate says it fits without checkpointing: twice that. The optimizer step and the
# step's fixed host work are spread over twice the tokens (1B on an H200: 90,566 → 96,436 tokens/s).
LARGE_PACKED_TOKENS_PER_MICRO_BATCH = 32_768
# Where not even 16,384 fit without checkpointing: half, when that fits. Checkpointing recomputes every layer's
# forward, half again the work of a LoRA step (forward + input gradients); halving the rows costs only the
# step's fixed work (7B on an 80 GB card: 8,192 tokens estimated at 65 GB; not measured on one).
SMALL_PACKED_TOKENS_PER_MICRO_BATCH = 8_192


# Compiling the decoder layers pays only on long runs. On an H200 (benchmarks/RESULTS.md, session 8), with the
# eager layers' norms as Triton kernels (norm_kernel), 7B trains at 16,314 tokens/s eager and 17,318 compiled
# (the first layer eager): ~3.6 s saved per million tokens, against ~60 s of compiling in the first steps
# (huanhuan's 3 epochs, 1.17 M tokens, whole `tnlora train` command: 93–106 s eager, 154 s compiled, 126 s
# compiled with a warm Inductor cache). 1B: 88,596 eager and 99,390 compiled (session 7). Unset, torch_compile
# is on only from this many training tokens.
COMPILE_MIN_TOKENS = 16_000_000


def resolve_defaults(
    cfg: RunConfig,
    *,
    cuda: bool,
    cuda_bf16: bool,
    fits: Callable[[RunConfig], bool] | None = None,
    train_tokens: int | None = None,
) -> RunConfig:
    """Fill the "pick for me" values: bf16, packing and compiled decoder layers on a GPU, none of them on CPU
    (compiling pays only where kernel launches dominate; on CPU it costs minutes; on a GPU only when the run
    trains at least ``COMPILE_MIN_TOKENS`` tokens, or ``train_tokens`` is not known); micro-batches of packed rows
    sized by a token budget (on a GPU the largest of 32,768, 16,384 and 8,192 tokens that ``fits`` says fits
    without checkpointing; else, and on CPU, 16,384); the fused AdamW on a GPU; alpha = 2 × rank. Gradient
    checkpointing: on with a GPU when ``fits`` (given the otherwise resolved config, checkpointing off) says
    the run would not fit its memory, else off."""
    out = dataclasses.replace(cfg)
    if out.bf16 is None:
        out.bf16 = bool(cuda and cuda_bf16)
    elif out.bf16 and cuda and not cuda_bf16:
        raise ConfigError("bf16: this GPU does not support bfloat16; set bf16: false")
    if out.packing is None:
        out.packing = bool(cuda)
    if out.torch_compile is None:
        out.torch_compile = bool(cuda) and (train_tokens is None or train_tokens >= COMPILE_MIN_TOKENS)
    if out.optim is None:
        # The fused AdamW updates all LoRA tensors in a few kernels; the foreach one launches dozens per step.
        out.optim = "adamw_torch_fused" if cuda else "adamw_torch"
    if out.use_unsloth_gc:
        out.gradient_checkpointing = True
    if out.per_device_train_batch_size is None:
        out.per_device_train_batch_size = (
            max(1, PACKED_TOKENS_PER_MICRO_BATCH // out.cutoff_len) if out.packing else DEFAULT_BATCH_SIZE
        )
        if out.packing and cuda and fits is not None and not out.gradient_checkpointing:
            for budget in (
                LARGE_PACKED_TOKENS_PER_MICRO_BATCH,
                PACKED_TOKENS_PER_MICRO_BATCH,
                SMALL_PACKED_TOKENS_PER_MICRO_BATCH,
            ):
                rows = max(1, budget // out.cutoff_len)
                if fits(dataclasses.replace(out, per_device_train_batch_size=rows, gradient_checkpointing=False)):
                    out.per_device_train_batch_size = rows
                    break
    if out.gradient_checkpointing is None:
        out.gradient_checkpointing = False
        if cuda and fits is not None:
            out.gradient_checkpointing = not fits(out)
    if out.lora_alpha is None:
        out.lora_alpha = float(2 * out.lora_rank)
    if out.eval_steps is None:
        out.eval_steps = out.save_steps
    return out


def save_run_config(cfg: RunConfig, directory: str | Path) -> Path:
    """Write the resolved config as ``tnlora_run.yaml`` (atomically)."""
    from tnlora.io import atomic_write_text

    path = Path(directory) / RUN_CONFIG_NAME
    atomic_write_text(path, cfg.to_yaml())
    return path


def read_run_config(directory: str | Path) -> RunConfig | None:
    """Read a saved ``tnlora_run.yaml`` (from an adapter / output dir) without re-resolving paths."""
    path = Path(directory) / RUN_CONFIG_NAME
    if not path.is_file():
        return None
    values = {k: (v, str(path)) for k, v in read_yaml_mapping(path).items() if k in FIELDS}
    return build_config(values)
