"""tnlora.model.modeling: keys and sizes, forward math vs a float64 reference, masks, packing, LRPE numerics,
decay, loss and gradient checkpointing."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from fixture_files import OFFICIAL_CONFIGS as MODELS
from tnl_helpers import build_model, random_ids
from tnl_reference import reference_logits
from tnlora.model import TransnormerConfig, TransnormerForCausalLM
from tnlora.model.modeling import Lrpe, get_slopes, layer_log_decay, lrpe_theta

PARAMS = {"385M": 398_984_192, "1B": 1_020_266_496, "7B": 6_836_719_616}


# --------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("size", ["385M", "1B", "7B"])
def test_official_configs_give_exact_keys_shapes_and_parameter_counts(size: str) -> None:
    config = TransnormerConfig(**json.loads((MODELS / size / "config.json").read_text()))
    with torch.device("meta"):
        model = TransnormerForCausalLM(config)
    V, d, D, G = config.vocab_size, config.decoder_embed_dim, config.hidden_dim, config.glu_dim
    h = config.decoder_attention_heads
    expected = {"model.embed_tokens.weight": (V, d)}
    for i in range(config.decoder_layers):
        p = f"model.layers.{i}."
        expected[p + "token_mixer.out_proj.weight"] = (d, D)
        if i == 0:
            expected[p + "token_mixer.lrpe.theta"] = (h, 1, D // h)
        expected[p + "token_mixer.qkvu_proj.weight"] = (4 * D, d)
        expected[p + "channel_mixer.l1.weight"] = (G, d)
        expected[p + "channel_mixer.l2.weight"] = (G, d)
        expected[p + "channel_mixer.l3.weight"] = (d, G)
    expected["lm_head.weight"] = (V, d)
    state = model.state_dict()
    assert list(state) == list(expected)  # same keys, in the official checkpoint order
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(p.numel() for p in model.parameters()) == PARAMS[size]
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_random_init_follows_the_spec() -> None:
    model = build_model(torch.float32, init_std=0.02)
    embed = model.model.embed_tokens.weight
    assert torch.all(embed[0] == 0)  # padding row
    assert embed[1:].std().item() == pytest.approx(0.02, rel=0.05)
    assert model.model.layers[0].channel_mixer.l1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    theta = model.model.layers[0].token_mixer.lrpe.theta
    d = theta.numel()
    expected = torch.tensor([10000 ** (-2 * i / d) for i in range(d)]).reshape(theta.shape)
    assert torch.allclose(theta, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------ forward math

MATH_CASES = {
    "tiny": {},
    "odd_heads": {"decoder_attention_heads": 3, "hidden_dim": 48},
    "no_scale_small_chunks": {"no_scale_embedding": True, "lightning_chunk_size": 16},
    "three_layers_lrpe_twice": {"decoder_layers": 3, "linear_use_lrpe_list": [1, 0, 1]},
}


@pytest.mark.parametrize("case", list(MATH_CASES))
def test_logits_equal_float64_reference(case: str) -> None:
    model = build_model(**MATH_CASES[case])
    ids = random_ids(2, 70)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding: v is zeroed there in both
    logits = model(ids, attention_mask=mask).logits
    ref = reference_logits(model.state_dict(), model.config, ids, attention_mask=mask)
    assert (logits - ref).abs().max() < 1e-9 * ref.abs().max()


def test_get_slopes_for_powers_of_two_and_40_heads() -> None:
    assert get_slopes(8) == pytest.approx([2.0**-i for i in range(1, 9)])
    assert get_slopes(16) == pytest.approx([2 ** (-0.5 * (j + 1)) for j in range(16)])
    slopes = get_slopes(40)
    assert len(slopes) == 40
    assert slopes[:32] == pytest.approx(get_slopes(32))
    assert slopes[32:] == pytest.approx([2 ** (-0.125 * (2 * m + 1)) for m in range(8)])


def test_decay_matches_spec_examples_for_7b() -> None:
    first = torch.exp(layer_log_decay(32, 0, 30))
    last = torch.exp(layer_log_decay(32, 29, 30).double())
    assert first[0].item() == pytest.approx(0.431, abs=5e-4)
    assert 1 - last[31].item() == pytest.approx(3.9e-8, rel=0.01)
    assert layer_log_decay(32, 0, 30).dtype == torch.float32


def test_decay_buffers_stay_fp32_under_dtype_casts() -> None:
    model = build_model(torch.float32)
    before = [layer.token_mixer.log_decay.clone() for layer in model.model.layers]
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        model.to(dtype)
        for layer, value in zip(model.model.layers, before):
            assert layer.token_mixer.log_decay.dtype == torch.float32
            assert torch.equal(layer.token_mixer.log_decay, value)
    assert "log_decay" not in " ".join(model.state_dict())


# ---------------------------------------------------------------------------------------------- LRPE


def test_lrpe_angle_switch_is_exact_in_fp32_and_lossy_in_bf16() -> None:
    ids = random_ids(1, 300)
    fp32 = build_model(torch.float32)
    official = build_model(torch.float32, lrpe_angle_dtype="model")
    assert torch.equal(fp32(ids).logits, official(ids).logits)

    reference = fp32(ids).logits
    bf16_fp32_angles = fp32.to(torch.bfloat16)(ids).logits.float()
    bf16_model_angles = official.to(torch.bfloat16)(ids).logits.float()
    assert not torch.equal(bf16_fp32_angles, bf16_model_angles)
    # Spec §10: fp32 angles keep the bf16 model closer to the fp32 math beyond position 256.
    late = slice(256, None)
    err_fp32 = (bf16_fp32_angles[:, late] - reference[:, late]).abs().mean()
    err_model = (bf16_model_angles[:, late] - reference[:, late]).abs().mean()
    assert err_fp32 < err_model


def test_lrpe_model_dtype_rounds_positions_like_the_official_code() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 1, 2, 4).to(torch.bfloat16)
    official, exact = Lrpe(2, 4, "model").to(torch.bfloat16), Lrpe(2, 4, "float32").to(torch.bfloat16)
    # 257 is not a bf16 number: the official index rounds it to 256.
    assert torch.equal(official(x, 257), official(x, 256))
    assert not torch.equal(exact(x, 257), exact(x, 256))


def test_lrpe_depends_only_on_relative_position() -> None:
    lrpe = Lrpe(2, 8, "float32").double()
    q, k = torch.randn(1, 1, 2, 8, dtype=torch.float64), torch.randn(1, 1, 2, 8, dtype=torch.float64)
    near = (lrpe(q, 10) * lrpe(k, 3)).sum(-1)
    far = (lrpe(q, 1007) * lrpe(k, 1000)).sum(-1)
    assert torch.allclose(near, far, atol=1e-10)
    assert lrpe(q, 0).shape[-1] == 16
    assert torch.equal(lrpe_theta(2, 8), Lrpe(2, 8, "float32").theta.data)


# ---------------------------------------------------------------------------------- masks and padding


def test_bool_int_and_float_masks_give_identical_logits() -> None:
    model = build_model()
    ids = random_ids(2, 20)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :5] = 0
    out = [model(ids, attention_mask=m).logits for m in (mask, mask.bool(), mask.double())]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_inputs_embeds_give_the_same_logits_as_input_ids() -> None:
    model = build_model()
    ids = random_ids(2, 33)
    embeds = model.get_input_embeddings()(ids)
    assert torch.equal(model(inputs_embeds=embeds).logits, model(ids).logits)


def test_left_padded_rows_equal_rows_alone() -> None:
    model = build_model()
    rows = [random_ids(1, 30, seed=1)[0], random_ids(1, 17, seed=2)[0]]
    ids = torch.zeros(2, 30, dtype=torch.long)
    mask = torch.zeros(2, 30, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, 30 - len(row) :] = row
        mask[i, 30 - len(row) :] = 1
    ids[1, :13] = 77  # garbage under the padding must not matter
    logits = model(ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        assert torch.allclose(logits[i, 30 - len(row) :], alone, atol=1e-10)


def test_right_padding_leaves_real_token_logits_unchanged() -> None:
    model = build_model()
    row = random_ids(1, 20)[0]
    ids = torch.cat([row, torch.zeros(6, dtype=torch.long)])[None]
    mask = (torch.arange(26) < 20).long()[None]
    assert torch.allclose(
        model(ids, attention_mask=mask).logits[0, :20], model(row[None]).logits[0], atol=1e-10
    )


def test_packed_rows_equal_examples_alone() -> None:
    model = build_model(lightning_chunk_size=8)
    lengths = [[9, 14, 5], [20, 8]]
    examples = [
        [random_ids(1, n, seed=10 * r + i)[0] for i, n in enumerate(row)] for r, row in enumerate(lengths)
    ]
    ids = torch.stack([torch.cat(row) for row in examples])
    seq_ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
    logits = model(ids, seq_ids=seq_ids).logits
    for r, row in enumerate(examples):
        start = 0
        for example in row:
            alone = model(example[None]).logits[0]
            assert torch.allclose(logits[r, start : start + len(example)], alone, atol=1e-10)
            start += len(example)
    # The same examples as one flat row with cu_seqlens.
    flat = torch.cat([e for row in examples for e in row])[None]
    cu = torch.tensor([0, *torch.tensor([n for r in lengths for n in r]).cumsum(0).tolist()])
    assert torch.allclose(
        model(flat, cu_seqlens=cu).logits[0], logits.reshape(-1, logits.shape[-1]), atol=1e-10
    )


def test_attention_masks_must_be_two_dimensional() -> None:
    model = build_model()
    ids = random_ids(1, 4)
    with pytest.raises(ValueError, match="2-D"):
        model(ids, attention_mask=torch.ones(1, 1, 4, 4))


# ---------------------------------------------------------------------------------------------- loss


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, :7] = -100  # a masked prompt
    labels[1, -3:] = -100  # right padding
    return labels


def test_chunked_loss_equals_plain_fp32_cross_entropy_and_its_gradients() -> None:
    model = build_model(torch.float32, loss_chunk_size=7)
    ids = random_ids(2, 25)
    labels = _labels(ids)
    chunked = model(ids, labels=labels)
    assert chunked.logits is None
    grads = torch.autograd.grad(chunked.loss, list(model.parameters()))
    plain = model(ids, labels=labels, return_logits=True)
    assert plain.logits.shape == (2, 25, 384)
    plain_grads = torch.autograd.grad(plain.loss, list(model.parameters()))
    assert torch.allclose(chunked.loss, plain.loss, rtol=1e-6)
    for got, want in zip(grads, plain_grads):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


def test_loss_shifts_labels_and_ignores_minus_100() -> None:
    model = build_model()
    ids = random_ids(2, 25)
    labels = _labels(ids)
    logits = model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 384), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(model(ids, labels=labels).loss, expected, rtol=1e-12)


def test_num_items_in_batch_turns_the_mean_into_a_sum_over_items() -> None:
    model = build_model()
    ids = random_ids(2, 25)
    labels = _labels(ids)
    counted = int((labels[:, 1:] != -100).sum())
    mean = model(ids, labels=labels).loss
    for loss in (
        model(ids, labels=labels, num_items_in_batch=100).loss,
        model(ids, labels=labels, num_items_in_batch=torch.tensor(100)).loss,
        model(ids, labels=labels, num_items_in_batch=100, return_logits=True).loss,
    ):
        assert torch.allclose(loss, mean * counted / 100, rtol=1e-12)


def test_logits_are_returned_with_labels_only_when_asked() -> None:
    model = build_model()
    ids = random_ids(2, 10)
    assert model(ids, labels=ids).logits is None
    assert model(ids, labels=ids, logits_to_keep=1).logits.shape == (2, 1, 384)
    assert model(ids, logits_to_keep=3).logits.shape == (2, 3, 384)
    assert torch.allclose(model(ids, logits_to_keep=3).logits, model(ids).logits[:, -3:], rtol=1e-12)


def test_chunked_loss_never_keeps_full_vocabulary_logits() -> None:
    model = build_model(torch.float32, loss_chunk_size=8).train()
    ids = random_ids(2, 64)
    vocab = model.config.vocab_size

    def largest_saved_logits(**kwargs: object) -> int:
        sizes = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.dim() and t.shape[-1] == vocab and t.data_ptr() != model.lm_head.weight.data_ptr():
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids, **kwargs).loss
        loss.backward()
        return max(sizes)

    assert largest_saved_logits() <= 8 * vocab
    # The hook does see logits when the plain path keeps them.
    assert largest_saved_logits(return_logits=True) >= ids.numel() * vocab


# ------------------------------------------------------------------------------ gradient checkpointing


def _peak_bytes(step: callable) -> int:
    """Peak CPU memory of step() from the profiler's allocation/free timeline."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def test_gradient_checkpointing_lowers_peak_memory_and_keeps_gradients() -> None:
    model = build_model(torch.float32, decoder_layers=4, linear_use_lrpe_list=[1, 0, 0, 0]).train()
    ids = random_ids(4, 256)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    plain_peak = _peak_bytes(step)
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    checkpointed_peak = _peak_bytes(step)
    assert checkpointed_peak < 0.5 * plain_peak
    for p, want in zip(model.parameters(), plain_grads):
        assert torch.equal(p.grad, want)


