"""CUDA-graph decoding (infer/decode_graph.py): the static-buffer step against the eager cached forward.

On the CPU the runners run with ``capture=False`` (the same in-place step on the same static buffers, no
graph), which checks everything but the capture itself bitwise; the GPU tests at the end compare captured
graphs with eager decoding in bf16 and skip without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationMixin, StoppingCriteriaList

from tnl_helpers import build_model, left_padded, random_ids
from tnlora.infer.decode_graph import (
    GEMV_MAX_BATCH,
    ROWS_MIN_BATCH,
    DecodeStepRunner,
    graph_decoding,
    install_graph_decoding,
    installed_graphs,
    model_fingerprint,
)
from tnlora.model import TransnormerCache
from tnlora.model.generation import HostStoppingCriteria
from tnlora.model.modeling import Lrpe

GREEDY = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}


def _static(model: torch.nn.Module) -> torch.nn.Module:
    """Install static-buffer decoding without graphs on ``model`` (runs anywhere)."""
    install_graph_decoding(model, capture=False)
    return model


def _generate(model: torch.nn.Module, graphs: bool, *args: object, **kwargs: object):
    """generate() with the static path on (installing CUDA graphs if nothing is installed) or off (the
    installed runners set aside meanwhile); the logits of every step are returned too."""
    installed = model.step_decoder
    if graphs and installed is None:
        install_graph_decoding(model)
    elif not graphs:
        model.step_decoder = None
    try:
        return model.generate(*args, return_dict_in_generate=True, output_logits=True, **kwargs)
    finally:
        if not graphs:
            model.step_decoder = installed


def _assert_same(eager, static) -> None:
    assert torch.equal(eager.sequences, static.sequences)
    assert len(eager.logits) == len(static.logits)
    for a, b in zip(eager.logits, static.logits):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# LRPE with the position as a tensor


@pytest.mark.parametrize("angle_dtype", ["float32", "model"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lrpe_tensor_offset_equals_int_offset(angle_dtype: str, dtype: torch.dtype) -> None:
    lrpe = Lrpe(2, 8, angle_dtype).to(dtype)
    # Several tokens only for fp32 angles: with "model" rounding the int path itself rounds per device.
    for length in (1, 5) if angle_dtype == "float32" else (1,):
        x = torch.randn(3, length, 2, 8, generator=torch.Generator().manual_seed(length)).to(dtype)
        for offset in (0, 1, 255, 257, 1001, 4099, 70001):
            want = lrpe(x, offset)
            got = lrpe(x, torch.tensor(offset))
            assert torch.equal(got, want), (offset, length)


# ---------------------------------------------------------------------------------------------------------
# The static step itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_static_step_logits_equal_cached_forward(dtype: torch.dtype) -> None:
    model = build_model(dtype)
    ids = random_ids(3, 20)
    eager_cache, static_cache = TransnormerCache(model.config), TransnormerCache(model.config)
    with torch.no_grad():
        model(ids[:, :7], past_key_values=eager_cache)
        model(ids[:, :7], past_key_values=static_cache)
        runner = DecodeStepRunner(model, 3, torch.device("cpu"), capture=False)
        for t in range(7, 20):
            want = model(ids[:, t : t + 1], past_key_values=eager_cache).logits
            got = runner.step(model, ids[:, t : t + 1], None, static_cache)
            assert torch.equal(got, want)
            assert static_cache.get_seq_length() == eager_cache.get_seq_length() == t + 1
            assert all(static_cache.get_state(i) is runner.states[i] for i in range(2))
    for i in range(2):
        assert torch.equal(static_cache.get_state(i), eager_cache.get_state(i))


def test_static_step_with_official_lrpe_rounding() -> None:
    model = _static(build_model(torch.bfloat16, lrpe_angle_dtype="model"))
    prompt = random_ids(2, 9)
    _assert_same(_generate(model, False, prompt, max_new_tokens=12, **GREEDY),
                 _generate(_static(model), True, prompt, max_new_tokens=12, **GREEDY))


def test_model_forward_dispatches_only_for_no_grad_eval_one_token_steps() -> None:
    model = _static(build_model())
    graphs = installed_graphs(model)
    ids = random_ids(2, 6)
    cache = TransnormerCache(model.config)
    model(ids[:, :5], past_key_values=cache)  # grad enabled: eager
    model(ids[:, 5:], past_key_values=cache)
    assert not graphs.runners
    with torch.no_grad():
        model(ids, past_key_values=TransnormerCache(model.config))  # several tokens: eager
        assert not graphs.runners
        model.train()
        model(ids[:, :1], past_key_values=TransnormerCache(model.config))  # training mode: eager
        assert not graphs.runners
        model.eval()
        model(ids[:, :1], past_key_values=TransnormerCache(model.config))
        assert set(graphs.runners) == {2}


# ---------------------------------------------------------------------------------------------------------
# Through generate()


def test_greedy_generate_is_identical() -> None:
    model = _static(build_model(torch.float32))
    prompt = random_ids(1, 11)
    eager = _generate(model, False, prompt, max_new_tokens=14, **GREEDY)
    static = _generate(model, True, prompt, max_new_tokens=14, **GREEDY)
    _assert_same(eager, static)
    assert len(set(static.sequences[0, 11:].tolist())) >= 4  # a non-degenerate continuation
    cache = static.past_key_values
    assert all(cache.get_state(i) is installed_graphs(model).runners[1].states[i] for i in range(2))


def test_beam_search_reordering_is_identical() -> None:
    model = _static(build_model())
    prompt = random_ids(2, 8)
    kwargs = {"num_beams": 3, "num_return_sequences": 3, "max_new_tokens": 7, "length_penalty": 0.0}
    eager = _generate(model, False, prompt, output_scores=True, **kwargs, **GREEDY)
    static = _generate(model, True, prompt, output_scores=True, **kwargs, **GREEDY)
    assert torch.equal(eager.sequences, static.sequences)
    assert torch.equal(eager.sequences_scores, static.sequences_scores)
    assert 6 in installed_graphs(model).runners  # 2 prompts × 3 beams went through the static step


def test_left_padded_batch_is_identical() -> None:
    model = _static(build_model())
    rows = [random_ids(1, 13, seed=1)[0], random_ids(1, 4, seed=2)[0], random_ids(1, 9, seed=3)[0]]
    ids, mask = left_padded(rows)
    eager = _generate(model, False, ids, attention_mask=mask, max_new_tokens=9, **GREEDY)
    static = _generate(model, True, ids, attention_mask=mask, max_new_tokens=9, **GREEDY)
    _assert_same(eager, static)


def test_successive_generate_calls_reuse_the_runner_and_keep_old_caches() -> None:
    model = _static(build_model())
    prompts = [random_ids(2, 10, seed=s) for s in (1, 2, 3)]
    eager = [_generate(model, False, p, max_new_tokens=6, **GREEDY) for p in prompts]
    static = []
    for p in prompts:
        static.append(_generate(model, True, p, max_new_tokens=6, **GREEDY))
        kept = [static[-1].past_key_values.get_state(i).clone() for i in range(2)]
        if len(static) == 1:
            runner = installed_graphs(model).runners[2]
        assert installed_graphs(model).runners[2] is runner  # built once, reused by the later calls
    for e, s in zip(eager, static):
        _assert_same(e, s)
    # An earlier call's cache was handed its own copy before the next call overwrote the static states,
    # so every returned cache still holds its own final state (equal to the eager one).
    for e, s in zip(eager, static):
        for i in range(2):
            assert torch.equal(s.past_key_values.get_state(i), e.past_key_values.get_state(i))
    assert all(torch.equal(static[-1].past_key_values.get_state(i), kept[i]) for i in range(2))


def test_inference_mode_and_no_grad_calls_share_the_runner() -> None:
    # generate_replies runs under inference_mode, plain generate() under no_grad: the static buffers must
    # accept in-place writes in both (they are created as normal tensors).
    model = _static(build_model())
    prompt = random_ids(2, 6)
    eager = _generate(model, False, prompt, max_new_tokens=5, **GREEDY)
    with torch.inference_mode():
        first = _generate(model, True, prompt, max_new_tokens=5, **GREEDY)
    second = _generate(model, True, prompt, max_new_tokens=5, **GREEDY)
    _assert_same(eager, first)
    _assert_same(eager, second)


def test_generate_continues_from_a_returned_cache() -> None:
    model = _static(build_model())
    first = _generate(model, True, random_ids(1, 10), max_new_tokens=4, **GREEDY)
    follow = torch.cat([first.sequences, random_ids(1, 5, seed=9)], dim=1)
    resumed = _generate(model, True, follow, past_key_values=first.past_key_values, max_new_tokens=4, **GREEDY)
    assert torch.equal(resumed.sequences, _generate(model, False, follow, max_new_tokens=4, **GREEDY).sequences)


def test_unmerged_lora_is_run_through_the_static_step_and_adapter_switches_rebuild_it() -> None:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["qkvu_proj", "out_proj", "l1", "l2", "l3"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = get_peft_model(build_model(), lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    base = model.get_base_model()
    _static(base)
    prompt = random_ids(1, 8)
    eager = _generate(base, False, prompt, max_new_tokens=8, **GREEDY)
    static = _generate(base, True, prompt, max_new_tokens=8, **GREEDY)
    _assert_same(eager, static)
    runner = installed_graphs(base).runners[1]
    with model.disable_adapter():
        plain_eager = _generate(base, False, prompt, max_new_tokens=8, **GREEDY)
        plain_static = _generate(base, True, prompt, max_new_tokens=8, **GREEDY)
    _assert_same(plain_eager, plain_static)
    assert not torch.equal(plain_eager.sequences, eager.sequences)  # the adapter matters
    assert installed_graphs(base).runners[1] is not runner  # the switch was noticed


def test_the_fused_projection_batches_are_checked() -> None:
    """Fused projections at one row and at ``rows_min_batch`` to ``gemv_max_batch`` rows (by default
    ROWS_MIN_BATCH to GEMV_MAX_BATCH, what measured fastest), each bound within the rows kernel's limit."""
    model = build_model(torch.float32)
    graphs = install_graph_decoding(model, capture=False)
    assert (graphs.rows_min_batch, graphs.gemv_max_batch) == (ROWS_MIN_BATCH, GEMV_MAX_BATCH)
    assert [b for b in range(1, 65) if graphs.fused(b)] == [1, *range(ROWS_MIN_BATCH, GEMV_MAX_BATCH + 1)]
    graphs = install_graph_decoding(model, capture=False, gemv_max_batch=64, rows_min_batch=2)
    assert [b for b in range(1, 66) if graphs.fused(b)] == list(range(1, 65))
    assert [b for b in range(1, 9) if install_graph_decoding(model, capture=False, gemv_max_batch=1).fused(b)] == [1]
    for wrong in (0, 65):
        with pytest.raises(ValueError, match="gemv_max_batch must be 1 to 64"):
            install_graph_decoding(model, capture=False, gemv_max_batch=wrong)
    for wrong in (1, 65):
        with pytest.raises(ValueError, match="rows_min_batch must be 2 to 64"):
            install_graph_decoding(model, capture=False, rows_min_batch=wrong)


