"""fla's shipped autotune results (tnlora.ops.fla_autotune): which machines they serve, how they are stored in
Triton's cache (never over a result already there), and, on a card they were tuned for, that fla's kernels for
the 385M / 1B / 7B shapes then launch without tuning."""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from importlib import resources
from pathlib import Path

import pytest
import torch

from tnlora.ops.fla_autotune import MEMBER, SHIPPED, cache_key, mismatch, store_results

H100 = "NVIDIA H100 80GB HBM3"
FLA_KERNELS = {"chunk_fwd_kernel_h", "chunk_fwd_kernel_o", "chunk_bwd_kernel_dh", "chunk_bwd_kernel_dv",
               "chunk_bwd_kernel_dqkwg"}


def _folder(text: str) -> str:
    """A cache folder name as Triton makes one: the base32 of a sha256 hex key."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode().rstrip("=")


def _archive(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class FakeCache:
    """A dict-backed stand-in for Triton's cache manager of one key."""

    def __init__(self, files: dict[tuple[str, str], str], key: str) -> None:
        self.files, self.key = files, key

    def get_file(self, filename: str) -> str | None:
        return filename if (self.key, filename) in self.files else None

    def put(self, data: str, filename: str, binary: bool = True) -> str:
        assert not binary  # results are JSON text
        self.files[(self.key, filename)] = data
        return filename


def _result(tag: str) -> str:
    return json.dumps({"key": [tag], "configs_timings": [[{"num_warps": 4}, [0.1]]]})


def test_mismatch_names_what_differs():
    ok = (SHIPPED.triton, SHIPPED.fla, H100, (9, 0))
    assert mismatch(SHIPPED, *ok) is None
    assert mismatch(SHIPPED, SHIPPED.triton, SHIPPED.fla, "NVIDIA H200", (9, 0)) is None
    assert "triton 3.7.0" in mismatch(SHIPPED, "3.7.0", *ok[1:])
    assert "triton None" in mismatch(SHIPPED, None, None, H100, (9, 0))
    assert "fla-core 0.5.0" in mismatch(SHIPPED, SHIPPED.triton, "0.5.0", *ok[2:])
    # Another card keeps its own tuning, even of the same architecture.
    assert "NVIDIA H100 PCIe" in mismatch(SHIPPED, SHIPPED.triton, SHIPPED.fla, "NVIDIA H100 PCIe", (9, 0))
    assert "NVIDIA A100" in mismatch(SHIPPED, SHIPPED.triton, SHIPPED.fla, "NVIDIA A100-SXM4-80GB", (8, 0))


def test_cache_key_is_the_hex_key_of_tritons_folder_name():
    key = hashlib.sha256(b"some kernel").hexdigest()
    folder = base64.b32encode(bytes.fromhex(key)).decode().rstrip("=")  # triton.runtime.cache._base32
    assert len(folder) == 52
    assert cache_key(folder) == key


def test_store_results_adds_only_missing_entries():
    a, b, c = _folder("a"), _folder("b"), _folder("c")
    archive = _archive({
        f"./{a}/chunk_fwd_kernel_h.autotune.json": _result("a"),
        f"{b}/chunk_bwd_kernel_dv.autotune.json": _result("b"),
        f"./{c}/chunk_fwd_kernel_o.autotune.json": "not json",  # skipped
        f"./{c}/chunk_fwd_kernel_o.autotune.json.tmp": _result("c"),  # not a result file: skipped
        "./README": "x",
    })  # fmt: skip
    files = {(cache_key(b), "chunk_bwd_kernel_dv.autotune.json"): "tuned here"}
    assert store_results(archive, functools.partial(FakeCache, files)) == 1
    assert files == {
        (cache_key(a), "chunk_fwd_kernel_h.autotune.json"): _result("a"),
        (cache_key(b), "chunk_bwd_kernel_dv.autotune.json"): "tuned here",  # the machine's own result is kept
    }
    assert store_results(archive, functools.partial(FakeCache, files)) == 0  # a second store adds nothing


def test_the_shipped_archive_holds_fla_results_only():
    archive = resources.files("tnlora.resources").joinpath(SHIPPED.archive).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        results = {m.name: json.loads(tar.extractfile(m).read()) for m in members}
    assert len(members) >= 85
    for name, result in results.items():
        match = MEMBER.match(name)
        assert match is not None, name
        assert match.group(2).removesuffix(".autotune.json") in FLA_KERNELS, name
        assert set(result) == {"key", "configs_timings"}, name
        assert result["configs_timings"], name
    assert store_results(archive, functools.partial(FakeCache, {})) == len(members)


