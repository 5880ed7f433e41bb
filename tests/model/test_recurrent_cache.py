"""tnlora.model.cache: the recurrent-state cache and how the model accepts or refuses caches."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from tnl_helpers import build_model, random_ids
from tnlora.model import TransnormerCache


def _filled_cache(batch: int = 3, length: int = 7) -> tuple[torch.nn.Module, TransnormerCache]:
    model = build_model()
    cache = TransnormerCache(model.config)
    ids = random_ids(batch, length)
    model(ids, past_key_values=cache)
    return model, cache


def test_cache_counts_tokens_and_holds_one_state_per_layer() -> None:
    model, cache = _filled_cache()
    assert len(cache) == 2 and cache.get_seq_length() == 7 and cache.batch_size == 3
    assert cache.get_state(0).shape == (3, 2, 64, 32) and cache.get_state(1).shape == (3, 2, 32, 32)
    model(torch.tensor([[5], [6], [7]]), past_key_values=cache)
    assert cache.get_seq_length() == 8
    assert TransnormerCache(num_layers=4).get_state(3) is None


def test_reorder_cache_moves_states_with_their_beams() -> None:
    _, cache = _filled_cache()
    before = [cache.get_state(i).clone() for i in range(2)]
    beam_idx = torch.tensor([2, 2, 0])
    cache.reorder_cache(beam_idx)
    for i in range(2):
        assert torch.equal(cache.get_state(i), before[i][beam_idx])
    assert cache.get_seq_length() == 7


def test_batch_repeat_and_select_follow_the_batch() -> None:
    _, cache = _filled_cache(batch=2)
    state = cache.get_state(1).clone()
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.get_state(1), state.repeat_interleave(2, dim=0))
    cache.batch_select_indices(torch.tensor([1, 2]))
    assert torch.equal(cache.get_state(1), state[[0, 1]])


def test_reset_forgets_states_and_positions() -> None:
    model, cache = _filled_cache()
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.get_state(0) is None
    ids = random_ids(3, 4, seed=1)
    assert torch.allclose(model(ids, past_key_values=cache).logits, model(ids).logits, atol=1e-12)


def test_recurrent_states_cannot_be_rolled_back() -> None:
    _, cache = _filled_cache()
    assert not cache.is_croppable
    with pytest.raises(RuntimeError):
        cache.crop(-1)


def test_model_replaces_empty_generic_caches_and_refuses_filled_ones() -> None:
    model = build_model()
    ids = random_ids(1, 5, seed=2)
    out = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
    assert isinstance(out.past_key_values, TransnormerCache)
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    with pytest.raises(TypeError, match="TransnormerCache"):
        model(ids, past_key_values=filled)
    with pytest.raises(TypeError, match="TransnormerCache"):
        model(ids, past_key_values=((torch.zeros(1),),))


def test_training_and_scoring_build_no_cache_unless_asked() -> None:
    model = build_model().train()
    ids = random_ids(1, 5, seed=3)
    assert model(ids).past_key_values is None
    assert isinstance(model(ids, use_cache=True).past_key_values, TransnormerCache)
    assert isinstance(model.eval()(ids).past_key_values, TransnormerCache)
    assert model(ids, labels=ids).past_key_values is None  # scoring needs no state
