"""The fused Triton decode step (``ops.recurrent_triton.triton_step``) against the PyTorch step it replaces
(``ops.recurrent.torch_step``), alone and inside the static decode step (``infer.decode_graph``).

The kernel tests need triton and either a CUDA device or Triton's CPU interpreter; on a CPU-only machine run

    TRITON_INTERPRET=1 PYTHONPATH=<dir holding triton> pytest -q tests/ops/test_recurrent.py

(shapes are kept small: the interpreter runs every program in Python). The config and import tests run
everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from kernel_device import DEVICE, INTERPRET, needs_kernel

from tnl_helpers import build_model, left_padded, random_ids
from tnlora.errors import ConfigError
from tnlora.infer.decode_graph import DecodeStepRunner, gemv_applies, install_graph_decoding, installed_graphs
from tnlora.model import TransnormerCache, config_from_preset
from tnlora.ops.gemv import ROWS_MAX, pdl_supported
from tnlora.ops.recurrent import torch_step
from tnlora.ops.recurrent_triton import triton_step
from tnlora.ops.select import KERNEL_CHOICES, triton_available

cuda = pytest.mark.skipif(
    INTERPRET or not torch.cuda.is_available() or not triton_available(),
    reason="needs a CUDA device and triton (not the interpreter)",
)
GREEDY = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
KERNELS = ("torch", "triton")
# The kernel tests' prefill runs the chunked path: on a GPU "auto" would pick fla, whose first use autotunes
# every new shape (minutes for the tiny model's on a fresh machine); the decode steps are what is compared.
PREFILL = {"lightning_impl": "chunked"}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| (in fp64)."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _step_inputs(
    batch: int, heads: int, key_dim: int, value_dim: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k [B, H, K] and v [B, H, V] as the model hands them over: strided slices of wider tensors."""
    qk = torch.randn(batch, heads, 2 * key_dim, generator=gen).to(dtype)
    # v is a slice of the fused projection in the model (batch and head strides ≠ contiguous ones).
    wide_v = torch.randn(batch, heads, 3 * value_dim, generator=gen).to(dtype)
    q, k, v = qk[..., :key_dim], qk[..., key_dim:], wide_v[..., value_dim : 2 * value_dim]
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


# ---------------------------------------------------------------------------------------------------------
# Everywhere: config and imports


def test_config_validates_decode_kernel() -> None:
    assert KERNEL_CHOICES == ("auto", "torch", "triton")
    assert config_from_preset("tiny").decode_kernel == "auto"
    assert config_from_preset("tiny", decode_kernel="triton").decode_kernel == "triton"
    with pytest.raises(ConfigError, match="decode_kernel"):
        config_from_preset("tiny", decode_kernel="cuda")


def test_runner_rejects_a_decode_kernel_set_after_the_config() -> None:
    model = build_model(torch.float32)
    model.config.decode_kernel = "fused"
    with pytest.raises(ConfigError, match="decode_kernel"):
        DecodeStepRunner(model, 1, torch.device("cpu"), capture=False)


def test_a_norm_kernel_set_after_the_config_is_named_in_the_error() -> None:
    model = build_model(torch.float32)
    assert model.model.final_norm.kernel == "torch"  # CPU: the PyTorch form
    model.config.norm_kernel = "fused"
    with pytest.raises(ConfigError, match="norm_kernel must be one of"):
        model.select_kernels()


def test_import_and_torch_step_never_import_triton() -> None:
    """With triton made unimportable: tnlora imports, the torch step runs, and 'triton' is refused clearly."""
    script = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton blocked by the test")
sys.meta_path.insert(0, Block())
import torch
import tnlora, tnlora.model
from tnlora.errors import ConfigError
from tnlora.model import TransnormerForCausalLM, config_from_preset
from tnlora.infer.decode_graph import DecodeStepRunner
from tnlora.ops.gemv import ROWS_MAX, pdl_supported
from tnlora.ops.recurrent import torch_step
from tnlora.ops.select import triton_available
state = torch.zeros(1, 2, 4, 3)
torch_step(torch.ones(1, 2, 4), torch.ones(1, 2, 4), torch.ones(1, 2, 3), state, torch.full((2,), 0.5))
assert state.sum().item() == 24.0 and not triton_available() and "triton" not in sys.modules
model = TransnormerForCausalLM(config_from_preset("tiny", decode_kernel="triton")).eval()
try:
    DecodeStepRunner(model, 1, torch.device("cpu"), capture=False)
except ConfigError as exc:
    assert "triton" in str(exc), exc
else:
    raise AssertionError("no ConfigError")
