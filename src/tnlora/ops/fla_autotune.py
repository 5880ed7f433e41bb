"""fla-core's autotuning results, shipped with tnlora and stored in Triton's cache before fla's first launch.

fla-core 0.6.0 autotunes each of its chunk kernels on first use, for every new shape key (head count, q/k and
v widths, packed rows or not, with or without states): Triton compiles and times every candidate launch, about
five minutes per q/k width on an H100, which the first training run on a new machine would spend before its
first step. Triton keeps what it found on disk (fla asks for ``cache_results``), under a key that hashes
Triton's build, the compile target (ptxas and the architecture), the kernel's source and the shape key.

``resources/fla_autotune_sm90.tgz`` holds those results for the shapes of the tiny preset, 385M, 1B and 7B, tuned
on an H100 (the tiny preset's on an H200, the same sm_90 target; ``benchmarks/gpu_run.sh warm pack`` writes
them). On the cards and versions they were made and measured with
(:data:`SHIPPED`), :func:`store_shipped_results` puts each into Triton's cache where that entry is absent,
through Triton's own cache manager (so wherever the user's Triton cache lives); fla's autotuner then reads it as
it would read its own earlier result. An entry already in the cache (tuned on the user's machine) is never
replaced. Anything else (another card, another Triton or fla version, another shape) autotunes as before: the
results only ever skip the tuning, they never change what the kernels compute.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import logging
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Protocol

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShippedResults:
    """An archive of Triton autotune results and what they were made with."""

    archive: str  # under tnlora/resources
    triton: str
    fla: str
    capability: tuple[int, int]
    devices: tuple[str, ...]  # torch.cuda.get_device_name of the cards they were tuned or measured on


SHIPPED = ShippedResults(
    archive="fla_autotune_sm90.tgz",
    triton="3.6.0",
    fla="0.6.0",
    capability=(9, 0),
    devices=("NVIDIA H100 80GB HBM3", "NVIDIA H200"),
)

# A member of the archive: Triton's cache folder (the base32 of a sha256 key) and the kernel's result file.
MEMBER = re.compile(r"^(?:\./)?([A-Z2-7]{52})/([A-Za-z0-9_]{1,150}\.autotune\.json)$")


class CacheManager(Protocol):
    """What is used of Triton's ``CacheManager`` (``triton.runtime.cache``)."""

    def get_file(self, filename: str) -> str | None: ...

    def put(self, data: str, filename: str, binary: bool = True) -> str: ...


def mismatch(shipped: ShippedResults, triton_version: str | None, fla_version: str | None, device_name: str,
             capability: tuple[int, int]) -> str | None:
    """Why ``shipped`` cannot serve this machine (None: it can). Results for another build or target would
    never be looked up, and a card they were not tuned on keeps its own tuning."""
    if triton_version != shipped.triton:
        return f"triton {triton_version} (results for {shipped.triton})"
    if fla_version != shipped.fla:
        return f"fla-core {fla_version} (results for {shipped.fla})"
    if tuple(capability) != shipped.capability or device_name not in shipped.devices:
        return f"{device_name} (results tuned for {', '.join(shipped.devices)})"
    return None


def cache_key(folder: str) -> str:
    """The hex key whose cache folder is ``folder`` (Triton names each folder by the base32 of its key)."""
    return base64.b32decode(folder + "=" * (-len(folder) % 8)).hex()


def store_results(archive: bytes, manager: Callable[[str], CacheManager]) -> int:
    """Store each result of ``archive`` (a .tgz of ``FOLDER/KERNEL.autotune.json`` files) with
    ``manager(hex key)`` where that manager has no such file yet; returns how many were stored. A member that is
    not such a file, or not a JSON result, is skipped."""
    stored = 0
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar.getmembers():
            match = MEMBER.match(member.name)
            if not member.isfile() or match is None:
                continue
            folder, name = match.groups()
            data = tar.extractfile(member).read().decode("utf-8")
            try:
                if "configs_timings" not in json.loads(data):
                    continue
                key = cache_key(folder)
            except (ValueError, binascii.Error):
                continue
            cache = manager(key)
            if cache.get_file(name) is None:
                cache.put(data, name, binary=False)
                stored += 1
    return stored


def _versions() -> tuple[str | None, str | None]:
    try:
        import triton
    except ImportError:
        return None, None
    try:
        import fla
    except Exception:  # an installed but broken fla is treated as absent here too
        return triton.__version__, None
    return triton.__version__, getattr(fla, "__version__", None)


@functools.cache
def store_shipped_results(device_index: int) -> int:
    """Store :data:`SHIPPED`'s results in Triton's cache if they serve the CUDA device ``device_index`` (once
    per process and device); returns how many entries were added. Never fails a run: a cache that cannot be
    written means fla tunes as it would have (logged)."""
    triton_version, fla_version = _versions()
    reason = mismatch(SHIPPED, triton_version, fla_version, torch.cuda.get_device_name(device_index),
                      torch.cuda.get_device_capability(device_index))
    if reason is not None:
        logger.info(f"fla autotuning: no shipped results for {reason}; fla tunes its kernels on first use")
        return 0
    from triton.runtime.cache import get_cache_manager

    try:
        archive = resources.files("tnlora.resources").joinpath(SHIPPED.archive).read_bytes()
        stored = store_results(archive, get_cache_manager)
    except (OSError, RuntimeError, tarfile.TarError) as exc:
        logger.warning(f"fla autotuning: the shipped results could not be stored in Triton's cache ({exc}); "
                       f"fla tunes its kernels on first use")
        return 0
    if stored:
        logger.info(f"fla autotuning: {stored} shipped results stored in Triton's cache")
    return stored