def test_gradient_checkpointing_works_under_peft_lora() -> None:
    from peft import LoraConfig, get_peft_model

    ids = random_ids(2, 40)

    def lora_grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["qkvu_proj", "out_proj", "l1", "l2", "l3"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)  # the same LoRA A matrices in both runs
            model = get_peft_model(build_model(torch.float32).train(), lora)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(name)))
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = lora_grads(False), lora_grads(True)
    assert set(plain) == set(checkpointed) and len(plain) == 2 * 5 * 2
    for name, grad in plain.items():
        assert grad.abs().sum() > 0
        assert torch.allclose(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


def test_embedding_scale_is_sqrt_d_unless_disabled() -> None:
    ids = random_ids(1, 5)
    scaled, plain = build_model(), build_model(no_scale_embedding=True)
    rows = scaled.model.embed_tokens(ids)
    first_norm = scaled.model.layers[0].token_norm
    # The first layer sees embed_scale · E[ids]; its token norm removes the scale, the residual keeps it.
    hidden = scaled(ids, output_hidden_states=True).hidden_states[0]
    assert torch.allclose(hidden, rows * math.sqrt(64))
    assert torch.allclose(plain(ids, output_hidden_states=True).hidden_states[0], rows)
    assert torch.allclose(first_norm(hidden), first_norm(rows))


def test_chunked_loss_with_a_host_count_equals_the_counted_one() -> None:
    from tnlora.model.modeling import chunked_causal_lm_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False).double()
    hidden = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 9))
    labels[0, :4] = -100
    labels[1, 7] = -100
    count = int((labels[:, 1:] != -100).sum())
    want = chunked_causal_lm_loss(hidden, head, labels, chunk_size=3)
    (want_grad,) = torch.autograd.grad(want, hidden)
    got = chunked_causal_lm_loss(hidden, head, labels, chunk_size=3, num_loss_tokens=count)
    (got_grad,) = torch.autograd.grad(got, hidden)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    with pytest.raises(RuntimeError, match="num_loss_tokens"):
        chunked_causal_lm_loss(hidden, head, labels, chunk_size=3, num_loss_tokens=count - 1)