auto = DecodeStepRunner(TransnormerForCausalLM(config_from_preset("tiny")).eval(), 1, torch.device("cpu"), False)
assert auto.kernel == "torch" and "triton" not in sys.modules
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.parametrize(("importable", "device", "want"),
                         [(True, "cuda", "triton"), (True, "cpu", "torch"), (False, "cuda", "torch")])
def test_auto_is_triton_on_cuda_when_it_imports(monkeypatch, importable: bool, device: str, want: str) -> None:
    from tnlora.ops import select

    monkeypatch.setattr(select, "triton_available", lambda: importable)
    assert select.kernel_impl("auto", device, "decode_kernel") == want
    assert select.kernel_impl("torch", device, "decode_kernel") == "torch"


# ---------------------------------------------------------------------------------------------------------
# The kernel against torch_step


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("key_dim", "batch", "heads"), [(128, 1, 2), (128, 3, 3), (256, 1, 3), (256, 3, 2)])
def test_kernel_equals_torch_step_over_steps(key_dim: int, batch: int, heads: int, dtype: torch.dtype) -> None:
    value_dim = 128
    gen = torch.Generator().manual_seed(key_dim + 10 * batch + heads)
    # λ of real layers (0.5 … ~1) and a non-zero starting state, as after a prefill.
    decay = (0.5 + 0.5 * torch.rand(heads, generator=gen)).to(DEVICE)
    want_state = torch.randn(batch, heads, key_dim, value_dim, generator=gen).to(DEVICE)
    got_state = want_state.clone()
    address = got_state.data_ptr()
    for step in range(12):
        q, k, v = _step_inputs(batch, heads, key_dim, value_dim, dtype, gen)
        pad = (torch.rand(batch, generator=gen) < 0.3).to(DEVICE)
        if step in (3, 7):
            pad[0] = True  # a padded row every few steps (B = 1 included)
        if step == 7:
            v[0] = float("nan")  # a padded v counts as zero whatever it holds (masked_fill, not a product)
        want = torch_step(q, k, v, want_state, decay, pad)
        got = triton_step(q, k, v, got_state, decay, pad)
        assert got.dtype == dtype and got.shape == (batch, heads, value_dim)
        assert got_state.data_ptr() == address  # in place
        assert torch.isfinite(got_state).all()
        assert _rel_err(got_state, want_state) < 1e-5, step
        # fp32: rounding only; bf16: o is rounded to bf16 from fp32 sums that differ in the last bits, so an
        # element may land one bf16 step (2⁻⁸ relative) away.
        tolerance = 1e-5 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=tolerance * want.abs().max().item())


