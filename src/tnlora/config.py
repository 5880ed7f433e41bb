"""The run schema: one validated ``RunConfig`` from a YAML file plus ``--key value`` / ``key=value`` overrides.

Keys follow LLaMA-Factory (and Hugging Face ``TrainingArguments``) where one exists, so a LLaMA-Factory SFT
YAML runs with only its model path and template changed. LLaMA-Factory keys that name another spelling of a
tnlora setting are mapped onto it (``ALIASES``); keys of features tnlora does not have are refused in one line
naming the feature (``UNSUPPORTED_KEYS``). Every refusal is a ``ConfigError`` that names the key, raised before
any model loads. Paths are recorded absolute, so a run read back from another folder still finds them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tnlora.choices import LIGHTNING_IMPLS
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
STRATEGIES = ("no", "steps", "epoch")
NAN_POLICIES = ("stop", "skip")
LINEAR_TARGETS_ALL = "all"
# quantization_bit / quantization_method / quantization_type: what tnlora loads with bitsandbytes.
QUANTIZATION_BITS = (4, 8)
QUANTIZATION_METHODS = ("bnb",)
QUANTIZATION_TYPES = ("nf4", "fp4")
NO_GPU_FOR_QUANTIZATION = (
    "quantization_bit: a quantized base needs a CUDA GPU (bitsandbytes' quantized training), and this machine has "
    "none; drop quantization_bit to train in bf16 / fp32"
)


# What one activation checkpoint holds (checkpoint_regions): a whole decoder layer, or each mixer step apart.
CHECKPOINT_REGIONS = ("layer", "mixers")


def _opt(help: str, **checks: Any) -> dict[str, Any]:
    """Field metadata: a help line plus checks (choices, ge, gt, lt, le, required)."""
    return {"help": help, **checks}


@dataclass
class RunConfig:
    """One training run. ``None`` on bf16 / packing / torch_compile / per_device_train_batch_size /
    gradient_checkpointing / use_unsloth_gc / checkpoint_regions / uncheckpointed_layers / lora_alpha means
    "pick for me" (see ``resolve_defaults``)."""

    # --- model ---
    model_name_or_path: str = field(
        default="",
        metadata=_opt(
            "checkpoint directory, Hugging Face Hub id (OpenNLPLab/TransNormerLLM-7B) or preset (tiny, 385M, 1B, 7B)",
            required=True,
        ),
    )
    trust_remote_code: bool = field(
        default=False, metadata=_opt("accepted for LLaMA-Factory YAMLs; tnlora never runs a model's remote code")
    )
    attention_impl: str = field(
        default="auto",
        metadata=_opt("lightning attention backend", choices=LIGHTNING_IMPLS),
    )
    # --- data ---
    dataset: str = field(
        default="", metadata=_opt("file, comma list, or name in dataset_dir/dataset_info.json", required=True)
    )
    dataset_dir: str | None = field(
        default=None,
        metadata=_opt("folder holding dataset_info.json (default: ./data when it holds one, as in LLaMA-Factory)"),
    )
    eval_dataset: str | None = field(
        default=None, metadata=_opt("dataset(s) to evaluate on during training, instead of a val_size split")
    )
    template: str = field(default="chatml", metadata=_opt("chat template name"))
    system: str | None = field(default=None, metadata=_opt("default system prompt (records may override it)"))
    cutoff_len: int = field(default=1024, metadata=_opt("maximum tokens per example", ge=2))
    max_samples: int | None = field(default=None, metadata=_opt("use at most this many records", ge=1))
    val_size: float = field(default=0.0, metadata=_opt("held-out part: a fraction < 1 or a record count", ge=0))
    dedup: bool = field(
        default=False,
        metadata=_opt(
            "drop records that exactly repeat an earlier one (same system prompt and messages) before training; "
            "says how many (tnlora data inspect lists them)"
        ),
    )
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
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata=_opt("processes that tokenise a large dataset (default 1; the result is the same)", ge=1),
    )
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
    lora_kernel: str = field(
        default="fused",
        metadata=_opt(
            "the adapted layers' training forward: fused (in eager layers the adapter's B matmul accumulates "
            "into the base output, forward and backward; compiled layers keep the composition Inductor fuses; "
            "tnlora.ops.lora) or peft (peft's layer as it is); the same function",
            choices=("fused", "peft"),
        ),
    )
    fp8: bool = field(
        default=False,
        metadata=_opt(
            "LoRA: the frozen base weights' GEMMs (forward and input gradient) in fp8 e4m3, one scale per row of "
            "each operand (tnlora.ops.fp8); the adapters, their gradients and everything else keep bf16 / fp32. "
            "Rounds the base's contribution (as QLoRA does, more finely); on a GPU needs compute capability ≥ 8.9 "
            "(Ada, Hopper) and bf16; evaluation and generation keep the bf16 base"
        ),
    )
    freeze_trainable_layers: int = field(
        default=2, metadata=_opt("freeze: train the last n layers (negative: the first n)")
    )
    # --- quantized base (QLoRA; LLaMA-Factory's keys) ---
    quantization_bit: int | None = field(
        default=None,
        metadata=_opt(
            "load the base model's linear layers quantized by bitsandbytes: 4 (QLoRA) or 8 (LLM.int8()); the "
            "embedding, tied head and norms stay bf16; needs a CUDA GPU and pip install 'tnlora[qlora]'",
            choices=QUANTIZATION_BITS,
        ),
    )
    quantization_method: str = field(
        default="bnb", metadata=_opt("the quantization library (bitsandbytes)", choices=QUANTIZATION_METHODS)
    )
    quantization_type: str = field(
        default="nf4", metadata=_opt("4-bit data type: NormalFloat4 or FP4", choices=QUANTIZATION_TYPES)
    )
    double_quantization: bool = field(
        default=True,
        metadata=_opt("4-bit: quantize the quantization constants too (~0.4 bit per parameter less)"),
    )
    # --- optimisation ---
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata=_opt("examples (or packed rows) per micro-batch (default: 8; packed, rows of 16,384 tokens in all)", ge=1),
    )
    per_device_eval_batch_size: int = field(default=8, metadata=_opt("examples per evaluation batch", ge=1))
    gradient_accumulation_steps: int = field(default=1, metadata=_opt("micro-batches per optimizer step", ge=1))
    learning_rate: float = field(default=5e-5, metadata=_opt("peak learning rate", gt=0))
    num_train_epochs: float = field(default=3.0, metadata=_opt("epochs (ignored when max_steps > 0)", gt=0))
    max_steps: int = field(default=-1, metadata=_opt("stop after this many optimizer steps (-1: use epochs)", ge=-1))
    lr_scheduler_type: str = field(default="linear", metadata=_opt("schedule", choices=SCHEDULERS))
    lr_scheduler_kwargs: dict[str, Any] | None = field(
        default=None, metadata=_opt("extra arguments of the schedule, e.g. {num_cycles: 2} (a JSON object on the command line)")
    )
    warmup_ratio: float = field(default=0.0, metadata=_opt("warm-up fraction of all steps", ge=0, lt=1))
    warmup_steps: int = field(default=0, metadata=_opt("warm-up steps (instead of warmup_ratio)", ge=0))
    weight_decay: float = field(default=0.0, metadata=_opt("AdamW weight decay", ge=0))
    adam_beta1: float = field(default=0.9, metadata=_opt("AdamW beta1", ge=0, lt=1))
    adam_beta2: float = field(default=0.999, metadata=_opt("AdamW beta2", ge=0, lt=1))
    max_grad_norm: float = field(default=1.0, metadata=_opt("gradient clipping norm (0: off)", ge=0))
    nan_policy: str = field(
        default="stop",
        metadata=_opt(
            "a NaN or infinite loss or gradient norm: stop (naming the step and the last good checkpoint) or skip "
            "that batch (no optimizer update with it)",
            choices=NAN_POLICIES,
        ),
    )
    nan_skip_limit: int = field(
        default=10, metadata=_opt("nan_policy skip: stop once more batches than this were skipped", ge=0)
    )
    optim: str | None = field(
        default=None,
        metadata=_opt("optimizer (GPU default adamw_torch_fused, else adamw_torch)", choices=OPTIMIZERS),
    )
    bf16: bool | None = field(default=None, metadata=_opt("bf16 mixed precision (GPU default)"))
    fp16: bool = field(default=False, metadata=_opt("fp16 mixed precision: not supported (use bf16)", choices=(False,)))
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata=_opt(
            "recompute activations to save memory (default: off, on a GPU on when a micro-batch's activations "
            "are estimated not to fit)"
        ),
    )
    use_unsloth_gc: bool | None = field(
        default=None,
        metadata=_opt(
            "gradient checkpointing with each layer's saved input kept in CPU memory (LLaMA-Factory's name for "
            "unsloth-style offloaded checkpointing; implies gradient_checkpointing; default: off, on a GPU on "
            "when not even plain checkpointing is estimated to fit)"
        ),
    )
    checkpoint_regions: str | None = field(
        default=None,
        metadata=_opt(
            "what one activation checkpoint holds: the whole decoder layer, or each mixer step apart (mixers: "
            "each layer also keeps its middle residual, tokens x hidden more memory, and its recompute leaves "
            "out both output projections; not with use_unsloth_gc). Default: on a GPU under checkpointing "
            "without offload, with uncheckpointed_layers the least recompute estimated to fit; else layer",
            choices=CHECKPOINT_REGIONS,
        ),
    )
    uncheckpointed_layers: int | None = field(
        default=None,
        metadata=_opt(
            "under gradient checkpointing, how many of the last decoder layers keep their activations and are "
            "not recomputed (faster; each beyond the first costs a layer's activations of memory). Default: "
            "chosen with checkpoint_regions; else 0",
            ge=0,
        ),
    )
    torch_compile: bool | None = field(
        default=None,
        metadata=_opt(
            "compile each decoder layer for training, attention kernels stay eager (GPU default for runs of at "
            "least 100 M training tokens)"
        ),
    )
    seed: int = field(default=42, metadata=_opt("seed for init, shuffling and dropout", ge=0))
    dataloader_num_workers: int = field(default=0, metadata=_opt("data loader processes", ge=0))
    ddp_timeout: int = field(default=1800, metadata=_opt("seconds distributed processes wait for each other", ge=1))
    ddp_find_unused_parameters: bool | None = field(
        default=None, metadata=_opt("DDP's find_unused_parameters (passed to the Trainer)")
    )
    deepspeed: str | None = field(
        default=None,
        metadata=_opt(
            "a DeepSpeed config file (ZeRO-2 / ZeRO-3, e.g. examples/deepspeed/ds_z3_config.json; GPUs, pip "
            "install deepspeed)"
        ),
    )
    fsdp: bool | str | None = field(
        default=None,
        metadata=_opt(
            "FSDP2 on GPUs: full_shard (or shard_grad_op), optionally with offload; each decoder layer is one "
            "FSDP unit"
        ),
    )
    fsdp_config: dict[str, Any] | str | None = field(
        default=None, metadata=_opt("the Trainer's fsdp_config (a mapping or a JSON file; FSDP2 only)")
    )
    # --- evaluation, saving, logging ---
    eval_strategy: str | None = field(
        default=None,
        metadata=_opt("when to evaluate (default: steps when there is an eval set, else no)", choices=STRATEGIES),
    )
    eval_steps: int | None = field(default=None, metadata=_opt("evaluate every n steps (default: save_steps)", ge=1))
    save_strategy: str = field(default="steps", metadata=_opt("when to save a checkpoint", choices=STRATEGIES))
    save_steps: int = field(default=500, metadata=_opt("save a checkpoint every n steps", ge=1))
    save_total_limit: int | None = field(default=None, metadata=_opt("keep at most n checkpoints", ge=1))
    save_only_model: bool = field(
        default=False, metadata=_opt("checkpoints without optimizer and scheduler state (cannot be resumed)")
    )
    logging_strategy: str = field(default="steps", metadata=_opt("when to log", choices=STRATEGIES))
    logging_steps: int = field(default=10, metadata=_opt("log every n steps", ge=1))
    logging_dir: str | None = field(
        default=None, metadata=_opt("TensorBoard log folder (default: output_dir/runs/<date>)")
    )
    include_num_input_tokens_seen: bool = field(
        default=False, metadata=_opt("log the number of (non-padding) tokens seen with each loss")
    )
    run_name: str | None = field(default=None, metadata=_opt("name of the run in the logs"))
    output_dir: str = field(default="", metadata=_opt("where the adapter and checkpoints go", required=True))
    overwrite_output_dir: bool = field(
        default=False, metadata=_opt("replace a previous tnlora run in output_dir (only the files it wrote)")
    )
    resume_from_checkpoint: str | bool | None = field(
        default=None, metadata=_opt("a checkpoint dir, or true for the last one in output_dir")
    )
    report_to: str = field(default="none", metadata=_opt("where to log", choices=REPORTERS))
    plot_loss: bool = field(default=True, metadata=_opt("write loss.png at the end"))
    sample_prompts: str | list[str] | None = field(
        default=None,
        metadata=_opt(
            "prompts answered with greedy decoding at each evaluation and at the end (samples.jsonl, TensorBoard's "
            "text tab, printed at the end): a list, one prompt, or a .txt (one a line) / .jsonl file of prompts"
        ),
    )
    sample_max_new_tokens: int = field(default=48, metadata=_opt("reply length for sample_prompts", ge=1))
    do_predict: bool = field(
        default=False,
        metadata=_opt(
            "after training, generate a reply for every eval example (val_size or eval_dataset) and score it: "
            "predictions.jsonl, predict_results.json (BLEU-4, ROUGE; pip install 'tnlora[eval]')"
        ),
    )
    predict_with_generate: bool = field(
        default=False, metadata=_opt("LLaMA-Factory's switch for generated predictions (do_predict always generates)")
    )
    max_new_tokens: int = field(default=512, metadata=_opt("reply length of do_predict's greedy predictions", ge=1))
    # --- accepted for LLaMA-Factory compatibility ---
    stage: str = field(default="sft", metadata=_opt("training stage (supervised fine-tuning)", choices=("sft",)))
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

# LLaMA-Factory keys that spell a tnlora setting another way: key -> (tnlora key, value mapping). Applied only
# when the tnlora key itself is not given.
ALIASES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "default_system": ("system", lambda v: v),
    "new_special_tokens": ("add_special_tokens", lambda v: v),
    # tnlora's packing keeps examples apart (no attention or state crosses a boundary): it is neat packing.
    "neat_packing": ("packing", lambda v: True if _truthy(v) else None),
    "disable_gradient_checkpointing": ("gradient_checkpointing", lambda v: False if _truthy(v) else None),
}

# LLaMA-Factory / Trainer keys of features tnlora does not have. A YAML that spells out their off value (null,
# false, 0, "none") still runs; any other value is refused naming the feature. A feature that arrives in tnlora
# becomes a RunConfig field and leaves this table.
UNSUPPORTED_KEYS: dict[str, str] = {
    "quantization_device_map": "placing a quantized model across devices (tnlora loads it on one GPU)",
    "use_galore": "the GaLore optimizer",
    "use_apollo": "the APOLLO optimizer",
    "use_badam": "the BAdam optimizer",
    "use_adam_mini": "the Adam-mini optimizer",
    "use_muon": "the Muon optimizer",
    "use_llama_pro": "LLaMA Pro block expansion",
    "pissa_init": "PiSSA initialisation",
    "pissa_convert": "PiSSA initialisation",
    "loraplus_lr_ratio": "LoRA+",
    "neftune_noise_alpha": "NEFTune",
    "rope_scaling": "RoPE scaling (TransNormerLLM has no RoPE)",
    "enable_liger_kernel": "Liger kernels",
    "use_unsloth": "Unsloth",
    "shift_attn": "shift short attention",
    "mixture_of_depths": "mixture of depths",
    "use_ray": "Ray",
    "tokenized_path": "pre-tokenised datasets (tnlora caches tokenised data itself: dataset_cache_dir)",
    "streaming": "streamed datasets",
    "resize_vocab": "vocabulary resizing (add_special_tokens adds tokens)",
    "ref_model": "reference models (preference training)",
    "reward_model": "reward models (PPO)",
    "push_to_hub": "uploading to the Hugging Face Hub",
    "hub_model_id": "uploading to the Hugging Face Hub",
    "freeze_vision_tower": "vision-language models",
}
# Values of accepted keys that ask for a feature tnlora does not have: key -> {value: feature}.
_STAGES = {"pt": "pre-training", "rm": "reward modelling", "ppo": "PPO", "dpo": "DPO", "kto": "KTO"}
_REPORTERS = {
    "wandb": "Weights & Biases",
    "swanlab": "SwanLab",
    "mlflow": "MLflow",
    "comet_ml": "Comet",
    "clearml": "ClearML",
    "neptune": "Neptune",
    "trackio": "Trackio",
    "dvclive": "DVCLive",
    "azure_ml": "Azure ML",
    "codecarbon": "CodeCarbon",
}
# LLaMA-Factory keys accepted with the one value that matches what tnlora does: key -> (accepted values, feature).
_FIXED_KEYS: dict[str, tuple[tuple[Any, ...], str]] = {
    "fp8_backend": (("auto",), "another fp8 backend (fp8: true runs PyTorch's scaled matmul, tnlora.ops.fp8)"),
    "flash_attn": (("auto", "disabled"), "a softmax-attention kernel (TransNormerLLM's attention is attention_impl)"),
    "mix_strategy": (("concat",), "interleaved dataset mixing (datasets are concatenated)"),
}
_OFF_VALUES = (None, False, 0, "", "none", "null", "false")


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "on", "1")
    return bool(value)


def split_list(value: str | None) -> list[str]:
    """Split a comma list, dropping blanks."""
    return [part.strip() for part in (value or "").split(",") if part.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Reading


def load_run_config(
    path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None
) -> RunConfig:
    """Read ``path`` (YAML mapping), apply ``overrides`` (a dict, or ``["--key", "value", "--k=v", "k=v"]``),
    validate, and make every path absolute (relative ones are taken from the current folder; a ``dataset_dir``
    that is not there is also looked up beside the YAML file)."""
    values: dict[str, tuple[Any, str]] = {}
    if path is not None:
        for key, value in read_yaml_mapping(path).items():
            values[key] = (value, str(path))
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        values[key] = (value, f"--{key}")
    cfg = build_config(values)
    return absolute_paths(cfg, Path(path).parent if path is not None else None)


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


_KEY_VALUE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)=(.*)$", re.DOTALL)


def parse_overrides(argv: list[str], known: typing.Collection[str] | None = None) -> dict[str, str | bool]:
    """``["--a", "1", "--b=2", "--flag", "c=3"]`` → ``{"a": "1", "b": "2", "flag": True, "c": "3"}`` (values
    stay strings). ``key=value`` is LLaMA-Factory's form of an override. A bare ``--flag`` followed by
    ``key=value`` with a ``known`` key (default: every config key and alias) is a flag, not that value."""
    known = set(FIELDS) | set(ALIASES) | set(UNSUPPORTED_KEYS) if known is None else set(known)
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        pair = _KEY_VALUE.match(arg)
        if pair and not arg.startswith("-"):
            out[pair[1].replace("-", "_")] = pair[2]
            i += 1
            continue
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"unexpected argument '{arg}': overrides are written --key value, --key=value or key=value"
            )
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        following = argv[i + 1] if i + 1 < len(argv) else None
        next_pair = _KEY_VALUE.match(following) if following is not None else None
        if eq:
            out[key] = value
        elif following is not None and not following.startswith("--") and not (
            next_pair and next_pair[1].replace("-", "_") in known
        ):
            out[key] = following
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


# LLaMA-Factory's default dataset_dir: used when the key is not set and this folder holds a registry.
DEFAULT_DATASET_DIR = "data"
REGISTRY_FILE = "dataset_info.json"


def absolute_paths(cfg: RunConfig, config_dir: Path | None = None) -> RunConfig:
    """Record every path of ``cfg`` absolute, so the saved run loads from any folder: the model when it is a
    local directory, dataset_dir (beside the YAML file when not found from here; ./data by default when it
    holds a dataset_info.json), dataset files, output and log folders, an explicit checkpoint. Names that are
    not paths (presets, Hub ids, registered datasets) stay as they are."""
    if cfg.dataset_dir:
        base = _resolve_beside(cfg.dataset_dir, config_dir) if config_dir is not None else cfg.dataset_dir
        cfg.dataset_dir = _absolute(base)
    elif (Path(DEFAULT_DATASET_DIR) / REGISTRY_FILE).is_file():
        cfg.dataset_dir = _absolute(DEFAULT_DATASET_DIR)
    registered = _registered_names(cfg.dataset_dir)
    cfg.dataset = ",".join(_absolute_if_exists(n, registered) for n in split_list(cfg.dataset))
    if cfg.eval_dataset:
        cfg.eval_dataset = ",".join(_absolute_if_exists(n, registered) for n in split_list(cfg.eval_dataset))
    if cfg.model_name_or_path and Path(cfg.model_name_or_path).expanduser().exists():
        cfg.model_name_or_path = _absolute(cfg.model_name_or_path)
    cfg.output_dir = _absolute(cfg.output_dir)
    if isinstance(cfg.fsdp_config, str):
        cfg.fsdp_config = _absolute(_resolve_beside(cfg.fsdp_config, config_dir) if config_dir else cfg.fsdp_config)
    for key in ("logging_dir", "dataset_cache_dir"):
        if getattr(cfg, key):
            setattr(cfg, key, _absolute(getattr(cfg, key)))
    if sample_prompts_file(cfg.sample_prompts) is not None:
        cfg.sample_prompts = _absolute(str(cfg.sample_prompts))
    if isinstance(cfg.resume_from_checkpoint, str):
        cfg.resume_from_checkpoint = _absolute(cfg.resume_from_checkpoint)
    if cfg.deepspeed:
        base = _resolve_beside(cfg.deepspeed, config_dir) if config_dir is not None else cfg.deepspeed
        cfg.deepspeed = _absolute(base)
    return cfg


# sample_prompts given as one string: a prompts file when it ends like one, else one prompt.
PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json")


def sample_prompts_file(value: str | list[str] | None) -> str | None:
    """The prompts file ``sample_prompts`` names (a string ending in .txt, .jsonl or .json), else None."""
    if isinstance(value, str) and Path(value.strip()).suffix.lower() in PROMPT_FILE_SUFFIXES:
        return value.strip()
    return None


def _absolute(path: str) -> str:
    # abspath, not resolve(): a symlinked folder is recorded by the name the user gave it
    return os.path.abspath(os.path.expanduser(path))


def _registered_names(dataset_dir: str | None) -> set[str]:
    if not dataset_dir:
        return set()
    try:
        registry = json.loads((Path(dataset_dir) / REGISTRY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return set(registry) if isinstance(registry, dict) else set()


def _absolute_if_exists(name: str, registered: set[str]) -> str:
    # The reader looks a name up in the registry first, so a registered name stays a name.
    if name in registered or not Path(name).expanduser().exists():
        return name
    return _absolute(name)


# ---------------------------------------------------------------------------------------------------------------
# Validation


def build_config(values: dict[str, tuple[Any, str]]) -> RunConfig:
    """Check every key and value (``{key: (value, where)}``) and build the config; the first problem is raised."""
    kwargs: dict[str, Any] = {}
    aliased: dict[str, Any] = {}
    stage = values.get("stage")
    if stage is not None:  # first: a DPO YAML's other keys would be refused for the wrong reason
        _check_value("stage", *stage)
    for key, (value, where) in values.items():
        if key in ALIASES:
            target, convert = ALIASES[key]
            mapped = convert(value)
            if mapped is not None:
                aliased[target] = _check_value(target, mapped, where)
            continue
        if key in UNSUPPORTED_KEYS:
            if value not in _OFF_VALUES:
                raise ConfigError(f"{key}: {UNSUPPORTED_KEYS[key]} is not available in tnlora; got {value!r}")
            continue
        if key in _FIXED_KEYS:
            accepted, feature = _FIXED_KEYS[key]
            if value is not None and value not in accepted:
                raise ConfigError(f"{key}: {feature} is not available in tnlora; got {value!r}")
            continue
        if key not in FIELDS:
            raise ConfigError(_unknown_key_message(key, where))
        kwargs[key] = _check_value(key, value, where)
    for key, value in aliased.items():
        kwargs.setdefault(key, value)
    cfg = RunConfig(**kwargs)
    for name, f in FIELDS.items():
        if f.metadata.get("required") and not getattr(cfg, name):
            raise ConfigError(f"{name}: required (set it in the YAML file or pass --{name} VALUE)")
    _check_combinations(cfg)
    return cfg


def _unknown_key_message(key: str, where: str) -> str:
    src = "" if where.startswith("--") else f" in {where}"
    if _is_trainer_option(key):
        # Not a near-miss of a tnlora key: e.g. eval_delay is no typo of eval_steps.
        return f"unknown config key '{key}'{src}: a TrainingArguments option tnlora does not pass on"
    close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key '{key}'{src}{hint}"


def _is_trainer_option(key: str) -> bool:
    try:
        from transformers import TrainingArguments  # only on this error path: it is slow to import
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return key in {f.name for f in dataclasses.fields(TrainingArguments)}


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
    parts = [names.get(o, "a mapping" if typing.get_origin(o) is dict else "a list of strings") for o in options]
    return " or ".join(parts)


def _coerce(key: str, value: Any, options: list[Any], src: str) -> Any:
    list_field = any(typing.get_origin(tp) is list for tp in options)
    if src and list_field and isinstance(value, str) and value.lstrip().startswith("["):
        # from the command line: a list as JSON (or a YAML flow list), e.g. --sample_prompts '["Hi", "Who?"]'
        with contextlib.suppress(yaml.YAMLError):
            parsed = yaml.safe_load(value)
            if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
                return parsed
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
        elif typing.get_origin(tp) is dict:
            if isinstance(value, str):  # from the command line: a JSON (or YAML flow) mapping
                with contextlib.suppress(yaml.YAMLError):
                    value = yaml.safe_load(value)
            if isinstance(value, dict) and all(isinstance(k, str) for k in value):
                return dict(value)
    raise ConfigError(f"{key}: expected {_describe(options)}, got {value!r}{src}")


# keys written as "a,b" in LLaMA-Factory that YAML users also write as lists
_LIST_AS_COMMA_STRING = {
    "dataset",
    "eval_dataset",
    "lora_target",
    "additional_target",
    "add_special_tokens",
    "report_to",
}


def _check_range(key: str, value: Any, meta: typing.Mapping[str, Any], src: str) -> None:
    if "choices" in meta:
        choices = meta["choices"]
        candidate = value
        if key == "report_to":
            bad = [v for v in split_list(value) if v not in choices]
            candidate = bad[0] if bad else choices[0]
        if candidate not in choices:
            raise ConfigError(_choice_message(key, candidate, choices, src))
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


def _choice_message(key: str, value: Any, choices: tuple[Any, ...], src: str) -> str:
    """A refused choice; values that name a feature tnlora does not have say so."""
    shown = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
    if key == "stage" and value in _STAGES:
        return f"stage: {_STAGES[value]} ({value!r}) is not available in tnlora, which trains sft only{src}"
    if key == "report_to" and value in _REPORTERS:
        return f"report_to: logging to {_REPORTERS[value]} ({value!r}) is not available in tnlora; use {shown}{src}"
    if key == "do_train":
        return (
            "do_train: tnlora train always trains; to predict with a trained adapter (do_predict) run tnlora eval "
            f"CONFIG.yaml{src}"
        )
    if key == "fp16":
        return (
            "fp16: fp16 mixed precision is not available in tnlora (use bf16: true on a GPU that has bf16, "
            f"else fp32){src}"
        )
    if key == "quantization_bit":
        return (
            f"quantization_bit: 4 (QLoRA: NF4/FP4) or 8 (LLM.int8()), the widths bitsandbytes trains with; got "
            f"{value!r}{src}"
        )
    if key == "quantization_method":
        return (
            f"quantization_method: {value!r} is not available in tnlora, which quantizes with bitsandbytes (bnb)"
            f"{src}"
        )
    return f"{key}: must be one of {shown}; got {value!r}{src}"


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
    if cfg.quantization_bit is not None and cfg.finetuning_type != "lora":
        raise ConfigError(
            f"quantization_bit: a quantized base trains LoRA adapters only (QLoRA), not finetuning_type: "
            f"{cfg.finetuning_type}; drop quantization_bit or use finetuning_type: lora"
        )
    if cfg.quantization_bit is not None and cfg.bf16 is False:
        raise ConfigError(
            "bf16: a quantized base (quantization_bit) computes in bf16; set bf16: true or drop quantization_bit"
        )
    if cfg.checkpoint_regions == "mixers" and cfg.use_unsloth_gc:
        raise ConfigError(
            "checkpoint_regions: mixers keeps each layer's middle residual on the GPU, use_unsloth_gc moves layer "
            "inputs off it; set one of them"
        )
    if cfg.uncheckpointed_layers and cfg.gradient_checkpointing is False:
        raise ConfigError(
            "uncheckpointed_layers: applies under gradient checkpointing, which is off (gradient_checkpointing: "
            "false); drop one of them"
        )
    if cfg.freeze_trainable_layers == 0:
        raise ConfigError("freeze_trainable_layers: must not be 0 (n > 0: last n layers, n < 0: first n)")
    if not split_list(cfg.dataset):
        raise ConfigError("dataset: required (a file, a comma list, or a name in dataset_info.json)")
    if cfg.finetuning_type == "lora" and not cfg.lora_targets():
        raise ConfigError('lora_target: empty; use "all" or a comma list of module names')
    if cfg.eval_dataset and cfg.val_size > 0:
        raise ConfigError("eval_dataset: set either eval_dataset or val_size, not both")
    if cfg.do_predict and not (cfg.val_size > 0 or cfg.eval_dataset):
        raise ConfigError("do_predict: needs an eval set to predict; set val_size (a held-out part) or eval_dataset")
    if cfg.predict_with_generate and not cfg.do_predict:
        raise ConfigError(
            "predict_with_generate: set do_predict: true too (tnlora predicts after training, on the eval set; "
            "for an adapter already trained: tnlora eval CONFIG.yaml)"
        )
    if cfg.eval_strategy in ("steps", "epoch") and not (cfg.val_size > 0 or cfg.eval_dataset):
        raise ConfigError(
            f"eval_strategy: {cfg.eval_strategy} needs an eval set; set val_size (a held-out part) or eval_dataset"
        )
    if isinstance(cfg.resume_from_checkpoint, str) and cfg.resume_from_checkpoint.strip().lower() in (
        "true",
        "false",
        "last",
    ):
        word = cfg.resume_from_checkpoint.strip().lower()
        cfg.resume_from_checkpoint = word != "false"
    if cfg.resume_from_checkpoint is False:
        cfg.resume_from_checkpoint = None
    _check_sharding(cfg)
    if cfg.fp8:
        _check_fp8(cfg)


def _check_fp8(cfg: RunConfig) -> None:
    """fp8 runs inside the fused LoRA layer, over a plain bf16 / fp32 base (the engines: train.distributed.
    check_engine)."""
    if cfg.finetuning_type != "lora":
        raise ConfigError(
            f"fp8: computes the frozen base weights' GEMMs of LoRA training in fp8, not finetuning_type: "
            f"{cfg.finetuning_type}; drop fp8 or use finetuning_type: lora"
        )
    if cfg.quantization_bit is not None:
        raise ConfigError("fp8: the base is already quantized (quantization_bit); set one of them")
    if cfg.lora_kernel != "fused":
        raise ConfigError("fp8: runs in the fused LoRA layer; set lora_kernel: fused (the default) or drop fp8")
    if cfg.use_dora:
        raise ConfigError("fp8: DoRA layers keep peft's own forward, which has no fp8 form; drop one of them")


# The words of the Trainer's (and LLaMA-Factory's) ``fsdp`` string that FSDP2 has.
FSDP_WORDS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")


def _check_sharding(cfg: RunConfig) -> None:
    """``fsdp`` / ``deepspeed``: known FSDP2 words, one engine at a time (the files are read in preflight)."""
    if cfg.fsdp is False or (isinstance(cfg.fsdp, str) and cfg.fsdp.strip().lower() in ("", "false", "none")):
        cfg.fsdp = None
    if cfg.fsdp is True:
        cfg.fsdp = "full_shard"
    if cfg.fsdp is not None:
        words = cfg.fsdp.replace(",", " ").split()
        unknown = [w for w in words if w not in FSDP_WORDS]
        if unknown:
            hybrid = " (hybrid_shard and no_shard are FSDP1 strategies; tnlora runs FSDP2)" if any(
                "hybrid" in w or w == "no_shard" for w in unknown
            ) else ""
            raise ConfigError(
                f"fsdp: unknown option {unknown[0]!r}{hybrid}; use full_shard or shard_grad_op, optionally with "
                "offload (e.g. fsdp: full_shard)"
            )
        if "full_shard" in words and "shard_grad_op" in words:
            raise ConfigError("fsdp: full_shard and shard_grad_op exclude each other; choose one")
        cfg.fsdp = " ".join(words) if any(w in words for w in ("full_shard", "shard_grad_op")) else " ".join(
            ["full_shard", *words]
        )
    elif cfg.fsdp_config:
        raise ConfigError("fsdp_config: set fsdp: full_shard too (fsdp_config only configures FSDP)")
    if cfg.deepspeed is not None and not str(cfg.deepspeed).strip():
        cfg.deepspeed = None
    if cfg.deepspeed and cfg.fsdp:
        raise ConfigError("deepspeed: set either deepspeed or fsdp, not both (they are two ways to shard a model)")


# ---------------------------------------------------------------------------------------------------------------
# Defaults that depend on the machine


# Examples per micro-batch when unpacked (LLaMA-Factory's and the Trainer's 8).
DEFAULT_BATCH_SIZE = 8
# Tokens per micro-batch of packed rows when the batch size is left to us: the fla kernel runs the rows as one
# sequence, and with fewer tokens a step is bound by kernel launches, not the GPU (benchmarks/RESULTS.md, the
# 1B ladder).
PACKED_TOKENS_PER_MICRO_BATCH = 16_384
# On a GPU where the memory estimate says it fits without checkpointing: twice that. The optimizer step and the
# step's fixed host work are spread over twice the tokens.
LARGE_PACKED_TOKENS_PER_MICRO_BATCH = 32_768
# Where not even 16,384 fit without checkpointing: half, when that fits. Checkpointing recomputes every layer's
# forward, half again the work of a LoRA step (forward + input gradients); halving the rows costs only the
# step's fixed work.
SMALL_PACKED_TOKENS_PER_MICRO_BATCH = 8_192


# Where not even 8,192 tokens fit without checkpointing (24 GB and smaller cards): the budgets tried with
# checkpointing, largest first, before the checkpoints' inputs are moved to CPU memory (use_unsloth_gc), which
# copies every layer's input out and back each micro-batch where a smaller micro-batch costs only the step's
# fixed work. The last mode left open keeps halving its budget down to one row (see ``memory_plans``).
CHECKPOINTED_TOKENS_PER_MICRO_BATCH = (16_384, 8_192, 4_096)
OFFLOADED_TOKENS_PER_MICRO_BATCH = 16_384


# Compiling the decoder layers pays only on long runs: at the steady rate compiled layers are ~1 % ahead of eager
# ones (the fused LoRA operations, the Triton norms and activation kernels: 7B +0.9 %, 1B +1.1 % on an H100),
# against about a minute of compiling in the first steps: at 7B's ~19,000 tokens/s, 1 % of the steps adds up to
# that minute after ~110 M tokens (benchmarks/RESULTS.md, the 7B rows and "tnlora train end to end"). Unset,
# torch_compile is on only from this many training tokens.
COMPILE_MIN_TOKENS = 100_000_000


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
    trains at least ``COMPILE_MIN_TOKENS`` tokens, or ``train_tokens`` is not known, and not over a quantized
    base); the fused AdamW on a GPU; alpha = 2 × rank.

    The micro-batch, gradient checkpointing and its offload (``use_unsloth_gc``) come from ``fits`` (on a GPU:
    whether a resolved config is estimated to fit its memory, ``train.memory.gpu_fits``): packed micro-batches
    take the first of ``memory_plans`` that fits (the largest of 32,768, 16,384 and 8,192 tokens without
    checkpointing, then 16,384 to 4,096 with it, then offloaded down to one row), unpacked ones the first of
    ``unpacked_plans`` (8 rows halving, by the same rules, down to one offloaded row); when none does, a
    ``ConfigError`` names the key to change. With the micro-batch given, checkpointing and then offload are
    switched on only as far as needed. Under checkpointing without offload (and without FSDP / DeepSpeed),
    ``checkpoint_regions`` and ``uncheckpointed_layers`` take the first of ``recompute_plans`` that fits (the
    least recompute); otherwise "layer" and 0. Without ``fits`` (CPU): 16,384 packed tokens or 8
    examples, no checkpointing. What the user set is kept."""
    out = dataclasses.replace(cfg)
    if out.bf16 is None:
        out.bf16 = bool(cuda and cuda_bf16)
    elif out.bf16 and cuda and not cuda_bf16:
        raise ConfigError("bf16: this GPU does not support bfloat16; set bf16: false")
    if out.quantization_bit is not None and not cuda:
        raise ConfigError(NO_GPU_FOR_QUANTIZATION)
    if out.quantization_bit is not None and not out.bf16:
        raise ConfigError("quantization_bit: a quantized base computes in bf16, which this GPU does not support")
    if out.fp8 and cuda and not out.bf16:
        raise ConfigError("fp8: the fp8 GEMMs return bf16 on a GPU; set bf16: true (or drop fp8)")
    if out.packing is None:
        out.packing = bool(cuda)
    if out.torch_compile is None:
        # bitsandbytes' quantized layers are left to run eagerly unless asked (torch_compile: true).
        long_enough = train_tokens is None or train_tokens >= COMPILE_MIN_TOKENS
        out.torch_compile = bool(cuda) and long_enough and out.quantization_bit is None
    if out.optim is None:
        # The fused AdamW updates all LoRA tensors in a few kernels; the foreach one launches dozens per step.
        out.optim = "adamw_torch_fused" if cuda else "adamw_torch"
    if out.use_unsloth_gc:
        out.gradient_checkpointing = True
    elif out.gradient_checkpointing is False:
        out.use_unsloth_gc = False  # offloaded checkpointing is checkpointing
    decide = cuda and fits is not None
    if out.per_device_train_batch_size is None:
        out.per_device_train_batch_size = (
            max(1, PACKED_TOKENS_PER_MICRO_BATCH // out.cutoff_len) if out.packing else DEFAULT_BATCH_SIZE
        )
        if decide:
            plans = memory_plans(out) if out.packing else unpacked_plans(out)
            chosen = next((plan for plan in plans if fits(plan)), None)
            if chosen is None:
                raise ConfigError(no_fit_message(plans[-1], getattr(fits, "describe", None)))
            out = chosen
    if out.gradient_checkpointing is None or out.use_unsloth_gc is None:
        modes = _open_modes(out) if decide else [(bool(out.gradient_checkpointing), bool(out.use_unsloth_gc))]
        candidates = [dataclasses.replace(out, gradient_checkpointing=gc, use_unsloth_gc=off) for gc, off in modes]
        # Given the micro-batch, the least checkpointing that fits; if nothing does, the most (an out-of-memory
        # error then names the micro-batch).
        out = next((c for c in candidates if fits(c)), candidates[-1]) if decide else candidates[0]
    if out.checkpoint_regions is None or out.uncheckpointed_layers is None:
        # Not searched under FSDP / DeepSpeed: their wrappers are not tested with these regions.
        engine = out.fsdp or out.deepspeed
        if decide and out.gradient_checkpointing and not out.use_unsloth_gc and not engine:
            plans = recompute_plans(out)
            out = next((plan for plan in plans if fits(plan)), plans[-1])
        out.checkpoint_regions = out.checkpoint_regions or "layer"
        out.uncheckpointed_layers = out.uncheckpointed_layers or 0
    if out.lora_alpha is None:
        out.lora_alpha = float(2 * out.lora_rank)
    if out.eval_steps is None:
        out.eval_steps = out.save_steps
    return out


def _open_modes(cfg: RunConfig) -> list[tuple[bool, bool]]:
    """(gradient_checkpointing, use_unsloth_gc) pairs the config leaves possible, least memory-saving first
    (``checkpoint_regions: mixers`` leaves out offload)."""
    modes = [(False, False), (True, False), (True, True)]
    return [
        (gc, off)
        for gc, off in modes
        if cfg.gradient_checkpointing in (None, gc)
        and cfg.use_unsloth_gc in (None, off)
        and not (off and cfg.checkpoint_regions == "mixers")
    ]


def recompute_plans(cfg: RunConfig) -> list[RunConfig]:
    """Under checkpointing without offload, ``cfg`` with each (checkpoint_regions, uncheckpointed_layers) pair
    it leaves open, least recompute first, ending with the whole layers all checkpointed (the least memory).

    Ranked by the layer forwards a step's recompute leaves out: one per un-checkpointed layer (at most all
    but one: checkpointing stays on) and, with the mixers apart, the output projection's share of each
    checkpointed layer's linear layers (the model's config, read from ``model_name_or_path``). Measured at
    131,072 tokens on 7B the order held (benchmarks/RESULTS.md, "Long sequences")."""
    from tnlora.model.hub import load_model_config

    config = load_model_config(cfg.model_name_or_path)
    layers, hidden, glu = config.decoder_layers, config.hidden_dim, config.glu_dim
    # the token mixer's qkvu (4 h) and out_proj (h), the channel mixer's l1, l2 and l3 (g each), times d
    share = hidden / (5 * hidden + 3 * glu)
    regions = [cfg.checkpoint_regions] if cfg.checkpoint_regions else list(CHECKPOINT_REGIONS)
    kept = [cfg.uncheckpointed_layers] if cfg.uncheckpointed_layers is not None else range(layers)
    ranked = sorted(
        ((k + (share * (layers - k) if r == "mixers" else 0.0), r == "mixers", r, k) for r in regions for k in kept),
        key=lambda plan: (-plan[0], plan[1]),
    )
    return [dataclasses.replace(cfg, checkpoint_regions=r, uncheckpointed_layers=k) for _, _, r, k in ranked]


def memory_plans(cfg: RunConfig) -> list[RunConfig]:
    """The packed micro-batches the defaults try, in order: ``cfg`` with rows, checkpointing and offload set.

    Without checkpointing 32,768, 16,384 and 8,192 tokens; with it 16,384 to 4,096
    (``CHECKPOINTED_TOKENS_PER_MICRO_BATCH``); offloaded from 16,384 tokens. The last mode the config leaves
    open (``gradient_checkpointing`` / ``use_unsloth_gc`` set to false close some) keeps halving down to one
    ``cutoff_len`` row, the smallest micro-batch there is: cutoff_len stays the user's.
    """
    budgets = {
        (False, False): [LARGE_PACKED_TOKENS_PER_MICRO_BATCH, PACKED_TOKENS_PER_MICRO_BATCH,
                         SMALL_PACKED_TOKENS_PER_MICRO_BATCH],
        (True, False): list(CHECKPOINTED_TOKENS_PER_MICRO_BATCH),
        (True, True): [OFFLOADED_TOKENS_PER_MICRO_BATCH],
    }  # fmt: skip
    modes = _open_modes(cfg)
    plans: list[RunConfig] = []
    seen: set[tuple[int, bool, bool]] = set()
    for gc, off in modes:
        tokens = list(budgets[(gc, off)])
        if (gc, off) == modes[-1]:
            while tokens[-1] > cfg.cutoff_len:
                tokens.append(tokens[-1] // 2)
        for budget in tokens:
            rows = max(1, budget // cfg.cutoff_len)
            if (rows, gc, off) not in seen:
                seen.add((rows, gc, off))
                plans.append(
                    dataclasses.replace(
                        cfg, per_device_train_batch_size=rows, gradient_checkpointing=gc, use_unsloth_gc=off
                    )
                )
    return plans


def unpacked_plans(cfg: RunConfig) -> list[RunConfig]:
    """The micro-batches of unpacked rows the defaults try, in order, by the rules of ``memory_plans``: each
    checkpointing mode the config leaves open, least memory-saving first, from ``DEFAULT_BATCH_SIZE`` rows
    (checkpointed: no more than the packed plans' 16,384 tokens, one row at least) halving while the rows still
    hold 8,192 tokens without checkpointing or 4,096 with it, and in the last mode down to one row. Padded rows
    are sized by ``cutoff_len``, the longest they can be: long rows (e.g. 131,072 tokens) get one checkpointed
    row instead of eight that cannot fit, and the memory left goes to less recompute (``recompute_plans``)."""
    floors = {
        (False, False): SMALL_PACKED_TOKENS_PER_MICRO_BATCH,
        (True, False): min(CHECKPOINTED_TOKENS_PER_MICRO_BATCH),
    }
    modes = _open_modes(cfg)
    plans: list[RunConfig] = []
    for gc, off in modes:
        floor = 0 if (gc, off) == modes[-1] else floors.get((gc, off), 0)
        # checkpointed: no more tokens a micro-batch than the packed plans' largest (long rows: one)
        most = max(CHECKPOINTED_TOKENS_PER_MICRO_BATCH) // cfg.cutoff_len if gc else DEFAULT_BATCH_SIZE
        rows = max(1, min(DEFAULT_BATCH_SIZE, most))
        while True:
            plans.append(
                dataclasses.replace(cfg, per_device_train_batch_size=rows, gradient_checkpointing=gc, use_unsloth_gc=off)
            )
            if rows == 1 or (rows // 2) * cfg.cutoff_len < floor:
                break
            rows //= 2
    return plans


def no_fit_message(smallest: RunConfig, describe: Callable[[RunConfig], str] | None = None) -> str:
    """One line for a run whose smallest micro-batch is estimated not to fit the GPU: what was tried, and the key
    to change first."""
    how = (
        "offloaded checkpointing"
        if smallest.use_unsloth_gc
        else "gradient checkpointing"
        if smallest.gradient_checkpointing
        else "no checkpointing"
    )
    rows = smallest.per_device_train_batch_size
    shape = f"one {smallest.cutoff_len:,}-token row" if rows == 1 else f"{rows} rows of {smallest.cutoff_len:,}"
    estimate = f" ({describe(smallest)})" if describe is not None else ""
    tried = f"{smallest.model_name_or_path} does not fit this GPU even with {shape} a micro-batch and {how}{estimate}"
    if smallest.finetuning_type != "lora":
        return f"finetuning_type: {tried}; use finetuning_type: lora (with quantization_bit: 4 on small cards)"
    if not smallest.gradient_checkpointing:
        return f"gradient_checkpointing: {tried}; set gradient_checkpointing: true (or leave it unset)"
    if smallest.checkpoint_regions == "mixers":
        return f"checkpoint_regions: {tried} with the mixers apart; set checkpoint_regions: layer (or leave it unset)"
    if not smallest.use_unsloth_gc:
        return f"use_unsloth_gc: {tried}; set use_unsloth_gc: true (or leave it unset)"
    if smallest.quantization_bit != 4:
        return f"quantization_bit: {tried}; set quantization_bit: 4 (QLoRA: 4-bit base weights), or a smaller cutoff_len"
    return f"cutoff_len: {tried}; set a smaller cutoff_len (or a GPU with more memory)"


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


# ---------------------------------------------------------------------------------------------------------------
# Run YAMLs of the other verbs (LLaMA-Factory's inference and export YAMLs)

# LLaMA-Factory's names for options of chat, generate, eval and merge/export.
VERB_KEY_NAMES: dict[str, str] = {
    "model_name_or_path": "model",
    "adapter_name_or_path": "adapter",
    "default_system": "system",
    "infer_dtype": "dtype",
    "export_dir": "output",
    "eval_dataset": "dataset",
    "per_device_eval_batch_size": "batch_size",
    # LLaMA-Factory's prediction YAML (examples/train_lora/*_lora_predict.yaml) for `tnlora eval`
    "do_predict": "predict",
    "predict_with_generate": "predict",
    "output_dir": "output",
    "overwrite_output_dir": "overwrite",
}
# Keys accepted with the values that match what tnlora does (None: any value): key -> (values, feature).
_VERB_FIXED: dict[str, tuple[tuple[Any, ...] | None, str]] = {
    "trust_remote_code": (None, ""),
    "finetuning_type": (("lora", "full", "freeze"), "this fine-tuning method"),
    "infer_backend": (("huggingface",), "this inference backend (tnlora generates with transformers)"),
    "stage": (("sft",), "this training stage"),
    "export_legacy_format": ((False,), "the legacy .bin export format (tnlora writes safetensors)"),
    "quantization_method": (("bnb",), "this quantization method (tnlora quantizes with bitsandbytes)"),
    "flash_attn": (("auto", "disabled"), "a softmax-attention kernel (TransNormerLLM's attention is attention_impl)"),
    # How LLaMA-Factory prepares and runs prediction; the results do not depend on them.
    "overwrite_cache": (None, ""),
    "preprocessing_num_workers": (None, ""),
    "dataloader_num_workers": (None, ""),
    "ddp_timeout": (None, ""),
}
_VERB_UNSUPPORTED: dict[str, str] = {
    "export_hub_model_id": "uploading to the Hugging Face Hub",
    "export_quantization_bit": "quantized export",
    "export_quantization_dataset": "quantized export",
    "quantization_bit": "a quantized export (a QLoRA adapter is merged onto its base dequantized to bf16)",
    "task": "benchmark tasks (tnlora eval measures loss and perplexity on a dataset)",
}


def verb_config_argv(verb: str, path: str | Path, options: typing.Collection[str]) -> tuple[list[str], list[str]]:
    """A chat / generate / eval / merge YAML as ``--option value`` arguments of that verb (put before the user's
    own arguments, which then win), plus notes to print. ``options`` are the verb's option names; LLaMA-Factory's
    key names are mapped onto them (``VERB_KEY_NAMES``)."""
    argv: list[str] = []
    notes: list[str] = []
    for key, value in read_yaml_mapping(path).items():
        option = VERB_KEY_NAMES.get(key, key)
        if key in _VERB_UNSUPPORTED and option not in options:
            if value not in _OFF_VALUES:
                raise ConfigError(f"{key}: {_VERB_UNSUPPORTED[key]} is not available in tnlora; got {value!r}")
            continue
        if key in _VERB_FIXED and option not in options:
            accepted, feature = _VERB_FIXED[key]
            if accepted is not None and value not in accepted:
                raise ConfigError(f"{key}: {feature} is not available in tnlora {verb}; got {value!r}")
            if key == "trust_remote_code" and value:
                notes.append("trust_remote_code: ignored; tnlora never runs a model's remote code")
            continue
        if option not in options:
            known = sorted(set(options) | {k for k, v in VERB_KEY_NAMES.items() if v in options})
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{key}' in {path} for tnlora {verb}{hint}")
        if value is None:
            continue
        if key == "adapter_name_or_path" and len(split_list(str(value))) > 1:
            raise ConfigError(f"{key}: one adapter at a time (got {value!r}); merge them one after the other")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list):
            text = ",".join(str(v) for v in value)
        else:
            text = str(value)
        argv += [f"--{option}", text]
    return argv, notes


def key_value_argv(argv: list[str], options: typing.Mapping[str, bool]) -> list[str]:
    """LLaMA-Factory's ``key=value`` overrides as ``--key value`` for a verb whose ``options`` map each option
    name to whether it must take a value (a token after such an option is its value, even if it holds "=")."""
    out: list[str] = []
    takes_value = False
    for token in argv:
        pair = _KEY_VALUE.match(token)
        if pair and not takes_value and not token.startswith("-"):
            option = VERB_KEY_NAMES.get(pair[1], pair[1])
            if option in options:
                out += [f"--{option}", pair[2]]
                continue
        out.append(token)
        name = token[2:].partition("=")[0] if token.startswith("--") else None
        takes_value = bool(name) and "=" not in token and options.get(name, False)
    return out
