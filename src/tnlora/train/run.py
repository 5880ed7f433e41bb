"""One training run, in the order it happens: preflight → tokenizer → data → model → Trainer → save.

``train(cfg)`` is the whole flow. Its steps are separate functions (``build_tokenizer``, ``build_datasets``,
``build_model``, ``build_trainer``) so the GPU benchmark can reuse the exact model / data / collator /
optimizer setup without running the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from tnlora.config import COMPILE_MIN_TOKENS, RunConfig, resolve_defaults, save_run_config, split_list
from tnlora.errors import ConfigError, TnloraError
from tnlora.ops.packing import PackedRows
from tnlora.outputs import OutputPlan, claim_dir, clear_previous, foreign_entries, plan_dir

TEMPLATE_FILE = "template.json"
LOSS_PLOT = "loss.png"


@dataclass
class DataBundle:
    """What the data step hands to the Trainer."""

    train: Any  # a list of rows: input_ids / labels (/ seq_ids) and a "length" column
    eval: Any | None
    collator: Any
    stats: dict[str, Any] = field(default_factory=dict)


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


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Preflight: everything that can be refused before a model is loaded (nothing is written or deleted)


def preflight(cfg: RunConfig) -> tuple[RunConfig, OutputPlan, str | None]:
    """Resolve machine-dependent defaults; check the model (its config only), template, tensorboard, the LoRA
    targets (on the module tree built on the meta device) and the output dir.

    Returns the resolved config, what writing output_dir will replace, and the checkpoint to resume from (or
    ``None``). The data is checked by ``train`` next, still before anything is deleted.
    """
    if cfg.trust_remote_code:
        _say("trust_remote_code: ignored; tnlora never runs a model's remote code (TransNormerLLM is built in)")
    cfg = resolve_for_this_machine(with_model_source(cfg))
    get_template_checked(cfg.template)
    if "tensorboard" in split_list(cfg.report_to):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("report_to: tensorboard is not installed (pip install tensorboard)") from None
    if cfg.attention_impl == "fla" and not torch.cuda.is_available():
        raise ConfigError("attention_impl: 'fla' needs a CUDA GPU; use auto or chunked on CPU")
    check_finetuning_targets(cfg)
    plan, resume = plan_output_dir(cfg)
    return cfg, plan, resume


def resolve_for_this_machine(cfg: RunConfig, train_tokens: int | None = None, announce: bool = True) -> RunConfig:
    """``resolve_defaults`` with this machine's GPU (and its memory) and, once the data is known, the run's
    training tokens; says when it switched gradient checkpointing on (unless not ``announce``)."""
    cuda = torch.cuda.is_available()
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
    return resolved


def planned_train_tokens(cfg: RunConfig, data: DataBundle) -> int:
    """The tokens the run will train on: the train rows' tokens times the epochs, or per step times
    ``max_steps`` when that is set (padding is not counted; resumed steps are)."""
    per_epoch = sum(len(row["input_ids"]) for row in data.train)
    if cfg.max_steps > 0:
        steps_per_epoch = max(1, math.ceil(len(data.train) / (cfg.per_device_train_batch_size
                                                               * cfg.gradient_accumulation_steps)))
        return int(per_epoch * cfg.max_steps / steps_per_epoch)
    return int(per_epoch * cfg.num_train_epochs)


def check_model_name(name: str) -> str:
    """The model as the run records it (a preset's canonical name, a directory's absolute path, a Hub id whose
    config.json is there); anything else is refused naming the key."""
    from tnlora.model.hub import model_source

    return model_source(name, key="model_name_or_path")


def with_model_source(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``model_name_or_path`` as :func:`check_model_name` records it."""
    return dataclasses.replace(cfg, model_name_or_path=check_model_name(cfg.model_name_or_path))


