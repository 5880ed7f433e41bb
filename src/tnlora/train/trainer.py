"""The transformers Trainer as tnlora runs it: the run config mapped onto TrainingArguments, a Trainer that takes
its token counts from the collator, and the final evaluation metrics."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import sys
from pathlib import Path
from typing import Any

import torch

from tnlora.config import RunConfig, split_list
from tnlora.data.collate import NUM_REAL_TOKENS, DataBundle
from tnlora.errors import ConfigError
from tnlora.train.distributed import engine_arguments


@functools.cache
def trainer_class():
    """``transformers.Trainer`` that counts tokens seen from the collator's host-side count, checks each
    optimizer step for a non-finite loss or gradient norm (``nonfinite``, a ``train.nonfinite.NonFiniteGuard``)
    and writes checkpoints that count only once complete (``train.checkpoints``).

    The Trainer's own count (``include_num_input_tokens_seen``) sums the attention mask on the device and
    reads it back with ``.item()`` after every micro-batch: a full stall of the GPU each time.
    """
    from transformers import Trainer

    class TnloraTrainer(Trainer):
        run_id: str | None = None  # the run that owns output_dir (train.run sets it), recorded in each checkpoint
        nonfinite: Any = None  # the NonFiniteGuard (build_trainer)
        _staging_root: Path | None = None  # while a checkpoint is being written: where it goes first

        def training_step(self, model, inputs, *args, **kwargs):
            self.state.num_input_tokens_seen += inputs.pop(NUM_REAL_TOKENS, 0)
            loss = super().training_step(model, inputs, *args, **kwargs)
            if self.nonfinite is not None:
                self.nonfinite.add_loss(loss, self)
            return loss

        def _get_grad_norm(self, model, grad_norm=None):
            # Called once per optimizer step, after clipping and before the optimizer: the point to judge the step.
            grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
            if self.nonfinite is not None:
                self.nonfinite.check_step(self, model, grad_norm)
            return grad_norm

        def get_batch_samples(self, epoch_iterator, num_batches, device):
            # A run resumed from the checkpoint of its last step would take one step more when max_steps is not
            # a whole number of epochs (the Trainer checks the limit only after a step): no batch is left to take.
            if 0 < self.state.max_steps <= self.state.global_step:
                self.control.should_training_stop = True
                return [], None
            return super().get_batch_samples(epoch_iterator, num_batches, device)

        def _get_output_dir(self, trial) -> str:
            # While a checkpoint is written, the Trainer's checkpoint folder lives in the staging folder.
            if self._staging_root is not None:
                return str(self._staging_root)
            return super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial) -> None:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            from tnlora.train import checkpoints

            if self.nonfinite is not None:
                self.nonfinite.drain()  # nothing after a non-finite step is saved
            run_dir = Path(super()._get_output_dir(trial))
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            if self.args.world_size > 1:
                # Every process writes its own RNG state into the folder: it is written in place, the main
                # process's completion record last (no rename).
                super()._save_checkpoint(model, trial)
                self.accelerator.wait_for_everyone()  # every RNG file written before the record lists them
                if self.args.should_save:
                    checkpoints.commit_in_place(run_dir / name, run_id=self.run_id)
                return
            try:
                staging = self._staging_root = checkpoints.start_staging(run_dir)
                try:
                    super()._save_checkpoint(model, trial)
                finally:
                    self._staging_root = None
                checkpoints.commit(staging / name, run_dir / name, run_id=self.run_id)
                checkpoints.rotate(run_dir, self.args.save_total_limit, keep=run_dir / name)
            except OSError as exc:
                checkpoints.end_staging(run_dir)  # also frees the room the unfinished checkpoint took
                error = checkpoints.storage_error(exc, run_dir, f"{name} ({exc.filename or 'its files'})")
                if error is None:
                    raise
                raise error from None
            checkpoints.end_staging(run_dir)

        def _save(self, output_dir=None, state_dict=None) -> None:
            if state_dict is not None:
                state_dict = without_tied_copies(self.accelerator.unwrap_model(self.model), state_dict)
            super()._save(output_dir, state_dict=state_dict)

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


def without_tied_copies(model: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the names of tied weights (the LM head tied to the embedding), as one process saves.

    A state dict gathered from shards (FSDP's full state dict) holds a tied weight under both of its names as two
    separate tensors, which ``save_pretrained`` cannot recognise as one: the files would differ from a plain
    run's by an extra ``lm_head.weight``."""
    tied = getattr(model, "_tied_weights_keys", None)
    if not isinstance(tied, dict) or not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return state_dict
    drop = {name for name, source in tied.items() if name in state_dict and source in state_dict}
    return {k: v for k, v in state_dict.items() if k not in drop} if drop else state_dict


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
    # non-reentrant checkpointing needs no requires_grad trick on the (frozen) embeddings; offload_to_cpu,
    # checkpoint_regions and uncheckpointed_layers are handled by the model's gradient_checkpointing_enable
    kwargs = None
    if cfg.gradient_checkpointing:
        kwargs = {"use_reentrant": False, "offload_to_cpu": cfg.use_unsloth_gc}
        if cfg.checkpoint_regions == "mixers":
            kwargs["checkpoint_regions"] = cfg.checkpoint_regions
        if cfg.uncheckpointed_layers:
            kwargs["uncheckpointed_layers"] = cfg.uncheckpointed_layers
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
        # Every trainable weight takes part in every forward (LoRA, full and freeze tuning alike): DDP need not
        # search the graph for unused ones each step (the Trainer's default would, without checkpointing).
        ddp_find_unused_parameters=bool(cfg.ddp_find_unused_parameters),
        **engine_arguments(cfg),  # DeepSpeed or FSDP2 (train.distributed)
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
    from tnlora.train.nonfinite import NonFiniteGuard

    guard = NonFiniteGuard(cfg.nan_policy, cfg.nan_skip_limit, cfg.output_dir)
    callbacks = list(callbacks or [])
    if cfg.fp8:
        from tnlora.train.lora_fused import BaseFp8Callback

        callbacks.append(BaseFp8Callback())
    trainer = trainer_class()(
        model=model,
        args=args if args is not None else training_arguments(cfg, has_eval=data.eval is not None),
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=data.collator,
        processing_class=tokenizer,
        callbacks=[ProgressCallback(), guard, *callbacks],
    )
    trainer.nonfinite = guard
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
        print("warning: the model ignores num_items_in_batch; the loss is a mean of per-micro-batch means",
              file=sys.stderr)  # fmt: skip
    return trainer


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
