"""The training recipe, in the order it happens: preflight → tokenizer → data → machine defaults → model →
Trainer → save.

``train(cfg)`` is the whole flow and reads top to bottom. Its steps are separate functions
(``build_tokenizer``, ``load_examples``, ``resolve_for_this_machine``, ``bundle_from_examples``,
``build_model``, ``build_trainer``) so the GPU benchmark can reuse the exact model / data / collator /
optimizer setup without running the loop. The pieces it uses live by what they are: model loading in
``tnlora.model.loading``, the collators in ``tnlora.data.collate``, the Trainer in ``train.trainer``, layer
compilation in ``train.compile``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from tnlora.config import (
    COMPILE_MIN_TOKENS,
    DEFAULT_BATCH_SIZE,
    PACKED_TOKENS_PER_MICRO_BATCH,
    RunConfig,
    resolve_defaults,
    save_run_config,
    split_list,
)
from tnlora.data.collate import (
    DataBundle,
    PackingCollator,
    PaddingCollator,
    TrainingCollator,
    as_row,
    pack_examples,
)
from tnlora.data.templates import TEMPLATE_FILE
from tnlora.errors import ConfigError, RunInterrupted, TnloraError
from tnlora.model.loading import load_base_model
from tnlora.model.tokenizer import pad_token_id
from tnlora.ops.fp8 import CUDA_MIN_CAPABILITY as FP8_MIN_CAPABILITY
from tnlora.outputs import OutputPlan, claim_dir, clear_previous, foreign_entries, plan_dir
from tnlora.train import distributed
from tnlora.train.compile import compile_decoder_layers, uncompile_decoder_layers
from tnlora.train.trainer import _json_safe, build_trainer, final_eval_metrics, training_arguments

LOSS_PLOT = "loss.png"
TRAINER_STATE = "trainer_state.json"
ALL_RESULTS = "all_results.json"


@dataclass
class Examples:
    """The encoded data of a run, before it is packed or batched."""

    train: list[Any]
    eval: list[Any]
    stats: dict[str, Any]
    eval_conversations: list[Any] = field(default_factory=list)  # what do_predict answers


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    global_step: int
    train_loss: float
    metrics: dict[str, float]
    trainable_params: int
    total_params: int
    log_history: list[dict[str, Any]]
    config: RunConfig | None = None
    model: Any = None  # the trained (peft-wrapped) model, in memory
    tokenizer: Any = None
    template: Any = None
    samples: list[dict[str, Any]] | None = None  # the last sample replies (sample_prompts)


def _say(message: str) -> None:
    if distributed.is_main():  # several processes: the run's messages once
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Preflight: everything that can be refused before a model is loaded (nothing is written or deleted)


def preflight(cfg: RunConfig, processes: int | None = None) -> tuple[RunConfig, OutputPlan, str | None]:
    """Check the model (its config only), template, tensorboard, the LoRA targets (on the module tree built on
    the meta device) and the output dir; nothing is loaded, written or deleted, and the machine defaults are
    left open (they are resolved once the data is read).

    Returns the config with the model as the run records it, what writing output_dir will replace, and the
    checkpoint to resume from (or ``None``). The data is checked by ``train`` next, still before anything is
    deleted. ``processes``: how many will train (default: this launch's world size), for ``tnlora train
    --nproc_per_node N``, which checks once before starting them.
    """
    if cfg.trust_remote_code:
        _say("trust_remote_code: ignored; tnlora never runs a model's remote code (TransNormerLLM is built in)")
    cfg = with_model_source(cfg)
    get_template_checked(cfg.template)
    if "tensorboard" in split_list(cfg.report_to):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("report_to: tensorboard is not installed (pip install tensorboard)") from None
    if cfg.attention_impl in ("fla", "triton") and not torch.cuda.is_available():
        raise ConfigError(f"attention_impl: {cfg.attention_impl!r} needs a CUDA GPU; use auto or chunked on CPU")
    if cfg.quantization_bit is not None:
        from tnlora.model.quantization import check_quantization_available

        check_quantization_available()  # a GPU, then bitsandbytes
    distributed.check_engine(cfg, cuda=torch.cuda.is_available())
    check_finetuning_targets(cfg)
    if cfg.sample_prompts:
        from tnlora.train.callbacks import read_sample_prompts

        read_sample_prompts(cfg.sample_prompts)  # a missing or bad prompts file: refused now
    if cfg.do_predict:
        from tnlora.infer.metrics import check_metric_libraries

        check_metric_libraries()
    plan, resume = plan_output_dir(cfg)
    if resume is not None and (processes or distributed.world_size()) > 1 and not torch.cuda.is_available():
        check_resume_of_cpu_processes()
    from tnlora.train.checkpoints import check_writable

    check_writable(cfg.output_dir)
    return cfg, plan, resume


# transformers 5.17 loads a resumed run's optimizer state with map_location = the process's device when several
# processes train; on the CPU that is "cpu:<rank>", a location torch cannot restore. 5.18 loads it onto "cpu".
CPU_PROCESSES_RESUME_TRANSFORMERS = "5.18"


def check_resume_of_cpu_processes() -> None:
    """Refuse to resume a run of several CPU processes on a transformers that cannot load its optimizer state."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(CPU_PROCESSES_RESUME_TRANSFORMERS):
        raise ConfigError(
            f"resume_from_checkpoint: resuming a run of several CPU processes needs transformers "
            f"{CPU_PROCESSES_RESUME_TRANSFORMERS} or later (transformers {transformers.__version__} loads the "
            "optimizer state onto 'cpu:<rank>', which torch cannot restore); pip install -U transformers"
        )


def resolve_for_this_machine(cfg: RunConfig, train_tokens: int | None = None, announce: bool = True) -> RunConfig:
    """``resolve_defaults`` with this machine's GPU (and its memory) and, once the data is known, the run's
    training tokens; says when it switched gradient checkpointing on, or chose checkpoint regions other than
    whole layers all recomputed (unless not ``announce``)."""
    cuda = torch.cuda.is_available()
    if cfg.fp8 and cuda and torch.cuda.get_device_capability() < FP8_MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability()
        raise ConfigError(
            f"fp8: this GPU (compute capability {major}.{minor}) has no fp8 tensor cores (8.9 or later: Ada, "
            "Hopper); drop fp8"
        )
    if (cfg.deepspeed or cfg.fsdp) and cfg.torch_compile is None:
        cfg = dataclasses.replace(cfg, torch_compile=False)  # compiled layers are not combined with the engines
    fits = None
    if cuda:
        from tnlora.train.memory import gpu_fits

        fits = gpu_fits()
    chosen = cfg.gradient_checkpointing
    resolved = resolve_defaults(
        cfg, cuda=cuda, cuda_bf16=cuda and torch.cuda.is_bf16_supported(), fits=fits, train_tokens=train_tokens
    )
    if announce and chosen is None and resolved.gradient_checkpointing and not resolved.use_unsloth_gc:
        _say(
            f"gradient_checkpointing: on (micro-batches of {resolved.per_device_train_batch_size} × "
            f"{resolved.cutoff_len} tokens would not fit this GPU without it; set gradient_checkpointing: false "
            "to try anyway)"
        )
    picked = cfg.checkpoint_regions is None or cfg.uncheckpointed_layers is None
    if announce and picked and (resolved.checkpoint_regions, resolved.uncheckpointed_layers) != ("layer", 0):
        _say(
            f"checkpoint_regions: {resolved.checkpoint_regions}, uncheckpointed_layers: "
            f"{resolved.uncheckpointed_layers} (the memory checkpointing leaves free goes to less recompute; set "
            "checkpoint_regions: layer and uncheckpointed_layers: 0 to keep it free)"
        )
    if announce and cfg.use_unsloth_gc is None and resolved.use_unsloth_gc:
        _say(
            f"use_unsloth_gc: on (micro-batches of {resolved.per_device_train_batch_size} × {resolved.cutoff_len} "
            "tokens would not fit this GPU even with gradient checkpointing; each layer's input waits in CPU "
            "memory; set use_unsloth_gc: false to try anyway)"
        )
    return resolved


def quantization_of(cfg: RunConfig):  # -> tnlora.model.quantization.Quantization | None
    """How the run quantizes its base (None: it does not)."""
    if cfg.quantization_bit is None:
        return None
    from tnlora.model.quantization import Quantization

    return Quantization(cfg.quantization_bit, cfg.quantization_type, cfg.double_quantization)


def planned_train_tokens(cfg: RunConfig, examples: list[Any]) -> int:
    """The tokens the run will train on, before its micro-batch is resolved: the examples' tokens times the
    epochs, or, with ``max_steps``, steps × accumulation × the tokens of a micro-batch (the given batch, or the
    size the defaults start from: ``PACKED_TOKENS_PER_MICRO_BATCH`` packed, ``DEFAULT_BATCH_SIZE`` examples
    unpacked), at most what those steps' epochs hold. Padding is not counted; resumed steps are."""
    lengths = [len(e["input_ids"] if isinstance(e, dict) else e.input_ids) for e in examples]
    per_epoch = sum(lengths)
    if cfg.max_steps <= 0:
        return int(per_epoch * cfg.num_train_epochs)
    packing = cfg.packing if cfg.packing is not None else torch.cuda.is_available()
    mean = per_epoch / max(1, len(lengths))
    if cfg.per_device_train_batch_size:
        micro = cfg.per_device_train_batch_size * (cfg.cutoff_len if packing else mean)
    else:
        micro = PACKED_TOKENS_PER_MICRO_BATCH if packing else DEFAULT_BATCH_SIZE * mean
    return int(cfg.max_steps * cfg.gradient_accumulation_steps * min(micro, per_epoch))


def check_model_name(name: str) -> str:
    """The model as the run records it (a preset's canonical name, a directory's absolute path, a Hub id whose
    config.json is there); anything else is refused naming the key."""
    from tnlora.model.hub import model_source

    return model_source(name, key="model_name_or_path")


def with_model_source(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``model_name_or_path`` as :func:`check_model_name` records it."""
    return dataclasses.replace(cfg, model_name_or_path=check_model_name(cfg.model_name_or_path))


def check_finetuning_targets(cfg: RunConfig) -> None:
    """lora_target, additional_target, freeze_trainable_layers and uncheckpointed_layers checked against the
    model's module tree, built from its config on the meta device: a target that matches nothing is refused
    before any weight is read."""
    from tnlora.model import TransnormerForCausalLM
    from tnlora.model.hub import load_model_config
    from tnlora.train.lora import check_finetuning

    config = load_model_config(cfg.model_name_or_path)
    if (cfg.uncheckpointed_layers or 0) > config.decoder_layers:
        raise ConfigError(
            f"uncheckpointed_layers: {cfg.uncheckpointed_layers} but the model has only {config.decoder_layers} layers"
        )
    with torch.device("meta"):
        skeleton = TransnormerForCausalLM(config)
    check_finetuning(skeleton, cfg)


def get_template_checked(name: str, system: str | None = None):
    """The named chat template (its default system prompt replaced by ``system``); unknown → ``template`` error.

    The run's ``system`` goes into the template, so ``template.json`` carries it to chat and generate.
    """
    from tnlora.data.templates import get_template

    try:
        return get_template(name) if system is None else get_template(name, default_system=system)
    except TnloraError as exc:
        raise ConfigError(f"template: {exc}") from None
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"template: unknown template {name!r} ({exc})") from None


def plan_output_dir(cfg: RunConfig) -> tuple[OutputPlan, str | None]:
    """What writing output_dir will replace (nothing is deleted here) and the checkpoint to resume from.

    A non-empty output_dir is refused unless resuming, or overwriting an earlier tnlora training run that holds
    nothing tnlora did not write (``tnlora.outputs``); the base model, the data and the current folder are
    never valid output dirs. Resuming takes only a complete checkpoint of the run in output_dir, with a config
    that keeps its meaning (``train.checkpoints``); ``resume_from_checkpoint: true`` where no checkpoint was
    completed yet starts the run again from step 0.
    """
    from tnlora.train.checkpoints import check_owner, check_resume_config, resume_point

    out = Path(cfg.output_dir)
    inputs: dict[str, str | None] = {
        "the base model": cfg.model_name_or_path if Path(cfg.model_name_or_path).is_dir() else None,
        "the dataset folder": cfg.dataset_dir,
    }
    for name in split_list(cfg.dataset) + split_list(cfg.eval_dataset):
        inputs[f"the dataset {name}"] = name if Path(name).exists() else None
    resume, restart = None, False
    if cfg.resume_from_checkpoint:
        resume, restart = resume_point(cfg.resume_from_checkpoint, out)
        if resume is not None:
            check_owner(resume, out)
            check_resume_config(resume, cfg)  # the keys set; those left open once resolved, in train()
    try:
        plan = plan_dir(
            out,
            "train",
            key="output_dir",
            overwrite=cfg.overwrite_output_dir or restart,
            overwrite_flag="--overwrite_output_dir true to replace it or --resume_from_checkpoint true to continue it",
            inputs=inputs,
            resume=resume is not None,
        )
    except ConfigError:
        raise
    except TnloraError as exc:
        raise ConfigError(str(exc)) from None
    return plan, resume


def claim_output_dir(plan: OutputPlan, run_id: str | None = None) -> list[str]:
    """Replace the earlier run (its files only) and mark output_dir as this run's (``run_id``: the run's id, kept
    in the marker); returns the entries that were there already and are not the run's (files beside a resumed
    run), which the marker never lists."""
    keep = foreign_entries(plan.directory, "train") if plan.directory.is_dir() and not plan.remove else []
    clear_previous(plan)
    claim_dir(plan.directory, "train", exclude=keep, run_id=run_id)
    return keep


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer, data, model


def build_tokenizer(cfg: RunConfig):
    """The base model's tokenizer, plus any ``add_special_tokens`` (e.g. ``<|im_start|>,<|im_end|>``)."""
    from tokenizers import AddedToken

    from tnlora.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model_name_or_path)
    extra = split_list(cfg.add_special_tokens)
    if extra:
        # normalized=False: matched verbatim in text, so "<|im_end|>" in a rendered example becomes one id
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra], special_tokens=True)
    return tokenizer