@needs_kernel
def test_kernel_without_pad_with_out_and_fp64() -> None:
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        q, k, v = _step_inputs(2, 3, 64, 32, dtype, gen)
        decay = torch.rand(3, generator=gen).to(device=DEVICE, dtype=dtype)
        want_state = torch.randn(2, 3, 64, 32, generator=gen).to(device=DEVICE, dtype=dtype)
        got_state = want_state.clone()
        out = torch.empty(2, 3, 32, dtype=dtype, device=DEVICE)
        want = torch_step(q, k, v, want_state, decay)
        got = triton_step(q, k, v, got_state, decay, out=out)
        assert got is out
        tolerance = 1e-5 if dtype == torch.float32 else 1e-12
        assert _rel_err(got_state, want_state) < tolerance
        assert _rel_err(got, want) < tolerance


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_kernel_applies_silu_to_raw_q_and_k(dtype: torch.dtype) -> None:
    """silu_qk: the kernel's own SiLU of the projection slices equals the step after F.silu."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = _step_inputs(2, 3, 128, 32, dtype, gen)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    decay = torch.rand(3, generator=gen).to(device=DEVICE, dtype=state_dtype)
    want_state = torch.randn(2, 3, 128, 32, generator=gen).to(device=DEVICE, dtype=state_dtype)
    got_state = want_state.clone()
    want = torch_step(F.silu(q), F.silu(k), v, want_state, decay)
    got = triton_step(q, k, v, got_state, decay, silu_qk=True)
    # bf16: the interpreter truncates the rounded SiLU where CUDA rounds to nearest (one bf16 step apart).
    tolerance = {torch.bfloat16: 2**-6, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert _rel_err(got_state, want_state) < tolerance
    assert _rel_err(got, want) < tolerance


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("angle_dtype", ["float32", "model"])
@pytest.mark.parametrize("positions", [(4099,), (5, 2000)], ids=["0-dim", "per row"])
def test_kernel_applies_silu_and_lrpe(dtype: torch.dtype, angle_dtype: str, positions: tuple[int, ...]) -> None:
    """lrpe_theta: the kernel's SiLU and LRPE (the doubled state) equal the step after F.silu and the layer's
    ``Lrpe`` at the same position, one for all rows or one per row, at positions whose angles need range
    reduction."""
    from tnlora.model.modeling import Lrpe

    if INTERPRET and dtype == torch.bfloat16 and angle_dtype == "model":
        pytest.skip("Triton's interpreter truncates bf16 roundings; bf16 angles here (steps of 8–16 radians) "
                    "need round-to-nearest to match: checked on a CUDA device")
    gen = torch.Generator().manual_seed(11)
    batch, heads, head_dim = len(positions) if len(positions) > 1 else 2, 3, 64
    q, k, v = _step_inputs(batch, heads, head_dim, 32, dtype, gen)
    lrpe = Lrpe(heads, head_dim, angle_dtype).to(device=DEVICE, dtype=dtype)
    position = torch.tensor(positions[0] if len(positions) == 1 else positions, device=DEVICE)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    decay = torch.rand(heads, generator=gen).to(device=DEVICE, dtype=state_dtype)
    want_state = torch.randn(batch, heads, 2 * head_dim, 32, generator=gen).to(device=DEVICE, dtype=state_dtype)
    got_state = want_state.clone()
    with torch.no_grad():
        features = [lrpe(F.silu(x)[:, None], position)[:, 0] for x in (q, k)]
    want = torch_step(*features, v, want_state, decay)
    got = triton_step(q, k, v, got_state, decay, silu_qk=True, lrpe_theta=lrpe.theta.detach(), position=position,
                      lrpe_angle_dtype=angle_dtype)
    # bf16: the interpreter truncates the rounded SiLU and products where CUDA rounds to nearest.
    tolerance = {torch.bfloat16: 2**-6, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert _rel_err(got_state, want_state) < tolerance
    assert _rel_err(got, want) < tolerance


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("lrpe", "per_row"), [(False, False), (True, False), (True, True)])
def test_deferred_state_writes_equal_the_plain_kernel_over_steps(dtype: torch.dtype, lrpe: bool, per_row: bool) -> None:
    """``deferred``: over 10 steps (two write-backs at steps 4 and 8, two steps held at the end) each o equals the
    plain kernel's, the state is whole after each write-back step and after ``DeferredTerms.apply``, and the
    steps between leave it as it was; padded rows, SiLU and LRPE (one position or one a row) included."""
    from tnlora.model.modeling import Lrpe
    from tnlora.ops.recurrent_triton import DeferredTerms

    gen = torch.Generator().manual_seed(5)
    batch, heads, head_dim, value_dim, steps = 3, 2, 16, 32, 4
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    decay = (0.45 + 0.5 * torch.rand(heads, generator=gen)).to(device=DEVICE, dtype=state_dtype)
    key_dim = 2 * head_dim if lrpe else head_dim
    plain = torch.randn(batch, heads, key_dim, value_dim, generator=gen).to(device=DEVICE, dtype=state_dtype)
    state = plain.clone()
    start = torch.tensor([7, 300, 41] if per_row else 7, device=DEVICE)
    terms = DeferredTerms.allocate(state, value_dim, start.clone(), steps)
    theta = Lrpe(heads, head_dim, "float32").theta.detach().to(DEVICE) if lrpe else None
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for t in range(10):
        q, k, v = _step_inputs(batch, heads, head_dim, value_dim, dtype, gen)
        pad = torch.tensor([t % 3 == 1, False, t == 4], device=DEVICE)
        kwargs = {"silu_qk": True, "lrpe_theta": theta, "position": start + t}
        held = state.clone()
        want = triton_step(q, k, v, plain, decay, pad, **kwargs)
        got = triton_step(q, k, v, state, decay, pad, deferred=terms, **kwargs)
        assert _rel_err(got, want) < tolerance, t
        if t % steps == steps - 1:
            assert _rel_err(state, plain) < tolerance, t  # written back whole
        else:
            assert torch.equal(state, held), t  # only read
    terms.apply(state, decay, 10 % steps)
    assert _rel_err(state, plain) < tolerance
    if not lrpe:  # (with LRPE the missing position is refused as LRPE's)
        with pytest.raises(ValueError, match="need an integer position"):
            triton_step(q, k, v, state, decay, deferred=terms)
    with pytest.raises(ValueError, match="pending must be 0 to 3"):
        terms.apply(state, decay, 4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("deferred", [False, True])
def test_kernel_emits_the_sums_of_squares_of_o_rows(dtype: torch.dtype, deferred: bool) -> None:
    """``emit_squares``: the same o, and [H · V blocks, B] partial sums whose sum over the parts is each row's
    sum of o² as stored (V = 48: a whole block of 32 columns and a masked one, so 2 parts a head); they are
    what the out_proj norm of o reads (``gemv``'s ``norm_squares``)."""
    from tnlora.ops.recurrent_triton import DeferredTerms

    gen = torch.Generator().manual_seed(11)
    batch, heads, key_dim, value_dim = 3, 2, 16, 48
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    decay = (0.45 + 0.5 * torch.rand(heads, generator=gen)).to(device=DEVICE, dtype=state_dtype)
    state = torch.randn(batch, heads, key_dim, value_dim, generator=gen).to(device=DEVICE, dtype=state_dtype)
    position = torch.tensor(5, device=DEVICE)
    for _ in range(2):
        q, k, v = _step_inputs(batch, heads, key_dim, value_dim, dtype, gen)
        options = {"silu_qk": True, "position": position}
        if deferred:
            options["deferred"] = DeferredTerms.allocate(state, value_dim, position.clone(), 4)
        want = triton_step(q, k, v, state.clone(), decay, **options)
        o, squares = triton_step(q, k, v, state, decay, emit_squares=True, **options)
        assert torch.equal(o, want)
        assert squares.shape == (heads * 2, batch)
        assert squares.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        rows = (o.double() ** 2).sum(dim=(1, 2))
        torch.testing.assert_close(squares.double().sum(0), rows, rtol=1e-6, atol=0.0)
        # Part (head h, V block j) holds that block's columns alone.
        first = (o[:, 1, :32].double() ** 2).sum(-1)
        torch.testing.assert_close(squares[2].double(), first, rtol=1e-6, atol=0.0)
        position = position + 1


@needs_kernel
@pytest.mark.parametrize("deferred", [False, True])
@pytest.mark.parametrize(("block_k", "block_v", "warps"), [(8, 16, 1), (16, 64, 2), (32, 8, 4)])
def test_every_launch_gives_the_default_launch_s_step(deferred: bool, block_k: int, block_v: int, warps: int) -> None:
    """``launch`` (tiles looped over K, V blocks of another width, other warps) changes how the step runs, not
    what it computes: o and the state as the default launch's (fp32, the sums in another order), the sums of
    squares one part a head and V block of the launch's width, summing to the same rows."""
    from tnlora.ops.recurrent_triton import DeferredTerms, StepLaunch, square_parts

    gen = torch.Generator().manual_seed(13)
    batch, heads, key_dim, value_dim = 2, 2, 32, 48
    decay = (0.45 + 0.5 * torch.rand(heads, generator=gen)).to(DEVICE)
    state = torch.randn(batch, heads, key_dim, value_dim, generator=gen).to(DEVICE)
    launch = StepLaunch(block_k, block_v, warps)
    position = torch.tensor(3, device=DEVICE)
    want_state, got_state = state.clone(), state.clone()
    terms = [DeferredTerms.allocate(s, value_dim, position.clone(), 2) if deferred else None
             for s in (want_state, got_state)]
    for _ in range(2):  # deferred: one held step, then one written back
        q, k, v = _step_inputs(batch, heads, key_dim, value_dim, torch.float32, gen)
        options = {"silu_qk": True, "position": position, "emit_squares": True}
        want, want_squares = triton_step(q, k, v, want_state, decay, deferred=terms[0], **options)
        got, squares = triton_step(q, k, v, got_state, decay, deferred=terms[1], launch=launch, **options)
        assert _rel_err(got, want) < 1e-5
        assert squares.shape == (square_parts(heads, value_dim, block_v), batch)
        torch.testing.assert_close(squares.sum(0), want_squares.sum(0), rtol=1e-5, atol=0.0)
        position = position + 1
    assert _rel_err(got_state, want_state) < 1e-5
    assert not torch.equal(got_state, state)


@needs_kernel
def test_device_greedy_loop_with_deferred_state_writes_equals_the_plain_kernel() -> None:
    """The greedy device loop writing the states back every 4 steps (the default ``defer_steps``): the tokens of
    a left-padded batch and, after the loop (10 steps: two write-backs and two steps held, added by ``close``),
    every layer's state equal the loop's with a write every step (fp32)."""
    model = build_model(torch.float32, **PREFILL).to(DEVICE)
    rows = [random_ids(1, 13, seed=1)[0], random_ids(1, 4, seed=2)[0], random_ids(1, 9, seed=3)[0]]
    ids, mask = left_padded(rows)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    model.config.decode_kernel = "triton"
    runs = {}
    try:
        for defer in (0, 4):
            install_graph_decoding(model, capture=False, defer_steps=defer, defer_min_batch=1)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=11, **GREEDY)
            runner = installed_graphs(model).runners[3]
            steps = runner.greedy[0]
            assert steps.defer_steps == defer and steps.sent == 10 and steps.held == 0
            assert bool(runner.terms) == (defer > 0)
            runs[defer] = out, [state.clone() for state in runner.states]
        install_graph_decoding(model, capture=False, defer_min_batch=4)  # below the smallest deferred batch
        model.generate(ids, attention_mask=mask, max_new_tokens=3, **GREEDY)
        assert installed_graphs(model).runners[3].greedy[0].defer_steps == 0
    finally:
        model.config.decode_kernel = "torch"
    assert torch.equal(runs[4][0], runs[0][0])
    assert len(set(runs[4][0][0, 13:].tolist())) >= 4  # a non-degenerate continuation
    for got, want in zip(runs[4][1], runs[0][1], strict=True):
        assert _rel_err(got, want) < 1e-5
    with pytest.raises(ValueError, match="defer_steps must be 0"):
        install_graph_decoding(model, defer_steps=1)