def check_finetuning_targets(cfg: RunConfig) -> None:
    """lora_target, additional_target and freeze_trainable_layers checked against the model's module tree, built
    from its config on the meta device: a target that matches nothing is refused before any weight is read."""
    from tnlora.model import TransnormerForCausalLM
    from tnlora.model.hub import load_model_config
    from tnlora.train.lora import check_finetuning

    config = load_model_config(cfg.model_name_or_path)
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
    never valid output dirs.
    """
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(cfg.output_dir)
    inputs: dict[str, str | None] = {
        "the base model": cfg.model_name_or_path if Path(cfg.model_name_or_path).is_dir() else None,
        "the dataset folder": cfg.dataset_dir,
    }
    for name in split_list(cfg.dataset) + split_list(cfg.eval_dataset):
        inputs[f"the dataset {name}"] = name if Path(name).exists() else None
    resume = None
    if cfg.resume_from_checkpoint is True:
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
        if last is None:
            raise ConfigError(f"resume_from_checkpoint: no checkpoint-N folder in {out} to resume from")
        resume = last
    elif cfg.resume_from_checkpoint:
        ckpt = Path(str(cfg.resume_from_checkpoint))
        if not (ckpt / "trainer_state.json").is_file():
            raise ConfigError(f"resume_from_checkpoint: {ckpt} is not a checkpoint (no trainer_state.json)")
        resume = str(ckpt)
    try:
        plan = plan_dir(
            out,
            "train",
            key="output_dir",
            overwrite=cfg.overwrite_output_dir,
            overwrite_flag="--overwrite_output_dir true to replace it or --resume_from_checkpoint true to continue it",
            inputs=inputs,
            resume=resume is not None,
        )
    except ConfigError:
        raise
    except TnloraError as exc:
        raise ConfigError(str(exc)) from None
    return plan, resume


def claim_output_dir(plan: OutputPlan) -> list[str]:
    """Replace the earlier run (its files only) and mark output_dir as this run's; returns the entries that were
    there already and are not the run's (files beside a resumed run), which the marker never lists."""
    keep = foreign_entries(plan.directory, "train") if plan.directory.is_dir() and not plan.remove else []
    clear_previous(plan)
    claim_dir(plan.directory, "train", exclude=keep)
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