def attach_chat_template(tokenizer, template) -> None:
    """Give the saved tokenizer the run's template as a Jinja chat_template (for apply_chat_template users)."""
    tokenizer.chat_template = template.to_jinja()


def added_token_ids(cfg: RunConfig, tokenizer) -> list[int]:
    """Ids of the tokens named in ``add_special_tokens`` (their embedding rows must train)."""
    return [tokenizer.convert_tokens_to_ids(t) for t in split_list(cfg.add_special_tokens)]


def load_examples(cfg: RunConfig, tokenizer, template) -> Examples:
    """Read, split (val_size, seeded) and encode the conversations (nothing here depends on the machine)."""
    from tnlora.data.encode import build_dataset, default_cache_dir
    from tnlora.data.readers import load_conversations

    conversations = load_conversations(cfg.dataset, cfg.dataset_dir)
    dropped = 0
    if cfg.dedup:
        from tnlora.data.audit import drop_exact_duplicates

        conversations, dropped = drop_exact_duplicates(conversations)
        _say(f"dedup: dropped {dropped} records that exactly repeat an earlier one ({len(conversations)} left)")
    if cfg.max_samples is not None:
        conversations = conversations[: cfg.max_samples]
    if not conversations:
        raise ConfigError(f"dataset: {cfg.dataset} holds no records")
    train_convs, eval_convs = split_validation(conversations, cfg.val_size, cfg.seed)
    if cfg.eval_dataset:
        eval_convs = load_conversations(cfg.eval_dataset, cfg.dataset_dir)
        if cfg.max_samples is not None:
            eval_convs = eval_convs[: cfg.max_samples]
    # The cache key covers the records' text, the tokenizer, the template and these settings. Several processes
    # share it: the main one encodes first (overwrite_cache: encodes again and replaces it), the others read it.
    several = distributed.world_size() > 1
    cache_dir = None if cfg.overwrite_cache and not several else (cfg.dataset_cache_dir or default_cache_dir())
    encode_kwargs = dict(
        cutoff_len=cfg.cutoff_len,
        train_on_prompt=cfg.train_on_prompt,
        mask_history=cfg.mask_history,
        cache_dir=cache_dir,
        num_workers=cfg.preprocessing_num_workers or 1,
        refresh=cfg.overwrite_cache and several and distributed.is_main(),
    )
    train_examples, train_stats = build_dataset(train_convs, tokenizer, template, **encode_kwargs)
    eval_examples: list[Any] = []
    if eval_convs:
        eval_examples, _ = build_dataset(eval_convs, tokenizer, template, **encode_kwargs)
    if not train_examples:
        raise ConfigError(
            f"dataset: no example left after encoding with cutoff_len {cfg.cutoff_len} ({train_stats.summary()})"
        )
    if eval_convs and not eval_examples:
        raise ConfigError(f"eval_dataset: no example left after encoding with cutoff_len {cfg.cutoff_len}")
    stats = {"records": len(conversations), "train": len(train_examples), "eval": len(eval_examples)}
    stats["encode"] = train_stats
    if cfg.dedup:
        stats["duplicates_dropped"] = dropped
    return Examples(train_examples, eval_examples, stats, eval_conversations=list(eval_convs))