@needs_kernel
def test_kernel_checks_its_arguments() -> None:
    q = torch.zeros(1, 2, 8, device=DEVICE)
    v = torch.zeros(1, 2, 4, device=DEVICE)
    state = torch.zeros(1, 2, 8, 4, device=DEVICE)
    decay = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="state must have shape"):
        triton_step(q, q, v, state[:, :, :4], decay)
    with pytest.raises(ValueError, match="contiguous"):
        triton_step(q, q, v, state.transpose(2, 3).contiguous().transpose(2, 3), decay)
    with pytest.raises(ValueError, match="pad"):
        triton_step(q, q, v, state, decay, pad=torch.zeros(1, device=DEVICE))
    with pytest.raises(ValueError, match="decay"):
        triton_step(q, q, v, state, decay.double())
    theta = torch.ones(2, 1, 8, device=DEVICE)
    position = torch.tensor(3, device=DEVICE)
    with pytest.raises(ValueError, match="state must have shape"):  # LRPE doubles the state's K
        triton_step(q, q, v, state, decay, lrpe_theta=theta, position=position)
    doubled = torch.zeros(1, 2, 16, 4, device=DEVICE)
    with pytest.raises(ValueError, match="lrpe_theta"):
        triton_step(q, q, v, doubled, decay, lrpe_theta=theta[:1], position=position)
    with pytest.raises(ValueError, match="integer position"):
        triton_step(q, q, v, doubled, decay, lrpe_theta=theta, position=position.float())
    with pytest.raises(ValueError, match="lrpe_angle_dtype"):
        triton_step(q, q, v, doubled, decay, lrpe_theta=theta, position=position, lrpe_angle_dtype="bf16")