def test_graph_decoding_installs_runners_for_the_call_only() -> None:
    """``graph_decoding``: runners for the ``with`` block, the model's own forward after it; nothing changed where
    runners are installed already, or for graphs (``capture``) of a model that is not on a CUDA device."""
    model = build_model(torch.float32)
    prompt = random_ids(2, 7)
    eager = _generate(model, False, prompt, max_new_tokens=6, **GREEDY)
    with graph_decoding(model, capture=False) as graphs:
        assert graphs is not None and installed_graphs(model) is graphs
        _assert_same(eager, model.generate(prompt, max_new_tokens=6, return_dict_in_generate=True,
                                           output_logits=True, **GREEDY))  # fmt: skip
        assert graphs.runners[2].graph is None  # the static step ran (no graph without capture)
    assert model.step_decoder is None and not graphs.runners
    with graph_decoding(model) as graphs:  # graphs asked for, a CPU model: the eager steps
        assert graphs is None and model.step_decoder is None
    kept = install_graph_decoding(model, capture=False)
    with graph_decoding(model, capture=False) as graphs:
        assert graphs is None and installed_graphs(model) is kept
    assert installed_graphs(model) is kept


def test_the_fingerprint_changes_with_what_a_graph_holds_and_only_then() -> None:
    """What captured graphs depend on: a parameter or buffer replaced (a new address), a module swapped, the
    decode kernel; values written in place keep it (graphs read them at replay)."""
    model = build_model()
    first = model_fingerprint(model)
    assert first is not None and model_fingerprint(model) == first
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # in place: the same tensor
    assert model_fingerprint(model) == first
    mixer = model.model.layers[1].token_mixer
    changes = [
        lambda: setattr(model.lm_head, "weight", torch.nn.Parameter(model.lm_head.weight.detach().clone())),
        lambda: mixer.register_buffer("log_decay", mixer.log_decay.clone(), persistent=False),
        lambda: setattr(model.model.layers[0], "channel_norm", torch.nn.Identity()),
        lambda: setattr(model.config, "decode_kernel", "triton"),
    ]
    for change in changes:
        before = model_fingerprint(model)
        change()
        assert model_fingerprint(model) != before