def load_examples(cfg: RunConfig, tokenizer, template) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Read, split (val_size, seeded) and encode the conversations: (train examples, eval examples, stats)."""
    from tnlora.data.encode import build_dataset, default_cache_dir
    from tnlora.data.readers import load_conversations

    conversations = load_conversations(cfg.dataset, cfg.dataset_dir)
    if cfg.max_samples is not None:
        conversations = conversations[: cfg.max_samples]
    if not conversations:
        raise ConfigError(f"dataset: {cfg.dataset} holds no records")
    train_convs, eval_convs = split_validation(conversations, cfg.val_size, cfg.seed)
    if cfg.eval_dataset:
        eval_convs = load_conversations(cfg.eval_dataset, cfg.dataset_dir)
        if cfg.max_samples is not None:
            eval_convs = eval_convs[: cfg.max_samples]
    # The cache key covers the records' text, the tokenizer, the template and these settings.
    cache_dir = None if cfg.overwrite_cache else (cfg.dataset_cache_dir or default_cache_dir())
    encode_kwargs = dict(
        cutoff_len=cfg.cutoff_len,
        train_on_prompt=cfg.train_on_prompt,
        mask_history=cfg.mask_history,
        cache_dir=cache_dir,
        num_workers=cfg.preprocessing_num_workers or 1,
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
    return train_examples, eval_examples, stats


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
    """Encoded train / eval datasets and the collator (packed rows with seq_ids, or padded + length-grouped)."""
    template = template if template is not None else get_template_checked(cfg.template, cfg.system)
    train_examples, eval_examples, stats = load_examples(cfg, tokenizer, template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return bundle_from_examples(cfg, train_examples, eval_examples, pad_id, stats)


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
    from tnlora.data import encode

    stats = dict(stats or {})
    if cfg.packing:
        rows = encode.pack_examples(train_examples, cfg.cutoff_len)
        train_rows = [_as_row(r) for r in rows]
        stats["packed_rows"] = len(train_rows)
    else:
        train_rows = [_as_row(e) for e in train_examples]
    eval_rows = [_as_row(e) for e in eval_examples]
    inner = (
        encode.PackingCollator(max_length=cfg.cutoff_len, pad_token_id=pad_token_id)
        if cfg.packing
        else encode.PaddingCollator(pad_token_id=pad_token_id)
    )
    collator = TrainingCollator(inner, eval_inner=encode.PaddingCollator(pad_token_id=pad_token_id))
    return DataBundle(train=train_rows, eval=eval_rows or None, collator=collator, stats=stats)


def _as_row(example: Any) -> dict[str, Any]:
    """An encoded example or packed row → a plain dict of lists (+ ``length``, for inspection; the
    Trainer's length-grouped sampler measures ``input_ids`` itself and the collator drops ``length``)."""
    if isinstance(example, dict):
        row = {k: list(v) for k, v in example.items() if v is not None}
    else:
        row = {k: list(v) for k, v in dataclasses.asdict(example).items() if isinstance(v, (list, tuple))}
    row["length"] = len(row["input_ids"])
    return row


# Host-side counts the collator adds to each batch as Python ints (accelerate moves tensors to the GPU and
# leaves ints alone): reading them from device tensors would stall the GPU once per micro-batch each.
NUM_LOSS_TOKENS = "num_loss_tokens"  # labelled positions, for the model's loss (a forward argument)
NUM_REAL_TOKENS = "num_real_tokens"  # non-padding tokens, for the Trainer's tokens-seen count (popped there)
PACKED_ROWS = "packed_rows"  # packed rows: their example boundaries (tnlora.ops.PackedRows, built on the host)


class TrainingCollator:
    """Wraps the data layer's collator so the Trainer counts exactly the tokens the loss averages over.

    The model shifts labels: position 0 of a row and the first token of each packed example are never
    prediction targets. Marking them -100 here makes ``num_items_in_batch`` (counted by the Trainer from
    the labels) equal the number of tokens in the loss, so the per-token loss stays exact under gradient
    accumulation and packing. The batch also carries ``num_loss_tokens``, ``num_real_tokens`` and, when
    packed, ``packed_rows`` (in place of ``seq_ids``), all computed here on the host.
    """

    def __init__(self, inner, eval_inner=None):
        self.inner = inner
        self.eval_inner = eval_inner or inner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = [{k: v for k, v in f.items() if k != "length"} for f in features]
        # Eval examples are never packed: they carry no seq_ids and go to the padding collator.
        packed = bool(features) and "seq_ids" in features[0]
        batch = dict((self.inner if packed else self.eval_inner)(features))
        labels = batch["labels"].clone()
        labels[:, 0] = -100
        seq_ids = batch.get("seq_ids")
        if seq_ids is not None:
            starts = seq_ids[:, 1:] != seq_ids[:, :-1]
            labels[:, 1:][starts] = -100
        batch["labels"] = labels
        if seq_ids is not None:
            # Built here, where the ids are on the host: from seq_ids on the GPU the model would read the
            # boundaries back (a stall per micro-batch). The data loader moves it with the batch.
            batch[PACKED_ROWS] = PackedRows.from_seq_ids(batch.pop("seq_ids"))
        batch[NUM_LOSS_TOKENS] = int((labels != -100).sum())
        mask = batch.get("attention_mask")
        batch[NUM_REAL_TOKENS] = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch


@functools.cache
def trainer_class():
    """``transformers.Trainer`` that counts tokens seen from the collator's host-side count.

    The Trainer's own count (``include_num_input_tokens_seen``) sums the attention mask on the device and
    reads it back with ``.item()`` after every micro-batch: a full stall of the GPU each time.
    """
    from transformers import Trainer

    class TnloraTrainer(Trainer):
        def training_step(self, model, inputs, *args, **kwargs):
            self.state.num_input_tokens_seen += inputs.pop(NUM_REAL_TOKENS, 0)
            return super().training_step(model, inputs, *args, **kwargs)

        def prediction_step(self, model, inputs, *args, **kwargs):
            inputs.pop(NUM_REAL_TOKENS, None)
            return super().prediction_step(model, inputs, *args, **kwargs)

        def log(self, logs, *args, **kwargs):
            # include_num_input_tokens_seen: the count this class keeps (the Trainer's own is off, see above)
            if getattr(self, "log_tokens_seen", False):
                logs = {**logs, "num_input_tokens_seen": self.state.num_input_tokens_seen}
            return super().log(logs, *args, **kwargs)

        def evaluate(self, *args, **kwargs):
            # Compiled layers would compile no-grad variants of their graphs for a few evaluation batches
            # (7B: ~25 s at the first evaluation); evaluation runs them eagerly instead.
            with torch.compiler.set_stance("force_eager"):
                return super().evaluate(*args, **kwargs)

        def floating_point_ops(self, inputs) -> int:
            # transformers' estimate (6 · tokens · non-embedding parameters), with the parameters counted once:
            # its own walks every module of the (peft-wrapped) model after each micro-batch.
            if not hasattr(self, "_flop_parameters"):
                self._flop_parameters = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs["input_ids"].numel() * self._flop_parameters

    return TnloraTrainer


def model_dtype(cfg: RunConfig) -> torch.dtype:
    """LoRA + bf16: the frozen base in bf16 (half the memory); otherwise fp32 master weights under autocast."""
    return torch.bfloat16 if (cfg.bf16 and cfg.finetuning_type == "lora") else torch.float32


def load_base_model(
    name: str, dtype: torch.dtype | None = None, device: torch.device | str | None = None, attention_impl: str = "auto"
):
    """``tnlora.model.load_model`` plus the choice of lightning-attention backend."""
    from tnlora.model import load_model

    model = load_model(name, dtype=dtype, device=device)
    set_attention_impl(model, attention_impl)
    # The official config names remote code files (auto_map) that no directory tnlora saves contains; a saved
    # config that kept it would point transformers at files that are not there.
    if hasattr(model.config, "auto_map"):
        del model.config.auto_map
    return model


def set_attention_impl(model, impl: str) -> None:
    """Run the lightning attention as ``impl`` (auto, chunked, recurrent, fla): the config's choice, applied to
    the model's token mixers for the device the model is on (a later move re-applies it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.lightning_impl = impl
    base.select_kernels()


def build_model(cfg: RunConfig, tokenizer):
    """The base model with the run's fine-tuning method applied (peft-wrapped for LoRA)."""
    model = load_base_model(cfg.model_name_or_path, dtype=model_dtype(cfg), attention_impl=cfg.attention_impl)
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
    # Only over a bf16 base: full and freeze tuning keep the whole model in fp32 (model_dtype).
    if {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}:
        for p in model.parameters():
            if p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)


