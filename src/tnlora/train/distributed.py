"""Training in several processes (``torchrun`` / ``accelerate launch``, one process per GPU): the process group,
which process is the main one, the work it does first, and errors that stop every process.

tnlora brings no distribution scheme of its own: the transformers Trainer (through accelerate) runs DDP,
FSDP2 or DeepSpeed. What tnlora adds around it:

- ``start`` opens the process group before the data is read, with ``ddp_timeout`` (transformers passes no
  timeout on the CPU), so the main process can read and encode the data first (``main_first``) while the
  others wait and then read its cache. DeepSpeed or FSDP without a launcher get a one-process group of their
  own (world size 1).
- Only the main process writes shared files (run files, the marker, the final outputs, the loss plot) and
  prints the run's progress; every process saves its own RNG state in each checkpoint (the Trainer does).
- An error in the main process while it prepares the data is sent to the others, which stop with a line
  naming it; later errors end the failing process, and the launcher (torchrun) ends the others. Without one,
  a process left waiting in a collective stops after ``ddp_timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch

from tnlora.errors import TnloraError

T = TypeVar("T")
# The environment every launcher (torchrun, accelerate launch, deepspeed) sets for each process.
LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class OtherRankFailed(TnloraError):
    """This process stops because another one failed (that one prints the reason)."""


def launched() -> bool:
    """Whether a launcher started this process as one rank of a group (``RANK`` and ``WORLD_SIZE`` are set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """Whether the process group is open."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """The number of processes training together (1 without a launcher)."""
    if active():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if launched() else 1


def rank() -> int:
    """This process's rank (0 without a launcher)."""
    if active():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def is_main() -> bool:
    """Whether this is the process that writes the run's files and prints its progress."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def start(timeout_s: int, *, needs_group: bool = False) -> bool:
    """Open the process group (several processes, or ``needs_group``: DeepSpeed and FSDP run in one even for a
    single process) with ``timeout_s`` for every collective; returns whether one is open.

    The Trainer opens the group itself when it is not open yet; opening it here, before the data is read, lets
    the processes agree on who reads first, and gives the CPU's gloo collectives the run's ``ddp_timeout``.
    """
    if active():
        return True
    if not launched():
        if not needs_group:
            return False
        # DeepSpeed and accelerate's FSDP expect a launcher's environment: a group of one, on a free local port.
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
        )  # fmt: skip
    elif world_size() == 1 and not needs_group:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        # gloo beside NCCL: accelerate's FSDP gathers full state dicts through CPU tensors.
        backend = "cuda:nccl,cpu:gloo"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    if not is_main():
        # One copy of the run's messages: the other processes say only what goes wrong.
        logging.getLogger("tnlora").setLevel(logging.WARNING)
    return True


def finish() -> None:
    """Close the process group after a run that ended normally."""
    if active():
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def broadcast(value: Any) -> Any:
    """The main process's ``value`` in every process (a picklable object; the others pass anything)."""
    if not active():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every process got here."""
    if active():
        torch.distributed.barrier()


def main_first(work: Callable[[], T], what: str) -> T:
    """``work()`` in the main process first, then in the others (reading what it left, e.g. the dataset cache).

    An error in the main process reaches the others, which stop with ``OtherRankFailed`` naming it instead of
    waiting for it.
    """
    if world_size() == 1 or not active():
        return work()
    if is_main():
        try:
            result = work()
        except BaseException as exc:
            broadcast(f"{type(exc).__name__}: {exc}" if not isinstance(exc, TnloraError) else str(exc))
            _stop_together()
            raise
        broadcast(None)
        return result
    failure = broadcast(None)
    if failure is not None:
        _stop_together()
        raise OtherRankFailed(f"rank {rank()}: stopped, the main process failed while {what}: {failure}")
    return work()


def _stop_together() -> None:
    """Every process stops here: each closes the group once all have got here, instead of leaving it to the
    interpreter's exit, where the backend's threads could end the process with SIGABRT after its error line."""
    barrier()
    finish()


@contextlib.contextmanager
def main_process_only() -> Iterator[bool]:
    """Yields whether this process is the main one, and makes the others wait until the main one is done."""
    try:
        yield is_main()
    finally:
        barrier()


# ---------------------------------------------------------------------------------------------------------------
# The engines: DeepSpeed (``deepspeed: FILE``) and FSDP2 (``fsdp: full_shard``), run by the Trainer

# Each decoder layer is one FSDP unit (the model's ``_no_split_modules``); the embedding, the tied LM head and
# the final norm belong to the root unit.
FSDP_LAYER = "TransnormerDecoderLayer"


def read_deepspeed_config(path: str) -> dict[str, Any]:
    """The DeepSpeed config at ``path`` (a JSON mapping); a missing or unreadable file is one ``deepspeed`` line."""
    import json

    from tnlora.errors import ConfigError

    try:
        text = open(path, encoding="utf-8").read()  # noqa: SIM115 (read at once)
    except OSError as exc:
        raise ConfigError(f"deepspeed: cannot read {path} ({exc.strerror})") from None
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"deepspeed: {path} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"deepspeed: {path} must hold a JSON object (DeepSpeed's config)")
    return config


def zero_stage(cfg) -> int | None:
    """The ZeRO stage of the run's DeepSpeed config (None without DeepSpeed)."""
    if not cfg.deepspeed:
        return None
    stage = read_deepspeed_config(cfg.deepspeed).get("zero_optimization", {}).get("stage", 0)
    return int(stage) if str(stage).isdigit() else 0


def shards_parameters(cfg) -> bool:
    """Whether every process holds only a shard of the weights (FSDP, ZeRO-3): nothing can run the model in the
    main process alone (sample replies, predictions)."""
    return bool(cfg.fsdp) or zero_stage(cfg) == 3


def check_engine(cfg, cuda: bool) -> None:
    """Refuse, in one line naming the key, what the chosen engine cannot run: DeepSpeed without its package, FSDP
    without a GPU, ZeRO-3 configs that would save shards instead of the gathered adapter, and the
    features that run the model in the main process alone while the weights are sharded."""
    from tnlora.errors import ConfigError

    key = "deepspeed" if cfg.deepspeed else "fsdp" if cfg.fsdp else None
    if key is None:
        return
    if cfg.deepspeed:
        zero = read_deepspeed_config(cfg.deepspeed).get("zero_optimization", {})
        if str(zero.get("stage", 0)) == "3" and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
            raise ConfigError(
                f"deepspeed: {cfg.deepspeed} sets ZeRO-3 without stage3_gather_16bit_weights_on_model_save: true; "
                "the adapter or model would be saved as DeepSpeed shards that one process cannot load"
            )
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("deepspeed: DeepSpeed is not installed (pip install 'tnlora[deepspeed]')")
    elif not cuda:
        # (DeepSpeed has a CPU accelerator of its own; accelerate runs FSDP on GPUs only and would train without it)
        raise ConfigError("fsdp: needs CUDA GPUs (accelerate runs FSDP on GPUs only); without them, several CPU "
                          "processes train with DDP (torchrun) or DeepSpeed (deepspeed: FILE)")  # fmt: skip
    if cfg.fsdp_config is not None:
        version = fsdp_options(cfg).get("version", 2)
        if str(version) != "2":
            raise ConfigError(f"fsdp_config: version {version}: tnlora runs FSDP2 only (version: 2)")
    if cfg.torch_compile:
        raise ConfigError(
            f"torch_compile: compiled layers are not combined with {key} in tnlora; set torch_compile: false"
        )
    if getattr(cfg, "quantization_bit", None) is not None:
        # bitsandbytes' packed 4/8-bit weights are not something DeepSpeed or FSDP can partition and gather
        raise ConfigError(
            f"quantization_bit: a quantized base is not combined with {key} in tnlora; QLoRA on several GPUs "
            "runs with DDP (torchrun without deepspeed/fsdp)"
        )
    if getattr(cfg, "fp8", False):
        # the fp8 copies are made from each process's whole frozen weight at train begin, beside the engine's
        raise ConfigError(
            f"fp8: the frozen weights' fp8 copies are not combined with {key} in tnlora; fp8 on several GPUs runs "
            "with DDP (torchrun without deepspeed/fsdp)"
        )
    if shards_parameters(cfg):
        what = "FSDP" if cfg.fsdp else "ZeRO-3"
        if cfg.sample_prompts:
            raise ConfigError(
                f"sample_prompts: under {what} each process holds a shard of the weights, so no process can "
                "generate alone; sample after training with tnlora chat / tnlora generate"
            )
        if cfg.do_predict:
            raise ConfigError(
                f"do_predict: under {what} each process holds a shard of the weights, so no process can generate "
                "alone; predict after training with tnlora eval CONFIG.yaml --predict"
            )


def fsdp_options(cfg) -> dict[str, Any]:
    """The Trainer's ``fsdp_config`` for the run: FSDP2, each decoder layer wrapped, outputs and checkpoints
    saved gathered (``FULL_STATE_DICT``), ``fsdp``'s words (shard_grad_op: no reshard after the forward;
    offload: parameters in CPU memory), and whatever the user's ``fsdp_config`` sets on top."""
    import json

    from tnlora.errors import ConfigError

    given: Any = cfg.fsdp_config or {}
    if isinstance(given, str):
        try:
            given = json.loads(open(given, encoding="utf-8").read())  # noqa: SIM115
        except (OSError, ValueError) as exc:
            raise ConfigError(f"fsdp_config: cannot read {cfg.fsdp_config} as JSON ({exc})") from None
        if not isinstance(given, dict):
            raise ConfigError(f"fsdp_config: {cfg.fsdp_config} must hold a JSON object")
    # the Trainer's spelling: accelerate's fsdp_ prefix is dropped
    given = {(k[5:] if k.startswith("fsdp_") else k): v for k, v in given.items()}
    words = str(cfg.fsdp or "").split()
    options: dict[str, Any] = {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "transformer_layer_cls_to_wrap": [FSDP_LAYER],
        "reshard_after_forward": "shard_grad_op" not in words,
        "state_dict_type": "FULL_STATE_DICT",
    }
    if "offload" in words:
        options["cpu_offload"] = True
    options.update(given)
    return options


def engine_arguments(cfg) -> dict[str, Any]:
    """The ``TrainingArguments`` keys of the run's engine (none for DDP or one process)."""
    if cfg.deepspeed:
        return {"deepspeed": cfg.deepspeed}
    if cfg.fsdp:
        return {"fsdp": True, "fsdp_config": fsdp_options(cfg)}
    return {}