# ---------------------------------------------------------------------------------------------------------
# CUDA graphs (skipped without a GPU)

class _StopRowOneAt(HostStoppingCriteria):
    """A host-side criterion: row 1 is done at its fifth token."""

    def done_on_host(self, generated: list[list[int]]) -> list[bool]:
        return [i == 1 and len(row) >= 5 for i, row in enumerate(generated)]


def _overlapped_and_transformers_loop(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> None:
    """The model's generate (the overlapped loop, through the installed static step) equals transformers' own
    loop through the same step, greedy and sampled, with an eos that ends row 0 at its third token and a
    host-side criterion that ends row 1 at its fifth."""
    stop = StoppingCriteriaList([_StopRowOneAt(ids.shape[1])])
    for sample in ({"do_sample": False}, {"do_sample": True, "top_k": 20, "temperature": 0.8}):
        settings = {**GREEDY, **kwargs, **sample, "stopping_criteria": stop}
        torch.manual_seed(11)
        eos = int(model.generate(ids, **{**settings, "max_new_tokens": 3})[0, -1])
        runs = []
        for loop in ({}, {"custom_generate": GenerationMixin._sample}):
            torch.manual_seed(11)
            runs.append(model.generate(ids, **{**settings, "eos_token_id": eos}, **loop))
        assert torch.equal(runs[0], runs[1])
        assert eos in runs[0][0, ids.shape[1] :].tolist()
        assert (runs[0][1, ids.shape[1] + 5 :] == GREEDY["pad_token_id"]).all()


def test_overlapped_loop_through_the_static_step_equals_transformers_loop() -> None:
    model = _static(build_model())
    ids, mask = left_padded([random_ids(1, 9, seed=1)[0], random_ids(1, 5, seed=2)[0]])
    _overlapped_and_transformers_loop(model, ids, attention_mask=mask, max_new_tokens=12)
    # The greedy runs went through the device loop (a host criterion ends row 1 there one step later on the
    # device; the loop pads the token it chose meanwhile).
    assert installed_graphs(model).runners[2].greedy[1].sent > 0


# ---------------------------------------------------------------------------------------------------------
# Greedy steps on the device (GreedyDeviceSteps: token choice and stopping inside the step)


class _StopAtSixth(HostStoppingCriteria):
    """A host-side criterion: the (single) row is done at its sixth token."""

    def done_on_host(self, generated: list[list[int]]) -> list[bool]:
        return [len(row) >= 6 for row in generated]


def _device_loop_and_transformers_loop(
    model: torch.nn.Module, ids: torch.Tensor, steps: int | None, **kwargs: object
) -> torch.Tensor:
    """generate() through the device loop equals transformers' loop through the plain static step, and the
    device loop ran (``steps`` of its steps launched, one more than it read as the overlapped loop's extra
    forward; None: at least one); returns the sequences."""
    graphs = installed_graphs(model)
    settings = {**GREEDY, **kwargs}
    ours = model.generate(ids, **settings)
    theirs = model.generate(ids, **settings, custom_generate=GenerationMixin._sample)
    assert torch.equal(ours, theirs)
    eos_count = 0 if settings["eos_token_id"] is None else 1
    sent = graphs.runners[ids.shape[0]].greedy[eos_count].sent
    assert sent == steps if steps is not None else sent > 0
    return ours


def test_device_greedy_loop_equals_transformers_loop_to_the_length_limit() -> None:
    model = _static(build_model(torch.float32))
    prompt = random_ids(1, 11)
    out = _device_loop_and_transformers_loop(model, prompt, 13, max_new_tokens=14)
    assert out.shape == (1, 25)
    assert len(set(out[0, 11:].tolist())) >= 4  # a non-degenerate continuation


def test_device_greedy_loop_pads_rows_ended_by_eos_and_stops_when_all_are() -> None:
    model = _static(build_model())
    ids, mask = left_padded([random_ids(1, 9, seed=1)[0], random_ids(1, 5, seed=2)[0], random_ids(1, 7, seed=3)[0]])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=12, **GREEDY)
    eos = int(free[0, ids.shape[1] + 2])  # row 0's third token
    steps = _steps_until_all_end(free, ids.shape[1], eos, 12)
    out = _device_loop_and_transformers_loop(model, ids, steps, attention_mask=mask, max_new_tokens=12,
                                             eos_token_id=eos)
    new = out[0, ids.shape[1] :].tolist()
    assert new.index(eos) == 2 and all(t == GREEDY["pad_token_id"] for t in new[3:])