def upcast_trainable(model) -> None:
    """Trainable parameters in fp32 (a bf16 base keeps its frozen weights in bf16): AdamW updates of
    ~lr × 1e-3 vanish below bf16's resolution."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


# NormLinearAttention steps compiled per instance under checkpointing (instance attributes over the methods).
COMPILED_MIXER_STEPS = ("project", "output")


def compile_decoder_layers(
    model, *, checkpointing: bool = False, dynamic: bool | None = True, backend: str = "inductor"
) -> int:
    """Compile each decoder layer in place (``nn.Module.compile``) after LoRA is applied; returns the count.

    Regional compilation: the layers' many small elementwise ops and dtype casts (norms, LoRA adds, GLU,
    residuals) fuse into a few kernels, while the lightning attention is a compile boundary (it is wrapped in
    ``torch.compiler.disable``) and the embedding, loss, peft wrapper and Trainer stay eager. Not
    ``TrainingArguments(torch_compile=True)``: compiling the whole peft model graph-breaks all over. In-place
    compilation keeps parameter names (no ``_orig_mod.``), so checkpoints and adapters save as usual. Layers of
    the same structure share one compiled graph; ``dynamic=True`` makes batch and sequence length symbolic from
    the first compile, so batches of varying length do not recompile.

    The first layer stays eager (when there are others): its input, the embedding output, needs no grad under
    LoRA and in the official configs it is the only LRPE layer, so it would compile graphs of its own, about
    as long to compile as all the other layers' (7B: ~55 of ~110 s), for 1/L of their gain.

    With ``checkpointing`` the layer's sub-blocks (norms, the token mixer's projection and output, channel
    mixer) are compiled instead of the layer: newer transformers (5.24) put the checkpoint inside the layer's
    ``forward``, which dynamo then skips whole (nothing would be compiled), while a sub-block runs inside the
    checkpoint in every version.
    """
    from tnlora.train.lora import decoder_layers

    layers = decoder_layers(model)
    layers = layers[1:] if len(layers) > 1 else layers
    for layer in layers:
        if not checkpointing:
            layer.compile(dynamic=dynamic, backend=backend)
            continue
        for module in (layer.token_norm, layer.channel_norm, layer.channel_mixer):
            module.compile(dynamic=dynamic, backend=backend)
        # The layer calls its token mixer's steps, not its forward: compile the two around the attention.
        mixer = layer.token_mixer
        for step in COMPILED_MIXER_STEPS:
            setattr(mixer, step, torch.compile(getattr(mixer, step), dynamic=dynamic, backend=backend))
    return len(layers)


def uncompile_decoder_layers(model) -> None:
    """Undo :func:`compile_decoder_layers`: generation after training (cache objects, one-token steps) runs
    eager. ``nn.Module.compile`` only sets ``_compiled_call_impl``; clearing it is the inverse (torch has no
    public call for it)."""
    from tnlora.train.lora import decoder_layers

    for layer in decoder_layers(model):
        for module in [layer, *layer.children()]:
            module._compiled_call_impl = None
        for step in COMPILED_MIXER_STEPS:
            vars(layer.token_mixer).pop(step, None)


# ---------------------------------------------------------------------------------------------------------------
# Trainer


def training_arguments(cfg: RunConfig, has_eval: bool):
    """Map the run config onto ``transformers.TrainingArguments``."""
    from transformers import TrainingArguments

    warmup: float = cfg.warmup_ratio if cfg.warmup_ratio > 0 else cfg.warmup_steps
    try:
        return _training_arguments(TrainingArguments, cfg, has_eval, warmup)
    except ValueError as exc:  # a combination TrainingArguments refuses: still the user's config
        raise ConfigError(f"training arguments: {' '.join(str(exc).split())}") from None


def _checkpointing_arguments(TrainingArguments, cfg: RunConfig) -> dict[str, Any]:
    """The checkpointing keys, under the names this transformers takes (5.24 renamed ``gradient_checkpointing*``
    to ``activation_checkpointing*`` and warns on the old ones)."""
    # non-reentrant checkpointing needs no requires_grad trick on the (frozen) embeddings; offload_to_cpu is
    # handled by the model's gradient_checkpointing_enable
    kwargs = {"use_reentrant": False, "offload_to_cpu": cfg.use_unsloth_gc} if cfg.gradient_checkpointing else None
    names = {spec.name for spec in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": bool(cfg.gradient_checkpointing), f"{prefix}_checkpointing_kwargs": kwargs}


def _training_arguments(TrainingArguments, cfg: RunConfig, has_eval: bool, warmup: float):
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        lr_scheduler_kwargs=cfg.lr_scheduler_kwargs or {},
        warmup_steps=warmup,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        bf16=bool(cfg.bf16),
        **_checkpointing_arguments(TrainingArguments, cfg),
        eval_strategy=(cfg.eval_strategy or "steps") if has_eval else "no",
        eval_steps=cfg.eval_steps if has_eval else None,
        save_strategy=cfg.save_strategy,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        save_only_model=cfg.save_only_model,
        logging_strategy=cfg.logging_strategy,
        logging_steps=cfg.logging_steps,
        run_name=cfg.run_name,
        ddp_timeout=cfg.ddp_timeout,
        ddp_find_unused_parameters=cfg.ddp_find_unused_parameters,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[r for r in split_list(cfg.report_to) if r != "none"],
        disable_tqdm=True,  # ProgressCallback draws the bar
        # Counted from the collator's host-side count by trainer_class() (the Trainer's count syncs).
        include_num_input_tokens_seen="no",
        # A NaN loss is logged as NaN, not replaced by a running mean; the check read the loss back from the
        # GPU after every micro-batch.
        logging_nan_inf_filter=False,
        train_sampling_strategy="random" if cfg.packing else "group_by_length",
        remove_unused_columns=False,  # TrainingCollator drops "length" itself
        dataloader_num_workers=cfg.dataloader_num_workers,
        prediction_loss_only=True,  # eval needs the loss only; keeping logits costs B×T×V memory
        label_names=["labels"],
        dataloader_pin_memory=torch.cuda.is_available(),
        # Batches go to the GPU from pinned memory without waiting for the copy (a blocking copy syncs).
        accelerator_config={"non_blocking": torch.cuda.is_available()},
        use_cpu=not torch.cuda.is_available(),  # lets bf16 autocast run on CPU too
    )


def build_trainer(
    cfg: RunConfig, model, tokenizer, data: DataBundle, callbacks: list[Any] | None = None, args=None
):
    """A ``transformers.Trainer`` wired with our collator and callbacks; loss kwargs checked."""
    from transformers import PrinterCallback

    from tnlora.train.callbacks import ProgressCallback

    trainer = trainer_class()(
        model=model,
        args=args if args is not None else training_arguments(cfg, has_eval=data.eval is not None),
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        processing_class=tokenizer,
        callbacks=[ProgressCallback(), *(callbacks or [])],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressCallback says the same in a line
    trainer.log_tokens_seen = cfg.include_num_input_tokens_seen
    if cfg.logging_dir and "tensorboard" in split_list(cfg.report_to):
        # transformers 5 has no logging_dir argument; its TensorBoard callback takes the folder as an attribute.
        from transformers.integrations import TensorBoardCallback

        board = TensorBoardCallback()
        board.logging_dir = cfg.logging_dir
        trainer.remove_callback(TensorBoardCallback)
        trainer.add_callback(board)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "num_items_in_batch" in inspect.signature(base.forward).parameters:
        # The model divides the summed loss by num_items_in_batch itself; the Trainer must pass the count
        # and must not also divide by the accumulation steps.
        trainer.model_accepts_loss_kwargs = True
    if not trainer.model_accepts_loss_kwargs:
        _say("warning: the model ignores num_items_in_batch; the loss is a mean of per-micro-batch means")
    return trainer


# ---------------------------------------------------------------------------------------------------------------
# Saving


def save_run_files(cfg: RunConfig, tokenizer, template, directory: str | Path) -> None:
    """The files that make an output dir self-describing: run config, template, tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_run_config(cfg, directory)
    template.save(directory / TEMPLATE_FILE)
    attach_chat_template(tokenizer, template)
    tokenizer.save_pretrained(str(directory))


