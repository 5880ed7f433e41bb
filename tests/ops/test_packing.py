"""tnlora.ops.packing: the example boundaries of packed rows, built once and passed as one object."""

from __future__ import annotations

import pytest
import torch

from tnl_reference import reference_attention
from tnlora.model.modeling import layer_log_decay
from tnlora.ops.lightning import lightning_attention
from tnlora.ops.packing import PackedRows, ScanChunks, ScanSegments, segment_starts


def test_boundaries_of_packed_rows() -> None:
    rows = PackedRows.from_seq_ids(torch.tensor([[0, 0, 1], [2, 2, 2]]))
    assert rows.cu_seqlens.tolist() == rows.cu_seqlens_cpu.tolist() == [0, 2, 3, 6]
    assert rows.cu_seqlens_cpu.device.type == "cpu"
    assert rows.row_first.tolist() == [0, 2] and rows.row_last.tolist() == [1, 2]
    assert rows.num_examples == 3
    assert rows.starts().tolist() == [[0, 0, 2], [0, 0, 0]]


def test_an_id_repeated_across_rows_starts_a_new_example_at_each_row() -> None:
    seq_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [2, 2, 2, 5, 6, 6], [7, 7, 7, 7, 7, 7]])
    rows = PackedRows.from_seq_ids(seq_ids)
    assert rows.cu_seqlens_cpu.tolist() == [0, 2, 5, 6, 9, 10, 12, 18]
    assert rows.row_first.tolist() == [0, 3, 6] and rows.row_last.tolist() == [2, 5, 6]


def test_one_row_cut_by_cu_seqlens_equals_the_same_row_by_ids() -> None:
    cu = torch.tensor([0, 3, 5, 9, 10])
    by_cu = PackedRows.from_cu_seqlens(cu, 10)
    by_ids = PackedRows.from_seq_ids(torch.tensor([[7, 7, 7, 2, 2, 9, 9, 9, 9, 4]]))
    assert by_cu.cu_seqlens_cpu.tolist() == by_ids.cu_seqlens_cpu.tolist() == cu.tolist()
    assert torch.equal(by_cu.starts(), segment_starts(None, cu, 10))


def test_to_the_same_device_is_the_same_object_and_keeps_the_host_copy() -> None:
    rows = PackedRows.from_seq_ids(torch.tensor([[0, 1, 1]]))
    assert rows.to("cpu") is rows
    meta = rows.to("meta")
    assert meta.seq_ids.device.type == "meta" and meta.cu_seqlens_cpu is rows.cu_seqlens_cpu


def test_the_scan_plans_move_their_tensors_and_keep_their_sizes() -> None:
    cu = torch.tensor([0, 5, 75, 139, 140])
    segments, chunks = ScanSegments.build(cu, 64), ScanChunks.build(cu, 64, 32)
    for plan, tensors in ((segments, ("bounds", "starts")), (chunks, ("bounds", "table"))):
        assert plan.to("cpu") is plan
        moved = plan.to("meta")
        assert type(moved) is type(plan) and moved.count == plan.count == 3
        for name in tensors:
            assert getattr(moved, name).device.type == "meta"
            assert getattr(moved, name).shape == getattr(plan, name).shape
    assert chunks.to("meta").chunk == 32


def test_attention_takes_rows_as_it_takes_seq_ids() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 11, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    seq_ids = torch.tensor([[0] * 4 + [1] * 7, [5] * 11])
    s0 = torch.randn(2, 2, 4, 4, generator=gen, dtype=torch.float64)
    log_decay = layer_log_decay(2, 0, 4)
    for impl in ("chunked", "recurrent"):
        by_rows = lightning_attention(q, k, v, log_decay, rows=PackedRows.from_seq_ids(seq_ids), impl=impl,
                                      initial_state=s0, output_final_state=True)  # fmt: skip
        by_ids = lightning_attention(q, k, v, log_decay, seq_ids=seq_ids, impl=impl, initial_state=s0,
                                     output_final_state=True)  # fmt: skip
        assert torch.equal(by_rows[0], by_ids[0]) and torch.equal(by_rows[1], by_ids[1])
        ref = reference_attention(q, k, v, log_decay, seq_ids, s0)
        assert (by_rows[0] - ref).abs().max() < 1e-10
    with pytest.raises(ValueError, match="rows or seq_ids"):
        lightning_attention(q, k, v, log_decay, rows=PackedRows.from_seq_ids(seq_ids), seq_ids=seq_ids)