def split_validation(items: list[Any], val_size: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``val_size`` (fraction < 1 or a count) of ``items``, chosen with ``seed``; order is kept."""
    if val_size <= 0:
        return list(items), []
    n_val = int(val_size) if val_size >= 1 else max(1, round(val_size * len(items)))
    if n_val >= len(items):
        raise ConfigError(f"val_size: {val_size} leaves no training records (the dataset has {len(items)})")
    held = set(random.Random(seed).sample(range(len(items)), n_val))
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def build_datasets(cfg: RunConfig, tokenizer, template=None) -> DataBundle:
    """Encoded train / eval datasets and the collator of a resolved config (``packing`` decided): packed rows
    with seq_ids, or padded + length-grouped."""
    template = template if template is not None else get_template_checked(cfg.template, cfg.system)
    examples = load_examples(cfg, tokenizer, template)
    return bundle_from_examples(cfg, examples.train, examples.eval, pad_token_id(tokenizer), examples.stats)


def bundle_from_examples(
    cfg: RunConfig,
    train_examples: list[Any],
    eval_examples: list[Any],
    pad_token_id: int = 0,
    stats: dict[str, Any] | None = None,
) -> DataBundle:
    """Encoded examples → train rows (packed when ``cfg.packing``), eval rows and the collator.

    Rows are plain lists of dicts (a map-style dataset): the Trainer's length-grouped sampler reads their
    ``input_ids`` lengths, and the GPU benchmark feeds synthetic examples through this same function.
    """
    stats = dict(stats or {})
    if cfg.packing:
        train_rows = [as_row(r) for r in pack_examples(train_examples, cfg.cutoff_len)]
        stats["packed_rows"] = len(train_rows)
    else:
        train_rows = [as_row(e) for e in train_examples]
    eval_rows = [as_row(e) for e in eval_examples]
    inner = (
        PackingCollator(max_length=cfg.cutoff_len, pad_token_id=pad_token_id)
        if cfg.packing
        else PaddingCollator(pad_token_id=pad_token_id)
    )
    collator = TrainingCollator(inner, eval_inner=PaddingCollator(pad_token_id=pad_token_id))
    return DataBundle(train=train_rows, eval=eval_rows or None, collator=collator, stats=stats)


def model_dtype(cfg: RunConfig) -> torch.dtype:
    """LoRA + bf16: the frozen base in bf16 (half the memory; a quantized base's other weights and compute dtype
    too); otherwise fp32 master weights under autocast."""
    return torch.bfloat16 if (cfg.bf16 and cfg.finetuning_type == "lora") else torch.float32


def build_model(cfg: RunConfig, tokenizer):
    """The base model with the run's fine-tuning method applied (peft-wrapped for LoRA). A quantized base is
    loaded straight onto the GPU, each linear layer quantized as it arrives."""
    quantization = quantization_of(cfg)
    model = load_base_model(
        cfg.model_name_or_path,
        dtype=model_dtype(cfg),
        device="cuda" if quantization is not None else None,
        attention_impl=cfg.attention_impl,
        quantization=quantization,
    )
    new_ids = added_token_ids(cfg, tokenizer)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    # No cache while training. (A preset keeps its empty name_or_path: peft would look a name that is not a
    # path up on the Hub when saving, so adapter_config.json names no base; tnlora_run.yaml does.)
    model.config.use_cache = False
    if cfg.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError("gradient_checkpointing: this model does not support it")
    return prepare_for_training(model, cfg, trainable_token_ids=new_ids or None)


def prepare_for_training(model, cfg: RunConfig, trainable_token_ids: list[int] | None = None):
    """Apply the run's fine-tuning method, keep trainable weights in fp32 and compile the layers if asked.

    The one path from a base model to the model the Trainer sees: ``tnlora train`` and ``tnlora bench``
    both go through it, so the bench measures what training runs.
    """
    from tnlora.train.lora import apply_finetuning, set_adapter_input_casts

    # The adapter's random init comes from the run's seed, not from whatever ran before in this process.
    set_seed(cfg.seed)
    model = apply_finetuning(model, cfg, trainable_token_ids=trainable_token_ids)
    upcast_trainable(model)
    if cfg.bf16:
        set_adapter_input_casts(model, False)
    if cfg.torch_compile:
        compile_decoder_layers(model, checkpointing=cfg.gradient_checkpointing)
    return model


def ready_for_inference(model, cfg: RunConfig) -> None:
    """After a bf16 run has been saved: trainable weights (fp32 for the optimizer) down to the base's bf16 and
    peft's adapter input casts back on, so the returned model runs outside the Trainer's autocast (sample
    replies, ``TrainResult.model``) as the saved adapter loaded onto a bf16 base would."""
    from tnlora.train.lora import set_adapter_input_casts

    if not cfg.bf16:
        return
    set_adapter_input_casts(model, True)
    # Only over a bf16 base (its quantized layers' integer weights aside): full and freeze tuning keep the whole
    # model in fp32 (model_dtype).
    if {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()} == {torch.bfloat16}:
        for p in model.parameters():
            if p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)


def upcast_trainable(model) -> None:
    """Trainable parameters in fp32 (a bf16 base keeps its frozen weights in bf16): AdamW updates of
    ~lr × 1e-3 vanish below bf16's resolution. (DeepSpeed's ZeRO-3 partitions, tagged ``ds_id``, hold no data
    here: DeepSpeed keeps their fp32 master copies itself.)"""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32 and not hasattr(p, "ds_id"):
            p.data = p.data.float()


# ---------------------------------------------------------------------------------------------------------------
# Looking at what the model learns: sample replies while training, predictions on the eval set after it

PREDICTIONS_FILE = "predictions.jsonl"
PREDICT_RESULTS_FILE = "predict_results.json"


def sample_callback(cfg: RunConfig, tokenizer, template):
    """The callback answering ``sample_prompts`` at each evaluation and at the end (None without prompts)."""
    from tnlora.train.callbacks import SampleRepliesCallback, read_sample_prompts

    prompts = read_sample_prompts(cfg.sample_prompts)
    if not prompts:
        return None
    # bf16 runs keep the adapter in fp32 with peft's input casts off: they generate under the training autocast.
    autocast = torch.bfloat16 if cfg.bf16 else None
    return SampleRepliesCallback(
        prompts, tokenizer, template, cfg.output_dir, cfg.sample_max_new_tokens, autocast_dtype=autocast
    )


def tensorboard_callback(trainer):
    """The Trainer's TensorBoard callback (report_to: tensorboard), else None."""
    from transformers.integrations import TensorBoardCallback

    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)), None)


