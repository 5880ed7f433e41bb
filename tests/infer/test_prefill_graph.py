"""Short prefills through static buffers (infer/prefill_graph.py) against the eager prefill.

On the CPU the runners run without capture (``install_graph_decoding(capture=False, prefill=True)``: the same
padded forward on the same static buffers, the chunked attention with device-side boundaries) in float64, which
checks the padding, the boundaries, the gather of the last token and the states handed to the cache to 1e-10;
the GPU test captures graphs (bf16, the Triton attention) and skips without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from tnl_helpers import build_model, left_padded, random_ids
from tnlora.infer.decode_graph import install_graph_decoding, installed_graphs
from tnlora.infer.prefill_graph import BUCKETS, MAX_WORK, bucket_for
from tnlora.model import TransnormerCache

GREEDY = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}


def _eager(model, ids, mask=None):
    """Last-token logits [B, 1, vocab] and the cache of the eager prefill (the static path set aside)."""
    installed, model.step_decoder = model.step_decoder, None
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    finally:
        model.step_decoder = installed
    return out.logits, out.past_key_values


def _static(model, ids, mask=None):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    return out.logits, out.past_key_values


def _assert_close(model, got, want) -> None:
    (logits, cache), (want_logits, want_cache) = got, want
    assert logits.shape == want_logits.shape
    torch.testing.assert_close(logits, want_logits, rtol=1e-10, atol=1e-10)
    assert cache.get_seq_length() == want_cache.get_seq_length()
    for layer in range(model.config.decoder_layers):
        torch.testing.assert_close(cache.get_state(layer), want_cache.get_state(layer), rtol=1e-10, atol=1e-10)


@pytest.fixture
def model():
    model = build_model()
    install_graph_decoding(model, capture=False, prefill=True)
    return model


def test_buckets() -> None:
    assert [bucket_for(1, n, 10**9) for n in (2, 16, 17, 64, 65, 257, 512)] == [16, 16, 32, 64, 128, 384, 512]
    assert bucket_for(1, BUCKETS[-1] + 1, 1000) is None  # longer prompts: eager
    # Prompts whose matrix products outweigh their launches run eagerly: 7B at 32 × 64 tokens, not 1B.
    assert bucket_for(32, 64, 6_836_719_616) is None and bucket_for(1, 64, 6_836_719_616) == 64
    assert bucket_for(32, 64, 1_020_266_496) == 64
    assert bucket_for(2, 64, int(MAX_WORK // 128)) == 64 and bucket_for(2, 64, int(MAX_WORK // 128) + 1) is None


@pytest.mark.parametrize("length", [5, 16, 17, 40])
def test_static_prefill_equals_the_eager_one(model, length: int) -> None:
    ids = random_ids(1, length, seed=length)
    _assert_close(model, _static(model, ids), _eager(model, ids))
    assert list(installed_graphs(model).prefills) == [(1, bucket_for(1, length, 1))]


def test_left_padded_rows_and_a_shorter_prompt_after_a_longer_one(model) -> None:
    ids, mask = left_padded([random_ids(1, 30, seed=1)[0], random_ids(1, 21, seed=2)[0]])
    _assert_close(model, _static(model, ids, mask), _eager(model, ids, mask))
    # The same bucket again with fewer tokens: the columns the longer prompt left behind are not read.
    short = random_ids(2, 18, seed=3)
    _assert_close(model, _static(model, short), _eager(model, short))
    assert len(installed_graphs(model).prefills) == 1


def test_each_cache_keeps_its_own_states(model) -> None:
    first = _static(model, random_ids(1, 9, seed=4))
    kept = [first[1].get_state(i).clone() for i in range(model.config.decoder_layers)]
    _static(model, random_ids(1, 9, seed=5))
    for i, state in enumerate(kept):
        assert torch.equal(first[1].get_state(i), state)


def test_generate_through_the_static_prefill_equals_eager_generate(model) -> None:
    ids, mask = left_padded([random_ids(1, 11, seed=6)[0], random_ids(1, 7, seed=7)[0]])
    static = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True, output_logits=True,
        **GREEDY,
    )  # fmt: skip
    assert (2, 16) in installed_graphs(model).prefills
    installed, model.step_decoder = model.step_decoder, None
    eager = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True, output_logits=True,
        **GREEDY,
    )  # fmt: skip
    model.step_decoder = installed
    assert torch.equal(static.sequences, eager.sequences)
    for a, b in zip(static.logits, eager.logits):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_the_eager_forward_runs_where_the_static_prefill_does_not_apply(model) -> None:
    ids = random_ids(1, 12, seed=8)
    graphs = installed_graphs(model)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=True)  # every position's logits asked for
        assert full.logits.shape[1] == 12
        cache = full.past_key_values
        model(input_ids=random_ids(1, 4, seed=9), past_key_values=cache, logits_to_keep=1)  # a filled cache
        model(input_ids=random_ids(1, BUCKETS[-1] + 1, seed=10), use_cache=True, logits_to_keep=1)  # too long
        model(input_ids=ids, use_cache=False, logits_to_keep=1)  # no cache to fill
    model(input_ids=ids, use_cache=True, logits_to_keep=1)  # gradients recorded
    model.train()
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
    assert graphs.prefills == {}
    assert isinstance(cache, TransnormerCache) and cache.get_seq_length() == 16


def test_off_without_capture_by_default() -> None:
    model = build_model()
    install_graph_decoding(model, capture=False)
    _static(model, random_ids(1, 8))
    assert installed_graphs(model).prefills == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_prefill_graph_equals_the_eager_prefill() -> None:
    from tnlora.ops.select import triton_available

    if not triton_available():
        pytest.skip("needs triton (the forward-only attention kernel)")
    model = build_model(torch.float32).to(device="cuda", dtype=torch.bfloat16)
    install_graph_decoding(model, gemv=False)
    ids, mask = left_padded([random_ids(1, 30, seed=11)[0], random_ids(1, 25, seed=12)[0]])
    ids, mask = ids.cuda(), mask.cuda()
    graphed = _static(model, ids, mask)
    runner = installed_graphs(model).prefills[(2, 32)]
    assert runner.graph is not None  # captured and replayed
    eager = _eager(model, ids, mask)
    torch.testing.assert_close(graphed[0], eager[0], atol=2e-2, rtol=2e-2)
    for layer in range(model.config.decoder_layers):
        torch.testing.assert_close(graphed[1].get_state(layer), eager[1].get_state(layer), atol=2e-2, rtol=2e-2)
    shorter = _static(model, ids[:, 5:], mask[:, 5:])  # the same graph, replayed for 25 tokens
    assert installed_graphs(model).prefills[(2, 32)] is runner
    torch.testing.assert_close(shorter[0], _eager(model, ids[:, 5:], mask[:, 5:])[0], atol=2e-2, rtol=2e-2)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **GREEDY)
    installed, model.step_decoder = model.step_decoder, None
    assert torch.equal(out, model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **GREEDY))
    model.step_decoder = installed


def test_a_failed_prefill_capture_turns_prefill_graphs_off_only() -> None:
    from tnlora.infer.decode_graph import DecodeGraphs

    graphs = DecodeGraphs(capture=True)
    graphs.prefills[(1, 16)] = object()

    def capture() -> None:
        raise RuntimeError("out of memory while capturing")

    assert graphs._capturing(True, capture, prefill=True) is None
    assert not graphs.prefill_graphs and graphs.prefills == {} and not graphs.failed  # decode graphs stay on