def _steps_until_all_end(free: torch.Tensor, start: int, eos: int, limit: int) -> int:
    """Device steps launched for ``free``'s continuations (decoded without an eos) once ``eos`` ends rows: each
    row ends at its first ``eos``, the loop reads tokens until every row has (launching the step after each
    before reading it) or until the limit (where no step follows the last; the first token is the prefill's)."""
    read = max(row.index(eos) + 1 if eos in row else limit for row in free[:, start:].tolist())
    return read if read < limit else limit - 1


def test_device_greedy_loop_keeps_eos_banned_until_min_new_tokens() -> None:
    model = _static(build_model())
    prompt = random_ids(1, 10, seed=4)
    free = model.generate(prompt, max_new_tokens=10, **GREEDY)
    eos = int(free[0, 11])  # the second token
    out = _device_loop_and_transformers_loop(model, prompt, 9, max_new_tokens=10, min_new_tokens=6,
                                             eos_token_id=eos)
    assert eos not in out[0, 10:16].tolist()  # banned for the first six
    assert not torch.equal(out, free)  # the ban changed the continuation


def test_device_greedy_loop_with_min_length_an_eos_first_token_and_mixed_criteria() -> None:
    model = _static(build_model())
    ids, mask = left_padded([random_ids(1, 7, seed=7)[0], random_ids(1, 4, seed=8)[0]])
    free = model.generate(ids, attention_mask=mask, max_new_tokens=10, **GREEDY)
    start = ids.shape[1]
    # min_length (counted with the prompt) bans row 0's second token as eos for the first five new tokens.
    eos = int(free[0, start + 1])
    banned = _device_loop_and_transformers_loop(model, ids, None, attention_mask=mask, max_new_tokens=10,
                                                eos_token_id=eos, min_length=start + 5)
    assert eos not in banned[:, start : start + 5].tolist()[0] and not torch.equal(banned[0], free[0])
    # Every row's first token an eos: the loop launches one step (the overlapped loop's extra forward) and
    # stops after reading the first token.
    first = model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=1, **GREEDY)[0, -1]
    out = _device_loop_and_transformers_loop(model, ids[:1], 1, attention_mask=mask[:1], max_new_tokens=10,
                                             eos_token_id=int(first))
    assert out.shape == (1, start + 1)
    # An eos, min_new_tokens and a host-side criterion together at batch 2.
    stop = StoppingCriteriaList([_StopRowOneAt(start)])
    _device_loop_and_transformers_loop(model, ids, None, attention_mask=mask, max_new_tokens=10, eos_token_id=eos,
                                       min_new_tokens=3, stopping_criteria=stop)