def predict_eval_set(cfg: RunConfig, model, tokenizer, template, conversations: list[Any], out: Path):
    """``do_predict``: a greedy reply for every eval conversation, scored (BLEU-4, ROUGE, exact match) and written
    to ``predictions.jsonl`` and ``predict_results.json``; returns the ``predict_…`` metrics."""
    from tnlora.infer.decode_graph import graph_decoding
    from tnlora.infer.evaluate import predict_conversations, score_predictions, write_predictions
    from tnlora.infer.generate import GenerationOptions
    from tnlora.io import atomic_write_json

    ready_for_inference(model, cfg)
    model.eval()
    options = GenerationOptions(max_new_tokens=cfg.max_new_tokens, do_sample=False, repetition_penalty=1.0)
    _say(f"predicting the {len(conversations)} eval examples (greedy, at most {cfg.max_new_tokens} new tokens)")
    # On a GPU the one-token steps as `tnlora eval` runs them, CUDA graphs freed after; the prompts' forwards as
    # before (the layers may be compiled: no prefill graphs captured around them).
    with graph_decoding(model, prefill=False):
        rows = predict_conversations(
            model, tokenizer, template, conversations, options, batch_size=cfg.per_device_eval_batch_size
        )
    metrics = score_predictions(rows)
    write_predictions(rows, out / PREDICTIONS_FILE)
    atomic_write_json(out / PREDICT_RESULTS_FILE, metrics)
    _say(
        f"predict: bleu-4 {metrics['predict_bleu-4']:.2f} | rouge-1 {metrics['predict_rouge-1']:.2f} | rouge-l "
        f"{metrics['predict_rouge-l']:.2f} | exact match {metrics['predict_exact_match']:.1f}% "
        f"({out / PREDICTIONS_FILE})"
    )
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Saving