# ---------------------------------------------------------------------------------------------------------
# Whole model: the static decode step with decode_kernel "triton" (capture=False: runs on the interpreter too)


def _generate(model: torch.nn.Module, kernel: str, *args: object, gemv: bool = False, **kwargs: object):
    """generate() through the static step (no graph) with the given kernel (``gemv``: the steps of every batch
    as fused projections); the logits of every step too. The runners stay installed for the test to inspect."""
    model.config.decode_kernel = kernel
    install_graph_decoding(model, capture=False, gemv=gemv, gemv_max_batch=ROWS_MAX, rows_min_batch=2)
    try:
        return model.generate(*args, return_dict_in_generate=True, output_logits=True, **kwargs)
    finally:
        model.config.decode_kernel = "torch"


@needs_kernel
def test_the_runners_take_fused_projections_at_the_batches_asked_for() -> None:
    """The runner of each batch takes the GEMV step exactly where ``fused`` says (the Triton kernel; here 2 is
    below rows_min_batch, 3 inside, 5 above gemv_max_batch)."""
    model = build_model(torch.float32).to(DEVICE)
    model.config.decode_kernel = "triton"
    try:
        install_graph_decoding(model, capture=False, rows_min_batch=3, gemv_max_batch=4)
        for batch, fused in ((1, True), (2, False), (3, True), (5, False)):
            model.generate(random_ids(batch, 5).to(DEVICE), max_new_tokens=2, **GREEDY)
            assert installed_graphs(model).runners[batch].gemv == fused, batch
    finally:
        model.config.decode_kernel = "torch"