def test_device_greedy_loop_stops_at_a_host_criterion_and_streams_every_token_once() -> None:
    class Collect:
        def __init__(self) -> None:
            self.tokens: list[int] = []
            self.ended = 0

        def put(self, value: torch.Tensor) -> None:
            self.tokens += value.reshape(-1).tolist()

        def end(self) -> None:
            self.ended += 1

    model = _static(build_model())
    prompt = random_ids(1, 8, seed=5)
    stop = StoppingCriteriaList([_StopAtSixth(prompt.shape[1])])
    out = _device_loop_and_transformers_loop(model, prompt, 6, max_new_tokens=20, stopping_criteria=stop)
    assert out.shape == (1, 14)
    streamer = Collect()
    model.generate(prompt, max_new_tokens=20, stopping_criteria=stop, streamer=streamer, **GREEDY)
    # The streamer gets the prompt first (transformers), then each new token once.
    assert streamer.tokens == out[0].tolist() and streamer.ended == 1


def test_the_device_loop_keeps_no_cache_alive_after_the_call() -> None:
    # A cache still alive when the next call takes the runner gets copies of every state (7B batch 32: 2 GB).
    import gc

    model = _static(build_model())
    model.generate(random_ids(2, 6), max_new_tokens=5, **GREEDY)
    gc.collect()
    runner = installed_graphs(model).runners[2]
    assert runner.greedy[0].sent == 4 and runner.owner() is None