def test_results_land_where_tritons_autotuner_reads_them(tmp_path, monkeypatch):
    pytest.importorskip("triton", reason="needs triton (installed with PyTorch's CUDA wheels)")
    from triton.runtime.cache import get_cache_manager

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    key = hashlib.sha256(b"a kernel's cache key").hexdigest()
    folder = base64.b32encode(bytes.fromhex(key)).decode().rstrip("=")
    archive = _archive({f"./{folder}/chunk_fwd_kernel_h.autotune.json": _result("a")})
    assert store_results(archive, get_cache_manager) == 1
    # Where the autotuner looks: get_cache_manager(its sha256 hex key).get_file(f"{kernel}.autotune.json").
    path = get_cache_manager(key).get_file("chunk_fwd_kernel_h.autotune.json")
    assert path is not None and Path(path) == tmp_path / folder / "chunk_fwd_kernel_h.autotune.json"
    assert json.loads(Path(path).read_text()) == json.loads(_result("a"))
    (tmp_path / folder / "chunk_fwd_kernel_h.autotune.json").write_text("tuned here")
    assert store_results(archive, get_cache_manager) == 0
    assert Path(path).read_text() == "tuned here"


# On a card the results were tuned for: a fresh Triton cache, the shipped results stored, then fla's kernels for
# the tiny, 385M, 1B and 7B shapes (q/k widths 128 and 256, tiny's 32 and 64; packed and not, forward and backward)
# in a new process. Triton writes an .autotune.json for every key it had to tune, so the cache must hold exactly what
# was stored.
FRESH_PROCESS = """
import sys, torch
from tnlora.model.modeling import layer_log_decay
from tnlora.ops.fla_autotune import store_shipped_results
from tnlora.ops.lightning import lightning_attention
print("stored", store_shipped_results(0))
# (heads, q/k widths, v width): 385M, 1B, 7B; the tiny preset
for heads, widths, v_width in ((8, (128, 256), 128), (16, (128, 256), 128), (32, (128, 256), 128), (2, (32, 64), 32)):
    decay = layer_log_decay(heads, 0, 16, torch.device("cuda"))
    for width in widths:
        for seq_ids in (None, torch.arange(2048, device="cuda")[None] // 700):
            q, k = (torch.randn(1, 2048, heads, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    for _ in "qk")
            v = torch.randn(1, 2048, heads, v_width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            o, _ = lightning_attention(q, k, v, decay, seq_ids=seq_ids, impl="fla")
            o.float().pow(2).mean().backward()
torch.cuda.synchronize()
"""


@pytest.mark.gpu
@pytest.mark.slow
def test_fla_launches_without_tuning_on_a_card_the_results_serve(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("fla.ops.simple_gla", reason="needs fla-core (pip install 'tnlora[gpu]')")
    import fla
    import triton

    reason = mismatch(SHIPPED, triton.__version__, fla.__version__, torch.cuda.get_device_name(0),
                      torch.cuda.get_device_capability(0))
    if reason is not None:
        pytest.skip(f"no shipped results for {reason}")
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stored = int(done.stdout.split("stored ")[1].split()[0])
    archive = resources.files("tnlora.resources").joinpath(SHIPPED.archive).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        assert stored == len([m for m in tar.getmembers() if m.isfile()])
    results = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.autotune.json"))
    assert len(results) == stored, "fla tuned keys the shipped results lack"


def test_the_model_stores_them_when_fla_runs_on_a_cuda_device(monkeypatch):
    from tnlora.model import TransnormerForCausalLM, config_from_preset, modeling

    calls = []
    monkeypatch.setattr(modeling, "store_shipped_results", calls.append)
    model = TransnormerForCausalLM(config_from_preset("tiny", lightning_impl="fla"))
    model.select_kernels("cpu")  # fla chosen by name on the CPU: no CUDA device is asked for
    assert calls == []
    model.select_kernels("cuda:1")  # planned for a CUDA device (nothing is moved)
    assert calls == [1]
    model.config.lightning_impl = "chunked"
    model.select_kernels("cuda:1")
    assert calls == [1]
