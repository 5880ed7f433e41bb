"""infer/prefill.py: prompts packed into one forward equal each prompt read alone (float64, the tiny preset)."""

from __future__ import annotations

import pytest
import torch

from tnlora.infer.prefill import can_pack, packed_prefill
from tnlora.model import load_model
from tnlora.model.cache import TransnormerCache


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model("tiny", dtype=torch.float64).eval()


def _alone(model, ids: list[int]) -> tuple[torch.Tensor, TransnormerCache]:
    """The last token's logits and the cache after reading ``ids`` alone (batch 1, the model's own forward)."""
    cache = TransnormerCache(model.config)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=model.device), cache=cache, use_cache=True)
    return out.logits[0, -1], cache


def test_packed_prompts_equal_each_prompt_alone_in_float64(model) -> None:
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (1, 7, 64, 65, 130)]
    packed = packed_prefill(model, prompts)
    assert packed.logits.shape[0] == len(prompts) and len(packed.states) == model.config.decoder_layers
    for i, ids in enumerate(prompts):
        logits, cache = _alone(model, ids)
        torch.testing.assert_close(packed.logits[i], logits, rtol=1e-10, atol=1e-10)
        for layer, state in enumerate(packed.states):
            torch.testing.assert_close(state[i], cache.get_state(layer)[0], rtol=1e-10, atol=1e-10)


def test_a_prompt_continuing_a_state_equals_the_whole_conversation_read_alone(model) -> None:
    gen = torch.Generator().manual_seed(2)
    history, turn, fresh = (torch.randint(3, 200, (n,), generator=gen).tolist() for n in (40, 9, 12))
    _, before = _alone(model, history)
    states = [before.get_state(layer)[0] for layer in range(model.config.decoder_layers)]
    packed = packed_prefill(model, [fresh, turn], starts=[0, len(history)], states=[None, states])
    whole_logits, whole = _alone(model, history + turn)
    torch.testing.assert_close(packed.logits[1], whole_logits, rtol=1e-10, atol=1e-10)
    for layer, state in enumerate(packed.states):
        torch.testing.assert_close(state[1], whole.get_state(layer)[0], rtol=1e-10, atol=1e-10)
    # The fresh prompt beside it is untouched by the other's state.
    torch.testing.assert_close(packed.logits[0], _alone(model, fresh)[0], rtol=1e-10, atol=1e-10)


def test_bad_calls_are_refused(model) -> None:
    with pytest.raises(ValueError, match="no empty one"):
        packed_prefill(model, [[5], []])
    with pytest.raises(ValueError, match="one entry per prompt"):
        packed_prefill(model, [[5], [6]], starts=[0])
    assert can_pack(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fla's varlen kernel with per-prompt states)")
def test_on_a_gpu_packed_prompts_with_states_match_each_alone_in_float32() -> None:
    pytest.importorskip("fla", reason="needs fla-core (tnlora[gpu])")
    torch.manual_seed(0)
    model = load_model("tiny", dtype=torch.float32).cuda().eval()
    gen = torch.Generator().manual_seed(3)
    history, *prompts = (torch.randint(3, 200, (n,), generator=gen).tolist() for n in (50, 3, 64, 200, 17))
    _, before = _alone(model, history)
    states = [before.get_state(layer)[0] for layer in range(model.config.decoder_layers)]
    packed = packed_prefill(model, prompts, starts=[0, 0, 0, len(history)], states=[None, None, None, states])
    for i, ids in enumerate(prompts):
        whole = history + ids if i == 3 else ids
        logits, cache = _alone(model, whole)
        torch.testing.assert_close(packed.logits[i], logits, rtol=2e-4, atol=2e-4)
        for layer, state in enumerate(packed.states):
            torch.testing.assert_close(state[i], cache.get_state(layer)[0], rtol=2e-4, atol=2e-4)