def test_a_failed_capture_turns_graphs_off_and_asks_for_eager_steps() -> None:
    from tnlora.infer.decode_graph import DecodeGraphs

    graphs = DecodeGraphs(capture=True)

    def capture() -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    assert graphs._capturing(False, lambda: "replayed") == "replayed"  # captured already: run as it is
    assert graphs._capturing(True, capture) is None and graphs.failed
    with pytest.raises(ValueError):  # only a capture's RuntimeError is taken for a failed capture
        DecodeGraphs(capture=True)._capturing(True, lambda: int("x"))


def test_greedy_rule_covers_only_what_the_device_step_runs() -> None:
    model = _static(build_model())
    prompt = random_ids(2, 6, seed=6)
    for settings in (
        {"do_sample": True, "top_k": 5},  # sampling
        {"repetition_penalty": 1.3},  # a processor the step does not run
    ):
        out = model.generate(prompt, max_new_tokens=5, **{**GREEDY, **settings})
        assert out.shape == (2, 11)
        assert not installed_graphs(model).runners[2].greedy  # the overlapped loop ran
    # A host-side criterion is run by the device loop too; without eos no row is padded after it, as in
    # transformers' loop.
    stop = StoppingCriteriaList([_StopRowOneAt(6)])
    ours = model.generate(prompt, max_new_tokens=9, stopping_criteria=stop, **GREEDY)
    theirs = model.generate(prompt, max_new_tokens=9, stopping_criteria=stop, **GREEDY,
                            custom_generate=GenerationMixin._sample)
    assert torch.equal(ours, theirs) and ours.shape == (2, 15)
    assert installed_graphs(model).runners[2].greedy[0].sent == 8


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_model(**overrides: object) -> torch.nn.Module:
    # The prefill runs the chunked path: fla would first autotune its kernels for the tiny head shape (minutes).
    overrides.setdefault("lightning_impl", "chunked")
    return build_model(torch.float32, **overrides).to(device="cuda", dtype=torch.bfloat16)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graph_greedy_generate_equals_eager(batch: int) -> None:
    model = _cuda_model()
    # The layer forwards' step (the GEMV step, the batch-1 default, has its own test: its folded norms round
    # differently, so a long greedy run may part from eager's at a near-tie).
    install_graph_decoding(model, gemv=False)
    prompt = random_ids(batch, 12).cuda()
    eager = _generate(model, False, prompt, max_new_tokens=24, **GREEDY)
    library = torch.backends.cuda.preferred_blas_library()
    graphed = _generate(model, True, prompt, max_new_tokens=24, **GREEDY)
    assert torch.backends.cuda.preferred_blas_library() == library  # cuBLASLt for the capture only
    runner = installed_graphs(model).runners[batch]
    assert runner.capture and runner.graph is not None  # really replayed a captured graph
    assert torch.equal(eager.sequences, graphed.sequences)
    for a, b in zip(eager.logits, graphed.logits):
        torch.testing.assert_close(b, a, atol=1e-2, rtol=1e-2)
    again = _generate(model, True, prompt, max_new_tokens=24, **GREEDY)  # replayed, not recaptured
    assert installed_graphs(model).runners[batch] is runner
    assert torch.equal(again.sequences, graphed.sequences)


@cuda
@pytest.mark.gpu
def test_cuda_graph_glu_branches_equal_one_stream_bitwise() -> None:
    # The GLU's l2 on a stream of its own beside l1 runs the same kernels on the same buffers: the logits of a
    # whole greedy run equal those of the one-stream graph bit for bit.
    model = _cuda_model()
    prompt = random_ids(4, 12).cuda()
    runs = {}
    for branches in (False, True):
        install_graph_decoding(model, gemv=False, branches=branches)
        runs[branches] = _generate(model, True, prompt, max_new_tokens=16, **GREEDY)
        runner = installed_graphs(model).runners[4]
        assert runner.graph is not None and (runner.branch is not None) == branches
    assert torch.equal(runs[False].sequences, runs[True].sequences)
    for a, b in zip(runs[False].logits, runs[True].logits):
        assert torch.equal(a, b)