def save_run_files(cfg: RunConfig, tokenizer, template, directory: str | Path) -> None:
    """The files that make an output dir self-describing: run config, template, tokenizer (each replaced by a
    rename: a kill leaves the old file or the new one)."""
    from tnlora.io import atomic_files

    with atomic_files(directory) as staged:
        save_run_config(cfg, staged)
        template.save(staged / TEMPLATE_FILE)
        attach_chat_template(tokenizer, template)
        tokenizer.save_pretrained(str(staged))


# ---------------------------------------------------------------------------------------------------------------
# The run


def out_of_memory_advice(cfg: RunConfig) -> str:
    """One line for a run that ran out of GPU memory: how big its micro-batch was and which keys shrink it."""
    rows, length = cfg.per_device_train_batch_size, cfg.cutoff_len
    advice = []
    if not cfg.gradient_checkpointing:
        advice.append("gradient_checkpointing: true")
    elif cfg.checkpoint_regions == "mixers" or cfg.uncheckpointed_layers:
        advice.append("checkpoint_regions: layer and uncheckpointed_layers: 0 (fewer activations kept)")
    if not cfg.use_unsloth_gc and cfg.checkpoint_regions != "mixers":
        advice.append("use_unsloth_gc: true (layer inputs kept in CPU memory)")
    if rows and rows > 1:
        advice.append(f"a per_device_train_batch_size below {rows}")
    if not advice and cfg.finetuning_type == "lora" and cfg.quantization_bit != 4:
        advice.append("quantization_bit: 4 (QLoRA: a 4-bit base)")
    if len(advice) < 2 and not (rows and rows > 1):
        advice.append("a smaller cutoff_len")
    return (
        f"out of GPU memory with micro-batches of up to {rows} × {length} tokens "
        f"(per_device_train_batch_size × cutoff_len); try {', or '.join(advice)}"
    )