def final_eval_metrics(trainer) -> dict[str, float]:
    """Eval metrics at the last step: taken from the log when the Trainer just evaluated, else computed."""
    last = [e for e in trainer.state.log_history if "eval_loss" in e]
    if last and last[-1].get("step") == trainer.state.global_step:
        metrics = {k: v for k, v in last[-1].items() if k.startswith("eval_")}
    else:
        metrics = trainer.evaluate()
    metrics = _json_safe(metrics)
    if "eval_loss" in metrics:
        metrics["eval_ppl"] = math.exp(min(metrics["eval_loss"], 50.0))
    return metrics


def _json_safe(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


# ---------------------------------------------------------------------------------------------------------------
# The run


def out_of_memory_advice(cfg: RunConfig) -> str:
    """One line for a run that ran out of GPU memory: how big its micro-batch was and which keys shrink it."""
    rows, length = cfg.per_device_train_batch_size, cfg.cutoff_len
    advice = []
    if not cfg.gradient_checkpointing:
        advice.append("gradient_checkpointing: true")
    if not cfg.use_unsloth_gc:
        advice.append("use_unsloth_gc: true (layer inputs kept in CPU memory)")
    if rows and rows > 1:
        advice.append(f"a per_device_train_batch_size below {rows}")
    if not advice:
        advice.append("a smaller cutoff_len")
    return (
        f"out of GPU memory with micro-batches of up to {rows} × {length} tokens "
        f"(per_device_train_batch_size × cutoff_len); try {', or '.join(advice)}"
    )


def train(cfg: RunConfig, callbacks: list[Any] | None = None) -> TrainResult:
    """Fine-tune as ``cfg`` says; write the adapter, checkpoints, run files and loss plot to ``output_dir``."""
    from tnlora.train.callbacks import OutputRecordCallback, name_base_model_in_card
    from tnlora.train.lora import count_parameters, describe_trainable
    from tnlora.train.plot import plot_loss

    t0 = time.perf_counter()
    given = with_model_source(cfg)
    cfg, plan, resume = preflight(given)
    template = get_template_checked(cfg.template, cfg.system)
    tokenizer = build_tokenizer(cfg)
    data = build_datasets(cfg, tokenizer, template)
    _say(
        f"data: {data.stats['records']} records → {data.stats['train']} train / {data.stats['eval']} eval examples"
        + (f" ({data.stats['packed_rows']} packed rows)" if "packed_rows" in data.stats else "")
    )
    if given.torch_compile is None and cfg.torch_compile:
        # Now that the run's length is known: too short a run would spend longer compiling than compiling saves.
        # Resolved again from the given config, so the memory defaults follow the eager layers' larger estimate.
        tokens = planned_train_tokens(cfg, data)
        if tokens < COMPILE_MIN_TOKENS:
            cfg = resolve_for_this_machine(given, train_tokens=tokens, announce=not cfg.gradient_checkpointing)
            _say(
                f"torch_compile: off (this run trains ~{tokens / 1e6:.2f} M tokens; compiling the layers takes about a "
                f"minute and pays from ~{COMPILE_MIN_TOKENS / 1e6:.0f} M; set torch_compile: true to compile anyway)"
            )
    args = training_arguments(cfg, has_eval=data.eval is not None)  # refused combinations: before the model
    # Everything is checked: only now is an earlier run in output_dir replaced (its own files only).
    keep = claim_output_dir(plan)
    out = Path(cfg.output_dir)
    recorder = OutputRecordCallback(str(out), cfg.model_name_or_path, exclude=keep)
    try:
        model = build_model(cfg, tokenizer)
        trainable, total = count_parameters(model)
        _say(describe_trainable(model))
        save_run_files(cfg, tokenizer, template, cfg.output_dir)
        trainer = build_trainer(cfg, model, tokenizer, data, [recorder, *(callbacks or [])], args=args)
        if resume:
            _say(f"resuming from {resume}")
        try:
            output = trainer.train(resume_from_checkpoint=resume)
        except torch.OutOfMemoryError:
            raise ConfigError(out_of_memory_advice(cfg)) from None
        finally:
            if cfg.torch_compile:
                # The model outlives the run (TrainResult.model, sample_prompts): back to eager for generation.
                uncompile_decoder_layers(model)

        trainer.save_model(str(out))
        name_base_model_in_card(out, cfg.model_name_or_path)
        trainer.save_state()
        metrics = _json_safe(output.metrics)
        if data.eval is not None:
            metrics.update(final_eval_metrics(trainer))
        trainer.save_metrics("all", metrics)
        save_run_files(cfg, tokenizer, template, out)
        if cfg.plot_loss:
            plot_loss(trainer.state.log_history, out / LOSS_PLOT, title=Path(cfg.output_dir).name)
    finally:
        # Also when the run fails or is interrupted: whatever it wrote is listed as its own.
        claim_dir(out, "train", exclude=keep)
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
    )
    _say(f"saved to {out} ({time.perf_counter() - t0:.1f} s)")
    return result