@pytest.mark.parametrize("head_trains", [False, True])
def test_the_loss_s_partial_last_chunk_takes_a_repeating_row_count(monkeypatch, head_trains: bool) -> None:
    """The fused loss's partial last chunk runs over a multiple of LOSS_ROW_STEP rows, reaching back into the
    chunk before; the repeated rows add nothing: loss and gradients (rows, and the head's when it trains) equal
    one unchunked pass in float64."""
    from tnlora.model import modeling

    monkeypatch.setattr(modeling, "LOSS_ROW_STEP", 4)
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False).double().requires_grad_(head_trains)
    hidden = torch.randn(1, 20, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (1, 20))  # 19 labelled positions: chunks of 8, 8 and 3 rows
    seen = []
    linear = modeling.F.linear
    monkeypatch.setattr(modeling.F, "linear", lambda x, w, *a: seen.append(x.shape[0]) or linear(x, w, *a))
    results = []
    for chunk in (8, 64):
        head.weight.grad = None
        loss = modeling.chunked_causal_lm_loss(hidden, head, labels, chunk_size=chunk)
        grads = torch.autograd.grad(loss, [hidden, head.weight] if head_trains else [hidden])
        results.append((loss, *grads))
    assert seen == [8, 8, 4, 19]  # 3 rows rounded up to 4, one taken again from the chunk before
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