@cuda
@pytest.mark.gpu
def test_cuda_graph_beam_search_and_left_padding_equal_eager() -> None:
    model = _cuda_model()
    ids = random_ids(2, 10).cuda()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kwargs = {"num_beams": 3, "max_new_tokens": 10, "attention_mask": mask, **GREEDY}
    eager = _generate(model, False, ids, **kwargs)
    graphed = _generate(model, True, ids, **kwargs)
    assert installed_graphs(model).runners[6].graph is not None
    assert torch.equal(eager.sequences, graphed.sequences)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("angle_dtype", ["float32", "model"])
def test_cuda_lrpe_tensor_offset_equals_int_offset(angle_dtype: str) -> None:
    lrpe = Lrpe(4, 64, angle_dtype).to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 1, 4, 64, device="cuda").to(torch.bfloat16)
    for offset in (0, 257, 1001, 4099, 70001):
        assert torch.equal(lrpe(x, torch.tensor(offset, device="cuda")), lrpe(x, offset))


@cuda
@pytest.mark.gpu
def test_cuda_graph_overlapped_loop_equals_transformers_loop() -> None:
    model = _cuda_model()
    install_graph_decoding(model)
    ids = random_ids(4, 12).cuda()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    _overlapped_and_transformers_loop(model, ids, attention_mask=mask, max_new_tokens=24)
    assert installed_graphs(model).runners[4].graph is not None


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize(("batch", "gemv"), [(1, True), (4, True), (4, False)])
def test_cuda_graph_device_greedy_loop_equals_transformers_loop(batch: int, gemv: bool) -> None:
    # The fused-projection step (one row or several) or the layer forwards: either way the device loop's
    # replays (step and token choice in one graph) must choose what transformers' loop chooses from the plain
    # graph's logits.
    model = _cuda_model()
    # State writes every step, as transformers' loop's steps: the tokens are compared bit for bit (the deferred
    # writes round differently: their own test below).
    install_graph_decoding(model, gemv=gemv, gemv_max_batch=batch, defer_steps=0)
    ids = random_ids(batch, 12).cuda()
    free = model.generate(ids, max_new_tokens=24, **GREEDY)
    eos = int(free[0, 12 + 4])
    for settings in ({"max_new_tokens": 24}, {"max_new_tokens": 24, "eos_token_id": eos},
                     {"max_new_tokens": 24, "eos_token_id": eos, "min_new_tokens": 8}):
        ours = model.generate(ids, **{**GREEDY, **settings})
        theirs = model.generate(ids, **{**GREEDY, **settings}, custom_generate=GenerationMixin._sample)
        assert torch.equal(ours, theirs), settings
    runner = installed_graphs(model).runners[batch]
    assert runner.gemv == (gemv and runner.kernel == "triton")
    steps = runner.greedy
    assert all(s.graph is not None for s in steps.values()) and len(steps) == 2  # no eos ids, one eos id



@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_cuda_graph_device_loop_with_deferred_state_writes_equals_writes_every_step(batch: int) -> None:
    # The captured device loop (the GEMV step at batch 1, with dependent launches; the layer forwards at 4)
    # writing the states back every 4 steps against every step, fp32: the same tokens, and after the loop (23
    # steps: five write-backs, three steps held, added at its end) the same states up to rounding.
    model = build_model(torch.float32, lightning_impl="chunked").cuda()
    ids = random_ids(batch, 12).cuda()
    runs = {}
    for defer in (0, 4):
        install_graph_decoding(model, defer_steps=defer, defer_min_batch=1)
        out = model.generate(ids, max_new_tokens=24, **GREEDY)
        runner = installed_graphs(model).runners[batch]
        steps = runner.greedy[0]
        assert steps.graph is not None and steps.defer_steps == defer and steps.sent == 23
        runs[defer] = out, [state.clone() for state in runner.states]
    assert torch.equal(runs[4][0], runs[0][0])
    for got, want in zip(runs[4][1], runs[0][1], strict=True):
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