def resumed_run_id(output_dir: Path, resume: str | None) -> str:
    """The id of the run: the output dir's (or its checkpoint's) when resuming, a new one otherwise."""
    from tnlora.outputs import run_id_of
    from tnlora.train.checkpoints import new_run_id, read_record

    if resume is None:
        return new_run_id()
    return run_id_of(output_dir) or (read_record(resume) or {}).get("run_id") or new_run_id()


def save_final_outputs(
    cfg: RunConfig, trainer, output, data: DataBundle, tokenizer, template, predict=None
) -> dict[str, float]:
    """The adapter (or model), run files, ``predict()``'s outputs (do_predict), metrics, trainer state and loss
    plot in output_dir, each file replaced by a rename (``trainer_state.json``, which marks a finished run,
    last); returns the metrics."""
    from tnlora.io import atomic_files
    from tnlora.train.callbacks import name_base_model_in_card
    from tnlora.train.plot import plot_loss

    out = Path(cfg.output_dir)
    metrics = _json_safe(output.metrics)
    if data.eval is not None:
        metrics.update(final_eval_metrics(trainer))  # every process: evaluation is collective
    main = distributed.is_main()
    with atomic_files(out) if main else contextlib.nullcontext() as staged:
        # Every process takes part (FSDP and ZeRO-3 gather the sharded weights); only the main one writes, into
        # its staging folder.
        trainer.save_model(distributed.broadcast(str(staged) if main else None))
        if main:
            name_base_model_in_card(staged, cfg.model_name_or_path)
            save_run_files(cfg, tokenizer, template, staged)
    if not main:
        return metrics
    if predict is not None:  # after the adapter is saved (it casts a bf16 run's adapter for generation)
        metrics.update(predict())
    with atomic_files(out, last=(TRAINER_STATE,)) as staged:
        # what Trainer.save_metrics("all", …) and save_state() write, into the staging folder
        (staged / ALL_RESULTS).write_text(json.dumps(metrics, indent=4, sort_keys=True), encoding="utf-8")
        trainer.state.save_to_json(str(staged / TRAINER_STATE))
    if cfg.plot_loss:
        plot_loss(trainer.state.log_history, out / LOSS_PLOT, title=out.name)
    return metrics