def _rows_into_l3(model: TransnormerForCausalLM) -> list[int]:
    """A list that gets, per forward of each layer's GLU output projection, the rows it multiplies."""
    seen: list[int] = []
    for layer in model.model.layers:
        layer.channel_mixer.l3.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, m.in_features).shape[0]))
    return seen


def _trimmed_and_whole(model: TransnormerForCausalLM, **inputs: object) -> tuple[tuple, tuple]:
    """(loss, gradients of every parameter) with ``trim_last_layer`` on and off."""
    out = []
    for trim in (True, False):
        model.config.trim_last_layer = trim
        loss = model(**inputs).loss
        out.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    return out[0], out[1]


@pytest.mark.parametrize("case", ["padded", "packed", "host-count", "items"])
def test_last_layer_trimmed_to_the_labelled_positions_gives_the_same_loss_and_gradients(case: str) -> None:
    """trim_last_layer: after its attention the last layer computes the labelled positions only (the output's
    gated norm and projection, the GLU, the final norm), and the loss and every gradient are those of the whole
    computation (float64)."""
    model = build_model(decoder_layers=3, linear_use_lrpe_list=[1, 0, 1]).train()
    ids = random_ids(2, 30)
    labels = ids.clone()
    labels[0, :18] = -100  # a prompt
    labels[1, :9] = -100
    labels[1, -6:] = -100  # padding
    inputs: dict[str, object] = {"input_ids": ids, "labels": labels}
    if case == "padded":
        inputs["attention_mask"] = (labels != -100) | (torch.arange(30) < 24)
    elif case == "packed":
        inputs["seq_ids"] = (torch.arange(30) >= 13).long().expand(2, 30)
    elif case == "host-count":
        inputs["num_loss_tokens"] = int((labels[:, 1:] != -100).sum())
    else:
        inputs["num_items_in_batch"] = 50
    seen = _rows_into_l3(model)
    trimmed, whole = _trimmed_and_whole(model, **inputs)
    labelled = int((labels[:, 1:] != -100).sum())
    assert seen == [60, 60, labelled] + [60] * 3  # the last layer's GLU took the labelled rows alone
    torch.testing.assert_close(trimmed[0], whole[0], rtol=1e-12, atol=0)
    for got, want in zip(trimmed[1], whole[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert any(g.abs().sum() > 0 for g in model.model.layers[-1].channel_mixer.parameters())


def test_trimmed_rows_are_padded_to_a_repeating_count(monkeypatch) -> None:
    """Batches of at least 8 × TRIM_ROW_STEP positions pad the trimmed rows to a multiple of it with positions
    taken again from the start: the last layer's GEMMs see one of few row counts, and the loss and every gradient
    are still the whole computation's (float64); below that size the count is the labelled one; trimming is on
    by default."""
    from tnlora.model import modeling

    assert modeling.TransnormerConfig().trim_last_layer is True
    monkeypatch.setattr(modeling, "TRIM_ROW_STEP", 8)
    model = build_model(decoder_layers=2, linear_use_lrpe_list=[1, 0]).train()
    ids = random_ids(2, 40)  # 80 positions: at least 8 × 8
    labels = ids.clone()
    labels[0, :25] = -100
    labels[1, :21] = -100
    labelled = int((labels[:, 1:] != -100).sum())
    assert labelled % 8 and labelled <= modeling.TRIM_MAX_LABELLED_SHARE * 80
    seen = _rows_into_l3(model)
    trimmed, whole = _trimmed_and_whole(model, input_ids=ids, labels=labels, num_loss_tokens=labelled)
    assert seen == [80, -(-labelled // 8) * 8, 80, 80]  # trimmed (padded), then whole
    torch.testing.assert_close(trimmed[0], whole[0], rtol=1e-12, atol=0)
    for got, want in zip(trimmed[1], whole[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    seen.clear()
    monkeypatch.setattr(modeling, "TRIM_ROW_STEP", 16)  # 80 positions < 8 × 16: the labelled count itself
    _trimmed_and_whole(model, input_ids=ids, labels=labels)
    assert seen[:2] == [80, labelled]


def test_last_layer_keeps_every_position_where_trimming_does_not_apply() -> None:
    """Mostly labelled batches (above TRIM_MAX_LABELLED_SHARE) or none labelled, asked-for logits or hidden
    states: the last layer computes every position; the model refuses trimmed positions with every layer's hidden states."""
    from tnlora.model.modeling import TRIM_MAX_LABELLED_SHARE

    model = build_model(decoder_layers=2, linear_use_lrpe_list=[1, 0])
    model.config.trim_last_layer = True
    seen = _rows_into_l3(model)
    ids = random_ids(2, 20)
    half = ids.clone()
    half[:, :10] = -100
    assert int((half[:, 1:] != -100).sum()) <= TRIM_MAX_LABELLED_SHARE * ids.numel() < 38
    model(ids, labels=half)
    assert seen[-1] == 19 + 19 - 18  # trimmed
    nothing = torch.full_like(ids, -100)
    for kwargs in ({"labels": ids}, {"labels": nothing}, {"labels": half, "return_logits": True},
                   {"labels": half, "logits_to_keep": 2}):  # fmt: skip
        seen.clear()
        model(ids, **kwargs)
        assert seen == [40, 40], kwargs
    seen.clear()
    out = model(ids, labels=half, output_hidden_states=True)
    assert seen == [40, 40] and out.hidden_states[-1].shape == (2, 20, 64)
    with pytest.raises(ValueError, match="kept_positions"):
        model.model(ids, output_hidden_states=True, kept_positions=torch.arange(3))


def test_gated_norm_and_the_kernel_layout_check() -> None:
    from tnlora.model.modeling import SimpleRMSNorm
    from tnlora.ops.norm import takes_rows

    gen = torch.Generator().manual_seed(0)
    o, u = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 32, generator=gen)[..., 8:16]
    norm = SimpleRMSNorm(kernel="triton")
    assert torch.equal(norm(o, gate=u), u * norm(o))
    assert not norm._triton_takes(o, u)  # CPU tensors: the PyTorch form whatever the kernel choice
    assert takes_rows(o, u, None) and takes_rows(o[:, :1]) and takes_rows(o[0])
    assert not takes_rows(o.transpose(1, 2)) and not takes_rows(o[:, ::2]) and not takes_rows(o[None])


def _loss_paths(dtype: torch.dtype, autocast: bool = False):
    """The chunked loss through the fused linear cross-entropy and through per-chunk checkpointing (a head that
    is not a plain nn.Linear takes that path), with the gradients of the rows and the head's weight."""
    from tnlora.model.modeling import chunked_causal_lm_loss

    class Head(torch.nn.Linear):  # same weight, same math: only the type differs
        pass

    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 23, 16, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (2, 23), generator=gen)
    labels[0, :5] = -100
    out = {}
    for name, cls in (("fused", torch.nn.Linear), ("checkpointed", Head)):
        head = cls(16, 50, bias=False).to(dtype)
        with torch.no_grad():
            head.weight.copy_(torch.randn(50, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = chunked_causal_lm_loss(hidden, head, labels, num_items_in_batch=37, chunk_size=6)
        out[name] = (loss, *torch.autograd.grad(loss, [hidden, head.weight]))
    return out


def test_fused_linear_cross_entropy_equals_checkpointed_chunks_in_float64() -> None:
    out = _loss_paths(torch.float64)
    for got, want in zip(out["fused"], out["checkpointed"], strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert out["fused"][1].abs().sum() > 0 and out["fused"][2].abs().sum() > 0


def test_fused_linear_cross_entropy_under_bf16_autocast_matches_the_checkpointed_path() -> None:
    out = _loss_paths(torch.float32, autocast=True)
    loss, rows, weight = out["fused"]
    assert loss.dtype == torch.float32 and rows.dtype == weight.dtype == torch.float32
    for got, want in zip(out["fused"], out["checkpointed"], strict=True):
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= 2e-2, err  # bf16 GEMMs in both; the gradients are rounded at different points


def test_packed_rows_are_built_once_and_reach_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    from tnlora.model import modeling
    from tnlora.ops.packing import PackedRows

    model = build_model(torch.float64)
    seen: list[object] = []
    attend = modeling.NormLinearAttention.attend

    def recording(self, q, k, v, rows=None, cache=None):
        seen.append(rows)
        return attend(self, q, k, v, rows, cache)

    monkeypatch.setattr(modeling.NormLinearAttention, "attend", recording)
    ids = random_ids(2, 9)
    seq_ids = torch.tensor([[0] * 4 + [1] * 5, [2] * 9])
    by_ids = model(ids, seq_ids=seq_ids).logits
    assert len(seen) == len(model.model.layers) and all(r is seen[0] for r in seen)  # one object, every layer
    assert isinstance(seen[0], PackedRows)
    seen.clear()
    rows = PackedRows.from_seq_ids(seq_ids)
    assert torch.equal(model(ids, packed_rows=rows).logits, by_ids)
    assert all(r is rows for r in seen)
    with pytest.raises(ValueError, match="one of packed_rows"):
        model(ids, packed_rows=rows, seq_ids=seq_ids)
