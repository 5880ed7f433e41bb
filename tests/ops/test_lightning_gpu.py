"""fla-core's chunk_simple_gla against the exact chunked implementation, on CUDA (skipped elsewhere).

fla issue #640: on Hopper with Triton ≥ 3.4 and < 3.7.1 the dq/dk kernel shared by simple_gla was reported to
give a wrong dk at BK = 64, and the g_gamma path is unguarded. TNL runs at K = 128 (BK = 128) and K = 256
(layer 0 with LRPE), so both are checked here, forward and every gradient, before training is trusted.
Errors are relative norms ‖fla − ref‖ / ‖ref‖ with the reference computed in fp32 from the same bf16 inputs;
run with ``-s`` to see the measured values next to the bounds.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("fla.ops.simple_gla", reason="needs fla-core (pip install 'tnlora[gpu]')")

from tnlora.model import TransnormerForCausalLM, config_from_preset
from tnlora.model.modeling import layer_log_decay
from tnlora.ops import fla
from tnlora.ops.lightning import lightning_attention
from tnlora.ops.packing import PackedRows

pytestmark = pytest.mark.gpu

OP_TOLERANCE = 1e-2  # bf16 inputs, fp32 accumulation in both
MODEL_TOLERANCE = 2e-2  # after a bf16 two-layer model the attention differences are amplified a little
DEVICE = torch.device("cuda")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-30)).item()


def _qkv(
    B: int, T: int, H: int, K: int, V: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=DEVICE)

    # q and k are SiLU outputs in the model; v and the upstream gradient are unconstrained.
    q = torch.nn.functional.silu(rand(B, T, H, K)).to(torch.bfloat16)
    k = torch.nn.functional.silu(rand(B, T, H, K)).to(torch.bfloat16)
    return q, k, rand(B, T, H, V).to(torch.bfloat16)


def _fwd_bwd(impl: str, q, k, v, log_decay, grad_out, **kwargs):
    """Output, final state and (dq, dk, dv); the chunked reference runs on fp32 copies of the bf16 inputs."""
    cast = (lambda x: x.float()) if impl == "chunked" else (lambda x: x)
    leaves = [cast(x).detach().requires_grad_() for x in (q, k, v)]
    o, state = lightning_attention(*leaves, log_decay, impl=impl, output_final_state=True, **kwargs)
    o.backward(grad_out.to(o.dtype))
    return o, state, [x.grad for x in leaves]


def _check(name: str, got: torch.Tensor, want: torch.Tensor, bound: float = OP_TOLERANCE) -> None:
    err = _rel(got, want)
    print(f"{name}: relative error {err:.2e} (bound {bound:.0e})")
    assert err < bound, f"{name}: {err:.3e}"


@pytest.mark.parametrize("head_dim_k", [128, 256])
@pytest.mark.parametrize("layer", [0, 8, 15])  # strong, medium and almost no decay (1B-like, 16 layers)
def test_fla_forward_and_gradients_match_chunked(head_dim_k: int, layer: int) -> None:
    B, T, H, V = 2, 1531, 16, 128  # T not a multiple of any chunk size
    q, k, v = _qkv(B, T, H, head_dim_k, V, seed=layer)
    log_decay = layer_log_decay(H, layer, 16, DEVICE)
    grad_out = torch.randn(B, T, H, V, device=DEVICE)
    o, s, grads = _fwd_bwd("fla", q, k, v, log_decay, grad_out)
    o_ref, s_ref, grads_ref = _fwd_bwd("chunked", q, k, v, log_decay, grad_out)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    tag = f"K={head_dim_k} layer={layer}"
    _check(f"o {tag}", o, o_ref)
    _check(f"state {tag}", s, s_ref)
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref):
        _check(f"{name} {tag}", got, want)


@pytest.mark.parametrize("head_dim_k", [128, 256])
def test_fla_packed_rows_match_chunked(head_dim_k: int) -> None:
    H, V = 16, 128  # the head counts of the warm-up (fla autotunes per H)
    lengths = [300, 17, 1024, 1, 611]
    T = sum(lengths)
    q, k, v = _qkv(1, T, H, head_dim_k, V, seed=1)
    log_decay = layer_log_decay(H, 0, 16, DEVICE)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    s0 = torch.randn(len(lengths), H, head_dim_k, V, device=DEVICE) * 0.1
    grad_out = torch.randn(1, T, H, V, device=DEVICE)
    o, s, grads = _fwd_bwd("fla", q, k, v, log_decay, grad_out, cu_seqlens=cu, initial_state=s0)
    o_ref, s_ref, grads_ref = _fwd_bwd(
        "chunked", q, k, v, log_decay, grad_out, cu_seqlens=cu, initial_state=s0
    )
    _check(f"packed o K={head_dim_k}", o, o_ref)
    _check(f"packed states K={head_dim_k}", s, s_ref)
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref):
        _check(f"packed {name} K={head_dim_k}", got, want)

    # Packed rows with seq_ids (flattened to cu_seqlens inside the fla path), with a run of 1-3-token examples
    # (up to ~30 example starts in one 64-token chunk) and an initial state per row.
    row_lengths = [300, 17, *([1, 2, 3] * 20), 1024, 1, 611]
    ids = torch.repeat_interleave(
        torch.arange(len(row_lengths), device=DEVICE), torch.tensor(row_lengths, device=DEVICE)
    )
    half = ids.shape[0] // 2
    ids = ids[: 2 * half].reshape(2, half)
    rows = _qkv(2, half, H, head_dim_k, V, seed=2)
    s0_rows = torch.randn(2, H, head_dim_k, V, device=DEVICE) * 0.1
    grad_rows = torch.randn(2, half, H, V, device=DEVICE)
    o, s, grads = _fwd_bwd("fla", *rows, log_decay, grad_rows, seq_ids=ids, initial_state=s0_rows)
    o_ref, s_ref, grads_ref = _fwd_bwd(
        "chunked", *rows, log_decay, grad_rows, seq_ids=ids, initial_state=s0_rows
    )
    _check(f"seq_ids o K={head_dim_k}", o, o_ref)
    _check(f"seq_ids states K={head_dim_k}", s, s_ref)
    for name, got, want in zip(("dq", "dk", "dv"), grads, grads_ref):
        _check(f"seq_ids {name} K={head_dim_k}", got, want)


def _model(impl: str) -> TransnormerForCausalLM:
    # 1B head geometry (hd = 128): layer 0 runs at K = 256 (LRPE), layer 1 at K = 128.
    config = config_from_preset(
        "tiny",
        vocab_size=1000,
        decoder_embed_dim=2048,
        hidden_dim=2048,
        decoder_attention_heads=16,
        glu_dim=1024,
        lightning_impl=impl,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TransnormerForCausalLM(config)
    return model.to(device=DEVICE, dtype=torch.bfloat16)


def test_lora_gradients_through_whole_layers_match_chunked() -> None:
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(3, 1000, (2, 777), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    grads = {}
    for impl in ("fla", "chunked"):
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["qkvu_proj", "out_proj", "l1", "l2", "l3"])
        with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
            torch.manual_seed(1)
            model = get_peft_model(_model(impl).train(), lora)
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=0.02)  # nonzero B so that every A gets a gradient
        model(input_ids=ids, labels=ids).loss.backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads["fla"]) == set(grads["chunked"]) and len(grads["fla"]) == 2 * 5 * 2
    for name, want in grads["chunked"].items():
        _check(name, grads["fla"][name], want, MODEL_TOLERANCE)


def test_auto_uses_fla_on_cuda_and_decoding_continues_its_state() -> None:
    assert fla.fla_available()
    fla_model, chunked_model = _model("auto").eval(), _model("chunked").eval()
    ids = torch.randint(3, 1000, (2, 300), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        _check("model logits", fla_model(ids).logits, chunked_model(ids).logits, MODEL_TOLERANCE)
        # fla prefill + recurrent one-token steps == one full chunked forward.
        out = fla_model(ids[:, :290])
        pieces = [out.logits]
        for t in range(290, 300):
            pieces.append(fla_model(ids[:, t : t + 1], past_key_values=out.past_key_values).logits)
        _check("prefill+decode logits", torch.cat(pieces, 1), chunked_model(ids).logits, MODEL_TOLERANCE)
    generated = fla_model.generate(ids[:, :20], max_new_tokens=5, do_sample=False)
    assert generated.shape == (2, 25)


@pytest.mark.parametrize("head_dim_k", [128, 256])
def test_host_planned_backend_is_fla_bitwise_and_never_syncs(head_dim_k: int) -> None:
    """tnlora's fla backend (ops/fla.py): same kernels, buffers sized from the host copy of cu_seqlens, and
    packed rows built on the host (as the training collator builds them) reach fla without a device read."""
    from fla.ops.simple_gla import chunk_simple_gla

    assert fla.install()
    H, V = 16, 128
    lengths = [300, 17, *([1, 2, 3] * 20), 1024, 1, 611, 131]  # two rows of 1,102; one example spans both
    ids = torch.repeat_interleave(
        torch.arange(len(lengths), device=DEVICE), torch.tensor(lengths, device=DEVICE)
    ).reshape(2, -1)
    B, T = ids.shape
    q, k, v = _qkv(B, T, H, head_dim_k, V, seed=3)
    log_decay = layer_log_decay(H, 0, 16, DEVICE)
    grad_out = torch.randn(B, T, H, V, device=DEVICE)

    host_ids = ids.cpu()
    rows = PackedRows.from_seq_ids(host_ids).to(DEVICE)
    # fla caches its chunk indices per cu_seqlens tensor but builds them with a blocking copy from pageable
    # memory (its one sync per new set of boundaries): the warm-up with the same rows fills that cache.
    _fwd_bwd("fla", q, k, v, log_decay, grad_out, rows=rows)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device->host read in forward or backward raises
    try:
        o, s, grads = _fwd_bwd("fla", q, k, v, log_decay, grad_out, rows=rows)
        PackedRows.from_seq_ids(host_ids).to(DEVICE)  # built on the host and moved: no read back either
    finally:
        torch.cuda.set_sync_debug_mode("default")

    # fla's own path: an untagged copy of the same cu_seqlens goes past the backend.
    assert fla.host_copy(rows.cu_seqlens) is not None
    cu, row_last = rows.cu_seqlens.clone(), rows.row_last
    assert fla.host_copy(cu) is None
    leaves = [x.reshape(1, B * T, H, -1).detach().requires_grad_() for x in (q, k, v)]
    o_ref, s_ref = chunk_simple_gla(
        *leaves, g_gamma=log_decay, scale=1.0, output_final_state=True, cu_seqlens=cu
    )
    o_ref.backward(grad_out.reshape(1, B * T, H, V).to(o_ref.dtype))
    assert torch.equal(o.reshape(1, B * T, H, V), o_ref)
    assert torch.equal(s, s_ref[row_last])
    for got, want in zip(grads, (x.grad for x in leaves)):
        assert torch.equal(got.reshape(want.shape), want)


def test_chunk_plan_is_made_aside_without_draining_the_stream() -> None:
    """fla's chunk plan, a blocking copy from pageable memory, made on a side stream (ops/fla.py,
    ``plan_chunks_aside``): the call returns while work queued on the current stream is still running, and
    fla's forward then finds the plan in its cache (the same object for the same arguments)."""
    from fla.ops.utils import prepare_chunk_indices

    assert fla.install()
    # A first plan, as a training run's first step makes: the side stream is created and its memory pool gets a
    # segment (cudaMalloc waits for the whole device), which later plans reuse.
    first = fla.plan_chunks_aside(torch.tensor([0, 7]).to(DEVICE), torch.tensor([0, 7]))
    host = torch.tensor([0, 100, 300, 301])
    cu = host.to(DEVICE)
    torch.cuda.synchronize()
    torch.cuda._sleep(1 << 30)  # ~0.5 s of GPU work queued on the current stream
    plan = fla.plan_chunks_aside(cu, host)
    still_busy = not torch.cuda.current_stream().query()
    cached = prepare_chunk_indices(cu, fla.FLA_CHUNK_SIZE, cu_seqlens_cpu=host)
    torch.cuda.synchronize()
    assert still_busy, "the plan waited for the current stream's work"
    assert cached is plan
    assert first.tolist() == [[0, 0]]
    # Chunks of 64 tokens: 100 → 2, 200 → 4, 1 → 1 (example index, chunk within it).
    assert plan.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2], [1, 3], [2, 0]]
