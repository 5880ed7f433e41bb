"""``tnlora bench`` on the CPU: real LoRA steps through the training path, one parseable table row."""

from __future__ import annotations

import re

import torch

from tnlora import bench


def _row(out: str) -> list[str]:
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert len(rows) == 1, out
    return [cell.strip() for cell in rows[-1].strip("|").split("|")]


def test_bench_trains_tiny_and_prints_one_row(capsys, monkeypatch):
    seen = {}
    from tnlora.train import run

    prepare = run.prepare_for_training

    def spy(model, cfg, **kw):
        out = prepare(model, cfg, **kw)
        seen["dtypes"] = {p.dtype for p in out.parameters() if p.requires_grad}
        return out

    monkeypatch.setattr(run, "prepare_for_training", spy)
    code = bench.main(["--model", "tiny", "--attn", "chunked", "--seq_len", "64", "--batch_size", "2",
                       "--grad_accum", "1", "--steps", "2", "--warmup", "1", "--name", "tiny smoke"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^config: tiny .*attn=chunked", out, re.M)
    name, tps, mfu, _peak, step_s, loss = _row(out)
    assert name == "tiny smoke"
    assert float(tps.replace(",", "")) > 0 and float(step_s) > 0
    assert mfu.endswith("%")
    # Random weights over a 384-token vocabulary start near ln(384) = 5.95.
    assert 4.0 < float(loss) < 8.0
    # The bench went through the same preparation as `tnlora train` (the spy ran): fp32 LoRA weights.
    assert seen["dtypes"] == {torch.float32}