@needs_kernel
def test_greedy_generate_with_the_kernel_equals_torch_step() -> None:
    model = build_model(torch.float32, **PREFILL).to(DEVICE)
    prompt = random_ids(1, 11).to(DEVICE)
    torch_run = _generate(model, "torch", prompt, max_new_tokens=14, **GREEDY)
    kernel_run = _generate(model, "triton", prompt, max_new_tokens=14, **GREEDY)
    runner = installed_graphs(model).runners[1]
    assert runner.kernel == "triton" and not runner.gemv  # the layer forwards' step, as asked for
    assert torch.equal(kernel_run.sequences, torch_run.sequences)
    assert len(set(kernel_run.sequences[0, 11:].tolist())) >= 4  # a non-degenerate continuation
    for got, want in zip(kernel_run.logits, torch_run.logits, strict=True):
        assert _rel_err(got, want) < 1e-5
    cache = kernel_run.past_key_values
    assert all(cache.get_state(i) is runner.states[i] for i in range(2))


@needs_kernel
def test_batch_one_gemv_step_equals_torch_step() -> None:
    """The batch-1 step as fused GEMVs (``gemv=True``: norms folded in, GLU and residual adds fused) against
    the torch step, greedy over 14 tokens in fp32."""
    model = build_model(torch.float32, **PREFILL).to(DEVICE)
    prompt = random_ids(1, 11).to(DEVICE)
    torch_run = _generate(model, "torch", prompt, max_new_tokens=14, **GREEDY)
    gemv_run = _generate(model, "triton", prompt, max_new_tokens=14, gemv=True, **GREEDY)
    runner = installed_graphs(model).runners[1]
    assert runner.kernel == "triton" and runner.gemv
    assert torch.equal(gemv_run.sequences, torch_run.sequences)
    for got, want in zip(gemv_run.logits, torch_run.logits, strict=True):
        assert _rel_err(got, want) < 1e-5


@needs_kernel
def test_small_batch_gemv_step_equals_torch_step() -> None:
    """Three left-padded rows as fused projections of several rows (each weight tile read once for all rows,
    each row normed by itself, the pad flags in the recurrence) against the torch step, in fp32."""
    model = build_model(torch.float32, **PREFILL).to(DEVICE)
    rows = [random_ids(1, 13, seed=1)[0], random_ids(1, 4, seed=2)[0], random_ids(1, 9, seed=3)[0]]
    ids, mask = left_padded(rows)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    torch_run = _generate(model, "torch", ids, attention_mask=mask, max_new_tokens=9, **GREEDY)
    gemv_run = _generate(model, "triton", ids, attention_mask=mask, max_new_tokens=9, gemv=True, **GREEDY)
    runner = installed_graphs(model).runners[3]
    assert runner.kernel == "triton" and runner.gemv
    assert torch.equal(gemv_run.sequences, torch_run.sequences)
    for got, want in zip(gemv_run.logits, torch_run.logits, strict=True):
        assert _rel_err(got, want) < 1e-5


@needs_kernel
def test_left_padded_batch_with_the_kernel_equals_torch_step() -> None:
    model = build_model(torch.float32, **PREFILL).to(DEVICE)
    rows = [random_ids(1, 13, seed=1)[0], random_ids(1, 4, seed=2)[0], random_ids(1, 9, seed=3)[0]]
    ids, mask = left_padded(rows)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    # A 0 at the newest column: the static step's pad flags (v zeroed in the kernel) are exercised too.
    torch_run = _generate(model, "torch", ids, attention_mask=mask, max_new_tokens=9, **GREEDY)
    kernel_run = _generate(model, "triton", ids, attention_mask=mask, max_new_tokens=9, **GREEDY)
    assert torch.equal(kernel_run.sequences, torch_run.sequences)
    for got, want in zip(kernel_run.logits, torch_run.logits, strict=True):
        assert _rel_err(got, want) < 1e-5