def train(cfg: RunConfig, callbacks: list[Any] | None = None) -> TrainResult:
    """Fine-tune as ``cfg`` says; write the adapter, checkpoints, run files and loss plot to ``output_dir``."""
    from tnlora.train import checkpoints
    from tnlora.train.callbacks import OutputRecordCallback
    from tnlora.train.interrupt import StopOnInterrupt, stop_cleanly_on_interrupt
    from tnlora.train.lora import count_parameters, describe_trainable

    t0 = time.perf_counter()
    cfg, plan, resume = preflight(cfg)
    # Several processes (torchrun / accelerate launch), DeepSpeed or FSDP: the process group, opened now.
    distributed.start(cfg.ddp_timeout, needs_group=bool(cfg.deepspeed or cfg.fsdp))
    main = distributed.is_main()
    template = get_template_checked(cfg.template, cfg.system)
    tokenizer = build_tokenizer(cfg)
    examples = distributed.main_first(lambda: load_examples(cfg, tokenizer, template), "reading the data")
    # The machine defaults, once, now that the run's length is known: compiling pays only on long runs, and the
    # micro-batch and checkpointing follow from the memory estimate of the layers as they will run.
    tokens = planned_train_tokens(cfg, examples.train)
    given = cfg
    cfg = resolve_for_this_machine(cfg, train_tokens=tokens)
    if given.torch_compile is None and not cfg.torch_compile and torch.cuda.is_available():
        _say(
            f"torch_compile: off (this run trains ~{tokens / 1e6:.2f} M tokens; compiling the layers takes about a "
            f"minute and pays from ~{COMPILE_MIN_TOKENS / 1e6:.0f} M; set torch_compile: true to compile anyway)"
        )
    data = bundle_from_examples(cfg, examples.train, examples.eval, pad_token_id(tokenizer), examples.stats)
    _say(
        f"data: {data.stats['records']} records → {data.stats['train']} train / {data.stats['eval']} eval examples"
        + (f" ({data.stats['packed_rows']} packed rows)" if "packed_rows" in data.stats else "")
    )
    args = training_arguments(cfg, has_eval=data.eval is not None)  # refused combinations: before the model
    if resume:
        checkpoints.check_resume_config(resume, cfg)  # now with the machine's defaults resolved
    out = Path(cfg.output_dir)
    run_id = distributed.broadcast(resumed_run_id(out, resume))
    # Everything is checked: only now is an earlier run in output_dir replaced (its own files only), by the main
    # process while the others wait.
    keep = distributed.main_first(lambda: claim_output_dir(plan, run_id) if main else [], "preparing output_dir")
    recorder = OutputRecordCallback(str(out), cfg.model_name_or_path, exclude=keep)
    stop = StopOnInterrupt()
    sampler = sample_callback(cfg, tokenizer, template)
    try:
        model = build_model(cfg, tokenizer)
        trainable, total = count_parameters(model)
        _say(describe_trainable(model))
        checkpoints.check_free_space(out, trainable)
        try:
            if main:
                save_run_files(cfg, tokenizer, template, cfg.output_dir)
            extra = [sampler] if sampler is not None else []
            trainer = build_trainer(
                cfg, model, tokenizer, data, [recorder, stop, *extra, *(callbacks or [])], args=args
            )
            trainer.run_id = run_id
            if sampler is not None:
                sampler.board = tensorboard_callback(trainer)
            if resume:
                _say(f"resuming from {resume}")
            # Several processes stop at once on Ctrl-C (each gets the signal; a clean stop would need them to
            # agree on its step): the run resumes from its last complete checkpoint.
            interrupts = stop_cleanly_on_interrupt(stop) if distributed.world_size() == 1 else contextlib.nullcontext()
            try:
                with interrupts:
                    output = trainer.train(resume_from_checkpoint=resume)
            except torch.OutOfMemoryError:
                raise ConfigError(out_of_memory_advice(cfg)) from None
            finally:
                if cfg.torch_compile:
                    # The model outlives the run (TrainResult.model, sample_prompts): back to eager for generation.
                    uncompile_decoder_layers(model)
            if stop.stopped_at is not None and trainer.state.global_step < trainer.state.max_steps:
                raise RunInterrupted(
                    f"interrupted at step {trainer.state.global_step} of {trainer.state.max_steps}: saved "
                    f"{checkpoints.last_complete(out)}; --resume_from_checkpoint true continues the run"
                )
            predict = (
                (lambda: predict_eval_set(cfg, model, tokenizer, template, examples.eval_conversations, out))
                if cfg.do_predict
                else None
            )
            metrics = save_final_outputs(cfg, trainer, output, data, tokenizer, template, predict)
        except OSError as exc:
            error = checkpoints.storage_error(exc, out, str(exc.filename or out))
            if error is None:
                raise
            raise error from None
    finally:
        # Also when the run fails or is interrupted: whatever it wrote is listed as its own. (Best effort: a
        # full disk keeps the marker as it was, which still names the run's earlier entries.)
        if main:
            with contextlib.suppress(OSError):
                claim_dir(out, "train", exclude=keep)
    if not (cfg.deepspeed or cfg.fsdp):  # the engines own the weights' dtypes (and FSDP's are sharded)
        ready_for_inference(model, cfg)
    result = TrainResult(
        output_dir=out,
        global_step=trainer.state.global_step,
        train_loss=float(output.training_loss),
        metrics=metrics,
        trainable_params=trainable,
        total_params=total,
        log_history=list(trainer.state.log_history),
        config=cfg,
        model=trainer.model,
        tokenizer=tokenizer,
        template=template,
        samples=sampler.last if sampler is not None else None,
    )
    _say(f"saved to {out} ({time.perf_counter() - t0:.1f} s)")
    return result