@needs_kernel
def test_lora_beam_search_with_the_kernels_equals_torch_step() -> None:
    """The Triton step (fused recurrence, SiLU and norms) under an unmerged peft LoRA adapter, with beam
    search reordering the cache between steps."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["qkvu_proj", "out_proj", "l1", "l2", "l3"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = get_peft_model(build_model(torch.float32, **PREFILL), lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(len(name)))
    base = model.eval().get_base_model().to(DEVICE)
    prompt = random_ids(2, 9, seed=4).to(DEVICE)
    kwargs = {"num_beams": 3, "num_return_sequences": 3, "max_new_tokens": 6, "length_penalty": 0.0, **GREEDY}
    torch_run = _generate(base, "torch", prompt, output_scores=True, **kwargs)
    kernel_run = _generate(base, "triton", prompt, output_scores=True, **kwargs)
    assert installed_graphs(base).runners[6].kernel == "triton"  # 2 prompts × 3 beams
    assert not gemv_applies(base)  # peft's layers keep their forwards (also at batch 1)
    assert torch.equal(kernel_run.sequences, torch_run.sequences)
    torch.testing.assert_close(kernel_run.sequences_scores, torch_run.sequences_scores, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_padded_decode_step_through_the_runner_equals_torch_step() -> None:
    """A new token marked as padding (attention_mask 0 in its last column) only decays the state."""
    model = build_model(torch.float32, **PREFILL).to(DEVICE)
    ids = random_ids(3, 8).to(DEVICE)
    mask = torch.ones(3, 8, dtype=torch.long, device=DEVICE)
    mask[1, -1] = 0
    results = {}
    for kernel in KERNELS:
        model.config.decode_kernel = kernel
        cache = TransnormerCache(model.config)
        with torch.no_grad():
            model(ids[:, :7], past_key_values=cache)
            runner = DecodeStepRunner(model, 3, torch.device(DEVICE), capture=False)
            logits = runner.step(model, ids[:, 7:], mask, cache)
        results[kernel] = (logits, [s.clone() for s in runner.states])
    model.config.decode_kernel = "torch"
    assert _rel_err(results["triton"][0], results["torch"][0]) < 1e-5
    for got, want in zip(results["triton"][1], results["torch"][1], strict=True):
        assert _rel_err(got, want) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# GPU only: model-sized shapes and a captured CUDA graph


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("key_dim", [128, 256])
def test_cuda_kernel_at_7b_shapes(key_dim: int) -> None:
    gen = torch.Generator().manual_seed(key_dim)
    batch, heads, value_dim = 32, 32, 128
    decay = (0.5 + 0.5 * torch.rand(heads, generator=gen)).cuda()
    want_state = torch.randn(batch, heads, key_dim, value_dim, generator=gen).cuda()
    got_state = want_state.clone()
    for _ in range(10):
        q, k, v = _step_inputs(batch, heads, key_dim, value_dim, torch.bfloat16, gen)
        pad = (torch.rand(batch, generator=gen) < 0.1).cuda()
        want = torch_step(q, k, v, want_state, decay, pad)
        got = triton_step(q, k, v, got_state, decay, pad)
        assert _rel_err(got_state, want_state) < 1e-5
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=2**-7 * want.abs().max().item())
    print(f"\nK={key_dim}: state relative error {_rel_err(got_state, want_state):.2e}")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_with_the_kernel(dtype: torch.dtype) -> None:
    """Captured graphs with decode_kernel "triton" against captured graphs with "torch" (greedy, batch 3)."""
    model = build_model(torch.float32, **PREFILL).to(device="cuda", dtype=dtype)
    prompt = random_ids(3, 12).cuda()
    runs = {}
    for kernel in KERNELS:
        model.config.decode_kernel = kernel
        graphs = install_graph_decoding(model, capture=True)
        runs[kernel] = model.generate(prompt, max_new_tokens=16, return_dict_in_generate=True, output_logits=True,
                                      **GREEDY)
        assert not graphs.failed and graphs.runners[3].graph is not None and graphs.runners[3].kernel == kernel
    model.config.decode_kernel = "torch"
    if dtype == torch.float32:
        assert torch.equal(runs["triton"].sequences, runs["torch"].sequences)
    else:
        # bf16: a near-tie may flip on rounding later on; the first 4 new tokens agree.
        assert torch.equal(runs["triton"].sequences[:, : 12 + 4], runs["torch"].sequences[:, : 12 + 4])
    first = _rel_err(runs["triton"].logits[1], runs["torch"].logits[1])
    assert first < (1e-4 if dtype == torch.float32 else 2e-2)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 32])
def test_cuda_graph_gemv_step_at_1b_width(batch: int) -> None:
    """The step on fused projections (captured; one-row GEMVs at batch 1, the rows kernel at 32) against the
    torch step's graph, at the 1B's width (two layers: the LRPE one and a plain one), bf16; with programmatic
    dependent launches (on sm_90 and later) bitwise the same as without."""
    geometry = {"decoder_embed_dim": 2048, "hidden_dim": 2048, "decoder_attention_heads": 16, "glu_dim": 5632,
                "init_std": 0.02}
    model = build_model(torch.float32, **PREFILL, **geometry).to(device="cuda", dtype=torch.bfloat16)
    prompt = random_ids(batch, 12).cuda()
    runs = {}
    for kernel, pdl in (("torch", False), ("triton", False), ("triton", True)):
        model.config.decode_kernel = kernel
        graphs = install_graph_decoding(model, capture=True, gemv=True, pdl=pdl, gemv_max_batch=batch)
        runs[kernel, pdl] = model.generate(prompt, max_new_tokens=8, return_dict_in_generate=True,
                                           output_logits=True, **GREEDY)
        runner = graphs.runners[batch]
        assert runner.graph is not None and runner.gemv == (kernel == "triton")
        assert runner.pdl == (pdl and pdl_supported("cuda"))
    model.config.decode_kernel = "torch"
    want, got = runs["torch", False], runs["triton", False]
    # The first step's input is the prefill's token in both; later a near-tie may flip a row's token on
    # rounding (32 rows: a few may).
    assert _rel_err(got.logits[1], want.logits[1]) < 2e-2
    agree = (got.sequences[:, : 12 + 4] == want.sequences[:, : 12 + 4]).all(dim=1)
    assert agree.sum() >= batch - batch // 8, agree
    for step in range(2, 4):
        assert _rel_err(got.logits[step][agree], want.logits[step][agree]) < 2e-2
    assert torch.equal(runs["triton", True].sequences, got.sequences)
    for with_pdl, without in zip(runs["triton", True].logits, got.logits, strict=True):
        assert torch.equal(with_pdl, without)


EngineRun = tuple[list[list[int]], list[torch.Tensor]]  # each request's tokens, the stored session states


def _engine_run(batch: list[list[int]], slots: int, defer: int, fused_projections: bool = False) -> EngineRun:
    """The serving engine's replies to ``batch`` (one request each, in ``slots`` slots: later ones join as
    earlier ones end; the tiny model in fp32, the Triton step), and the session states stored as each ends."""
    import threading

    from tnlora.model import load_model
    from tnlora.model.loading import set_attention_impl
    from tnlora.model.tokenizer import ByteTokenizer
    from tnlora.serve.engine import Engine, SamplingParams
    from tnlora.serve.sessions import SessionStore

    model = load_model("tiny", dtype=torch.float32, device=DEVICE)
    set_attention_impl(model, "chunked")
    model.config.decode_kernel = "triton"
    store = SessionStore(torch.device(DEVICE), 8, 0)
    engine = Engine(model, ByteTokenizer(), eos_ids=(), max_batch=slots, sessions=store, capture=False,
                    defer_steps=defer, fused_projections=fused_projections).start()  # fmt: skip
    try:
        assert engine.deferred == (defer > 0) and engine.runner.gemv == fused_projections
        done, requests = [threading.Event() for _ in batch], []
        for i, ids in enumerate(batch):
            sink = (lambda d: lambda event: d.set() if event.finish_reason else None)(done[i])
            requests.append(engine.submit(ids, SamplingParams(max_tokens=5 + 3 * i), sink, session_id=f"s{i}"))
        assert all(d.wait(120) for d in done)
        states = []
        for i, ids in enumerate(batch):
            checkpoint = store.take(f"s{i}", ids + requests[i].generated + [7])
            assert checkpoint is not None and len(checkpoint.ids) == len(ids) + len(requests[i].generated)
            states += checkpoint.states
        return [r.generated for r in requests], states
    finally:
        engine.shutdown()


def _assert_same_run(got: EngineRun, want: EngineRun) -> None:
    assert got[0] == want[0]
    for a, b in zip(got[1], want[1], strict=True):
        assert _rel_err(a, b) < 1e-5


@needs_kernel
def test_serving_engine_with_deferred_state_writes_equals_writes_every_step() -> None:
    """The serving engine's slots with the states written back every 4th step (``defer_steps=4``), and so with
    the step as fused projections of the slots' rows (``fused_projections``), against every step on the layer
    forwards, fp32, requests joining and leaving at different steps: the same tokens, and the session states
    stored when a reply ends (made whole from the row's held steps) equal within rounding."""
    import random

    rng = random.Random(4)
    batch = [[rng.randrange(3, 259) for _ in range(rng.randrange(2, 30))] for _ in range(6)]
    plain = _engine_run(batch, 4, 0)
    for other in (_engine_run(batch, 4, 4), _engine_run(batch, 4, 4, fused_projections=True)):
        _assert_same_run(other, plain)


@needs_kernel
def test_serving_engine_of_one_slot_as_fused_projections_equals_the_layer_forwards() -> None:
    """One slot (``tnlora serve --max_batch 1``, fused by default): the one-row fused step, requests one after the
    other, against the layer forwards: the same tokens and stored session states."""
    import random

    rng = random.Random(5)
    batch = [[rng.randrange(3, 259) for _ in range(rng.randrange(2, 20))] for _ in range(3)]
    _assert_same_run(_engine_run(batch, 1, 0, fused_projections=True), _engine_run(batch, 1, 0))
